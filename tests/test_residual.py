"""Residual blocks: the bound through y = x + f(x) and y = S x + f(x) (the project's
Residual and a user's module read by torch.fx) against exact Jacobian norms at sampled
points of the ball (float64), local <= global, attacks never beat a certificate, the
empirical lower bound below every sound upper bound, and the refusals of other graphs.
(Certified points of a trained residual net against attacks: tests/test_soundness.py.)"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import DEVICE, blobs, dev, trained_tiny, user_resnet

import locallip
from locallip.attacks import pgd_l2
from locallip.bound import compute_bound
from locallip.certificates import guaranteed_certify
from locallip.errors import UnsupportedModel
from locallip.lanczos import GuaranteedNorms
from locallip.layers import (check_supported, features, fold_batchnorm, layer_input_shapes,
                             layer_list)
from locallip.models import Residual
from locallip.operators import apply_W
from locallip.tightness import LowerSearch, lipschitz_lower_bound
from locallip.tracing import sequential_view
from locallip.vectors import RandomVectors


def explicit(layer, in_shape):
    """The matrix [out, in] of x -> W x (float64)."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64, device=DEVICE).reshape(n, *in_shape)
    return apply_W(layer, basis).reshape(n, -1).t()


def exact_norms(net, input_shape):
    """(global_sigmas, local_norms) of compute_bound from exact SVDs of the explicit
    (masked) matrices: the bound with no estimate in it."""
    layers, shapes = layer_list(net), layer_input_shapes(net, input_shape)
    mats = {i: explicit(layers[i], s) for i, s in shapes.items()}
    glob = {i: torch.linalg.matrix_norm(m, 2) for i, m in mats.items()}

    def local(i, layer, d_in, d_out, in_shape):
        b = next(d.shape[0] for d in (d_in, d_out, torch.zeros(1)) if d is not None)
        out = []
        for k in range(b):
            m = mats[i]
            if d_out is not None:
                m = d_out[k].flatten()[:, None] * m
            if d_in is not None:
                m = m * d_in[k].flatten()[None, :]
            out.append(torch.linalg.matrix_norm(m, 2))
        return torch.stack(out)
    return glob, local


def conv_net(seed=0):
    """Identity, conv-projection and average-pooling shortcuts, a pre-activation block and
    a block inside a block (8x8 inputs, 3 classes)."""
    torch.manual_seed(seed)
    inner = Residual(nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)))
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), inner,
                               nn.Conv2d(4, 4, 3, padding=1))), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 6, 4, stride=2, padding=1), nn.ReLU(),
                               nn.Conv2d(6, 6, 3, padding=1)), nn.Conv2d(4, 6, 1, stride=2)),
        nn.ReLU(), Residual(nn.Conv2d(6, 6, 3, padding=1), nn.AvgPool2d(1)),
        nn.Flatten(), nn.Linear(6 * 16, 12), nn.ReLU(), Residual(nn.Linear(12, 12)),
        nn.Linear(12, 3))


