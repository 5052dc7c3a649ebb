"""The reference schedules: eps / kappa ramps with the within-epoch quirks, exp lr decay."""
import numpy as np
import pytest

from locallip.schedule import batch_eps_kappa, epoch_eps_kappa, lr_factor
from utils import argparser


def test_cifar_eps_kappa_schedule():
    a = argparser([], data='cifar10')          # warmup 20, rampup 400, eps 0.141 / 0.1551
    assert epoch_eps_kappa(a, 5) == (0.0, 1.0)                           # warmup: clean
    assert batch_eps_kappa(a, 5, 3, 10) == (0.0, 1.0)
    ramp = np.linspace(a.starting_epsilon, a.epsilon_train, 400)
    assert epoch_eps_kappa(a, 20) == pytest.approx((a.starting_epsilon, 1.0))
    assert epoch_eps_kappa(a, 20 + 399) == pytest.approx((a.epsilon_train, 0.0))
    eps, kappa = batch_eps_kappa(a, 20 + 7, 5, 20)
    # the within-epoch increment uses the EVALUATION radius (reference quirk)
    assert eps == pytest.approx(ramp[7] + 5 / 20 * (36 / 255 - a.starting_epsilon) / 400)
    assert kappa == pytest.approx(np.linspace(1, 0, 400)[7] - 5 / 20 / 400)
    eps, kappa = batch_eps_kappa(a, 700, 10, 20)                          # after the ramp
    assert eps == pytest.approx(a.epsilon_train + 0.5 * (36 / 255 - a.starting_epsilon) / 400)
    assert kappa == pytest.approx(-0.5 / 400) and kappa < 0


def test_mnist_has_no_warmup():
    a = argparser(['--epsilon_train', '1.75'], data='mnist')
    assert epoch_eps_kappa(a, 0) == pytest.approx((a.starting_epsilon, 1.0))
    assert epoch_eps_kappa(a, 149)[0] == pytest.approx(1.75)


def test_lr_schedule():
    a = argparser(['--end_lr', '1e-6'], data='cifar10')   # 800 epochs: decay from 425
    f = lr_factor(a)
    assert f(0) == 1.0 and f(424) == 1.0
    assert f(425) < 1.0
    assert a.lr * f(799) == pytest.approx(1e-6, rel=1e-9)
    ratios = [f(e + 1) / f(e) for e in range(425, 798)]
    assert max(ratios) == pytest.approx(min(ratios))       # exponential


def test_store_choice_at_real_sizes():
    """Full MNIST / Fashion-MNIST (70k x 48,336 floats) and CIFAR-10 (60k x 113,664) on a
    24 GB machine, where half the available RAM is about 11 GiB."""
    import torch

    from locallip.storage import choose_store
    budget = 11 * 2 ** 30
    assert choose_store(48336 * 4, 70000, budget) == (torch.float16, False)    # 6.8 GB in RAM
    assert choose_store(113664 * 4, 60000, budget) == (torch.float16, True)    # 13.6 GB on disk
    assert choose_store(48336 * 4, 3500, budget) == (torch.float32, False)     # quickstart
    assert choose_store(48336 * 4, 70000, budget, 'float32') == (torch.float32, False)


def test_make_stores_places_sizes_and_refuses(tmp_path):
    """make_stores on a tiny net: RAM float32 by default (floats per sample = the stored
    layers' input sizes), a disk file pair when asked, and one-line refusals for an
    --indices key that is not a stored layer and for --store_backing device on the CPU."""
    import torch
    from conftest import tiny_net

    from locallip.errors import UserError
    from locallip.storage import make_stores
    net, said = tiny_net('relux'), []
    say = lambda *a, **k: said.append(a[0])              # noqa: E731
    args = argparser(['--store_dtype', 'auto', '--store_backing', 'auto'])
    train, test = make_stores(args, net, (1, 8, 8), 5, 3, str(tmp_path / 'r'), say)
    # stored layers: the two convolutions (inputs 1x8x8, 4x8x8) and the first linear (128)
    assert said[-1].startswith(f"vector store: {64 + 256 + 128} floats per sample x 8 samples, "
                               f"float32 in RAM")
    assert (train.n, test.n) == (5, 3)
    args = argparser(['--store_backing', 'disk', '--store_dtype', 'float16', '--indices', '0'])
    make_stores(args, net, (1, 8, 8), 5, 3, str(tmp_path / 'd'), say)
    assert "float16 in disk files" in said[-1] and f"{64} floats per sample" in said[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d_store_test.bin', 'd_store_train.bin']
    with pytest.raises(UserError, match=r"--indices \[3\] are not affine layers"):
        make_stores(argparser(['--indices', '0,3']), net, (1, 8, 8), 5, 3, 'x', say)
    with pytest.raises(UserError, match="needs a CUDA device"):
        make_stores(argparser(['--store_backing', 'device']), net, (1, 8, 8), 5, 3, 'x', say,
                    device=torch.device('cpu'))
