"""Certification of a test set: the Local-Lip bound per batch and radius, PGD-L2, the
soundness audit, and the full resumable evaluation that writes per-sample rows (reporting
lives in report.py; the command line in evaluate.py)."""
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from local_bound import (KeptVectors, RandomVectors, compute_bound, exact_float32,
                         global_power_iteration, global_vector_shape, layer_input_shapes)
from lanczos import GuaranteedNorms, guaranteed_certify
from report import batch_rows, fmt_value, resume_rows, summarize, tsv_columns
from utils import UserError


# ----------------------------------------------------------------------------------------
# Certification
# ----------------------------------------------------------------------------------------
def certify_batch(model, x, y, eps, vectors, global_vectors, *, sniter, opt_iter, bound='local',
                  estimate='bilinear'):
    """Certify one batch at L2 radius ``eps``. Returns a dict of per-sample CPU tensors:
    pred, correct, certified (the chosen bound), certified_global, margin, lip_local
    (prod_i sigma_i), lip_global (prod_i ||W_i||_2), converged, and ``varying``
    {activation index: fraction of varying neurons}; plus 'global_converged' (bool)."""
    with torch.no_grad(), exact_float32():
        res = compute_bound(model, x, y, eps, vectors, global_vectors, sniter=sniter,
                            opt_iter=opt_iter, bound=bound, check=True, also_global=True,
                            estimate=estimate)
    pred = res.logits.argmax(1)
    safe = max(float(eps), 1e-30)
    out = {'pred': pred, 'correct': pred == y, 'certified': res.certified(y),
           'certified_global': res.certified(y, res.worst_global), 'margin': res.margin(y),
           'lip_local': res.r_local / safe, 'lip_global': res.r_global / safe,
           'converged': res.converged}
    out = {k: v.detach().cpu() for k, v in out.items()}
    out['varying'] = {i: d.flatten(1).mean(1).cpu() for i, d in res.masks.items()}
    out['global_converged'] = bool(res.global_converged)
    return out


def certify(model, loader, eps, *, sniter, opt_iter, device, store=None,
            global_vectors=None, bound='local', desc='certify', estimate='bilinear'):
    """Certify every sample of ``loader`` at ``eps`` (training-time test evaluation).

    store: a VectorStore to warm-start from, or None for fresh random vectors.
    Returns per-sample CPU tensors: idx, label, pred, correct, certified, margin, converged.
    """
    model.eval()
    global_vectors = {} if global_vectors is None else global_vectors
    keys = ('idx', 'label', 'pred', 'correct', 'certified', 'margin', 'converged')
    cols = {k: [] for k in keys}
    for x, y, idx in tqdm(loader, desc=desc, leave=False, disable=None):
        x, y = x.to(device), y.to(device)
        vecs = RandomVectors(x.shape[0], device) if store is None else store.batch(idx, device)
        r = certify_batch(model, x, y, eps, vecs, global_vectors, sniter=sniter,
                          opt_iter=opt_iter, bound=bound, estimate=estimate)
        r['idx'], r['label'] = idx, y.cpu()
        for k in keys:
            cols[k].append(r[k])
    return {k: torch.cat(v) for k, v in cols.items()}


# ----------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------
def _per_sample_norm(t, floor=0.0):
    """[batch, 1, ...] L2 norm of each sample of ``t``, at least ``floor``."""
    return t.flatten(1).norm(dim=1).clamp_min(floor).view(-1, *([1] * (t.dim() - 1)))


def _into_ball(delta, eps):
    """Scale each sample of ``delta`` down to L2 norm eps when it is longer."""
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


