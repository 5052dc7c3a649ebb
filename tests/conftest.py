"""Shared fixtures: tiny seeded networks and datasets written in the exact on-disk formats."""
import math
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

from locallip.checkpoints import load_checkpoint  # noqa: E402
from locallip.errors import UserError  # noqa: E402
from locallip.models import ClampGroupSort, ReLU_x, Residual, _build, select_model  # noqa: E402
from locallip.operators import apply_W  # noqa: E402

# The device of every device-capable test: `pytest --device cuda` or LOCALLIP_TEST_DEVICE=cuda.
# Tests build their seeded inputs on the CPU and move them with ``dev``, so CPU and CUDA runs
# check the same cases. The subprocess tests pass --cpu unless the device is CUDA.
DEVICE = torch.device(os.environ.get('LOCALLIP_TEST_DEVICE', 'cpu'))


def train_main(argv=None, data='mnist'):
    """What train_mnist.py / train_cifar10.py / TinyImagenet/train_tinyimagenet.py do: parse
    ``argv`` with the ``data`` column's defaults and train."""
    from locallip.training import train
    from utils import argparser
    return train(argparser(argv, data=data))


def settings_of(radii, **fields):
    """EvalSettings at ``radii`` with the command line's defaults (utils.py, their only
    source) and ``fields`` on top."""
    from locallip.flags import eval_settings
    from utils import argparser
    return eval_settings(argparser(['--epsilon', *map(str, radii)]), **fields)


def pytest_addoption(parser):
    parser.addoption('--device', default=None, help="run the device-capable tests on this "
                     "device (cpu or cuda); default $LOCALLIP_TEST_DEVICE, else cpu")


def pytest_configure(config):
    global DEVICE
    config.addinivalue_line('markers', "jobs: every run_job.sh entry end to end at tiny scale "
                            "(minutes; `bash run_job.sh test_jobs`, not part of `run_job.sh test`)")
    name = config.getoption('--device') or os.environ.get('LOCALLIP_TEST_DEVICE', 'cpu')
    DEVICE = torch.device(name)
    if DEVICE.type == 'cuda' and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: CUDA is not available on this machine")
    os.environ['LOCALLIP_TEST_DEVICE'] = name      # for the subprocesses


def pytest_report_header(config):
    return f"Local-Lip tests on device: {DEVICE}"


@pytest.fixture(autouse=True)
def _same_rng_state():
    """Every test starts from the same global RNG state: its outcome must not depend on
    which tests ran before it (a file or -k selection, or the order of the suite)."""
    torch.manual_seed(0)


def dev(*objs):
    """Move tensors / modules to the test device; one object or a tuple."""
    out = tuple(o.to(DEVICE) for o in objs)
    return out[0] if len(out) == 1 else out


def device_flags():
    """Command-line flags choosing the test device for the training / evaluation scripts."""
    return [] if DEVICE.type == 'cuda' else ['--cpu']


