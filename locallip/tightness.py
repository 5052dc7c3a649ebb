"""How far the bound is from the truth: an empirical LOWER bound of the local Lipschitz
constant of the network's penultimate features h (``layers.features``) on the L2 ball
``{x : ||x - x0||_2 <= eps}``, the constant that ``BoundResult.r_local / eps`` bounds from
above.

Two kinds of witness, each a lower bound by definition (the Lipschitz constant on the ball
is the supremum of both):
  * secant ratios ||h(a) - h(b)||_2 / ||a - b||_2 of points a, b of the ball, raised by
    projected gradient ascent on (a, b) from random pairs;
  * Jacobian spectral norms ||J_h(p)||_2 at the ascent's final points p (strictly inside the
    ball), by power iteration on J^T J started from the pair's direction; each iterate's
    ||J u|| (u a unit vector) is below ||J_h(p)||_2.
The result is the largest witness found: [batch]. Without exact arithmetic a witness is
exact to float rounding (compute it in float64 to compare it with a bound to ~1e-12).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from locallip import progress
from locallip.layers import features
from locallip.operators import NORM_FLOOR

INSIDE = 1 - 1e-3      # final points are kept this far inside the ball (Jacobians interior)


@dataclass(frozen=True)
class LowerSearch:
    """The ascent's budget (per input)."""
    pairs: int = 4            # random starting pairs (a, b) of the ball
    steps: int = 20           # projected gradient-ascent steps on the secant ratio
    step_size: float = 0.25   # each step moves a and b by this fraction of eps
    power_iters: int = 20     # power iterations for ||J_h(p)||_2 at each final point
    seed: int = 0             # the starting pairs' random stream


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _project(x0: torch.Tensor, p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """p moved into the ball of radius INSIDE * eps around x0 (per row)."""
    d = p - x0
    scale = (INSIDE * eps / _norms(d).clamp_min(NORM_FLOOR)).clamp(max=1.0)
    return x0 + d * _bc(scale, d)


def _secant_ascent(h: nn.Module, x0, eps, search: LowerSearch, gen):
    """(best ratio per row, final a, final b) of projected ascent on the secant ratio;
    x0 [rows, ...] and eps [rows] repeat each input ``pairs`` times."""
    d = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    d = d * _bc(0.5 * eps / _norms(d).clamp_min(NORM_FLOOR), d)
    a, b = _project(x0, x0 + d, eps), _project(x0, x0 - d, eps)
    best = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    for k in range(search.steps + 1):
        a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        ratio = _norms(h(a) - h(b)) / _norms(a - b).clamp_min(NORM_FLOOR)
        best = torch.maximum(best, ratio.detach())
        if k == search.steps:
            break
        ga, gb = torch.autograd.grad(torch.log(ratio.clamp_min(NORM_FLOOR)).sum(), (a, b))
        step = _bc(search.step_size * eps, ga)
        with torch.no_grad():
            a = _project(x0, a + step * ga / _bc(_norms(ga).clamp_min(NORM_FLOOR), ga), eps)
            b = _project(x0, b + step * gb / _bc(_norms(gb).clamp_min(NORM_FLOOR), gb), eps)
        progress.stage("lower bound: secant ascent", k + 1, search.steps)
    return best, a.detach(), b.detach()


def jacobian_norm(h: nn.Module, p: torch.Tensor, u: torch.Tensor, iters: int) -> torch.Tensor:
    """A lower estimate of ||J_h(p)||_2 per row of p [rows, ...]: the largest ||J u|| over
    ``iters`` power iterations on J^T J from u [rows, ...] (J u by a double vector-Jacobian
    product, J^T v by one). [rows]"""
    p = p.detach().requires_grad_(True)
    with torch.enable_grad():
        out = h(p)
        w = torch.zeros_like(out, requires_grad=True)
        jtw, = torch.autograd.grad(out, p, w, create_graph=True)          # J^T w, linear in w
        best = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
        for k in range(iters):
            progress.stage("lower bound: Jacobian power iteration", k + 1, iters)
            u = u / _bc(_norms(u).clamp_min(NORM_FLOOR), u)
            ju, = torch.autograd.grad(jtw, w, u, retain_graph=True)       # J u
            best = torch.maximum(best, _norms(ju).detach())
            u, = torch.autograd.grad(out, p, ju, retain_graph=True)       # J^T J u
            if not (_norms(u) > 0).any():
                break
    return best


def lipschitz_lower_bound(model: nn.Module, x: torch.Tensor, eps, search: LowerSearch = None
                          ) -> torch.Tensor:
    """The largest witness (secant ratio or Jacobian norm, module docstring) of the local
    Lipschitz constant of ``model``'s penultimate features on the L2 eps-ball around every
    row of x [batch, *input_shape] (eps: a number or [batch] radii). A lower bound of that
    constant, so never above a sound upper bound (``BoundResult.r_local / eps``). The model
    must be in eval mode (BatchNorm folded or eval). [batch]"""
    search = search or LowerSearch()
    h = features(model)
    n, k = x.shape[0], search.pairs
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(n)
    gen = torch.Generator(device=x.device).manual_seed(search.seed)
    x0 = x.detach().repeat_interleave(k, 0)
    e0 = eps.repeat_interleave(k)
    progress.task("lower bound of the local Lipschitz constant")
    with torch.enable_grad():
        best, a, b = _secant_ascent(h, x0, e0, search, gen)
        direction = a - b
        for where, p in (('first ascent points', a), ('second ascent points', b),
                         ('centres', x0)):
            progress.task(f"lower bound: Jacobian norms at the {where}")
            best = torch.maximum(best, jacobian_norm(h, p, direction, search.power_iters))
    return best.view(n, k).amax(1)
