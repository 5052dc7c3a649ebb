"""The network the bound reads is the network that runs (tracing.py, docs/method.md, "The
network the bound reads"): a module is read as its torch.nn / project class only when it
computes as that class does (else it is traced, then read correctly or refused in one
line); hooks and forwards replaced on an instance are refused; every API call re-traces
and compares the view with the model's own forward on the inputs it certifies; the API
checks its inputs first, naming its own parameters."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrizations

import locallip
from locallip.attacks import audit_batch
from locallip.models import ReLU_x, Residual

EPS = 0.05
FAST = dict(sniter=60, opt_iter=30)           # enough for equal bounds of equal networks


def conv(cin=4, cout=4, cls=nn.Conv2d):
    return cls(cin, cout, 3, padding=1)


def chain(*middle, first=None, last=None):
    """Conv(1,4) ReLU, ``middle``, ReLU Flatten Linear(256, 3) on 8x8 inputs (seeded)."""
    torch.manual_seed(0)
    first = conv(1, 4) if first is None else first
    last = nn.Linear(256, 3) if last is None else last
    return nn.Sequential(first, nn.ReLU(), *middle, nn.ReLU(), nn.Flatten(), last).eval()


def inputs(n=4, channels=1):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, channels, 8, 8, generator=g)


def bound(net, x, eps=EPS):
    return locallip.lipschitz_bound(net, x, eps, lower=False, **FAST)


def assert_same_bound(net, twin, x):
    """``net`` (the model as the user wrote it) is bounded as ``twin`` (the same network
    written with the project's blocks / plain layers)."""
    a, b = bound(net, x), bound(twin, x)
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.margin, b.margin, rtol=1e-5, atol=1e-6), (a.margin, b.margin)
    assert torch.allclose(a.local, b.local, rtol=1e-5), (a.local, b.local)
    return a


