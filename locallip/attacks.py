"""PGD-L2 attacks: the reference's evaluation attack (clipped to [0, 1]) and the audit's
attack on certified points (the whole L2 ball, margin loss, restarts)."""
import torch
import torch.nn.functional as F

from locallip import progress


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
    for k in range(niter):
        progress.stage("PGD step", k + 1, niter)
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
