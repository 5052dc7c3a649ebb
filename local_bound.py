"""Local Lipschitz bound and certified loss of Local-Lip (Huang et al., NeurIPS 2021).

Everything here is about the L2 ball ``{x : ||x - x0||_2 <= eps}`` around each input.
The bound works on any ``nn.Sequential`` built from Conv2d, Linear, AvgPool2d,
AdaptiveAvgPool2d, Flatten, ReLU_x, nn.ReLU, ClampGroupSort, Identity and Dropout (eval
mode) whose last module is a Linear layer (eval-mode BatchNorm is folded into affine layers
by ``fold_batchnorm``; in training, by the batch's statistics: ``training_view``); it
dispatches on layer types, never on model names.

Per sample, the network is walked once, carrying
  * ``mu``      : the image of the input, i.e. the ordinary forward pass  [batch, *shape]
  * ``r``       : a radius such that every activation of the eps-ball lies in the
                  L2 ball ``B(mu, r)``; propagated with the global spectral norm  [batch]
  * ``lb, ub``  : an elementwise box containing every activation of the eps-ball,
                  the intersection of interval arithmetic and the ball  [batch, *shape]
From the pre-activation boxes come the varying-neuron indicators D (1 = the neuron can
change inside the ball, 0 = it is stuck), and the local Lipschitz constant of the network
up to its penultimate layer is bounded by prod_i ||D_out W_i D_in||_2 (docs/method.md),
computed by per-sample power iteration.  The last Linear layer is handled exactly by the
worst-case-logit algorithm of BCP (docs/method.md).
"""
import contextlib
import copy
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import progress
from errors import UnsupportedModel
from models import ClampGroupSort, Flatten, ReLU_x, Residual
from tracing import check_view, derived, relative_error, sequential_view, view_output
from vectors import RandomVectors

TOL = 1e-3          # power iteration stops when the largest per-sample change is below this
# iteration counts, one name per meaning (the command line's own defaults are utils.DEFAULTS)
TEST_SNITER = 100         # the reference's per-sample power iterations at test time
CONVERGED_SNITER = 2000   # enough for the estimates to meet TOL (the README's certification)
TEST_OPT_ITER = 1000      # worst-case-logit rounds at test time (exact once they finish)
NORM_FLOOR = 1e-12  # guards divisions by norms that can be exactly zero
FLOOR = 1e-30       # floor of a norm or radius before a log or a division
POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)       # averages: linear, weights >= 0, no bias
AFFINE = (nn.Conv2d, nn.Linear) + POOLS             # linear maps (plus bias): one norm each
ACTIVATIONS = (ReLU_x, nn.ReLU, ClampGroupSort)
FLATTEN = (Flatten, nn.Flatten)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
NOOPS = (nn.Identity,) + DROPOUTS                # identities in eval mode
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


def layer_names(types) -> List[str]:
    """Class names of ``types``, in order, each once."""
    return list(dict.fromkeys(t.__name__ for t in types))


# the layer types the bound accepts, by class name (the README and docs/api.md list the same
# names; tests/test_docs.py checks)
SUPPORTED_NAMES = layer_names(AFFINE + FLATTEN + ACTIVATIONS + NOOPS + BATCHNORM)
SUPPORTED = (f"{', '.join(layer_names(AFFINE + FLATTEN + ACTIVATIONS))}, "
             f"{', '.join(layer_names(NOOPS))} (eval mode); "
             f"{', '.join(layer_names(BATCHNORM))} in eval mode (folded by fold_batchnorm)")


class BoundError(RuntimeError):
    """A bound that violates its own invariants (lb > ub, non-finite values)."""


@contextlib.contextmanager
def exact_float32():
    """Certification runs inside this: no TF32 in CUDA convolutions and matmuls (its
    10-bit mantissa perturbs products by ~1e-3 relative, enough to break a bound). The
    previous settings are restored on exit; training keeps PyTorch's (see the README)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = old


# ----------------------------------------------------------------------------------------
# Supported models; BatchNorm folded into affine layers
# ----------------------------------------------------------------------------------------
def _mods(m: nn.Module) -> list:
    """The chain of modules ``m`` stands for: a Sequential's children, else ``m`` alone."""
    return list(m) if isinstance(m, nn.Sequential) else [m]


def _arms(block: Residual):
    """(branch modules, shortcut modules) of a residual block; the identity has none."""
    return _mods(block.branch), ([] if block.shortcut is None else _mods(block.shortcut))


def layer_list(model: nn.Module) -> List[nn.Module]:
    """The layers of the network in key order: the key of a layer (the index in this list,
    which keys its vectors, norms and indicators) is its module index in a plain
    nn.Sequential; nested Sequentials are read in order, and a Residual block's layers
    follow one another, its branch's then its shortcut's."""
    out = []

    def walk(mods):
        for m in mods:
            if isinstance(m, nn.Sequential):
                walk(m)
            elif isinstance(m, Residual):
                branch, short = _arms(m)
                walk(branch)
                walk(short)
            else:
                out.append(m)
    walk(_mods(sequential_view(model)))
    return out


def _top_level(view: nn.Sequential) -> list:
    """The view's modules with nested Sequentials flattened (blocks stay whole)."""
    out = []
    for m in view:
        out += _top_level(m) if isinstance(m, nn.Sequential) else [m]
    return out


def features(model: nn.Module) -> nn.Sequential:
    """The network up to its penultimate layer (the logit layer's input): the map whose
    local Lipschitz constant the bound bounds (``BoundResult.r_local`` / eps). Shares the
    model's layers."""
    check_supported(model)
    top = _top_level(sequential_view(model))
    last = max(k for k, m in enumerate(top) if isinstance(m, nn.Linear))
    return nn.Sequential(*top[:last])


def _layer_name(i: int, m: nn.Module, names: Dict[int, str]) -> str:
    name = names.get(id(m))
    return f"layer {i} ({type(m).__name__})" if name in (None, str(i)) else \
        f"layer {i} ({name}: {type(m).__name__})"


def _check_layer(i: int, m: nn.Module, where: str) -> bool:
    """Validate one layer; True for an affine one. Raises UnsupportedModel."""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != 'zeros' or isinstance(m.padding, str):
            raise UnsupportedModel(f"{where}: only zero padding given as numbers is supported")
        return True
    if isinstance(m, nn.AvgPool2d):
        if isinstance(m.padding, str):
            raise UnsupportedModel(f"{where}: padding must be given as numbers")
        return True
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return True
    if isinstance(m, BATCHNORM):
        raise UnsupportedModel(f"{where}: fold it first with local_bound.fold_batchnorm(model) "
                               f"(a per-channel affine map in eval mode; locallip and "
                               f"evaluate.py do this)")
    if isinstance(m, NOOPS):
        if m.training and not isinstance(m, nn.Identity):
            raise UnsupportedModel(f"{where} is in training mode, where it is not a fixed "
                                   f"map: call model.eval() first")
        return False
    if isinstance(m, nn.LogSoftmax):
        raise UnsupportedModel(f"{where}: a log_softmax is read only as the network's last "
                               f"operation, over the class axis (dim=1), where the bound "
                               f"leaves it out (it shifts every logit of a point equally)")
    if not isinstance(m, (nn.Linear,) + ACTIVATIONS + FLATTEN):
        raise UnsupportedModel(f"{where} is not supported by the bound; supported: "
                               f"{SUPPORTED}, and residual blocks of them")
    return isinstance(m, nn.Linear)


def check_supported(model: nn.Module) -> List[int]:
    """Validate ``model`` for the bound; return the keys (``layer_list`` indices; module
    indices of a plain nn.Sequential) of its affine layers (Conv2d, Linear, the average
    pools), the last of which is the logit layer.

    ``model``: an nn.Sequential of the supported layers and ``models.Residual`` blocks, or
    any module whose forward torch.fx reads as such (``tracing``). Raises UnsupportedModel
    (a ValueError) naming the first unsupported module or graph node, a Dropout in
    training mode, or a BatchNorm (``fold_batchnorm`` turns it into affine layers at the
    same keys).
    """
    try:
        view = sequential_view(model)
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{e}, of the layers {SUPPORTED}") from None
    names = {} if view is model else {id(m): n for n, m in model.named_modules() if n}
    affine = [i for i, m in enumerate(layer_list(view))
              if _check_layer(i, m, _layer_name(i, m, names))]
    _check_in_place(view)
    real = [m for m in _top_level(view) if not isinstance(m, NOOPS)]
    if not affine or not real or not isinstance(real[-1], nn.Linear):
        raise UnsupportedModel("the last module of the model (after any Identity / Dropout) "
                               "must be nn.Linear (the logit layer), outside any residual "
                               "block")
    return affine


