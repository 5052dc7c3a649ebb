"""Local Lipschitz bound and certified loss of Local-Lip (Huang et al., NeurIPS 2021).

Everything here is about the L2 ball ``{x : ||x - x0||_2 <= eps}`` around each input.
The bound works on any ``nn.Sequential`` built from Conv2d, Linear, AvgPool2d, Flatten,
ReLU_x, nn.ReLU, ClampGroupSort, Identity and Dropout (eval mode) whose last module is a
Linear layer (eval-mode BatchNorm is folded into affine layers by ``fold_batchnorm``); it
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
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import ClampGroupSort, Flatten, ReLU_x

TOL = 1e-3          # power iteration stops when the largest per-sample change is below this
TINY = 1e-12        # guards divisions by norms that can be exactly zero
AFFINE = (nn.Conv2d, nn.Linear, nn.AvgPool2d)      # linear maps (plus bias): one norm each
ACTIVATIONS = (ReLU_x, nn.ReLU, ClampGroupSort)
FLATTEN = (Flatten, nn.Flatten)
NOOPS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)   # identities in eval mode
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


class UnsupportedModel(ValueError):
    """The model cannot be bounded: not an nn.Sequential, a layer of an unsupported type,
    BatchNorm / Dropout in training mode, or no Linear logit layer at the end. The message
    names the module and what is accepted (``SUPPORTED``)."""


class BoundError(RuntimeError):
    """A bound that violates its own invariants (lb > ub, non-finite values)."""


def _not_sequential(model) -> UnsupportedModel:
    return UnsupportedModel(
        f"the bound walks an nn.Sequential; got {type(model).__name__} (a module with its own "
        f"forward): write the network as nn.Sequential(...) of the supported layers: {SUPPORTED}")


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
def check_supported(model: nn.Sequential) -> List[int]:
    """Validate ``model`` for the bound; return the module indices of its affine layers
    (Conv2d, Linear, AvgPool2d), the last of which is the logit layer.

    Raises UnsupportedModel (a ValueError) naming the first unsupported module, a Dropout
    in training mode, or a BatchNorm (``fold_batchnorm`` turns it into affine layers at the
    same indices).
    """
    if not isinstance(model, nn.Sequential):
        raise _not_sequential(model)
    affine, last_real = [], None
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != 'zeros' or isinstance(m.padding, str):
                raise UnsupportedModel(f"layer {i} ({m}): only zero padding given as numbers "
                                       f"is supported")
            affine.append(i)
        elif isinstance(m, nn.Linear):
            affine.append(i)
        elif isinstance(m, nn.AvgPool2d):
            if isinstance(m.padding, str):
                raise UnsupportedModel(f"layer {i} ({m}): padding must be given as numbers")
            affine.append(i)
        elif isinstance(m, BATCHNORM):
            raise UnsupportedModel(f"layer {i} ({type(m).__name__}): fold it first with "
                                   f"local_bound.fold_batchnorm(model) (a per-channel affine "
                                   f"map in eval mode; locallip and evaluate.py do this)")
        elif isinstance(m, NOOPS):
            if m.training and not isinstance(m, nn.Identity):
                raise UnsupportedModel(f"layer {i} ({type(m).__name__}) is in training mode, "
                                       f"where it is not a fixed map: call model.eval() first")
            continue
        elif not isinstance(m, ACTIVATIONS + FLATTEN):
            raise UnsupportedModel(f"layer {i} ({type(m).__name__}) is not supported by the "
                                   f"bound; supported: {SUPPORTED}")
        last_real = i
    if not affine or last_real is None or not isinstance(model[last_real], nn.Linear):
        raise UnsupportedModel("the last module of the model (after any Identity / Dropout) "
                               "must be nn.Linear (the logit layer)")
    return affine


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
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s.detach(), t.detach()


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """An equivalent model (a copy; the same module indices) without BatchNorm, for
    evaluation: an eval-mode BatchNorm1d/2d right after a Conv2d or Linear (Identity and
    Dropout may sit between) is folded into it (W' = s W, b' = s b + t per output channel,
    exact) and replaced by nn.Identity; any other BatchNorm becomes its own affine layer of
    the same map: a depthwise 1x1 Conv2d (BatchNorm2d) or a diagonal Linear (BatchNorm1d on
    [batch, features]). Refuses BatchNorm in training mode or without running statistics.
    A model without BatchNorm is returned as is (not copied)."""
    if not isinstance(model, nn.Sequential):
        raise _not_sequential(model)
    if not any(isinstance(m, BATCHNORM) for m in model):
        return model
    mods = list(model)
    prev = None                       # index of the last affine layer not yet folded into
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, BATCHNORM):
            s, t = _bn_scale_shift(m)
            if prev is not None and isinstance(out[prev], (nn.Conv2d, nn.Linear)):
                a = out[prev]
                if a.weight.shape[0] != s.numel():
                    raise UnsupportedModel(f"layer {i} ({type(m).__name__}) has {s.numel()} "
                                           f"channels, layer {prev} has {a.weight.shape[0]} "
                                           f"outputs")
                shape = (-1,) + (1,) * (a.weight.dim() - 1)
                with torch.no_grad():
                    a.weight.mul_(s.view(shape))
                    bias = t.clone() if a.bias is None else a.bias * s + t
                    a.bias = nn.Parameter(bias)
                out.append(nn.Identity())
                prev = None
                continue
            c = s.numel()
            if isinstance(m, nn.BatchNorm2d):
                a = nn.Conv2d(c, c, 1, groups=c)
                with torch.no_grad():
                    a.weight.copy_(s.view(c, 1, 1, 1))
                    a.bias.copy_(t)
            else:
                a = nn.Linear(c, c)
                with torch.no_grad():
                    a.weight.copy_(torch.diag(s))
                    a.bias.copy_(t)
            out.append(a.to(s.device, s.dtype))
            prev = None
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m = copy.deepcopy(m)
            prev = i
        elif isinstance(m, NOOPS):
            pass                         # folding looks through Identity / Dropout
        else:
            prev = None
        out.append(m)
    folded = nn.Sequential(*out)
    folded.train(model.training)
    return folded


# ----------------------------------------------------------------------------------------
# Linear operators: W x (no bias), W^T y, row norms, |W| x
# ----------------------------------------------------------------------------------------
def apply_W(layer: nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W x without bias. x: [batch, *in_shape] -> [batch, *out_shape]."""
    if isinstance(layer, nn.AvgPool2d):
        return layer(x)                  # linear, no bias
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w)


