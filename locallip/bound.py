"""Local Lipschitz bound and certified loss of Local-Lip (Huang et al., NeurIPS 2021).

Everything here is about the L2 ball ``{x : ||x - x0||_2 <= eps}`` around each input.
The bound works on any ``nn.Sequential`` built from Conv2d, Linear, AvgPool2d,
AdaptiveAvgPool2d, Flatten, ReLU_x, nn.ReLU, ClampGroupSort, Identity and Dropout (eval
mode) whose last module is a Linear layer, and residual blocks of them (which networks it
reads, and BatchNorm folded into affine layers: ``layers.py``); it dispatches on layer
types, never on model names.

Per sample, the network is walked once, carrying
  * ``mu``      : the image of the input, i.e. the ordinary forward pass  [batch, *shape]
  * ``r``       : a radius such that every activation of the eps-ball lies in the
                  L2 ball ``B(mu, r)``; propagated with the global spectral norm  [batch]
  * ``lb, ub``  : an elementwise box containing every activation of the eps-ball,
                  the intersection of interval arithmetic and the ball  [batch, *shape]
From the pre-activation boxes come the varying-neuron indicators D (1 = the neuron can
change inside the ball, 0 = it is stuck), and the local Lipschitz constant of the network
up to its penultimate layer is bounded by prod_i ||D_out W_i D_in||_2 (docs/method.md),
computed by per-sample power iteration (``operators.py``). The last Linear layer is handled
exactly by the worst-case-logit algorithm of BCP (docs/method.md).
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from locallip import progress
from locallip.errors import UnsupportedModel  # noqa: F401  (importable from here too)
from locallip.layers import (ACTIVATIONS, AFFINE, FLATTEN, arms_of, chain, check_supported,
                             layer_list, modules_of)
from locallip.models import ClampGroupSort, ReLU_x, Residual
from locallip.operators import (GLOBAL_TOL, NORM_FLOOR, TOL, PowerOptions, apply_absW, bcast,
                                global_power_iteration, global_vector_shape, masked_power_iteration,
                                row_norms)
from locallip.rounding import (abs_norm, gamma, l2_error, layer_gamma, margin_allowance,
                               through_affine, through_groupsort, unit_roundoff)
from locallip.tracing import check_view, sequential_view
from locallip.vectors import RandomVectors

# iteration counts, one name per meaning (the command line's own defaults are utils.DEFAULTS)
TEST_SNITER = 100         # the reference's per-sample power iterations at test time
CONVERGED_SNITER = 2000   # enough for the estimates to meet TOL (the README's certification)
TEST_OPT_ITER = 1000      # worst-case-logit rounds at test time (exact once they finish)
FLOOR = 1e-30       # floor of a norm or radius before a log or a division


class BoundError(RuntimeError):
    """A bound that violates its own invariants (lb > ub, non-finite values)."""


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
        scale = rem.sqrt() / free_raw.clamp_min(NORM_FLOOR * NORM_FLOOR).sqrt()
        d = d_fixed + w_free * scale.unsqueeze(-1)
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
    logit_err: Optional[torch.Tensor] = None    # rounding: [batch, classes] bound of every
    #                                             logit's rounding error over the ball
    allowance: Optional[torch.Tensor] = None    # rounding: [batch, classes] taken from each
    #                                             margin before it is decided (0 at the label)

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
        """min_{i != y} (logit_y - logit_i - a_iy - allowance_i); > 0 means certified.
        [batch]; NaN stays NaN. The allowance (rounding, 0 without) is float64's."""
        z = self.worst_logits(y, worst)
        zy = z.gather(1, y.view(-1, 1))
        gap = zy - z
        if self.allowance is not None:
            gap = gap.double() - self.allowance
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


