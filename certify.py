"""Certification of a test set: the Local-Lip bound per batch and radius, PGD-L2, the
soundness audit, and the full resumable evaluation that writes per-sample rows (reporting
lives in report.py; the command line in evaluate.py)."""
import glob
import math
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from local_bound import (check_supported, compute_bound, exact_float32, global_power_iteration,
                         global_vector_shape, layer_input_shapes)
from vectors import KeptVectors, RandomVectors, SubsetVectors
from lanczos import STAGES, GuaranteedNorms, guaranteed_certify, masked_norm_bounds
from report import batch_rows, resume_rows, summarize, tsv_columns, tsv_line, write_tsv
from errors import UserError
from utils import all_reduce_sum


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
PROGRESS_EVERY_S = 60.0     # without a terminal, a progress line at least this often


class Heartbeat:
    """Progress lines for a log file (no terminal): ``say`` prints a line, and while a batch
    runs longer than ``every`` seconds a background thread prints ``status`` (with the time
    since the last line) every ``every`` seconds. every=None: silent (a terminal shows the
    progress bar instead)."""

    def __init__(self, every):
        self.every, self.status = every, ''
        self.last = time.monotonic()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.thread = None
        if every:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        while not self.done.wait(self.every / 4):
            with self.lock:
                quiet = time.monotonic() - self.last
                if quiet >= self.every and self.status:
                    print(f"{self.status} ({quiet:.0f}s since the last line)", flush=True)
                    self.last = time.monotonic()

    def say(self, line):
        if self.every:
            with self.lock:
                print(line, flush=True)
                self.last = time.monotonic()

    def stop(self):
        self.done.set()
        if self.thread is not None:
            self.thread.join()


