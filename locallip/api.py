"""The public Python API: the local Lipschitz bound, certificates and certified radii of
any supported ``nn.Sequential`` (one's own network included), on CPU or GPU.

    import torch, torch.nn as nn, locallip
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 13 * 13, 10)).eval()
    x = torch.rand(4, 1, 28, 28)
    b = locallip.lipschitz_bound(net, x, eps=0.1)         # b.local, b.global_, b.sigmas ...
    c = locallip.certify(net, x, eps=[0.05, 0.1])          # {eps: [batch] bool}
    r = locallip.certified_radius(net, x)                   # r.radius [batch]

Everything is about L2 balls {x' : ||x' - x||_2 <= eps} around each input. Labels default
to the model's own predictions (what is certified is then that the prediction cannot
change inside the ball); pass ``y`` to certify against true labels (a misclassified point
is never certified). Inputs get a batch axis added when they lack one. The model is put
through ``layers.fold_batchnorm`` (eval-mode BatchNorm folded into affine layers) and
must be in eval mode when it holds BatchNorm or Dropout. Tensors follow the model's device.
Every call checks its inputs first (a one-line ValueError naming ``x``, ``y``, ``eps`` or
``delta``), reads the model afresh (its forward traced as it runs now; forward hooks and
attributes replaced on an instance refused) and compares the network the bound reads with
the model's own forward on ``x`` (``tracing.verify``, docs/method.md).

Certificates: ``'reference'`` uses power-iteration estimates of the masked spectral norms
(as the paper's release; approached from below, so a certificate is as good as their
convergence); ``'guaranteed'`` uses Lanczos upper bounds (lanczos.py) and each certificate
is false with probability at most ``delta`` over the algorithm's random starts.
"""
import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from locallip.bound import CONVERGED_SNITER, FLOOR, TEST_OPT_ITER, compute_bound, exact_float32
from locallip.certificates import converged_global_vectors, guaranteed_certify
from locallip.checkpoints import load_checkpoint
from locallip.errors import UnsupportedModel
from locallip.lanczos import GuaranteedNorms
from locallip.layers import NOOPS, POOLS, SUPPORTED, check_supported, fold_batchnorm, layer_list
from locallip.operators import TOL
from locallip.radius import RADIUS_RTOL, RADIUS_STEPS, RadiusSearch, radius_batch
from locallip.tightness import LowerSearch, lipschitz_lower_bound
from locallip.tracing import refresh, verify
from locallip.vectors import KeptVectors, RandomVectors

SNITER = CONVERGED_SNITER   # per-sample power iterations at most (each stops at ``tol``)
OPT_ITER = TEST_OPT_ITER    # worst-case-logit rounds (exact once they finish; sound at any count)
DELTA = 1e-4        # failure probability of a guaranteed certificate / radius


@dataclass
class LipschitzBound:
    """Per-sample results of ``lipschitz_bound`` (all [batch] unless said otherwise)."""
    local: torch.Tensor          # prod_i ||D_out W_i D_in||_2 over the affine layers before
    #                              the logit layer: a Lipschitz bound of the penultimate
    #                              features on the ball (the method's local bound)
    global_: torch.Tensor        # prod_i ||W_i||_2 over the same layers (global bound)
    margin: torch.Tensor         # worst-case margin of label y over the ball (> 0: certified)
    certified: torch.Tensor      # bool: correct and margin > 0
    converged: torch.Tensor      # bool: every per-sample power iteration met ``tol``
    global_converged: bool       # every global power iteration met its tolerance
    sigmas: Dict[int, torch.Tensor] = field(default_factory=dict)   # module index -> [batch]
    varying: Dict[int, torch.Tensor] = field(default_factory=dict)  # activation index ->
    #                              [batch] fraction of its neurons that can vary in the ball
    logits: Optional[torch.Tensor] = None    # [batch, classes] clean logits
    labels: Optional[torch.Tensor] = None    # [batch] the labels certified
    lower: Optional[torch.Tensor] = None     # [batch] an empirical LOWER bound of the local
    #                              constant that ``local`` bounds (tightness.py): the truth
    #                              lies in [lower, local]; None with lower=False


@dataclass
class CertifiedRadius:
    """Per-sample results of ``certified_radius`` ([batch], CPU; radius and upper in the
    model's dtype, the one its bounds are computed in: float32 for a float32 model)."""
    radius: torch.Tensor         # largest eps found certified (0: not even at eps -> 0)
    upper: torch.Tensor          # smallest eps found NOT certified (inf: never failed, e.g.
    #                              max_radius reached); upper <= radius (1 + rtol) otherwise
    evaluations: torch.Tensor    # bound evaluations spent on the point
    converged: torch.Tensor      # 'reference': power iterations converged at ``radius``
    #                              ('guaranteed': all True, no power iteration)
    certificate: str = 'reference'
    delta: Optional[float] = None            # 'guaranteed': P(some radius is wrong) <= delta