def _check_box(lb, ub, where, strict: bool = False):
    """Raise BoundError where lb > ub or an entry is not finite. ``strict`` (boxes widened by
    the rounding model: both contain the real activations, so they cannot cross): any
    crossing; otherwise (power-iteration estimates, rounded boxes) one beyond 1e-4 of the
    box's scale, the size of float32 rounding through a deep network."""
    gap = (lb - ub).max().item()
    if gap > (0.0 if strict else 1e-4 * (1.0 + ub.abs().max().item())):
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
    rounding: bool = False          # guaranteed certificates: boxes widened by the rounding
    #                                 model (rounding.py), worst-case logits in float64, margins
    #                                 less the rounding allowance (docs/method.md)

    def __post_init__(self):
        if self.sync_free and self.check:
            raise ValueError("check=True reads every box on the host: not with sync_free")
        if self.pi_grad not in ('all', 'last'):
            raise ValueError(f"pi_grad must be 'all' or 'last', got {self.pi_grad!r}")
        if self.bound not in ('local', 'global'):
            raise ValueError(f"bound must be 'local' or 'global', got {self.bound!r}")
        if self.rounding and self.sync_free:
            raise ValueError("rounding=True decides certificates on the host: not with sync_free")

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

    def terms_of(mods, key):
        terms = []
        for m in chain(mods):
            if isinstance(m, Residual):
                branch, short = arms_of(m)
                tb, key = terms_of(branch, key)
                ts, key = terms_of(short, key)
                one = None if m.shortcut is not None else torch.ones(1)
                terms.append(Sum(tb, ts, one))
            else:
                if isinstance(m, AFFINE) and key != last:
                    terms.append(key)
                key += 1
        return terms, key
    return terms_of(modules_of(sequential_view(model)), 0)[0]


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
    err: Optional[torch.Tensor] = None
    err_l2: Optional[torch.Tensor] = None


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
        self.lb, self.ub = x - bcast(eps, x), x + bcast(eps, x)
        self.u = unit_roundoff(x.dtype) if opts.rounding else None
        self.err = torch.zeros_like(x) if opts.rounding else None   # rounding.py's E
        self.err_l2 = x.new_zeros(self.b) if opts.rounding else None   # a bound of ||E||_2
        if opts.rounding:        # x -/+ eps rounds by at most u |x -/+ eps|
            widen = 2 * self.u * (x.abs() + bcast(eps, x))
            self.lb, self.ub = self.lb - widen, self.ub + widen
        self.res = BoundResult(logits=None, worst=None, r_local=eps, r_global=eps)
        self.mask = None          # indicator of the activation feeding the next affine layer
        self.pending = []         # (key, layer, d_in, in_shape) / _PendingBlock awaiting d_out
        self.converged = torch.ones(self.b, dtype=torch.bool, device=x.device)

    def walk(self, mods: list, key: int) -> int:
        """Propagate through the chain ``mods`` whose first layer has key ``key``, up to
        the logit layer; returns the key after the chain."""
        for m in chain(mods):
            if key == self.last:           # the logit layer: the worst-case margins instead
                break
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
                _check_box(self.lb, self.ub, where, strict=self.opts.rounding)
        return key

    def block(self, blk: Residual, key: int) -> int:
        """y = shortcut(x) + branch(x): each arm walked from the block's input; the box is
        the sum of the arms' boxes within the ball of radius r_branch + r_shortcut; the
        Lipschitz factor, branch + shortcut, waits for the indicator after the block."""
        self._finish_pending(None)
        start = (self.mu, self.lb, self.ub, self.r, self.r_global, self.err, self.err_l2)
        d_in, outer = self.mask, self.terms
        arms = []
        for mods in arms_of(blk):
            self.mu, self.lb, self.ub, self.r, self.r_global, self.err, self.err_l2 = start
            self.mask, self.terms, self.pending = d_in, [], []
            key = self.walk(mods, key)
            arms.append(_Arm(self.mu, self.lb, self.ub, self.r, self.r_global, self.terms,
                             self.pending, self.err, self.err_l2))
        b, s = arms
        self.mu, self.r, self.r_global = b.mu + s.mu, b.r + s.r, b.r_global + s.r_global
        lb, ub = b.lb + s.lb, b.ub + s.ub
        if self.err is not None:   # one rounding of each sum: u |p + q| (docs/method.md)
            mag = _magnitude(b.lb, b.ub) + _magnitude(s.lb, s.ub)
            self.err = (b.err + s.err) * (1 + 2 * self.u) + 2 * self.u * mag
            self.err_l2 = (b.err_l2 + s.err_l2) * (1 + 2 * self.u) + 2 * self.u * \
                torch.linalg.vector_norm(mag.flatten(1), dim=1)
            lb, ub = lb - 2 * self.u * mag, ub + 2 * self.u * mag
            self.r = self.r * (1 + 2 * self.u)
        rr = self._reach()
        self.lb = box_max(lb, self.mu - rr)
        self.ub = box_min(ub, self.mu + rr)
        self.mask, self.terms = None, outer
        self.pending = [_PendingBlock(b, None if blk.shortcut is None else s, d_in)]
        return key

    def _reach(self) -> torch.Tensor:
        """How far the activations of the ball are from the centre ``mu`` (per entry,
        broadcasting over [batch, *shape]): r; with rounding, also the centre's own error
        E and the rounding of mu -/+ the reach."""
        rr = bcast(self.r, self.mu)
        if self.err is None:
            return rr
        return rr * (1 + 4 * self.u) + self.err * (1 + 4 * self.u) + 4 * self.u * self.mu.abs()

    def flatten(self):
        self.mu, self.lb, self.ub = self.mu.flatten(1), self.lb.flatten(1), self.ub.flatten(1)
        if self.err is not None:
            self.err = self.err.flatten(1)
        if self.mask is not None:
            self.mask = self.mask.flatten(1)

    def affine(self, i: int, m: nn.Module):
        """Box by interval arithmetic intersected with the ball's box; ball through ||W||_2."""
        self._finish_pending(None)     # the previous affine layer had no activation of its own
        in_shape = tuple(self.mu.shape[1:])
        if isinstance(m, nn.Linear) and len(in_shape) != 1:
            raise UnsupportedModel(f"layer {i} (Linear) is applied to a [batch, "
                                   f"{', '.join(map(str, in_shape))}] tensor; the bound reads "
                                   f"Linear layers on [batch, features]: flatten before it")
        sigma_g = self._global_norm(i, m, in_shape)
        err, widen = self._affine_rounding(m, in_shape, sigma_g)
        centre, half = (self.lb + self.ub) / 2, (self.ub - self.lb) / 2
        both = m(torch.cat([self.mu, centre], 0))      # the network's own forward, once
        self.mu, centre = both[:self.b], both[self.b:]
        half = apply_absW(m, half)
        ball = bcast(self.r, self.mu) * row_norms(m, in_shape).to(self.mu)
        if err is not None:        # the centre's error, this layer's rounding (rounding.py)
            g = layer_gamma(m, in_shape, self.u)
            ball, half = (ball + err) * (1 + g) + widen, half + widen
            self.r, self.err = self.r * (1 + 2 * self.u), err
        self.lb = box_max(centre - half, self.mu - ball)
        self.ub = box_min(centre + half, self.mu + ball)
        self.r = self.r * sigma_g
        self.r_global = self.r_global * sigma_g.detach()
        d_in = None if self.opts.bound == 'global' else self.mask
        self.pending = [(i, m, d_in, in_shape)]
        self.mask = None

    def _affine_rounding(self, m: nn.Module, in_shape, sigma=None):
        """(E after the layer, the widening of its boxes) [batch, *out_shape] with
        rounding, else (None, None): E entrywise (rounding.through_affine), at most the
        bound of its L2 norm (rounding.l2_error, from sigma >= ||W||_2; None: |||W|||,
        which bounds it too); the widening gamma (|W| M + |b|)."""
        if self.err is None:
            return None, None
        mag = _magnitude(self.lb, self.ub)
        err, scale = through_affine(m, self.err, mag, in_shape, self.u, apply_absW)
        g = layer_gamma(m, in_shape, self.u)
        a = abs_norm(m, in_shape, apply_absW)
        sigma = a if sigma is None else float(torch.as_tensor(sigma).detach())
        self.err_l2 = l2_error(self.err_l2, scale, sigma, a, g)
        return torch.minimum(err, bcast(self.err_l2, err)), g * scale

    def activation(self, i: int, m: nn.Module):
        """Box through the monotone activation, intersected with the ball's image; the
        varying-neuron indicator D; the pending layer's norm with D as its D_out (ReLU
        types; MaxMin's indicator is used on the input side only)."""
        rr = self._reach()
        if isinstance(m, ClampGroupSort):
            out = m(torch.cat([self.lb, self.ub, self.mu - rr, self.mu + rr, self.mu], 0))
            g_lb, g_ub, g_lo, g_hi, mu_out = out.split(self.b)
            lb_out, ub_out = torch.maximum(g_lb, g_lo), torch.minimum(g_ub, g_hi)
            self.res.post_boxes[i] = (lb_out, ub_out)
            if self.err is not None:    # exact operations; errors mix within a pair
                self.err = through_groupsort(self.err)
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
        if self.err is not None:
            return self._rounded_result(final, y)
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


    def _rounded_result(self, final: nn.Linear, y: torch.Tensor) -> BoundResult:
        """``result`` under the rounding model: the Lipschitz bound's product in float64,
        raised by its rounding; the penultimate box widened by the centre's error (the ball
        is about the real centre); the logits' error over the ball; worst-case logits in
        float64 and the margin allowance (``rounded_margins``)."""
        self._finish_pending(None)
        res, mu, u = self.res, self.mu, self.u
        res.logits, res.terms = final(mu), self.terms
        res.r_local = rounded_radius(res, self.eps, {k: v.double() for k, v in
                                                     res.sigmas.items()})
        res.r_global, res.converged = self.r_global, self.converged
        e = self.err * (1 + 4 * u) + 4 * u * (self.lb.abs() + self.ub.abs() + mu.abs())
        res.box = (torch.minimum(self.lb - mu - e, torch.zeros_like(mu)),
                   torch.maximum(self.ub - mu + e, torch.zeros_like(mu)))
        res.logit_err, _ = self._affine_rounding(final, tuple(mu.shape[1:]))
        res.worst, res.allowance = rounded_margins(res, final.weight, y, res.r_local,
                                                   self.opts.opt_iter)
        return res


