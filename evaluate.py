"""Evaluate a checkpoint: clean error, PGD-L2 error and certified error.

    python evaluate.py --data mnist --model relux --epsilon 1.58 --test_batch_size 256 \
        --test_sniter 2000 --saved_model pretrained/relu/mnist_4C3F [--results out.json]

    # several radii, per-sample rows, soundness audit, plots, markdown table:
    python evaluate.py ... --epsilon 0.5 1.0 1.58 --out rows.tsv --audit --plots --markdown

Certification starts every sample from fresh random power-iteration vectors and iterates
up to --test_sniter (each sample stops at tolerance 1e-3). One propagation per radius gives
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
from local_bound import RandomVectors, compute_bound
from utils import UserError, argparser, get_device, load_checkpoint, run_main, select_model

AUDIT_FAILED = 3   # exit status when the audit breaks a certificate


# ----------------------------------------------------------------------------------------
# Certification
# ----------------------------------------------------------------------------------------
def certify_batch(model, x, y, eps, vectors, global_vectors, *, sniter, opt_iter, bound='local'):
    """Certify one batch at L2 radius ``eps``. Returns a dict of per-sample CPU tensors:
    pred, correct, certified (the chosen bound), certified_global, margin, lip_local
    (prod_i sigma_i), lip_global (prod_i ||W_i||_2), converged, and ``varying``
    {activation index: fraction of varying neurons}; plus 'global_converged' (bool)."""
    with torch.no_grad():
        res = compute_bound(model, x, y, eps, vectors, global_vectors, sniter=sniter,
                            opt_iter=opt_iter, bound=bound, check=True, also_global=True)
    pred = res.logits.argmax(1)
    safe = max(float(eps), 1e-30)
    out = {'pred': pred, 'correct': pred == y, 'certified': res.certified(y),
           'certified_global': res.certified(y, res.worst_global), 'margin': res.margin(y),
           'lip_local': res.r_local / safe, 'lip_global': res.r_global / safe,
           'converged': res.converged}
    out = {k: v.detach().cpu() for k, v in out.items()}
    out['varying'] = {i: d.flatten(1).mean(1).cpu() for i, d in res.masks.items()}
    out['global_converged'] = res.global_converged
    return out


def certify(model, loader, eps, *, sniter, opt_iter, device, store=None,
            global_vectors=None, bound='local', desc='certify'):
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
                          opt_iter=opt_iter, bound=bound)
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
    Returns (points attacked, points broken)."""
    sel = certified.to(x.device)
    if not sel.any():
        return 0, 0
    broken, found = audit_batch(model, x[sel], y[sel], eps, args.audit_restarts, args.audit_steps)
    if broken.any():
        k = int(broken.nonzero()[0])
        dist = (found[k] - x[sel][k]).norm().item()
        with torch.no_grad():
            pred = int(model(found[k:k + 1]).argmax(1))
        print(f"AUDIT FAILURE: test point {int(idx[sel.cpu()][k])} (label {int(y[sel][k])}) is "
              f"certified at eps {eps:g} but the attack found a point at L2 distance {dist:.4f} "
              f"predicted {pred}", file=sys.stderr)
    return int(sel.sum()), int(broken.sum())


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
    return (['idx', 'label', 'pred', 'correct', 'local_bound', 'global_bound', 'margin']
            + [f"certified@{e:g}" for e in radii] + [f"certified_global@{e:g}" for e in radii]
            + [f"varying@{i}" for i in act_layers] + ['converged', 'seconds'])


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
        for k in ('idx', 'label', 'pred'):
            row[k] = int(row[k])
        rows.append(row)
    return header, rows


def _fmt(v):
    return 'nan' if v != v else f"{v:.6g}"


