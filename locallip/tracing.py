"""A network as the bound reads it: an ``nn.Sequential`` of layers and ``models.Residual``
blocks. A model of that form is read as it is; any other ``nn.Module`` (a user's class with
its own ``forward``, or such a module inside an ``nn.Sequential``) is traced with torch.fx
and its graph rewritten as that form, sharing the model's own layer objects (so gradients,
``state_dict`` keys and checkpoints stay the model's).

A module is read as a layer or container of type B (torch.nn's own class, or the project's
``ReLU_x``, ``ClampGroupSort``, ``Flatten``, ``Residual``) only when it computes as B does:
its class is B, or a subclass none of whose own classes redefines anything of B's (its
forward, ``_conv_forward``, ``__call__``, ...; ``__init__``, ``extra_repr``,
``reset_parameters`` and class metadata aside; a new attribute such as the weight property
``torch.nn.utils.parametrize`` adds is read by the forward and the bound alike). Any other
subclass is traced through like a user's module. Forward hooks and pre-hooks (on a module
or global) and an attribute of the class replaced on an instance (``m.forward = f``) are
refused (``check_forwards``).

What a traced graph may contain: one input; calls of layers (the torch.nn ones and the
project's ``ReLU_x``, ``ClampGroupSort``, ``Flatten``, ``Residual``; whether the bound supports
a layer's type is ``layers.check_supported``'s question); ``relu``; flattening to
[batch, features] (``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(x.size(0), -1)``,
``x.reshape(n, -1)``, ``x.view(-1, features)``); ``F.avg_pool2d``, ``F.adaptive_avg_pool2d``;
additions ``a + b`` that merge the two arms of a fork (y = x + f(x), y = s(x) + f(x)); and a
final ``log_softmax`` over the class axis, which the view leaves out (it shifts every logit
of a point equally: margins, certificates and radii are the logits'; ``view_output`` puts
it back where the view's output is compared with the model's).
Anything else (a concatenation, a product of branches, a constant added, a value used by
three operations, data-dependent control flow) is refused with one line naming the graph
node.

A view is cached per model and rebuilt when a module, its class, training flag, hooks or
instance attributes change; ``refresh`` drops it (the API and evaluate.py re-trace at the
start of every call). ``verify`` compares the network the bound reads with the model's own
forward on the inputs being certified (every API call, every evaluated batch);
``check_view`` (compute_bound) compares a rewritten view once per view otherwise.
"""
import functools
import operator
import weakref
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize

from locallip.errors import UnsupportedModel
from locallip.models import ClampGroupSort, Flatten, ReLU_x, Residual

PROJECT_LEAVES = (ReLU_x, ClampGroupSort, Flatten, Residual)
ADDS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ('add', 'add_')
RELUS = (F.relu, torch.relu)
LOG_SOFTMAXES = (F.log_softmax, torch.log_softmax)
SHAPE_QUERIES = ('size', 'dim')
# what a subclass may define again and still compute as its torch.nn / project class
HARMLESS = frozenset({
    '__init__', 'extra_repr', 'reset_parameters', '__repr__', '__module__', '__qualname__',
    '__doc__', '__dict__', '__weakref__', '__annotations__', '__orig_bases__', '__parameters__',
    '__firstlineno__', '__static_attributes__', '__constants__', '__getstate__', '__setstate__',
    '__deepcopy__', '_version', '__abstractmethods__', '_abc_impl'})
# the old-style reparametrizations (forward pre-hooks) and their parametrize versions
REPLACEMENTS = {'torch.nn.utils.spectral_norm': 'torch.nn.utils.parametrizations.spectral_norm',
                'torch.nn.utils.weight_norm': 'torch.nn.utils.parametrizations.weight_norm'}
VIEW_ULPS = 16       # view vs the model's forward, same layers: units of roundoff (relative)
FOLD_ULPS = 1024     # ... with BatchNorm folded into a copy's weights


class ForwardRefusal(UnsupportedModel):
    """A refusal of what a module's forward runs (hooks, replaced attributes, a
    parametrization in training mode): its message is complete as it is."""


def base_class(cls: type) -> Optional[type]:
    """The class a module of class ``cls`` would be read as: the nearest of its classes that
    is torch.nn's own (torch.nn.modules) or the project's layers; None if there is none."""
    for k in cls.__mro__:
        if k is nn.Module:
            return None
        if k in PROJECT_LEAVES or k.__module__.startswith('torch.nn.modules.'):
            return k
    return None


