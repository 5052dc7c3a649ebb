"""Training curves of one or more runs from their TensorBoard logs:

    python plots.py --runs local=pretrained/fashionmnist/local_relux_tb \
        global=pretrained/fashionmnist/global_relux_tb --out figures/ --title 'Fashion-MNIST'

The figures are drawn by ``locallip/plots.py`` (its docstring lists them)."""
import argparse
import sys

from locallip.plots import make_training_plots


def main(argv=None):
    p = argparse.ArgumentParser(description='Training curves (PNG) from TensorBoard runs of '
                                'the training scripts; the figures: locallip/plots.py')
    p.add_argument('--runs', nargs='+', required=True, metavar='LABEL=DIR',
                   help='one LABEL=DIR per run: DIR is the run\'s TensorBoard folder '
                        '(<prefix>_<model>_tb), LABEL its name in the legends')
    p.add_argument('--out', required=True, help='folder the PNGs are written to')
    p.add_argument('--title', default='', help='appended to every figure\'s title')
    a = p.parse_args(argv)
    runs = {}
    for r in a.runs:
        label, sep, d = r.partition('=')
        if not sep or not label or not d:
            p.error(f"--runs takes LABEL=DIR, got {r!r}")
        runs[label] = d
    try:
        paths = make_training_plots(runs, a.out, a.title)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0



if __name__ == '__main__':
    sys.exit(main())