def pgd_l2(model, x, y, eps, alpha, niter, clip=True, loss='ce'):
    """PGD in the L2 ball of radius eps, ``niter`` steps of size ``alpha`` along the gradient
    normalised per sample (norm floored at 1e-6). x: [batch, ...] -> adversarial x.

    clip=True is the reference's evaluation attack (advertorch's L2PGDAttack with the
    summed cross-entropy, rand_init, inputs in [0, 1]): start at a uniform random image of
    [0, 1]^d, pulled into the ball around x; each step: move, clip to [0, 1], then scale
    back into the ball. clip=False (the audit: the certificate covers the whole ball):
    start at a random point of the ball (Gaussian direction, radius eps * U(0, 1)); each
    step: move, scale back into the ball. loss: 'ce' (cross-entropy, summed over the batch)
    or 'margin' (max_{i != y} z_i - z_y, summed)."""
    if clip:
        delta = (x + _into_ball(torch.rand_like(x) - x, eps)).clamp(0, 1) - x
    else:
        delta = torch.randn_like(x)
        delta = delta / _per_sample_norm(delta, 1e-12) * eps * torch.rand(
            x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
    for _ in range(niter):
        x_adv = (x + delta).detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(x_adv)
            if loss == 'ce':
                obj = F.cross_entropy(z, y, reduction='sum')
            else:
                zy = z.gather(1, y.view(-1, 1)).squeeze(1)
                obj = (z.scatter(1, y.view(-1, 1), float('-inf')).max(1).values - zy).sum()
            grad, = torch.autograd.grad(obj, x_adv)
        delta = delta + alpha * grad / _per_sample_norm(grad, 1e-6)
        if clip:
            delta = (x + delta).clamp(0, 1) - x
        delta = _into_ball(delta, eps)
    x_adv = x + delta
    return (x_adv.clamp(0, 1) if clip else x_adv).detach()


def pgd_correct_batch(model, x, y, eps, alpha, niter):
    """[batch] bool: clean prediction correct AND still correct after PGD-L2 (clipped)."""
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    adv = pgd_l2(model, x, y, eps, alpha, niter) if eps > 0 and niter > 0 else x
    with torch.no_grad():
        return (clean & (model(adv).argmax(1) == y)).cpu()


def _audit_certified(model, x, y, idx, eps, certified, args):
    """Audit the certified points of one batch at ``eps``; print the first point broken.
    Returns per-sample CPU bool tensors (attacked, broken), each [batch]."""
    sel = certified.to(x.device)
    broken_all = torch.zeros(x.shape[0], dtype=torch.bool)
    if not sel.any():
        return sel.cpu(), broken_all
    broken, found = audit_batch(model, x[sel], y[sel], eps, args.audit_restarts, args.audit_steps)
    broken_all[sel.cpu()] = broken
    if broken.any():
        k = int(broken.nonzero()[0])
        dist = (found[k] - x[sel][k]).norm().item()
        with torch.no_grad():
            pred = int(model(found[k:k + 1]).argmax(1))
        print(f"AUDIT FAILURE: test point {int(idx[sel.cpu()][k])} (label {int(y[sel][k])}) is "
              f"certified at eps {eps:g} but the attack found a point at L2 distance {dist:.4f} "
              f"predicted {pred}", file=sys.stderr)
    return sel.cpu(), broken_all


def audit_batch(model, x, y, eps, restarts, steps):
    """Strong attack on certified points: ``restarts`` x PGD-L2 with ``steps`` steps of size
    eps/10 on the margin loss, over the whole L2 ball (no clipping: the certificate covers the ball).
    Returns (broken [batch] bool, adversarial points [batch, ...])."""
    broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    found = x.clone()
    for _ in range(restarts):
        adv = pgd_l2(model, x, y, eps, eps / 10, steps, clip=False, loss='margin')
        with torch.no_grad():
            flip = model(adv).argmax(1) != y
        found[flip & ~broken] = adv[flip & ~broken]
        broken |= flip
    return broken.cpu(), found


# ----------------------------------------------------------------------------------------
# Full evaluation
# ----------------------------------------------------------------------------------------
def full_evaluation(model, loader, args, device, tsv_path=None, audit=False, resume=False):
    """Clean, PGD (at the first radius) and certified accuracy at every radius of
    ``args.radii`` (default: args.epsilon), local and global bound; optional per-sample TSV
    (written as it goes) and audit. Every batch is seeded from (--seed, batch number) and
    starts its global power iterations from the same vectors, converged once per
    evaluation (converged_global_vectors), so ``resume`` (continue the TSV of an interrupted
    run, skipping its finished batches) gives the rows of an uninterrupted run. Returns the
    results dict (JSON-ready)."""
    radii = list(getattr(args, 'radii', [args.epsilon]))
    eps0 = radii[0]
    seed = getattr(args, 'seed', 0)
    model.eval()
    rows, skip, header = [], set(), None
    if resume and tsv_path and os.path.isfile(tsv_path):
        indices = [list(map(int, ids)) for ids in batch_indices(loader)]
        header, rows, skip = resume_rows(tsv_path, radii, indices,
                                         getattr(args, 'certificate', 'reference'))
        print(f"resuming {tsv_path}: {len(rows)} points done, {len(indices) - len(skip)} of "
              f"{len(indices)} batches to go", flush=True)
    in_shape = tuple(loader.dataset[0][0].shape)
    base_global = converged_global_vectors(model, in_shape, args.test_sniter, seed, device)
    guaranteed = getattr(args, 'certificate', 'reference') == 'guaranteed'
    norms = None
    if guaranteed:      # the global norm bounds, once per model (seeded: reproducible)
        t0 = time.time()
        norms = GuaranteedNorms(model, in_shape, args.delta,
                                generator_seed=seed * 1000003 + 999979)
        print(f"guaranteed certificates (delta {args.delta:g}): global norm bounds in "
              f"{time.time() - t0:.1f}s; each of {round(args.delta / norms.delta_op)} norm "
              f"bounds per certificate fails with probability <= {norms.delta_op:.3g}", flush=True)
    tsv, audit_seconds = None, 0.0
    if tsv_path:
        os.makedirs(os.path.dirname(tsv_path) or '.', exist_ok=True)
        if header is not None:      # keep the finished batches (atomically), then append
            with open(tsv_path + '.tmp', 'w') as f:
                f.write('\t'.join(header) + '\n')
                for r in rows:
                    f.write('\t'.join(fmt_value(r[c]) for c in header) + '\n')
            os.replace(tsv_path + '.tmp', tsv_path)
        tsv = open(tsv_path, 'a' if header is not None else 'w')
    try:
        bar = tqdm(loader, desc='evaluate', leave=False, disable=None)
        for bi, (x, y, idx) in enumerate(bar):
            if bi in skip:
                continue
            t0 = time.time()
            torch.manual_seed(seed * 1000003 + bi)
            x, y = x.to(device), y.to(device)
            b = x.shape[0]
            by_eps, g_conv = {}, True
            # every batch starts from the same global vectors, converged once per evaluation
            # (they do not depend on the data): resumable, and no batch repeats the iterations
            global_vectors = {k: v.clone() for k, v in base_global.items()}
            vectors = KeptVectors(b, device)   # fresh at the smallest radius, then warm
            for e in sorted(radii):
                by_eps[e] = certify_batch(model, x, y, e, vectors, global_vectors,
                                          sniter=args.test_sniter, opt_iter=args.test_opt_iter,
                                          bound=args.bound,
                                          estimate=getattr(args, 'estimate', 'bilinear'))
                g_conv &= by_eps[e]['global_converged']
            pgd = pgd_correct_batch(model, x, y, eps0, args.alpha, args.niter)
            audited, broken = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
            t_audit = time.time()
            if audit:
                for e in radii:
                    sel, brk = _audit_certified(model, x, y, idx, e, by_eps[e]['certified'], args)
                    audited += sel.long()
                    broken += brk.long()
            audit_seconds += time.time() - t_audit
            seconds = (time.time() - t0) / b
            g_seconds = None
            if guaranteed:     # after the rest, from its own seed: the other columns do not change
                t1 = time.time()
                torch.manual_seed(seed * 1000003 + bi + 500009)
                for e in sorted(radii):
                    g = guaranteed_certify(model, x, y, e, norms, opt_iter=args.test_opt_iter,
                                           bound=args.bound)
                    by_eps[e]['certified_guaranteed'] = g['certified'].cpu()
                    by_eps[e]['lip_guaranteed'] = g['lip'].cpu()
                g_seconds = (time.time() - t1) / b
            new = batch_rows(idx, y.cpu(), by_eps, radii, pgd, (audited, broken), g_conv,
                             seconds, g_seconds)
            if tsv is not None:
                if header is None:
                    header = tsv_columns(radii, list(by_eps[eps0]['varying']), guaranteed)
                    tsv.write('\t'.join(header) + '\n')
                for r in new:
                    tsv.write('\t'.join(fmt_value(r[c]) for c in header) + '\n')
                tsv.flush()
            rows.extend(new)
            if bar.disable and getattr(args, 'verbose', 0):
                print(f"  evaluate: batch {bi + 1}/{len(loader)} done, {len(rows)} points, "
                      f"{time.time() - t0:.0f}s", flush=True)
    finally:
        if tsv is not None:
            tsv.close()
    rows.sort(key=lambda r: r['idx'])
    out = summarize(rows, radii, args, audit)
    if audit:      # of this run (a resumed run: of its new batches only)
        out['audit']['seconds_this_run'] = audit_seconds
    return out


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
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + 999983)
    out = {}
    with torch.no_grad(), exact_float32():
        for i, shape in shapes.items():
            u = torch.randn((1, *global_vector_shape(model[i], shape)), generator=gen,
                            device=device)
            for _ in range(GLOBAL_ROUNDS):
                _, u, converged = global_power_iteration(model[i], u, sniter)
                if converged:
                    break
            out[i] = u
    return out


def batch_indices(loader):
    """The sample indices (as IndexedDataset gives them) of every batch of a sequential
    loader, without loading any image."""
    if isinstance(loader.sampler, torch.utils.data.RandomSampler):
        raise UserError("--resume needs a sequential test loader")

    def index(ds, i):
        while isinstance(ds, torch.utils.data.Subset):
            ds, i = ds.dataset, ds.indices[i]
        return int(i)
    return [[index(loader.dataset, i) for i in b] for b in loader.batch_sampler]