@functools.lru_cache(maxsize=None)
def _names(base: type) -> frozenset:
    return frozenset(dir(base)) - HARMLESS


def overrides(cls: type, base: type) -> List[str]:
    """The attributes of ``base`` (its own, nn.Module's and object's; HARMLESS aside) that a
    class of ``cls`` outside ``base``'s own classes defines again: what may make a module of
    ``cls`` compute other than ``base`` does ([] for ``base`` itself)."""
    names, own = _names(base), set(base.__mro__)
    return sorted({n for k in cls.__mro__ if k not in own for n in vars(k) if n in names})


def reads_as(m: nn.Module, base: type) -> bool:
    """``m`` is a ``base`` that computes as ``base`` does (its class overrides nothing)."""
    return isinstance(m, base) and not overrides(type(m), base)


def is_layer(m: nn.Module) -> bool:
    """A module the trace keeps whole: one computing as its torch.nn class or the project's
    (a subclass that overrides nothing of it included); containers (nn.Sequential), a
    user's modules and subclasses with their own forward are traced through."""
    if isinstance(m, nn.Sequential):
        return False
    base = base_class(type(m))
    return base is not None and not overrides(type(m), base)


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
            # F.relu(h, inplace=True) as the module it is: an arm may not start with it
            inplace = bool(node.kwargs.get('inplace', node.args[1] if len(node.args) > 1
                                           else False))
            layer = nn.ReLU(inplace=inplace)
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
    """True when nothing in ``mods`` needs a rewrite (layers, Sequentials, Residuals, each
    computing as its class: ``reads_as``)."""
    for m in mods:
        if reads_as(m, nn.Sequential):
            if not _plain(m):
                return False
        elif reads_as(m, Residual):
            arms = [m.branch] + ([] if m.shortcut is None else [m.shortcut])
            if not _plain(arms):
                return False
        elif not is_layer(m):
            return False
    return True


def _rewrite(m: nn.Module) -> nn.Module:
    """The form the bound reads of one module (a copy of the containers only)."""
    if reads_as(m, nn.Sequential):
        return nn.Sequential(*(_rewrite(c) for c in m))
    if reads_as(m, Residual):
        short = None if m.shortcut is None else _rewrite(m.shortcut)
        return Residual(_rewrite(m.branch), short)
    if not is_layer(m):
        return _rewrite(trace(m))      # a Residual kept whole by the trace may hold user blocks
    return m


# ----------------------------------------------------------------------------------------
# What runs besides the layers: hooks, attributes replaced on an instance
# ----------------------------------------------------------------------------------------
def _where(model: nn.Module, name: str, m: nn.Module) -> str:
    return (f"the model ({type(model).__name__})" if not name else
            f"{type(model).__name__}: module {name!r} ({type(m).__name__})")


def _hook_refusal(where: str, kind: str, hook) -> ForwardRefusal:
    name = getattr(hook, '__qualname__', type(hook).__qualname__)
    new = REPLACEMENTS.get(getattr(hook, '__module__', None) or type(hook).__module__)
    advice = f"use {new}, which the bound reads" if new else "remove it (handle.remove())"
    return ForwardRefusal(f"{where} has a forward {kind} ({name}), which changes what the "
                          f"network computes while the bound reads its layers as they are: "
                          f"{advice}")


def _check_global_hooks() -> None:
    for kind, hooks in (('hook', torch_module._global_forward_hooks),
                        ('pre-hook', torch_module._global_forward_pre_hooks)):
        for hook in hooks.values():
            raise _hook_refusal("a global module hook (register_module_forward_"
                                f"{kind.replace('-', '_')})", kind, hook)


def check_forwards(model: nn.Module) -> None:
    """Refuse what makes ``model(x)`` compute other than its layers as the bound reads them:
    a forward hook or pre-hook on any of its modules or a global one, and an attribute of a
    module's class replaced on the instance (``m.forward = f``, ``m._conv_forward = f``;
    ``m.compile()`` too). Raises ForwardRefusal (an UnsupportedModel) naming the module."""
    _check_global_hooks()
    for name, m in model.named_modules():
        where = _where(model, name, m)
        for kind, hooks in (('hook', m._forward_hooks), ('pre-hook', m._forward_pre_hooks)):
            for hook in hooks.values():
                raise _hook_refusal(where, kind, hook)
        shadow = [k for k in vars(m) if hasattr(type(m), k)]
        if shadow == ['_compiled_call_impl']:
            raise ForwardRefusal(f"{where} was compiled (m.compile()), which runs its forward "
                                 f"as compiled code: certify the module before compiling")
        if shadow:
            raise ForwardRefusal(f"{where}: {shadow[0]!r} is set on the instance over its "
                                 f"class's (m.{shadow[0]} = ...), which the bound does not "
                                 f"read: define a subclass instead")


