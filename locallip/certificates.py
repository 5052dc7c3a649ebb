"""Certificates at a radius, both kinds.

The reference certificate (the paper's): power-iteration estimates of every masked spectral
norm; one batch at one radius (every per-sample number the reports use), every batch of a
loader (training's per-epoch test), and the global power-iteration vectors an evaluation
starts every batch from.

The guaranteed certificate (``evaluate.py --certificate guaranteed``): every norm an upper
bound (``lanczos.py``), decided in stages: first every sample with the global upper bounds
(stage 0); then Lanczos on the remaining correctly classified samples, and at each stage k
in ``lanczos.STAGES`` a sample is decided: certified with the upper bounds, or hopeless when
even the Ritz values (lower bounds, no inflation) do not certify it.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from locallip import progress
from locallip.bound import (FLOOR, BoundResult, compute_bound, exact_float32, rounded_margins,
                            rounded_radius)
from locallip.lanczos import STAGES, GuaranteedNorms, Lanczos, is_full, masked_operators
from locallip.layers import check_supported, layer_input_shapes, layer_list
from locallip.operators import global_power_iteration, global_vector_shape
from locallip.runtime import GLOBAL_STREAM, derived_seed
from locallip.vectors import RandomVectors


@dataclass
class BatchCertificate:
    """certify_batch's result: per-sample CPU tensors [batch] at one L2 radius."""
    pred: torch.Tensor
    correct: torch.Tensor                # bool
    certified: torch.Tensor              # bool, with the chosen bound
    certified_global: torch.Tensor       # bool, with the global bound (same box)
    margin: torch.Tensor                 # worst-case margin (> 0: certified)
    lip_local: torch.Tensor              # prod_i sigma_i (the local bound)
    lip_global: torch.Tensor             # prod_i ||W_i||_2
    converged: torch.Tensor              # bool: every per-sample power iteration converged
    varying: Dict[int, torch.Tensor] = field(default_factory=dict)   # activation index ->
    #                                      fraction of its neurons that vary in the ball
    global_converged: bool = True        # every global power iteration converged
    certified_guaranteed: Optional[torch.Tensor] = None   # set by evaluation.py (guaranteed)
    lip_guaranteed: Optional[torch.Tensor] = None


def certify_batch(model, x, y, eps, vectors, global_vectors, *, sniter, opt_iter, bound='local',
                  estimate='bilinear') -> BatchCertificate:
    """Certify one batch x [batch, ...] with labels y [batch] at L2 radius ``eps``."""
    with torch.no_grad(), exact_float32():
        res = compute_bound(model, x, y, eps, vectors, global_vectors, sniter=sniter,
                            opt_iter=opt_iter, bound=bound, check=True, also_global=True,
                            estimate=estimate)
    pred = res.logits.argmax(1)
    safe = max(float(eps), FLOOR)
    cpu = lambda t: t.detach().cpu()
    return BatchCertificate(
        cpu(pred), cpu(pred == y), cpu(res.certified(y)), cpu(res.certified(y, res.worst_global)),
        cpu(res.margin(y)), cpu(res.r_local / safe), cpu(res.r_global / safe),
        cpu(res.converged), {i: d.flatten(1).mean(1).cpu() for i, d in res.masks.items()},
        bool(res.global_converged))


@dataclass
class LoaderCertificate:
    """certify_loader's result: per-sample CPU tensors [n] over the whole loader."""
    idx: torch.Tensor                    # the loader's sample indices
    label: torch.Tensor
    pred: torch.Tensor
    correct: torch.Tensor                # bool
    certified: torch.Tensor              # bool
    margin: torch.Tensor
    converged: torch.Tensor              # bool