def full_evaluation(model, loader, args, device, tsv_path=None, audit=False, resume=False,
                    rank=0, world=1):
    """Clean, PGD (at the first radius) and certified accuracy at every radius of
    ``args.radii`` (default: args.epsilon), local and global bound; optional per-sample TSV
    (written as it goes) and audit. Every batch is seeded from (--seed, batch number) and
    starts its global power iterations from the same vectors, converged once per
    evaluation (converged_global_vectors), so ``resume`` (continue the TSV of an interrupted
    run, skipping its finished batches) gives the rows of an uninterrupted run.

    Several processes (``world`` > 1, a torch.distributed process group, ``loader`` the
    whole sequential test loader in every process): the batches still to do are dealt out
    round-robin, process ``rank`` takes every world-th; each process writes its rows to
    ``<tsv_path>.rank<r>`` as it goes, and at the end process 0 gathers all rows and writes
    the one TSV (the part files are then removed; a resumed run first folds the part files
    of an interrupted one into the TSV, whole batches only, whatever the process count).
    Rows depend on the batch number only, never on rank or world. Returns the results dict
    (JSON-ready) in process 0, None in the others."""
    radii = list(getattr(args, 'radii', [args.epsilon]))
    radius = bool(getattr(args, 'radius', False))
    certificate = getattr(args, 'certificate', 'reference')
    seed = getattr(args, 'seed', 0)
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    model.eval()
    indices = [list(map(int, ids)) for ids in batch_indices(loader)]
    rows, skip, header = [], set(), None
    if resume and tsv_path:
        if lead:
            fold_part_files(tsv_path, radii, indices, certificate, radius)
        barrier(world)
        if os.path.isfile(tsv_path):
            header, rows, skip = resume_rows(tsv_path, radii, indices, certificate, radius)
            say(f"resuming {tsv_path}: {len(rows)} points done, {len(indices) - len(skip)} of "
                f"{len(indices)} batches to go", flush=True)
    todo = [bi for bi in range(len(indices)) if bi not in skip]
    mine = todo[rank::world]
    positions = list(loader.batch_sampler)
    my_loader = torch.utils.data.DataLoader(loader.dataset,
                                            batch_sampler=[positions[bi] for bi in mine],
                                            num_workers=loader.num_workers,
                                            pin_memory=loader.pin_memory)
    in_shape = tuple(loader.dataset[0][0].shape)
    base_global = converged_global_vectors(model, in_shape, args.test_sniter, seed, device)
    norms = None
    if certificate == 'guaranteed':   # the global norm bounds, once per model (seeded)
        t0 = time.time()
        norms = GuaranteedNorms(model, in_shape, args.delta,
                                generator_seed=seed * 1000003 + 999979)
        say(f"guaranteed certificates (delta {args.delta:g}): global norm bounds in "
            f"{time.time() - t0:.1f}s; each of {round(args.delta / norms.delta_op)} norm "
            f"bounds per certificate fails with probability <= {norms.delta_op:.3g}", flush=True)
    # this process's rows go, as they are made, to the TSV (one process) or its part file
    tsv, tsv_file, own_header, new_rows, audit_seconds = None, None, None, [], 0.0
    if tsv_path:
        os.makedirs(os.path.dirname(tsv_path) or '.', exist_ok=True)
        tsv_file = tsv_path if world == 1 else f"{tsv_path}.rank{rank}"
        if world == 1 and header is not None:   # keep the finished batches, then append
            write_tsv(tsv_path, header, rows)
            own_header = header
    n_total = len(loader.dataset)
    done = len(rows)
    bar = tqdm(total=n_total, initial=done, desc='evaluate', unit='pt', leave=False,
               disable=None if lead else True, file=sys.stderr)
    beat = Heartbeat(PROGRESS_EVERY_S if lead and bar.disable and getattr(args, 'verbose', 0)
                     else None)
    batches = iter(my_loader)
    rounds = -(-len(todo) // world)                      # of one batch per process
    try:
        for r in range(rounds):
            bi = todo[r * world + rank] if r * world + rank < len(todo) else None
            count, t0 = 0, time.time()
            if bi is not None:
                beat.status = (f"  evaluate: batch {bi + 1}/{len(indices)} running, {done} of "
                               f"{n_total} points done")
                x, y, idx = next(batches)
                new, columns, a_sec = _evaluate_batch(model, x, y, idx, bi, args, device, audit,
                                                      base_global, norms)
                audit_seconds += a_sec
                header = header or columns
                if tsv_file is not None:
                    if tsv is None:
                        tsv = open(tsv_file, 'a' if own_header else 'w')
                    if own_header is None:
                        own_header = header
                        tsv.write('\t'.join(header) + '\n')
                    tsv.writelines(tsv_line(header, row) for row in new)
                    tsv.flush()
                new_rows.extend(new)
                count = len(new)
            if world > 1:                                # the whole evaluation's progress
                count = int(all_reduce_sum([count], device, world)[0])
            done += count
            bar.update(count)
            what = f"batch {bi + 1}/{len(indices)}" if world == 1 else \
                f"round {r + 1}/{rounds} ({world} batches)"
            beat.say(f"  evaluate: {what} done, {done} of {n_total} points, "
                     f"{time.time() - t0:.0f}s")
    finally:
        beat.stop()
        bar.close()
        if tsv is not None:
            tsv.close()
    if world > 1:       # process 0 gathers every process's rows and writes the one TSV
        gathered = [None] * world
        dist.all_gather_object(gathered, (new_rows, header, audit_seconds))
        if not lead:
            return None
        new_rows = [row for part, _, _ in gathered for row in part]
        audit_seconds = sum(sec for _, _, sec in gathered)
        header = next((h for _, h, _ in gathered if h is not None), None)
        if tsv_path:
            if header is not None:
                write_tsv(tsv_path, header, sorted(rows + new_rows, key=lambda q: q['idx']))
            for part in range(world):
                if os.path.exists(f"{tsv_path}.rank{part}"):
                    os.remove(f"{tsv_path}.rank{part}")
    rows = sorted(rows + new_rows, key=lambda q: q['idx'])
    out = summarize(rows, radii, args, audit)
    if audit:      # of this run (a resumed run: of its new batches only)
        out['audit']['seconds_this_run'] = audit_seconds
    return out


def _evaluate_batch(model, x, y, idx, bi, args, device, audit, base_global, norms):
    """Every number of one test batch (batch number ``bi``, which alone seeds it): (rows, TSV
    columns, seconds spent in the audit)."""
    radii = list(getattr(args, 'radii', [args.epsilon]))
    eps0 = radii[0]
    seed = getattr(args, 'seed', 0)
    estimate = getattr(args, 'estimate', 'bilinear')
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
                                  bound=args.bound, estimate=estimate)
        g_conv &= by_eps[e]['global_converged']
    pgd = pgd_correct_batch(model, x, y, eps0, args.alpha, args.niter)
    audited, broken = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    t_audit = time.time()
    if audit:
        for e in radii:
            sel, brk = _audit_certified(model, x, y, idx, e, by_eps[e]['certified'], args)
            audited += sel.long()
            broken += brk.long()
    audit_seconds = time.time() - t_audit
    seconds = (time.time() - t0) / b
    g_seconds = None
    if norms is not None:   # after the rest, from its own seed: the other columns do not change
        t1 = time.time()
        torch.manual_seed(seed * 1000003 + bi + 500009)
        for e in sorted(radii):
            g = guaranteed_certify(model, x, y, e, norms, opt_iter=args.test_opt_iter,
                                   bound=args.bound)
            by_eps[e]['certified_guaranteed'] = g['certified'].cpu()
            by_eps[e]['lip_guaranteed'] = g['lip'].cpu()
        g_seconds = (time.time() - t1) / b
    rad, r_seconds = None, None
    radius = bool(getattr(args, 'radius', False))
    if radius:         # from its own seed, warm-started from the radii's vectors
        t2 = time.time()
        torch.manual_seed(seed * 1000003 + bi + 700001)
        rad = radius_batch(model, x, y, base_global, sniter=args.test_sniter,
                           opt_iter=args.test_opt_iter, rtol=args.radius_rtol,
                           bound=args.bound, norms=norms, vectors=vectors.kept, estimate=estimate,
                           steps=getattr(args, 'radius_steps', RADIUS_STEPS))
        r_seconds = (time.time() - t2) / b
    new = batch_rows(idx, y.cpu(), by_eps, radii, pgd, (audited, broken), g_conv,
                     seconds, g_seconds, rad, r_seconds)
    columns = tsv_columns(radii, list(by_eps[eps0]['varying']), norms is not None, radius)
    return new, columns, audit_seconds


