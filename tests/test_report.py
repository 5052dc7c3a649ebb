"""Certificates you can inspect: several radii, local and global bound, per-sample TSV,
convergence reporting, the soundness audit and the plots."""
import copy
from types import SimpleNamespace

import pytest
import torch

import local_bound
from conftest import blob_loader, blobs, trained_tiny
from evaluate import full_evaluation, read_tsv, markdown_table
from local_bound import RandomVectors, compute_bound
from plots import make_plots, radius_data, sparsity_data, tightness_data


def eval_args(**kw):
    a = dict(radii=[0.3, 0.1, 0.6], epsilon=0.3, bound='local', test_sniter=500, test_opt_iter=50,
             alpha=0.075, niter=10, audit_restarts=2, audit_steps=50)
    a.update(kw)
    return SimpleNamespace(**a)


def test_one_pass_global_equals_global_mode():
    """The global column of one propagation equals --bound global (every indicator 1)."""
    net = copy.deepcopy(trained_tiny('relux')).double()
    x, y = blobs(8, 3)
    x = x.double()
    kw = dict(sniter=3000, opt_iter=100, tol=0.0)
    with torch.no_grad():
        both = compute_bound(net, x, y, 0.3, RandomVectors(8, 'cpu'), {}, also_global=True, **kw)
        glo = compute_bound(net, x, y, 0.3, RandomVectors(8, 'cpu'), {}, bound='global', **kw)
    assert torch.allclose(both.r_global, glo.r_local, rtol=2e-3)
    assert torch.allclose(both.worst_global, glo.worst, rtol=2e-3, atol=1e-6)
    assert (both.worst <= both.worst_global + 1e-9).all()


def test_tsv_agrees_with_summary_and_plots(tmp_path):
    net = trained_tiny('relux')
    tsv = str(tmp_path / 'rows.tsv')
    res = full_evaluation(net, blob_loader(64), eval_args(), 'cpu', tsv_path=tsv)
    header, rows = read_tsv(tsv)
    assert len(rows) == 64 == res['n']
    assert [r['idx'] for r in rows] == list(range(64))
    for e in ('0.3', '0.1', '0.6'):
        assert res['radii'][e]['certified_acc'] == pytest.approx(
            sum(r[f"certified@{e}"] for r in rows) / 64)
        assert res['radii'][e]['certified_acc_global'] == pytest.approx(
            sum(r[f"certified_global@{e}"] for r in rows) / 64)
        assert res['radii'][e]['certified_acc_converged_only'] == pytest.approx(
            sum(r[f"certified@{e}"] * r['converged'] for r in rows) / 64)
    assert res['clean_acc'] == pytest.approx(sum(r['correct'] for r in rows) / 64)
    assert res['unconverged'] == sum(1 - r['converged'] for r in rows)
    assert res['certified_acc'] == res['radii']['0.3']['certified_acc'] > 0
    assert all(r['local_bound'] <= r['global_bound'] * (1 + 1e-4) for r in rows)
    # local certifies at least what global does, per point
    assert all(r['certified@0.3'] >= r['certified_global@0.3'] for r in rows)
    table = markdown_table(res)
    assert '| 0.3 |' in table and 'unconverged' in table
    # the plots: files exist, are PNGs, and show the TSV's numbers
    paths = make_plots(tsv, str(tmp_path / 'plots'))
    assert [p.split('/')[-1] for p in paths] == ['certified_vs_radius.png', 'tightness.png', 'sparsity.png']
    for p in paths:
        with open(p, 'rb') as f:
            head = f.read(8)
        assert head == b'\x89PNG\r\n\x1a\n' and len(open(p, 'rb').read()) > 5000
    radii, local, strict, glob = radius_data(header, rows)
    assert radii == [0.1, 0.3, 0.6]
    assert local == pytest.approx([100 * res['radii'][f"{e:g}"]['certified_acc'] for e in radii])
    assert glob == pytest.approx([100 * res['radii'][f"{e:g}"]['certified_acc_global'] for e in radii])
    ratio = tightness_data(rows)
    assert ratio == pytest.approx([r['local_bound'] / r['global_bound'] for r in rows])
    layers, frac = sparsity_data(header, rows)
    assert layers == [1, 3, 6]
    for i, f in zip(layers, frac):
        assert f == pytest.approx(res['varying_fraction'][str(i)], rel=1e-5)


def test_interrupted_tsv_is_readable(tmp_path):
    net = trained_tiny('relux')
    tsv = str(tmp_path / 'rows.tsv')
    full_evaluation(net, blob_loader(16), eval_args(radii=[0.3]), 'cpu', tsv_path=tsv)
    text = open(tsv).read()
    cut = tmp_path / 'cut.tsv'
    cut.write_text(text[:len(text) - 7])          # killed in the middle of the last row
    header, rows = read_tsv(str(cut))
    assert len(rows) == 15 and rows[-1]['idx'] == 14


def test_unconverged_evaluation_is_reported():
    net = trained_tiny('relux')
    res = full_evaluation(net, blob_loader(32), eval_args(test_sniter=1), 'cpu')
    assert res['unconverged'] == 32
    for v in res['radii'].values():
        assert v['certified_acc_converged_only'] == 0
    res = full_evaluation(net, blob_loader(32), eval_args(test_sniter=3000), 'cpu')
    assert res['unconverged'] == 0


def test_audit_catches_a_shrunk_bound(monkeypatch):
    net = trained_tiny('relu', eps=0.0)     # clean training: attackable at radius 1.5
    args = eval_args(radii=[0.3, 1.5], audit_restarts=3, audit_steps=100)
    honest = full_evaluation(net, blob_loader(64), args, 'cpu', audit=True)
    assert honest['audit']['attacked'] > 0 and honest['audit']['broken'] == 0
    real = local_bound.worst_case_margins
    monkeypatch.setattr(local_bound, 'worst_case_margins', lambda *a: 0.05 * real(*a))
    wrong = full_evaluation(net, blob_loader(64), args, 'cpu', audit=True)
    assert wrong['radii']['1.5']['certified_acc'] > honest['radii']['1.5']['certified_acc']
    assert wrong['audit']['broken'] > 0