def _first_leaf(mods: list) -> Optional[nn.Module]:
    for m in mods:
        if isinstance(m, nn.Sequential):
            m = _first_leaf(_mods(m))
        if m is not None:
            return m
    return None


def _check_in_place(view: nn.Module):
    """Refuse an in-place ReLU that starts an arm of a residual block: it would overwrite
    the block's input, which the other arm still reads (y = x + f(x) would not be computed)."""
    for blk in (m for m in view.modules() if isinstance(m, Residual)):
        for arm in _arms(blk):
            first = _first_leaf(arm)
            if isinstance(first, nn.ReLU) and first.inplace:
                raise UnsupportedModel("a residual block's arm starts with ReLU(inplace=True), "
                                       "which overwrites the block's input that the other arm "
                                       "reads: use ReLU() there")


def _bn_scale_shift(bn: nn.Module):
    """(s, t) [channels] of an eval-mode BatchNorm: bn(x) = s x + t per channel."""
    if bn.training:
        raise UnsupportedModel(f"{type(bn).__name__} is in training mode, where it is not a "
                               f"fixed map (it normalises by the batch's statistics): call "
                               f"model.eval() first")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModel(f"{type(bn).__name__} without running statistics "
                               f"(track_running_stats=False) normalises by the batch at every "
                               f"call: not a fixed map, not supported")
    s, t = _batch_scale_shift(bn, bn.running_mean, bn.running_var)
    return s.detach(), t.detach()


def _batch_scale_shift(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor):
    """(s, t) [channels] of BatchNorm normalising by ``mean`` and ``var``: s x + t."""
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


def _with_weights(a: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                  live: bool) -> nn.Module:
    """A new module computing as ``a`` with the given weight and bias: new Parameters, or
    with ``live`` the tensors themselves (a training step's fold, through which gradients
    reach the original parameters and the batch statistics)."""
    b = copy.copy(a)
    b._parameters, b._buffers, b._modules = {}, dict(a._buffers), {}
    if live:
        b.weight, b.bias = weight, bias
    else:
        b.weight = nn.Parameter(weight.detach().clone())
        b.bias = nn.Parameter(bias.detach().clone())
    return b


