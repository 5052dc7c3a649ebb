"""The certificates at a radius (certificates.py): guaranteed certificates are never above the
reference count and survive attacks inside their balls, the global mode runs no Lanczos
step, and bench.py --mode eval compares the certificates on the same points."""

import pytest
import torch
from conftest import DEVICE, blob_loader, blobs, dev, trained_tiny

from locallip.certificates import guaranteed_certify
from locallip.lanczos import GuaranteedNorms


def test_guaranteed_certificates_are_conservative_and_survive_attacks():
    """On a trained network: guaranteed certified accuracy <= the reference count, every
    guaranteed certificate is also a reference one up to power-iteration stalls (none here),
    and PGD on the margin and 2000 points on each ball's sphere never flip a guaranteed point
    (the same directions at radius 5 flip most of them)."""
    from conftest import settings_of

    from locallip.attacks import audit_batch
    from locallip.evaluation import full_evaluation
    net = trained_tiny('relux')
    args = settings_of([0.1, 0.3], bound='local', test_sniter=500, test_opt_iter=50,
                        alpha=0.025, niter=5, certificate='guaranteed', delta=1e-4, seed=0)
    res = full_evaluation(net, blob_loader(64), args, DEVICE)
    for e, v in res['radii'].items():
        assert v['certified_acc_guaranteed'] <= v['certified_acc'], e
    assert res['radii']['0.3']['certified_acc_guaranteed'] > 0.3     # not vacuous
    assert res['certificate']['delta'] == 1e-4
    assert all('certified_guaranteed' in p for p in res['per_sample'])
    x, y = dev(*blobs(64, 1))
    norms = GuaranteedNorms(net, (1, 8, 8), 1e-4, generator_seed=0)
    torch.manual_seed(5)
    g = guaranteed_certify(net, x, y, 0.3, norms, opt_iter=50)
    sel = g.certified
    assert sel.sum() > 10
    broken, _ = audit_batch(net, x[sel], y[sel], 0.3, 2, 50)
    assert not broken.any()
    xs, ys = x[sel], y[sel]
    d = torch.randn(2000, *xs.shape[1:], device=DEVICE)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)          # on the unit sphere
    with torch.no_grad():
        for k in range(xs.shape[0]):
            assert (net(xs[k:k + 1] + 0.3 * (1 - 1e-6) * d).argmax(1) == ys[k]).all()
        # the sampling does work: on the sphere of radius 5 it flips most of these points
        far = sum(bool((net(xs[k:k + 1] + 5 * d).argmax(1) != ys[k]).any())
                  for k in range(xs.shape[0]))
    assert far >= xs.shape[0] // 2, (far, xs.shape[0])


def test_guaranteed_global_mode_uses_no_lanczos_steps():
    """--bound global: every indicator is 1, so every sample uses the global bounds (0 steps)."""
    net = trained_tiny('relux')
    x, y = dev(*blobs(16, 2))
    norms = GuaranteedNorms(net, (1, 8, 8), 1e-4, generator_seed=0, global_steps=60)
    g = guaranteed_certify(net, x, y, 0.2, norms, opt_iter=20, bound='global')
    assert (g.steps == 0).all()
    g0 = guaranteed_certify(net, x, y, 0.0, norms, opt_iter=20)
    assert torch.equal(g0.certified, net(x).argmax(1) == y)


def test_bench_eval_compares_the_three_methods(tmp_path):
    """bench.py --mode eval certifies the same points with each method and reports seconds,
    points per second, certified accuracy per radius and the guaranteed speed-ups."""
    import json

    import bench
    out = tmp_path / 'b.json'
    threads = torch.get_num_threads()
    try:
        bench.main(['--mode', 'eval', '--data', 'mnist', '--model', 'relux', '--methods',
                    'reference', 'early', 'guaranteed', 'radius', '--radii', '0.2', '0.05', '--n_test', '6',
                    '--test_batch_size', '4', '--test_sniter', '5', '--test_opt_iter', '5',
                    '--threads', '1', '--json', str(out)])
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert r['n'] == 6 and r['radii'] == [0.05, 0.2]
    for m in ('reference', 'early', 'guaranteed'):
        v = r['methods'][m]
        assert v['seconds'] > 0 and v['points_per_s'] == pytest.approx(6 / v['seconds'])
        assert set(v['certified_acc']) == {'0.05', '0.2'}
    assert r['speedup_vs_early'] > 0 and r['speedup_vs_reference'] > 0
    # the radius search: a point counts at eps when its radius is at least eps
    v = r['methods']['radius']
    assert v['median_radius'] >= 0 and v['certified_acc']['0.05'] >= v['certified_acc']['0.2']
    # per layer, the power iterations per point (2 radii x 6 points each): the reference's
    # batch loop runs every point as long as the batch's slowest; early stops each point
    for m in ('reference', 'early'):
        it = r['methods'][m]['iterations']
        assert sorted(it, key=int) == ['0', '2', '4', '6', '9', '11']
        assert all(1 <= v['median'] <= v['p99'] <= v['max'] <= 5 and 0 <= v['at_cap'] <= 1
                   for v in it.values())
    assert all(r['methods']['early']['iterations'][k]['mean'] <= v['mean']
               for k, v in r['methods']['reference']['iterations'].items())
