"""Spectral-norm upper bounds (locallip/lanczos.py): the upper bounds against exact SVDs of
explicit masked operators, the stalled power iteration they guard against, the Ritz value's
accuracy, breakdown, the global norms, and the partial reorthogonalisation's slack."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from conftest import explicit_matrix, trained_tiny

from locallip.lanczos import (GuaranteedNorms, Lanczos, kw_inflation, lanczos_norm_bounds,
                               n_operators)
from locallip.operators import PowerOptions, masked_power_iteration


def explicit(layer, d_in, d_out, in_shape):
    """The masked operator D_out W D_in of one sample as a dense float64 matrix."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Conv2d):
        z = torch.nn.functional.conv2d(eye * d_in.double(), w, None, layer.stride, layer.padding)
    else:
        z = (eye * d_in.double()) @ w.t()
    z = z * d_out.double()
    return z.flatten(1).t()                       # [out, in]


def exact_norm(layer, d_in, d_out, in_shape):
    return torch.linalg.matrix_norm(explicit(layer, d_in, d_out, in_shape), 2).item()


def linear_with_spectrum(s, out_f, in_f, seed):
    """nn.Linear whose weight has singular values s (and random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    k = len(s)
    w = u[:, :k] @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v[:, :k].t()
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = w.float()
    return lin, v[:, 0].float()


def test_kw_inflation_values():
    """e solves 1.648 sqrt(n) exp(-(2(k-1) - 1) sqrt(e)) = delta (k-1: conservative)."""
    e = kw_inflation(25088, 150, 1e-4).item()
    want = (math.log(1.648 * math.sqrt(25088) / 1e-4) / (2 * 149 - 1)) ** 2
    assert e == pytest.approx(want, rel=1e-12)
    assert 0.0024 < e < 0.0025                      # the example: e ~ 0.003
    assert 1.648 * math.sqrt(25088) * math.exp(-(2 * 149 - 1) * math.sqrt(e)) == pytest.approx(1e-4)
    assert kw_inflation(25088, 1, 1e-4).item() == 1.0     # no bound from one step
    assert kw_inflation(100, 40, 1e-2) < kw_inflation(100, 40, 1e-6) < kw_inflation(10 ** 6, 40, 1e-6)
    with pytest.raises(ValueError):
        kw_inflation(10, 10, 0.0)


@pytest.mark.parametrize('kind', ['linear', 'conv'])
def test_upper_bound_never_below_exact_norm(kind):
    """Seeded trials on explicit masked operators, spectra with the top two singular values
    within 1e-4 included: the guaranteed bound is >= the exact norm (float64 SVD) every time,
    and the Ritz value (a lower bound) is <= it."""
    trials = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        if kind == 'linear':
            s = [1.0, 1.0 - 1e-4] + sorted(torch.rand(20, generator=g).tolist(), reverse=True)
            layer, _ = linear_with_spectrum(s, 30, 40, seed)
            in_shape, out_shape = (40,), (30,)
        else:
            torch.manual_seed(seed)
            layer = nn.Conv2d(3, 4, 3, stride=1 + seed % 2, padding=1, bias=False)
            in_shape = (3, 6, 6)
            out_shape = tuple(layer(torch.zeros(1, *in_shape)).shape[1:])
        batch = 4
        d_in = (torch.rand(batch, *in_shape, generator=g) < 0.7).float()
        d_out = (torch.rand(batch, *out_shape, generator=g) < 0.7).float()
        d_in[0] = 1.0                                # one sample with the whole operator
        d_out[0] = 1.0
        exact = torch.tensor([exact_norm(layer, d_in[b], d_out[b], in_shape) for b in range(batch)])
        for steps, space in ((8, 'in'), (8, 'out'), (32, 'in'), (32, 'out')):
            torch.manual_seed(1000 + seed)
            with torch.no_grad():
                lo, up = lanczos_norm_bounds(layer, d_in, d_out, in_shape, batch, steps, 1e-4,
                                             'cpu', space)
            assert (up.float() >= exact.float()).all(), (seed, steps, space, up, exact)
            assert (lo.float() <= exact.float() * (1 + 1e-5)).all(), (seed, steps, space, lo,
                                                                      exact)
            trials += batch
    assert trials == 192


@pytest.mark.parametrize('space', ['in', 'out'])
def test_both_spaces_converge_to_the_exact_masked_norm(space):
    """Lanczos on A^T A (input space) and on A A^T (output space) of the same masked
    operators: each Ritz value reaches the exact norm (float64 SVD) to 1e-5 once the Krylov
    space is exhausted, the dimension n of the failure probability is the varying count of
    the space used, and 'auto' takes the smaller space (a stride-2 convolution: the output)."""
    torch.manual_seed(3)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False).double()
    in_shape, out_shape = (2, 6, 6), (3, 3, 3)
    g = torch.Generator().manual_seed(4)
    d_in = (torch.rand(3, *in_shape, generator=g) < 0.6).double()
    d_out = (torch.rand(3, *out_shape, generator=g) < 0.6).double()
    exact = torch.tensor([exact_norm(layer, d_in[b], d_out[b], in_shape) for b in range(3)])
    with torch.no_grad():
        lz = Lanczos(layer, d_in, d_out, in_shape, 3, 'cpu', space)
        lz.run(30)
        ritz = lz.ritz_max().clamp_min(0).sqrt()
    assert torch.allclose(ritz, exact.double(), rtol=1e-5), (space, ritz, exact)
    d = d_in if space == 'in' else d_out
    assert torch.equal(lz.n, d.flatten(1).sum(1))
    assert Lanczos(layer, d_in, d_out, in_shape, 3, 'cpu').space == 'out'
    with pytest.raises(ValueError, match="space must be"):
        Lanczos(layer, d_in, d_out, in_shape, 3, 'cpu', 'both')


def test_stalled_power_iteration_is_caught():
    """s1 = 1, s2 = 0.999, a start with a 1e-7 component along the top vector: power iteration
    'converges' (change < 1e-3) on the second singular value, 1e-3 below the norm; the
    guaranteed bound from fresh random starts is above the norm in every trial."""
    s = [1.0, 0.999] + [0.5] * 10
    layer, v1 = linear_with_spectrum(s, 24, 24, 7)
    w = layer.weight.detach().double()
    exact = torch.linalg.matrix_norm(w, 2).item()
    # the start: the second right singular vector plus a tiny part of the first
    _, _, vh = torch.linalg.svd(w)
    u0 = (vh[1] + 1e-7 * vh[0]).float().view(1, -1)
    with torch.no_grad():
        pi = masked_power_iteration(layer, u0, 2000, opts=PowerOptions(tol=1e-3))
    assert bool(pi.converged[0])
    assert pi.sigma[0].item() < exact - 5e-4            # stalled well below the norm
    for seed in range(50):
        torch.manual_seed(seed)
        with torch.no_grad():
            _, up = lanczos_norm_bounds(layer, None, None, (24,), 1, 20, 1e-4, 'cpu')
        assert up[0].item() >= exact, (seed, up[0].item(), exact)


def test_ritz_value_matches_exact_norm_on_separated_spectra():
    """Before inflation, the Lanczos estimate is the top singular value to 1e-4 (relative)."""
    for seed in range(5):
        layer, _ = linear_with_spectrum([2.0, 1.0, 0.9, 0.5, 0.1], 50, 60, seed)
        exact = torch.linalg.matrix_norm(layer.weight.detach().double(), 2).item()
        torch.manual_seed(seed)
        with torch.no_grad():
            lo, up = lanczos_norm_bounds(layer, None, None, (60,), 3, 32, 1e-4, 'cpu')
        assert (lo - exact).abs().max().item() < 1e-4 * exact
        assert (up >= exact).all() and (up <= exact * 1.05).all()
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    d = torch.ones(1, 2, 5, 5)
    exact = exact_norm(conv, d[0], torch.ones(3, 5, 5), (2, 5, 5))
    with torch.no_grad():
        lo, _ = lanczos_norm_bounds(conv, None, None, (2, 5, 5), 1, 50, 1e-4, 'cpu')
    assert abs(lo.item() - exact) < 1e-4 * exact


def test_breakdown_on_a_small_invariant_space_is_exact():
    """Only 3 inputs vary: the Krylov space is exhausted after 3 steps; further steps stay
    finite and the Ritz value is the exact norm."""
    layer, _ = linear_with_spectrum([1.0, 0.7, 0.3], 10, 10, 3)
    d_in = torch.zeros(1, 10)
    d_in[0, :3] = 1
    exact = exact_norm(layer, d_in[0], torch.ones(10), (10,))
    torch.manual_seed(0)
    lz = Lanczos(layer, d_in, None, (10,), 1, 'cpu')
    with torch.no_grad():
        lz.run(12)
    xi = lz.ritz_max()
    assert torch.isfinite(xi).all() and abs(xi.sqrt().item() - exact) < 1e-5
    assert lz.n.item() == 3


def test_global_norms_bound_the_layers():
    """Linear layers: exact SVD; convolutions: Lanczos; every upper bound >= the exact norm of
    the explicit operator, every lower bound <= it; the model's RNG is left untouched."""
    net = trained_tiny('relux')
    cpu_net = copy.deepcopy(net).cpu()
    before = torch.random.get_rng_state()
    norms = GuaranteedNorms(net, (1, 8, 8), 1e-4, generator_seed=0, global_steps=60)
    assert torch.equal(before, torch.random.get_rng_state())
    assert n_operators(net) == 3 + 2
    assert norms.delta_op == pytest.approx(1e-4 / 5)
    shapes = {0: (1, 8, 8), 2: (4, 8, 8), 5: (128,)}
    for i, shape in shapes.items():
        out = tuple(cpu_net[i](torch.zeros(1, *shape)).shape[1:])
        exact = exact_norm(cpu_net[i], torch.ones(shape), torch.ones(out), shape)
        assert norms.lower[i].item() <= exact * (1 + 1e-6) <= norms.upper[i].item() * (1 + 1e-6)


