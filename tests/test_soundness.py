"""Soundness on a small network trained with the certified loss: no sampled point of the
eps-ball and no PGD attack flips a certified prediction."""
import copy

import pytest
import torch

from conftest import DEVICE, blobs, dev, trained_tiny
from certify import pgd_l2
from local_bound import RandomVectors, compute_bound


@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
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