def _check_parametrizations(model: nn.Module) -> None:
    """Refuse a parametrized layer (torch.nn.utils.parametrize) in training mode: a
    parametrization may then change the weight at every read (spectral_norm's power
    iteration), so the bound's reads and the forward's would differ."""
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m) and any(p.training
                                                   for p in m.parametrizations.modules()):
            raise ForwardRefusal(f"{_where(model, name, m)} has a parametrization in training "
                                 f"mode, which may change its weight at every read: call "
                                 f"model.eval() first")


# ----------------------------------------------------------------------------------------
# The cached views
# ----------------------------------------------------------------------------------------
@dataclass
class _Entry:
    key: tuple                        # _key of the model the view was made for
    view: Optional[nn.Sequential]     # None: the model itself is the view
    checked: bool = False             # compared with the model's own forward


_VIEWS = weakref.WeakKeyDictionary()     # model -> _Entry
_SOURCES = weakref.WeakKeyDictionary()   # a model's derived copy (BatchNorm folded) -> model
_LOG_SOFTMAX_DROPPED = weakref.WeakSet()  # views made without the model's final log_softmax


def _key(model: nn.Module) -> tuple:
    """What a view depends on, cheaply: every module's identity, class, training flag,
    number of forward hooks and of instance attributes, and the global hooks."""
    glob = (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks))
    return glob + tuple((id(m), type(m), m.training, len(m._forward_hooks),
                         len(m._forward_pre_hooks), len(m.__dict__)) for m in model.modules())


def _entry(model: nn.Module) -> _Entry:
    """The cached view of ``model``, made (checked by ``check_forwards``, traced when it is
    not a plain nn.Sequential) when there is none for its current ``_key``."""
    key = _key(model)
    hit = _VIEWS.get(model)
    if hit is not None and hit.key == key:
        return hit
    check_forwards(model)
    view = None
    if not (reads_as(model, nn.Sequential) and _plain(model)
            and not _last_is_log_softmax(model)):
        view = _rewrite(model)
        if _last_is_log_softmax(view):
            view = _without_last(view)
            _LOG_SOFTMAX_DROPPED.add(view)
    _VIEWS[model] = hit = _Entry(key, view)
    return hit


def refresh(model: nn.Module) -> None:
    """Forget the view of ``model`` (and of the model it was derived from): the next read
    traces the forward afresh, as it runs now (a forward that branches on an attribute or
    on ``self.training`` is frozen in a traced graph)."""
    for m in (model, _SOURCES.get(model)):
        if m is not None:
            _VIEWS.pop(m, None)


def derived(copy: nn.Module, source: nn.Module) -> nn.Module:
    """Mark ``copy`` (e.g. BatchNorm folded) as made from ``source``'s view: ``check_view``
    on the copy checks the view of ``source``, and ``verify`` compares the copy with
    ``source``'s own forward. Returns ``copy``."""
    _SOURCES[copy] = _SOURCES.get(source, source)
    if sequential_view(source) in _LOG_SOFTMAX_DROPPED:
        _LOG_SOFTMAX_DROPPED.add(copy)
    return copy


def sequential_view(model: nn.Module) -> nn.Sequential:
    """The network as the bound reads it: ``model`` itself when it is an nn.Sequential of
    layers and Residual blocks (nested Sequentials allowed), else its rewrite (cached per
    model; rebuilt when its modules, their classes, training flags, hooks or instance
    attributes change). Raises UnsupportedModel (``check_forwards``, ``trace``).
    Inside torch.compile (training's --compile step, whose model training checked eagerly
    before compiling and which --compile keeps a plain nn.Sequential) an nn.Sequential is
    read as itself, without the cache: dynamo would guard on the cache's weak entries, which
    the garbage collector may remove between the guard's creation and its check."""
    if torch.compiler.is_compiling() and isinstance(model, nn.Sequential):
        return model
    view = _entry(model).view
    return model if view is None else view


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


