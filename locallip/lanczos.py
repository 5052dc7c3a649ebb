"""Spectral-norm UPPER bounds with a stated failure probability, for the guaranteed
certificate (``certificates.py``) and radius (``radius.py``; ``evaluate.py --certificate
guaranteed --delta D``).

Power iteration approaches ||A||_2 from below, and "converged" only means its vector stopped
moving, so a certificate built on it can be wrong. Here every norm the local bound uses is
bounded from above:

* Lanczos on B = A^T A or A A^T (A = D_out W D_in, one sample's masked layer; whichever
  acts on the smaller space, both have ||A||_2^2 as largest eigenvalue) from a Gaussian
  start restricted to the sample's varying inputs (or outputs), i.e. uniform on the unit
  sphere of that n-dimensional subspace. After k steps the largest eigenvalue xi_k of the
  k x k tridiagonal T_k satisfies (Kuczynski & Wozniakowski, SIAM J. Matrix Anal. Appl. 13,
  1992, Lanczos theorem)
      P(xi_k <= (1 - e) lambda_max(B)) <= 1.648 sqrt(n) exp(-(2k - 1) sqrt(e)).
  Solving for e at probability delta gives the bound
      ||A||_2 <= sqrt((xi_k + s) / (1 - e)),
  false with probability at most delta over the random start. The formula is evaluated at
  k - 1 for k Lanczos steps (whether the paper's k counts the last product or not, this is
  the conservative reading). The theorem is about exact arithmetic: Lanczos runs in float64
  with partial reorthogonalisation, and its computed T_k is the exact Lanczos matrix of
  B + F with ||F|| <= s (``Lanczos.slack``, bounded from the rounding and the loss of
  orthogonality the run measured; docs/method.md, "Floating point"), so the theorem holds
  for B + F + s I.
* Linear layers' global norms ||W||_2: by SVD in float64 (deterministic), raised by
  SVD_ALLOWANCE (relative) for the SVD's own rounding.
* Convolutions' global norms (the radius that propagates the ball and its box): the same
  Lanczos bound on W^T W, once per model, GLOBAL_STEPS steps.

The per-sample bound is never above the global one (||D_out W D_in|| <= ||W||), so it is
min(Lanczos bound, global bound), and a sample whose layer has every input and output
varying uses the global bound (the same operator) without any Lanczos step.

Everything here runs on ``GuaranteedNorms.network``, a float64 copy of the model (its float32
weights exactly): the certificate is about the network the weights define, and the bound's
own rounding is bounded (``rounding.py``; docs/method.md, "Floating point").

Union bound: a certificate (one point, one radius) uses the per-sample bound of every affine
layer but the last and the global bound of every convolution; each gets delta / (their
number), and each per-sample bound is split again over the STAGES at which it may be read,
so the data-dependent stop of ``certificates.guaranteed_certify`` costs nothing in
validity. Each certificate is then false
with probability at most ``delta`` (over the algorithm's random starts; nothing is assumed
about the data).
"""
import copy
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from locallip import progress
from locallip.bound import FLOOR, BoundError, BoundResult, compute_bound, exact_float32
from locallip.layers import check_supported, layer_input_shapes, layer_list
from locallip.operators import apply_absW, apply_W, apply_WT, masked_products
from locallip.rounding import abs_norm, gamma, layer_gamma, unit_roundoff

KW_CONST = 1.648        # Kuczynski & Wozniakowski's constant for the Lanczos algorithm
STAGES = (32, 64, 128, 256)   # Lanczos steps at which a sample's certificate is decided
GLOBAL_STEPS = 500      # Lanczos steps for a convolution's global norm (once per model)
BREAKDOWN = 1e-7        # relative size of a Lanczos residual treated as an invariant subspace
SEMI = 2.0 ** -26       # sqrt(u) of float64: an estimated overlap of two Lanczos vectors above it
#                         reorthogonalises (Simon's semi-orthogonality)
OMEGA_NOISE = 1.0       # the overlap estimates' rounding per step, in units of n u |||W|||^2
SVD_ALLOWANCE = 1e-9    # relative rounding of a float64 SVD's largest singular value (backward
#                         stable: a small multiple of n u ||W||, u = 1.1e-16, n <= 10^5)


