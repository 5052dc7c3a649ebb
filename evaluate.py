"""Evaluate a checkpoint: clean error, PGD-L2 error and certified error.

    python evaluate.py --data mnist --model relux --epsilon 1.58 --test_batch_size 256 \
        --test_sniter 2000 --saved_model pretrained/relu/mnist_4C3F [--results out.json]

    # several radii, per-sample rows, soundness audit, plots, markdown table:
    python evaluate.py ... --epsilon 0.5 1.0 1.58 --out rows.tsv --audit --plots --markdown

Certification starts every sample from fresh random power-iteration vectors at the smallest
radius and iterates up to --test_sniter (each sample stops at tolerance 1e-3); each larger
radius starts from the previous radius's vectors (its varying sets contain the smaller
radius's; ~10x fewer iterations, same stopping rule). One propagation per radius gives
both the local bound and the global one (product of the layers' spectral norms, same box).
A sample with a NaN anywhere in its bound is NOT certified. Power iteration approaches each
spectral norm from below, so accuracy is reported twice: as the reference counts it, and
counting samples whose iterations did not converge as not certified.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_load import get_loaders
from local_bound import (KeptVectors, RandomVectors, compute_bound, exact_float32,
                         global_power_iteration, layer_input_shapes)
from utils import UserError, argparser, get_device, load_checkpoint, run_main, select_model

AUDIT_FAILED = 3   # exit status when the audit breaks a certificate
EXPECT_FAILED = 4  # exit status when --expect numbers are not reproduced


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
def _per_sample_norm(t):
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def pgd_l2(model, x, y, eps, alpha, niter, clip=True, loss='ce'):
    """PGD in the L2 ball of radius eps: random start, ``niter`` steps of size ``alpha``
    along the normalised gradient, projection onto the ball, inputs clipped to [0, 1] when
    ``clip``. loss: 'ce' (cross-entropy) or 'margin' (max_{i != y} z_i - z_y).
    x: [batch, ...] -> adversarial x: [batch, ...]."""
    delta = torch.randn_like(x)
    delta = delta / _per_sample_norm(delta) * eps * torch.rand(
        x.shape[0], *([1] * (x.dim() - 1)), device=x.device)
    x_adv = x + delta
    x_adv = x_adv.clamp(0, 1) if clip else x_adv
    for _ in range(niter):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(x_adv)
            if loss == 'ce':
                obj = F.cross_entropy(z, y)
            else:
                zy = z.gather(1, y.view(-1, 1)).squeeze(1)
                obj = (z.scatter(1, y.view(-1, 1), float('-inf')).max(1).values - zy).sum()
            grad, = torch.autograd.grad(obj, x_adv)
        delta = x_adv.detach() + alpha * grad / _per_sample_norm(grad) - x
        delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
        x_adv = x + delta
        x_adv = x_adv.clamp(0, 1) if clip else x_adv
    return x_adv.detach()


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
# Per-sample rows
# ----------------------------------------------------------------------------------------
def tsv_columns(radii, act_layers):
    return (['idx', 'label', 'pred', 'correct', 'pgd_correct', 'local_bound', 'global_bound',
             'margin'] + [f"certified@{e:g}" for e in radii]
            + [f"certified_global@{e:g}" for e in radii] + [f"varying@{i}" for i in act_layers]
            + ['converged', 'global_converged', 'audited', 'broken', 'seconds'])


INT_COLUMNS = ('idx', 'label', 'pred')


def read_tsv(path):
    """Rows of a TSV written by --out as dicts of floats (idx, label, pred as ints). A last
    line cut off by an interrupted run is ignored."""
    with open(path) as f:
        text = f.read()
    lines = text.split('\n')
    header = lines[0].split('\t')
    rows = []
    for line in lines[1:-1]:        # the part after the last newline is incomplete or empty
        parts = line.split('\t')
        if len(parts) != len(header):
            raise UserError(f"{path}: malformed row {line[:80]!r}")
        row = {h: float(v) for h, v in zip(header, parts)}
        for k in INT_COLUMNS:
            row[k] = int(row[k])
        rows.append(row)
    return header, rows


def _fmt(v):
    if isinstance(v, (bool, int)):
        return str(int(v))
    return 'nan' if v != v else f"{v:.6g}"


def batch_rows(idx, y, by_eps, radii, pgd, audit_counts, global_converged, seconds):
    """One row dict per sample of a batch (the TSV's columns, as Python numbers)."""
    first = by_eps[radii[0]]
    converged = torch.stack([by_eps[e]['converged'] for e in radii]).all(0)
    rows = []
    for k in range(len(idx)):
        row = {'idx': int(idx[k]), 'label': int(y[k]), 'pred': int(first['pred'][k]),
               'correct': int(first['correct'][k]), 'pgd_correct': int(pgd[k]),
               'local_bound': float(first['lip_local'][k]),
               'global_bound': float(first['lip_global'][k]), 'margin': float(first['margin'][k])}
        for e in radii:
            row[f"certified@{e:g}"] = int(by_eps[e]['certified'][k])
        for e in radii:
            row[f"certified_global@{e:g}"] = int(by_eps[e]['certified_global'][k])
        for i, v in first['varying'].items():
            row[f"varying@{i}"] = float(v[k])
        row.update(converged=int(converged[k]), global_converged=int(global_converged),
                   audited=int(audit_counts[0][k]), broken=int(audit_counts[1][k]),
                   seconds=seconds)
        # floats as the TSV holds them, so a summary of read-back rows is the same
        rows.append({k: float(_fmt(v)) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def summarize(rows, radii, args, audit=False):
    """The results dict (JSON-ready) of a list of rows: everything is counted per sample, so
    a resumed evaluation gives the same summary as an uninterrupted one."""
    n = max(len(rows), 1)
    eps0 = radii[0]

    def frac(f):
        return sum(f(r) for r in rows) / n
    per_radius = {}
    for e in radii:
        c, g = f"certified@{e:g}", f"certified_global@{e:g}"
        per_radius[f"{e:g}"] = {'certified_acc': frac(lambda r: r[c]),
                                'certified_acc_converged_only': frac(lambda r: r[c] * r['converged']),
                                'certified_acc_global': frac(lambda r: r[g])}
    layers = [k.split('@')[1] for k in (rows[0] if rows else {}) if k.startswith('varying@')]
    first = per_radius[f"{eps0:g}"]
    out = {
        'clean_acc': frac(lambda r: r['correct']), 'pgd_acc': frac(lambda r: r['pgd_correct']),
        'certified_acc': first['certified_acc'], 'epsilon': eps0, 'n': len(rows),
        'bound': args.bound, 'certified_acc_converged_only': first['certified_acc_converged_only'],
        'radii': per_radius,
        'unconverged': sum(1 for r in rows if not r['converged']),
        'global_converged': all(r['global_converged'] for r in rows),
        'nan_bounds': sum(1 for r in rows if math.isnan(r['margin'])),
        'varying_fraction': {i: frac(lambda r: r[f"varying@{i}"]) for i in layers},
        'test_sniter': args.test_sniter, 'test_opt_iter': args.test_opt_iter,
        'seconds': sum(r['seconds'] for r in rows),
        'per_sample': [{'idx': r['idx'], 'label': r['label'], 'pred': r['pred'],
                        'certified': bool(r[f"certified@{eps0:g}"]),
                        'pgd_correct': bool(r['pgd_correct']),
                        'margin': None if math.isnan(r['margin']) else r['margin'],
                        'local_bound': r['local_bound'], 'converged': bool(r['converged'])}
                       for r in rows],
    }
    if audit:
        out['audit'] = {'attacked': int(sum(r['audited'] for r in rows)),
                        'broken': int(sum(r['broken'] for r in rows)),
                        'restarts': args.audit_restarts, 'steps': args.audit_steps}
    return out


def _resume_rows(tsv_path, radii, loader_indices):
    """Rows of an interrupted --out TSV that can be kept: whole batches only (a batch cut
    off in the middle is certified again). Returns (header, rows, set of done batches)."""
    header, rows = read_tsv(tsv_path)
    want = [f"certified@{e:g}" for e in radii]
    have = [h for h in header if h.startswith('certified@')]
    if have != want or 'audited' not in header:
        raise UserError(f"--resume: {tsv_path} was written with other radii or by an older "
                        f"version ({', '.join(have)}); remove it or choose another --out")
    done = {r['idx'] for r in rows}
    batches = {b for b, ids in enumerate(loader_indices) if all(i in done for i in ids)}
    keep = {i for b in batches for i in loader_indices[b]}
    return header, [r for r in rows if r['idx'] in keep], batches


# ----------------------------------------------------------------------------------------
# Full evaluation
# ----------------------------------------------------------------------------------------
def full_evaluation(model, loader, args, device, tsv_path=None, audit=False, resume=False):
    """Clean, PGD (at the first radius) and certified accuracy at every radius of
    ``args.radii`` (default: args.epsilon), local and global bound; optional per-sample TSV
    (written as it goes) and audit. Every batch is seeded from (--seed, batch number) and
    starts its global power iterations afresh, so
    ``resume`` (continue the TSV of an interrupted run, skipping its finished batches)
    gives the rows of an uninterrupted run. Returns the results dict (JSON-ready)."""
    radii = list(getattr(args, 'radii', [args.epsilon]))
    eps0 = radii[0]
    seed = getattr(args, 'seed', 0)
    model.eval()
    rows, skip, header = [], set(), None
    if resume and tsv_path and os.path.isfile(tsv_path):
        indices = [list(map(int, ids)) for ids in batch_indices(loader)]
        header, rows, skip = _resume_rows(tsv_path, radii, indices)
        print(f"resuming {tsv_path}: {len(rows)} points done, {len(indices) - len(skip)} of "
              f"{len(indices)} batches to go", flush=True)
    base_global = converged_global_vectors(model, loader, args, seed, device)
    tsv = None
    if tsv_path:
        os.makedirs(os.path.dirname(tsv_path) or '.', exist_ok=True)
        if header is not None:      # keep the finished batches (atomically), then append
            with open(tsv_path + '.tmp', 'w') as f:
                f.write('\t'.join(header) + '\n')
                for r in rows:
                    f.write('\t'.join(_fmt(r[c]) for c in header) + '\n')
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
            if audit:
                for e in radii:
                    sel, brk = _audit_certified(model, x, y, idx, e, by_eps[e]['certified'], args)
                    audited += sel.long()
                    broken += brk.long()
            new = batch_rows(idx, y.cpu(), by_eps, radii, pgd, (audited, broken), g_conv,
                             (time.time() - t0) / b)
            if tsv is not None:
                if header is None:
                    header = tsv_columns(radii, list(by_eps[eps0]['varying']))
                    tsv.write('\t'.join(header) + '\n')
                for r in new:
                    tsv.write('\t'.join(_fmt(r[c]) for c in header) + '\n')
                tsv.flush()
            rows.extend(new)
            if bar.disable and getattr(args, 'verbose', 0):
                print(f"  evaluate: batch {bi + 1}/{len(loader)} done, {len(rows)} points, "
                      f"{time.time() - t0:.0f}s", flush=True)
    finally:
        if tsv is not None:
            tsv.close()
    rows.sort(key=lambda r: r['idx'])
    return summarize(rows, radii, args, audit)


def converged_global_vectors(model, loader, args, seed, device):
    """{affine layer: its global power-iteration vector [1, *in_shape]}, iterated from a
    seeded Gaussian start to tolerance 1e-4 (or --test_sniter iterations), once per
    evaluation; certification starts every batch from these."""
    shapes = layer_input_shapes(model, tuple(loader.dataset[0][0].shape))
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + 999983)
    out = {}
    with torch.no_grad(), exact_float32():
        for i, shape in shapes.items():
            u = torch.randn((1, *shape), generator=gen, device=device)
            _, out[i], _ = global_power_iteration(model[i], u, args.test_sniter)
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


def expected_results(res):
    """The numbers --expect compares, from a results dict: n, clean and certified accuracy
    (reference count) per radius, in percent."""
    return {'n': res['n'], 'clean_acc': round(100 * res['clean_acc'], 4),
            'certified_acc': {e: round(100 * v['certified_acc'], 4) for e, v in res['radii'].items()}}


def check_expected(res, expected, tol_pp=0.5):
    """Messages for every number of ``expected`` (as written by expected_results) that
    ``res`` misses by more than ``tol_pp`` percentage points; [] when all agree."""
    got = expected_results(res)
    bad = []
    if got['n'] != expected['n']:
        bad.append(f"n: evaluated {got['n']} points, the record is for {expected['n']}")
    pairs = [('clean accuracy', got['clean_acc'], expected['clean_acc'])]
    for e, want in expected['certified_acc'].items():
        if e not in got['certified_acc']:
            bad.append(f"certified accuracy at eps {e}: not evaluated (add it to --epsilon)")
            continue
        pairs.append((f"certified accuracy at eps {e}", got['certified_acc'][e], want))
    for name, g, w in pairs:
        if not abs(g - w) <= tol_pp:
            bad.append(f"{name}: got {g:.2f}%, recorded {w:.2f}% (off by {g - w:+.2f} pp, "
                       f"tolerance {tol_pp} pp)")
    return bad


def comparison_table(named):
    """Markdown table of several results dicts ({name: results}, e.g. the models trained
    with each bound): clean, PGD, certified accuracy (local / global bound) per radius,
    unconverged points and the audit."""
    radii = list(next(iter(named.values()))['radii'])
    pgd_eps = next(iter(named.values()))['epsilon']
    head = (["trained with", "clean", f"PGD @{pgd_eps:g}"]
            + [f"certified @{e} (local / global bound)" for e in radii]
            + ["unconverged", "audit: broken / attacked"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in named.items():
        cells = [name, f"{100 * r['clean_acc']:.2f}%", f"{100 * r['pgd_acc']:.2f}%"]
        for e in radii:
            v = r['radii'].get(e)
            cells.append("-" if v is None else
                         f"{100 * v['certified_acc']:.2f}% / {100 * v['certified_acc_global']:.2f}%")
        a = r.get('audit')
        cells += [f"{r['unconverged']} of {r['n']}",
                  "-" if a is None else f"{a['broken']} / {a['attacked']}"]
        rows.append("| " + " | ".join(cells) + " |")
    return '\n'.join(rows)


def summary_line(r):
    s = (f"eps {r['epsilon']:.4g} n {r['n']}: clean err {100 * (1 - r['clean_acc']):.2f}% "
         f"| PGD err {100 * (1 - r['pgd_acc']):.2f}% | certified err "
         f"{100 * (1 - r['certified_acc']):.2f}% (certified acc {100 * r['certified_acc']:.2f}%, "
         f"{100 * r['certified_acc_converged_only']:.2f}% counting unconverged as not certified; "
         f"{r['unconverged']} unconverged, {r['nan_bounds']} NaN) [{r['seconds']:.0f}s]")
    if 'audit' in r:
        s += f" | audit: {r['audit']['broken']} of {r['audit']['attacked']} certified points broken"
    if not r.get('global_converged', True):
        s += " | global iterations NOT converged"
    if r.get('normalization'):
        s += " | eps in the NORMALISED input space ((x - mean) / 0.225, --normalization)"
    return s


GLOBAL_WARNING = ("WARNING: the global power iterations did not converge within --test_sniter: "
                  "the global-bound numbers rest on underestimated norms and are not certificates")


def radius_lines(r):
    lines = []
    g_note = "" if r['global_converged'] else " (global iterations NOT converged)"
    for e, v in r['radii'].items():
        lines.append(f"  eps {e}: certified acc local {100 * v['certified_acc']:.2f}% "
                     f"(converged only {100 * v['certified_acc_converged_only']:.2f}%), "
                     f"global {100 * v['certified_acc_global']:.2f}%{g_note}")
    if not r['global_converged']:
        lines.append(GLOBAL_WARNING)
    return lines


def markdown_table(r):
    rows = ["| radius | clean acc | PGD acc | certified, local (reference count) | "
            "certified, local (unconverged = not certified) | certified, global |",
            "|---|---|---|---|---|---|"]
    for k, (e, v) in enumerate(r['radii'].items()):
        pgd = f"{100 * r['pgd_acc']:.2f}%" if k == 0 else "-"
        rows.append(f"| {e} | {100 * r['clean_acc']:.2f}% | {pgd} | {100 * v['certified_acc']:.2f}% | "
                    f"{100 * v['certified_acc_converged_only']:.2f}% | "
                    f"{100 * v['certified_acc_global']:.2f}% |")
    rows.append("")
    rows.append(f"n = {r['n']} test points, test_sniter {r['test_sniter']}, test_opt_iter "
                f"{r['test_opt_iter']}; unconverged: {r['unconverged']}; NaN bounds: "
                f"{r['nan_bounds']}; global power iterations converged: {r['global_converged']}"
                + (f"; audit: {r['audit']['broken']} of {r['audit']['attacked']} certified "
                   f"(point, radius) pairs broken by {r['audit']['restarts']} x "
                   f"{r['audit']['steps']}-step PGD-L2" if 'audit' in r else ""))
    return '\n'.join(rows)


def main(argv=None, **defaults):
    args = argparser(argv, **defaults)
    if args.compare:
        named = {}
        for item in args.compare:
            name, sep, path = item.partition('=')
            if not sep:
                raise UserError(f"--compare wants NAME=results.json, got {item!r}")
            try:
                with open(path) as f:
                    named[name] = json.load(f)
            except FileNotFoundError:
                raise UserError(f"--compare: no {path} (run the evaluation with --results first)")
        print(comparison_table(named))
        return named
    if args.saved_model is None:
        raise UserError("--saved_model P is required (loads P_best.pth)")
    device = get_device(args)
    model = select_model(args.data, args.model, args.init)
    path = args.saved_model + '_best.pth'
    load_checkpoint(path, model, 'cpu')
    model.to(device)
    _, test_loader = get_loaders(args, train=False)
    torch.manual_seed(args.seed)
    if args.resume and not args.out:
        raise UserError("evaluate.py --resume continues the --out TSV of an interrupted run; "
                        "give --out")
    t0 = time.time()
    res = full_evaluation(model, test_loader, args, device, tsv_path=args.out, audit=args.audit,
                          resume=args.resume)
    res['wall_seconds'] = time.time() - t0
    res['checkpoint'] = path
    res['normalization'] = bool(getattr(args, 'normalization', False))
    if args.results:
        os.makedirs(os.path.dirname(args.results) or '.', exist_ok=True)
        with open(args.results, 'w') as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.results}")
    if args.out:
        print(f"wrote {args.out} ({res['n']} rows)")
    plot_dir = args.plot_dir or (args.saved_model + '_plots' if args.plots else None)
    if plot_dir:
        from plots import make_plots
        if not args.out:
            raise UserError("--plots / --plot_dir need --out (the plots are drawn from its rows)")
        for p in make_plots(args.out, plot_dir, title=os.path.basename(args.saved_model)):
            print(f"wrote {p}")
    print('\n'.join(radius_lines(res)))
    if args.markdown:
        print(markdown_table(res))
    print(summary_line(res))
    if args.expect:
        with open(args.expect) as f:
            expected = json.load(f)
        bad = check_expected(res, expected, expected.get('tolerance_pp', 0.5))
        for line in bad:
            print(f"error: {line}", file=sys.stderr)
        if bad:
            print(f"error: the results differ from {args.expect}", file=sys.stderr)
            sys.exit(EXPECT_FAILED)
        print(f"results agree with {args.expect} (within {expected.get('tolerance_pp', 0.5)} pp)")
    if args.record:
        rec = dict(expected_results(res), tolerance_pp=0.5, checkpoint=res['checkpoint'],
                   test_sniter=args.test_sniter, test_opt_iter=args.test_opt_iter)
        with open(args.record, 'w') as f:
            json.dump(rec, f, indent=1)
        print(f"wrote {args.record}")
    if args.audit and res['audit']['broken']:
        print(f"error: the audit broke {res['audit']['broken']} certified points", file=sys.stderr)
        sys.exit(AUDIT_FAILED)
    return res


if __name__ == '__main__':
    run_main(main)