def apply_absW(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|W| x (elementwise absolute weights, no bias): the half-width map of interval
    arithmetic. x: [batch, *in_shape] -> [batch, *out_shape]."""
    if isinstance(layer, nn.AvgPool2d):
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


def row_norms(layer: nn.Module, in_shape=None) -> torch.Tensor:
    """L2 norm of each output unit's weights, shaped to broadcast over [batch, *out_shape].

    For a convolution it is the norm of the whole filter (an upper bound at the borders,
    where zero padding hides part of it). For AvgPool2d (``in_shape`` needed) it is exact
    per output: 1/c over the window's n real inputs gives sqrt(n) / c."""
    if isinstance(layer, nn.AvgPool2d):
        ones = torch.ones((1, *in_shape))
        mean = layer(ones)                                     # n / c
        n = F.avg_pool2d(ones, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                         True, 1)                              # n (divisor 1: the sum)
        return mean / n.clamp_min(1).sqrt()
    w = layer.weight
    n = w.flatten(1).pow(2).sum(1).clamp_min(TINY).sqrt()
    return n.view(1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else n.view(1, -1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars [batch] -> [batch, 1, ...] broadcasting against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of [batch, ...] -> [batch], at least TINY (zero-safe gradient)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).clamp_min(TINY)


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
        for _ in range(n_iter):
            new, tn = step(u)
            with torch.no_grad():
                change = _norm(new - u).max()
            u = new
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


def masked_power_iteration(layer: nn.Module, u: torch.Tensor, n_iter: int,
                           d_in: Optional[torch.Tensor] = None,
                           d_out: Optional[torch.Tensor] = None,
                           tol: float = TOL, grad_through: bool = True,
                           per_sample_stop: bool = True,
                           estimate: str = 'bilinear',
                           sync_free: bool = False) -> PowerIterationResult:
    """Per-sample spectral norm of A = D_out W D_in by power iteration (conv or linear).

    u:     [batch, *in_shape] starting vectors (stored from earlier epochs or random).
    d_in:  [batch, *in_shape] 0/1 indicator of the varying inputs, or None (all vary).
    d_out: [batch, *out_shape] 0/1 indicator of the varying outputs, or None.

    Each iteration (the reference's): u <- D_in u; v = normalize(D_out W u);
    u = normalize(D_in W^T v), its change measured against u as it was before the mask (as
    the reference: a stored vector's mass where the mask is now 0 counts); the estimate is the bilinear v^T A u = ||A^T v|| with the
    last v and u (``estimate='forward'``: ||A u||, opt-in, one more product, a slightly
    larger value). With gradient enabled and ``grad_through`` (faithful training) the whole
    batch iterates together, differentiating through every iteration, and stops when the
    largest per-sample change ||u_new - u|| drops below ``tol``. Otherwise (certification,
    or --pi_grad last) the iterations run without gradient, each sample stopping as soon as
    its own vector has converged; only the estimate from the last iterate is
    differentiated. ``per_sample_stop=False`` keeps the whole-batch loop there too.
    A start vector that the mask zeroes entirely restarts from D_in (no random draw).
    ``sync_free``: exactly ``n_iter`` iterations, those after the stop discarded on the
    device (same values, no host synchronisation: for CUDA graphs and torch.compile); the
    per-sample stop then freezes each sample instead of shrinking the batch.
    """
    _check_estimate(estimate)
    in_shape = u.shape[1:]

    def op(x, do):
        z = apply_W(layer, x)
        return z if do is None else z * do

    def step(x, di, do):
        return _power_step(layer, x, in_shape, di, do)

    batch = u.shape[0]
    u = u.detach()
    start = u       # the reference measures the first change against the unmasked start
    if d_in is not None:
        u = u * d_in
    # a zero vector (a stored vector killed by a new mask) would never recover: restart
    # from the mask itself (from all ones without a mask); no host synchronisation
    dead = _bcast(torch.linalg.vector_norm(u.flatten(1), dim=1) <= TINY, u)
    u = torch.where(dead, torch.ones_like(u) if d_in is None else d_in, u)
    iters = torch.zeros(batch, dtype=torch.long, device=u.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=u.device)
    tn = v = None
    differentiate_all = torch.is_grad_enabled() and grad_through

    if sync_free and n_iter > 0:
        whole = differentiate_all or not per_sample_stop
        calls = [0]

        def body(state):
            new, tn_, z, zn = step(state[0], d_in, d_out)
            with torch.no_grad():
                change = _norm(new - (start if calls[0] == 0 else state[0]))
            calls[0] += 1
            return (new, tn_, z, zn, change), (change.max() < tol if whole else change < tol)
        with contextlib.nullcontext() if differentiate_all else torch.no_grad():
            (u, tn, z, zn, change), iters = _frozen_loop(body, (u,), n_iter,
                                                         per_sample=not whole)
        iters = iters.expand(batch).clone() if whole else iters
        converged = change < tol
        if not differentiate_all and torch.is_grad_enabled():
            v = z / _bcast(zn, z)           # --pi_grad last
    elif differentiate_all or not per_sample_stop:
        # (a device-side stop flag instead of this host sync was measured on an H100: the
        # extra select operations cost more CPU dispatch time than the syncs, see README)
        prev = start
        for _ in range(n_iter):
            new, tn, z, zn = step(u, d_in, d_out)
            with torch.no_grad():
                change = _norm(new - prev)
            u = prev = new
            iters += 1
            if change.max().item() < tol:
                break
        if n_iter > 0:
            converged = change < tol
            if not differentiate_all and torch.is_grad_enabled():
                v = z / _bcast(zn, z)         # --pi_grad last with the whole-batch loop
    else:
        keep_v = torch.is_grad_enabled()        # read before no_grad turns it off
        with torch.no_grad():
            u, tn, v = _iterate_per_sample(step, u, d_in, d_out, n_iter, tol, iters, converged,
                                           keep_v=keep_v, start=start)
    if estimate == 'forward' or tn is None:
        sigma = _norm(op(u, d_out))
    elif differentiate_all or not torch.is_grad_enabled():
        sigma = _bilinear(tn)
    else:   # --pi_grad last: the same value v^T A u, differentiated through W only
        sigma = (v.detach() * op(u.detach(), d_out)).flatten(1).sum(1)
    return PowerIterationResult(sigma, u.detach(), iters, converged)


def _iterate_per_sample(step, u, d_in, d_out, n_iter, tol, iters, converged, keep_v=False,
                        start=None):
    """Power iteration on u [batch, ...], each sample stopping at its own convergence: only
    the samples still active are computed; the first change is measured against ``start``
    (default u). Updates iters, converged in place; returns (u, ||A^T v|| and v of each
    sample's last iteration; None, None without iterations)."""
    first = u if start is None else start      # every sample is active in the first round
    u = u.clone()
    tn = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    v = None
    active = torch.arange(u.shape[0], device=u.device)
    for _ in range(n_iter):
        di = None if d_in is None else d_in[active]
        do = None if d_out is None else d_out[active]
        ua = u[active]
        new, tna, za, zna = step(ua, di, do)
        if keep_v and v is None:
            v = torch.zeros((u.shape[0], *za.shape[1:]), dtype=u.dtype, device=u.device)
        done = _norm(new - (ua if first is None else first)) < tol
        first = None
        u[active] = new
        tn[active] = tna
        if keep_v:
            v[active] = za / _bcast(zna, za)
        iters[active] += 1
        converged[active[done]] = True
        active = active[~done]
        if active.numel() == 0:
            break
    return u, (tn if n_iter > 0 else None), v


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
    d = w * (r / wn_raw.clamp_min(TINY * TINY).sqrt()).unsqueeze(-1)
    fixed = torch.zeros_like(w, dtype=torch.bool)
    done = torch.zeros((), dtype=torch.bool, device=w.device) if sync_free else None
    for _ in range(opt_iter):
        leave = ((d > hi) | (d < lo)) & ~fixed
        if sync_free:
            done = done | ~leave.any()
            d_old, nan_old = d, nan_like
        elif not leave.any():
            break
        fixed = fixed | leave
        d_fixed = torch.where(fixed, torch.maximum(torch.minimum(d, hi), lo), torch.zeros_like(d))
        rem_raw = r2 - d_fixed.pow(2).sum(-1)
        rem = rem_raw.clamp_min(TINY * TINY)                  # budget left for free coords
        w_free = torch.where(fixed, torch.zeros_like(w), w)
        free_raw = w_free.pow(2).sum(-1)
        if reference_nan:
            nan_like = nan_like | (free_raw == 0) | (rem_raw < 0)
        d = d_fixed + w_free * (rem.sqrt() / free_raw.clamp_min(TINY * TINY).sqrt()).unsqueeze(-1)
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
# Vectors of the per-sample power iteration
# ----------------------------------------------------------------------------------------
class RandomVectors:
    """Fresh Gaussian starting vectors for every layer (certification from scratch), drawn
    on ``device`` (with ``generator``, which must live there, if given)."""

    def __init__(self, batch: int, device, generator: Optional[torch.Generator] = None):
        self.batch, self.device, self.generator = batch, torch.device(device), generator

    def get(self, key: int, shape) -> torch.Tensor:
        return torch.randn((self.batch, *shape), generator=self.generator, device=self.device)

    def put(self, key: int, u: torch.Tensor) -> None:
        pass


class KeptVectors(RandomVectors):
    """Fresh Gaussian vectors on a layer's first use, then the last vectors ``put`` for it:
    warm start for the same batch bounded again, e.g. at a larger radius (whose varying
    sets contain the smaller radius's, so the old top vector is a close start)."""

    def __init__(self, batch: int, device, generator: Optional[torch.Generator] = None):
        super().__init__(batch, device, generator)
        self.kept: Dict[int, torch.Tensor] = {}

    def get(self, key: int, shape) -> torch.Tensor:
        if key in self.kept:
            return self.kept[key].clone()
        return super().get(key, shape)

    def put(self, key: int, u: torch.Tensor) -> None:
        self.kept[key] = u.detach()      # get() hands out copies


class GivenVectors:
    """Starting vectors handed in, {module index: [batch, *in_shape]}; ``put`` collects the
    final ones in ``out``: the vector store is read before and written after the bound,
    outside compiled code (train.py --compile)."""

    def __init__(self, given: Dict[int, torch.Tensor]):
        self.given, self.out = given, {}

    def get(self, key: int, shape) -> torch.Tensor:
        return self.given[key]

    def put(self, key: int, u: torch.Tensor) -> None:
        self.out[key] = u.detach()


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


def compute_bound(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps,
                  vectors=None, global_vectors: Optional[Dict[int, torch.Tensor]] = None, *,
                  sniter: int = 100, opt_iter: int = 1000, global_iter: Optional[int] = None,
                  bound: str = 'local', tol: float = TOL, check: bool = False,
                  pi_grad: str = 'all', per_sample_stop: bool = True,
                  also_global: bool = False, estimate: str = 'bilinear',
                  global_tol: float = GLOBAL_TOL, reference_nan: bool = False,
                  global_sigmas: Optional[Dict[int, torch.Tensor]] = None,
                  local_norms: Optional[Callable] = None,
                  sync_free: bool = False) -> BoundResult:
    """Local-Lip bound of ``model`` on the L2 eps-balls around ``x``.

    x: [batch, *input_shape]; y: [batch] labels; eps: float or [batch] radii (L2).
    vectors: object with ``get(key, shape) -> [batch, *shape]`` and ``put(key, u)`` giving
      the per-sample power-iteration vectors, key = module index of the layer; None: fresh
      Gaussian vectors (``RandomVectors``).
    global_vectors: dict module index -> [1, *global_vector_shape(layer, in_shape)] (a
      linear layer's vector lives in its output space), updated in place (warm start);
      None: fresh ones, not kept.
    sniter: per-sample power iterations (default 100, the reference's test count);
      global_iter: iterations for ||W||_2 (default sniter); opt_iter: rounds of the
      worst-case-logit algorithm (default 1000, the test count). The public, documented
      entry points with certification defaults are in ``locallip``.
    bound: 'local' (indicators from the boxes) or 'global' (every indicator = 1, i.e. the
      product of the layers' spectral norms, computed by the same code path).
    check: verify lb <= ub and finiteness after every layer (raises BoundError).
    pi_grad: 'all' differentiates through every per-sample power iteration (faithful);
      'last' iterates without gradient and differentiates only the final product.
    per_sample_stop: without gradient, stop each sample at its own convergence (default)
      instead of holding the batch to its slowest sample (reference).
    estimate: 'bilinear' (the reference's v^T A u) or 'forward' (||A u||, opt-in) for every
      spectral-norm estimate; global_tol: tolerance of the global iterations (1e-4).
    reference_nan: training (faithful): worst-case margins that the reference's algorithm
      makes NaN (0/0) are 0, as its training loss sets them; certification leaves it False.
    also_global: also compute ``worst_global``, the worst-case margins of the global bound
      (radius r_global = eps * prod ||W_i||_2, same box): what ``bound='global'`` gives once
      its per-sample iterations have converged, for the cost of one more worst-case step.
    global_sigmas: {affine index: 0-dim tensor} spectral norms to use instead of the global
      power iterations (``lanczos.GuaranteedNorms``: upper bounds); ``global_vectors`` is then
      not used.
    local_norms: ``f(i, layer, d_in, d_out, in_shape) -> [batch]`` per-sample norms of
      D_out W D_in to use instead of the per-sample power iterations (``vectors`` unused).
    sync_free: every loop runs its full count with the iterations after its stop discarded
      on the device (same values; no host synchronisation, for CUDA graphs / torch.compile);
      a tensor ``eps`` is then not checked for negative entries (the caller's job), and
      ``check`` is refused (it reads the boxes on the host).
    """
    if sync_free and check:
        raise ValueError("check=True reads every box on the host: not with sync_free")
    if pi_grad not in ('all', 'last'):
        raise ValueError(f"pi_grad must be 'all' or 'last', got {pi_grad!r}")
    if bound not in ('local', 'global'):
        raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")
    affine = check_supported(model)
    last = affine[-1]
    global_iter = sniter if global_iter is None else global_iter
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [batch, *input_shape] (with a batch axis), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    b = x.shape[0]
    if not torch.is_tensor(y) or tuple(y.shape) != (b,):
        raise ValueError(f"y must be a tensor of {b} labels [batch], got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    vectors = RandomVectors(b, x.device) if vectors is None else vectors
    global_vectors = {} if global_vectors is None else global_vectors
    if isinstance(eps, (int, float)):        # a number: checked without a device sync
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got min {eps}")
        eps = torch.full((b,), float(eps), dtype=x.dtype, device=x.device)
    else:
        eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        eps = eps.expand(b) if eps.dim() == 0 else eps
        if not sync_free and (eps < 0).any():
            raise ValueError(f"eps must be >= 0, got min {eps.min().item()}")

    mu, r = x, eps
    lb, ub = x - _bcast(eps, x), x + _bcast(eps, x)
    r_global = eps
    res = BoundResult(logits=None, worst=None, r_local=eps, r_global=eps)
    layer_of_mask = None      # indicator of the activation feeding the next affine layer
    pending = []              # (module index, d_in, in_shape) of affine layers awaiting d_out
    log_lip = torch.zeros(b, dtype=x.dtype, device=x.device)
    conv_all = torch.ones(b, dtype=torch.bool, device=x.device)

    def finish(entry, d_out):
        nonlocal log_lip, conv_all
        i, d_in, in_shape = entry
        if local_norms is not None:
            res.sigmas[i] = local_norms(i, model[i], d_in, d_out, in_shape)
            log_lip = log_lip + torch.log(res.sigmas[i].clamp_min(1e-30))
            return
        u0 = vectors.get(i, in_shape).to(x.dtype)
        pi = masked_power_iteration(model[i], u0, sniter, d_in, d_out, tol,
                                    grad_through=(pi_grad == 'all'),
                                    per_sample_stop=per_sample_stop, estimate=estimate,
                                    sync_free=sync_free)
        vectors.put(i, pi.u)
        res.sigmas[i], res.iters[i] = pi.sigma, pi.iters
        log_lip = log_lip + torch.log(pi.sigma.clamp_min(1e-30))
        conv_all = conv_all & pi.converged

    for i, m in enumerate(model):
        if isinstance(m, FLATTEN):
            mu, lb, ub = mu.flatten(1), lb.flatten(1), ub.flatten(1)
            if layer_of_mask is not None:
                layer_of_mask = layer_of_mask.flatten(1)
        elif isinstance(m, AFFINE):
            for entry in pending:   # previous affine layer had no activation of its own
                finish(entry, None)
            pending = []
            if i == last:
                break
            in_shape = tuple(mu.shape[1:])
            if global_sigmas is not None:
                sigma_g = global_sigmas[i]
            else:
                if i not in global_vectors:
                    global_vectors[i] = torch.randn((1, *global_vector_shape(m, in_shape)),
                                                    device=x.device, dtype=x.dtype)
                sigma_g, global_vectors[i], g_conv = global_power_iteration(
                    m, global_vectors[i], global_iter, global_tol, estimate, sync_free)
                res.global_converged = res.global_converged & g_conv
            # box by interval arithmetic, ball by the network's own forward
            centre, half = (lb + ub) / 2, (ub - lb) / 2
            both = m(torch.cat([mu, centre], 0))
            mu, centre = both[:b], both[b:]
            half = apply_absW(m, half)
            ball = _bcast(r, mu) * row_norms(m, in_shape).to(mu)
            lb = box_max(centre - half, mu - ball)
            ub = box_min(centre + half, mu + ball)
            r = r * sigma_g
            r_global = r_global * sigma_g.detach()
            d_in = None if bound == 'global' else layer_of_mask
            pending = [(i, d_in, in_shape)]
            layer_of_mask = None
        elif isinstance(m, ACTIVATIONS):
            rr = _bcast(r, mu)
            if isinstance(m, ClampGroupSort):
                out = m(torch.cat([lb, ub, mu - rr, mu + rr, mu], 0))
                g_lb, g_ub, g_lo, g_hi, mu_out = out.split(b)
                lb_out, ub_out = torch.maximum(g_lb, g_lo), torch.minimum(g_ub, g_hi)
            else:   # elementwise and monotone: max(g(a), g(b)) = g(max(a, b)), exactly
                lb_out = m(box_max(lb, mu - rr))
                ub_out = m(box_min(ub, mu + rr))
                mu_out = m(mu)
            with torch.no_grad():
                d = _varying(m, lb, ub, lb_out, ub_out)
            res.masks[i], res.pre_boxes[i] = d, (lb, ub)
            if isinstance(m, ClampGroupSort):
                res.post_boxes[i] = (lb_out, ub_out)
            d_used = None if bound == 'global' else d
            is_relu = not isinstance(m, ClampGroupSort)
            for entry in pending:
                finish(entry, d_used if is_relu else None)
            pending = []
            layer_of_mask = d_used
            mu, lb, ub = mu_out, lb_out, ub_out
        if check:
            _check_box(lb, ub, f"layer {i} ({type(m).__name__})")

    final = model[last]
    res.logits = final(mu)
    res.r_local = eps * torch.exp(log_lip)
    res.r_global = r_global
    res.converged = conv_all
    lo = torch.minimum(lb - mu, torch.zeros_like(mu))
    hi = torch.maximum(ub - mu, torch.zeros_like(mu))
    res.box = (lo, hi)
    res.worst = worst_case_margins(final.weight, y, res.r_local, lo, hi, opt_iter, reference_nan,
                                   sync_free)
    if also_global:
        res.worst_global = worst_case_margins(final.weight, y, res.r_global, lo, hi, opt_iter,
                                              False, sync_free)
    return res


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
    for i, (lb, ub) in res.pre_boxes.items():
        m = model[i]
        if isinstance(m, ReLU_x):
            total = total + F.relu(ub).mean() + sp_thres * F.relu(m.threshold - lb).mean()
        elif isinstance(m, ClampGroupSort):
            lb, ub = res.post_boxes[i]
            h = lb.shape[1] // 2
            total = total + F.relu(m.max - lb[:, :h]).mean() + F.relu(ub[:, h:] - m.min).mean()
    return total


# ----------------------------------------------------------------------------------------
# Per-sample vectors stored across epochs
# ----------------------------------------------------------------------------------------
def layer_input_shapes(model: nn.Sequential, input_shape) -> Dict[int, tuple]:
    """Per-sample input shape of every affine layer except the last (the layers whose
    per-sample power-iteration vectors are stored), keyed by module index."""
    last = check_supported(model)[-1]
    shapes = {}
    with torch.no_grad():
        p = next(model.parameters())
        x = torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype)
        for i, m in enumerate(model):
            if isinstance(m, AFFINE) and i != last:
                shapes[i] = tuple(x.shape[1:])
            x = m(x)
    return shapes


M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 tensors holding values in [0, 2^32) (products stay
    below 2^63, so it is exact on every device). Works in place on x."""
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(M32)
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(M32)
    x ^= x >> 16
    return x


def counter_normal(seed: int, epoch: int, idx: torch.Tensor, key: int, shape,
                   device) -> torch.Tensor:
    """Standard normal vectors [len(idx), *shape] that depend only on (seed, epoch, sample
    index, layer key, element): the same on every device, batch and process, drawn on
    ``device`` in one pass (a hash of a counter, then Box-Muller), with no host loop."""
    n = math.prod(shape)
    half = (n + 1) // 2
    s = torch.full((1,), (seed * 0x9E3779B1 + 0x7F4A7C15) & M32, dtype=torch.long, device=device)
    s = _mix32(_mix32(s) ^ (epoch & M32))
    s = _mix32(s ^ (key & M32))
    s = _mix32(s ^ idx.to(device=device, dtype=torch.long).view(-1, 1))        # [b, 1]
    j = torch.arange(half, dtype=torch.long, device=device).view(1, -1)
    u1 = _mix32(s ^ _mix32(2 * j)).float().add_(0.5).mul_(1.0 / 2 ** 32)       # (0, 1)
    u2 = _mix32(s ^ _mix32(2 * j + 1)).float().mul_(2 * math.pi / 2 ** 32)     # [0, 2 pi)
    r = u1.log_().mul_(-2.0).sqrt_()
    z = torch.cat([r * torch.cos(u2), r.mul_(torch.sin(u2))], dim=1)[:, :n]
    return z.reshape(len(idx), *shape)


class VectorStore:
    """The per-sample power-iteration vectors of one dataset (train or test), indexed by
    the loader's sample index, one array [n, *in_shape] per stored layer.

    keys: module indices that keep vectors (``--indices``); the others restart from random
    vectors at every step. dtype: storage dtype (float32 or float16; computation is always
    in the model's dtype). path: back the arrays by a file (numpy memmap) instead of RAM.
    device: where the arrays live without a path: 'cpu' (RAM) or a CUDA device (no copies
    between host and GPU at every step). Rows never written hold no vector yet and are handed
    out as fresh Gaussian vectors (``counter_normal``: the same on every device and process).
    """

    def __init__(self, shapes: Dict[int, tuple], n: int, dtype=torch.float32,
                 path: Optional[str] = None, keys=None, device='cpu'):
        self.shapes = {k: tuple(s) for k, s in shapes.items() if keys is None or k in keys}
        self.n, self.dtype, self.path = n, dtype, path
        self.device = torch.device(device)
        if path is not None and self.device.type != 'cpu':
            raise ValueError("a disk-backed vector store lives on the CPU")
        self.seed, self.epoch = 0, 0     # fresh vectors depend on (seed, epoch, sample, layer)
        self.initialized = torch.zeros(n, dtype=torch.bool)     # on the CPU: no GPU syncs
        self.data = {}
        if path is not None:
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            size = n + self.nbytes()          # n flag bytes ("row written"), then the arrays
            reuse = os.path.isfile(path) and os.path.getsize(path) == size   # resume, other ranks
            mm = np.memmap(path, dtype=np.uint8, mode='r+' if reuse else 'w+', shape=(size,))
            self.initialized = torch.from_numpy(mm[:n].view(np.bool_))   # shared by processes
            offset = n
            for k, s in self.shapes.items():
                size = n * math.prod(s) * np.dtype(np_dtype).itemsize
                arr = mm[offset:offset + size].view(np_dtype).reshape(n, *s)
                self.data[k] = torch.from_numpy(arr)
                offset += size
            self._mm = mm
        else:
            for k, s in self.shapes.items():
                self.data[k] = torch.empty((n, *s), dtype=dtype, device=self.device)

    @staticmethod
    def bytes_per_sample(shapes, keys=None, dtype=torch.float32) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) for k, s in shapes.items() if keys is None or k in keys) * elem

    def nbytes(self) -> int:
        return self.n * self.bytes_per_sample(self.shapes, None, self.dtype)

    def batch(self, idx: torch.Tensor, device) -> 'StoredVectors':
        return StoredVectors(self, idx.cpu(), device)

    def state_dict(self):
        if self.path is not None:
            self._mm.flush()
            return {'initialized': self.initialized.clone(), 'path': self.path}
        return {'initialized': self.initialized.clone(), 'data': self.data}

    def load_state_dict(self, state):
        self.initialized.copy_(state['initialized'])
        if 'data' in state:
            for k in self.data:
                self.data[k].copy_(state['data'][k])


class StoredVectors:
    """The vectors of one batch: ``get`` reads the stored rows (fresh where none is stored
    yet or the layer is not stored), ``put`` writes them back."""

    def __init__(self, store: VectorStore, idx: torch.Tensor, device):
        self.store, self.idx, self.device = store, idx, torch.device(device)
        self.fresh = ~store.initialized[idx]
        self.fresh_rows = self.fresh.nonzero().flatten()         # CPU, no device sync
        self.all_fresh = len(self.fresh_rows) == len(idx)
        self._idx_store = idx.to(store.device, non_blocking=True)

    def _fresh(self, key, idx, shape):
        st = self.store
        return counter_normal(st.seed, st.epoch, idx, key, shape, self.device)

    def get(self, key: int, shape) -> torch.Tensor:
        if key not in self.store.data or self.all_fresh:
            return self._fresh(key, self.idx, shape)
        u = self.store.data[key][self._idx_store].to(self.device, torch.float32, non_blocking=True)
        if len(self.fresh_rows):
            rows = self.fresh_rows.to(self.device, non_blocking=True)
            u[rows] = self._fresh(key, self.idx[self.fresh_rows], shape)
        return u

    def put(self, key: int, u: torch.Tensor) -> None:
        if key in self.store.data:
            self.store.data[key][self._idx_store] = u.detach().to(self.store.device, self.store.dtype)
            self.store.initialized[self.idx] = True
