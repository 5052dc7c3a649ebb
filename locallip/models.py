"""The layers of the reference release (ReLU_x, ClampGroupSort, Flatten) and the model zoo:
the paper's architectures by dataset and name, or a user's ``module.path:function``.
Parameter names and shapes follow the reference, so its checkpoints load as they are."""
import importlib
import math
import os
import sys

import torch
import torch.nn as nn

from locallip.errors import UserError


# ========================================================================================
# Activations
# ========================================================================================
class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


def _min_ties_to_other(x, other):
    """min(x, other) whose gradient at ties goes to ``other`` (torch 1.8's torch.min)."""
    return torch.where(x < other, x, other)


def _max_ties_to_other(x, other):
    """max(x, other) whose gradient at ties goes to ``other`` (torch 1.8's torch.max)."""
    return torch.where(x > other, x, other)


class _ClippedReLU(torch.autograd.Function):
    """clamp(min(x, t), min=0) with torch 1.8's gradients (see ReLU_x), in two passes
    forward and one backward (a where-based version takes twice the operations)."""

    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(x, t)
        return torch.minimum(x, t).clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        below = x < t                                   # min's tie goes to t
        gx = g * (below & (x >= 0)) if ctx.needs_input_grad[0] else None
        gt = None
        if ctx.needs_input_grad[1]:
            gt = g * (~below & (t >= 0))                # clamp passes the full gradient at 0
            dims = [d for d in range(gt.dim()) if t.shape[d] == 1 and gt.shape[d] != 1]
            gt = gt.sum(dims, keepdim=True) if dims else gt
        return gx, gt


class ReLU_x(nn.Module):
    """ReLU clipped above at a learnable per-neuron threshold: clamp(min(x, t), min=0).

    input_size: per-sample shape (C, H, W) or (F,); parameter ``threshold`` is
    [1, *input_size], filled with ``init``.
    Gradients at exact ties are the reference's (torch 1.8): at a pre-activation of exactly
    0 the FULL gradient passes to x (today's clamp passes none), at x == threshold it goes
    to the threshold. Ties are common early on (zero biases, zero image backgrounds).
    """

    def __init__(self, input_size, init=1.0):
        super().__init__()
        self.threshold = nn.Parameter(torch.full((1, *input_size), float(init)))

    def forward(self, x):
        return _ClippedReLU.apply(x, self.threshold)


class ClampGroupSort(nn.Module):
    """MaxMin (GroupSort of channel halves) with learnable clamps.

    Splits channels into halves a, b and returns
    cat(min(max(a, b), max_param), max(min(a, b), min_param)).
    input_size_half: per-sample shape of HALF the channels, e.g. (16, 32, 32) or (256,);
    parameters ``max``, ``min`` are [1, *input_size_half]. Gradients at exact ties follow
    torch 1.8's max / min (to the second argument), as in the reference.
    """

    def __init__(self, input_size_half, max=1.0, min=-1.0):
        super().__init__()
        self.max = nn.Parameter(torch.full((1, *input_size_half), float(max)))
        self.min = nn.Parameter(torch.full((1, *input_size_half), float(min)))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([_min_ties_to_other(_max_ties_to_other(a, b), self.max),
                          _max_ties_to_other(_min_ties_to_other(a, b), self.min)], dim=1)


class Residual(nn.Module):
    """A residual block y = shortcut(x) + branch(x); ``shortcut=None`` is the identity
    (y = x + branch(x)). ``branch`` and ``shortcut`` are chains of the supported layers (an
    nn.Sequential or one layer; blocks may nest); both give outputs of one shape. The bound
    reads it as the sum of its two arms (docs/method.md, "Residual blocks")."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module = None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x):
        return (x if self.shortcut is None else self.shortcut(x)) + self.branch(x)


def clamp_thresholds(model):
    """After every optimiser step: ReLU_x thresholds >= 0 (reference)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ReLU_x):
                m.threshold.clamp_(min=0)


# ========================================================================================
# Architectures (parameter names and shapes follow the reference release)
# ========================================================================================
def _conv(cin, cout, k, s, p):
    c = nn.Conv2d(cin, cout, k, stride=s, padding=p)
    n = k * k * cout
    c.weight.data.normal_(0, math.sqrt(2.0 / n))
    c.bias.data.zero_()
    return c


def _build(convs, fcs, act):
    """convs: (cin, cout, k, s, p, out_hw); fcs: (fin, fout). ``act(shape, j)`` builds the
    j-th activation for per-sample output ``shape``; no activation after the last Linear."""
    layers, j = [], 0
    for cin, cout, k, s, p, hw in convs:
        layers += [_conv(cin, cout, k, s, p), act((cout, hw, hw), j)]
        j += 1
    layers.append(Flatten())
    for n, (fin, fout) in enumerate(fcs):
        layers.append(nn.Linear(fin, fout))
        if n < len(fcs) - 1:
            layers.append(act((fout,), j))
            j += 1
    return nn.Sequential(*layers)


def _relux(init):
    return lambda shape, j: ReLU_x(shape, init)


def _relu():
    return lambda shape, j: nn.ReLU()


