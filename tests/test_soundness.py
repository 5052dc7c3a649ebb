"""Soundness on a small network trained with the certified loss: no sampled point of the
eps-ball and no PGD attack flips a certified prediction."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, blobs, dev, trained_tiny
from attacks import pgd_l2
from local_bound import compute_bound
from vectors import RandomVectors


@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin', 'residual'])
def test_certified_points_cannot_be_flipped(kind):
    eps = 0.3
    net = copy.deepcopy(trained_tiny(kind, eps))
    net = net.double()
    xt, yt = dev(*blobs(64, 1))
    xt = xt.double()
    with torch.no_grad():
        res = compute_bound(net, xt, yt, eps, RandomVectors(64, DEVICE), {}, sniter=3000,
                            opt_iter=200, tol=0.0, check=True)
    cert = res.certified(yt)
    assert cert.sum() >= 10, f"only {int(cert.sum())} certified: the test would be vacuous"
    xc, yc = xt[cert], yt[cert]
    n = 400
    d = torch.randn(n, *xc.shape, dtype=torch.float64, device='cpu')
    d = d / d.flatten(2).norm(dim=2).view(n, -1, 1, 1, 1) * eps
    d = dev(d * torch.rand(n, xc.shape[0], 1, 1, 1, dtype=torch.float64) ** (1 / 64))
    with torch.no_grad():
        pred = net((xc.unsqueeze(0) + d).reshape(-1, 1, 8, 8)).argmax(1).view(n, -1)
    assert (pred == yc.unsqueeze(0)).all()
    for restart in range(3):
        adv = pgd_l2(net, xc, yc, eps, eps / 4, 50)
        assert ((adv - xc).flatten(1).norm(dim=1) <= eps * (1 + 1e-9)).all()
        with torch.no_grad():
            assert (net(adv).argmax(1) == yc).all()
    # the attack does work: it flips some correct but uncertified points (or there are none)
    unc = (~cert) & (res.logits.argmax(1) == yt)
    if unc.sum() >= 5:
        with torch.no_grad():
            flipped = net(pgd_l2(net, xt[unc], yt[unc], 3 * eps, 3 * eps / 4, 50)).argmax(1) != yt[unc]
        assert flipped.any()


def test_pgd_is_the_reference_attack():
    """The evaluation attack follows advertorch's L2PGDAttack as the reference calls it
    (CrossEntropyLoss(reduction='sum'), rand_init, clip [0, 1]): start = a uniform random
    image pulled into the eps-ball, then per step: move alpha along the gradient normalised
    by max(norm, 1e-6), clip to [0, 1], THEN scale back into the ball. Checked step by step
    on a linear model, whose input gradient is W^T (softmax - onehot), near the [0, 1]
    border where clipping before or after the projection differ."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64) * 0.2 + 0.8      # near the upper border
    y = torch.tensor([0, 1, 2, 0, 1])
    eps, alpha = 0.9, 0.7
    W = lin[1].weight.detach()

    def into_ball(d):
        n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return d * torch.clamp(eps / n, max=1.0)

    def reference(niter, order):
        torch.manual_seed(1)
        d = into_ball(torch.rand_like(x) - x)
        for _ in range(niter):
            with torch.no_grad():
                p = torch.softmax(lin(x + d), 1)
            g = ((p - F.one_hot(y, 3).double()) @ W).view_as(x)
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
            d = d + alpha * g
            if order == 'clip, then ball':
                d = into_ball((x + d).clamp(0, 1) - x)
            else:
                d = (x + into_ball(d)).clamp(0, 1) - x
        return (x + d).clamp(0, 1)

    for niter in (0, 1, 3):
        torch.manual_seed(1)
        ours = pgd_l2(lin, x, y, eps, alpha, niter)
        assert torch.allclose(ours, reference(niter, 'clip, then ball'), rtol=0, atol=1e-12), niter
        assert ((ours - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-12)).all()
        assert ours.min() >= 0 and ours.max() <= 1
    # the order is decisive here: projecting before clipping gives other points
    assert not torch.allclose(reference(3, 'ball, then clip'), reference(3, 'clip, then ball'),
                              rtol=0, atol=1e-6)