def test_partial_reorthogonalisation_measures_what_it_skips():
    """Partial reorthogonalisation runs on some steps only; the loss of orthogonality it
    leaves is measured (orthogonality() bounds the true ||Q^T Q - I||_F) and paid for in the
    slack. Without any reorthogonalisation the basis loses its orthogonality and the slack
    says so (infinite: the bound falls back to the global one), never a false bound."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    exact = torch.linalg.matrix_norm(explicit_matrix(conv, (2, 8, 8)), 2)
    runs = {}
    for semi in (None, math.inf):
        torch.manual_seed(1)
        lz = Lanczos(conv, None, None, (2, 8, 8), 2, 'cpu')
        lz.semi = lz.semi if semi is None else semi
        with torch.no_grad():
            lz.run(100)
        q = torch.cat([lz.basis[:, :lz.steps], lz.q.unsqueeze(1)], 1)
        true = torch.linalg.matrix_norm(q @ q.transpose(1, 2) - torch.eye(q.shape[1],
                                                                          dtype=q.dtype))
        assert (true <= lz.orthogonality()).all()
        assert (lz.upper(lz.ritz_max(), 1e-4) >= exact).all()
        runs[semi] = lz
    partial, none = runs[None], runs[math.inf]
    assert ((0 < partial.reorthogonalised) & (partial.reorthogonalised < 100)).all()
    assert (none.reorthogonalised == 0).all()
    assert (partial.slack() < 1e-8 * exact ** 2).all()
    assert (none.orthogonality() > 0.25).all() and torch.isinf(none.slack()).all()


def test_both_reorthogonalisation_paths_agree():
    """The due samples reorthogonalised one by one (the CPU's path) and in one batched product
    with the others' coefficients zeroed (the GPU's) give the same run to rounding (the
    slacks, made of quantities near the rounding, to a factor of 2)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    runs = []
    for per_sample in (True, False):
        torch.manual_seed(1)
        lz = Lanczos(conv, None, None, (2, 8, 8), 3, 'cpu')
        lz.per_sample = per_sample
        with torch.no_grad():
            lz.run(60)
        runs.append(lz)
    one, batched = runs
    assert one.reorthogonalised.tolist() == batched.reorthogonalised.tolist()
    assert 0 < int(one.reorthogonalised.min()) < 60
    torch.testing.assert_close(one.coef, batched.coef, rtol=1e-9, atol=1e-12)
    ratio = one.slack() / batched.slack()
    assert ((ratio > 0.5) & (ratio < 2)).all(), ratio


@pytest.mark.parametrize('scale', [1e-16, 1e-19])
def test_tiny_layers_are_bounded(scale):
    """A layer whose weights are tiny (||B|| below 1e-30) keeps unit Lanczos vectors and an
    upper bound above its norm (an absolute floor in the normalisation made the vectors
    non-unit, the loss of orthogonality read as dead vectors, and the bound 0.68x the norm)."""
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 30) * scale)
        lz = Lanczos(lin, None, None, (30,), 1, 'cpu')
        lz.run(40)
    exact = torch.linalg.matrix_norm(lin.weight.double(), 2)
    assert (lz.upper(lz.ritz_max(), 1e-4) >= exact).all()
    assert (lz.upper(lz.ritz_max(), 1e-4) <= 1.1 * exact).all()