def fold_part_files(tsv_path, radii, indices, certificate, radius):
    """The per-process part files ``<tsv_path>.rank<r>`` left by an interrupted distributed
    evaluation, folded into ``tsv_path`` (whole batches only; atomically), then removed."""
    parts = sorted(glob.glob(glob.escape(tsv_path) + '.rank*'))
    if not parts:
        return
    header, rows = None, {}
    for path in ([tsv_path] if os.path.isfile(tsv_path) else []) + parts:
        with open(path) as f:
            if '\n' not in f.readline():
                continue        # killed before its header line was written: nothing in it
        h, kept, _ = resume_rows(path, radii, indices, certificate, radius)
        header = header or h
        rows.update({row['idx']: row for row in kept})
    write_tsv(tsv_path, header, sorted(rows.values(), key=lambda q: q['idx']))
    for path in parts:
        os.remove(path)


def barrier(world):
    if world > 1:
        dist.barrier()


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
    dtype = next(model.parameters()).dtype
    out = {}
    with torch.no_grad(), exact_float32():
        for i, shape in shapes.items():
            u = torch.randn((1, *global_vector_shape(model[i], shape)), generator=gen,
                            device=device, dtype=dtype)
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


# ----------------------------------------------------------------------------------------
# Certified radius: the largest eps at which each point is certified
# ----------------------------------------------------------------------------------------
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


def _next_radius(lo, m_lo, hi, m_hi, prev, m_prev, guess, rtol):
    """Next trial radius of every searched point ([n] tensors, float64): below a failure
    (hi finite) regula falsi on the margin (the caller halves the margin of an end kept
    again: the Illinois rule), kept rtol * max(lo, hi / 2) / 2 (at most a quarter of the
    bracket) away from both ends so that one step can close it; with no failure yet, the secant through the last two
    certified points, at least 1.5 and at most 4 times lo (``guess`` while lo is 0)."""
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


