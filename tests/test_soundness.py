"""Soundness that can fail: every certified radius attacked at the radius itself (points on
the sphere of that radius, PGD in that ball started from the direction of steepest margin
descent), on networks whose certificates are near tight (their radius is within 1% of the
exact minimal adversarial distance, so a bound made too optimistic is broken: see
test_mutations.py) and on small networks trained with the certified loss; each attack is
shown to work where it should."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, blobs, dev, trained_tiny
from soundness_checks import (affine_exact_distance, attack_works, flips_within, linear_net,
                              near_tight_inputs, orthogonal_net, radius_check)

import locallip
from locallip.attacks import audit_batch, pgd_l2

NEAR_TIGHT = {
    'linear': lambda: linear_net(d=6, classes=4, seed=0),
    'relu': lambda: orthogonal_net(d=6, classes=4, seed=1, scales=(1.5, 0.7)),
    'relux': lambda: orthogonal_net(d=6, classes=3, seed=2, scales=(0.8, 1.3, 1.1), act='relux'),
}


@pytest.mark.parametrize('certificate', ['reference', 'guaranteed'])
@pytest.mark.parametrize('kind', list(NEAR_TIGHT))
def test_near_tight_radius_is_exact_and_survives_attacks_at_it(kind, certificate):
    """A single Linear layer (the bound is exact) and ReLU networks of orthogonal-times-scalar
    layers whose neurons all stay active (affine, the product of norms exact): every point's
    certified radius is within 1% below its exact minimal adversarial distance, never above;
    sphere samples and PGD at the radius flip nothing; at 1.05 times the exact distance PGD
    flips every point (the attack works, so it would catch a radius 1.05 times too large).
    (The guaranteed certificate of a single Linear layer, with no norm to bound, divided its
    delta by 0 operators before lanczos.py's max(n_operators, 1).)"""
    net = NEAR_TIGHT[kind]()
    x = near_tight_inputs(net, n=24, seed=3)
    with torch.no_grad():
        y = net(x).argmax(1)
    exact = affine_exact_distance(net, x, y)
    res = radius_check(net, x, certificate, exact)
    assert res['attacked'] == 24 and res['broken'] == 0 and res['above'] == 0, res
    assert (res['radius'] >= 0.99 * exact).all(), (res['radius'] / exact).min()
    assert res['tight'] == 24
    assert attack_works(net, x, factor=1.05) == 24


@pytest.mark.parametrize('kind', list(NEAR_TIGHT))
def test_near_tight_worst_case_logits_are_attained(kind):
    """compute_bound's worst-case logits z_i + a_iy at eps = 0.5 on the near-tight networks:
    projected gradient ascent of every z_i - z_y in the ball never exceeds them and reaches
    them to 1e-6 (the bound is exact there), so worst-case margins or a Lipschitz bound made
    smaller by any factor are exceeded."""
    from soundness_checks import worst_logit_check
    net = NEAR_TIGHT[kind]()
    x = near_tight_inputs(net, n=24, seed=3)
    with torch.no_grad():
        y = net(x).argmax(1)
    res = worst_logit_check(net, x, y, 0.5)
    assert res['above'] == 0 and res['attained'] >= 1 - 1e-6, res


def test_attacks_at_the_radius_find_the_exact_boundary():
    """The attacks' own sensitivity on the single Linear layer: PGD at 1.001 times the exact
    distance flips every point (its start is the exact nearest direction), sphere samples on
    a 2-D input at 1.02 times it flip every point, and nothing flips at 0.999 times it."""
    from soundness_checks import pgd_at_radius, sphere_flips
    net = linear_net(d=6, classes=4, seed=0)
    x = near_tight_inputs(net, n=24, seed=3)
    with torch.no_grad():
        y = net(x).argmax(1)
    exact = affine_exact_distance(net, x, y)
    assert pgd_at_radius(net, x, y, exact * 1.001).all()
    assert not flips_within(net, x, y, exact * 0.999).any()
    flat = linear_net(d=2, classes=3, seed=4)
    x2 = near_tight_inputs(flat, n=24, seed=5)
    with torch.no_grad():
        y2 = flat(x2).argmax(1)
    e2 = affine_exact_distance(flat, x2, y2)
    assert sphere_flips(flat, x2, y2, e2 * 1.02, n=400).all()
    assert not sphere_flips(flat, x2, y2, e2 * 0.999, n=400).any()


@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin', 'residual'])
def test_trained_certified_radius_survives_attacks_at_it(kind):
    """Networks trained with the certified loss (not tight: their bound is 2 to 6 times the
    distance PGD finds): every certified point's reference radius attacked at the radius by
    sphere samples, PGD from the steepest direction and the audit's restarts; none flips.
    The attacks do work: at 8 times the radius they flip at least half of the points."""
    net = copy.deepcopy(trained_tiny(kind, 0.3)).double().eval()
    x, y = dev(*blobs(64, 1))
    x = x.double()
    r = locallip.certified_radius(net, x, y)
    sel = r.radius > 0
    assert sel.sum() >= 32, f"only {int(sel.sum())} certified: the test would be vacuous"
    idx = sel.nonzero().flatten().to(DEVICE)
    xc, yc, rc = x[idx], y[idx], r.radius[sel].double()
    assert not flips_within(net, xc, yc, rc, samples=100, steps=30).any()
    broken, adv = audit_batch(net, xc, yc, rc.to(DEVICE).view(-1, 1, 1, 1), restarts=2, steps=50)
    assert ((adv - xc).flatten(1).norm(dim=1).cpu() <= rc * (1 + 1e-9)).all()
    assert not broken.any()
    assert flips_within(net, xc, yc, 8 * rc, samples=100, steps=30).sum() >= len(idx) // 2


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