def certify_loader(model, loader, eps, device, *, store=None, global_vectors=None,
                   desc='certify', heartbeat=False, **switches) -> LoaderCertificate:
    """Certify every sample of ``loader`` at ``eps`` (training-time test evaluation).
    store: a VectorStore to warm-start from, or None for fresh random vectors;
    global_vectors: updated in place (warm start); switches: certify_batch's sniter,
    opt_iter, bound, estimate. Progress: a bar on a terminal, with the stage inside the
    batch; without one and with ``heartbeat``, a line while a batch runs long."""
    model.eval()
    global_vectors = {} if global_vectors is None else global_vectors
    parts = []
    bar = tqdm(loader, desc=desc, leave=False, disable=None)
    with progress.shown(bar, heartbeat) as beat:
        for bi, (x, y, idx) in enumerate(bar):
            beat.status = f"  {desc}: batch {bi + 1}/{len(loader)} running"
            progress.task(f"certifying at eps {eps:g}")
            x, y = x.to(device), y.to(device)
            vecs = RandomVectors(x.shape[0], device) if store is None else store.batch(idx, device)
            r = certify_batch(model, x, y, eps, vecs, global_vectors, **switches)
            parts.append((idx, y.cpu(), r.pred, r.correct, r.certified, r.margin, r.converged))
    return LoaderCertificate(*(torch.cat(column) for column in zip(*parts)))


GLOBAL_ROUNDS = 10   # once-per-evaluation global vectors: up to this many rounds of sniter


def converged_global_vectors(model, input_shape, sniter, seed, device):
    """{affine layer: its global power-iteration vector [1, *global_vector_shape]} for inputs of
    ``input_shape`` (one sample, no batch axis), iterated from a seeded Gaussian start to
    tolerance 1e-4, in rounds of ``sniter`` iterations, at most GLOBAL_ROUNDS of them, once
    per evaluation; certification starts every batch from these. (The reference carries
    its global vectors from batch to batch, ``sniter`` more iterations per batch; a layer
    whose top singular values nearly coincide, like the first convolution of the bundled
    Fashion-MNIST model, needs more than 2000 iterations to meet the tolerance.)"""
    shapes = layer_input_shapes(model, tuple(input_shape))
    gen = torch.Generator(device=device).manual_seed(derived_seed(seed, GLOBAL_STREAM))
    dtype = next(model.parameters()).dtype
    out, layers = {}, layer_list(model)
    with torch.no_grad(), exact_float32():
        for i, shape in shapes.items():
            progress.task(f"global vectors of layer {i} (once per evaluation)")
            u = torch.randn((1, *global_vector_shape(layers[i], shape)), generator=gen,
                            device=device, dtype=dtype)
            for _ in range(GLOBAL_ROUNDS):
                _, u, converged = global_power_iteration(layers[i], u, sniter)
                if converged:
                    break
            out[i] = u
    return out


@dataclass
class GuaranteedCertificate:
    """guaranteed_certify's result: per-sample tensors [batch] on x's device."""
    certified: torch.Tensor      # bool
    lip: torch.Tensor            # the product of the norm upper bounds used (the guaranteed
    #                              local Lipschitz bound when certified or still undecided at
    #                              the last stage, else the bound at the stage that decided)
    steps: torch.Tensor          # largest Lanczos steps run on any of the sample's layers
    #                              (0: decided with the global bounds)
    margin: torch.Tensor         # the worst-case margin with those bounds


def guaranteed_certify(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps,
                       norms: GuaranteedNorms, *, opt_iter: int, bound: str = 'local',
                       stages: Sequence[int] = STAGES) -> GuaranteedCertificate:
    """Certificates of the local bound on the L2 eps-balls around x [batch, ...] (labels y
    [batch]; eps a number or [batch] radii) of ``model``, computed on norms.network (its
    float64 copy, made by the GuaranteedNorms of this model) in float64 and decided past the
    rounding allowance, whose spectral norms are all upper bounds (each
    false with probability <= norms.delta_op; a certificate with probability <=
    norms.delta).

    Every point starts from the global upper bounds (norms.upper). A correctly classified
    point they do not certify runs Lanczos on each of its masked operators that is not the
    full one, in ``stages`` (cumulative step counts), each stage's upper bounds at
    delta_op / len(stages); after each stage a point is decided when the upper bounds
    certify it, or when the Ritz values (lower bounds) already fail to."""
    b, model, x = x.shape[0], norms.network, x.double()
    found = masked_operators(x, y, eps, norms, opt_iter=opt_iter, bound=bound)
    res, ops = found.res, found.ops
    with torch.no_grad(), exact_float32():
        eps_b = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(b)
        cert = GuaranteedCertificate(res.certified(y), res.r_local / eps_b.clamp_min(FLOOR),
                                     torch.zeros(b, dtype=torch.long, device=x.device),
                                     res.margin(y))
        if not ops:
            return cert
        undecided = (res.logits.argmax(1) == y) & ~cert.certified & (eps_b > 0)
        staged = _StagedNorms(ops, undecided.nonzero().flatten(), norms, x)
        decide = _Decision(res, layer_list(model)[check_supported(model)[-1]], y, eps_b,
                           opt_iter)
        for k in stages:
            if staged.active.numel() == 0:
                break
            staged.run(k, norms.delta_op / len(stages), cert.steps)
            staged.keep(decide(staged, cert))
    return cert