def bracket_search(evaluate, n, m0, guess, rtol, max_evals, max_radius, device, hint=None,
                   dtype=torch.float32):
    """Search, for each of n points, a radius lo certified by ``evaluate`` and a radius hi
    <= lo (1 + rtol) where it failed (or lo = max_radius). ``evaluate(eps [k], rows [k]) ->
    (certified [k] bool, margin [k], flag [k] bool)`` for the points ``rows`` at radii
    ``eps`` (flag: e.g. power iteration converged, recorded at the certified radius). m0 [n]:
    the margin at radius 0 (the clean margin; points with m0 <= 0 are not searched and keep
    radius 0); guess [n]: the first radius tried; max_radius: None, a number or [n] radii
    not searched above; hint [n] (optional): the radius tried
    after a certified guess, before any extrapolation (the other certificate's upper end).
    Every trial radius is rounded to ``dtype`` first, so lo and hi are the radii evaluated.
    Returns dict of [n] tensors: lo, hi (float64), evals (long), flag (bool, at lo; True
    where lo = 0)."""
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
    return {'lo': lo, 'hi': hi, 'evals': evals, 'flag': flag}


def global_lipschitz_guess(model, y, m0, global_vectors, sniter, sigmas=None):
    """[batch] radii certified by the global bound alone, ignoring the box: the clean margin
    m0 [batch] over prod ||W_i||_2 * max_i ||w_i - w_y|| (the first radius the search tries).
    The norms: power iterations from ``global_vectors``, or ``sigmas`` {affine index: 0-dim}."""
    affine = check_supported(model)
    prod = torch.ones((), dtype=torch.float64, device=m0.device)
    for i in affine[:-1]:
        if sigmas is not None:
            sigma = sigmas[i]
        else:
            sigma, _, _ = global_power_iteration(model[i], global_vectors[i].clone(), sniter)
        prod = prod * sigma.double()
    w = model[affine[-1]].weight.double()
    diff = (w.unsqueeze(0) - w[y].unsqueeze(1)).norm(dim=2).max(1).values      # [batch]
    return m0.double().clamp_min(0) / (prod * diff).clamp_min(1e-30)


def clean_margins(model, x, y):
    """[batch] margin of label y over the other logits at x; 0 where x is misclassified."""
    logits = model(x)
    zy = logits.gather(1, y.view(-1, 1))
    m0 = (zy - logits.scatter(1, y.view(-1, 1), float('-inf')).max(1, keepdim=True).values
          ).squeeze(1)
    return torch.where(logits.argmax(1) == y, m0, torch.zeros_like(m0))