def sample_ball(x, eps, n, gen):
    """n points of the eps-ball around x [1, ...] (directions uniform, radii to the boundary)."""
    d = torch.randn((n, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device)
    d = d / d.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    r = torch.rand(n, generator=gen, dtype=x.dtype).to(x.device) ** (1 / x[0].numel())
    return x + d * (eps * r).view(-1, *([1] * (x.dim() - 1)))


def jacobian_norm_exact(h, p):
    j = torch.autograd.functional.jacobian(lambda z: h(z).flatten(), p)
    return torch.linalg.matrix_norm(j.reshape(j.shape[0], -1), 2)


class TorchvisionStyle(nn.Module):
    """The torchvision BasicBlock idiom: one ReLU(inplace=True) called twice, a 1x1
    ``downsample`` shortcut, ``out += identity``, AdaptiveAvgPool2d with overlapping windows
    (4x4 -> 3x3) and ``torch.flatten(x, 1)`` (8x8 inputs, 3 classes)."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.downsample = nn.Conv2d(4, 6, 1, stride=2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d((3, 3)), nn.Linear(6 * 9, 3)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        identity = self.downsample(x)
        out = self.conv3(self.relu(self.conv2(x)))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


@pytest.mark.parametrize('eps', [0.05, 0.4])
@pytest.mark.parametrize('build', [conv_net, TorchvisionStyle], ids=['blocks', 'torchvision'])
def test_bound_holds_at_sampled_points_exact_norms(eps, build):
    """With exact masked norms the local bound is at least ||J_h(p)||_2 at every sampled
    point p of the ball, the points' features stay in the penultimate ball and box, and
    their logits never beat the worst-case margins."""
    net = dev(build().double().eval())
    x = dev(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    y = net(x).argmax(1)
    glob, local = exact_norms(net, (1, 8, 8))
    with torch.no_grad():
        res = compute_bound(net, x, y, eps, global_sigmas=glob, local_norms=local,
                            opt_iter=200, check=True)
    lip, h = res.r_local / eps, features(net)
    gen = torch.Generator().manual_seed(1)
    lo, hi = res.box
    worst_seen = torch.zeros(4, dtype=torch.float64)
    for k in range(4):
        pts = sample_ball(x[k:k + 1], eps, 60, gen)
        for p in pts[:15]:
            worst_seen[k] = max(worst_seen[k], jacobian_norm_exact(h, p[None]))
        with torch.no_grad():
            feats, logits = h(pts), net(pts)
        centre = h(x[k:k + 1])
        assert ((feats - centre).norm(dim=1) <= res.r_local[k] * (1 + 1e-9)).all()
        assert (feats - centre >= lo[k] - 1e-9).all() and (feats - centre <= hi[k] + 1e-9).all()
        gap = logits[:, y[k]:y[k] + 1] - logits
        gap[:, y[k]] = float('inf')
        assert gap.min() >= res.margin(y)[k] - 1e-9
    assert (worst_seen <= lip * (1 + 1e-9)).all(), (worst_seen, lip)
    assert (worst_seen > 0).all()


def test_block_factor_is_exact_for_a_psd_branch():
    """y = x + W x with W symmetric positive semi-definite: ||I + W||_2 = 1 + ||W||_2, so
    the triangle-inequality bound of the block is the exact norm (a bound below it, e.g.
    max(1, ||W||) or 1 * ||W||, fails here)."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.copy_(a @ a.t() / 6)
    net = dev(nn.Sequential(Residual(lin), nn.Linear(6, 2).double()))
    x = dev(torch.rand(3, 6, dtype=torch.float64))
    glob, local = exact_norms(net, (6,))
    res = compute_bound(net, x, net(x).argmax(1), 0.1, global_sigmas=glob, local_norms=local)
    true = torch.linalg.matrix_norm(torch.eye(6, dtype=torch.float64) + lin.weight.cpu(), 2)
    assert torch.allclose(res.r_local.cpu() / 0.1, true.expand(3), rtol=1e-12)
    assert torch.allclose(res.r_global.cpu() / 0.1, true.expand(3), rtol=1e-12)


def test_identity_overlap_uses_the_indicators():
    """A block between two ReLUs: its identity factor is ||D_out D_in|| (0 when no neuron
    varies on both sides, 1 otherwise), never more than the triangle bound."""
    torch.manual_seed(0)
    net = dev(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), Residual(nn.Linear(5, 5)), nn.ReLU(),
                            nn.Linear(5, 2)).double())
    x = dev(torch.rand(6, 4, dtype=torch.float64))
    glob, local = exact_norms(net, (4,))
    res = compute_bound(net, x, net(x).argmax(1), 0.05, global_sigmas=glob, local_norms=local)
    block = res.terms[1]
    d_in, d_out = res.masks[1], res.masks[3]
    want = (d_in * d_out).amax(1)
    assert torch.equal(block.overlap, want)
    lip = res.sigmas[0] * (res.sigmas[2] + want)
    assert torch.allclose(res.r_local / 0.05, lip, rtol=1e-12)