def load_weights(model: nn.Module, path: str) -> dict:
    """Load the checkpoint at ``path`` ({'state_dict': ...}, as the training loop and the reference
    write them, or a bare state_dict) into ``model``; returns the checkpoint dict. Safe: the
    file is read with torch.load(weights_only=True), and one that needs arbitrary unpickling
    (code to run, a whole pickled module) is refused with errors.UserError naming it."""
    return load_checkpoint(path, model, next(model.parameters()).device)


def prepare(model: nn.Module) -> nn.Sequential:
    """The model as the bound walks it, read afresh (``tracing.refresh``: its forward is
    traced as it runs now): BatchNorm folded (a copy when there is any), every layer
    checked. Raises ``UnsupportedModel`` (a ValueError) naming the first module that
    cannot be bounded and what is accepted: a model that is not an nn.Sequential, a layer
    outside ``SUPPORTED``, BatchNorm / Dropout in training mode, no Linear logit layer, a
    forward hook, a forward replaced on an instance."""
    try:
        refresh(model)
        folded = fold_batchnorm(model)
        check_supported(folded)
    except UnsupportedModel as refusal:
        # the refusal is about the caller's model: report it from the API call itself, with
        # no internal frames (the message names the module; the stack would not help)
        raise refusal.with_traceback(None) from None
    return folded


@dataclass
class _Call:
    """One API call's network and inputs, checked."""
    net: nn.Module           # the network the bound reads (``prepare``)
    x: torch.Tensor          # [batch, *input_shape] on the model's device and dtype
    y: torch.Tensor          # [batch] labels (the predictions when none were given)


def _checked_call(model: nn.Module, x, y) -> _Call:
    """``prepare`` the model, check x and y, and ``tracing.verify`` on x that the network
    the bound reads is the model's own forward. Raises ValueError / UnsupportedModel."""
    net = prepare(model)
    x = _batched(net, x)
    try:
        verify(net, x)
    except ValueError as refusal:      # UnsupportedModel, or an x the model cannot take
        raise refusal.with_traceback(None) from None
    return _Call(net, x, _labels(net, x, y))


def _first_layer(model: nn.Module) -> Optional[nn.Module]:
    return next((m for m in layer_list(model) if not isinstance(m, NOOPS)), None)


def _batched(model: nn.Sequential, x) -> torch.Tensor:
    """x on the model's device and dtype with a batch axis: [batch, *input_shape]."""
    p = next(model.parameters())
    x = torch.as_tensor(x).to(device=p.device, dtype=p.dtype)
    first = _first_layer(model)
    if isinstance(first, (nn.Conv2d,) + POOLS) and x.dim() == 3:
        x = x.unsqueeze(0)
    elif isinstance(first, nn.Linear) and x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [batch, *input_shape] with at least one input, got shape "
                         f"{tuple(x.shape)}")
    _check_x(first, x)
    return x


def _check_x(first: Optional[nn.Module], x: torch.Tensor) -> None:
    """Refuse, naming ``x``, NaN / infinite values and a shape the first layer cannot take
    (a Conv2d's channels, a first Linear's features)."""
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bad.any():
        raise ValueError(f"x holds NaN or infinite values (input {int(bad.nonzero()[0])} of "
                         f"{x.shape[0]}): only finite inputs can be certified")
    if isinstance(first, nn.Conv2d) and (x.dim() != 4 or x.shape[1] != first.in_channels):
        raise ValueError(f"x has shape {tuple(x.shape)}; the model's first layer, a Conv2d, "
                         f"takes [batch, {first.in_channels}, height, width]")
    if isinstance(first, nn.Linear) and (x.dim() != 2 or x.shape[1] != first.in_features):
        raise ValueError(f"x has shape {tuple(x.shape)}; the model's first layer, a Linear, "
                         f"takes [batch, {first.in_features}]")


def _labels(model, x, y) -> torch.Tensor:
    """[batch] labels: ``y`` checked (integers in [0, classes)), or the predictions."""
    if y is None:
        with torch.no_grad():
            return model(x).argmax(1)
    y = torch.as_tensor(y, device=x.device)
    classes = layer_list(model)[check_supported(model)[-1]].out_features
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError(f"y must hold class labels (integers), got {y.flatten()[:4].tolist()}")
    y = y.long().reshape(-1)
    if y.numel() == 1 and x.shape[0] > 1:
        y = y.expand(x.shape[0])
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels for a batch of {x.shape[0]} inputs")
    if bool(((y < 0) | (y >= classes)).any()):
        raise ValueError(f"y must hold class labels in [0, {classes}), got {y.tolist()[:8]}")
    return y