def run_view(view: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``view`` (a ``sequential_view``) on x [batch, ...] as the bound reads
    it: its chain, a Residual as shortcut(x) + branch(x), every layer by the forward of the
    class it is read as (``base_class``; no hooks, nothing set on the instance)."""
    if isinstance(view, nn.Sequential):
        for m in view:
            x = run_view(m, x)
        return x
    if isinstance(view, Residual):
        short = x if view.shortcut is None else run_view(view.shortcut, x)
        return short + run_view(view.branch, x)
    return base_class(type(view)).forward(view, x)


def view_tolerance(model: nn.Module, dtype: torch.dtype) -> float:
    """The relative difference ``verify`` allows: VIEW_ULPS units of roundoff where the view
    runs the model's own layers on the same tensors (the same operations: equal but for a
    kernel that is not bitwise reproducible), FOLD_ULPS where BatchNorm was folded into a
    copy's weights (each folded weight and bias rounded once more)."""
    return (FOLD_ULPS if model in _SOURCES else VIEW_ULPS) * torch.finfo(dtype).eps


def _running_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s own forward on x [batch, ...] (a copy of it: a forward may write in
    place). Raises ValueError naming x when it fails or is not finite."""
    try:
        out = model(x.clone())
    except RuntimeError as e:
        raise ValueError(f"x of shape {tuple(x.shape)}: the model's own forward fails on it "
                         f"({str(e).strip().splitlines()[0]})") from None
    bad = ~torch.isfinite(out.flatten(1)).all(1)
    if bad.any():
        raise ValueError(f"x: the model's output on input {int(bad.nonzero()[0])} is not "
                         f"finite (NaN or inf); nothing can be certified there")
    return out


def _read_output(model: nn.Module, view: nn.Module, x: torch.Tensor,
                 inputs: str) -> torch.Tensor:
    """``run_view`` of ``view`` on x, the model's final log_softmax put back; ``inputs``
    names x in a refusal."""
    try:
        return view_output(view, run_view(view, x.clone()))
    except RuntimeError as e:       # e.g. a view(-1, k) that was not a flattening
        raise UnsupportedModel(f"{type(model).__name__}: the network read from its forward "
                               f"fails on {inputs} ({str(e).splitlines()[0]}): its forward "
                               f"does something the trace does not show") from None


def _compare(model: nn.Module, view: nn.Module, want: torch.Tensor, x: torch.Tensor,
             inputs: str) -> float:
    """Relative difference of ``view``'s output on x from ``want`` (the running network's);
    raises UnsupportedModel beyond ``view_tolerance``, naming x as ``inputs``."""
    tol = view_tolerance(model, want.dtype)
    with torch.no_grad():
        got = _read_output(model, view, x, inputs)
    if want.shape != got.shape:
        raise UnsupportedModel(f"{type(model).__name__}: the network read from its forward "
                               f"gives shape {tuple(got.shape)}, the model {tuple(want.shape)}")
    err = relative_error(got, want)
    if not err <= tol:
        raise UnsupportedModel(f"{type(model).__name__}: the network the bound reads differs "
                               f"from the model's own forward by {err:.3g} (relative; "
                               f"{tol:.2g} allowed) on {inputs}: its forward does "
                               f"something the bound does not see")
    return err


def verify(model: nn.Module, x: torch.Tensor) -> float:
    """Prove that the network the bound reads of ``model`` (its view; a BatchNorm-folded
    copy's source model: ``derived``) is the network that runs, on the inputs x [batch,
    ...] being certified: the view's output (``run_view``) against the running model's own
    forward, within ``view_tolerance``. Every API call and every evaluated batch calls it
    (one more forward of each); compute_bound's ``check_view`` then compares no more.
    Returns the relative difference; raises UnsupportedModel (ValueError when the model's
    own forward fails on x, or is not finite)."""
    source = _SOURCES.get(model, model)
    _check_parametrizations(source)
    entry = _entry(model)
    with torch.no_grad():
        want = _running_output(source, x)
    view = model if entry.view is None else entry.view
    err = _compare(model, view, want, x, "the inputs being certified")
    entry.checked = True
    return err


def check_view(model: nn.Module, x: torch.Tensor) -> Optional[float]:
    """compute_bound's check: unless ``verify`` already compared this view, compare a
    rewritten model's view with its own forward on ``x`` [batch, ...] (once per view; a
    plain nn.Sequential is its own view); raise UnsupportedModel when they differ by more
    than ``view_tolerance``. Returns the difference found, None when nothing was compared."""
    entry = _entry(model)
    if entry.checked:
        return None
    if model in _SOURCES:
        return check_view(_SOURCES[model], x)
    if entry.view is None:
        return None
    with torch.no_grad():
        want = model(x)
    err = _compare(model, entry.view, want, x, "the first input")
    entry.checked = True
    return err
