"""Certification with the Local-Lip bound: one batch at one radius (every per-sample number
the reports use), every batch of a loader (training's per-epoch test), and the global
power-iteration vectors an evaluation starts every batch from."""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from tqdm import tqdm

import progress
from local_bound import FLOOR, compute_bound, exact_float32
from networks import layer_input_shapes, layer_list
from operators import global_power_iteration, global_vector_shape
from utils import GLOBAL_STREAM, derived_seed
from vectors import RandomVectors


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