def assert_certificates_hold(net, x, eps=EPS):
    """Every point certified at ``eps`` keeps its label at 64 points of its ball and under
    a short PGD on the margin (the model's own forward: the network that runs)."""
    cert = locallip.certify(net, x, eps=eps, **FAST)[eps]
    y = net(x).argmax(1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for k in cert.nonzero().flatten().tolist():
            d = torch.randn(64, *x.shape[1:], generator=g)
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(
                64, 1, 1, 1, generator=g)
            assert (net(x[k] + d).argmax(1) == y[k]).all(), k
    if cert.any():
        broken, _ = audit_batch(net, x[cert], y[cert], eps, restarts=1, steps=10)
        assert not broken.any()
    return cert


def refused(net, match, x=None, error=locallip.UnsupportedModel):
    """Every API call refuses ``net`` with one line containing ``match``."""
    x = inputs() if x is None else x
    for call in (lambda: locallip.lipschitz_bound(net, x, EPS, lower=False, **FAST),
                 lambda: locallip.certify(net, x, eps=EPS, **FAST),
                 lambda: locallip.certified_radius(net, x, sniter=FAST['sniter'],
                                                   opt_iter=FAST['opt_iter'])):
        with pytest.raises(error) as e:
            call()
        assert match in str(e.value) and '\n' not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------
# 1. A module is read as its class only when it computes as its class does
# ----------------------------------------------------------------------------------------
class SkipSequential(nn.Sequential):
    """An nn.Sequential with its own forward: a skip around its chain."""

    def forward(self, x):
        return x + super().forward(x)


def test_a_sequential_with_its_own_forward_is_traced_not_read_as_a_chain():
    net = chain(SkipSequential(conv(), nn.ReLU(), conv()))
    block = net[2]
    twin = nn.Sequential(net[0], net[1], Residual(nn.Sequential(*block)), *net[3:])
    assert_same_bound(net, twin, inputs())
    assert_certificates_hold(net, inputs(8))


class DoubledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class ShiftedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1


class ScaledConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return F.conv2d(x, 2 * weight, bias, self.stride, self.padding)


class HalfResidual(Residual):
    def forward(self, x):
        return x + 0.5 * self.branch(x)


def qat_conv():
    """torch's own Conv2d subclass whose forward fake-quantizes the weight."""
    qconfig = torch.ao.quantization.get_default_qat_qconfig()
    return torch.ao.nn.qat.Conv2d(1, 4, 3, padding=1, qconfig=qconfig)


def test_a_layer_subclass_with_its_own_forward_is_traced_and_refused():
    """Read as its parent class, each would be bounded as another network than runs."""
    cases = [(chain(first=conv(1, 4, DoubledConv)), "DoubledConv: graph node"),
             (chain(last=ShiftedLinear(256, 3)), "ShiftedLinear: graph node"),
             (chain(first=conv(1, 4, ScaledConvForward)), "ScaledConvForward: graph node"),
             (chain(HalfResidual(nn.Sequential(conv(), nn.ReLU(), conv()))),
              "HalfResidual: graph node 'mul'"),
             (chain(first=qat_conv()), "Conv2d: graph node 'weight' (get_attr weight)"),
             (chain(first=parametrizations.weight_norm(conv(1, 4, DoubledConv))),
              "ParametrizedDoubledConv: graph node")]
    for net, match in cases:
        refused(net, match)


class ReLUForward(ReLU_x):
    """A ReLU_x whose forward is a plain relu (no threshold): read as nn.ReLU."""

    def forward(self, x):
        return torch.relu(x)


def test_a_relu_x_subclass_with_its_own_forward_is_read_as_what_it_computes():
    torch.manual_seed(0)
    act = ReLUForward((4, 8, 8), init=0.05)        # a ReLU_x would clip at 0.05
    net = chain(conv(), act)
    twin = nn.Sequential(*net[:3], nn.ReLU(), *net[4:])
    assert_same_bound(net, twin, inputs())


class Faithful(nn.Conv2d):
    pass


class FaithfulLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    def extra_repr(self):
        return 'mine'


class UserNet(nn.Module):
    def __init__(self, conv_cls, linear_cls):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = conv(1, 4, conv_cls), conv(4, 4, conv_cls)
        self.fc = linear_cls(256, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def test_a_subclass_that_overrides_nothing_is_a_layer():
    """Also inside a traced module (torch.fx kept only torch.nn's own classes whole)."""
    x = inputs()
    for net, plain in ((UserNet(Faithful, FaithfulLinear), UserNet(nn.Conv2d, nn.Linear)),
                       (chain(conv(cls=Faithful), last=FaithfulLinear(256, 3)), chain(conv()))):
        plain.load_state_dict(net.state_dict())
        assert_same_bound(net.eval(), plain.eval(), x)


def _plain_copy(net):
    """``net`` with every parametrized layer replaced by a plain one of its weight."""
    out = []
    for m in net:
        if hasattr(m, 'parametrizations'):
            p = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding) \
                if isinstance(m, nn.Conv2d) else nn.Linear(m.in_features, m.out_features)
            p.weight, p.bias = nn.Parameter(m.weight.detach().clone()), m.bias
            m = p
        out.append(m)
    return nn.Sequential(*out).eval()


def mlp_head():
    """Conv(1,4) ReLU Conv(4,4) ReLU Flatten Linear(256,32) ReLU Linear(32,3) (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(conv(1, 4), nn.ReLU(), conv(), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


def with_batchnorm(net, k):
    """``net`` with an eval-mode BatchNorm (random statistics) after its layer ``k``."""
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(4) if isinstance(net[k], nn.Conv2d) else nn.BatchNorm1d(32)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(*net[:k + 1], bn.eval(), *net[k + 1:]).eval()


@pytest.mark.parametrize('parametrize,k', [
    (parametrizations.orthogonal, 5), (parametrizations.weight_norm, 0),
    (parametrizations.spectral_norm, 2)], ids=['orthogonal', 'weight_norm', 'spectral_norm'])
def test_parametrized_layers_are_read_by_their_weight(parametrize, k):
    """A parametrized layer (torch.nn.utils.parametrize: its weight a property) is read as
    the plain layer of that weight, and a BatchNorm after it folds into that weight."""
    x = inputs()
    net = mlp_head()
    parametrize(net[k])
    net.eval()
    plain = _plain_copy(net)
    assert_same_bound(net, plain, x)
    assert_same_bound(with_batchnorm(net, k), with_batchnorm(plain, k), x)


def test_a_parametrization_in_training_mode_is_refused():
    net = chain(conv())
    parametrizations.spectral_norm(net[2])
    net.train()
    refused(net, "module '2' (ParametrizedConv2d) has a parametrization in training mode")


# ----------------------------------------------------------------------------------------
# 2. What runs besides the layers: instance attributes, hooks
# ----------------------------------------------------------------------------------------
def test_a_forward_replaced_on_an_instance_is_refused():
    net = chain(conv())
    layer = net[2]
    layer.forward = lambda x: 2 * nn.Conv2d.forward(layer, x)
    refused(net, "module '2' (Conv2d): 'forward' is set on the instance")
    user = UserNet(nn.Conv2d, nn.Linear).eval()
    user.forward = lambda x: -UserNet.forward(user, x)
    refused(user, "the model (UserNet): 'forward' is set on the instance")
    compiled = chain(conv())
    compiled[2].compile()
    refused(compiled, "module '2' (Conv2d) was compiled (m.compile())")


@pytest.mark.parametrize('where', ['layer', 'pre-layer', 'container', 'traced'])
def test_forward_hooks_are_refused(where):
    net = chain(conv()) if where != 'traced' else UserNet(nn.Conv2d, nn.Linear).eval()
    double = lambda m, i, o: 2 * o
    if where == 'layer':
        net[2].register_forward_hook(double)
        match = "module '2' (Conv2d) has a forward hook (test_forward_hooks_are_refused."
    elif where == 'pre-layer':
        net[2].register_forward_pre_hook(lambda m, i: (2 * i[0],))
        match = "module '2' (Conv2d) has a forward pre-hook"
    elif where == 'container':
        net.register_forward_hook(double)
        match = "the model (Sequential) has a forward hook"
    else:
        net.conv2.register_forward_hook(double)
        match = "UserNet: module 'conv2' (Conv2d) has a forward hook"
    refused(net, match)


@pytest.mark.parametrize('kind', ['hook', 'pre-hook'])
def test_a_global_forward_hook_is_refused(kind):
    if kind == 'hook':
        handle = torch_module.register_module_forward_hook(lambda m, i, o: o)
    else:
        handle = torch_module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        refused(chain(conv()), f"a global module hook (register_module_forward_"
                               f"{kind.replace('-', '_')}) has a forward {kind}")
    finally:
        handle.remove()
    bound(chain(conv()), inputs())           # accepted again once removed


def test_old_style_spectral_norm_is_refused_with_the_parametrization_advice():
    net = chain(conv())
    torch.nn.utils.spectral_norm(net[2])
    refused(net, "has a forward pre-hook (SpectralNorm), which changes what the network "
                 "computes while the bound reads its layers as they are: use "
                 "torch.nn.utils.parametrizations.spectral_norm, which the bound reads")


# ----------------------------------------------------------------------------------------
# 3. Every call reads the network as it runs now, and compares on its inputs
# ----------------------------------------------------------------------------------------
class Switching(nn.Module):
    """A skip around conv2 in training mode (``mode``) or while ``self.skip`` is set."""

    def __init__(self, by):
        super().__init__()
        torch.manual_seed(0)
        self.by, self.skip = by, True
        self.conv1, self.conv2, self.fc = conv(1, 4), conv(), nn.Linear(256, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        on = self.training if self.by == 'mode' else self.skip
        x = x + self.conv2(x) if on else self.conv2(x)
        return self.fc(F.relu(x).flatten(1))


@pytest.mark.parametrize('by', ['mode', 'attribute'])
def test_a_switched_forward_is_read_afresh_at_every_call(by):
    x = inputs()
    net = Switching(by).train()
    skip = nn.Sequential(net.conv1, nn.ReLU(), Residual(net.conv2), nn.ReLU(), nn.Flatten(),
                         net.fc)
    straight = nn.Sequential(net.conv1, nn.ReLU(), net.conv2, nn.ReLU(), nn.Flatten(), net.fc)
    assert_same_bound(net, skip, x)
    if by == 'mode':
        net.eval()
    else:
        net.skip = False
    assert_same_bound(net, straight, x)
    assert_certificates_hold(net, inputs(8))


def test_the_per_call_comparison_sees_what_no_rule_does(monkeypatch):
    """nn.Sequential.forward itself replaced: a plain nn.Sequential no longer computes its
    chain, and only the comparison on the certified inputs can tell."""
    chained = nn.Sequential.forward
    monkeypatch.setattr(nn.Sequential, 'forward', lambda self, x: 2 * chained(self, x))
    refused(chain(conv()), "the network the bound reads differs from the model's own forward")


# ----------------------------------------------------------------------------------------
# Issue 48: the API checks its inputs first and names its own parameters
# ----------------------------------------------------------------------------------------
def test_api_inputs_are_checked_first_by_their_names():
    net, x = chain(conv()), inputs()
    bad = x.clone()
    bad[1, 0, 2, 3] = float('nan')
    refused(net, "x holds NaN or infinite values (input 1 of 4)", bad, ValueError)
    bad[1, 0, 2, 3] = float('inf')
    refused(net, "x holds NaN or infinite values", bad, ValueError)
    refused(net, "x has shape (4, 3, 8, 8); the model's first layer, a Conv2d, takes "
                 "[batch, 1, height, width]", inputs(channels=3), ValueError)
    for call in (lambda: locallip.certify(net, x, eps=EPS, certificate='guaranteed', delta=2),
                 lambda: locallip.certified_radius(net, x, certificate='guaranteed', delta=2)):
        with pytest.raises(ValueError, match=r"^delta must be in \(0, 1\), got 2$"):
            call()
    with pytest.raises(ValueError, match=r"^y must hold class labels in \[0, 3\)"):
        locallip.certify(net, x, y=[0, 1, 2, 3], eps=EPS, **FAST)
    with pytest.raises(ValueError, match=r"^eps must be one or several radii >= 0, got nan"):
        locallip.certify(net, x, eps=float('nan'), **FAST)


def test_partial_flatten_and_linear_on_images_are_refused_in_one_line():
    """A Flatten other than to [batch, features] and a Linear applied to a 4-D tensor run in
    the model but are not what the bound reads: one UnsupportedModel line, not a traceback
    from inside the bound (before: RuntimeError on shapes)."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 4, 4)
    partial = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(2), nn.ReLU(), nn.Flatten(),
                            nn.Linear(18, 3)).eval()
    on_images = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Linear(3, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(18, 3)).eval()
    for net, what in ((partial, "flattens dims 2..-1"), (on_images, r"Linear\) is applied to")):
        net(x)
        for cert in ('guaranteed', 'reference'):
            with pytest.raises(locallip.UnsupportedModel, match=what):
                locallip.certify(net, x, eps=0.1, certificate=cert)


class _InPlaceArm(nn.Module):
    """h feeds both arms; the branch starts with F.relu(h, inplace=True), which overwrites the
    h the identity arm reads: the model computes relu(h) + l2(relu(h)), not h + l2(relu(h))."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.fc = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.l1(x)
        return self.fc(h + self.l2(F.relu(h, inplace=True)))


def test_functional_in_place_relu_starting_an_arm_is_refused():
    """Read as nn.ReLU(inplace=True), which the arm-start rule refuses (before: read as an
    out-of-place ReLU, a network other than the one that runs where h < 0)."""
    with pytest.raises(locallip.UnsupportedModel, match="inplace=True"):
        locallip.certify(_InPlaceArm().eval(), torch.rand(3, 2), eps=0.1)
