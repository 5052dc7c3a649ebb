"""The certified radius of every point: the largest L2 eps at which it is certified, by a
bracketing search on eps (regula falsi on the worst-case margin), with power-iteration
estimates (the reference certificate) or with Lanczos upper bounds (guaranteed)."""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from locallip import progress
from locallip.bound import (CONVERGED_SNITER, FLOOR, TEST_OPT_ITER, compute_bound, exact_float32,
                            lipschitz_of, structure_terms)
from locallip.lanczos import STAGES, masked_norm_bounds
from locallip.layers import check_supported, layer_list
from locallip.operators import global_power_iteration
from locallip.vectors import SubsetVectors

RADIUS_RTOL = 1e-3      # the search stops when hi - lo <= rtol * lo (relative bracket width)
RADIUS_EVALS = 24       # most bound evaluations per point and search
RADIUS_STEPS = STAGES[-1]   # Lanczos steps of the guaranteed radius's norm bounds (256: median
#                         radius 0.5% below the estimate's on the bundled model; 32: 6% below)
RADIUS_COARSE = 0.02    # relative bracket of the guaranteed search's Ritz-value search (it only
#                         chooses the radius whose varying sets the Lanczos bounds use)
GLOBAL_COARSE = 0.1     # ... and of its first search, with the global bounds (only where the
#                         Ritz values are taken)
RITZ_STEPS = 16         # Lanczos steps of the Ritz-value estimate that places those bounds
RADIUS_ROUNDS = 3       # most rounds of Lanczos bounds per point (a point certified at the top of
#                         its bounds' range gets a higher one)


@dataclass(frozen=True)
class RadiusSearch:
    """How the certified radius is searched (radius_batch, guaranteed_radius)."""
    sniter: int = CONVERGED_SNITER   # power iterations per evaluation of the estimate search
    opt_iter: int = TEST_OPT_ITER    # worst-case-logit rounds per evaluation
    rtol: float = RADIUS_RTOL   # stop when hi - lo <= rtol * lo
    max_radius: Optional[float] = None   # not searched above (radius = max_radius, hi = inf)
    max_evals: int = RADIUS_EVALS        # bound evaluations per point and search, at most
    steps: int = RADIUS_STEPS   # Lanczos steps of the guaranteed search's norm bounds
    bound: str = 'local'        # 'local' or 'global' (every indicator 1)
    estimate: str = 'bilinear'  # the power-iteration estimate (bound.BoundOptions)


@dataclass
class Bracket:
    """bracket_search's result, [n] tensors: lo certified, hi not (hi <= lo (1 + rtol), or
    inf where lo reached max_radius), float64; evals (long); flag (bool, at lo; True where
    lo = 0)."""
    lo: torch.Tensor
    hi: torch.Tensor
    evals: torch.Tensor
    flag: torch.Tensor


@dataclass
class RadiusResult:
    """radius_batch's result, per-sample CPU tensors [batch]; the estimate search's (with
    ``reference``) and the guaranteed search's (with ``norms``) fields, None where not run."""
    radius: Optional[torch.Tensor] = None            # certified (estimates)
    radius_upper: Optional[torch.Tensor] = None      # not certified, <= radius (1 + rtol)
    evals: Optional[torch.Tensor] = None             # bound evaluations
    converged: Optional[torch.Tensor] = None         # power iterations converged at radius
    radius_guaranteed: Optional[torch.Tensor] = None         # certified (Lanczos bounds)
    radius_guaranteed_upper: Optional[torch.Tensor] = None   # inf: certified at the top
    evals_guaranteed: Optional[torch.Tensor] = None          # box-only evaluations


def _next_radius(lo, m_lo, hi, m_hi, prev, m_prev, guess, rtol):
    """Next trial radius of every searched point ([n] tensors, float64): below a failure
    (hi finite) regula falsi on the margin (the caller halves the margin of an end kept
    again: the Illinois rule), kept rtol * max(lo, hi / 2) / 2 (at most a quarter of the
    bracket) away from both ends so that one step can close it; with no failure yet, the
    secant through the last two certified points, at least 1.5 and at most 4 times lo
    (``guess`` while lo is 0)."""
    w = hi - lo
    p = lo + w * m_lo / (m_lo - m_hi)
    p = torch.where(torch.isfinite(p), p, lo + w / 2)
    gap = torch.minimum(rtol * torch.maximum(lo, hi / 2) / 2, w / 4)
    bracketed = torch.minimum(torch.maximum(p, lo + gap), hi - gap)
    slope = (m_prev - m_lo) / (lo - prev)
    ext = lo + m_lo / slope
    ext = torch.where(torch.isfinite(ext) & (slope > 0), ext, 4 * lo)
    ext = torch.minimum(torch.maximum(ext, 1.5 * lo), 4 * lo)
    ext = torch.where(lo > 0, ext, guess)
    return torch.where(torch.isfinite(hi), bracketed, ext)