def test_local_at_most_global_and_global_mode_drops_the_indicators():
    net = dev(conv_net(3).double().eval())
    x = dev(torch.rand(5, 1, 8, 8, dtype=torch.float64))
    y = net(x).argmax(1)
    glob, local = exact_norms(net, (1, 8, 8))
    for eps in (0.01, 0.3, 3.0):
        res = compute_bound(net, x, y, eps, global_sigmas=glob, local_norms=local)
        assert (res.r_local <= res.r_global * (1 + 1e-12)).all()
        g = compute_bound(net, x, y, eps, global_sigmas=glob, local_norms=local, bound='global')
        assert torch.allclose(g.r_local, g.r_global, rtol=1e-12)
    # the product of the per-layer estimates from power iteration behaves the same way
    res = compute_bound(net, x, y, 0.3, RandomVectors(5, DEVICE), {}, sniter=500, tol=1e-9)
    assert (res.r_local <= res.r_global * (1 + 1e-6)).all()


class Tutorial(nn.Module):
    """Functional style: F.avg_pool2d, x.relu(), x.view(-1, features), ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.conv1(x).relu()
        identity = x
        out = self.conv2(x)
        out += identity
        out = F.avg_pool2d(F.relu(out), 2)
        return self.fc(out.view(-1, 4 * 4 * 4))


class WrongView(Tutorial):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(F.avg_pool2d(self.conv1(x), 2).view(-1, 4 * 4 * 4 // 2))


def test_functional_forms_are_read_and_a_wrong_view_is_caught():
    torch.manual_seed(0)
    net = dev(Tutorial())
    assert [type(m).__name__ for m in sequential_view(net)] == [
        'Conv2d', 'ReLU', 'Residual', 'ReLU', 'AvgPool2d', 'Flatten', 'Linear']
    x = dev(torch.rand(3, 1, 8, 8))
    res = compute_bound(net, x, net(x).argmax(1), 0.1)
    assert torch.allclose(res.logits, net(x))
    wrong = dev(WrongView())     # view(-1, 32) of 64 features per sample: the batch doubles
    with pytest.raises(UnsupportedModel, match="WrongView: the network read from its forward "
                                               "fails on the first input"):
        compute_bound(wrong, x[:2], torch.zeros(4, dtype=torch.long, device=DEVICE)[:2], 0.1)


def test_traced_user_module_is_read_as_the_project_blocks():
    """The user's module is read by torch.fx into layers and Residual blocks that share its
    layer objects; its bound equals that of the same network written with Residual."""
    torch.manual_seed(0)
    user = dev(user_resnet(hw=8, classes=3))
    view = sequential_view(user)
    assert sequential_view(user) is view                  # cached
    kinds = [type(m).__name__ for m in view]
    assert kinds == ['Conv2d', 'ReLU', 'Residual', 'ReLU', 'Residual', 'ReLU', 'Flatten',
                     'Linear']
    assert view[2].branch[0] is user.block.conv1 and view[4].shortcut is user.proj
    same = nn.Sequential(user.stem, nn.ReLU(),
                         Residual(nn.Sequential(user.block.conv1, nn.ReLU(), user.block.conv2)),
                         nn.ReLU(), Residual(nn.Sequential(user.down), user.proj), nn.ReLU(),
                         nn.Flatten(), user.fc)
    x = dev(torch.rand(6, 1, 8, 8))
    y = user(x).argmax(1)
    gen = lambda: torch.Generator(DEVICE).manual_seed(0)
    a = compute_bound(user, x, y, 0.2, RandomVectors(6, DEVICE, gen()), {})
    torch.manual_seed(0)
    b = compute_bound(same, x, y, 0.2, RandomVectors(6, DEVICE, gen()), {})
    assert check_supported(user) == check_supported(same)
    assert torch.allclose(a.logits, b.logits) and torch.allclose(a.r_local, b.r_local, rtol=1e-5)
    # gradients reach the user's own parameters; its state_dict keys are its own
    a.r_local.sum().backward()
    assert user.block.conv2.weight.grad is not None and 'block.conv1.weight' in user.state_dict()


class MethodAdds(nn.Module):
    """Additions as methods: ``a.add(b)``, and ``a.add_(b)`` whose result is not used (later
    uses of ``a`` read the sum)."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.a(x).add(x))
        out = self.b(x)
        out.add_(x)
        return self.fc(F.relu(out))