def guaranteed_radius(model, x, y, m0, norms, *, opt_iter, rtol=RADIUS_RTOL, max_radius=None,
                      bound='local', steps=RADIUS_STEPS, max_evals=RADIUS_EVALS, top=None,
                      start=None):
    """The guaranteed certified radius of every point of x [batch, ...] (labels y, clean
    margins m0 [batch]; norms a lanczos.GuaranteedNorms): the largest eps (to ``rtol``) at
    which the certificate holds with Lanczos upper bounds of every masked norm.

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
    RADIUS_ROUNDS runs); its radius comes from the bounds of its last run alone. So every
    reported radius rests on one set of bounds, drawn after its top was fixed: false with
    probability <= norms.delta (no union over the search's steps or rounds needed). A
    lower bound on what a fresh certificate at that radius gives (its own varying sets are
    smaller than top's, and it may run other step counts). Returns dict of [batch] tensors: lo (the radius), hi (inf: certified at
    the last top or max_radius), evals (box-only evaluations, all searches)."""
    b, dtype, dev = x.shape[0], x.dtype, x.device
    f64 = dict(dtype=torch.float64, device=dev)
    cap = torch.full((b,), math.inf, **f64)
    if max_radius is not None:
        cap = torch.minimum(cap, torch.as_tensor(max_radius, **f64).expand(b))
    evals = torch.zeros(b, dtype=torch.long, device=dev)

    def search(sel, bounds, first, tol, limit, hint=None):
        """bracket_search of the points ``sel`` with per-point norms bounds {i: [len(sel)]}."""
        def evaluate(eps, rows):
            r = sel[rows]
            res = compute_bound(model, x[r], y[r], eps.to(dtype), None, None, sniter=0,
                                opt_iter=opt_iter, bound=bound, check=True,
                                global_sigmas=norms.upper,
                                local_norms=lambda i, *_: bounds[i][rows])
            return (res.certified(y[r]), res.margin(y[r]),
                    torch.ones(r.numel(), dtype=torch.bool, device=dev))
        out = bracket_search(evaluate, sel.numel(), m0[sel], first, tol, max_evals, limit, dev,
                             hint=hint, dtype=dtype)
        evals[sel] += out['evals']
        return out

    def placed(sel, lower, first):
        """(top, est_lo, est_hi): a coarse search of the points sel with the Ritz values
        ``lower`` (estimates of the masked norms): the radius it certified, the one where it
        failed, and top = that failing radius widened by RADIUS_COARSE (at least (1 +
        RADIUS_COARSE) first)."""
        est = search(sel, lower, first, RADIUS_COARSE, cap[sel])
        est_hi = torch.where(torch.isfinite(est['hi']), est['hi'], est['lo'])
        t = torch.minimum(torch.maximum(est_hi, first) * (1 + RADIUS_COARSE), cap[sel])
        return t, est['lo'], est_hi

    with torch.no_grad(), exact_float32():
        sel = (m0 > 0).nonzero().flatten()
        lo = torch.zeros(b, **f64)
        hi = torch.full((b,), math.inf, **f64)
        hi[m0 <= 0] = 0.0
        if sel.numel() == 0:
            return {'lo': lo, 'hi': hi, 'evals': evals}
        if top is None:
            guess = global_lipschitz_guess(model, y[sel], m0[sel], None, 0, norms.upper)
            glob = {i: u.expand(sel.numel()) for i, u in norms.upper.items()}
            g = search(sel, glob, guess, GLOBAL_COARSE, cap[sel])
            first = torch.where(g['lo'] > 0, g['lo'], guess)
            at = torch.where(torch.isfinite(g['hi']), g['hi'], first)
            lower, _ = masked_norm_bounds(model, x[sel], y[sel], at.to(dtype), norms,
                                          steps=RITZ_STEPS, bound=bound)
            t, est_lo, est_hi = placed(sel, lower, first)
        else:
            first = start.to(**f64)[sel]
            t = torch.minimum(top.to(**f64)[sel], cap[sel])
            est_lo, est_hi = first, t
        for rnd in range(RADIUS_ROUNDS):
            lower, upper = masked_norm_bounds(model, x[sel], y[sel], t.to(dtype), norms,
                                              steps=steps, bound=bound)
            # where to look: the estimate's radius scaled by how much the upper bounds
            # exceed the Ritz values (a radius scales at most inversely with the norms),
            # less 2 RADIUS_COARSE (certified, as a rule), then the estimate's failing
            # radius (failing, as a rule), then regula falsi between the two
            ratio = torch.stack([(lower[i] / upper[i].clamp_min(1e-30)).double()
                                 for i in upper]).prod(0)
            guess = est_lo * ratio * (1 - 2 * RADIUS_COARSE)
            guess = torch.minimum(torch.maximum(guess, torch.minimum(first, t)), t)
            g = search(sel, upper, guess, rtol, t, torch.minimum(est_hi, t))
            lo[sel], hi[sel] = g['lo'], g['hi']
            again = torch.isinf(g['hi']) & (g['lo'] >= t) & (t < cap[sel])
            if rnd == RADIUS_ROUNDS - 1 or not again.any():
                break
            keep = again.nonzero().flatten()
            sel, first = sel[keep], g['lo'][keep]
            lower = {i: v[keep] for i, v in lower.items()}
            t, est_lo, est_hi = placed(sel, lower, first)
            t = torch.minimum(torch.maximum(t, first * 1.5), cap[sel])
    return {'lo': lo, 'hi': hi, 'evals': evals}


