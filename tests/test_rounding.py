"""Guaranteed certificates under floating point (rounding.py, docs/method.md "Floating point"):
the allowance that rounding can take from a margin, float64 Lanczos with full
reorthogonalisation, strict box checks, and the failure probability split over the rounds of
the guaranteed radius search."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import trained_tiny

import locallip
from locallip import radius
from locallip.bound import BoundError, _check_box, compute_bound
from locallip.lanczos import GuaranteedNorms, Lanczos
from locallip.operators import apply_absW
from locallip.rounding import gamma, margin_allowance, through_affine, unit_roundoff


def cancelling_net(dtype=torch.float32):
    """Two logits that share two large terms and differ by 1e-3 x3: in float32 around
    x = (1e4, 1e4, 1) they are 2e4 apart from 0 by less than one unit in the last place, so
    the rounding of the shared sum decides which is larger."""
    net = nn.Sequential(nn.Linear(3, 2, bias=False)).to(dtype)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1., 1., 0.], [1., 1., 1e-3]]))
    x = torch.stack([torch.tensor([1e4 + 0.37 * k, 1e4 - 0.11 * k, 1.0]) for k in range(40)])
    return net, x.to(dtype)


def flipped_inside(net, x, y, eps, n=4000, seed=1) -> torch.Tensor:
    """[batch] bool: a sampled point of the eps-ball (uniform radius, also its sphere) is
    classified other than y."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(x.shape[0]):
        d = torch.randn(n, x.shape[1], generator=g, dtype=x.dtype)
        scale = torch.rand(n, 1, generator=g, dtype=x.dtype)
        scale[: n // 2] = 1.0                       # half on the sphere of radius eps
        d = d / d.norm(dim=1, keepdim=True) * eps * scale
        with torch.no_grad():
            out.append(bool((net(x[i] + d).argmax(1) != y[i]).any()))
    return torch.tensor(out)


def disagreeing_points(n=40):
    """A float32 Linear(6, 2) and n inputs where its float32 logits and the real ones (the
    same weights in float64) rank the two classes differently: logit 0 = x0 + x1 + x2 with
    x0 = 1e4 and x1, x2 below half a unit in the last place (each addition rounds down),
    logit 1 = x3 + x4 (rounds up); the float32 margin is one ulp, 2^-10."""
    net = nn.Sequential(nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1., 1., 1., 0., 0., 0.], [0., 0., 0., 1., 1., 0.]]))
    g = torch.Generator().manual_seed(0)
    xs = torch.tensor([1e4, 0, 0, 1e4, 0, 0]) + torch.rand(4000, 6, generator=g) * \
        torch.tensor([0., 6e-4, 6e-4, 0., 1e-3, 0.])
    with torch.no_grad():
        z32, z64 = net(xs), xs.double() @ net[0].weight.double().T
    differ = (z32.argmax(1) != z64.argmax(1)) & ((z32[:, 0] - z32[:, 1]).abs() > 0)
    return net, xs[differ][:n]


def test_no_certificate_from_the_bounds_own_float32_rounding():
    """The bound computed in float32 read the margin 2^-10 and certified every point at eps
    1e-4 (the code before rounding.py: 40 of 40), though the network its weights define
    (evaluated in float64) predicts the other class at the very centre. The guaranteed
    certificate and radius, computed on that network in float64, certify none."""
    net, x = disagreeing_points()
    assert x.shape[0] == 40
    y = net(x).argmax(1)
    real = (x.double() @ net[0].weight.double().T).argmax(1)
    assert (real != y).all()
    assert not locallip.certify(net, x, eps=1e-4, certificate='guaranteed')[1e-4].any()
    assert (locallip.certified_radius(net, x, certificate='guaranteed').radius == 0).all()


def test_float64_model_is_certified_where_its_rounding_allows():
    """A float64 network whose logits share a 2e4 sum and differ by 1e-3 x3: the allowance
    is float64's (tiny), the margin 1e-3 at eps 0.5 leaves 5e-4, every point is certified and
    no sampled point flips the float64 forward."""
    net, x = cancelling_net(torch.float64)
    y = net(x).argmax(1)
    cert = locallip.certify(net, x, eps=0.5, certificate='guaranteed')[0.5]
    assert cert.all()
    assert not flipped_inside(net, x, y, 0.5).any()