def test_method_additions_are_read_as_blocks():
    torch.manual_seed(0)
    net = dev(MethodAdds())
    same = nn.Sequential(net.stem, nn.ReLU(), Residual(net.a), nn.ReLU(), Residual(net.b),
                         nn.ReLU(), net.fc)
    assert [type(m).__name__ for m in sequential_view(net)] == [type(m).__name__ for m in same]
    x = dev(torch.randn(5, 4))
    y = net(x).argmax(1)
    gen = lambda: torch.Generator(DEVICE).manual_seed(0)
    a = compute_bound(net, x, y, 0.3, RandomVectors(5, DEVICE, gen()), {})
    b = compute_bound(same, x, y, 0.3, RandomVectors(5, DEVICE, gen()), {})
    assert torch.allclose(a.logits, net(x)) and torch.equal(a.r_local, b.r_local)


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.cat([x, self.a(x)], 1))


class Mul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x * self.a(x))


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x + self.a(x) + self.c(x))


class Const(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x + 1.0)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x).add(x, alpha=2.0))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.b(x)
        return self.b(-x)


@pytest.mark.parametrize('net,message', [
    (Cat(), "Cat: graph node 'cat' (call_function cat) is not a layer the bound reads"),
    (Mul(), "Mul: graph node 'mul' (call_function mul) is not a layer the bound reads"),
    (Three(), "Three: graph node 'x' (placeholder x) is used by 3 operations"),
    (Const(), "Const: graph node 'add' (call_function add) adds values that are not"),
    (Scaled(), "Scaled: graph node 'add' (call_method add) adds with a scale (alpha)"),
    (Branchy(), "Branchy: torch.fx cannot trace its forward (TraceError"),
], ids=['cat', 'mul', 'three-users', 'constant', 'scaled', 'control-flow'])
def test_other_graphs_are_refused_in_one_line(net, message):
    with pytest.raises(UnsupportedModel) as e:
        check_supported(net)
    assert message in str(e.value) and '\n' not in str(e.value)


class InPlaceArm(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu, self.a, self.b = nn.ReLU(inplace=True), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x + self.a(self.relu(x)))


def test_an_in_place_relu_starting_an_arm_is_refused():
    """It would overwrite the block's input, which the identity arm reads."""
    for net in (InPlaceArm(), nn.Sequential(nn.Linear(4, 4), Residual(nn.Sequential(
            nn.ReLU(inplace=True), nn.Linear(4, 4))), nn.Linear(4, 2))):
        with pytest.raises(UnsupportedModel, match=r"starts with ReLU\(inplace=True\)"):
            check_supported(net)


def test_batchnorm_in_a_block_folds_with_the_same_keys():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
                                 nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4, 3))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    net = dev(net.eval())
    folded = fold_batchnorm(net)
    x = dev(torch.rand(3, 1, 8, 8))
    assert torch.allclose(folded(x), net(x), atol=1e-5)
    assert check_supported(folded) == [0, 2, 4, 6, 9]
    assert [type(m).__name__ for m in layer_list(folded)][:7] == [
        'Conv2d', 'ReLU', 'Conv2d', 'Identity', 'Conv2d', 'Identity', 'Conv2d']