# ----------------------------------------------------------------------------------------
# Full evaluation
# ----------------------------------------------------------------------------------------
def full_evaluation(model, loader, args, device, tsv_path=None, audit=False):
    """Clean, PGD (at the first radius) and certified accuracy at every radius of
    ``args.radii`` (default: args.epsilon), local and global bound; optional per-sample TSV
    and audit. Returns the results dict (JSON-ready)."""
    radii = list(getattr(args, 'radii', [args.epsilon]))
    eps0 = radii[0]
    model.eval()
    t_start = time.time()
    global_vectors = {}
    n = 0
    acc = {'correct': 0, 'pgd': 0, 'unconverged': 0, 'nan': 0}
    cert = {e: {'local': 0, 'local_converged': 0, 'global': 0} for e in radii}
    varying_sum = {}
    global_converged = True
    audited = broken_total = 0
    per_sample = []
    tsv = None
    cols = None
    try:
        for x, y, idx in tqdm(loader, desc='evaluate', leave=False, disable=None):
            t0 = time.time()
            x, y = x.to(device), y.to(device)
            b = x.shape[0]
            by_eps = {}
            for e in radii:
                by_eps[e] = certify_batch(model, x, y, e, RandomVectors(b, device), global_vectors,
                                          sniter=args.test_sniter, opt_iter=args.test_opt_iter,
                                          bound=args.bound)
                global_converged &= by_eps[e]['global_converged']
            first = by_eps[eps0]
            converged = torch.stack([by_eps[e]['converged'] for e in radii]).all(0)
            pgd = pgd_correct_batch(model, x, y, eps0, args.alpha, args.niter)
            if audit:
                for e in radii:
                    attacked, broken = _audit_certified(model, x, y, idx, e, by_eps[e]['certified'],
                                                        args)
                    audited += attacked
                    broken_total += broken
            seconds = (time.time() - t0) / b
            n += b
            acc['correct'] += int(first['correct'].sum())
            acc['pgd'] += int(pgd.sum())
            acc['unconverged'] += int((~converged).sum())
            acc['nan'] += int(torch.isnan(first['margin']).sum())
            for e in radii:
                c = by_eps[e]
                cert[e]['local'] += int(c['certified'].sum())
                cert[e]['local_converged'] += int((c['certified'] & converged).sum())
                cert[e]['global'] += int(c['certified_global'].sum())
            for i, v in first['varying'].items():
                varying_sum[i] = varying_sum.get(i, 0.0) + float(v.sum())
            if tsv_path and tsv is None:
                cols = tsv_columns(radii, list(first['varying']))
                os.makedirs(os.path.dirname(tsv_path) or '.', exist_ok=True)
                tsv = open(tsv_path, 'w')
                tsv.write('\t'.join(cols) + '\n')
                tsv.flush()
            for k in range(b):
                row = {'idx': int(idx[k]), 'label': int(y[k]), 'pred': int(first['pred'][k]),
                       'correct': int(first['correct'][k]),
                       'local_bound': float(first['lip_local'][k]),
                       'global_bound': float(first['lip_global'][k]),
                       'margin': float(first['margin'][k]), 'converged': int(converged[k]),
                       'pgd_correct': bool(pgd[k]), 'seconds': seconds}
                for e in radii:
                    row[f"certified@{e:g}"] = int(by_eps[e]['certified'][k])
                    row[f"certified_global@{e:g}"] = int(by_eps[e]['certified_global'][k])
                for i, v in first['varying'].items():
                    row[f"varying@{i}"] = float(v[k])
                if tsv is not None:
                    tsv.write('\t'.join(str(row[c]) if isinstance(row[c], int) else _fmt(row[c])
                                        for c in cols) + '\n')
                    tsv.flush()
                per_sample.append({'idx': row['idx'], 'label': row['label'], 'pred': row['pred'],
                                   'certified': bool(row[f"certified@{eps0:g}"]),
                                   'pgd_correct': row['pgd_correct'],
                                   'margin': None if math.isnan(row['margin']) else row['margin'],
                                   'local_bound': row['local_bound'],
                                   'converged': bool(row['converged'])})
    finally:
        if tsv is not None:
            tsv.close()
    n = max(n, 1)
    out = {
        'clean_acc': acc['correct'] / n, 'pgd_acc': acc['pgd'] / n,
        'certified_acc': cert[eps0]['local'] / n, 'epsilon': eps0, 'n': n, 'bound': args.bound,
        'certified_acc_converged_only': cert[eps0]['local_converged'] / n,
        'radii': {f"{e:g}": {'certified_acc': cert[e]['local'] / n,
                             'certified_acc_converged_only': cert[e]['local_converged'] / n,
                             'certified_acc_global': cert[e]['global'] / n} for e in radii},
        'unconverged': acc['unconverged'], 'global_converged': bool(global_converged),
        'nan_bounds': acc['nan'], 'varying_fraction': {str(i): v / n for i, v in varying_sum.items()},
        'test_sniter': args.test_sniter, 'test_opt_iter': args.test_opt_iter,
        'seconds': time.time() - t_start, 'per_sample': per_sample,
    }
    if audit:
        out['audit'] = {'attacked': audited, 'broken': broken_total,
                        'restarts': args.audit_restarts, 'steps': args.audit_steps}
    return out


def summary_line(r):
    s = (f"eps {r['epsilon']:.4g} n {r['n']}: clean err {100 * (1 - r['clean_acc']):.2f}% "
         f"| PGD err {100 * (1 - r['pgd_acc']):.2f}% | certified err "
         f"{100 * (1 - r['certified_acc']):.2f}% (certified acc {100 * r['certified_acc']:.2f}%, "
         f"{100 * r['certified_acc_converged_only']:.2f}% counting unconverged as not certified; "
         f"{r['unconverged']} unconverged, {r['nan_bounds']} NaN) [{r['seconds']:.0f}s]")
    if 'audit' in r:
        s += f" | audit: {r['audit']['broken']} of {r['audit']['attacked']} certified points broken"
    return s


def radius_lines(r):
    lines = []
    for e, v in r['radii'].items():
        lines.append(f"  eps {e}: certified acc local {100 * v['certified_acc']:.2f}% "
                     f"(converged only {100 * v['certified_acc_converged_only']:.2f}%), "
                     f"global {100 * v['certified_acc_global']:.2f}%")
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
    if args.saved_model is None:
        raise UserError("--saved_model P is required (loads P_best.pth)")
    device = get_device(args)
    model = select_model(args.data, args.model, args.init)
    path = args.saved_model + '_best.pth'
    load_checkpoint(path, model, 'cpu')
    model.to(device)
    _, test_loader = get_loaders(args, train=False)
    torch.manual_seed(args.seed)
    res = full_evaluation(model, test_loader, args, device, tsv_path=args.out, audit=args.audit)
    res['checkpoint'] = path
    if args.results:
        os.makedirs(os.path.dirname(args.results) or '.', exist_ok=True)
        with open(args.results, 'w') as f:
            json.dump(res, f, indent=1)
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
    if args.audit and res['audit']['broken']:
        print(f"error: the audit broke {res['audit']['broken']} certified points", file=sys.stderr)
        sys.exit(AUDIT_FAILED)
    return res


if __name__ == '__main__':
    run_main(main)
