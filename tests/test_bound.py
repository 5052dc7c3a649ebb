"""Exact values and soundness of the bound on small seeded CPU cases."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import DEVICE, dev, explicit_matrix, tiny_net

from locallip.bound import (BoundError, compute_bound, worst_case_margins,
                             worst_case_margins_all_pairs)
from locallip.layers import check_supported
from locallip.models import ClampGroupSort, ReLU_x
from locallip.vectors import RandomVectors, VectorStore


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
