"""Evaluate a checkpoint: clean error, PGD-L2 error and certified error at --epsilon.

    python evaluate.py --data mnist --model relux --epsilon 1.58 --test_batch_size 256 \
        --test_sniter 2000 --saved_model pretrained/relu/mnist_4C3F [--results out.json]

Certification starts every sample from fresh random power-iteration vectors, iterates up
to --test_sniter (each sample stops at tolerance 1e-3) and uses --test_opt_iter rounds of
the worst-case-logit algorithm. A sample whose bound has a NaN anywhere is NOT certified.
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_load import get_loaders
from local_bound import RandomVectors, compute_bound
from utils import UserError, argparser, get_device, load_checkpoint, run_main, select_model


def certify(model, loader, eps, *, sniter, opt_iter, device, store=None,
            global_vectors=None, bound='local', desc='certify'):
    """Certify every sample of ``loader`` at L2 radius ``eps``.

    store: a VectorStore to warm-start from (training-time test evaluation) or None for
    fresh random vectors. Returns a dict of per-sample tensors (CPU): idx, label, pred,
    correct, certified, margin, r_local, r_global, converged.
    """
    model.eval()
    global_vectors = {} if global_vectors is None else global_vectors
    cols = {k: [] for k in ('idx', 'label', 'pred', 'correct', 'certified', 'margin',
                            'r_local', 'r_global', 'converged')}
    with torch.no_grad():
        for x, y, idx in tqdm(loader, desc=desc, leave=False, disable=None):
            x, y = x.to(device), y.to(device)
            vecs = RandomVectors(x.shape[0], device) if store is None else store.batch(idx, device)
            res = compute_bound(model, x, y, eps, vecs, global_vectors, sniter=sniter,
                                opt_iter=opt_iter, bound=bound, check=True)
            pred = res.logits.argmax(1)
            for k, v in (('idx', idx), ('label', y), ('pred', pred), ('correct', pred == y),
                         ('certified', res.certified(y)), ('margin', res.margin(y)),
                         ('r_local', res.r_local), ('r_global', res.r_global),
                         ('converged', res.converged)):
                cols[k].append(v.detach().cpu())
    return {k: torch.cat(v) for k, v in cols.items()}


def pgd_l2(model, x, y, eps, alpha, niter):
    """PGD in the L2 ball of radius eps: random start, ``niter`` steps of size ``alpha``
    along the normalised gradient of the cross-entropy, projection onto the ball, inputs
    clipped to [0, 1]. x: [batch, ...] -> adversarial x: [batch, ...]."""
    def per_sample_norm(t):
        return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))

    delta = torch.randn_like(x)
    delta = delta / per_sample_norm(delta) * eps * torch.rand(x.shape[0], *([1] * (x.dim() - 1)),
                                                              device=x.device)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(niter):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
            grad, = torch.autograd.grad(loss, x_adv)
        delta = x_adv.detach() + alpha * grad / per_sample_norm(grad) - x
        delta = delta * (eps / per_sample_norm(delta)).clamp(max=1.0)
        x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


def pgd_correct(model, loader, eps, alpha, niter, device):
    """[n] bool (CPU): clean prediction correct AND still correct after PGD-L2."""
    model.eval()
    out = []
    for x, y, _ in tqdm(loader, desc='pgd', leave=False, disable=None):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        adv = pgd_l2(model, x, y, eps, alpha, niter) if eps > 0 and niter > 0 else x
        with torch.no_grad():
            out.append((clean & (model(adv).argmax(1) == y)).cpu())
    return torch.cat(out)


def full_evaluation(model, loader, args, device):
    """Clean, PGD and certified accuracy at args.epsilon; returns the results dict."""
    t0 = time.time()
    cert = certify(model, loader, args.epsilon, sniter=args.test_sniter,
                   opt_iter=args.test_opt_iter, device=device, bound=args.bound)
    pgd = pgd_correct(model, loader, args.epsilon, args.alpha, args.niter, device)
    n = len(cert['idx'])
    out = {
        'clean_acc': cert['correct'].float().mean().item(),
        'pgd_acc': pgd.float().mean().item(),
        'certified_acc': cert['certified'].float().mean().item(),
        'epsilon': args.epsilon, 'n': n, 'bound': args.bound,
        'test_sniter': args.test_sniter, 'test_opt_iter': args.test_opt_iter,
        'unconverged': int((~cert['converged']).sum()),
        'nan_bounds': int(torch.isnan(cert['margin']).sum()),
        'seconds': time.time() - t0,
        'per_sample': [
            {'idx': int(cert['idx'][k]), 'label': int(cert['label'][k]),
             'pred': int(cert['pred'][k]), 'certified': bool(cert['certified'][k]),
             'pgd_correct': bool(pgd[k]), 'margin': _num(cert['margin'][k]),
             'r_local': float(cert['r_local'][k]), 'converged': bool(cert['converged'][k])}
            for k in range(n)],
    }
    return out


def _num(v):
    v = float(v)
    return None if v != v else v   # JSON has no NaN


def summary_line(r):
    return (f"eps {r['epsilon']:.4g} n {r['n']}: clean err {100 * (1 - r['clean_acc']):.2f}% "
            f"| PGD err {100 * (1 - r['pgd_acc']):.2f}% | certified err "
            f"{100 * (1 - r['certified_acc']):.2f}% (certified acc {100 * r['certified_acc']:.2f}%, "
            f"{r['unconverged']} unconverged, {r['nan_bounds']} NaN) [{r['seconds']:.0f}s]")


def main(argv=None):
    args = argparser(argv)
    if args.saved_model is None:
        raise UserError("--saved_model P is required (loads P_best.pth)")
    device = get_device(args)
    model = select_model(args.data, args.model, args.init)
    path = args.saved_model + '_best.pth'
    load_checkpoint(path, model, 'cpu')
    model.to(device)
    _, test_loader = get_loaders(args, train=False)
    torch.manual_seed(args.seed)
    res = full_evaluation(model, test_loader, args, device)
    res['checkpoint'] = path
    if args.results:
        os.makedirs(os.path.dirname(args.results) or '.', exist_ok=True)
        with open(args.results, 'w') as f:
            json.dump(res, f, indent=1)
    print(summary_line(res))
    return res


if __name__ == '__main__':
    run_main(main)
