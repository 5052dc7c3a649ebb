"""A network as the bound reads it: an ``nn.Sequential`` of layers and ``models.Residual``
blocks. A model of that form is read as it is; any other ``nn.Module`` (a user's class with
its own ``forward``, or such a module inside an ``nn.Sequential``) is traced with torch.fx
and its graph rewritten as that form, sharing the model's own layer objects (so gradients,
``state_dict`` keys and checkpoints stay the model's).

What a traced graph may contain: one input; calls of layers (the torch.nn ones and the
project's ``ReLU_x``, ``ClampGroupSort``, ``Flatten``, ``Residual``; whether the bound supports
a layer's type is ``networks.check_supported``'s question); ``relu``; flattening to
[batch, features] (``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(x.size(0), -1)``,
``x.reshape(n, -1)``, ``x.view(-1, features)``); ``F.avg_pool2d``, ``F.adaptive_avg_pool2d``;
additions ``a + b`` that merge the two arms of a fork (y = x + f(x), y = s(x) + f(x)); and a
final ``log_softmax`` over the class axis, which the view leaves out (it shifts every logit
of a point equally: margins, certificates and radii are the logits'; ``view_output`` puts
it back where the view's output is compared with the model's).
Anything else (a concatenation, a product of branches, a constant added, a value used by
three operations, data-dependent control flow) is refused with one line naming the graph
node. The rewritten network is compared with the model's own forward on the first input it
is used with (``check_view``).
"""
import operator
import weakref
from typing import List, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from errors import UnsupportedModel
from models import ClampGroupSort, Flatten, ReLU_x, Residual

PROJECT_LEAVES = (ReLU_x, ClampGroupSort, Flatten, Residual)
ADDS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ('add', 'add_')
RELUS = (F.relu, torch.relu)
LOG_SOFTMAXES = (F.log_softmax, torch.log_softmax)
SHAPE_QUERIES = ('size', 'dim')
VIEW_TOL = 1e-4      # relative difference allowed between the rewritten and the model's forward


def is_layer(m: nn.Module) -> bool:
    """A module the trace keeps whole: torch.nn's own layers (torch.fx's rule) and the
    project's; containers (nn.Sequential) and a user's modules are traced through."""
    if isinstance(m, nn.Sequential):
        return False
    return isinstance(m, PROJECT_LEAVES) or type(m).__module__.startswith(('torch.nn.',
                                                                          'torch.ao.nn.'))


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_layer(m)


def _refuse(model: nn.Module, node, why: str) -> UnsupportedModel:
    target = getattr(node.target, '__name__', node.target)
    return UnsupportedModel(
        f"{type(model).__name__}: graph node {node.name!r} ({node.op} {target}) {why}; the "
        f"bound reads chains of layers and residual additions y = x + f(x) or y = s(x) + f(x)")


def _is_shape_query(node) -> bool:
    """A node computing from a tensor's shape only (x.size(0), x.shape[0], x.dim())."""
    if node.op == 'call_method' and node.target in SHAPE_QUERIES:
        return True
    if node.op == 'call_function' and node.target is getattr:
        return node.args[1] == 'shape'
    return (node.op == 'call_function' and node.target is operator.getitem
            and isinstance(node.args[0], torch.fx.Node) and _is_shape_query(node.args[0]))


def _adds(node) -> bool:
    return ((node.op == 'call_function' and node.target in ADDS)
            or (node.op == 'call_method' and node.target in ADD_METHODS))


def _is_add(node) -> bool:
    """a + b, a += b, torch.add(a, b), a.add(b), a.add_(b): a sum of two values, unscaled."""
    return _adds(node) and not node.kwargs and len(node.args) == 2


def _size(mods) -> tuple:
    """(layers, parameters) of an arm: which of two arms is the shortcut."""
    return len(mods), sum(p.numel() for m in mods for p in m.parameters())


