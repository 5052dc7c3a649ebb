"""What the user reads when something is off: a file that is no checkpoint (said in words)
or one that carries code (refused, nothing run), a mistyped flag or job (the closest named
first, a short usage), training's progress lines in a log, and where the vector store lives
and whether it is saved."""
import io
import os
import pickle
import random
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import ROOT, device_flags, make_mnist_like, tiny_net, train_main

from locallip.errors import UserError


def inline(entry, argv, capsys):
    """(exit status, stderr) of an entry point run in this process as its script does."""
    from locallip.runtime import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: entry([*argv, *device_flags()]))
    return e.value.code, capsys.readouterr().err


def evaluate_with(path, capsys, data):
    from evaluate import main
    return inline(main, ['--data_dir', data, '--no_download', '--n_test', '4',
                         '--saved_model', path], capsys)


# ----------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, capsys):
    """Random bytes (also ones starting like a pickle), a zip archive of something else and
    a text file starting with a pickle opcode ('c'): 'not a PyTorch checkpoint', never
    'refused' (that is for files that carry code), from evaluate.py and train --resume."""
    rng = random.Random(0)
    data = make_mnist_like(str(tmp_path / 'data'), n_train=64, n_test=16)
    files = {'random': bytes(rng.getrandbits(8) for _ in range(5000)),
             'random80': b'\x80' + bytes(rng.getrandbits(8) for _ in range(4999)),
             'text': b"clean_err,certified_err\n0.25,0.42\n"}
    for name, content in files.items():
        open(str(tmp_path / name), 'wb').write(content)
    with zipfile.ZipFile(str(tmp_path / 'other.zip'), 'w') as z:
        z.writestr('notes.txt', 'not weights')
    for name, size in (('random', 5000), ('random80', 5000), ('text', 34), ('other.zip', None)):
        code, err = evaluate_with(str(tmp_path / name), capsys, data)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error:'), (name, err)
        assert 'not a PyTorch checkpoint' in err and 'refused' not in err, (name, err)
        assert size is None or f"({size} bytes that are neither" in err, (name, err)
    assert 'zip archive without the data.pkl torch.save writes; it holds notes.txt' in err
    # train --resume reads its checkpoint with the same words
    prefix = str(tmp_path / 'run')
    open(prefix + '_relux_checkpoint.pth', 'wb').write(files['random'])
    code, err = inline(lambda a: train_main(a, data='mnist'),
                       ['--data_dir', data, '--no_download', '--epochs', '1', '--n_test', '8',
                        '--batch_size', '32', '--prefix', prefix, '--resume'], capsys)
    assert code == 2 and 'not a PyTorch checkpoint (5000 bytes' in err and 'refused' not in err


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates a file (no shell)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_a_pickle_that_runs_code_is_refused_naming_it(tmp_path, capsys):
    """A real pickle whose reduce would create a file, as plain pickles of protocols 0, 2
    and 4 (the last one torch's loader stops on before reading the import) and inside a
    torch.save zip: refused, naming what it imports, and the file is never created."""
    marker = str(tmp_path / 'ran')
    for proto in (0, 2, 4):
        open(str(tmp_path / f'p{proto}.pkl'), 'wb').write(pickle.dumps(_Payload(marker), proto))
    torch.save({'state_dict': {}, 'x': _Payload(marker)}, str(tmp_path / 'zipped.pth'))
    from locallip.checkpoints import safe_load
    for name in ('p0.pkl', 'p2.pkl', 'p4.pkl', 'zipped.pth'):
        with pytest.raises(UserError) as e:
            safe_load(str(tmp_path / name))
        assert 'refused' in str(e.value) and '(io.open)' in str(e.value), (name, e.value)
        assert 'nothing in it was run' in str(e.value)
        assert not os.path.exists(marker), name
    data = make_mnist_like(str(tmp_path / 'data'), n_train=64, n_test=16)
    code, err = evaluate_with(str(tmp_path / 'p4.pkl'), capsys, data)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and 'refused' in err and 'io.open' in err, err
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------------------
# Mistyped flags and jobs
# ----------------------------------------------------------------------------------------
def test_a_mistyped_flag_names_the_closest(capsys):
    """Exit status 2, the closest flag on the error line, then one usage line (not the
    40-line usage); abbreviations of a flag are still accepted, as the reference's."""
    from evaluate import main
    from utils import argparser
    for argv, hint in ((['--epsilonn', '0.5'], '(did you mean --epsilon?)'),
                       (['--n_tset', '3', '--sniterr', '2'],
                        '(did you mean --n_test for --n_tset, --sniter for --sniterr?)')):
        with pytest.raises(SystemExit) as e:
            main(['--saved_model', 'x', *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 2, lines
        assert 'error: unrecognized arguments' in lines[0] and lines[0].endswith(hint), lines
        assert lines[1].startswith('usage: ') and '--help' in lines[1], lines
    assert argparser(['--epsilon_tr', '0.2']).epsilon_train == 0.2


def run_job(name):
    return subprocess.run(['bash', 'run_job.sh', name], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_a_mistyped_job_names_the_closest():
    """The closest job (or those the name starts), else every job on one line; then one
    usage line; exit status 2."""
    for name, hint in (('quickstrat', "did you mean quickstart?"),
                       ('fashion_t', "did you mean one of fashion_train fashion_tightness?"),
                       ('frobnicate', "the jobs are: setup quickstart report test ")):
        p = run_job(name)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 2, p.stderr
        assert lines[0].startswith(f"run_job.sh: unknown job '{name}'; {hint}"), lines
        assert lines[1].startswith('usage: bash run_job.sh <job>') and 'help' in lines[1]


# ----------------------------------------------------------------------------------------
# Training: progress lines in a log, the vector store line
# ----------------------------------------------------------------------------------------
PROGRESS = re.compile(r"  epoch 0 batch (\d)/4 loss [\d.]+ eps [\d.]+ \| mean loss [\d.]+ "
                      r"\(clean [\d.]+, robust [\d.]+\) \| [\d.]+ batches/s, [\d.]+ samples/s, "
                      r"\d+:\d\d left")


def tiny_training(tmp_path, stderr):
    """train_mnist.py for one epoch of 4 batches, stdout piped, a progress line at least
    every 0 s (LOCALLIP_PROGRESS_EVERY_S) and none by --verbose (1000 batches)."""
    data = make_mnist_like(str(tmp_path / 'data'), n_train=128, n_test=32)
    argv = [sys.executable, os.path.join(ROOT, 'train_mnist.py'), '--data_dir', data,
            '--no_download', '--batch_size', '32', '--n_train', '128', '--n_test', '32',
            '--epochs', '1', '--rampup', '1', '--sniter', '1', '--test_sniter', '2',
            '--niter', '1', '--verbose', '1000', '--no_save_vectors',
            '--prefix', str(tmp_path / 'run'), *device_flags()]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2',
               LOCALLIP_PROGRESS_EVERY_S='0')
    return subprocess.run(argv, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=600)


def test_training_in_a_log_prints_progress_lines(tmp_path):
    """Output piped: a line per batch at the interval 0, with the mean losses so far and
    the rate. The start-up line of the vector store says it is not saved."""
    p = tiny_training(tmp_path, subprocess.STDOUT)
    assert p.returncode == 0, p.stdout
    assert [int(m.group(1)) for m in PROGRESS.finditer(p.stdout)] == [1, 2, 3, 4], p.stdout
    assert re.search(r"vector store: .* float32 in RAM: [\d.]+ GiB \(.*\); not saved "
                     r"\(--no_save_vectors: --resume restarts the vectors from random\)",
                     p.stdout), p.stdout


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_reach_a_log_on_stdout_while_the_bar_is_on_a_terminal(monkeypatch,
                                                                            capsys):
    """stdout in a log file, stderr (the progress bar) on a terminal: the log still gets
    the progress lines (here at every batch)."""
    from conftest import blob_loader

    from locallip import training as train
    from locallip.layers import layer_input_shapes
    from locallip.vectors import VectorStore
    from utils import argparser
    monkeypatch.setattr('sys.stderr', Terminal())
    monkeypatch.setattr(train, 'PROGRESS_EVERY_S', 0.0)
    args = argparser(['--sniter', '1', '--rampup', '1', '--epsilon', '0.1',
                      '--epsilon_train', '0.1'])
    net = tiny_net('relux')
    store = VectorStore(layer_input_shapes(net, (1, 8, 8)), 64)
    run = train.Run(args, net, torch.optim.Adam(net.parameters()), None,
                    blob_loader(64, batch=16), None, (store, None), torch.device('cpu'), None, '')
    train.train_epoch(run, 0)
    assert [int(m.group(1)) for m in PROGRESS.finditer(capsys.readouterr().out)] == [1, 2, 3, 4]
    assert 'epoch 0' in sys.stderr.getvalue()           # the bar


def test_the_vector_store_line_says_whether_and_where_it_is_saved(tmp_path):
    from locallip.storage import make_stores
    from utils import argparser
    net, said = tiny_net('relux'), []
    say = lambda *a, **k: said.append(a[0])              # noqa: E731
    base = str(tmp_path / 'r')
    for flags, ending in (([], "float32 in RAM: 0.00 GiB (half the available RAM is "),
                          ([], f"; saved every epoch to {base}_vectors.pt for --resume"),
                          (['--no_save_vectors'], "; not saved (--no_save_vectors: --resume "
                                                  "restarts the vectors from random)"),
                          (['--no_save'], "; not saved (--no_save)"),
                          (['--store_backing', 'disk', '--no_save_vectors'],
                           "random); its disk files are scratch"),
                          (['--store_backing', 'disk'], f"; the disk files are updated in place, "
                                                        f"{base}_vectors.pt saved every epoch")):
        make_stores(argparser(flags), net, (1, 8, 8), 5, 3, base, say)
        assert ending in said[-1], (flags, said[-1])
