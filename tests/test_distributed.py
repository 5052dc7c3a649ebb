"""TinyImageNet: 2-process gloo training on CPU over a tiny generated ImageFolder, against a
single process on the same global batch; data preparation; store sizing and refusal."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

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
    from prepare_data import main as prepare, regroup_val
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
    from local_bound import VectorStore, layer_input_shapes
    from train import check_store_fits
    from utils import UserError, select_model
    shapes = layer_input_shapes(select_model('tinyimagenet', 'tinyimagenet_relux'), (3, 64, 64))
    assert VectorStore.bytes_per_sample(shapes) == 928576 * 4
    assert VectorStore.bytes_per_sample(shapes, [0, 6, 12, 14, 17], torch.float16) == 158272 * 2
    with pytest.raises(UserError, match='needs 1000.0 GiB of RAM'):
        check_store_fits(1000 * 2 ** 30, None, 10 * 2 ** 30)
    with pytest.raises(UserError, match='GiB of disk'):
        check_store_fits(2 ** 60, str(tmp_path / 'x_store'), 0)
    check_store_fits(2 ** 20, None, 10 * 2 ** 30)            # fits: no error


def test_sparsity_loss_values():
    from local_bound import BoundResult, sparsity_loss
    from utils import ClampGroupSort, ReLU_x
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
