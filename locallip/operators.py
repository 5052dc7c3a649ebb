"""The linear operators of the bound's layers and the spectral norms of their masked forms
D_out W D_in (D: 0/1 indicators of the varying neurons, [batch, *shape]): W x without bias,
W^T y, exact row norms, |W| x and the extremes of W x over a box; the per-sample power
iteration (the reference's iteration and its bilinear estimate, docs/method.md) and the
global one on the whole operator."""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from locallip import progress
from locallip.layers import POOLS

TOL = 1e-3          # power iteration stops when the largest per-sample change is below this
NORM_FLOOR = 1e-12  # guards divisions by norms that can be exactly zero


# ----------------------------------------------------------------------------------------
# Linear operators: W x (no bias), W^T y, row norms, |W| x
# ----------------------------------------------------------------------------------------
def apply_W(layer: nn.Module, x: torch.Tensor,
            weight: Optional[torch.Tensor] = None) -> torch.Tensor:
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


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars [batch] -> [batch, 1, ...] broadcasting against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of [batch, ...] -> [batch], at least NORM_FLOOR (zero-safe gradient)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).clamp_min(NORM_FLOOR)


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
    return t / bcast(tzn + NORM_EPS * zn, t), tzn / zn, zn


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
        state = tuple(torch.where(bcast(stopped, n) if per_sample and n.dim() > 1 else stopped,
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
    dead = bcast(torch.linalg.vector_norm(u.flatten(1), dim=1) <= NORM_FLOOR, u)
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
    return _Iterated(u, tn, z / bcast(zn, z) if keep_v else None, iters, change < tol)


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
        v = z / bcast(zn, z) if keep_v else None
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
            v[active] = za / bcast(zna, za)
        iters[active] += 1
        converged[active[done]] = True
        active = active[~done]
        if progress.watched():
            progress.stage(name, k + 1, n_iter,
                           f"{active.numel()} of {u.shape[0]} points iterating")
        if active.numel() == 0:
            break
    return _Iterated(u, tn if n_iter > 0 else None, v, iters, converged)