def bracket_search(evaluate, m0, guess, rtol, max_evals, max_radius, hint=None,
                   dtype=torch.float32) -> Bracket:
    """Search, for each of n points, a radius lo certified by ``evaluate`` and a radius hi
    <= lo (1 + rtol) where it failed (or lo = max_radius). ``evaluate(eps [k], rows [k]) ->
    (certified [k] bool, margin [k], flag [k] bool)`` for the points ``rows`` at radii
    ``eps`` (flag: e.g. power iteration converged, recorded at the certified radius). m0 [n]:
    the margin at radius 0 (the clean margin; points with m0 <= 0 are not searched and keep
    radius 0); guess [n]: the first radius tried; max_radius: None, a number or [n] radii
    not searched above; hint [n] (optional): the radius tried
    after a certified guess, before any extrapolation (the other certificate's upper end).
    Every trial radius is rounded to ``dtype`` first, so lo and hi are the radii evaluated.
    The points live on m0's device."""
    n, device = m0.numel(), m0.device
    f64 = dict(dtype=torch.float64, device=device)
    lo, m_lo = torch.zeros(n, **f64), m0.to(**f64).clone()
    hi, m_hi = torch.full((n,), math.inf, **f64), torch.full((n,), math.nan, **f64)
    prev, m_prev = torch.zeros(n, **f64), m_lo.clone()
    guess = guess.to(**f64)
    hint = None if hint is None else hint.to(**f64)
    evals = torch.zeros(n, dtype=torch.long, device=device)
    side = torch.zeros(n, dtype=torch.long, device=device)   # last step: +1 certified, -1 not
    flag = torch.ones(n, dtype=torch.bool, device=device)
    cap = torch.full((n,), math.inf if max_radius is None else 0.0, **f64)
    if max_radius is not None:
        cap = cap + torch.as_tensor(max_radius, **f64)

    def active_rows():
        open_ = (hi - lo > rtol * lo) & (lo < cap) & (evals < max_evals)
        return (open_ & ((lo > 0) | (m_lo > 0))).nonzero().flatten()

    rows = active_rows()
    while rows.numel():
        if progress.watched():       # evals.max() reads the device
            progress.stage("radius search, evaluation", int(evals.max()) + 1, max_evals,
                           f"{rows.numel()} of {n} points searching")
        r = rows
        eps = _next_radius(lo[r], m_lo[r], hi[r], m_hi[r], prev[r], m_prev[r], guess[r], rtol)
        if hint is not None:
            use = (evals[r] == 1) & (lo[r] > 0) & torch.isinf(hi[r]) & (hint[r] > lo[r])
            eps = torch.where(use, hint[r], eps)
        eps = torch.minimum(eps, cap[r]).to(dtype).double()
        cert, margin, fl = evaluate(eps, r)
        cert, margin, fl = cert.to(device), margin.to(**f64), fl.to(device)
        margin = torch.where(torch.isfinite(margin), margin,
                             torch.where(cert, torch.zeros_like(margin), -m_lo[r].abs()))
        evals[r] += 1
        up, dn = r[cert], r[~cert]
        # Illinois: an end kept on two bracketed steps in a row has its margin halved
        again_up = up[(side[up] > 0) & torch.isfinite(hi[up])]
        again_dn = dn[side[dn] < 0]
        m_hi[again_up] = m_hi[again_up] / 2
        m_lo[again_dn] = m_lo[again_dn] / 2
        side[up], side[dn] = 1, -1
        # a certified radius becomes the lower end (the old one the secant's second point)
        prev[up], m_prev[up] = lo[up], m_lo[up]
        lo[up], m_lo[up], flag[up] = eps[cert], margin[cert].clamp_min(0), fl[cert]
        hi[dn], m_hi[dn] = eps[~cert], margin[~cert].clamp_max(0)
        rows = active_rows()
    return Bracket(lo, hi, evals, flag)


