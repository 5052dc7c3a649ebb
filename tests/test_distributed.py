"""TinyImageNet: 2-process gloo training on CPU over a tiny generated ImageFolder, against a
single process on the same global batch; data preparation; store sizing and refusal."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

sys.path.append(os.path.join(ROOT, 'TinyImagenet'))


def make_tiny_imagenet(root, per_class=2, classes=200, seed=0):
    """root/tiny-imagenet-200/{train,val}/<wnid>/*.JPEG, 64x64 RGB (val already regrouped)."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', per_class), ('val', 1)):
        for c in range(classes):
            d = os.path.join(root, 'tiny-imagenet-200', split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for k in range(n):
                img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{c}_{k}.JPEG"), format='JPEG')
    return root


ARGS = ['--cpu', '--no_download', '--no_augmentation', '--n_train', '16', '--n_test', '8', '--test_batch_size', '8',
        '--epochs', '1', '--rampup', '1', '--starting_epsilon', '0.1', '--sniter', '1',
        '--test_sniter', '2', '--test_opt_iter', '2', '--niter', '1', '--indices', '0,6,12,14,17',
        '--store_dtype', 'float16']


def first_loss(out):
    m = re.search(r"first step: loss ([0-9.]+) \(global batch (\d+)\)", out)
    assert m, out
    return float(m.group(1)), int(m.group(2))


def test_two_process_gloo_equals_one_process(tmp_path):
    data = make_tiny_imagenet(str(tmp_path / 'data'))
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    ddp = str(tmp_path / 'ddp')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        '--master_port', '29533', os.path.join(ROOT, 'TinyImagenet', 'train_tinyimagenet.py'),
                        *ARGS, '--data_dir', data, '--batch_size', '4', '--prefix', ddp],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    loss2, gb2 = first_loss(p.stdout)
    assert p.stdout.count('epoch 0 |') == 1             # one summary line: rank 0 only
    assert 'final (' in p.stdout
    files = sorted(os.listdir(tmp_path))
    # the best model is chosen only from epoch warmup + rampup = 1 on (the reference's rule)
    assert 'ddp_tinyimagenet_relux_checkpoint.pth' in files and 'ddp_tinyimagenet_relux_best.pth' not in files
    assert 'there is no best model' in p.stdout
    assert torch.load(str(tmp_path / 'ddp_tinyimagenet_relux_checkpoint.pth'), weights_only=False)['epoch'] == 0
    # --resume, distributed: continues at epoch 1 from rank 0's checkpoint and each rank's vectors
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        '--master_port', '29534', os.path.join(ROOT, 'TinyImagenet', 'train_tinyimagenet.py'),
                        *ARGS, '--epochs', '2', '--data_dir', data, '--batch_size', '4',
                        '--prefix', ddp, '--resume'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'at epoch 1' in p.stdout and p.stdout.count('epoch 1 |') == 1 and 'warning' not in p.stdout
    assert torch.load(str(tmp_path / 'ddp_tinyimagenet_relux_checkpoint.pth'), weights_only=False)['epoch'] == 1
    one = str(tmp_path / 'one')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'TinyImagenet', 'train_tinyimagenet.py'), *ARGS,
                        '--data_dir', data, '--batch_size', '8', '--prefix', one],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    loss1, gb1 = first_loss(p.stdout)
    assert gb1 == gb2 == 8
    assert loss2 == pytest.approx(loss1, rel=1e-5)


def test_prepare_regroups_validation(tmp_path):
    from prepare_data import main as prepare
    from prepare_data import regroup_val
    root = tmp_path / 'data' / 'tiny-imagenet-200'
    (root / 'val' / 'images').mkdir(parents=True)
    lines = []
    for k, wnid in enumerate(['n01', 'n02', 'n01']):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / 'val' / 'images' / f"val_{k}.JPEG", format='JPEG')
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
    prepare(['--data_dir', str(tmp_path / 'data'), '--no_download'])
    assert sorted(os.listdir(root / 'val' / 'n01')) == ['val_0.JPEG', 'val_2.JPEG']
    assert os.listdir(root / 'val' / 'n02') == ['val_1.JPEG']
    assert not (root / 'val' / 'images').exists()
    assert regroup_val(str(root)) == 0                   # idempotent


def test_tiny_store_sizes_and_refusal(tmp_path):
    from locallip.errors import UserError
    from locallip.layers import layer_input_shapes
    from locallip.models import select_model
    from locallip.storage import check_store_fits
    from locallip.vectors import VectorStore
    shapes = layer_input_shapes(select_model('tinyimagenet', 'tinyimagenet_relux'), (3, 64, 64))
    assert VectorStore.bytes_per_sample(shapes) == 928576 * 4
    assert VectorStore.bytes_per_sample(shapes, [0, 6, 12, 14, 17], torch.float16) == 158272 * 2
    with pytest.raises(UserError, match='needs 1000.0 GiB of RAM'):
        check_store_fits(1000 * 2 ** 30, None, 10 * 2 ** 30)
    with pytest.raises(UserError, match='GiB of disk'):
        check_store_fits(2 ** 60, str(tmp_path / 'x_store'), 0)
    check_store_fits(2 ** 20, None, 10 * 2 ** 30)            # fits: no error


def test_sparsity_loss_values():
    from locallip.bound import BoundResult, sparsity_loss
    from locallip.models import ClampGroupSort, ReLU_x
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), ReLU_x((2,), 1.0), torch.nn.Linear(2, 4),
                              ClampGroupSort((2,), 0.5, -0.5), torch.nn.Linear(4, 2))
    res = BoundResult(None, None, None, None)
    res.pre_boxes = {1: (torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, -0.5]])),
                     3: (torch.tensor([[9.0, 9.0, 9.0, 9.0]]), torch.tensor([[9.0, 9.0, 9.0, 9.0]]))}
    # MaxMin: the box AFTER the activation (the pre-activation box above must not be used)
    res.post_boxes = {3: (torch.tensor([[0.0, 1.0, -1.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0, 1.0]]))}
    # ReLU_x: mean(relu(ub)) = 1.0; mean(relu(1 - lb)) = (0.5 + 2) / 2 = 1.25, weighted 0.1
    # MaxMin: mean(relu(0.5 - lb[:2])) = (0.5 + 0) / 2; mean(relu(ub[2:] + 0.5)) = (0.5 + 1.5) / 2
    assert sparsity_loss(net, res, 0.1).item() == pytest.approx(1.0 + 0.125 + 0.25 + 1.0)


# ----------------------------------------------------------------------------------------
# Evaluation under torchrun: the rows of one process, whatever the process count
# ----------------------------------------------------------------------------------------
EVAL = ['--data', 'mnist', '--model', 'evalnet:net', '--no_download', '--cpu', '--n_test', '96',
        '--test_batch_size', '8', '--epsilon', '2.5', '2.68', '--test_sniter', '100',
        '--niter', '3', '--certificate', 'guaranteed', '--audit', '--audit_restarts', '1',
        '--audit_steps', '5']
EVALNET = """import torch.nn as nn
def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
"""


def _evalnet(tmp_path):
    """A small user network (--model evalnet:net) that classifies make_mnist_like's blocks:
    hidden unit c sums class c's block (minus a threshold), the rest are small noise."""
    import importlib.util
    (tmp_path / 'evalnet.py').write_text(EVALNET)
    spec = importlib.util.spec_from_file_location('evalnet', str(tmp_path / 'evalnet.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.net()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(32, 28, 28, generator=g) * 0.01
        for c in range(10):
            r, q = divmod(c, 5)
            w[c, 4 + 10 * r: 12 + 10 * r, 1 + 5 * q: 6 + 5 * q] = 1.0
        net[1].weight.copy_(w.reshape(32, 784))
        net[1].bias.fill_(-12.0)
        net[3].weight.copy_(torch.eye(10, 32) + 0.01 * torch.randn(10, 32, generator=g))
        net[3].bias.zero_()
    torch.save({'state_dict': net.state_dict(), 'err': 0.0, 'epoch': 0},
               str(tmp_path / 'm_best.pth'))
    return str(tmp_path / 'm')


def _evaluate(nproc, data, model, out, *extra, port=29541, wait=True):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.path.dirname(model))
    launch = ([sys.executable] if nproc == 0 else
              [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
               '--master_port', str(port)])
    argv = [*launch, os.path.join(ROOT, 'evaluate.py'), *EVAL, '--data_dir', data,
            '--saved_model', model, '--out', out, *extra]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _rows(path):
    from locallip.report import read_tsv
    header, rows = read_tsv(path)
    return header, [{k: v for k, v in r.items() if not k.startswith('seconds')} for r in rows]


def _kill_when(proc, ready, timeout=300):
    import signal
    import time
    t = time.time()
    while not ready():
        assert proc.poll() is None, "the run finished before it could be interrupted"
        assert time.time() - t < timeout
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _lines(path):
    return open(path).read().count('\n') if os.path.exists(path) else 0


def test_distributed_evaluation_equals_one_process(tmp_path):
    """2 gloo processes write the rows of one (guaranteed certificates, two radii, audit):
    every batch is seeded by its number, never by rank or process count; an evaluation killed
    with 2 processes resumes with 1, one killed with 1 resumes with 3, to the same rows."""
    import json

    from conftest import make_mnist_like
    data = make_mnist_like(str(tmp_path / 'data'), n_train=16, n_test=96)
    model = _evalnet(tmp_path)
    one, two = str(tmp_path / 'one.tsv'), str(tmp_path / 'two.tsv')
    _evaluate(0, data, model, one, '--results', str(tmp_path / 'one.json'))
    out = _evaluate(2, data, model, two, '--results', str(tmp_path / 'two.json'))
    assert out.count('evaluate: m_best') + out.count(f"evaluate: {model}_best") == 1  # process 0
    assert 'on 2 x cpu (gloo)' in out
    header, ref = _rows(one)
    assert _rows(two) == (header, ref)                                  # row for row
    assert not [f for f in os.listdir(tmp_path) if '.rank' in f]       # part files removed
    a, b = (json.load(open(str(tmp_path / f))) for f in ('one.json', 'two.json'))
    for k in ('clean_acc', 'pgd_acc', 'certified_acc', 'radii', 'per_sample'):
        assert a[k] == b[k], k
    assert a['audit']['attacked'] == b['audit']['attacked'] > 0 and a['audit']['broken'] == 0
    for c in ('certified@2.68', 'certified_guaranteed@2.68'):
        assert 0 < sum(r[c] for r in ref) < len(ref), c                # a mix, not all or none
    # killed with 2 processes, resumed with 1; killed with 1, resumed with 3
    cut = str(tmp_path / 'cut.tsv')
    p = _evaluate(2, data, model, cut, port=29542, wait=False)
    _kill_when(p, lambda: _lines(cut + '.rank0') >= 9 and _lines(cut + '.rank1') >= 9)
    assert not os.path.exists(cut) and os.path.exists(cut + '.rank1')
    out = _evaluate(0, data, model, cut, '--resume')
    assert 'resuming' in out and _rows(cut) == (header, ref)
    assert not os.path.exists(cut + '.rank0') and not os.path.exists(cut + '.rank1')
    cut2 = str(tmp_path / 'cut2.tsv')
    p = _evaluate(0, data, model, cut2, wait=False)
    _kill_when(p, lambda: _lines(cut2) >= 30)
    out = _evaluate(3, data, model, cut2, '--resume', port=29543)
    assert 'resuming' in out and _rows(cut2) == (header, ref)
