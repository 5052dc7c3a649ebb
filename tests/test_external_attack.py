"""Certified radii attacked by a library this project did not write (torchattacks): a
residual network trained with the certified loss, every certified point's guaranteed and
reference radius attacked inside its ball with PGD-L2 and with APGD-L2 (AutoAttack's
step-size-free PGD); no attack finds an adversarial example within a certified radius."""
import copy

import torch
import torchattacks  # requirements.txt installs it (for the tests only)
from conftest import blobs, dev, trained_tiny

import locallip


def _flipped_within(net, x, y, radius, attack) -> int:
    """How many points ``attack(eps, x, y)`` flips at an L2 distance within their radius."""
    broken = 0
    for k in range(x.shape[0]):
        adv = attack(0.999 * radius[k].item(), x[k:k + 1], y[k:k + 1])
        with torch.no_grad():
            flipped = net(adv).argmax(1).item() != y[k].item()
        broken += int(flipped and (adv - x[k:k + 1]).norm().item() <= radius[k].item())
    return broken


def test_certified_radii_survive_torchattacks():
    net = copy.deepcopy(trained_tiny('residual')).eval()
    x, y = dev(*blobs(40, 7))
    pgd = lambda e, xi, yi: torchattacks.PGDL2(net, eps=e, alpha=e / 8, steps=50,
                                                random_start=True)(xi, yi)
    apgd = lambda e, xi, yi: torchattacks.APGD(net, norm='L2', eps=e, steps=50,
                                                n_restarts=2)(xi, yi)
    for certificate in ('guaranteed', 'reference'):
        r = locallip.certified_radius(net, x, y, certificate=certificate, delta=1e-4)
        ok = r.radius > 0
        assert ok.sum() >= 10, f"only {int(ok.sum())} points certified: the test would be vacuous"
        xs, ys, rs = x[ok], y[ok], r.radius[ok]
        assert _flipped_within(net, xs, ys, rs, pgd) == 0, certificate
        assert _flipped_within(net, xs, ys, rs, apgd) == 0, certificate
    # the attacks do work: at 8 times its radius APGD flips most points
    assert _flipped_within(net, xs, ys, 8 * rs, apgd) >= len(xs) // 2
