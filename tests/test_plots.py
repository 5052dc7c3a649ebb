"""Training curves from TensorBoard scalars (plots.py --runs): reading resumed runs, the ramp
marker, and the figures written by the CLI."""
import os

import pytest
from torch.utils.tensorboard import SummaryWriter

from locallip.plots import make_training_plots, ramp_end_epoch, read_scalars, series, varying_data
from plots import main


def write_run(path, epochs, eps, offset=0.0, varying=(1, 3)):
    """One event file as the training loop writes it: the per-epoch scalars the training figures read."""
    w = SummaryWriter(path)
    for e, r in zip(epochs, eps):
        w.add_scalar('train/clean_loss_epoch', 2.0 - 0.1 * e + offset, e)
        w.add_scalar('train/robust_loss_epoch', 2.5 - 0.1 * e + offset, e)
        w.add_scalar('train/lip_ratio_epoch', 0.2 + 0.01 * e + offset, e)
        for k in varying:
            w.add_scalar(f'train/varying@{k}_epoch', 0.5 + 0.01 * k + 0.001 * e, e)
        w.add_scalar('test/clean_err', 0.3, e)
        w.add_scalar('test/certified_err', 0.6, e)
        w.add_scalar('test/eps', r, e)
    w.close()


def test_resumed_run_keeps_the_last_write_of_each_epoch(tmp_path):
    d = str(tmp_path / 'tb')
    write_run(d, [0, 1, 2], [0.2, 0.4, 0.6])
    # killed after epoch 2's scalars, before its checkpoint: the resumed run redoes epoch 2
    write_run(d, [2, 3], [0.6, 0.8], offset=1.0)
    assert len([f for f in os.listdir(d) if 'tfevents' in f]) == 2
    sc = read_scalars(d)
    steps, vals = series(sc, 'train/clean_loss_epoch')
    assert steps == [0, 1, 2, 3]
    assert vals == pytest.approx([2.0, 1.9, 2.8, 2.7])      # epoch 2 from the resumed file
    assert series(sc, 'no/such_tag') == ([], [])
    v = varying_data(sc)
    assert list(v) == [1, 3] and v[3][0] == [0, 1, 2, 3]
    assert v[3][1] == pytest.approx([0.53, 0.531, 0.532, 0.533])


def test_ramp_end_needs_the_final_radius_twice(tmp_path):
    ramping, done = str(tmp_path / 'a'), str(tmp_path / 'b')
    write_run(ramping, [0, 1, 2], [0.2, 0.4, 0.6])
    write_run(done, [0, 1, 2, 3, 4], [0.25, 0.5, 1.0, 1.0, 1.0])
    assert ramp_end_epoch(read_scalars(ramping)) is None    # 0.6 may not be the last radius
    assert ramp_end_epoch(read_scalars(done)) == 2
    assert ramp_end_epoch({}) is None


def test_cli_writes_the_five_figures(tmp_path, capsys):
    loc, glo, out = str(tmp_path / 'l'), str(tmp_path / 'g'), str(tmp_path / 'figs')
    write_run(loc, range(4), [0.5, 1, 1, 1])
    write_run(glo, range(4), [0.5, 1, 1, 1], offset=0.3)
    assert main(['--runs', f'local={loc}', f'global={glo}', '--out', out, '--title', 't']) == 0
    names = ['clean_loss.png', 'robust_loss.png', 'lip_ratio.png', 'varying.png',
             'test_error.png']
    for n in names:
        assert os.path.getsize(os.path.join(out, n)) > 5000
    assert capsys.readouterr().out.split() == [os.path.join(out, n) for n in names]
    assert main(['--runs', f'local={tmp_path / "missing"}', '--out', out]) == 2
    assert 'no TensorBoard event files' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--runs', loc, '--out', out])                  # no LABEL=
    with pytest.raises(FileNotFoundError):
        make_training_plots({'x': str(tmp_path)}, out)