def _check_eps(eps) -> float:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(eps)


def _check_certificate(certificate: str, delta) -> None:
    if certificate not in ('reference', 'guaranteed'):
        raise ValueError(f"certificate must be 'reference' or 'guaranteed', got {certificate!r}")
    if certificate == 'guaranteed' and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@contextlib.contextmanager
def _seeded(seed: int, device):
    """Draws from torch's default generators inside are seeded by ``seed``; the caller's
    generator states are restored on exit."""
    devices = [device] if torch.device(device).type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _global_vectors(model, x, sniter, seed):
    return converged_global_vectors(model, tuple(x.shape[1:]), sniter, seed, x.device)


def lipschitz_bound(model: nn.Module, x, eps: float, y=None, *, sniter: int = SNITER,
                    tol: float = TOL, opt_iter: int = OPT_ITER, bound: str = 'local',
                    seed: int = 0, lower: bool = True) -> LipschitzBound:
    """The local Lipschitz bound of ``model`` on the L2 eps-ball around every input.

    x: [batch, *input_shape] (or one input without the batch axis); y: [batch] labels or
    None (the predictions). Per-sample power iterations start from seeded Gaussian vectors
    and stop at relative change ``tol`` (at most ``sniter``); the global norms are
    iterated to convergence once per call. bound='global' sets every indicator to 1.
    ``lower``: also the empirical lower bound of the local constant (``tightness``, seeded
    by ``seed``; about 2 x 20 forward-backward passes per input).
    Returns a LipschitzBound (per-sample tensors on the model's device)."""
    eps = _check_eps(eps)
    call = _checked_call(model, x, y)
    net, x, y = call.net, call.x, call.y
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with torch.no_grad(), exact_float32():
        gv = _global_vectors(net, x, sniter, seed)
        res = compute_bound(net, x, y, float(eps), RandomVectors(x.shape[0], x.device, gen), gv,
                            sniter=sniter, tol=tol, opt_iter=opt_iter, bound=bound,
                            check=True)
    safe = max(float(eps), FLOOR)
    low = lipschitz_lower_bound(net, x, float(eps), LowerSearch(seed=seed)) if lower else None
    return LipschitzBound(local=res.r_local / safe, global_=res.r_global / safe, lower=low,
                          margin=res.margin(y), certified=res.certified(y),
                          converged=res.converged, global_converged=bool(res.global_converged),
                          sigmas=dict(res.sigmas),
                          varying={i: d.flatten(1).mean(1) for i, d in res.masks.items()},
                          logits=res.logits, labels=y)


def _as_radii(eps) -> list:
    radii = [float(e) for e in (eps if isinstance(eps, (list, tuple)) else [eps])]
    if not radii or not all(e >= 0 for e in radii):
        raise ValueError(f"eps must be one or several radii >= 0, got {eps}")
    return radii


_NORMS = weakref.WeakKeyDictionary()     # model -> (what they were drawn for, GuaranteedNorms)


def _guaranteed_norms(model: nn.Module, net: nn.Module, shape: tuple, delta: float,
                      seed: int) -> GuaranteedNorms:
    """The GuaranteedNorms of ``net`` (``model`` prepared), kept per model and reused while
    the network (its structure, every parameter and buffer, each tensor's version counter)
    and the arguments are the same: the global bounds are drawn once from ``seed``, as one
    evaluation does for all its batches (each certificate stays false with probability
    <= delta)."""
    state = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape)
                  for t in model.state_dict(keep_vars=True).values())
    key = (str(net), state, shape, delta, seed)
    hit = _NORMS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    norms = GuaranteedNorms(net, shape, delta, generator_seed=seed)
    _NORMS[model] = (key, norms)
    return norms


def certify(model: nn.Module, x, y=None, eps: Union[float, Sequence[float]] = 0.5, *,
            certificate: str = 'reference', delta: float = DELTA, sniter: int = SNITER,
            tol: float = TOL, opt_iter: int = OPT_ITER, seed: int = 0) -> Dict[float, torch.Tensor]:
    """{eps: [batch] bool} certificates of the L2 eps-balls around x at one or several
    radii: the label (y, or the prediction) provably cannot change inside the ball.
    certificate='reference' (power-iteration estimates, each radius warm-started from the
    previous one's vectors) or 'guaranteed' (Lanczos upper bounds: each certificate false
    with probability <= delta)."""
    radii = _as_radii(eps)
    _check_certificate(certificate, delta)
    call = _checked_call(model, x, y)
    net, x, y = call.net, call.x, call.y
    out = {}
    if certificate == 'reference':
        gen = torch.Generator(device=x.device).manual_seed(seed)
        vecs = KeptVectors(x.shape[0], x.device, gen)
        with torch.no_grad(), exact_float32():
            gv = _global_vectors(net, x, sniter, seed)
            for e in sorted(radii):
                res = compute_bound(net, x, y, e, vecs, gv, sniter=sniter, tol=tol,
                                    opt_iter=opt_iter, check=True)
                out[e] = res.certified(y)
    else:
        norms = _guaranteed_norms(model, net, tuple(x.shape[1:]), delta, seed)
        with torch.no_grad(), _seeded(seed, x.device):
            for e in sorted(radii):
                out[e] = guaranteed_certify(net, x, y, e, norms, opt_iter=opt_iter).certified
    return {e: out[e] for e in radii}


