"""Exact values and soundness of the bound on small seeded CPU cases."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import DEVICE, dev, tiny_net
from local_bound import (BoundError, compute_bound, certified_loss, worst_case_margins,
                         worst_case_margins_all_pairs, robust_loss)
from networks import check_supported
from operators import (PowerOptions, apply_W, apply_WT, global_power_iteration, global_vector_shape,
                       masked_power_iteration)
from vectors import KeptVectors, RandomVectors, VectorStore
from models import ClampGroupSort, ReLU_x


def explicit_matrix(layer, in_shape):
    """The matrix [out, in] of the linear map x -> W x (no bias)."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64, device=layer.weight.device).reshape(n, *in_shape)
    layer = layer.double()
    return apply_W(layer, basis).reshape(n, -1).t()


LAYERS = [
    ('linear', lambda: nn.Linear(12, 7), (12,)),
    ('conv s2 p1 (odd input, adjoint one short)', lambda: nn.Conv2d(2, 3, 4, stride=2, padding=1), (2, 7, 7)),
    ('conv s1 p1', lambda: nn.Conv2d(2, 3, 3, stride=1, padding=1), (2, 5, 5)),
    ('conv s2 p0', lambda: nn.Conv2d(2, 4, 4, stride=2, padding=0), (2, 9, 9)),
]


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


def exact_max(w, r, lo, hi):
    """max w^T d s.t. ||d|| <= r, lo <= d <= hi (lo <= 0 <= hi): d = clip(lam w), bisection
    on lam for ||d|| = r (or the box corner when it lies inside the ball)."""
    corner = torch.where(w > 0, hi, lo) * (w != 0)
    if corner.norm() <= r:
        return (w * corner).sum()
    a, b = 0.0, 1.0
    while torch.clamp(b * w, lo, hi).norm() < r:
        b *= 2
    for _ in range(200):
        m = (a + b) / 2
        if torch.clamp(m * w, lo, hi).norm() < r:
            a = m
        else:
            b = m
    return (w * torch.clamp(b * w, lo, hi)).sum()


@pytest.mark.parametrize('opt_iter', [1, 2, 5, 50])
def test_worst_case_margins_upper_bound_exact_max(opt_iter):
    torch.manual_seed(opt_iter)
    c, h, b = 5, 20, 6
    W = torch.randn(c, h, dtype=torch.float64)
    y = torch.randint(0, c, (b,))
    r = torch.rand(b, dtype=torch.float64) * 2 + 0.1
    lo = -torch.rand(b, h, dtype=torch.float64) * 0.5
    hi = torch.rand(b, h, dtype=torch.float64) * 0.5
    a = worst_case_margins(*dev(W, y, r, lo, hi), opt_iter).cpu()
    for k in range(b):
        for i in range(c):
            ex = exact_max(W[i] - W[y[k]], r[k], lo[k], hi[k])
            assert a[k, i].item() >= ex.item() - 1e-9
            if i == y[k]:
                assert a[k, i].item() == 0
    if opt_iter == 50:   # enough rounds: the algorithm is exact
        for k in range(b):
            for i in range(c):
                ex = exact_max(W[i] - W[y[k]], r[k], lo[k], hi[k])
                assert a[k, i].item() == pytest.approx(ex.item(), rel=1e-6, abs=1e-9)


def test_true_class_column_equals_all_pairs():
    torch.manual_seed(0)
    c, h, b = 7, 16, 5
    W = torch.randn(c, h)
    y = torch.randint(0, c, (b,))
    r = torch.rand(b) + 0.2
    lo, hi = -torch.rand(b, h) * 0.3, torch.rand(b, h) * 0.3
    W, y, r, lo, hi = dev(W, y, r, lo, hi)
    full = worst_case_margins_all_pairs(W, r, lo, hi, 10)      # [b, c, c]
    col = worst_case_margins(W, y, r, lo, hi, 10)              # [b, c]
    assert torch.equal(col, full[torch.arange(b), :, y])


def exact_products(net, res, b):
    """Per sample: (exact prod_i ||D_out W_i D_in||_2, exact prod_i ||W_i||_2) from the
    explicit matrices of tiny_net's layers 0, 2, 5 and the indicators the bound used."""
    relu_type = not isinstance(net[1], ClampGroupSort)
    M = {0: explicit_matrix(net[0], (1, 8, 8)), 2: explicit_matrix(net[2], (4, 8, 8)),
         5: explicit_matrix(net[5], (128,))}
    glob = math.prod(torch.linalg.matrix_norm(m, ord=2).item() for m in M.values())
    D = {k: res.masks[k].reshape(b, -1) for k in (1, 3, 6)}
    local = []
    for s in range(b):
        ins = {0: None, 2: D[1][s], 5: D[3][s]}
        outs = {0: D[1][s], 2: D[3][s], 5: D[6][s]} if relu_type else {0: None, 2: None, 5: None}
        p = 1.0
        for k, m in M.items():
            if outs[k] is not None:
                m = outs[k].reshape(-1, 1) * m
            if ins[k] is not None:
                m = m * ins[k].reshape(1, -1)
            p *= torch.linalg.matrix_norm(m, ord=2).item()
        local.append(p)
    return dev(torch.tensor(local, dtype=torch.float64)), glob