def _bn_as_layer(m: nn.Module, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
    """A BatchNorm with nothing to fold into, as its own affine layer of the same map: a
    depthwise 1x1 Conv2d (BatchNorm2d) or a diagonal Linear (BatchNorm1d)."""
    c, live = s.numel(), s.requires_grad
    if isinstance(m, nn.BatchNorm2d):
        return _with_weights(nn.Conv2d(c, c, 1, groups=c, device='meta'), s.view(c, 1, 1, 1), t,
                             live)
    return _with_weights(nn.Linear(c, c, device='meta'), torch.diag(s), t, live)


def _fold_into(a: nn.Module, m: nn.Module, s, t, where: str) -> nn.Module:
    """The affine layer ``a`` with W' = s W, b' = s b + t per output channel (a new module)."""
    if a.weight.shape[0] != s.numel():
        raise UnsupportedModel(f"{where} ({type(m).__name__}) has {s.numel()} channels, the "
                               f"layer before it has {a.weight.shape[0]} outputs")
    w = a.weight * s.view((-1,) + (1,) * (a.weight.dim() - 1))
    return _with_weights(a, w, t if a.bias is None else a.bias * s + t, s.requires_grad)


def _fold_chain(mods: list, key: int, stats: Optional[dict] = None):
    """(folded modules, next key) of one chain (see fold_batchnorm); blocks recursively.
    ``stats``: {id(BatchNorm): (mean, var)} of a training batch (``training_view``): fold
    with them, differentiably, and drop Dropout; None: the running statistics."""
    out, prev = [], None       # prev: position in out of an affine layer not yet folded into
    for m in mods:
        if isinstance(m, (nn.Sequential, Residual)):
            arms = [_mods(m)] if isinstance(m, nn.Sequential) else list(_arms(m))
            folded = []
            for arm in arms:
                f, key = _fold_chain(arm, key, stats)
                folded.append(nn.Sequential(*f))
            out.append(folded[0] if isinstance(m, nn.Sequential) else
                       Residual(folded[0], folded[1] if m.shortcut is not None else None))
            prev = None
            continue
        if isinstance(m, BATCHNORM):
            s, t = _bn_scale_shift(m) if stats is None else _batch_scale_shift(m, *stats[id(m)])
            if prev is not None:
                out[prev] = _fold_into(out[prev], m, s, t, f"layer {key}")
                m = nn.Identity()
            else:
                m = _bn_as_layer(m, s, t)
            prev = None
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            prev = len(out)
        elif isinstance(m, NOOPS):       # folding looks through Identity / Dropout
            m = m if stats is None else nn.Identity()
        else:
            prev = None
        out.append(m)
        key += 1
    return out, key


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An equivalent model (a copy; the same layer keys) without BatchNorm, for evaluation:
    an eval-mode BatchNorm1d/2d right after a Conv2d or Linear of its chain (Identity and
    Dropout may sit between) is folded into it (W' = s W, b' = s b + t per output channel,
    exact) and replaced by nn.Identity; any other BatchNorm becomes its own affine layer of
    the same map: a depthwise 1x1 Conv2d (BatchNorm2d) or a diagonal Linear (BatchNorm1d on
    [batch, features]). Residual blocks are folded arm by arm; a traced model
    (``tracing``) is returned as the nn.Sequential the bound reads. Refuses BatchNorm in
    training mode or without running statistics. A model without BatchNorm is returned as
    is (not copied)."""
    if not any(isinstance(m, BATCHNORM) for m in model.modules()):
        return model
    folded = nn.Sequential(*_fold_chain(_mods(sequential_view(model)), 0)[0])
    folded.train(model.training)
    return derived(folded, model)


TRAIN_VIEW_TOL = 1e-4     # the training view's logits against the model's own, relative
_TRAIN_CHECKED = weakref.WeakSet()


def _in_training(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCHNORM + DROPOUTS) and m.training]


def bound_structure(model: nn.Module) -> nn.Module:
    """The network as the bound reads it, for its layer keys and shapes: ``model`` itself,
    or, with BatchNorm, ``fold_batchnorm`` of it (of an eval-mode copy when a BatchNorm is
    in training mode; Dropout too is read as in eval mode). Raises UnsupportedModel as
    ``check_supported``."""
    if _in_training(model):
        model = copy.deepcopy(model).eval()
    return fold_batchnorm(model)


def _batch_statistics(model: nn.Module, x: torch.Tensor) -> tuple:
    """(model's logits, {id(BatchNorm): (mean, var) [channels]}) from its own forward on the
    training batch ``x`` [batch, ...] with Dropout off: the statistics each training-mode
    BatchNorm normalises by (biased variance; differentiable), its running ones updated."""
    stats, hooks = {}, []
    drops = [m for m in model.modules() if isinstance(m, DROPOUTS) and m.training]

    def keep(bn, inputs, _):
        z = inputs[0]
        dims = [0] + list(range(2, z.dim()))
        stats[id(bn)] = (z.mean(dims), z.var(dims, unbiased=False))
    for m in model.modules():
        if isinstance(m, BATCHNORM) and m.training:
            hooks.append(m.register_forward_hook(keep))
    try:
        for m in drops:
            m.eval()
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
        for m in drops:
            m.train()
    return logits, stats


def training_view(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The network a training step bounds: ``model`` itself, or when it holds BatchNorm or
    Dropout in training mode, a fold made for the batch ``x`` [batch, ...]: each BatchNorm
    folded with the batch's own statistics (as training-mode BatchNorm normalises; its
    running statistics are updated once), differentiably, so gradients reach the weights,
    the BatchNorm's affine parameters and, through the statistics, the layers before it;
    Dropout left out (the step bounds, and its clean loss uses, the network without it).
    Evaluation folds the running statistics instead (``fold_batchnorm``). On the first call
    for a model its logits are compared with the view's (``TRAIN_VIEW_TOL``)."""
    if not _in_training(model):
        return model
    logits, stats = _batch_statistics(model, x)
    source = sequential_view(model)
    view = nn.Sequential(*_fold_chain(_mods(source), 0, stats)[0])
    if model not in _TRAIN_CHECKED:
        with torch.no_grad():
            err = relative_error(view_output(source, view(x)), logits)
        if not err <= TRAIN_VIEW_TOL:
            raise UnsupportedModel(f"{type(model).__name__}: the network with BatchNorm folded "
                                   f"by the batch's statistics differs from the model's own "
                                   f"training-mode forward by {err:.3g} (relative)")
        _TRAIN_CHECKED.add(model)
    return view


# ----------------------------------------------------------------------------------------
# Linear operators: W x (no bias), W^T y, row norms, |W| x
# ----------------------------------------------------------------------------------------
def apply_W(layer: nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W x without bias. x: [batch, *in_shape] -> [batch, *out_shape]."""
    if isinstance(layer, POOLS):
        return layer(x)                  # linear, no bias
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w)


def apply_absW(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|W| x (elementwise absolute weights, no bias): the half-width map of interval
    arithmetic. x: [batch, *in_shape] -> [batch, *out_shape]."""
    if isinstance(layer, POOLS):
        return layer(x)                  # nonnegative weights: |W| = W
    return apply_W(layer, x, layer.weight.abs())


def vjp_transpose(layer: nn.Module, y: torch.Tensor, in_shape) -> torch.Tensor:
    """W^T y from the vector-Jacobian product of x -> W x (``apply_W``) at x = 0: the
    transpose of any linear layer without a hand-written one (differentiable in y and in
    the layer's parameters). y: [batch, *out_shape] -> [batch, *in_shape]."""
    x0 = torch.zeros((y.shape[0], *in_shape), dtype=y.dtype, device=y.device)
    _, pullback = torch.func.vjp(lambda x: apply_W(layer, x), x0)
    return pullback(y)[0]


def apply_WT(layer: nn.Module, y: torch.Tensor, in_shape) -> torch.Tensor:
    """W^T y, the adjoint of ``apply_W``. y: [batch, *out_shape] -> [batch, *in_shape].

    Conv2d and Linear have hand-written transposes (a transposed convolution, whose output
    padding is computed from ``in_shape`` since a strided convolution's can come out one
    pixel short; faster than the vjp, see the README); any other linear layer uses
    ``vjp_transpose``.
    """
    if isinstance(layer, nn.Conv2d):
        pad = []
        for d in range(2):
            full = ((y.shape[2 + d] - 1) * layer.stride[d] - 2 * layer.padding[d]
                    + layer.dilation[d] * (layer.kernel_size[d] - 1) + 1)
            pad.append(in_shape[1 + d] - full)
        return F.conv_transpose2d(y, layer.weight, None, layer.stride, layer.padding,
                                  tuple(pad), layer.groups, layer.dilation)
    if isinstance(layer, nn.Linear):
        return F.linear(y, layer.weight.t())
    return vjp_transpose(layer, y, in_shape)


def adaptive_window_sizes(output_size, in_hw) -> torch.Tensor:
    """Inputs averaged by each output of ``nn.AdaptiveAvgPool2d(output_size)`` on an input of
    spatial size ``in_hw``: [out_h, out_w]. Output i of a side of n inputs and k outputs
    averages inputs floor(i n / k) .. ceil((i + 1) n / k) - 1 (PyTorch's windows)."""
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    counts = []
    for k, n in zip(sizes, in_hw):
        k = n if k is None else k
        i = torch.arange(k)
        counts.append(((i + 1) * n + k - 1) // k - (i * n) // k)
    return torch.outer(counts[0], counts[1]).double()


def row_norms(layer: nn.Module, in_shape=None) -> torch.Tensor:
    """L2 norm of each output unit's weights, shaped to broadcast over [batch, *out_shape].

    For a convolution it is the norm of the whole filter (an upper bound at the borders,
    where zero padding hides part of it). For the average pools (``in_shape`` needed) it is
    exact per output: 1/c over the window's n real inputs gives sqrt(n) / c (AdaptiveAvgPool2d:
    c = n, 1 / sqrt(n))."""
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return adaptive_window_sizes(layer.output_size, in_shape[-2:]).rsqrt()[None, None]
    if isinstance(layer, nn.AvgPool2d):
        ones = torch.ones((1, *in_shape))
        mean = layer(ones)                                     # n / c
        n = F.avg_pool2d(ones, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                         True, 1)                              # n (divisor 1: the sum)
        return mean / n.clamp_min(1).sqrt()
    w = layer.weight
    n = w.flatten(1).pow(2).sum(1).clamp_min(NORM_FLOOR).sqrt()
    return n.view(1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else n.view(1, -1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars [batch] -> [batch, 1, ...] broadcasting against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of [batch, ...] -> [batch], at least NORM_FLOOR (zero-safe gradient)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).clamp_min(NORM_FLOOR)


class _Extremum(torch.autograd.Function):
    """torch.maximum / torch.minimum with the same values and the same gradients (the
    gradient goes to the larger / smaller input, split in halves on ties), in fewer passes
    over memory than autograd's generic formula. a and b have the same shape."""

    @staticmethod
    def forward(ctx, a, b, is_max):
        w = torch.sign(a - b) if is_max else torch.sign(b - a)
        w.add_(1).mul_(0.5)                  # weight of a: 1, 1/2 on ties, 0
        ctx.save_for_backward(w)
        return torch.maximum(a, b) if is_max else torch.minimum(a, b)

    @staticmethod
    def backward(ctx, g):
        w, = ctx.saved_tensors
        ga = g * w
        return ga, g - ga, None


def _needs_grad(a, b) -> bool:
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def box_max(a, b):
    """Elementwise max of two same-shaped tensors (see _Extremum; without a gradient to
    record, torch.maximum itself)."""
    return _Extremum.apply(a, b, True) if _needs_grad(a, b) else torch.maximum(a, b)


def box_min(a, b):
    """Elementwise min of two same-shaped tensors (see _Extremum; without a gradient to
    record, torch.minimum itself)."""
    return _Extremum.apply(a, b, False) if _needs_grad(a, b) else torch.minimum(a, b)


# ----------------------------------------------------------------------------------------
# Power iteration (the reference's iteration and its bilinear estimate, docs/method.md)
# ----------------------------------------------------------------------------------------
GLOBAL_TOL = 1e-4   # the global (whole-operator) iteration stops at a change below this
NORM_EPS = 1e-12    # normalize(t) = t / (||t|| + NORM_EPS), as the reference
ESTIMATES = ('bilinear', 'forward')


def masked_products(layer: nn.Module, x: torch.Tensor, in_shape, d_in=None, d_out=None):
    """(z, t) for A = D_out W D_in and an already masked x [batch, *in_shape]: z = A x
    [batch, *out_shape] and t = A^T z = D_in W^T D_out z [batch, *in_shape] (d_in / d_out:
    0/1 indicators, None = all vary). The operator of the power iteration and of Lanczos."""
    z = apply_W(layer, x)
    if d_out is not None:
        z = z * d_out
    t = apply_WT(layer, z, in_shape)
    if d_in is not None:
        t = t * d_in
    return z, t


def _power_step(layer: nn.Module, x: torch.Tensor, in_shape, d_in=None, d_out=None):
    """One power iteration on A = D_out W D_in from an already masked x [batch, *in_shape]
    (the reference's: v = normalize(D_out W x); u = normalize(D_in W^T v), normalize(t) =
    t / (||t|| + 1e-12)). Returns (new unit u, ||A^T v|| [batch], z = A x, ||z|| + 1e-12).
    v = z / (||z|| + 1e-12) is never divided out: A^T v = (A^T z) / that scale, so u and
    ||A^T v|| are the reference's (to 1e-12 relative) with one full-size division less;
    callers form v only where they need it (--pi_grad last)."""
    z, t = masked_products(layer, x, in_shape, d_in, d_out)
    u, tn, zn = _unit_and_ratio(z, t)
    return u, tn, z, zn


def _unit_and_ratio(z: torch.Tensor, t: torch.Tensor):
    """The normalisations of one power iteration from z = F x [batch, ...] and t = G z
    [batch, ...] (G the second product): v = z / (||z|| + 1e-12) is never divided out, so
    u = normalize(G v) = t / (||t|| + 1e-12 (||z|| + 1e-12)) and ||G v|| = ||t|| / (||z||
    + 1e-12). Returns (u [shape of t], ||G v|| [batch], ||z|| + 1e-12 [batch])."""
    zn = torch.linalg.vector_norm(z.flatten(1), dim=1) + NORM_EPS
    tzn = torch.linalg.vector_norm(t.flatten(1), dim=1)
    return t / _bcast(tzn + NORM_EPS * zn, t), tzn / zn, zn


def _bilinear(tn: torch.Tensor) -> torch.Tensor:
    """v^T A u for u = A^T v / (||A^T v|| + 1e-12), from tn = ||A^T v||: the reference's
    estimate without the extra product (same value, same gradient)."""
    return tn * tn / (tn + NORM_EPS)


def _check_estimate(estimate):
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")


def _frozen_loop(body, state, n_iter: int, per_sample: bool = False):
    """Run ``body`` exactly ``n_iter`` times without reading any tensor on the host, with
    the values of a loop that stops early. ``body(state) -> (new_state, stop)``; the first
    call gets ``state`` and every new_state is a tuple of tensors, the stop flag a 0-dim
    bool tensor (or [batch] with ``per_sample``, each sample freezing on its own, its
    tensors' first axis the batch). After the call that raises the flag, every later
    call's results are discarded by torch.where, so the returned state equals that of the
    ``break`` after the same call (the values bitwise; gradients route only through the
    kept iterations, the discarded ones add exact zeros). Returns (state, iterations run
    [batch] or 0-dim long)."""
    stopped, iters = None, None
    for _ in range(n_iter):
        new, stop = body(state)
        if stopped is None:
            state, stopped = new, stop
            iters = torch.ones_like(stop, dtype=torch.long)
            continue
        state = tuple(torch.where(_bcast(stopped, n) if per_sample and n.dim() > 1 else stopped,
                                  o, n) for o, n in zip(state, new))
        iters = iters + (~stopped).long()
        stopped = stopped | stop
    return state, iters


def global_vector_shape(layer: nn.Module, in_shape) -> tuple:
    """Shape (no batch axis) of the persistent global power-iteration vector of ``layer``
    whose per-sample input shape is ``in_shape``: the reference iterates a convolution in
    its input space and a linear layer in its OUTPUT space (u in R^out, v = W^T u / ||.||,
    u = W v / ||.||), so a linear layer's vector is [out_features]."""
    if isinstance(layer, nn.Linear):
        return (layer.out_features,)
    return tuple(in_shape)


def _global_ops(layer: nn.Module, shape):
    """(first, second) products of one global power iteration on a vector [1, *shape]:
    conv: W then W^T (input space); linear: W^T then W (output space, as the reference)."""
    if isinstance(layer, nn.Linear):
        w = layer.weight
        if tuple(shape) != (w.shape[0],):
            raise ValueError(f"a linear layer's global vector is [1, {w.shape[0]}] (its output "
                             f"space, as the reference's), got [1, {', '.join(map(str, shape))}]")
        return (lambda u: u @ w), (lambda v: v @ w.t())
    return (lambda u: apply_W(layer, u)), (lambda v: apply_WT(layer, v, shape))


def global_power_iteration(layer: nn.Module, u: torch.Tensor, n_iter: int,
                           tol: float = GLOBAL_TOL, estimate: str = 'bilinear',
                           sync_free: bool = False):
    """Spectral norm ||W||_2 of the whole operator of ``layer`` (conv or linear).

    u: persistent vector [1, *global_vector_shape(layer, in_shape)] (a conv's input space,
    a linear layer's output space, as the reference), warm-started across calls (detached
    here). Each iteration, with (F, G) = (W, W^T) for a conv and (W^T, W) for a linear
    layer: v = normalize(F u); u = normalize(G v); stop after ``n_iter`` or when
    ||u_new - u|| < tol. The estimate is the bilinear v^T F^T u (= ||G v||) with the last v
    and u, differentiable in W through every iteration of this call (the reference's global
    norm); ``estimate='forward'`` returns ||F u|| instead (one more product).
    ``sync_free``: the same values without a host synchronisation (see _frozen_loop).
    Returns (sigma: scalar tensor, u: updated detached vector of u's shape,
    converged: 0-dim bool tensor, the last change was below tol).
    """
    _check_estimate(estimate)
    if n_iter < 1:
        raise ValueError(f"the global power iteration needs n_iter >= 1, got {n_iter}")
    first, second = _global_ops(layer, u.shape[1:])

    def step(x):
        z = first(x)
        return _unit_and_ratio(z, second(z))[:2]

    u = u.detach()
    if sync_free:
        def body(state):
            new, tn = step(state[0])
            with torch.no_grad():
                change = _norm(new - state[0]).max()
            return (new, tn, change), change < tol
        (u, tn, change), _ = _frozen_loop(body, (u,), n_iter)
    else:
        for k in range(n_iter):
            new, tn = step(u)
            with torch.no_grad():
                change = _norm(new - u).max()
            u = new
            if progress.watched():      # no string built per iteration otherwise
                progress.stage(f"global power iteration on {type(layer).__name__}", k + 1,
                               n_iter)
            if change.item() < tol:
                break
    sigma = _bilinear(tn)[0] if estimate == 'bilinear' else _norm(first(u))[0]
    return sigma, u.detach(), change < tol


@dataclass
class PowerIterationResult:
    sigma: torch.Tensor      # [batch] estimate of ||D_out W D_in||_2 (from below)
    u: torch.Tensor          # [batch, *in_shape] final unit vectors, detached
    iters: torch.Tensor      # [batch] iterations run for each sample (int)
    converged: torch.Tensor  # [batch] bool, last change < tol


@dataclass(frozen=True)
class PowerOptions:
    """How ``masked_power_iteration`` iterates; the defaults are certification's."""
    tol: float = TOL                # stop when the vector's change ||u_new - u|| < tol
    grad_through: bool = True       # with gradient: differentiate every iteration (training)
    per_sample_stop: bool = True    # without it: each sample stops at its own convergence
    estimate: str = 'bilinear'      # 'bilinear' v^T A u (the reference's) or 'forward' ||A u||
    sync_free: bool = False         # exactly n_iter iterations, the stop applied on the device


@dataclass
class _Iterated:
    """Where a power iteration loop ended: u [batch, *in_shape], tn = ||A^T v|| [batch] of
    the last iteration (None without iterations), v [batch, *out_shape] the last unit
    v (kept only for --pi_grad last), iters [batch] long and converged [batch] bool."""
    u: torch.Tensor
    tn: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    iters: torch.Tensor
    converged: torch.Tensor


def masked_power_iteration(layer: nn.Module, u: torch.Tensor, n_iter: int,
                           d_in: Optional[torch.Tensor] = None,
                           d_out: Optional[torch.Tensor] = None,
                           opts: PowerOptions = PowerOptions()) -> PowerIterationResult:
    """Per-sample spectral norm of A = D_out W D_in by power iteration (conv or linear).

    u:     [batch, *in_shape] starting vectors (stored from earlier epochs or random).
    d_in:  [batch, *in_shape] 0/1 indicator of the varying inputs, or None (all vary).
    d_out: [batch, *out_shape] 0/1 indicator of the varying outputs, or None.

    Each iteration (the reference's): u <- D_in u; v = normalize(D_out W u);
    u = normalize(D_in W^T v), its change measured against u as it was before the mask (as
    the reference: a stored vector's mass where the mask is now 0 counts); the estimate is
    the bilinear v^T A u = ||A^T v|| with the last v and u (``estimate='forward'``: ||A u||,
    opt-in, one more product, a slightly larger value). With gradient enabled and
    ``grad_through`` (faithful training) the whole batch iterates together, differentiating
    through every iteration, and stops when the largest per-sample change ||u_new - u||
    drops below ``tol``. Otherwise (certification, or --pi_grad last) the iterations run
    without gradient, each sample stopping as soon as its own vector has converged; only
    the estimate from the last iterate is differentiated. ``per_sample_stop=False`` keeps
    the whole-batch loop there too. A start vector that the mask zeroes entirely restarts
    from D_in (no random draw). ``sync_free``: exactly ``n_iter`` iterations, those after
    the stop discarded on the device (same values, no host synchronisation: for CUDA graphs
    and torch.compile); the per-sample stop then freezes each sample instead of shrinking
    the batch.
    """
    _check_estimate(opts.estimate)
    start = u.detach()      # the reference measures the first change against the unmasked start
    u = _live_start(start, d_in)
    in_shape = u.shape[1:]
    differentiate_all = torch.is_grad_enabled() and opts.grad_through
    keep_v = torch.is_grad_enabled() and not differentiate_all     # --pi_grad last
    whole = differentiate_all or not opts.per_sample_stop
    name = f"power iteration on {type(layer).__name__}"

    def step(x, di, do):
        return _power_step(layer, x, in_shape, di, do)

    with contextlib.nullcontext() if differentiate_all else torch.no_grad():
        if opts.sync_free and n_iter > 0:
            it = _sync_free_loop(step, u, start, (d_in, d_out), n_iter, opts.tol, whole, keep_v)
        elif whole:
            it = _whole_batch_loop(step, u, start, (d_in, d_out), n_iter, opts.tol, keep_v, name)
        else:
            it = _per_sample_loop(step, u, start, (d_in, d_out), n_iter, opts.tol, keep_v, name)
    sigma = _masked_estimate(layer, it, d_out, opts.estimate, differentiate_all)
    return PowerIterationResult(sigma, it.u.detach(), it.iters, it.converged)


def _live_start(u: torch.Tensor, d_in) -> torch.Tensor:
    """D_in u [batch, *in_shape]; a vector the mask zeroes (a stored vector killed by a new
    mask) would never recover: it restarts from the mask itself (all ones without a mask),
    without a host synchronisation."""
    if d_in is not None:
        u = u * d_in
    dead = _bcast(torch.linalg.vector_norm(u.flatten(1), dim=1) <= NORM_FLOOR, u)
    return torch.where(dead, torch.ones_like(u) if d_in is None else d_in, u)


def _masked_estimate(layer, it: _Iterated, d_out, estimate: str, differentiate_all: bool):
    """sigma [batch] from the loop's end: the bilinear ||A^T v|| (differentiated through
    every iteration, or without gradient), ||D_out W u|| (``'forward'``, or no iteration
    ran), or v^T D_out W u with v and u detached (--pi_grad last: gradient through W only)."""
    def op(x):
        z = apply_W(layer, x)
        return z if d_out is None else z * d_out
    if estimate == 'forward' or it.tn is None:
        return _norm(op(it.u))
    if differentiate_all or not torch.is_grad_enabled():
        return _bilinear(it.tn)
    return (it.v.detach() * op(it.u.detach())).flatten(1).sum(1)


def _sync_free_loop(step, u, start, masks, n_iter, tol, whole, keep_v) -> _Iterated:
    """Exactly ``n_iter`` iterations (n_iter >= 1) through ``_frozen_loop``: the whole batch
    stops together (``whole``) or each sample freezes at its own convergence."""
    d_in, d_out = masks
    calls = [0]

    def body(state):
        new, tn, z, zn = step(state[0], d_in, d_out)
        with torch.no_grad():
            change = _norm(new - (start if calls[0] == 0 else state[0]))
        calls[0] += 1
        return (new, tn, z, zn, change), (change.max() < tol if whole else change < tol)
    (u, tn, z, zn, change), iters = _frozen_loop(body, (u,), n_iter, per_sample=not whole)
    iters = iters.expand(u.shape[0]).clone() if whole else iters
    return _Iterated(u, tn, z / _bcast(zn, z) if keep_v else None, iters, change < tol)


def _whole_batch_loop(step, u, start, masks, n_iter, tol, keep_v, name) -> _Iterated:
    """The batch iterates together until its largest change drops below ``tol`` (one host
    synchronisation per iteration: a device-side stop flag was measured slower on an H100,
    its extra select operations cost more CPU dispatch time than the syncs, see README)."""
    d_in, d_out = masks
    iters = torch.zeros(u.shape[0], dtype=torch.long, device=u.device)
    converged = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    tn = v = None
    prev = start
    for k in range(n_iter):
        u, tn, z, zn = step(u, d_in, d_out)
        with torch.no_grad():
            change = _norm(u - prev)
        prev = u
        iters += 1
        if progress.watched():      # (training runs this loop every step)
            progress.stage(name, k + 1, n_iter)
        if change.max().item() < tol:
            break
    if n_iter > 0:
        converged = change < tol
        v = z / _bcast(zn, z) if keep_v else None
    return _Iterated(u, tn, v, iters, converged)


def _per_sample_loop(step, u, start, masks, n_iter, tol, keep_v, name) -> _Iterated:
    """Each sample stops at its own convergence; only the samples still active are computed
    (no gradient). The first change is measured against ``start``."""
    d_in, d_out = masks
    first = start                   # every sample is active in the first round
    u = u.clone()
    tn = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    v = None
    iters = torch.zeros(u.shape[0], dtype=torch.long, device=u.device)
    converged = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    active = torch.arange(u.shape[0], device=u.device)
    for k in range(n_iter):
        di = None if d_in is None else d_in[active]
        do = None if d_out is None else d_out[active]
        ua = u[active]
        new, tna, za, zna = step(ua, di, do)
        if keep_v and v is None:
            v = torch.zeros((u.shape[0], *za.shape[1:]), dtype=u.dtype, device=u.device)
        done = _norm(new - (ua if first is None else first)) < tol
        first = None
        u[active], tn[active] = new, tna
        if keep_v:
            v[active] = za / _bcast(zna, za)
        iters[active] += 1
        converged[active[done]] = True
        active = active[~done]
        if progress.watched():
            progress.stage(name, k + 1, n_iter,
                           f"{active.numel()} of {u.shape[0]} points iterating")
        if active.numel() == 0:
            break
    return _Iterated(u, tn if n_iter > 0 else None, v, iters, converged)


# ----------------------------------------------------------------------------------------
# Worst-case logits of the last layer
# ----------------------------------------------------------------------------------------
def _bcp(w: torch.Tensor, r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
         opt_iter: int, reference_nan: bool = False, sync_free: bool = False) -> torch.Tensor:
    """max_d w^T d s.t. ||d||_2 <= r, lo <= d <= hi, for every row of w [batch, ..., hidden];
    r [batch, 1, ...] and lo, hi broadcastable to w. Returns [batch, ...].

    Each round clips the coordinates that leave the box to the box face and rescales the
    free ones so that ||d|| = r again. After any number of rounds the value is that of a
    relaxation (box only on the clipped coordinates), so it is an upper bound of the exact
    maximum: sound for every ``opt_iter``. Where every coordinate ends on a box face (or
    w = 0), the reference's rescaling divides 0 by 0 and gives NaN, which its training loss
    replaces by 0: ``reference_nan=True`` returns 0 there (training, faithful); otherwise
    the value at that box corner, a sound upper bound (certification).
    ``sync_free``: all ``opt_iter`` rounds, those after the stop (no coordinate of the
    batch left the box) discarded on the device: the same values, no host synchronisation.
    """
    r2 = r.pow(2)
    wn_raw = w.pow(2).sum(-1)
    nan_like = wn_raw == 0
    d = w * (r / wn_raw.clamp_min(NORM_FLOOR * NORM_FLOOR).sqrt()).unsqueeze(-1)
    fixed = torch.zeros_like(w, dtype=torch.bool)
    done = torch.zeros((), dtype=torch.bool, device=w.device) if sync_free else None
    for k in range(opt_iter):
        leave = ((d > hi) | (d < lo)) & ~fixed
        if sync_free:
            done = done | ~leave.any()
            d_old, nan_old = d, nan_like
        elif not leave.any():
            break
        else:
            progress.stage("worst-case-logit rounds", k + 1, opt_iter)
        fixed = fixed | leave
        d_fixed = torch.where(fixed, torch.maximum(torch.minimum(d, hi), lo), torch.zeros_like(d))
        rem_raw = r2 - d_fixed.pow(2).sum(-1)
        rem = rem_raw.clamp_min(NORM_FLOOR * NORM_FLOOR)          # budget left for free coords
        w_free = torch.where(fixed, torch.zeros_like(w), w)
        free_raw = w_free.pow(2).sum(-1)
        if reference_nan:
            nan_like = nan_like | (free_raw == 0) | (rem_raw < 0)
        d = d_fixed + w_free * (rem.sqrt() / free_raw.clamp_min(NORM_FLOOR * NORM_FLOOR).sqrt()).unsqueeze(-1)
        if sync_free:       # once done, leave is empty: fixed is unchanged without a select
            d = torch.where(done, d_old, d)
            nan_like = torch.where(done, nan_old, nan_like)
    a = (w * d).sum(-1)
    return torch.where(nan_like, torch.zeros_like(a), a) if reference_nan else a


class _TakeRows(torch.autograd.Function):
    """weight[y] whose backward is a matrix product, one_hot(y)^T g, instead of autograd's
    accumulating index_put_: on the CPU that kernel adds repeated labels' rows from several
    threads in a varying order, so two runs of one seed drifted apart by float rounding
    (docs/training.md, "Reproducibility"). The values are those of weight[y]."""

    @staticmethod
    def forward(ctx, weight, y):
        ctx.save_for_backward(y)
        ctx.rows = weight.shape[0]
        return weight[y]

    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors
        onehot = F.one_hot(y, ctx.rows).to(g.dtype)                 # [batch, classes]
        return onehot.t() @ g, None


def take_rows(weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """weight[y] ([classes, hidden] -> [batch, hidden]) with a run-to-run reproducible
    gradient (see _TakeRows)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _TakeRows.apply(weight, y)
    return weight[y]


def worst_case_margins(weight: torch.Tensor, y: torch.Tensor, r: torch.Tensor,
                       lo: torch.Tensor, hi: torch.Tensor, opt_iter: int,
                       reference_nan: bool = False, sync_free: bool = False) -> torch.Tensor:
    """a_iy = max_d (w_i - w_y)^T d  s.t. ||d||_2 <= r, lo <= d <= hi  (BCP algorithm).

    weight: [classes, hidden] last-layer weight; y: [batch] labels; r: [batch] radii;
    lo, hi: [batch, hidden] box around 0 (lo <= 0 <= hi) of the penultimate activations
    shifted by their centre. Only the true-class column is computed, so memory is
    O(batch x classes x hidden). Returns a: [batch, classes], with a[b, y_b] = 0.
    """
    w = weight.unsqueeze(0) - take_rows(weight, y).unsqueeze(1)  # [batch, classes, hidden]
    return _bcp(w, r.view(-1, 1), lo.unsqueeze(1), hi.unsqueeze(1), opt_iter, reference_nan,
                sync_free)


def worst_case_margins_all_pairs(weight, r, lo, hi, opt_iter):
    """a[b, i, j] for every pair of classes, as the reference computes it: memory
    O(batch x classes^2 x hidden). For tests and the memory benchmark."""
    b, (c, h) = r.shape[0], weight.shape
    w = (weight.unsqueeze(1) - weight.unsqueeze(0)).unsqueeze(0).expand(b, c, c, h)
    return _bcp(w, r.view(-1, 1, 1), lo.view(b, 1, 1, h), hi.view(b, 1, 1, h), opt_iter)


# ----------------------------------------------------------------------------------------
# The bound
# ----------------------------------------------------------------------------------------
@dataclass
class BoundResult:
    logits: torch.Tensor                 # [batch, classes] clean logits
    worst: torch.Tensor                  # [batch, classes] a_iy (0 at the true class)
    r_local: torch.Tensor                # [batch] eps * prod sigma_i (penultimate ball)
    r_global: torch.Tensor               # [batch] eps * prod ||W_i||_2
    sigmas: Dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [batch]
    masks: Dict[int, torch.Tensor] = field(default_factory=dict)    # act layer -> [batch, ...]
    pre_boxes: Dict[int, tuple] = field(default_factory=dict)       # act layer -> (lb, ub)
    post_boxes: Dict[int, tuple] = field(default_factory=dict)      # MaxMin layer -> box after
    iters: Dict[int, torch.Tensor] = field(default_factory=dict)    # layer -> [batch]
    converged: Optional[torch.Tensor] = None                         # [batch] bool, all layers
    global_converged: object = True      # 0-dim bool tensor: every global iteration converged
    worst_global: Optional[torch.Tensor] = None   # [batch, classes] a_iy with r_global
    box: Optional[tuple] = None          # (lo, hi) [batch, hidden]: penultimate box - centre
    terms: list = field(default_factory=list)   # the Lipschitz bound's terms (lipschitz_of)

    def lipschitz(self, norms: Dict[int, torch.Tensor], rows=None) -> torch.Tensor:
        """The local Lipschitz bound [batch] (or [len(rows)]) that per-layer norms
        {key: [batch]} give through this result's terms (its blocks and identity overlaps):
        their product for a chain of layers."""
        some = next(iter(norms.values()))
        return lipschitz_of(self.terms, norms, torch.ones_like(some), rows, log=False)

    def worst_logits(self, y: torch.Tensor, worst: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z_i = logit_i + a_iy (i != y), z_y = logit_y.  [batch, classes]"""
        return self.logits + (self.worst if worst is None else worst)

    def margin(self, y: torch.Tensor, worst: Optional[torch.Tensor] = None) -> torch.Tensor:
        """min_{i != y} (logit_y - logit_i - a_iy); > 0 means certified. [batch]; NaN stays NaN."""
        z = self.worst_logits(y, worst)
        zy = z.gather(1, y.view(-1, 1))
        gap = zy - z
        gap = gap.scatter(1, y.view(-1, 1), float('inf'))
        return gap.min(1).values.masked_fill(~torch.isfinite(z).all(1), float('nan'))

    def certified(self, y: torch.Tensor, worst: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[batch] bool: correct AND every worst-case logit below the true one. NaN -> False.
        ``worst``: other worst-case margins (e.g. ``worst_global``) instead of ``self.worst``."""
        m = self.margin(y, worst)
        return (m > 0) & torch.isfinite(m) & (self.logits.argmax(1) == y)


def _varying(act: nn.Module, lb: torch.Tensor, ub: torch.Tensor,
             lb_out: torch.Tensor, ub_out: torch.Tensor) -> torch.Tensor:
    """0/1 indicator of neurons that can vary inside the ball (the paper's I_V)."""
    if isinstance(act, ReLU_x):
        stuck = (lb > act.threshold) | (ub <= 0)
    elif isinstance(act, nn.ReLU):
        stuck = ub <= 0
    else:   # ClampGroupSort: from the box after the activation
        h = lb_out.shape[1] // 2
        stuck = torch.cat([lb_out[:, :h] >= act.max, ub_out[:, h:] <= act.min], dim=1)
    return (~stuck).to(lb.dtype)


def _check_box(lb, ub, where):
    gap = (lb - ub).max().item()
    if gap > 1e-4 * (1.0 + ub.abs().max().item()):
        raise BoundError(f"{where}: lower bound exceeds upper bound by {gap:.3g}")
    if not (torch.isfinite(lb).all() and torch.isfinite(ub).all()):
        n = (~torch.isfinite(lb)).sum().item() + (~torch.isfinite(ub)).sum().item()
        raise BoundError(f"{where}: {n} non-finite box entries")


@dataclass(frozen=True)
class BoundOptions:
    """The switches of ``compute_bound``; the defaults are certification's (the reference's
    test counts). The public entry points with their own defaults are in ``locallip``."""
    sniter: int = TEST_SNITER       # per-sample power iterations (and the global ones)
    opt_iter: int = TEST_OPT_ITER   # rounds of the worst-case-logit algorithm
    bound: str = 'local'            # 'local' (indicators from the boxes) or 'global' (all 1)
    tol: float = TOL                # per-sample stop: largest change of the vector below this
    check: bool = False             # verify lb <= ub and finiteness after every layer
    pi_grad: str = 'all'            # 'all': gradients through every power iteration
    #                                 (faithful); 'last': only through the final product
    per_sample_stop: bool = True    # without gradient, each sample stops at its own
    #                                 convergence (False: the batch waits for its slowest)
    also_global: bool = False       # also ``worst_global`` (margins at r_global, same box)
    estimate: str = 'bilinear'      # 'bilinear' (v^T A u, the reference's) or 'forward'
    global_tol: float = GLOBAL_TOL  # tolerance of the global iterations
    reference_nan: bool = False     # training: NaN worst-case margins become 0 (reference)
    sync_free: bool = False         # full loop counts, stops applied on the device (no host
    #                                 synchronisation: CUDA graphs / torch.compile)

    def __post_init__(self):
        if self.sync_free and self.check:
            raise ValueError("check=True reads every box on the host: not with sync_free")
        if self.pi_grad not in ('all', 'last'):
            raise ValueError(f"pi_grad must be 'all' or 'last', got {self.pi_grad!r}")
        if self.bound not in ('local', 'global'):
            raise ValueError(f"bound must be 'local' or 'global', got {self.bound!r}")

    @property
    def power(self) -> PowerOptions:
        """The per-sample power iteration's options."""
        return PowerOptions(self.tol, grad_through=(self.pi_grad == 'all'),
                            per_sample_stop=self.per_sample_stop, estimate=self.estimate,
                            sync_free=self.sync_free)


def _checked_inputs(x, y, eps, sync_free: bool) -> torch.Tensor:
    """``eps`` as [batch] radii in x's dtype, after checking x [batch, ...] and y [batch]."""
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [batch, *input_shape] (with a batch axis), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    b = x.shape[0]
    if not torch.is_tensor(y) or tuple(y.shape) != (b,):
        raise ValueError(f"y must be a tensor of {b} labels [batch], got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    if isinstance(eps, (int, float)):        # a number: checked without a device sync
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got min {eps}")
        return torch.full((b,), float(eps), dtype=x.dtype, device=x.device)
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps = eps.expand(b) if eps.dim() == 0 else eps
    if not sync_free and (eps < 0).any():
        raise ValueError(f"eps must be >= 0, got min {eps.min().item()}")
    return eps


@dataclass
class Sum:
    """A residual block's factor in the Lipschitz bound: the product of its branch's terms
    plus that of its shortcut's (``overlap``: for the identity shortcut, ||D_out D_in||_2
    per sample [batch], 1 where an input and an output indicator share a varying neuron,
    else 0; None when the shortcut has layers)."""
    branch: list
    shortcut: list
    overlap: Optional[torch.Tensor] = None


def lipschitz_of(terms: list, norms: Dict[int, torch.Tensor], start: torch.Tensor,
                 rows: Optional[torch.Tensor] = None, log: bool = True) -> torch.Tensor:
    """The Lipschitz bound of a chain: the product of its terms (a layer key: its norm
    ``norms[key]`` [batch]; a ``Sum``: branch + shortcut), as a log (``log=True``, from
    ``start`` = zeros) or a value (from ``start`` = ones). ``rows``: the samples of the
    norms among those the identity overlaps were recorded for. [batch]"""
    total = start
    for t in terms:
        if isinstance(t, Sum):
            b = lipschitz_of(t.branch, norms, start, rows, log)
            if t.overlap is None:
                o = lipschitz_of(t.shortcut, norms, start, rows, log)
            else:
                o = t.overlap if rows is None else t.overlap[rows]
                o = torch.log(o.clamp_min(FLOOR)).to(b) if log else o.to(b)
            f = torch.logaddexp(b, o) if log else b + o
        else:
            n = norms[t]
            f = torch.log(n.clamp_min(FLOOR)) if log else n
        total = total + f if log else total * f
    return total


def structure_terms(model: nn.Module) -> list:
    """The Lipschitz terms of the network up to its penultimate layer without indicators
    (every neuron varying: the identity overlaps are 1), for global bounds."""
    last = check_supported(model)[-1]

    def chain(mods, key):
        terms = []
        for m in mods:
            if isinstance(m, nn.Sequential):
                sub, key = chain(_mods(m), key)
                terms += sub
            elif isinstance(m, Residual):
                branch, short = _arms(m)
                tb, key = chain(branch, key)
                ts, key = chain(short, key)
                one = None if m.shortcut is not None else torch.ones(1)
                terms.append(Sum(tb, ts, one))
            else:
                if isinstance(m, AFFINE) and key != last:
                    terms.append(key)
                key += 1
        return terms, key
    return chain(_mods(sequential_view(model)), 0)[0]


def _overlap(d_in, d_out, like: torch.Tensor) -> torch.Tensor:
    """||D_out D_in||_2 per sample [batch]: 1 if some neuron varies in both, else 0."""
    if d_in is None and d_out is None:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    d = d_in if d_out is None else d_out if d_in is None else d_in * d_out
    return d.flatten(1).amax(1)


@dataclass
class _Arm:
    """The state at the end of one arm of a residual block (see _Walk)."""
    mu: torch.Tensor
    lb: torch.Tensor
    ub: torch.Tensor
    r: torch.Tensor
    r_global: torch.Tensor
    terms: list
    pending: list


@dataclass
class _PendingBlock:
    """A residual block whose output indicator is not known yet."""
    branch: _Arm
    shortcut: Optional[_Arm]      # None: the identity
    d_in: Optional[torch.Tensor]  # the indicator feeding the block


class _Walk:
    """One propagation of the bound through the layers of ``model`` (compute_bound): the
    ball (centre ``mu`` [batch, *shape], radius ``r`` [batch]), the box [lb, ub], the
    indicator feeding the next affine layer, the terms of the Lipschitz bound so far, and
    the affine layers and blocks whose output indicator (D_out) is not known yet. One
    method per kind of layer and one for a residual block; ``result`` ends the walk."""

    def __init__(self, model, last: int, x, eps, vectors, global_vectors, opts: BoundOptions,
                 global_sigmas=None, local_norms=None):
        self.model, self.last, self.opts, self.b = model, last, opts, x.shape[0]
        self.terms = []           # keys and Sums of the finished factors, in order
        self.vectors, self.global_vectors = vectors, global_vectors
        self.global_sigmas, self.local_norms = global_sigmas, local_norms
        self.eps, self.mu, self.r, self.r_global = eps, x, eps, eps
        self.lb, self.ub = x - _bcast(eps, x), x + _bcast(eps, x)
        self.res = BoundResult(logits=None, worst=None, r_local=eps, r_global=eps)
        self.mask = None          # indicator of the activation feeding the next affine layer
        self.pending = []         # (key, layer, d_in, in_shape) / _PendingBlock awaiting d_out
        self.converged = torch.ones(self.b, dtype=torch.bool, device=x.device)

    def walk(self, mods: list, key: int) -> int:
        """Propagate through the chain ``mods`` whose first layer has key ``key``, up to
        the logit layer; returns the key after the chain."""
        for m in mods:
            if key == self.last:           # the logit layer: the worst-case margins instead
                break
            if isinstance(m, nn.Sequential):
                key = self.walk(_mods(m), key)
                continue
            if isinstance(m, Residual):
                key = self.block(m, key)
                where = f"residual block ending before layer {key}"
            else:
                if isinstance(m, FLATTEN):
                    self.flatten()
                elif isinstance(m, AFFINE):
                    self.affine(key, m)
                elif isinstance(m, ACTIVATIONS):
                    self.activation(key, m)
                where, key = f"layer {key} ({type(m).__name__})", key + 1
            if self.opts.check:
                _check_box(self.lb, self.ub, where)
        return key

    def block(self, blk: Residual, key: int) -> int:
        """y = shortcut(x) + branch(x): each arm walked from the block's input; the box is
        the sum of the arms' boxes within the ball of radius r_branch + r_shortcut; the
        Lipschitz factor, branch + shortcut, waits for the indicator after the block."""
        self._finish_pending(None)
        start = (self.mu, self.lb, self.ub, self.r, self.r_global)
        d_in, outer = self.mask, self.terms
        arms = []
        for mods in _arms(blk):
            self.mu, self.lb, self.ub, self.r, self.r_global = start
            self.mask, self.terms, self.pending = d_in, [], []
            key = self.walk(mods, key)
            arms.append(_Arm(self.mu, self.lb, self.ub, self.r, self.r_global, self.terms,
                             self.pending))
        b, s = arms
        self.mu, self.r, self.r_global = b.mu + s.mu, b.r + s.r, b.r_global + s.r_global
        rr = _bcast(self.r, self.mu)
        self.lb = box_max(b.lb + s.lb, self.mu - rr)
        self.ub = box_min(b.ub + s.ub, self.mu + rr)
        self.mask, self.terms = None, outer
        self.pending = [_PendingBlock(b, None if blk.shortcut is None else s, d_in)]
        return key

    def flatten(self):
        self.mu, self.lb, self.ub = self.mu.flatten(1), self.lb.flatten(1), self.ub.flatten(1)
        if self.mask is not None:
            self.mask = self.mask.flatten(1)

    def affine(self, i: int, m: nn.Module):
        """Box by interval arithmetic intersected with the ball's box; ball through ||W||_2."""
        self._finish_pending(None)     # the previous affine layer had no activation of its own
        in_shape = tuple(self.mu.shape[1:])
        sigma_g = self._global_norm(i, m, in_shape)
        centre, half = (self.lb + self.ub) / 2, (self.ub - self.lb) / 2
        both = m(torch.cat([self.mu, centre], 0))      # the network's own forward, once
        self.mu, centre = both[:self.b], both[self.b:]
        half = apply_absW(m, half)
        ball = _bcast(self.r, self.mu) * row_norms(m, in_shape).to(self.mu)
        self.lb = box_max(centre - half, self.mu - ball)
        self.ub = box_min(centre + half, self.mu + ball)
        self.r = self.r * sigma_g
        self.r_global = self.r_global * sigma_g.detach()
        d_in = None if self.opts.bound == 'global' else self.mask
        self.pending = [(i, m, d_in, in_shape)]
        self.mask = None

    def activation(self, i: int, m: nn.Module):
        """Box through the monotone activation, intersected with the ball's image; the
        varying-neuron indicator D; the pending layer's norm with D as its D_out (ReLU
        types; MaxMin's indicator is used on the input side only)."""
        rr = _bcast(self.r, self.mu)
        if isinstance(m, ClampGroupSort):
            out = m(torch.cat([self.lb, self.ub, self.mu - rr, self.mu + rr, self.mu], 0))
            g_lb, g_ub, g_lo, g_hi, mu_out = out.split(self.b)
            lb_out, ub_out = torch.maximum(g_lb, g_lo), torch.minimum(g_ub, g_hi)
            self.res.post_boxes[i] = (lb_out, ub_out)
        else:   # elementwise and monotone: max(g(a), g(b)) = g(max(a, b)), exactly
            g = F.relu if isinstance(m, nn.ReLU) else m     # never in place (mu is kept)
            lb_out = g(box_max(self.lb, self.mu - rr))
            ub_out = g(box_min(self.ub, self.mu + rr))
            mu_out = g(self.mu)
        with torch.no_grad():
            d = _varying(m, self.lb, self.ub, lb_out, ub_out)
        self.res.masks[i], self.res.pre_boxes[i] = d, (self.lb, self.ub)
        d_used = None if self.opts.bound == 'global' else d
        self._finish_pending(None if isinstance(m, ClampGroupSort) else d_used)
        self.mask = d_used
        self.mu, self.lb, self.ub = mu_out, lb_out, ub_out

    def _global_norm(self, i: int, m: nn.Module, in_shape) -> torch.Tensor:
        """||W_i||_2: given (upper bounds), or by warm-started global power iteration."""
        if self.global_sigmas is not None:
            return self.global_sigmas[i]
        gv, o = self.global_vectors, self.opts
        if i not in gv:
            gv[i] = torch.randn((1, *global_vector_shape(m, in_shape)), device=self.mu.device,
                                dtype=self.mu.dtype)
        sigma, gv[i], conv = global_power_iteration(m, gv[i], o.sniter, o.global_tol,
                                                    o.estimate, o.sync_free)
        self.res.global_converged = self.res.global_converged & conv
        return sigma

    def _finish_pending(self, d_out):
        """Every pending layer's and block's factor, with ``d_out`` as their D_out."""
        self.terms.extend(self._finish(self.pending, d_out))
        self.pending = []

    def _finish(self, pending: list, d_out) -> list:
        """The terms of ``pending``: a block's arms finished with the same d_out (the
        identity's overlap of d_in and d_out), a layer's norm (``_norm_of``)."""
        out = []
        for p in pending:
            if isinstance(p, _PendingBlock):
                branch = p.branch.terms + self._finish(p.branch.pending, d_out)
                if p.shortcut is None:
                    out.append(Sum(branch, [], _overlap(p.d_in, d_out, self.mu)))
                else:
                    short = p.shortcut.terms + self._finish(p.shortcut.pending, d_out)
                    out.append(Sum(branch, short))
            else:
                self._norm_of(*p, d_out)
                out.append(p[0])
        return out

    def _norm_of(self, i: int, layer: nn.Module, d_in, in_shape, d_out):
        """sigma_i = ||D_out W_i D_in||_2 per sample (given, or by power iteration)."""
        if self.local_norms is not None:
            sigma = self.local_norms(i, layer, d_in, d_out, in_shape)
        else:
            o = self.opts
            u0 = self.vectors.get(i, in_shape).to(self.mu.dtype)
            pi = masked_power_iteration(layer, u0, o.sniter, d_in, d_out, o.power)
            self.vectors.put(i, pi.u)
            sigma, self.res.iters[i] = pi.sigma, pi.iters
            self.converged = self.converged & pi.converged
        self.res.sigmas[i] = sigma

    def result(self, final: nn.Linear, y: torch.Tensor) -> BoundResult:
        """The logits, the radii and the worst-case margins of the last (logit) layer."""
        self._finish_pending(None)
        res, o, mu = self.res, self.opts, self.mu
        res.logits = final(mu)
        res.terms = self.terms
        log_lip = lipschitz_of(self.terms, res.sigmas,
                               torch.zeros(self.b, dtype=mu.dtype, device=mu.device))
        res.r_local = self.eps * torch.exp(log_lip)
        res.r_global = self.r_global
        res.converged = self.converged
        lo = torch.minimum(self.lb - mu, torch.zeros_like(mu))   # 0 stays inside the box
        hi = torch.maximum(self.ub - mu, torch.zeros_like(mu))
        res.box = (lo, hi)
        res.worst = worst_case_margins(final.weight, y, res.r_local, lo, hi, o.opt_iter,
                                       o.reference_nan, o.sync_free)
        if o.also_global:
            res.worst_global = worst_case_margins(final.weight, y, res.r_global, lo, hi,
                                                  o.opt_iter, False, o.sync_free)
        return res


def compute_bound(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps,
                  vectors=None, global_vectors: Optional[Dict[int, torch.Tensor]] = None,
                  options: Optional[BoundOptions] = None, *,
                  global_sigmas: Optional[Dict[int, torch.Tensor]] = None,
                  local_norms: Optional[Callable] = None, **switches) -> BoundResult:
    """Local-Lip bound of ``model`` on the L2 eps-balls around ``x``.

    x: [batch, *input_shape]; y: [batch] labels; eps: float or [batch] radii (L2).
    vectors: object with ``get(key, shape) -> [batch, *shape]`` and ``put(key, u)`` giving
      the per-sample power-iteration vectors, key = module index of the layer; None: fresh
      Gaussian vectors (``vectors.RandomVectors``).
    global_vectors: dict module index -> [1, *global_vector_shape(layer, in_shape)] (a
      linear layer's vector lives in its output space), updated in place (warm start);
      None: fresh ones, not kept.
    options: a BoundOptions, or its fields as keyword ``switches`` (compute_bound(...,
      sniter=5, check=True)); not both.
    global_sigmas: {affine index: 0-dim tensor} spectral norms to use instead of the global
      power iterations (``lanczos.GuaranteedNorms``: upper bounds); ``global_vectors`` is then
      not used.
    local_norms: ``f(i, layer, d_in, d_out, in_shape) -> [batch]`` per-sample norms of
      D_out W D_in to use instead of the per-sample power iterations (``vectors`` unused).
    With ``sync_free`` a tensor ``eps`` is not checked for negative entries (the caller's
    job). Returns a BoundResult.
    """
    if options is not None and switches:
        raise TypeError("compute_bound: give options or keyword switches, not both")
    opts = options if options is not None else BoundOptions(**switches)
    affine = check_supported(model)
    eps = _checked_inputs(x, y, eps, opts.sync_free)
    if not opts.sync_free:
        check_view(model, x)
    view = sequential_view(model)
    vectors = RandomVectors(x.shape[0], x.device) if vectors is None else vectors
    walk = _Walk(view, affine[-1], x, eps, vectors, {} if global_vectors is None else global_vectors, opts,
                 global_sigmas, local_norms)
    walk.walk(_mods(view), 0)
    return walk.result(layer_list(view)[affine[-1]], y)


def robust_loss(res: BoundResult, y: torch.Tensor, gloro: bool = False) -> torch.Tensor:
    """Cross-entropy on the worst-case logits.

    BCP (default): CE([logit_i + a_iy for i != y, logit_y], y).
    GloRo (--gloro): CE over classes + 1 logits: the clean logits plus
    max_{i != y}(logit_i + a_iy) as an extra "bottom" class.
    """
    z = res.worst_logits(y)
    if not gloro:
        return F.cross_entropy(z, y)
    others = z.scatter(1, y.view(-1, 1), float('-inf'))
    extra = others.max(1, keepdim=True).values
    return F.cross_entropy(torch.cat([res.logits, extra], 1), y)


def certified_loss(res: BoundResult, y: torch.Tensor, kappa: float, gloro: bool = False,
                   sparsity: Optional[torch.Tensor] = None, sparse: float = 0.0):
    """Training objective (the reference's, docs/method.md).
    BCP: kappa * CE + (1 - kappa) * (robust + sparse * sparsity); GloRo: robust only (no
    sparsity term). ``sparsity``: sparsity_loss(...) or None.

    Returns (loss, clean CE, robust CE), scalars.
    """
    clean = F.cross_entropy(res.logits, y)
    rob = robust_loss(res, y, gloro)
    if gloro:
        return rob, clean, rob
    inner = rob if (sparsity is None or not sparse) else rob + sparse * sparsity
    return kappa * clean + (1 - kappa) * inner, clean, rob


def sparsity_loss(model: nn.Sequential, res: BoundResult, sp_thres: float) -> torch.Tensor:
    """Pushes the boxes out of the varying region (TinyImageNet, --sparse), as the reference.

    ReLU_x, from the box entering the activation: mean(relu(ub)) + sp_thres *
    mean(relu(threshold - lb)); ClampGroupSort, from the box after it (the one its indicator
    uses): mean(relu(max - lb_firsthalf)) + mean(relu(ub_secondhalf - min)); summed over
    activations.
    """
    total = 0.0
    layers = layer_list(model)
    for i, (lb, ub) in res.pre_boxes.items():
        m = layers[i]
        if isinstance(m, ReLU_x):
            total = total + F.relu(ub).mean() + sp_thres * F.relu(m.threshold - lb).mean()
        elif isinstance(m, ClampGroupSort):
            lb, ub = res.post_boxes[i]
            h = lb.shape[1] // 2
            total = total + F.relu(m.max - lb[:, :h]).mean() + F.relu(ub[:, h:] - m.min).mean()
    return total


# ----------------------------------------------------------------------------------------
# Shapes of the per-sample vectors (what a vector store holds per sample)
# ----------------------------------------------------------------------------------------
def layer_input_shapes(model: nn.Module, input_shape) -> Dict[int, tuple]:
    """Per-sample input shape of every affine layer except the last (the layers whose
    per-sample power-iteration vectors are stored), keyed by layer key (``layer_list``)."""
    last = check_supported(model)[-1]
    shapes = {}

    def run(mods, x, key):
        for m in mods:
            if isinstance(m, (nn.Sequential, Residual)):
                arms = [_mods(m)] if isinstance(m, nn.Sequential) else list(_arms(m))
                outs = []
                for arm in arms:
                    y, key = run(arm, x, key)
                    outs.append(y)
                x = outs[0] if isinstance(m, nn.Sequential) else outs[0] + outs[1]
                continue
            if isinstance(m, AFFINE) and key != last:
                shapes[key] = tuple(x.shape[1:])
            x, key = m(x), key + 1
        return x, key

    with torch.no_grad():
        p = next(model.parameters())
        run(_mods(sequential_view(model)), torch.zeros((1, *input_shape), device=p.device,
                                                       dtype=p.dtype), 0)
    return shapes