def global_lipschitz_guess(model, y, m0, global_vectors, sniter, sigmas=None):
    """[batch] radii certified by the global bound alone, ignoring the box: the clean margin
    m0 [batch] over prod ||W_i||_2 * max_i ||w_i - w_y|| (the first radius the search tries).
    The norms: power iterations from ``global_vectors``, or ``sigmas`` {affine index: 0-dim}."""
    affine, layers = check_supported(model), layer_list(model)
    norms = {}
    for i in affine[:-1]:
        if sigmas is not None:
            sigma = sigmas[i]
        else:
            sigma, _, _ = global_power_iteration(layers[i], global_vectors[i].clone(), sniter)
        norms[i] = sigma.double().reshape(1)
    one = torch.ones(1, dtype=torch.float64, device=m0.device)
    prod = lipschitz_of(structure_terms(model), norms, one, log=False)[0]
    w = layers[affine[-1]].weight.double()
    diff = (w.unsqueeze(0) - w[y].unsqueeze(1)).norm(dim=2).max(1).values      # [batch]
    return m0.double().clamp_min(0) / (prod * diff).clamp_min(FLOOR)


def clean_margins(model, x, y):
    """[batch] margin of label y over the other logits at x; 0 where x is misclassified."""
    logits = model(x)
    zy = logits.gather(1, y.view(-1, 1))
    m0 = (zy - logits.scatter(1, y.view(-1, 1), float('-inf')).max(1, keepdim=True).values
          ).squeeze(1)
    return torch.where(logits.argmax(1) == y, m0, torch.zeros_like(m0))


def guaranteed_radius(model, x, y, m0, norms, search: RadiusSearch, top=None,
                      start=None) -> Bracket:
    """The guaranteed certified radius of every point of x [batch, ...] (labels y, clean
    margins m0 [batch]; norms a lanczos.GuaranteedNorms): the largest eps (to ``rtol``) at
    which the certificate holds with Lanczos upper bounds of every masked norm (``search``:
    rtol, max_radius, steps, opt_iter, bound, max_evals).

    The bounds come from one Lanczos run per point and layer (``steps`` steps) with the
    varying sets of a radius ``top`` above the point's radius: varying sets only grow with
    eps, so they bound the masked norms at every eps <= top, and the search below top only
    propagates boxes with them (a box-only evaluation, no Lanczos step). Where top comes
    from: given (the estimate search's failing radius, radius_batch), or placed by two
    coarse box-only searches, one with the global upper bounds (valid at every eps; to
    GLOBAL_COARSE) and one with the Ritz values (lower bounds, an estimate; to
    RADIUS_COARSE) of RITZ_STEPS Lanczos steps at the varying sets of the first one's
    failing radius; top is the second one's failing radius, widened by RADIUS_COARSE. A
    point certified at its top gets a new top from the Ritz values of its last run (at most
    RADIUS_ROUNDS runs); its radius comes from the bounds of its last run alone. Which run
    that is depends on the earlier runs' draws, so each run's bounds are drawn at
    delta_op / RADIUS_ROUNDS: a reported radius is false with probability <= norms.delta
    (the union over the rounds; none over the search's box-only steps is needed). A
    lower bound on what a fresh certificate at that radius gives (its own varying sets are
    smaller than top's, and it may run other step counts). Returns a Bracket: lo (the
    radius), hi (inf: certified at the last top or max_radius), evals (box-only
    evaluations, all searches)."""
    gs = _GuaranteedSearch(norms.network, x.double(), y, m0, norms, search)
    with torch.no_grad(), exact_float32():
        sel = (m0 > 0).nonzero().flatten()
        if sel.numel() > 0:
            tops = gs.placed_tops(sel) if top is None else gs.given_tops(sel, top, start)
            gs.search_below(sel, tops)
    return Bracket(gs.lo, gs.hi, gs.evals, torch.ones_like(m0, dtype=torch.bool))


@dataclass
class _Tops:
    """Per selected point [len(sel)]: the radius the Lanczos bounds are drawn at (t), a
    radius the searches start from (first) and the estimate's certified and failing radii
    (est_lo, est_hi)."""
    t: torch.Tensor
    first: torch.Tensor
    est_lo: torch.Tensor
    est_hi: torch.Tensor


