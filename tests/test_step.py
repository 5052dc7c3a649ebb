"""The certified training step (step.py, bound.py's losses): the losses, and the
synchronisation-free step (no host reads) equal to the loops that stop early."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, dev, tiny_net

from locallip.bound import certified_loss, compute_bound, robust_loss, worst_case_margins
from locallip.vectors import KeptVectors, RandomVectors


def test_losses():
    torch.manual_seed(0)
    net = dev(tiny_net('relux'))
    x = dev(torch.rand(4, 1, 8, 8))
    y = dev(torch.tensor([0, 1, 2, 0]))
    res = compute_bound(net, x, y, 0.1, RandomVectors(4, DEVICE), {}, sniter=3, opt_iter=3)
    z = res.logits + res.worst
    assert robust_loss(res, y).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    zo = z.clone()
    zo[dev(torch.arange(4)), y] = -float('inf')
    g = torch.cat([res.logits, zo.max(1, keepdim=True).values], 1)
    assert robust_loss(res, y, gloro=True).item() == pytest.approx(F.cross_entropy(g, y).item(), rel=1e-6)
    loss, clean, rob = certified_loss(res, y, 0.3)
    assert loss.item() == pytest.approx(0.3 * clean.item() + 0.7 * rob.item(), rel=1e-6)
    loss, clean, rob = certified_loss(res, y, 0.3, gloro=True)
    assert loss.item() == rob.item()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize('kind', ['relux', 'maxmin'])
@pytest.mark.parametrize('pi_grad', ['all', 'last'])
def test_sync_free_training_step_equals_the_stopping_loops(kind, pi_grad, monkeypatch):
    """A training step (gradient through the power iterations, reference NaN handling) with
    sync_free gives the stopping loops' values (bitwise for pi_grad 'all', to 1e-6 for the
    per-sample stop of 'last') and iteration counts, their gradients to 1e-6, while
    the loops do stop early (20 iterations at most, tol 0.2), and it reads no tensor on the
    host. (pi_grad 'last' without sync_free is also the regression test of a crash: the
    per-sample loop's v was requested under no_grad, so never kept.)"""
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 3, (12,))
    out = {}
    for sf in (False, True):
        net = tiny_net(kind, seed=3)
        vec = KeptVectors(12, torch.device('cpu'))
        gv = {}
        torch.manual_seed(5)            # the same fresh vectors for both
        with monkeypatch.context() as mp:
            if sf:
                _no_host_reads(mp)
            res = compute_bound(net, x, y, 0.3, vec, gv, sniter=20, opt_iter=20, tol=0.2,
                                global_tol=0.2, pi_grad=pi_grad, reference_nan=True,
                                sync_free=sf)
            loss, _, _ = certified_loss(res, y, 0.5, gloro=True)
            loss.backward()
        out[sf] = (res, loss.detach(), [p.grad.clone() for p in net.parameters()],
                   {k: v.clone() for k, v in gv.items()}, vec)
    (r0, l0, g0, gv0, v0), (r1, l1, g1, gv1, v1) = out[False], out[True]
    # the whole-batch loop (pi_grad all) computes the same products: bitwise. The per-sample
    # stop (pi_grad last) shrinks the batch of its convolutions: last-bit differences
    same = torch.equal if pi_grad == 'all' else \
        (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert same(l0, l1)
    assert same(r0.worst, r1.worst) and same(r0.r_local, r1.r_local)
    assert torch.equal(r0.r_global, r1.r_global)
    stopped_early = False
    for i in r0.sigmas:
        assert same(r0.sigmas[i], r1.sigmas[i]), i
        assert torch.equal(r0.iters[i], r1.iters[i]), i
        assert same(v0.get(i, None), v1.get(i, None)), i
        stopped_early |= bool((r0.iters[i] < 20).any())
    assert stopped_early                # the early stop happened: the equality is not vacuous
    for k in gv0:
        assert torch.equal(gv0[k], gv1[k]), k
    for a, b in zip(g0, g1):
        tol = 1e-9 if pi_grad == 'all' else 1e-7
        assert torch.allclose(a, b, rtol=1e-6, atol=tol), (a - b).abs().max()


def test_sync_free_bcp_equals_the_early_break(monkeypatch):
    """The worst-case-logit rounds: the device-side stop equals the break (values bitwise),
    in cases where the loop stops well before opt_iter and where more rounds matter."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 30, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    r = torch.rand(16, generator=g) * 3
    lo, hi = -torch.rand(16, 30, generator=g) * 0.3, torch.rand(16, 30, generator=g) * 0.3
    for ref_nan in (True, False):
        full = worst_case_margins(W, y, r, lo, hi, 40, ref_nan)
        with monkeypatch.context() as mp:
            _no_host_reads(mp)
            free = worst_case_margins(W, y, r, lo, hi, 40, ref_nan, True)
        assert torch.equal(full, free), ref_nan
        with monkeypatch.context() as mp, pytest.raises(AssertionError, match='host read'):
            _no_host_reads(mp)          # the guard does catch the stopping loop's read
            worst_case_margins(W, y, r, lo, hi, 40, ref_nan)
    # the rounds matter (1 round is not the answer) and the loop ends before 40 rounds
    assert not torch.equal(worst_case_margins(W, y, r, lo, hi, 1), full)
    assert torch.equal(worst_case_margins(W, y, r, lo, hi, 30), full)


def test_sync_free_refuses_check():
    net = tiny_net('relux')
    with pytest.raises(ValueError, match='sync_free'):
        compute_bound(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1,
                      KeptVectors(2, torch.device('cpu')), {}, sniter=2, opt_iter=2,
                      check=True, sync_free=True)


def _no_host_reads(monkeypatch):
    """Make every host read of a tensor's value raise (what a CUDA graph cannot hold)."""
    def refuse(*a, **k):
        raise AssertionError('host read of a tensor value')
    for name in ('__bool__', 'item', 'tolist', '__float__', '__int__'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