def certified_radius(model: nn.Module, x, y=None, *, certificate: str = 'reference',
                     delta: float = DELTA, rtol: float = RADIUS_RTOL,
                     max_radius: Optional[float] = None, sniter: int = SNITER,
                     opt_iter: int = OPT_ITER, steps: int = RADIUS_STEPS,
                     seed: int = 0) -> CertifiedRadius:
    """The certified radius of every input: the largest L2 eps at which it is certified,
    found to relative tolerance ``rtol`` (radius certified, upper <= radius (1 + rtol) not).

    The search brackets eps by the worst-case margin (regula falsi, Illinois rule; the
    global bound's radius first, then secant steps until a radius fails), each point
    stopping on its own. It is valid because the certificate is monotone in eps: the input
    box grows with eps, so every later box grows, varying sets only gain neurons and exact
    masked norms (norms of larger submatrices) only grow, and the worst-case margin is a
    maximum over a growing set.

    'reference': the norms are power-iteration estimates, every step warm-started from the
    point's previous vectors. Estimates need not be monotone: the certificate was computed
    to hold at ``radius`` and to fail at ``upper``, but a fresh evaluation near them can
    differ (at rtol 1e-3, a few percent of points flip at radius (1 +- rtol)).

    'guaranteed' (no power iteration): the Lanczos upper bounds of every masked norm
    (``steps`` steps) are computed once per point, with the varying sets of a radius above
    the point's radius (placed by a coarse search with the global upper bounds, then one
    with Ritz-value estimates); they hold at every smaller radius, and the search below it
    only propagates boxes with them. Every step rests on the same bounds, each of the (at
    most 3) rounds of bounds at a third of delta, so the reported radius is certified with
    probability >= 1 - delta (over the random starts), floating-point rounding included
    (docs/method.md). It is a lower bound: a fresh ``certify(...,
    certificate='guaranteed')`` holds at it (with probability >= 1 - delta) and may hold a
    little above ``upper``, since its own varying sets are smaller than the ones the
    search's bounds used and it may run other step counts. Fewer ``steps`` are faster and
    looser (each Lanczos bound is inflated by its failure probability: on the bundled
    Fashion-MNIST model the median radius is 0.5% below the estimate search's with 256
    steps, 6% below with 32).
    ``max_radius``: stop searching above this radius (radius = max_radius, upper = inf)."""
    _check_certificate(certificate, delta)
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    if int(steps) != steps or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps}")
    call = _checked_call(model, x, y)
    net, x, y = call.net, call.x, call.y
    norms = None
    if certificate == 'guaranteed':
        norms = _guaranteed_norms(model, net, tuple(x.shape[1:]), delta, seed)
    with torch.no_grad(), _seeded(seed, x.device):
        gv = None if norms is not None else _global_vectors(net, x, sniter, seed)
        search = RadiusSearch(sniter=sniter, opt_iter=opt_iter, rtol=rtol, max_radius=max_radius,
                              steps=int(steps))
        r = radius_batch(net, x, y, gv, search, norms=norms, reference=norms is None)
    dtype = x.dtype
    if norms is None:
        return CertifiedRadius(_rounded(r.radius, dtype, down=True),
                               _rounded(r.radius_upper, dtype, down=False), r.evals, r.converged)
    found = _rounded(r.radius_guaranteed, dtype, down=True)
    return CertifiedRadius(found, _rounded(r.radius_guaranteed_upper, dtype, down=False),
                           r.evals_guaranteed, torch.ones(found.shape, dtype=torch.bool),
                           'guaranteed', delta)


def _rounded(t: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """``t`` (the search's float64 radii) in the model's ``dtype``, rounded toward 0 (a
    certified radius must not grow by rounding) or away from it (a failed one)."""
    out = t.to(dtype)
    wrong = out.double() > t if down else out.double() < t
    step = torch.full_like(out, 0.0 if down else math.inf)
    return torch.where(wrong, torch.nextafter(out, step), out)


__all__ = ['LipschitzBound', 'CertifiedRadius', 'UnsupportedModel', 'SUPPORTED', 'load_weights',
           'prepare', 'lipschitz_bound', 'certify', 'certified_radius', 'SNITER', 'OPT_ITER',
           'DELTA']