class _Reader:
    """Rewrites one traced graph as a list of layers and Residual blocks."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph):
        self.model, self.graph = model, graph

    def users(self, value) -> list:
        """The operations on ``value``'s data (shape queries feed only view arguments)."""
        return [u for u in value.users if not _is_shape_query(u)]

    def chain(self, value):
        """(layers, last value, end node) from ``value`` to the node that ends its chain: an
        addition (merging it with another arm) or the output."""
        mods = []
        while True:
            users = self.users(value)
            if len(users) == 1 and (users[0].op == 'output' or _is_add(users[0])):
                return mods, value, users[0]
            if len(users) == 1:
                mods.append(self.layer(users[0], value))
                value = users[0]
            elif len(users) == 2:
                block, value = self.fork(value, users)
                mods.append(block)
            elif not users:
                raise _refuse(self.model, value, "leads nowhere (its result is not used)")
            else:
                raise _refuse(self.model, value, f"is used by {len(users)} operations (a "
                                                 f"block has two arms)")

    def arm(self, fork, first):
        """(layers, last value, end node) of the arm of ``fork`` that starts at ``first``."""
        if _is_add(first):
            return [], fork, first
        mods, last, end = self.chain(first)
        return [self.layer(first, fork)] + mods, last, end

    def fork(self, value, users):
        """(Residual, the addition) of the two arms leaving ``value``."""
        (ma, va, ea), (mb, vb, eb) = (self.arm(value, u) for u in users)
        if ea is not eb or not _is_add(ea) or {id(a) for a in ea.args[:2]} != {id(va), id(vb)}:
            raise _refuse(self.model, value, "starts two arms that do not meet in one "
                                             "addition")
        if _size(ma) < _size(mb):   # the smaller arm is the shortcut (the identity if empty)
            ma, mb = mb, ma
        short = None if not mb else (mb[0] if len(mb) == 1 else nn.Sequential(*mb))
        return Residual(nn.Sequential(*ma), short), ea

    def layer(self, node, value) -> nn.Module:
        """The layer that ``node`` applies to ``value`` (its only tensor argument)."""
        if _is_add(node):
            raise _refuse(self.model, node, "adds values that are not the two arms of one fork")
        if _adds(node):
            raise _refuse(self.model, node, "adds with a scale (alpha) or an output argument")
        if node.op == 'call_module':
            layer = self.model.get_submodule(node.target)
        elif node.target in RELUS or (node.op == 'call_method' and node.target == 'relu'):
            layer = nn.ReLU()
        elif self.is_flatten(node):
            layer = nn.Flatten()
        elif node.target is F.avg_pool2d:
            layer = nn.AvgPool2d(*node.args[1:], **node.kwargs)
        elif node.target is F.adaptive_avg_pool2d:
            layer = nn.AdaptiveAvgPool2d(*node.args[1:], **node.kwargs)
        elif node.target in LOG_SOFTMAXES or (node.op == 'call_method'
                                               and node.target == 'log_softmax'):
            layer = nn.LogSoftmax(node.args[1] if len(node.args) > 1 else node.kwargs.get('dim'))
        else:
            raise _refuse(self.model, node, "is not a layer the bound reads")
        others = list(node.args[1:]) + list(node.kwargs.values())
        if node.args[:1] != (value,) or any(isinstance(a, torch.fx.Node)
                                             and not _is_shape_query(a) for a in others):
            raise _refuse(self.model, node, "takes more than one tensor")
        return layer

    @staticmethod
    def is_flatten(node) -> bool:
        args, name = node.args[1:], node.target
        if node.op == 'call_function' and node.target is torch.flatten:
            return tuple(args) == (1,) or node.kwargs == {'start_dim': 1}
        if node.op == 'call_method' and name == 'flatten':
            return tuple(args) == (1,) or node.kwargs == {'start_dim': 1}
        if node.op == 'call_method' and name in ('view', 'reshape'):
            # (n, -1) or (-1, features); check_view confirms the batch axis is kept
            shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            return len(shape) == 2 and (shape[1] == -1 or (shape[0] == -1
                                                             and isinstance(shape[1], int)))
        return False

    def read(self) -> List[nn.Module]:
        inputs = [n for n in self.graph.nodes if n.op == 'placeholder']
        if len(inputs) != 1:
            raise UnsupportedModel(f"{type(self.model).__name__}: forward takes {len(inputs)} "
                                   f"inputs; the bound reads networks of one input")
        for n in self.graph.nodes:
            if n.op == 'get_attr':
                raise _refuse(self.model, n, "reads a parameter or buffer outside a layer")
        mods, last, end = self.chain(inputs[0])
        if end.op != 'output':
            raise _refuse(self.model, end, "adds values that are not the two arms of one fork")
        if end.args[0] is not last:
            raise _refuse(self.model, end, "returns something else than one tensor")
        return mods


def trace(model: nn.Module) -> nn.Sequential:
    """``model`` (any nn.Module) rewritten by torch.fx as an nn.Sequential of its layers and
    Residual blocks (the same layer objects). Raises UnsupportedModel naming the node."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:       # any tracing failure is reported, with its own message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModel(f"{type(model).__name__}: torch.fx cannot trace its forward "
                               f"({type(e).__name__}: {first}); the bound reads networks "
                               f"without data-dependent control flow") from None
    _follow_in_place_adds(graph)
    return nn.Sequential(*_Reader(model, graph).read())


def _follow_in_place_adds(graph: torch.fx.Graph) -> None:
    """After ``a.add_(b)`` the name ``a`` holds the sum: every later use of ``a`` is made a
    use of the addition, so ``out.add_(x); relu(out)`` reads as ``relu(out + x)``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op == 'call_method' and node.target == 'add_' and node.args:
            a = node.args[0]
            for user in [u for u in a.users if order[u] > order[node]]:
                user.replace_input_with(a, node)