def test_margin_allowance_value():
    """The allowance of one class pair, by hand: 2 (E_y + E_j) + the worst-case-logit
    algorithm's rounding + the subtraction's."""
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0])
    logits = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    worst = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
    err = torch.tensor([[1e-6, 2e-6]], dtype=torch.float64)
    r = torch.tensor([0.25], dtype=torch.float64)
    lo = torch.tensor([[-0.1, -0.2]], dtype=torch.float64)
    hi = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    got = margin_allowance(w, y, logits, worst, err, r, lo, hi)
    u = unit_roundoff(torch.float64)
    g = gamma(2 + 8, u)
    diff = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    bcp = g * (diff.abs() * torch.tensor([0.3, 0.2], dtype=torch.float64)).sum() \
        + diff.norm() * 0.25 * math.sqrt(3 * g)
    want = 2 * (1e-6 + 2e-6) + bcp * (1 + g) + gamma(3, u) * (3.0 + 1.0 + 0.5)
    assert got[0, 0] == 0
    assert got[0, 1].item() == pytest.approx(want.item(), rel=1e-12)


def test_error_recurrence_bounds_float32_rounding():
    """E of one convolution and one linear layer over a box bounds |float32 - float64| of the
    layers' outputs at points of the box, and is not loose by orders of magnitude on inputs
    that cancel (observed / bound within [1e-3, 1])."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 6, 6) * 100 + 1000
    mag = (x.abs() + 1).expand(64, -1, -1, -1)
    err, _ = through_affine(conv, torch.zeros_like(mag), mag, (2, 6, 6),
                            unit_roundoff(torch.float32), apply_absW)
    pts = x + torch.rand(64, 2, 6, 6) * 2 - 1
    c64 = nn.Conv2d(2, 3, 3).double()
    c64.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    with torch.no_grad():
        diff = (conv(pts).double() - c64(pts.double())).abs()
    assert (diff <= err.double()).all()
    assert (diff / err.double()).max() > 1e-3


def test_strict_box_check_refuses_any_crossing():
    """With the rounding model the boxes contain the real activations: any crossing is an
    error (before, crossings up to 1e-4 of the box's scale passed silently)."""
    ub = torch.ones(2, 3)
    lb = ub.clone()
    lb[1, 2] += 1e-6
    _check_box(lb, ub, "here")                      # the estimates' tolerance
    with pytest.raises(BoundError, match="exceeds upper bound by"):
        _check_box(lb, ub, "here", strict=True)


def test_rounding_boxes_contain_float32_forwards():
    """The rounding walk's boxes of a trained net contain the float32 activations of sampled
    points of the ball (compared entry by entry at every activation)."""
    net = trained_tiny('relux').eval()
    x = torch.rand(4, 1, 8, 8)
    y = net(x).argmax(1)
    res = compute_bound(net, x, y, 0.3, sniter=50, check=True, rounding=True)
    g = torch.Generator().manual_seed(5)
    d = torch.randn(4, 256, 64, generator=g)
    d = (d / d.norm(dim=2, keepdim=True) * 0.3).view(4, 256, 1, 8, 8)
    for b in range(4):
        a = (x[b] + d[b])
        for i, m in enumerate(net):
            a = m(a)
            nxt = i + 1
            if nxt in res.pre_boxes:
                lb, ub = res.pre_boxes[nxt]
                assert (a >= lb[b]).all() and (a <= ub[b]).all()


def test_lanczos_float64_orthonormal_with_slack():
    """The Lanczos basis stays orthonormal to 1e-10 after 60 steps on a 40-dim space (partial
    reorthogonalisation), its upper bound is at least the exact norm, and the rounding slack
    (which counts the measured loss of orthogonality) is a tiny fraction of ||W||^2."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    lz = Lanczos(layer, None, None, (40,), 2, 'cpu')
    lz.run(60)
    q = lz.basis[:, :lz.steps]
    live = (lz.betas > 0).cumprod(1).sum(1)     # steps before breakdown
    assert (live < lz.steps).all() and (lz.reorthogonalised <= live + 1).all()  # none after it
    for b in range(2):
        k = int(live[b]) + 1 if int(live[b]) < lz.steps else lz.steps
        gram = q[b, :k] @ q[b, :k].T
        assert (gram - torch.eye(k, dtype=gram.dtype)).abs().max() < 1e-10
    exact = torch.linalg.matrix_norm(layer.weight.double(), 2)
    up = lz.upper(lz.ritz_max(), 1e-4)
    assert (up >= exact).all()
    assert ((0 < lz.slack()) & (lz.slack() < 1e-8 * exact ** 2)).all()


def test_single_linear_layer_guaranteed():
    """A network of one Linear layer has no norm to bound: the guaranteed certificate is the
    margin against eps ||w_j - w_y|| (before: ZeroDivisionError in the union bound)."""
    net = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.zero_()
    x = torch.tensor([[1.0, 0.0]])       # margin 1, ||w_0 - w_1|| = sqrt(2): radius 1/sqrt(2)
    c = locallip.certify(net, x, eps=[0.70, 0.71], certificate='guaranteed')
    assert c[0.70].item() and not c[0.71].item()


def test_guaranteed_norms_take_the_runs_seed():
    """The global convolution bounds are drawn from the run's seed (no default seed): two
    seeds draw different Lanczos starts (25 steps on a 6272-dim space: different Ritz values),
    and each upper bound holds."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 28 * 28, 3))
    with pytest.raises(TypeError):
        GuaranteedNorms(net, (1, 28, 28), 1e-4)
    a = GuaranteedNorms(net, (1, 28, 28), 1e-4, generator_seed=1, global_steps=25)
    b = GuaranteedNorms(net, (1, 28, 28), 1e-4, generator_seed=2, global_steps=25)
    assert a.lower[0] != b.lower[0]
    exact = torch.linalg.matrix_norm(torch.func.jacrev(
        lambda v: nn.functional.conv2d(v.view(1, 1, 28, 28), net[0].weight, padding=1).flatten()
    )(torch.zeros(784)).double(), 2)
    assert a.upper[0] >= exact and b.upper[0] >= exact


def test_radius_rounds_split_delta(monkeypatch):
    """Every round of Lanczos bounds of the guaranteed radius search is drawn at
    delta_op / RADIUS_ROUNDS (which round a radius rests on depends on the earlier draws;
    before, each round used the whole delta_op)."""
    seen = []
    original = radius.masked_norm_bounds

    def spy(*args, **kw):
        seen.append((kw.get('steps'), kw.get('delta_op'), args[4].delta_op))
        return original(*args, **kw)
    monkeypatch.setattr(radius, 'masked_norm_bounds', spy)
    net = trained_tiny('relux').eval()
    x = torch.rand(6, 1, 8, 8)
    locallip.certified_radius(net, x, certificate="guaranteed", steps=24)
    bounds = [s for s in seen if s[0] == 24]
    assert bounds, "no Lanczos bounds were drawn"
    for _, used, whole in bounds:
        assert used is not None and used <= whole / radius.RADIUS_ROUNDS * (1 + 1e-12)


def test_api_keeps_the_norms_while_the_weights_are_the_same(monkeypatch):
    """locallip draws a model's global bounds once and reuses them while its weights, the
    input shape, delta and the seed are the same; an in-place weight change draws anew."""
    from locallip import lanczos
    made = []
    original = lanczos.GuaranteedNorms.__init__

    def counted(self, *args, **kw):
        made.append(1)
        original(self, *args, **kw)
    monkeypatch.setattr(lanczos.GuaranteedNorms, '__init__', counted)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.rand(3, 1, 8, 8)
    locallip.certify(net, x, eps=0.01, certificate='guaranteed')
    locallip.certify(net, x, eps=0.02, certificate='guaranteed')
    assert len(made) == 1
    locallip.certify(net, x, eps=0.01, certificate='guaranteed', seed=1)
    assert len(made) == 2
    with torch.no_grad():
        net[0].weight.mul_(0.5)
    locallip.certify(net, x, eps=0.01, certificate='guaranteed', seed=1)
    assert len(made) == 3