@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
def test_local_bound_at_most_global(kind):
    """The paper's theorem on exact values, and the power iteration reaching them."""
    torch.manual_seed(0)
    net = dev(tiny_net(kind, seed=3).double())
    kw = dict(sniter=3000, opt_iter=100, tol=0.0, check=True)
    for eps in (0.05, 0.3):
        x = dev(torch.rand(6, 1, 8, 8, dtype=torch.float64))
        y = dev(torch.randint(0, 3, (6,)))
        with torch.no_grad():
            loc = compute_bound(net, x, y, eps, RandomVectors(6, DEVICE), {}, **kw)
            glo = compute_bound(net, x, y, eps, RandomVectors(6, DEVICE), {}, bound='global', **kw)
        exact_local, exact_global = exact_products(net, loc, 6)
        assert (exact_local <= exact_global * (1 + 1e-12)).all()
        assert torch.allclose(loc.r_local, eps * exact_local, rtol=2e-3)
        assert torch.allclose(glo.r_local, dev(torch.full((6,), eps * exact_global, dtype=torch.float64)), rtol=2e-3)
        assert torch.allclose(glo.r_global, glo.r_local, rtol=2e-3)   # global ball radius too
        assert (loc.worst <= glo.worst + 1e-9).all()
        if kind != 'maxmin':
            assert (exact_local < exact_global * 0.99).any()     # strictly tighter somewhere


def test_local_equals_global_when_every_neuron_varies():
    torch.manual_seed(0)
    net = dev(tiny_net('relux', seed=1).double())
    x = dev(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    y = dev(torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        loc = compute_bound(net, x, y, 1e3, RandomVectors(4, DEVICE), {}, sniter=3000,
                            opt_iter=10, tol=0.0)
    assert all(bool((m == 1).all()) for m in loc.masks.values())
    exact_local, exact_global = exact_products(net, loc, 4)
    assert torch.allclose(exact_local, dev(torch.full((4,), exact_global, dtype=torch.float64)), rtol=1e-12)
    assert torch.allclose(loc.r_local, 1e3 * exact_local, rtol=2e-3)


def test_indicators_follow_the_spec():
    act = ReLU_x((3,), 1.0)
    lb = torch.tensor([[-1.0, 1.5, 0.2]])
    ub = torch.tensor([[-0.1, 2.0, 0.5]])   # stuck at 0, stuck at threshold, varying
    net = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3))
        net[0].bias.copy_((lb + ub)[0] / 2)
    net = dev(net)
    res = compute_bound(net, *dev(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)),
                        0.15, RandomVectors(1, DEVICE), {}, sniter=50, opt_iter=5)
    assert res.masks[1].tolist() == [[0.0, 0.0, 1.0]]