def _plain(mods) -> bool:
    """True when nothing in ``mods`` needs a rewrite (layers, Sequentials, Residuals)."""
    for m in mods:
        if isinstance(m, nn.Sequential):
            if not _plain(m):
                return False
        elif isinstance(m, Residual):
            arms = [m.branch] + ([] if m.shortcut is None else [m.shortcut])
            if not _plain(arms):
                return False
        elif not is_layer(m):
            return False
    return True


def _rewrite(m: nn.Module) -> nn.Module:
    """The form the bound reads of one module (a copy of the containers only)."""
    if isinstance(m, nn.Sequential):
        return nn.Sequential(*(_rewrite(c) for c in m))
    if isinstance(m, Residual):
        short = None if m.shortcut is None else _rewrite(m.shortcut)
        return Residual(_rewrite(m.branch), short)
    if not is_layer(m):
        return _rewrite(trace(m))      # a Residual kept whole by the trace may hold user blocks
    return m


_VIEWS = weakref.WeakKeyDictionary()     # model -> (its modules' ids, view, checked)
_SOURCES = weakref.WeakKeyDictionary()   # a rewritten model's derived copy -> the model
_LOG_SOFTMAX_DROPPED = weakref.WeakSet()  # views made without the model's final log_softmax


def derived(copy: nn.Module, source: nn.Module) -> nn.Module:
    """Mark ``copy`` (e.g. BatchNorm folded) as made from ``source``'s rewrite, so that
    ``check_view`` on the copy checks the rewrite of ``source``. Returns ``copy``."""
    if sequential_view(source) is not source:
        _SOURCES[copy] = source
    return copy


def sequential_view(model: nn.Module) -> nn.Sequential:
    """The network as the bound reads it: ``model`` itself when it is an nn.Sequential of
    layers and Residual blocks (nested Sequentials allowed), else its rewrite (cached per
    model; rebuilt when its modules change)."""
    if isinstance(model, nn.Sequential) and _plain(model) and not _last_is_log_softmax(model):
        return model
    ids = tuple(id(m) for m in model.modules())
    hit = _VIEWS.get(model)
    if hit is not None and hit[0] == ids:
        return hit[1]
    view = _rewrite(model)
    if _last_is_log_softmax(view):
        view = _without_last(view)
        _LOG_SOFTMAX_DROPPED.add(view)
    _VIEWS[model] = (ids, view, False)
    return view


def _last_layer(m: nn.Module) -> nn.Module:
    """The module a network's output comes from (the last of nested Sequentials)."""
    while isinstance(m, nn.Sequential) and len(m):
        m = m[-1]
    return m


def _last_is_log_softmax(m: nn.Module) -> bool:
    """The network ends in a LogSoftmax over the class axis (dim 1 or -1 of [batch,
    classes]): a per-sample shift of every logit, which the bound leaves out."""
    last = _last_layer(m)
    return isinstance(last, nn.LogSoftmax) and last.dim in (1, -1)


def _without_last(seq: nn.Sequential) -> nn.Sequential:
    """``seq`` (a rewrite, containers copied) without its innermost last module."""
    mods = list(seq)
    if isinstance(mods[-1], nn.Sequential) and len(mods[-1]):
        mods[-1] = _without_last(mods[-1])
    else:
        mods.pop()
    return nn.Sequential(*mods)


def view_output(view: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The model's own output from its view's ``out`` [batch, classes]: log_softmax applied
    again where the view left the model's trailing one out."""
    return F.log_softmax(out, dim=1) if view in _LOG_SOFTMAX_DROPPED else out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (the comparison of a rewritten network's outputs)."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def check_view(model: nn.Module, x: torch.Tensor) -> Optional[float]:
    """Compare a rewritten model's forward with its own on ``x`` [batch, ...] (once per
    rewrite); raise UnsupportedModel when they differ by more than VIEW_TOL (relative).
    Returns the difference found, None when nothing was compared."""
    if model in _SOURCES:
        return check_view(_SOURCES[model], x)
    view = sequential_view(model)
    if view is model or _VIEWS[model][2]:
        return None
    with torch.no_grad():
        want = model(x)
        try:
            got = view_output(view, view(x))
        except RuntimeError as e:       # e.g. a view(-1, k) that was not a flattening
            raise UnsupportedModel(f"{type(model).__name__}: the network read from its forward "
                                   f"fails on the first input ({str(e).splitlines()[0]}): its "
                                   f"forward does something the trace does not show") from None
        if want.shape != got.shape:
            raise UnsupportedModel(f"{type(model).__name__}: the network read from its forward "
                                   f"gives shape {tuple(got.shape)}, the model {tuple(want.shape)}")
        err = relative_error(got, want)
    if not err <= VIEW_TOL:
        raise UnsupportedModel(f"{type(model).__name__}: the network read from its forward "
                               f"differs from it by {err:.3g} (relative) on the first input: "
                               f"its forward does something the trace does not show")
    _VIEWS[model] = (_VIEWS[model][0], view, True)
    return err