def radius_batch(model, x, y, global_vectors, *, sniter, opt_iter, rtol=RADIUS_RTOL,
                 max_radius=None, bound='local', estimate='bilinear', norms=None,
                 max_evals=RADIUS_EVALS, vectors=None, steps=RADIUS_STEPS, reference=True):
    """Certified radius of every point of a batch x [batch, ...] with labels y [batch]: the
    largest L2 eps (to relative tolerance ``rtol``) at which the Local-Lip certificate
    holds, by a bracketing search on eps (regula falsi on the worst-case margin, Illinois
    rule; see bracket_search). Valid because the certificate is monotone in eps: the input
    box grows with eps, so every later box grows, every varying set only gains neurons, and
    the exact masked norms (submatrices of larger ones) only grow, as does the ball radius;
    the worst-case margin is a maximum over a growing set (exact when the worst-case-logit
    rounds finish, as at opt_iter 1000), so it only falls. With power-iteration estimates
    (the reference certificate) the computed norms need not be monotone: the search
    reports a radius at which the certificate was computed to hold (lo) and one above it
    at which it was computed to fail (hi).

    global_vectors: {affine index: converged global vector} (converged_global_vectors),
    not changed (unused without ``reference``). vectors: optional {layer: [batch, *shape]}
    starting vectors (e.g. of a fixed-radius certification of the same batch); each
    evaluation of the search starts from the vectors of the point's previous one.
    reference: run the estimate search (power iteration; default). norms: a
    GuaranteedNorms: also the guaranteed radius (guaranteed_radius, ``steps`` Lanczos steps
    per masked norm), its bounds computed at the varying sets of the estimate search's
    failing radius when that search runs, else placed by Ritz values.
    Returns per-sample CPU tensors: with ``reference`` radius, radius_upper, evals,
    converged (the power iterations of the certifying evaluation); with norms
    radius_guaranteed, radius_guaranteed_upper (inf: certified at the top searched),
    evals_guaranteed."""
    if not reference and norms is None:
        raise ValueError("radius_batch: nothing to search (reference=False and no norms)")
    b = x.shape[0]
    dtype = x.dtype
    out, top, start = {}, None, None
    with torch.no_grad(), exact_float32():
        m0 = clean_margins(model, x, y)
        if reference:
            gv = {k: v.clone() for k, v in global_vectors.items()}
            vecs = SubsetVectors(b, x.device)
            if vectors:
                vecs.kept = {k: v.clone() for k, v in vectors.items()}
            guess = global_lipschitz_guess(model, y, m0, gv, sniter)

            def evaluate(eps, rows):
                vecs.idx = rows
                res = compute_bound(model, x[rows], y[rows], eps.to(dtype), vecs, gv,
                                    sniter=sniter, opt_iter=opt_iter, bound=bound, check=True,
                                    estimate=estimate)
                return res.certified(y[rows]), res.margin(y[rows]), res.converged

            ref = bracket_search(evaluate, b, m0, guess, rtol, max_evals, max_radius, x.device,
                                 dtype=dtype)
            out = {'radius': ref['lo'], 'radius_upper': ref['hi'], 'evals': ref['evals'],
                   'converged': ref['flag']}
            # the guaranteed bounds at the varying sets of the estimate's failing radius
            top = torch.where(torch.isfinite(ref['hi']), ref['hi'], ref['lo'])
            top = torch.where(top > 0, top, guess)
            start = torch.where(ref['lo'] > 0, ref['lo'], guess)
    if norms is not None:
        g = guaranteed_radius(model, x, y, m0, norms, opt_iter=opt_iter, rtol=rtol,
                              max_radius=max_radius, bound=bound, steps=steps,
                              max_evals=max_evals, top=top, start=start)
        out.update(radius_guaranteed=g['lo'], radius_guaranteed_upper=g['hi'],
                   evals_guaranteed=g['evals'])
    return {k: v.cpu() for k, v in out.items()}
