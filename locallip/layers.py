"""The networks the bound reads: the layer types it accepts, their keys (``layer_list``: the
module index of a plain nn.Sequential), the check of a model (``check_supported``),
BatchNorm folded into affine layers (``fold_batchnorm``; in training by the batch's own
statistics, ``training_view``) and the input shapes of the layers whose per-sample vectors
are stored (``layer_input_shapes``). Everything dispatches on layer types, never on model
names; a model that is not an nn.Sequential of layers and residual blocks is read through
``tracing.sequential_view``."""
import copy
import weakref
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from locallip.errors import UnsupportedModel
from locallip.models import ClampGroupSort, Flatten, ReLU_x, Residual
from locallip.tracing import (ForwardRefusal, base_class, derived, relative_error, sequential_view,
                              view_output)

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


# ----------------------------------------------------------------------------------------
# Supported models; BatchNorm folded into affine layers
# ----------------------------------------------------------------------------------------
def modules_of(m: nn.Module) -> list:
    """The chain of modules ``m`` stands for: a Sequential's children, else ``m`` alone."""
    return list(m) if isinstance(m, nn.Sequential) else [m]


def chain(mods) -> Iterator[nn.Module]:
    """The modules of the chain ``mods`` in key order with every nested nn.Sequential opened:
    layers and Residual blocks. The one place the walks over a network (layer_list,
    layer_input_shapes, fold_batchnorm, bound.structure_terms, bound._Walk) open
    Sequentials; each handles a block's arms (``arms_of``) itself."""
    for m in mods:
        if isinstance(m, nn.Sequential):
            yield from chain(m)
        else:
            yield m


def arms_of(block: Residual):
    """(branch modules, shortcut modules) of a residual block; the identity has none."""
    return modules_of(block.branch), ([] if block.shortcut is None else modules_of(block.shortcut))


def layer_list(model: nn.Module) -> List[nn.Module]:
    """The layers of the network in key order: the key of a layer (the index in this list,
    which keys its vectors, norms and indicators) is its module index in a plain
    nn.Sequential; nested Sequentials are read in order, and a Residual block's layers
    follow one another, its branch's then its shortcut's."""
    out = []

    def walk(mods):
        for m in chain(mods):
            if isinstance(m, Residual):
                branch, short = arms_of(m)
                walk(branch)
                walk(short)
            else:
                out.append(m)
    walk(modules_of(sequential_view(model)))
    return out