def kw_inflation(n, k: int, delta: float):
    """e such that P(xi_k <= (1 - e) lambda_max) <= delta for k Lanczos steps on an n x n
    positive semidefinite matrix from a uniformly random start (the bound above, evaluated
    at k - 1). n: int or tensor [batch]; returns e of the same shape (1.0 = no bound)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    kk = k - 1
    if kk < 1:
        return torch.ones_like(torch.as_tensor(n, dtype=torch.float64))
    n = torch.as_tensor(n, dtype=torch.float64).clamp_min(1)
    # KW_CONST sqrt(n) exp(-(2 kk - 1) sqrt(e)) = delta, solved for sqrt(e); a probability
    # bound above 1 (tiny kk, large n) clamps e to 1: no bound from so few steps
    s = torch.log(KW_CONST * n.sqrt() / delta).clamp_min(0) / (2 * kk - 1)
    return (s * s).clamp(max=1.0)


def upper_from_ritz(xi: torch.Tensor, n, k: int, delta: float, slack) -> torch.Tensor:
    """Upper bound on sqrt(lambda_max) = ||A||_2 from the largest Ritz value xi [batch]
    (float64) of k Lanczos steps whose T_k is exact for B + F, ||F|| <= slack (a number or
    [batch]; shifted by slack, B + F is positive semidefinite and its lambda_max >= that of B):
    sqrt((xi + slack) / (1 - e)) (1 + 8 u), u of float64 (this formula's own rounding); inf
    when e = 1."""
    e = kw_inflation(n, k, delta).to(xi.device)
    up = (xi.clamp_min(0) + slack) / (1 - e)
    up = torch.where(e < 1, up, torch.full_like(up, math.inf)).sqrt()
    return up * (1 + 8 * unit_roundoff(torch.float64))


def _reciprocal(b: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """1 / b, and 0 where ``zero`` (no floor on b: a layer with tiny weights keeps unit
    vectors)."""
    return torch.where(zero, torch.zeros_like(b), 1 / torch.where(zero, torch.ones_like(b), b))


class Lanczos:
    """Batched Lanczos on A^T A or A A^T, A = D_out W D_in per sample, in float64 with partial
    reorthogonalisation, continued stage by stage. Both have ||A||_2^2 as their largest
    eigenvalue; the run takes the smaller of the layer's input and output spaces
    (``space='auto'``), where every vector operation of a step is cheaper and the dimension n
    in the failure probability is the smaller varying set.

    The layer is applied as a float64 copy (its float32 weights are exact there) and every
    Lanczos vector is kept. A new vector is orthogonalised against all of them (classical
    Gram-Schmidt) when Simon's recurrence estimates that its overlap with one of them has
    grown past sqrt(u) (``SEMI``), and at the step after (partial reorthogonalisation; Simon,
    Math. Comp. 42, 1984). Which steps do is a matter of speed only: ``slack`` bounds, from
    what the run measured (the basis' loss of orthogonality ||Q^T Q - I||_F, the components
    removed from each step), how far the computed T_k is from the exact Lanczos matrix of
    some B + G from the same start: ||G|| <= slack (docs/method.md, "Floating point"), and
    the Kuczynski-Wozniakowski theorem holds for it. Memory: steps x n float64 per sample.

    layer: Conv2d, Linear or any linear layer; d_in [batch, *in_shape] / d_out [batch,
    *out_shape]: 0/1 varying indicators or None (all vary); the start is a Gaussian vector
    masked by the varying set of the chosen space (uses the torch default generator of its
    device), i.e. uniform on the unit sphere of that n-dimensional subspace; the run is
    float64 whatever the layer's dtype."""

    def __init__(self, layer: nn.Module, d_in, d_out, in_shape, batch: int, device,
                 space: str = 'auto'):
        self.layer, self.in_shape = float64_model(layer), tuple(in_shape)
        self.d_in = None if d_in is None else d_in.double()
        self.d_out = None if d_out is None else d_out.double()
        with torch.no_grad():
            self.out_shape = tuple(apply_W(self.layer, torch.zeros(
                (1, *self.in_shape), device=device, dtype=torch.float64)).shape[1:])
        if space == 'auto':
            space = 'out' if math.prod(self.out_shape) < math.prod(self.in_shape) else 'in'
        if space not in ('in', 'out'):
            raise ValueError(f"space must be 'auto', 'in' or 'out', got {space!r}")
        self.space = space
        shape, d = (self.in_shape, self.d_in) if space == 'in' else (self.out_shape, self.d_out)
        q = torch.randn((batch, *shape), device=device, dtype=torch.float64)
        if d is not None:
            q = q * d        # the start lives in the varying subspace: n counts only it
        self.n = (torch.full((batch,), float(math.prod(shape)), dtype=torch.float64)
                  if d is None else d.flatten(1).sum(1).double().cpu())
        nq = torch.linalg.vector_norm(q.flatten(1), dim=1)
        self.q = (q / nq.clamp_min(FLOOR).view(-1, *[1] * len(shape))).flatten(1)
        self.shape = shape
        self.basis = self.q.new_zeros((batch, 0, self.q.shape[1]))
        self.beta = torch.zeros(batch, device=device, dtype=torch.float64)
        # per step: alpha, beta, and the norm of what left the recurrence (components
        # reorthogonalised away, a breakdown's residual) [batch, 3, steps]
        self.coef = self.q.new_zeros((batch, 3, 0))
        self.omega = torch.ones((batch, 1), device=device, dtype=torch.float64)
        self.omega_prev = self.omega.new_zeros((batch, 0))   # Simon's overlap estimates
        # per sample: due again at the next step (the step after a reorthogonalisation), and
        # the steps that reorthogonalised (speed, not validity)
        self.again = torch.zeros(batch, dtype=torch.bool, device=device)
        self.reorthogonalised = torch.zeros(batch, dtype=torch.long, device=device)
        self.semi = SEMI        # the overlap estimate that reorthogonalises (0: every step)
        self.per_sample = torch.device(device).type == 'cpu'   # due rows one by one
        self.steps = 0
        with torch.no_grad():
            self.abs_norm = float(abs_norm(self.layer, self.in_shape, apply_absW))

    def apply_B(self, q):
        """A^T A q (space 'in') or A A^T q (space 'out') for a masked q [batch, n] (float64)."""
        q = q.view(-1, *self.shape)
        if self.space == 'in':
            return masked_products(self.layer, q, self.in_shape, self.d_in, self.d_out)[1]
        t = apply_WT(self.layer, q, self.in_shape)
        if self.d_in is not None:
            t = t * self.d_in
        z = apply_W(self.layer, t)
        return z if self.d_out is None else z.mul_(self.d_out)

    def _room(self, steps: int):
        """The basis grown to hold ``steps`` vectors per sample."""
        have = self.basis.shape[1]
        if have < steps:
            more = self.basis.new_zeros((self.basis.shape[0], steps - have, self.basis.shape[2]))
            self.basis = torch.cat([self.basis, more], 1)
            more = self.coef.new_zeros((self.coef.shape[0], 3, steps - have))
            self.coef = torch.cat([self.coef, more], 2)

    @property
    def alphas(self) -> torch.Tensor:
        """[batch, steps] the diagonal of T."""
        return self.coef[:, 0, :self.steps]

    @property
    def betas(self) -> torch.Tensor:
        """[batch, steps] each step's beta (the off-diagonal of T, then the next step's)."""
        return self.coef[:, 1, :self.steps]

    def run(self, steps: int):
        """Advance every sample to ``steps`` Lanczos steps in all."""
        self._room(steps)
        while self.steps < steps:
            progress.stage("Lanczos step", self.steps + 1, steps)
            self._step()

    def _step(self):
        """One Lanczos step of every sample: w = B q - beta q_prev - alpha q, reorthogonalised
        when the overlap estimates say so; q_next = w / ||w|| (0 after a breakdown)."""
        k = self.steps
        self.basis[:, k] = self.q
        w = self.apply_B(self.q).flatten(1)
        if k:
            w.addcmul_(self.basis[:, k - 1], self.beta.unsqueeze(1), value=-1)
        a = torch.linalg.vecdot(self.q, w)
        w.addcmul_(self.q, a.unsqueeze(1), value=-1)
        b = torch.linalg.vector_norm(w, dim=1)
        nxt = self._overlaps(a, b)
        due = self.again | (nxt[:, :k + 1] > self.semi).any(1)
        if k:                   # a sample that broke down has q = 0 from then on: nothing due
            due &= self.coef[:, 1, k - 1] > 0
        removed = self._reorthogonalise(w, due)
        if removed is None:
            removed = torch.zeros_like(b)
        else:
            b = torch.linalg.vector_norm(w, dim=1)
            nxt[due, :k + 1] = OMEGA_NOISE * unit_roundoff(torch.float64) * w.shape[1]
        self.again = due & ~self.again
        self.reorthogonalised += due.to(self.reorthogonalised.dtype)
        # an (almost) invariant Krylov space: the Ritz values are exact, stop this sample;
        # the residual dropped is paid for in the slack
        dead = b <= BREAKDOWN * (a.abs() + self.beta)
        removed = torch.where(dead, removed + b, removed)
        b = torch.where(dead, torch.zeros_like(b), b)
        inv = _reciprocal(b, dead)
        self.q = w.mul_(inv.unsqueeze(1))
        self.omega_prev, self.omega = self.omega, nxt * (~dead).unsqueeze(1)
        self.beta = b
        self.coef[:, 0, k], self.coef[:, 1, k], self.coef[:, 2, k] = a, b, removed
        self.steps += 1

    def _reorthogonalise(self, w, due) -> Optional[torch.Tensor]:
        """Classical Gram-Schmidt of w [batch, n] against every kept vector, in place, for the
        samples ``due`` [batch] bool; returns the norms [batch] of the components removed (0
        elsewhere), or None when no sample is due. On the CPU, when only some are due, one
        matrix-vector product pair per due sample (it reads only that sample's vectors);
        otherwise one batched product whose rows not due remove nothing."""
        if not bool(due.any()):
            return None
        k = self.steps + 1
        removed = w.new_zeros(w.shape[0])
        if self.per_sample and not bool(due.all()):
            for i in due.nonzero().flatten().tolist():
                kept = self.basis[i, :k]
                c = torch.mv(kept, w[i])
                w[i].addmv_(kept.t(), c, alpha=-1)
                removed[i] = torch.linalg.vector_norm(c)
            return removed
        kept = self.basis[:, :k]
        c = torch.bmm(kept, w.unsqueeze(2)) * due.to(w.dtype).view(-1, 1, 1)
        w.sub_(torch.bmm(c.transpose(1, 2), kept).squeeze(1))
        return torch.linalg.vector_norm(c.squeeze(2), dim=1)

    def _overlaps(self, a, b) -> torch.Tensor:
        """[batch, k + 2]: Simon's estimates of |q_next^T q_i| for i <= k (and 1 for q_next
        itself) from the recurrence's coefficients (alpha_k = a, beta_k = b): the three-term
        recurrence of the overlaps, with a rounding term per step, in absolute values. An
        estimate only: it decides when to reorthogonalise, the slack measures the rest."""
        k, u = self.steps, unit_roundoff(torch.float64)
        noise = OMEGA_NOISE * u * self.q.shape[1] * self.abs_norm ** 2   # a step's rounding
        nxt = b.new_zeros((b.shape[0], k + 2))
        inv = _reciprocal(b, ~(b > 0)).unsqueeze(1)
        if k:
            al, be, om = self.alphas, self.betas, self.omega
            t = be * om[:, 1:] + (al - a.unsqueeze(1)) * om[:, :k]
            t[:, 1:] += be[:, :-1] * om[:, :k - 1]
            t -= self.beta.unsqueeze(1) * self.omega_prev
            nxt[:, :k] = (t.abs() + noise) * inv
        nxt[:, k] = noise * inv.squeeze(1)
        nxt[:, k + 1] = 1.0
        return nxt

    def orthogonality(self) -> torch.Tensor:
        """[batch] eta >= ||Q^T Q - I||_F for the run's vectors q_1 .. q_k and the next one
        (their Gram matrix in float64, plus its rounding); the zero vectors after a breakdown
        are left out (their block of T is 0 and decoupled)."""
        q = torch.cat([self.basis[:, :self.steps], self.q.unsqueeze(1)], 1)
        gram = torch.bmm(q, q.transpose(1, 2))
        # live: the start unless it is 0 (no varying entry), then each vector whose step's
        # beta is not 0 (a breakdown sets it to exactly 0, and every later one)
        start = (self.n > 0).to(device=q.device, dtype=q.dtype).unsqueeze(1)
        live = torch.cat([start, (self.coef[:, 1, :self.steps] > 0).to(q.dtype)], 1)
        err = (gram - torch.eye(q.shape[1], dtype=gram.dtype, device=gram.device))
        err = err * live.unsqueeze(1) * live.unsqueeze(2)
        eta = torch.linalg.matrix_norm(err)
        diag = gram.diagonal(dim1=1, dim2=2).amax(1)
        u = unit_roundoff(torch.float64)
        return (eta + q.shape[1] * gamma(q.shape[2] + 2, u) * diag) * (1 + 4 * q.shape[1] * u)

    def slack(self) -> torch.Tensor:
        """[batch] s >= ||G||: the run's T_k is the exact Lanczos matrix of B + G from the
        same start (docs/method.md, "Floating point"): with eta = ``orthogonality()`` and
        f = sqrt(k) times the largest error of a step's recurrence (its products, (gamma(m) +
        gamma(m')) |||W|||^2 with m, m' the fan-in of W and W^T plus slack; its arithmetic,
        reorthogonalisation and
        the eigenvalue solver, 16 (k + n) u |||W|||^2; what it removed),
        s = 3 (4 eta ||T|| + beta_k eta + f) / (1 - 2 eta)^2, and inf when eta > 1/4.
        ||B|| <= |||W|||^2 (|||W||| = ||(|W_ij|)||_2 bounds ||W||_2)."""
        u = unit_roundoff(torch.float64)
        k, n = max(self.steps, 1), self.basis.shape[2]
        norm2 = self.abs_norm ** 2
        products = (layer_gamma(self.layer, self.in_shape, u)
                    + layer_gamma(self.layer, self.in_shape, u, transpose=True))
        per_step = (products + 16 * (k + n) * u) * norm2
        eta = self.orthogonality()
        removed = self.coef[:, 2, :self.steps].amax(1) if self.steps else torch.zeros_like(eta)
        f = math.sqrt(k) * (per_step + removed * (1 + eta).sqrt())
        t_norm = self._tridiagonal_norm()
        s = 3 * (4 * eta * t_norm + self.beta * eta + f) / (1 - 2 * eta).clamp_min(FLOOR) ** 2
        s = torch.where(eta <= 0.25, s, torch.full_like(s, math.inf))
        return s * (1 + 32 * u)

    def _tridiagonal_norm(self) -> torch.Tensor:
        """[batch] an upper bound of ||T_k||_2: its largest absolute row sum."""
        if self.steps == 0:
            return self.beta.new_zeros(self.beta.shape)
        a, b = self.alphas.abs(), self.betas[:, :-1]
        rows = a.clone()
        rows[:, :-1] += b
        rows[:, 1:] += b
        return rows.amax(1) * (1 + 4 * unit_roundoff(torch.float64))

    def ritz_max(self) -> torch.Tensor:
        """Largest eigenvalue of each sample's tridiagonal T [batch] (float64): a lower
        bound on lambda_max(B) = ||A||_2^2 (exact arithmetic)."""
        if self.steps == 0:
            raise ValueError("ritz_max before any Lanczos step")
        a = self.alphas
        b = self.betas[:, :-1] if self.steps > 1 else None
        t = torch.diag_embed(a)
        if b is not None:
            t = t + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
        return torch.linalg.eigvalsh(t.cpu())[:, -1].to(a.device)

    def upper(self, xi: torch.Tensor, delta: float) -> torch.Tensor:
        """[batch] upper bounds on ||A||_2 from the Ritz values xi of this run, each false
        with probability <= delta (``upper_from_ritz`` with this run's slack)."""
        return upper_from_ritz(xi, self.n.to(xi.device), self.steps, delta, self.slack())

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the samples ``keep`` (indices into the current batch)."""
        kc = keep.cpu()
        self.q, self.basis, self.beta = self.q[keep], self.basis[keep], self.beta[keep]
        self.coef = self.coef[keep]
        self.again, self.reorthogonalised = self.again[keep], self.reorthogonalised[keep]
        self.omega, self.omega_prev = self.omega[keep], self.omega_prev[keep]
        self.n = self.n[kc]
        self.d_in = None if self.d_in is None else self.d_in[keep]
        self.d_out = None if self.d_out is None else self.d_out[keep]


def float64_model(model: nn.Module) -> nn.Module:
    """``model`` (a network or one layer) in float64: a copy unless it is already (float32
    weights are exact there), in the model's mode."""
    p = next(model.parameters(), None)
    if p is None or p.dtype == torch.float64:
        return model
    return copy.deepcopy(model).double()


def lanczos_norm_bounds(layer, d_in, d_out, in_shape, batch, steps, delta, device,
                        space='auto'):
    """(lower, upper) [batch] float64 bounds on ||D_out W D_in||_2 after ``steps`` Lanczos
    steps: lower = sqrt(Ritz value), upper false with probability <= delta each."""
    lz = Lanczos(layer, d_in, d_out, in_shape, batch, device, space)
    lz.run(steps)
    xi = lz.ritz_max()
    return xi.clamp_min(0).sqrt(), lz.upper(xi, delta)


def n_operators(model: nn.Sequential) -> int:
    """How many norm bounds one certificate uses: the per-sample bound of every affine layer
    but the last, plus the global (Lanczos) bound of every one among them that is not a
    Linear layer (convolutions, pooling)."""
    affine, layers = check_supported(model)[:-1], layer_list(model)
    return len(affine) + sum(not isinstance(layers[i], nn.Linear) for i in affine)


class GuaranteedNorms:
    """What the guaranteed certificate of a model rests on, computed once per model:
    ``network``, the model as a float64 copy (its weights exactly: the real-number network
    the certificate is about; every guaranteed bound is computed on it, in float64);
    global spectral-norm bounds of every affine layer but the last, ``upper[i]`` /
    ``lower[i]`` (0-dim float64 tensors on the model's device); the failure probability
    ``delta_op`` each bound is given (delta / n_operators). The convolutions' Lanczos
    starts are drawn from ``generator_seed``: the run's own seed (``--seed``, ``seed=``), so
    that two runs with other seeds draw anew; the probability is over that draw."""

    def __init__(self, model: nn.Sequential, input_shape, delta: float, *, generator_seed: int,
                 global_steps: int = GLOBAL_STEPS):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.delta_op = delta / max(n_operators(model), 1)
        self.network = model = float64_model(model)
        p = next(model.parameters())
        self.upper: Dict[int, torch.Tensor] = {}
        self.lower: Dict[int, torch.Tensor] = {}
        shapes = layer_input_shapes(model, tuple(input_shape))
        last, layers = check_supported(model)[-1], layer_list(model)
        devices = [p.device] if p.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), exact_float32():
            torch.manual_seed(generator_seed)
            for i, shape in shapes.items():
                if i != last:
                    lo, up = self._bounds(layers[i], shape, global_steps, p)
                    if not torch.isfinite(up):
                        raise BoundError(f"layer {i} ({type(layers[i]).__name__}): no finite "
                                         f"global norm bound after {global_steps} Lanczos steps")
                    self.lower[i] = lo.to(device=p.device, dtype=p.dtype)
                    self.upper[i] = up.to(p.device)     # float64, as the network

    def _bounds(self, m: nn.Module, shape, global_steps: int, p: torch.Tensor):
        """(lower, upper) float64 0-dim bounds on ||W||_2 of one layer."""
        if isinstance(m, nn.Linear):      # deterministic
            s = torch.linalg.matrix_norm(m.weight.detach().double(), 2)
            return s, s * (1 + SVD_ALLOWANCE)
        lo, up = lanczos_norm_bounds(m, None, None, shape, 1, global_steps, self.delta_op,
                                     p.device)
        return lo[0], up[0]