def _magnitude(lb: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """max(|lb|, |ub|) of a box: a bound of its activations' magnitude."""
    return torch.maximum(lb.abs(), ub.abs())


def rounded_radius(res: BoundResult, eps: torch.Tensor, norms: Dict[int, torch.Tensor],
                   rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """eps [n] times the Lipschitz bound of res.terms with the norms {key: [n]}, in float64,
    raised by its own rounding (products and sums of positive numbers: gamma(4 terms + 4)).
    ``rows``: the samples of the norms (BoundResult.lipschitz)."""
    one = torch.ones(eps.shape, dtype=torch.float64, device=eps.device)
    lip = lipschitz_of(res.terms, norms, one, rows, log=False).double()
    ops = 4 * _count_terms(res.terms) + 4
    return eps.double() * lip * (1 + gamma(ops, unit_roundoff(torch.float64)))


def _count_terms(terms: list) -> int:
    """How many norms and overlaps a Lipschitz bound's terms multiply and add."""
    return sum(_count_terms(t.branch) + _count_terms(t.shortcut) + 1 if isinstance(t, Sum)
               else 1 for t in terms)


def rounded_margins(res: BoundResult, weight: torch.Tensor, y: torch.Tensor, r: torch.Tensor,
                    opt_iter: int, rows: Optional[torch.Tensor] = None):
    """(worst-case margins a [n, classes] in float64, their rounding allowance [n, classes])
    of the rows ``rows`` (None: all) of a rounding result ``res`` at penultimate radii r [n]
    (float64; ``res.r_local`` or another Lipschitz bound's): the BCP algorithm on
    res.box in float64, and rounding.margin_allowance."""
    lo, hi = res.box
    logits, err = res.logits, res.logit_err
    if rows is not None:
        lo, hi, logits, err = lo[rows], hi[rows], logits[rows], err[rows]
    w = weight.detach().double()
    worst = worst_case_margins(w, y, r.double(), lo.double(), hi.double(), opt_iter)
    return worst, margin_allowance(w, y, logits, worst, err, r, lo, hi)


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
    walk = _Walk(view, affine[-1], x, eps, vectors,
                 {} if global_vectors is None else global_vectors, opts, global_sigmas,
                 local_norms)
    walk.walk(modules_of(view), 0)
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