def _maxmin_pairs(pairs):
    return lambda shape, j: ClampGroupSort((shape[0] // 2, *shape[1:]), pairs[j][0], pairs[j][1])


def c4f3(in_ch, hw, act):
    """4C3F of MNIST (in_ch=1, hw=28) and CIFAR-10 (in_ch=3, hw=32)."""
    h2, h4 = hw // 2, hw // 4
    return _build([(in_ch, 32, 3, 1, 1, hw), (32, 32, 4, 2, 1, h2), (32, 64, 3, 1, 1, h2),
                   (64, 64, 4, 2, 1, h4)],
                  [(64 * h4 * h4, 512), (512, 512), (512, 10)], act)


def c6f2(act):
    """6C2F of CIFAR-10."""
    return _build([(3, 32, 3, 1, 1, 32), (32, 32, 3, 1, 1, 32), (32, 32, 4, 2, 1, 16),
                   (32, 64, 3, 1, 1, 16), (64, 64, 3, 1, 1, 16), (64, 64, 4, 2, 1, 8)],
                  [(4096, 512), (512, 10)], act)


def c8f2(act):
    """8C2F of TinyImageNet (64x64 inputs, 200 classes)."""
    return _build([(3, 64, 3, 1, 1, 64), (64, 64, 3, 1, 1, 64), (64, 64, 4, 2, 0, 31),
                   (64, 128, 3, 1, 1, 31), (128, 128, 3, 1, 1, 31), (128, 128, 4, 2, 0, 14),
                   (128, 256, 3, 1, 1, 14), (256, 256, 4, 2, 0, 6)],
                  [(9216, 256), (256, 200)], act)


def res4c3f(in_ch, hw, act):
    """4C3F's layers with its two downsampling stages made residual blocks: block 1 is
    ResNet's basic block (He et al., CVPR 2016: two convolutions in the branch, a 1x1
    stride-2 projection shortcut, ResNet's option B, the activation after the addition);
    block 2 is a one-convolution residual block as in LiResNet (Hu et al., NeurIPS 2023),
    downsampling with a 2x2 average-pooling shortcut. The four convolutions and three
    linear layers are 4C3F's, in its order and shapes; the shortcuts add a 1x1 convolution
    and a pooling. MNIST (in_ch=1, hw=28) and CIFAR-10 (in_ch=3, hw=32)."""
    h2, h4 = hw // 2, hw // 4
    block1 = Residual(nn.Sequential(_conv(32, 32, 4, 2, 1), act((32, h2, h2), 1),
                                    _conv(32, 64, 3, 1, 1)), _conv(32, 64, 1, 2, 0))
    block2 = Residual(_conv(64, 64, 4, 2, 1), nn.AvgPool2d(2))
    return nn.Sequential(_conv(in_ch, 32, 3, 1, 1), act((32, hw, hw), 0),
                         block1, act((64, h2, h2), 2), block2, act((64, h4, h4), 3),
                         Flatten(), nn.Linear(64 * h4 * h4, 512), act((512,), 4),
                         nn.Linear(512, 512), act((512,), 5), nn.Linear(512, 10))


CIFAR_MAXMIN = [(0.1, -0.1), (0.1, -0.15), (0.15, -0.15), (0.15, -0.15), (0.2, -0.2),
                (0.3, -0.3), (1.2, -1.2)]
TINY_MAXMIN = [(v, -v) for v in (0.8, 1.0, 1.4, 1.4, 1.4, 1.6, 2.0, 3.0, 1.6)]

MODELS = {
    # (data family, model name) -> builder(init)
    ('mnist', 'relux'): lambda init: c4f3(1, 28, _relux(1.0)),   # reference builder: 1.0
    ('mnist', 'standrelu'): lambda init: c4f3(1, 28, _relu()),
    ('mnist', 'res4c3f'): lambda init: res4c3f(1, 28, _relux(1.0)),     # as relux's
    ('cifar10', 'res4c3f'): lambda init: res4c3f(3, 32, _relux(1.0)),
    ('cifar10', 'relux'): lambda init: c4f3(3, 32, _relux(1.0)),  # reference builder: 1.0
    ('cifar10', 'c6f2_relux'): lambda init: c6f2(_relux(init)),
    ('cifar10', 'standrelu'): lambda init: c6f2(_relu()),
    ('cifar10', 'c6f2_clmaxmin'): lambda init: c6f2(_maxmin_pairs(CIFAR_MAXMIN)),
    ('tinyimagenet', 'tinyimagenet_relux'): lambda init: c8f2(_relux(init)),
    ('tinyimagenet', 'tiny_clmaxmin'): lambda init: c8f2(_maxmin_pairs(TINY_MAXMIN)),
}
FAMILY = {'mnist': 'mnist', 'fashionmnist': 'mnist', 'cifar10': 'cifar10',
          'tinyimagenet': 'tinyimagenet'}


def model_names(data):
    return sorted(name for fam, name in MODELS if fam == FAMILY.get(data))


def user_model(spec):
    """The nn.Module returned by calling ``module.path:function`` (imported from the
    current directory or the Python path; the function takes no arguments): an
    nn.Sequential, or a module whose forward chains layers with residual additions (read
    by torch.fx, see tracing.py)."""
    mod_name, _, fn_name = spec.partition(':')
    if not mod_name or not fn_name:
        raise UserError(f"--model {spec!r}: an import path is module.path:function")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"--model {spec}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"--model {spec}: {mod_name} has no function {fn_name}")
    net = fn()
    if not isinstance(net, nn.Module):
        raise UserError(f"--model {spec}: {fn_name}() returned a {type(net).__name__}, not "
                        f"an nn.Module")
    return net


def model_tag(model):
    """The model's part of checkpoint names: the name, or an import path's function."""
    return model.rpartition(':')[2] if ':' in model else model


def select_model(data, model, init=1.0):
    """Build the reference architecture ``model`` for dataset ``data`` (on the CPU), or
    the user's network when ``model`` is an import path ``module.path:function``."""
    if ':' in model:
        return user_model(model)
    if data not in FAMILY:
        raise UserError(f"unknown --data {data!r}; choose from {', '.join(sorted(FAMILY))}")
    key = (FAMILY[data], model)
    if key not in MODELS:
        raise UserError(f"unknown --model {model!r} for --data {data}; "
                        f"choose from {', '.join(model_names(data))}")
    return MODELS[key](init)