class _GuaranteedSearch:
    """The state of ``guaranteed_radius``: the batch, its results lo/hi [batch] (float64)
    and box-only evaluations [batch], and the radius cap."""

    def __init__(self, model, x, y, m0, norms, search: RadiusSearch):
        self.model, self.x, self.y, self.m0 = model, x, y, m0
        self.norms, self.search = norms, search
        f64 = dict(dtype=torch.float64, device=x.device)
        b = x.shape[0]
        self.cap = torch.full((b,), math.inf, **f64)
        if search.max_radius is not None:
            self.cap = torch.minimum(self.cap,
                                     torch.as_tensor(search.max_radius, **f64).expand(b))
        self.evals = torch.zeros(b, dtype=torch.long, device=x.device)
        self.lo = torch.zeros(b, **f64)
        self.hi = torch.where(m0 > 0, math.inf, 0.0).to(**f64)

    def run(self, sel, bounds, first, tol, limit, hint=None):
        """bracket_search of the points ``sel`` with per-point norm bounds {i: [len(sel)]}."""
        x, y, s = self.x, self.y, self.search

        def evaluate(eps, rows):
            r = sel[rows]
            res = compute_bound(self.model, x[r], y[r], eps.to(x.dtype), None, None, sniter=0,
                                opt_iter=s.opt_iter, bound=s.bound, check=True,
                                global_sigmas=self.norms.upper,
                                local_norms=lambda i, *_: bounds[i][rows], rounding=True)
            return (res.certified(y[r]), res.margin(y[r]),
                    torch.ones(r.numel(), dtype=torch.bool, device=x.device))
        out = bracket_search(evaluate, self.m0[sel], first, tol, s.max_evals, limit,
                             hint=hint, dtype=x.dtype)
        self.evals[sel] += out.evals
        return out

    def placed(self, sel, lower, first) -> _Tops:
        """A coarse search of the points sel with the Ritz values ``lower`` (estimates of
        the masked norms): the radius it certified, the one where it failed, and top = that
        failing radius widened by RADIUS_COARSE (at least (1 + RADIUS_COARSE) first)."""
        est = self.run(sel, lower, first, RADIUS_COARSE, self.cap[sel])
        est_hi = torch.where(torch.isfinite(est.hi), est.hi, est.lo)
        t = torch.minimum(torch.maximum(est_hi, first) * (1 + RADIUS_COARSE), self.cap[sel])
        return _Tops(t, first, est.lo, est_hi)

    def placed_tops(self, sel) -> _Tops:
        """Tops from a coarse search with the global upper bounds, then one with the Ritz
        values at the varying sets of its failing radius."""
        x, y, m0, upper = self.x, self.y, self.m0, self.norms.upper
        guess = global_lipschitz_guess(self.model, y[sel], m0[sel], None, 0, upper)
        glob = {i: u.expand(sel.numel()) for i, u in upper.items()}
        g = self.run(sel, glob, guess, GLOBAL_COARSE, self.cap[sel])
        first = torch.where(g.lo > 0, g.lo, guess)
        at = torch.where(torch.isfinite(g.hi), g.hi, first)
        lower, _ = masked_norm_bounds(self.model, x[sel], y[sel], at.to(x.dtype), self.norms,
                                      steps=RITZ_STEPS, bound=self.search.bound)
        return self.placed(sel, lower, first)

    def given_tops(self, sel, top, start) -> _Tops:
        """Tops given by the caller (the estimate search's failing radii ``top`` and
        certified radii ``start``, [batch])."""
        first = start.to(self.lo)[sel]
        t = torch.minimum(top.to(self.lo)[sel], self.cap[sel])
        return _Tops(t, first, first, t)

    def search_below(self, sel, tops: _Tops):
        """Up to RADIUS_ROUNDS Lanczos runs at the tops, each followed by a box-only search
        below its top; a point certified at its top gets a higher one."""
        x, y, s = self.x, self.y, self.search
        for rnd in range(RADIUS_ROUNDS):
            # which round's bounds a radius rests on depends on the earlier rounds' draws:
            # each round gets delta_op / RADIUS_ROUNDS, so the union over rounds is delta_op
            lower, upper = masked_norm_bounds(self.model, x[sel], y[sel], tops.t.to(x.dtype),
                                              self.norms, steps=s.steps, bound=s.bound,
                                              delta_op=self.norms.delta_op / RADIUS_ROUNDS)
            g = self.run(sel, upper, _first_guess(tops, lower, upper), s.rtol, tops.t,
                         torch.minimum(tops.est_hi, tops.t))
            self.lo[sel], self.hi[sel] = g.lo, g.hi
            again = torch.isinf(g.hi) & (g.lo >= tops.t) & (tops.t < self.cap[sel])
            if rnd == RADIUS_ROUNDS - 1 or not again.any():
                return
            keep = again.nonzero().flatten()
            sel, first = sel[keep], g.lo[keep]
            tops = self.placed(sel, {i: v[keep] for i, v in lower.items()}, first)
            tops.t = torch.minimum(torch.maximum(tops.t, first * 1.5), self.cap[sel])