def test_guaranteed_certificates_and_radius_through_blocks():
    """--certificate guaranteed: Lanczos upper bounds on every masked operator (the identity
    overlap is exact); every guaranteed certificate is also certified with exact norms, and
    the guaranteed radius holds under attack."""
    import locallip
    net = copy.deepcopy(trained_tiny('residual')).double().eval()
    xt, yt = dev(*blobs(32, 2))
    xt = xt.double()
    norms = GuaranteedNorms(net, (1, 8, 8), 1e-4, generator_seed=0)
    g = guaranteed_certify(net, xt, yt, 0.3, norms, opt_iter=200)
    glob, local = exact_norms(net, (1, 8, 8))
    exact = compute_bound(net, xt, yt, 0.3, global_sigmas=glob, local_norms=local, opt_iter=200)
    assert g.certified.sum() >= 5
    assert not (g.certified & ~exact.certified(yt)).any()
    assert (g.lip >= exact.r_local / 0.3 * (1 - 1e-9)).all()
    rad = locallip.certified_radius(net, xt[:12], yt[:12], certificate='guaranteed')
    r = rad.radius.to(DEVICE, torch.float64)
    ok = r > 0
    assert ok.sum() >= 3
    xs, ys, rs = xt[:12][ok], yt[:12][ok], r[ok].view(-1, 1, 1, 1)
    for restart in range(2):
        adv = pgd_l2(net, xs, ys, rs, rs / 4, 50, clip=False, loss='margin')
        assert ((adv - xs).flatten(1).norm(dim=1) <= rs.flatten() * (1 + 1e-9)).all()
        with torch.no_grad():
            assert (net(adv).argmax(1) == ys).all()


def test_lower_bound_never_exceeds_a_sound_bound():
    """The empirical lower bound (secant ascent and Jacobian norms) is at most the local
    bound with exact norms on every point, and at least the Jacobian norm at the centre."""
    net = copy.deepcopy(trained_tiny('residual')).double().eval()
    x = dev(torch.rand(8, 1, 8, 8, dtype=torch.float64))
    y = net(x).argmax(1)
    glob, local = exact_norms(net, (1, 8, 8))
    for eps in (0.05, 0.5):
        res = compute_bound(net, x, y, eps, global_sigmas=glob, local_norms=local)
        low = lipschitz_lower_bound(net, x, eps, LowerSearch(pairs=2, steps=10))
        assert (low <= res.r_local / eps * (1 + 1e-9)).all(), (low, res.r_local / eps)
        centre = torch.stack([jacobian_norm_exact(features(net), x[k:k + 1]) for k in range(8)])
        assert (low >= centre * (1 - 1e-6)).all()


def test_a_final_log_softmax_is_left_out_of_the_bound():
    """log_softmax over the classes shifts every logit of a point by the same amount, so
    margins, certificates and radii are those of the logits: the bound reads the network
    without it (same layer keys), and the view's output gets it back where it is compared
    with the model's own. Over another axis, or inside the network, it is refused."""
    torch.manual_seed(0)
    plain = dev(user_resnet(hw=8, classes=3))
    logsm = dev(user_resnet(hw=8, classes=3, log_softmax=True))
    logsm.load_state_dict(plain.state_dict())
    x = dev(torch.rand(6, 1, 8, 8))
    y = plain(x).argmax(1)
    assert [type(m) for m in sequential_view(logsm)] == [type(m) for m in sequential_view(plain)]
    assert check_supported(logsm) == check_supported(plain)
    for eps in (0.02, 0.2):
        torch.manual_seed(1)
        a = compute_bound(plain, x, y, eps)
        torch.manual_seed(1)
        b = compute_bound(logsm, x, y, eps)    # (its first call compares the view: passes)
        assert torch.equal(a.worst, b.worst) and torch.equal(a.margin(y), b.margin(y))
    ra = locallip.certified_radius(plain, x, y)
    rb = locallip.certified_radius(logsm, x, y)
    assert torch.allclose(ra.radius, rb.radius, rtol=1e-5) and (ra.radius > 0).any()
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    with_lsm = nn.Sequential(*seq, nn.LogSoftmax(dim=1))
    assert check_supported(with_lsm) == check_supported(seq) == [1, 3]
    torch.manual_seed(2)
    c = compute_bound(dev(with_lsm), x, y, 0.1)
    torch.manual_seed(2)
    assert torch.equal(c.worst, compute_bound(dev(seq), x, y, 0.1).worst)
    for bad in (nn.Sequential(*seq, nn.LogSoftmax(dim=0)),
                nn.Sequential(nn.Flatten(), nn.LogSoftmax(dim=1), nn.Linear(64, 3))):
        with pytest.raises(UnsupportedModel, match="read only as the network's last operation"):
            check_supported(bad)