def test_bound_contains_sampled_activations_and_logits():
    """Points on the eps-sphere and the points of gradient ascent on every z_i - z_y in the
    eps-ball never leave the pre-activation boxes nor beat the worst-case logits; the first
    layer's box is attained away from the padding (its bounds are mu +- eps ||row||, met at
    x +- eps row / ||row||), so a box shrunk there would be caught. (These random networks'
    worst-case logits are about 10 times looser than what ascent reaches: test_soundness
    checks them where they are exact.)"""
    from soundness_checks import largest_gaps
    torch.manual_seed(0)
    for kind in ('relux', 'relu', 'maxmin'):
        net = dev(tiny_net(kind, seed=2).double())
        b, eps = 3, 0.2
        x = dev(torch.rand(b, 1, 8, 8, dtype=torch.float64))
        y = dev(torch.randint(0, 3, (b,)))
        with torch.no_grad():
            res = compute_bound(net, x, y, eps, RandomVectors(b, DEVICE), {}, sniter=3000,
                                opt_iter=100, tol=1e-10, check=True)
        n = 1000
        d = torch.randn(n, b, 1, 8, 8, dtype=torch.float64)
        d = dev(d / d.flatten(2).norm(dim=2).view(n, b, 1, 1, 1) * eps * (1 - 1e-12))
        xs = (x.unsqueeze(0) + d).reshape(n * b, 1, 8, 8)
        # the first layer's extreme points: x + eps * (+-) each of its rows, normalised
        rows = torch.autograd.functional.jacobian(lambda t: net[0](t).flatten(), x[:1]).reshape(
            -1, 1, 8, 8)                                                       # [256, 1, 8, 8]
        unit = rows / rows.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        ext = (x.unsqueeze(1) + torch.stack([unit, -unit], 1).reshape(1, -1, 1, 8, 8) * eps *
               (1 - 1e-12))                                                    # [b, 512, ...]
        h = torch.cat([xs.view(n, b, 1, 8, 8), ext.transpose(0, 1)], 0).reshape(-1, 1, 8, 8)
        with torch.no_grad():
            for i, m in enumerate(net):
                if i in res.pre_boxes:
                    lb, ub = res.pre_boxes[i]
                    hh = h.view(-1, b, *h.shape[1:])
                    tol = 1e-9 * (1 + float(ub.abs().max()))
                    assert (hh >= lb.unsqueeze(0) - tol).all(), (kind, i, 'below the box')
                    assert (hh <= ub.unsqueeze(0) + tol).all(), (kind, i, 'above the box')
                    if i == 1:          # the first layer's box: attained at its extreme points
                        # (inside the padding border: there the box uses the whole kernel's norm)
                        lo, hi = hh[n:].min(0).values, hh[n:].max(0).values
                        inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
                        assert torch.allclose(lo[inner], lb[inner], rtol=0, atol=1e-9), kind
                        assert torch.allclose(hi[inner], ub[inner], rtol=0, atol=1e-9), kind
                h = m(h)
        logits = h.view(-1, b, 3)
        gap = logits - logits.gather(2, y.view(1, b, 1).expand(logits.shape[0], b, 1))
        bound = (res.logits - res.logits.gather(1, y.view(-1, 1)) + res.worst)  # [b, c]
        assert (gap <= bound.unsqueeze(0) + 1e-9).all(), kind
        found = largest_gaps(net, x, y, eps)
        assert (found <= bound + 1e-9).all(), kind
        clean = res.logits - res.logits.gather(1, y.view(-1, 1))
        assert ((found - clean)[bound > clean] > 0.05 * res.worst[bound > clean]).all(), kind


def test_unsupported_layer_is_named():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match='Tanh'):
        compute_bound(dev(net), *dev(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)), 0.1,
                      RandomVectors(1, DEVICE), {}, sniter=1, opt_iter=1)
    with pytest.raises(ValueError, match='last module'):
        check_supported(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_negative_eps_and_bad_box_fail_loudly():
    net = dev(tiny_net('relu').double())
    x = dev(torch.rand(2, 1, 8, 8, dtype=torch.float64))
    y = dev(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match='eps must be >= 0'):
        compute_bound(net, x, y, -0.1, RandomVectors(2, DEVICE), {}, sniter=1, opt_iter=1)
    x[0, 0, 0, 0] = float('inf')
    with pytest.raises(BoundError, match='non-finite'):
        compute_bound(net, x, y, 0.1, RandomVectors(2, DEVICE), {}, sniter=1, opt_iter=1, check=True)


def test_nan_is_never_certified():
    net = dev(tiny_net('relu').double())
    x = dev(torch.rand(2, 1, 8, 8, dtype=torch.float64))
    y = net(x).argmax(1)
    res = compute_bound(net, x, y, 0.0, RandomVectors(2, DEVICE), {}, sniter=5, opt_iter=5)
    assert res.certified(y).all()          # eps = 0: every correct point is certified
    res.worst[0, (y[0] + 1) % 3] = float('nan')
    assert res.certified(y).tolist() == [False, True]
    assert math.isnan(res.margin(y)[0].item())


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


def test_vector_store_round_trip(tmp_path):
    shapes = {0: (2, 3, 3), 2: (5,)}
    for dtype in (torch.float32, torch.float16):
        for path in (None, str(tmp_path / f"store_{dtype}.bin")):
            st = VectorStore(shapes, 10, dtype, path)
            idx = torch.tensor([3, 7])
            view = st.batch(idx, DEVICE)
            assert view.fresh.all()
            u = dev(torch.randn(2, 2, 3, 3))
            view.put(0, u)
            view.put(2, dev(torch.randn(2, 5)))
            back = st.batch(idx, DEVICE).get(0, (2, 3, 3))
            tol = 0 if dtype == torch.float32 else 1e-3
            assert torch.allclose(back, u, atol=tol * u.abs().max().item(), rtol=tol)
            assert st.initialized.tolist() == [k in (3, 7) for k in range(10)]
    assert VectorStore.bytes_per_sample(shapes) == (18 + 5) * 4
    st = VectorStore(shapes, 10, keys=[2])
    assert list(st.data) == [2]


# ----------------------------------------------------------------------------------------
# sync_free: the loops' stops decided on the device (for CUDA graphs / torch.compile)
# ----------------------------------------------------------------------------------------
def _no_host_reads(monkeypatch):
    """Make every host read of a tensor's value raise (what a CUDA graph cannot hold)."""
    def refuse(*a, **k):
        raise AssertionError('host read of a tensor value')
    for name in ('__bool__', 'item', 'tolist', '__float__', '__int__'):
        monkeypatch.setattr(torch.Tensor, name, refuse)


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