def is_full(d, batch, device):
    """[batch] bool: every entry of the indicator is 1 (None: all vary)."""
    if d is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return d.flatten(1).min(1).values > 0


@dataclass
class MaskedOperators:
    """What the bound read on the way: its result with the global upper bounds, and every
    per-sample masked operator (i, layer, d_in, d_out, in_shape) it asked a norm of."""
    res: BoundResult
    ops: list


def masked_operators(x: torch.Tensor, y: torch.Tensor, eps, norms: GuaranteedNorms, *,
                     opt_iter: int = 1, bound: str = 'local') -> MaskedOperators:
    """The bound of the eps-balls around x [batch, ...] (labels y; float64, on norms.network,
    with rounding) with every norm the global upper bound, recording the masked operators."""
    b, ops = x.shape[0], []

    def record(i, layer, d_in, d_out, in_shape):
        ops.append((i, layer, d_in, d_out, in_shape))
        return norms.upper[i].expand(b)

    with torch.no_grad(), exact_float32():
        res = compute_bound(norms.network, x.double(), y, eps, None, None, sniter=0,
                            opt_iter=opt_iter, bound=bound, check=True,
                            global_sigmas=norms.upper, local_norms=record, rounding=True)
    return MaskedOperators(res, ops)


def masked_norm_bounds(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps,
                       norms: GuaranteedNorms, *, steps: int = STAGES[-1], bound: str = 'local',
                       delta_op: Optional[float] = None):
    """(lower, upper): {affine index: [batch]} bounds on ||D_out W_i D_in||_2 with the varying
    sets of the eps-balls around x (eps a number or [batch]), from ``steps`` Lanczos steps
    from a random start per sample and layer. upper: each false with probability <=
    ``delta_op`` (default norms.delta_op), never above the global bound (a layer whose inputs and outputs all vary
    uses the global bound itself); lower: the Ritz values' square roots (exact arithmetic:
    below the norm; an estimate of it). Varying sets only grow with eps, so the upper bounds
    hold for the masked norms of every smaller radius too: one run serves a search over eps
    in [0, eps]."""
    b, x = x.shape[0], x.double()
    delta_op = norms.delta_op if delta_op is None else delta_op
    ops = masked_operators(x, y, eps, norms, bound=bound).ops
    with torch.no_grad(), exact_float32():
        lower, upper = {}, {}
        for i, layer, d_in, d_out, in_shape in ops:
            up = norms.upper[i].double().expand(b).clone()
            lo = norms.lower[i].double().expand(b).clone()
            full = is_full(d_in, b, x.device) & is_full(d_out, b, x.device)
            idx = (~full).nonzero().flatten()
            if idx.numel():
                lz = Lanczos(layer, None if d_in is None else d_in[idx],
                             None if d_out is None else d_out[idx], in_shape, idx.numel(),
                             x.device)
                lz.run(steps)
                xi = lz.ritz_max()
                up[idx] = torch.minimum(up[idx], lz.upper(xi, delta_op))
                lo[idx] = torch.minimum(up[idx], xi.clamp_min(0).sqrt())
            lower[i], upper[i] = lo, up
    return lower, upper