class _StagedNorms:
    """Per operator i: upper and lower bounds up[i], lo[i] [batch] (float64; the global
    ones to start with) and the Lanczos state of the still undecided points ``active``
    whose operator is not the full one (need[i] = [their indices, Lanczos])."""

    def __init__(self, ops, active, norms: GuaranteedNorms, x):
        b = x.shape[0]
        self.active = active
        self.up = {i: norms.upper[i].double().expand(b).clone() for i, *_ in ops}
        self.lo = {i: norms.lower[i].double().expand(b).clone() for i, *_ in ops}
        self.need = {}
        if active.numel() == 0:
            return
        for i, layer, d_in, d_out, in_shape in ops:
            full = is_full(d_in, b, x.device) & is_full(d_out, b, x.device)
            idx = active[~full[active]]
            if idx.numel():
                self.lo[i][idx] = 0.0  # the global lower bound holds for the full operator only
                self.need[i] = [idx, Lanczos(layer, None if d_in is None else d_in[idx],
                                             None if d_out is None else d_out[idx], in_shape,
                                             idx.numel(), x.device)]

    def run(self, k: int, delta: float, steps: torch.Tensor):
        """Lanczos to ``k`` steps on every operator; bounds tightened (upper at ``delta``),
        ``steps`` [batch] set to k where a point ran."""
        for i, (idx, lz) in self.need.items():
            if idx.numel() == 0:
                continue
            lz.run(k)
            xi = lz.ritz_max()
            up = lz.upper(xi, delta)
            self.up[i][idx] = torch.minimum(self.up[i][idx], up)
            self.lo[i][idx] = torch.maximum(self.lo[i][idx], xi.clamp_min(0).sqrt())
            steps[idx] = k

    def keep(self, active):
        """Only the points ``active`` go on: the others leave every Lanczos state."""
        self.active = active
        for i, (idx, lz) in self.need.items():
            keep = torch.isin(idx, active).nonzero().flatten()
            lz.select(keep)
            self.need[i][0] = idx[keep]


@dataclass
class _Decision:
    """The certificate of the active points with a stage's bounds: the bound's result
    ``res``, the logit layer, labels y and radii eps_b [batch]."""
    res: BoundResult
    final: nn.Linear
    y: torch.Tensor
    eps_b: torch.Tensor
    opt_iter: int

    def __call__(self, staged: _StagedNorms, cert: GuaranteedCertificate) -> torch.Tensor:
        """Writes the active points' certificate with the upper bounds into ``cert``;
        returns those still undecided (not certified, not refuted by the lower bounds)."""
        a, res, y, eps = staged.active, self.res, self.y[staged.active], self.eps_b[staged.active]
        r_up, r_lo = (rounded_radius(res, eps, {i: t[a] for i, t in bounds.items()}, a)
                      for bounds in (staged.up, staged.lo))
        w_up, allowance = rounded_margins(res, self.final.weight, y, r_up, self.opt_iter, a)
        w_lo, _ = rounded_margins(res, self.final.weight, y, r_lo, self.opt_iter, a)
        sub = BoundResult(logits=res.logits[a], worst=w_up, r_local=r_up, r_global=r_up,
                          allowance=allowance)
        cert_up, cert_lo = sub.certified(y), sub.certified(y, w_lo)
        cert.certified[a], cert.margin[a] = cert_up, sub.margin(y).to(cert.margin)
        cert.lip[a] = (r_up / eps.double().clamp_min(FLOOR)).to(cert.lip)
        return a[~(cert_up | ~cert_lo)]
