"""The soundness checks catch a bound made deliberately too optimistic. Each mutation is
applied with monkeypatch where the bound uses it (every module that imported the function
by name: soundness_checks.patch_everywhere), then the checks of test_soundness.py (attacks
at the certified radius of a near-tight network) and test_radius.py (radii and
certificates against the exact minimal adversarial distance) run as functions and must
report a violation, for both certificates."""
import dataclasses
import inspect
import math

import pytest
import torch
from soundness_checks import (ExactDistances, affine_exact_distance, certify_check,
                              near_tight_inputs, orthogonal_net, patch_everywhere, radius_check,
                              random_relu_net, worst_logit_check)

import locallip
from locallip import bound as local_bound


def _lipschitz_times(factor):
    """local_bound.lipschitz_of with its value times ``factor`` (as a log or a value)."""
    original = local_bound.lipschitz_of
    signature = inspect.signature(original)

    def mutated(*args, **kwargs):
        out = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments['log']:
            return out + (math.log(factor) if factor > 0 else -math.inf)
        return out * factor
    return mutated


def _margins_times(factor):
    """local_bound.worst_case_margins times ``factor`` (the worst-case increase of every
    other logit over the label's, a_iy)."""
    original = local_bound.worst_case_margins

    def mutated(*args, **kwargs):
        return original(*args, **kwargs) * factor
    return mutated


def _radii_times(factor):
    """locallip.certified_radius with every radius times ``factor``."""
    original = locallip.certified_radius

    def mutated(*args, **kwargs):
        r = original(*args, **kwargs)
        return dataclasses.replace(r, radius=r.radius * factor)
    return mutated


MUTATIONS = {
    'lipschitz x0.5': (local_bound, 'lipschitz_of', lambda: _lipschitz_times(0.5)),
    'lipschitz = 0': (local_bound, 'lipschitz_of', lambda: _lipschitz_times(0.0)),
    'margins x0.5': (local_bound, 'worst_case_margins', lambda: _margins_times(0.5)),
    'margins x0.1': (local_bound, 'worst_case_margins', lambda: _margins_times(0.1)),
    'radii x1.5': (locallip, 'certified_radius', lambda: _radii_times(1.5)),
}


def mutate(monkeypatch, name):
    module, attr, make = MUTATIONS[name]
    return patch_everywhere(monkeypatch, module, attr, make())


def test_mutations_reach_every_importer(monkeypatch):
    """lipschitz_of is patched in bound.py and in radius.py (imported by name), and the
    worst-case margins in bound.py at least; unpatched after the test."""
    from locallip import radius
    original = local_bound.lipschitz_of
    assert mutate(monkeypatch, 'lipschitz x0.5') >= 2
    assert radius.lipschitz_of is local_bound.lipschitz_of is not original
    assert mutate(monkeypatch, 'margins x0.5') >= 1
    monkeypatch.undo()
    assert radius.lipschitz_of is local_bound.lipschitz_of is original


@pytest.mark.parametrize('certificate', ['reference', 'guaranteed'])
@pytest.mark.parametrize('name', list(MUTATIONS))
def test_attacks_at_the_radius_catch_the_mutation(monkeypatch, name, certificate):
    """On the near-tight ReLU network of test_soundness (the same check passes unmutated
    there): PGD at the mutated radius flips points, and the radii exceed the exact
    distance."""
    net = orthogonal_net(d=6, classes=4, seed=1, scales=(1.5, 0.7))
    x = near_tight_inputs(net, n=12, seed=3)
    with torch.no_grad():
        y = net(x).argmax(1)
    exact = affine_exact_distance(net, x, y)
    mutate(monkeypatch, name)
    res = radius_check(net, x, certificate, exact, samples=50, steps=20)
    assert res['broken'] > 0 and res['above'] > 0, res


@pytest.mark.parametrize('certificate', ['reference', 'guaranteed'])
@pytest.mark.parametrize('name', list(MUTATIONS))
def test_exact_distance_catches_the_mutation(monkeypatch, name, certificate):
    """On a 2-D ReLU network of test_radius (whose checks pass unmutated): radii above
    the exact distance, and (for the mutations of the bound itself) certificates at 1.001
    and 1.05 times the exact distance."""
    net = random_relu_net((6, 4), 3, seed=1)
    gen = torch.Generator().manual_seed(101)
    x = torch.rand(40, 2, generator=gen, dtype=torch.float64) * 4 - 2
    ex = ExactDistances(net, x)
    known = torch.isfinite(ex.dist)
    mutate(monkeypatch, name)
    res = radius_check(net, x, certificate, ex, samples=0, steps=0)
    assert res['above'] > 0, res
    if name != 'radii x1.5':              # certify does not read the radius search
        rows = known.nonzero().flatten()[:20]
        got = certify_check(net, x[rows], ex.dist[rows], certificate)
        assert got['above'] > 0, got


@pytest.mark.parametrize('name', [m for m in MUTATIONS if m != 'radii x1.5'])
def test_worst_case_logits_catch_the_mutation(monkeypatch, name):
    """The worst-case logits of the near-tight ReLU network at eps = 0.5 (test_soundness:
    attained exactly, never exceeded unmutated): ascent in the ball exceeds them."""
    net = orthogonal_net(d=6, classes=4, seed=1, scales=(1.5, 0.7))
    x = near_tight_inputs(net, n=12, seed=3)
    with torch.no_grad():
        y = net(x).argmax(1)
    mutate(monkeypatch, name)
    res = worst_logit_check(net, x, y, 0.5)
    assert res['above'] > 0, res