def write_idx(path, array):
    """MNIST IDX format: magic 0x0000 08 ndim, big-endian dims, raw uint8 bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, 'wb') as f:
        f.write(bytes([0, 0, 8, array.ndim]))
        for d in array.shape:
            f.write(struct.pack('>I', d))
        f.write(array.tobytes())


def make_mnist_like(root, n_train=256, n_test=128, seed=0, name='MNIST'):
    """A learnable 10-class MNIST-format dataset at root/<name>/raw (torchvision layout;
    name FashionMNIST for Fashion-MNIST): each class is a bright block at its own position
    plus noise."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, name, 'raw')
    os.makedirs(raw, exist_ok=True)
    for stem, n in (('train', n_train), ('t10k', n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        imgs = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for k, c in enumerate(labels):
            r, q = divmod(int(c), 5)
            imgs[k, 4 + 10 * r: 12 + 10 * r, 1 + 5 * q: 6 + 5 * q] = 230
        write_idx(os.path.join(raw, f"{stem}-images-idx3-ubyte"), imgs)
        write_idx(os.path.join(raw, f"{stem}-labels-idx1-ubyte"), labels)
    return root


def make_cifar_like(root, n_per_batch=20, seed=0):
    """CIFAR-10 python format at root/cifar-10-batches-py (pickled dicts, data uint8 [n, 3072])."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(d, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ['test_batch']
    for name in names:
        batch = {'data': rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8),
                 'labels': rng.integers(0, 10, n_per_batch).tolist(),
                 'batch_label': name, 'filenames': [f"{k}.png" for k in range(n_per_batch)]}
        with open(os.path.join(d, name), 'wb') as f:
            pickle.dump(batch, f)
    with open(os.path.join(d, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': [f"c{k}" for k in range(10)], 'num_cases_per_batch': n_per_batch}, f)
    return root


def tiny_residual(classes=3):
    """Conv(1,4,3) A; Residual(Conv A Conv) A; Residual(Conv(4,4,4,s2), AvgPool 2) A; Flatten;
    Linear(64,16) A; Linear(16,classes) (8x8 inputs, A = ReLU_x)."""
    import torch.nn as nn
    conv = lambda cin, cout, k, s=1: nn.Conv2d(cin, cout, k, stride=s, padding=1)
    return nn.Sequential(conv(1, 4, 3), ReLU_x((4, 8, 8)),
                         Residual(nn.Sequential(conv(4, 4, 3), ReLU_x((4, 8, 8)), conv(4, 4, 3))),
                         ReLU_x((4, 8, 8)), Residual(conv(4, 4, 4, 2), nn.AvgPool2d(2)),
                         ReLU_x((4, 4, 4)), nn.Flatten(), nn.Linear(64, 16), ReLU_x((16,)),
                         nn.Linear(16, classes))


# a user's residual network: a plain nn.Module with skips (identity and 1x1 projection), as
# a module's source (the command-line tests write it to a file) for 28x28 inputs
USER_RESNET = """import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Net(nn.Module):
    def __init__(self, hw=28, classes=10, log_softmax=False):
        super().__init__()
        self.log_softmax = log_softmax
        self.stem = nn.Conv2d(1, 4, 4, stride=2, padding=1)
        self.block = Block(4)
        self.down = nn.Conv2d(4, 8, 4, stride=2, padding=1)
        self.proj = nn.Conv2d(4, 8, 1, stride=2)
        self.fc = nn.Linear(8 * (hw // 4) ** 2, classes)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        x = F.relu(self.proj(x) + self.down(x))
        x = x.view(x.size(0), -1)
        if self.log_softmax:
            return F.log_softmax(self.fc(x), dim=1)
        return self.fc(x)


def net():
    return Net()


def net_log_softmax():
    return Net(log_softmax=True)
"""


def user_resnet(**kw):
    """An instance of USER_RESNET's Net (its module executed here)."""
    space = {}
    exec(compile(USER_RESNET, 'user_resnet', 'exec'), space)
    return space['Net'](**kw)


def tiny_net(kind='relux', seed=0, classes=3, in_ch=1, hw=8):
    """Conv(in,4,3,1,1) A; Conv(4,8,4,2,1) A; Flatten; Linear(8*(hw/2)^2,16) A; Linear(16,classes);
    kind 'residual': tiny_residual."""
    torch.manual_seed(seed)
    if kind == 'residual':
        return tiny_residual(classes)
    if kind == 'relux':
        act = lambda shape, j: ReLU_x(shape, 1.0)
    elif kind == 'relu':
        act = lambda shape, j: torch.nn.ReLU()
    else:
        act = lambda shape, j: ClampGroupSort((shape[0] // 2, *shape[1:]), 0.5, -0.5)
    h = hw // 2
    return _build([(in_ch, 4, 3, 1, 1, hw), (4, 8, 4, 2, 1, h)], [(8 * h * h, 16), (16, classes)], act)


@pytest.fixture
def mnist_dir(tmp_path):
    return make_mnist_like(str(tmp_path / 'data'))


def blobs(n, seed):
    """3 classes of 8x8 images: a bright 4x4 block in one of three places, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for k in range(n):
        r, c = [(0, 0), (0, 4), (4, 2)][int(y[k])]
        x[k, 0, r:r + 4, c:c + 4] += 0.6
    return x.clamp(0, 1), y


_TRAINED = {}


def trained_tiny(kind='relux', eps=0.3, steps=150):
    """tiny_net trained with the certified loss on blobs (cached per session)."""
    from locallip.bound import certified_loss, compute_bound
    from locallip.layers import layer_input_shapes
    from locallip.models import clamp_thresholds
    from locallip.vectors import VectorStore
    key = (kind, eps, steps)
    if key not in _TRAINED:
        torch.manual_seed(0)
        net = dev(tiny_net(kind, seed=0))
        x, y = dev(*blobs(512, 0))
        store = VectorStore(layer_input_shapes(net, (1, 8, 8)), 512)
        gv = {}
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for step in range(steps):
            idx = torch.randint(0, 512, (64,))
            xi, yi = x[idx.to(DEVICE)], y[idx.to(DEVICE)]
            res = compute_bound(net, xi, yi, eps * min(1.0, step / (steps / 2)),
                                store.batch(idx, DEVICE), gv, sniter=2, opt_iter=5)
            loss, _, _ = certified_loss(res, yi, kappa=max(0.0, 1 - step / (steps / 2)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            clamp_thresholds(net)
        _TRAINED[key] = net
    return _TRAINED[key]


def blob_loader(n=64, seed=1, batch=32):
    """Loader of (x, y, index) over fresh blobs."""
    from torch.utils.data import DataLoader, TensorDataset

    from locallip.data import IndexedDataset
    x, y = blobs(n, seed)
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch)


def make_tinyimagenet_like(root, classes=4, per_class=8, val_per_class=4, seed=0):
    """tiny-imagenet-200 as downloaded (before TinyImagenet/prepare_data.py regroups val):
    train/<wnid>/images/<wnid>_<k>.JPEG, val/images/val_<k>.JPEG with val/val_annotations.txt
    (tab-separated name, wnid, box), wnids.txt; 64x64 RGB JPEGs, each class its own colour."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    base = os.path.join(root, 'tiny-imagenet-200')
    wnids = [f"n{10000000 + c:08d}" for c in range(classes)]
    os.makedirs(os.path.join(base, 'val', 'images'), exist_ok=True)

    def image(c):
        a = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        a[16:48, 16:48, c % 3] = 200 + 10 * (c // 3)
        return Image.fromarray(a)
    lines = []
    for c, w in enumerate(wnids):
        folder = os.path.join(base, 'train', w, 'images')
        os.makedirs(folder, exist_ok=True)
        for k in range(per_class):
            image(c).save(os.path.join(folder, f"{w}_{k}.JPEG"))
        for k in range(val_per_class):
            name = f"val_{c * val_per_class + k}.JPEG"
            image(c).save(os.path.join(base, 'val', 'images', name))
            lines.append(f"{name}\t{w}\t0\t0\t63\t63\n")
    with open(os.path.join(base, 'val', 'val_annotations.txt'), 'w') as f:
        f.writelines(lines)
    with open(os.path.join(base, 'wnids.txt'), 'w') as f:
        f.write('\n'.join(wnids) + '\n')
    return root


# the bundled Fashion-MNIST model the tests below read ($LOCALLIP_TEST_BUNDLED: another
# file, for the test that a checkpoint which does not load fails them)
BUNDLED = os.environ.get('LOCALLIP_TEST_BUNDLED') or os.path.join(
    ROOT, 'pretrained', 'fashionmnist', 'local_relux_best.pth')


def fashion_test_set():
    """The Fashion-MNIST test set (data/, then Debian's), or None when it is not installed.
    Only "not found" means not installed: any other error (a damaged file) is raised, and
    no checkpoint is read here, so a checkpoint that does not load fails the tests below
    instead of skipping them as "not installed"."""
    from locallip.data import get_dataset
    try:
        return get_dataset('fashionmnist', None, train=False, augment=False, download=False)
    except UserError as e:
        if 'dataset fashionmnist not found' in str(e):
            return None
        raise


def bundled(n=12):
    ds = fashion_test_set()
    net = select_model('fashionmnist', 'relux', 2.0)
    load_checkpoint(BUNDLED, net)          # errors fail the test
    xs = torch.stack([ds[k][0] for k in range(n)])
    ys = torch.tensor([int(ds[k][1]) for k in range(n)])
    return net.eval(), xs, ys


fashion = pytest.mark.skipif(fashion_test_set() is None, reason="Fashion-MNIST is not "
                             "installed (apt-get install dataset-fashion-mnist)")


def randomize_bn(net):
    g = torch.Generator().manual_seed(3)
    for m in net:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g, dtype=m.running_mean.dtype) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g, dtype=m.running_var.dtype) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return net


def explicit_matrix(layer, in_shape):
    """The matrix [out, in] of the linear map x -> W x (no bias)."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64, device=layer.weight.device).reshape(n, *in_shape)
    layer = layer.double()
    return apply_W(layer, basis).reshape(n, -1).t()
