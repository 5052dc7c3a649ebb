"""The linear operators the bound reads (operators.py): adjoints, power iteration against
the exact SVD of the explicit masked matrix, warm starts, convergence reports, and the
norms and row norms of pools and BatchNorm against their explicit matrices."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import DEVICE, dev, explicit_matrix, randomize_bn, tiny_net

from locallip.bound import compute_bound
from locallip.operators import (PowerOptions, apply_W, apply_WT, global_power_iteration,
                                global_vector_shape, masked_power_iteration)
from locallip.vectors import KeptVectors, RandomVectors

LAYERS = [
    ('linear', lambda: nn.Linear(12, 7), (12,)),
    ('conv s2 p1 (odd input, adjoint one short)', lambda: nn.Conv2d(2, 3, 4, stride=2, padding=1), (2, 7, 7)),
    ('conv s1 p1', lambda: nn.Conv2d(2, 3, 3, stride=1, padding=1), (2, 5, 5)),
    ('conv s2 p0', lambda: nn.Conv2d(2, 4, 4, stride=2, padding=0), (2, 9, 9)),
]


from locallip.layers import fold_batchnorm
from locallip.operators import masked_products, row_norms, vjp_transpose


@pytest.mark.parametrize('name,make,in_shape', LAYERS, ids=[l[0] for l in LAYERS])
def test_adjoint(name, make, in_shape):
    torch.manual_seed(0)
    layer = dev(make().double())
    x = dev(torch.randn(3, *in_shape, dtype=torch.float64))
    y_shape = apply_W(layer, x).shape
    y = dev(torch.randn(y_shape, dtype=torch.float64))
    lhs = (apply_W(layer, x) * y).sum()
    rhs = (x * apply_WT(layer, y, in_shape)).sum()
    assert abs(lhs - rhs).item() < 1e-10
    assert apply_WT(layer, y, in_shape).shape == x.shape


@pytest.mark.parametrize('name,make,in_shape', LAYERS, ids=[l[0] for l in LAYERS])
def test_masked_power_iteration_equals_exact_svd(name, make, in_shape):
    torch.manual_seed(1)
    layer = dev(make().double())
    M = explicit_matrix(layer, in_shape)
    out_shape = apply_W(layer, dev(torch.zeros(1, *in_shape, dtype=torch.float64))).shape[1:]
    b = 4
    d_in = dev((torch.rand(b, *in_shape) > 0.4).double())
    d_out = dev((torch.rand(b, *out_shape) > 0.3).double())
    u0 = dev(torch.randn(b, *in_shape, dtype=torch.float64))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            pi = masked_power_iteration(layer, u0, 3000, d_in, d_out, PowerOptions(tol=1e-10))
        for k in range(b):
            masked = d_out[k].reshape(-1, 1) * M * d_in[k].reshape(1, -1)
            exact = torch.linalg.matrix_norm(masked, ord=2)
            assert pi.sigma[k].item() == pytest.approx(exact.item(), rel=1e-6)
            assert pi.sigma[k].item() <= exact.item() * (1 + 1e-9)   # from below
    # without masks: the global spectral norm, also via the global iteration
    exact = torch.linalg.matrix_norm(M, ord=2).item()
    pi = masked_power_iteration(layer, u0, 3000, opts=PowerOptions(tol=1e-10))
    assert pi.sigma.min().item() == pytest.approx(exact, rel=1e-6)
    g0 = dev(torch.randn(1, *global_vector_shape(layer, in_shape), dtype=torch.float64))
    assert tuple(g0.shape[1:]) == ((M.shape[0],) if isinstance(layer, nn.Linear) else in_shape)
    sg, gu, _ = global_power_iteration(layer, g0, 3000, tol=1e-10)
    assert sg.item() == pytest.approx(exact, rel=1e-6)
    top = torch.linalg.svd(M)   # a linear layer's vector is the top LEFT singular vector
    want = top.U[:, 0] if isinstance(layer, nn.Linear) else top.Vh[0]
    assert abs(gu.flatten() @ want).item() == pytest.approx(1.0, abs=1e-6)
    assert global_power_iteration(layer, g0, 3000, tol=1e-3)[2]       # converged
    assert not global_power_iteration(layer, g0, 1, tol=1e-3)[2]      # reported as not
    if isinstance(layer, nn.Linear):   # an input-space vector is refused, with the shapes
        with pytest.raises(ValueError, match="output space"):
            global_power_iteration(layer, u0[:1], 3)


def test_warm_start_from_a_smaller_radius_gives_the_fresh_sigmas():
    """Evaluation bounds a batch at its radii in increasing order, each starting from the
    vectors of the previous one: the varying sets only grow, and the sigmas reached are the
    ones a fresh start reaches (exact SVD agreement is tested above). (That this takes fewer
    iterations on a trained model is measured, not unit-tested: see the README.)"""
    torch.manual_seed(0)
    net = dev(tiny_net('relux').double().eval())
    x = dev(torch.rand(6, 1, 8, 8, dtype=torch.float64))
    y = dev(torch.randint(0, 3, (6,)))
    kw = dict(sniter=3000, opt_iter=100, tol=1e-10)
    kept = KeptVectors(6, DEVICE)
    small = compute_bound(net, x, y, 0.05, kept, {}, **kw)
    warm = compute_bound(net, x, y, 0.2, kept, {}, **kw)
    fresh = compute_bound(net, x, y, 0.2, RandomVectors(6, DEVICE), {}, **kw)
    for i in small.masks:
        assert (small.masks[i] <= warm.masks[i]).all()          # larger ball, more varying
    assert any((small.masks[i] < warm.masks[i]).any() for i in small.masks)   # not trivial
    for i in fresh.sigmas:
        assert torch.allclose(warm.sigmas[i], fresh.sigmas[i], rtol=1e-6)
    assert torch.equal(warm.certified(y), fresh.certified(y))


def test_power_iteration_reports_convergence():
    torch.manual_seed(0)
    layer = dev(nn.Conv2d(2, 3, 3, padding=1).double())
    u0 = dev(torch.randn(5, 2, 6, 6, dtype=torch.float64))
    with torch.no_grad():
        short = masked_power_iteration(layer, u0, 1, opts=PowerOptions(tol=1e-3))
        long = masked_power_iteration(layer, u0, 5000, opts=PowerOptions(tol=1e-3))
    assert not short.converged.any() and (short.iters == 1).all()
    assert long.converged.all() and (long.iters > 1).all()


def test_standalone_batchnorm_and_pool_norms_equal_exact_svd():
    """A BatchNorm that follows no affine layer becomes its own affine layer (depthwise 1x1
    conv / diagonal linear); its masked norm and the AvgPool2d's equal exact SVDs of the
    explicit masked operators."""
    torch.manual_seed(1)
    net = randomize_bn(nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2, padding=1),
                                      nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(18), nn.ReLU(),
                                      nn.Linear(18, 3)).double()).eval()
    folded = fold_batchnorm(net)
    assert isinstance(folded[0], nn.Conv2d) and isinstance(folded[5], nn.Linear)
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    assert torch.allclose(net(x), folded(x), atol=1e-12)
    y = net(x).argmax(1)
    with torch.no_grad():
        res = compute_bound(folded, x, y, 0.3, None, None, sniter=20000, tol=1e-13,
                            global_tol=1e-13, check=True)
    shapes = {0: (2, 4, 4), 2: (2, 4, 4), 5: (18,)}
    d_in = {0: None, 2: res.masks[1], 5: res.masks[3].flatten(1)}
    d_out = {0: res.masks[1], 2: res.masks[3], 5: res.masks[6]}
    for i, shape in shapes.items():
        for k in range(3):
            n = int(torch.tensor(shape).prod())
            basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
            di = None if d_in[i] is None else d_in[i][k:k + 1].expand(n, *shape)
            do = d_out[i][k:k + 1]
            z, _ = masked_products(folded[i], basis * (1 if di is None else di), shape, None,
                                   do.expand(n, *do.shape[1:]))
            exact = torch.linalg.matrix_norm(z.reshape(n, -1).t(), 2)
            assert torch.isclose(res.sigmas[i][k], exact, rtol=1e-6), (i, k)


@pytest.mark.parametrize('pool,shape', [
    (nn.AdaptiveAvgPool2d((3, 3)), (2, 7, 7)), (nn.AdaptiveAvgPool2d(2), (1, 6, 5)),
    (nn.AdaptiveAvgPool2d((None, 3)), (1, 4, 4)), (nn.AdaptiveAvgPool2d(1), (3, 5, 5)),
    (nn.AvgPool2d(3, stride=2, padding=1), (1, 6, 6)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 6, 6))],
    ids=['adaptive-overlap', 'adaptive-uneven', 'adaptive-none', 'global', 'avg', 'avg-nopad'])
def test_pool_row_norms_equal_the_explicit_matrix(pool, shape):
    """The per-output weight norm (the box's half-width per unit of radius) of the average
    pools equals the row norms of their explicit matrices."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    out = apply_W(pool, basis)
    want = out.reshape(n, -1).t().norm(dim=1).reshape(out.shape[1:])
    got = row_norms(pool, shape)[0].expand_as(want).to(torch.float64)
    assert torch.allclose(got, want, rtol=1e-6), (got - want).abs().max()


def test_vjp_transpose_equals_the_explicit_one():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
    lin = nn.Linear(7, 4).double()
    for layer, shape in ((conv, (3, 7, 7)), (pool, (2, 6, 6)), (lin, (7,)),
                         (nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5))):
        n = int(torch.tensor(shape).prod())
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        W = apply_W(layer, basis).reshape(n, -1).t()            # explicit matrix [out, in]
        y = torch.randn(2, *apply_W(layer, basis[:1]).shape[1:], dtype=torch.float64)
        explicit = (y.reshape(2, -1) @ W).reshape(2, *shape)
        assert torch.allclose(vjp_transpose(layer, y, shape), explicit, atol=1e-12)
        assert torch.allclose(apply_WT(layer, y, shape), explicit, atol=1e-12)
    # differentiable in y inside autograd (training through the iterations)
    y = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    vjp_transpose(pool, y, (2, 6, 6)).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