def _first_guess(tops: _Tops, lower, upper) -> torch.Tensor:
    """Where the search below a top starts: the estimate's radius scaled by how much the
    upper bounds exceed the Ritz values (a radius scales at most inversely with the norms),
    less 2 RADIUS_COARSE (certified, as a rule), within [min(first, t), t]; it then tries
    the estimate's failing radius (failing, as a rule) and regula falsi between the two."""
    ratio = torch.ones_like(tops.est_lo)          # a network without norms: 1
    for i in upper:
        ratio = ratio * (lower[i] / upper[i].clamp_min(FLOOR)).double()
    guess = tops.est_lo * ratio * (1 - 2 * RADIUS_COARSE)
    return torch.minimum(torch.maximum(guess, torch.minimum(tops.first, tops.t)), tops.t)


def radius_batch(model, x, y, global_vectors, search: RadiusSearch, *, norms=None,
                 vectors=None, reference: bool = True) -> RadiusResult:
    """Certified radius of every point of a batch x [batch, ...] with labels y [batch]: the
    largest L2 eps (to relative tolerance ``search.rtol``) at which the Local-Lip
    certificate holds, by a bracketing search on eps (regula falsi on the worst-case margin,
    Illinois rule; see bracket_search). Valid because the certificate is monotone in eps:
    the input box grows with eps, so every later box grows, every varying set only gains
    neurons, and the exact masked norms (submatrices of larger ones) only grow, as does the
    ball radius; the worst-case margin is a maximum over a growing set (exact when the
    worst-case-logit rounds finish, as at opt_iter 1000), so it only falls. With
    power-iteration estimates (the reference certificate) the computed norms need not be
    monotone: the search reports a radius at which the certificate was computed to hold
    (radius) and one above it at which it was computed to fail (radius_upper).

    global_vectors: {affine index: converged global vector} (converged_global_vectors),
    not changed (unused without ``reference``). vectors: optional {layer: [batch, *shape]}
    starting vectors (e.g. of a fixed-radius certification of the same batch); each
    evaluation of the search starts from the vectors of the point's previous one.
    reference: run the estimate search (power iteration; default). norms: a
    GuaranteedNorms: also the guaranteed radius (guaranteed_radius), its bounds computed at
    the varying sets of the estimate search's failing radius when that search runs, else
    placed by Ritz values."""
    if not reference and norms is None:
        raise ValueError("radius_batch: nothing to search (reference=False and no norms)")
    out, top, start = RadiusResult(), None, None
    with torch.no_grad(), exact_float32():
        m0 = clean_margins(model, x, y)
        if reference:
            ref, guess = _estimate_search(model, x, y, m0, global_vectors, search, vectors)
            out = RadiusResult(ref.lo.cpu(), ref.hi.cpu(), ref.evals.cpu(), ref.flag.cpu())
            # the guaranteed bounds at the varying sets of the estimate's failing radius
            top = torch.where(torch.isfinite(ref.hi), ref.hi, ref.lo)
            top = torch.where(top > 0, top, guess)
            start = torch.where(ref.lo > 0, ref.lo, guess)
    if norms is not None:
        g = guaranteed_radius(model, x, y, m0, norms, search, top=top, start=start)
        out.radius_guaranteed, out.radius_guaranteed_upper = g.lo.cpu(), g.hi.cpu()
        out.evals_guaranteed = g.evals.cpu()
    return out


def _estimate_search(model, x, y, m0, global_vectors, search: RadiusSearch, vectors=None):
    """(Bracket, first guess) of the estimate (power-iteration) search of radius_batch."""
    gv = {k: v.clone() for k, v in global_vectors.items()}
    vecs = SubsetVectors(x.shape[0], x.device)
    if vectors:
        vecs.kept = {k: v.clone() for k, v in vectors.items()}
    guess = global_lipschitz_guess(model, y, m0, gv, search.sniter)

    def evaluate(eps, rows):
        vecs.idx = rows
        res = compute_bound(model, x[rows], y[rows], eps.to(x.dtype), vecs, gv,
                            sniter=search.sniter, opt_iter=search.opt_iter, bound=search.bound,
                            check=True, estimate=search.estimate)
        return res.certified(y[rows]), res.margin(y[rows]), res.converged

    ref = bracket_search(evaluate, m0, guess, search.rtol, search.max_evals, search.max_radius,
                         dtype=x.dtype)
    return ref, guess