def features(model: nn.Module) -> nn.Sequential:
    """The network up to its penultimate layer (the logit layer's input): the map whose
    local Lipschitz constant the bound bounds (``BoundResult.r_local`` / eps). Shares the
    model's layers."""
    check_supported(model)
    top = list(chain(sequential_view(model)))
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
        raise UnsupportedModel(f"{where}: fold it first with locallip.layers.fold_batchnorm(model) "
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
    if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
        raise UnsupportedModel(f"{where} flattens dims {m.start_dim}..{m.end_dim}; the bound "
                               f"reads flattening to [batch, features] (start_dim=1, end_dim=-1)")
    return isinstance(m, nn.Linear)


def check_supported(model: nn.Module) -> List[int]:
    """Validate ``model`` for the bound; return the keys (``layer_list`` indices; module
    indices of a plain nn.Sequential) of its affine layers (Conv2d, Linear, the average
    pools), the last of which is the logit layer.

    ``model``: an nn.Sequential of the supported layers and ``models.Residual`` blocks, or
    any module whose forward torch.fx reads as such (``tracing``). Raises UnsupportedModel
    (a ValueError) naming the first unsupported module or graph node, a Dropout in
    training mode, a BatchNorm (``fold_batchnorm`` turns it into affine layers at the
    same keys), or a forward hook / an attribute replaced on an instance
    (``tracing.check_forwards``).
    """
    try:
        view = sequential_view(model)
    except ForwardRefusal:
        raise
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{e}, of the layers {SUPPORTED}") from None
    names = {} if view is model else {id(m): n for n, m in model.named_modules() if n}
    affine = [i for i, m in enumerate(layer_list(view))
              if _check_layer(i, m, _layer_name(i, m, names))]
    _check_in_place(view)
    real = [m for m in chain(view) if not isinstance(m, NOOPS)]
    if not affine or not real or not isinstance(real[-1], nn.Linear):
        raise UnsupportedModel("the last module of the model (after any Identity / Dropout) "
                               "must be nn.Linear (the logit layer), outside any residual "
                               "block")
    return affine


def _first_leaf(mods: list) -> Optional[nn.Module]:
    return next(chain(mods), None)


def _check_in_place(view: nn.Module):
    """Refuse an in-place ReLU that starts an arm of a residual block: it would overwrite
    the block's input, which the other arm still reads (y = x + f(x) would not be computed)."""
    for blk in (m for m in view.modules() if isinstance(m, Residual)):
        for arm in arms_of(blk):
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
    reach the original parameters and the batch statistics). ``b`` is of ``a``'s torch.nn
    class (a parametrized layer's class, whose weight is a property, is left behind)."""
    cls = base_class(type(a))
    b = cls.__new__(cls)             # a shallow copy (copy.copy refuses a parametrized one)
    b.__dict__.update(a.__dict__)
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


def _bias_magnitude(bn: nn.Module, s: torch.Tensor, before: Optional[nn.Module]) -> torch.Tensor:
    """[channels] the magnitudes of every term of a folded layer's bias s b + (beta - mean s)
    (|s| |b| + |mean s| + |beta|): the scale of the rounding of the model that runs it unfolded
    (rounding.py)."""
    mag = (bn.running_mean * s).abs()
    if bn.bias is not None:
        mag = mag + bn.bias.abs()
    if before is not None and before.bias is not None:
        mag = mag + (before.bias * s).abs()
    return mag.detach()


def _fold_chain(mods: list, key: int, stats: Optional[dict] = None):
    """(folded modules, next key) of one chain (see fold_batchnorm); blocks recursively.
    ``stats``: {id(BatchNorm): (mean, var)} of a training batch (``training_view``): fold
    with them, differentiably, and drop Dropout; None: the running statistics."""
    out, prev = [], None       # prev: position in out of an affine layer not yet folded into
    for m in chain(mods):
        if isinstance(m, Residual):
            folded = []
            for arm in arms_of(m):
                f, key = _fold_chain(arm, key, stats)
                folded.append(nn.Sequential(*f))
            out.append(Residual(folded[0], folded[1] if m.shortcut is not None else None))
            prev = None
            continue
        if isinstance(m, BATCHNORM):
            s, t = _bn_scale_shift(m) if stats is None else _batch_scale_shift(m, *stats[id(m)])
            bn, before = m, None if prev is None else out[prev]
            if prev is not None:
                out[prev] = _fold_into(out[prev], m, s, t, f"layer {key}")
                folded, m = out[prev], nn.Identity()
            else:
                folded = m = _bn_as_layer(m, s, t)
            if stats is None:
                folded.bias_magnitude = _bias_magnitude(bn, s, before)
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
    folded = nn.Sequential(*_fold_chain(modules_of(sequential_view(model)), 0)[0])
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
    view = nn.Sequential(*_fold_chain(modules_of(source), 0, stats)[0])
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
# Shapes of the per-sample vectors (what a vector store holds per sample)
# ----------------------------------------------------------------------------------------
def layer_input_shapes(model: nn.Module, input_shape) -> Dict[int, tuple]:
    """Per-sample input shape of every affine layer except the last (the layers whose
    per-sample power-iteration vectors are stored), keyed by layer key (``layer_list``)."""
    last = check_supported(model)[-1]
    shapes = {}

    def run(mods, x, key):
        for m in chain(mods):
            if isinstance(m, Residual):
                outs = []
                for arm in arms_of(m):
                    y, key = run(arm, x, key)
                    outs.append(y)
                x = outs[0] + outs[1]
                continue
            if isinstance(m, AFFINE) and key != last:
                shapes[key] = tuple(x.shape[1:])
            x, key = m(x), key + 1
        return x, key

    with torch.no_grad():
        p = next(model.parameters())
        run(modules_of(sequential_view(model)), torch.zeros((1, *input_shape), device=p.device,
                                                       dtype=p.dtype), 0)
    return shapes
