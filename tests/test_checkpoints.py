"""Checkpoints (checkpoints.py): a file that would run code is refused everywhere it can be
read, pickled modules get the state_dict advice, the reference's format and the bundled
checkpoints load, a missing resume key is one error line, and a checkpoint that does not
load fails the Fashion-MNIST tests instead of skipping them."""
import os

import pytest
import torch
import torch.nn as nn
from conftest import BUNDLED, ROOT, fashion, make_mnist_like, train_main

import locallip
from locallip.checkpoints import load_checkpoint
from locallip.errors import UserError
from locallip.models import select_model


def test_checkpoint_that_runs_code_is_refused_everywhere(tmp_path, capsys):
    import subprocess
    import sys

    from conftest import device_flags

    marker = str(tmp_path / 'ran')
    data = make_mnist_like(str(tmp_path / 'data'), n_train=64, n_test=16)
    _evil(str(tmp_path / 'm_best.pth'), marker)
    # evaluate.py, a real process: exit 2, one error line naming the file, nothing ran
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), '--data_dir', data,
                        '--no_download', '--saved_model', str(tmp_path / 'm'), '--n_test', '4',
                        *device_flags()], capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and 'm_best.pth' in lines[0], lines
    assert 'refused' in lines[0] and 'Traceback' not in p.stderr
    assert not os.path.exists(marker)
    # train --resume: the checkpoint, then (behind a valid checkpoint) the vector store
    prefix = str(tmp_path / 'run')
    _evil(prefix + '_relux_checkpoint.pth', marker)
    argv = ['--data_dir', data, '--no_download', '--epochs', '2', '--n_test', '8',
            '--batch_size', '32', '--test_sniter', '2', '--prefix', prefix, '--resume',
            '--niter', '1', *device_flags()]
    from locallip.runtime import run_main
    for _ in range(2):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(lambda: train_main(argv, data='mnist'))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error:') and 'refused' in err, err
        assert not os.path.exists(marker)
        net = select_model('mnist', 'relux')
        opt = torch.optim.Adam(net.parameters())
        torch.save({'state_dict': net.state_dict(), 'err': 0.5, 'epoch': 0, 'best_err': 1.0,
                    'optimizer': opt.state_dict(),
                    'scheduler': torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1).state_dict(),
                    'global_vectors': {}}, prefix + '_relux_checkpoint.pth')
        torch.save({'epoch': 0, 'train': {'initialized': torch.zeros(1), 'x': _Payload(marker)}},
                   prefix + '_relux_vectors.pt')
    # the API's loader
    with pytest.raises(UserError, match='refused'):
        locallip.load_weights(select_model('mnist', 'relux'), str(tmp_path / 'm_best.pth'))
    assert not os.path.exists(marker)


def test_pickled_module_gets_the_state_dict_advice(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3))
    torch.save(net, str(tmp_path / 'whole_best.pth'))
    with pytest.raises(UserError, match=r"whole pickled module.*state_dict"):
        load_checkpoint(str(tmp_path / 'whole_best.pth'), net)


def test_reference_format_and_bundled_checkpoints_load(tmp_path):
    net = select_model('mnist', 'relux')
    torch.save({'state_dict': net.state_dict(), 'err': 0.3, 'epoch': 7}, str(tmp_path / 'r.pth'))
    assert load_checkpoint(str(tmp_path / 'r.pth'), select_model('mnist', 'relux'))['epoch'] == 7
    for run in ('fashionmnist', 'fashionmnist_long'):
        for bound in ('local', 'global'):
            ck = locallip.load_weights(select_model('fashionmnist', 'relux', 2.0),
                                       os.path.join(ROOT, 'pretrained', run, f'{bound}_relux_best.pth'))
            assert ck['args']['bound'] == bound


def test_resume_key_missing_is_one_error_line(tmp_path, capsys):
    from conftest import device_flags

    from locallip.runtime import run_main
    data = make_mnist_like(str(tmp_path / 'data'), n_train=64, n_test=16)
    prefix = str(tmp_path / 'run')
    torch.save({'state_dict': select_model('mnist', 'relux').state_dict(), 'err': 0.5, 'epoch': 0},
               prefix + '_relux_checkpoint.pth')
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train_main(['--data_dir', data, '--no_download', '--prefix', prefix,
                                     '--resume', *device_flags()], data='mnist'))
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'cannot be resumed' in err and 'optimizer' in err


@fashion
def test_a_checkpoint_that_does_not_load_fails_the_fashion_tests(tmp_path):
    """The Fashion-MNIST tests skip only when the dataset is not installed: with the bundled
    checkpoint cut short, one of them fails, naming the file (before, the skip condition
    loaded the checkpoint too and any error read as "Fashion-MNIST is not installed")."""
    import subprocess
    import sys
    cut = tmp_path / 'cut_best.pth'
    with open(BUNDLED, 'rb') as f:
        cut.write_bytes(f.read(1000))
    env = dict(os.environ, LOCALLIP_TEST_BUNDLED=str(cut), OMP_NUM_THREADS='2')
    p = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rs',
                        'tests/test_radius.py::test_reference_radius_brackets_the_certificate'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and '1 failed' in out and 'skipped' not in out, out[-3000:]
    assert str(cut) in out and 'UserError' in out, out[-3000:]


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates a file (no shell)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def _evil(path, marker, **extra):
    torch.save({'state_dict': select_model('mnist', 'relux').state_dict(), 'err': 0.5,
                'epoch': 0, 'x': _Payload(marker), **extra}, path)
