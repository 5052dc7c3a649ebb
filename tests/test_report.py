"""Certificates you can inspect: several radii, local and global bound, per-sample TSV,
convergence reporting, the soundness audit and the plots."""
import copy
import os

import pytest
import torch
from conftest import DEVICE, blob_loader, blobs, dev, settings_of, trained_tiny

from locallip import bound as local_bound
from locallip.bound import compute_bound
from locallip.errors import UserError
from locallip.evaluation import full_evaluation
from locallip.plots import make_plots, radius_data, sparsity_data, tightness_data
from locallip.report import (check_expected, comparison_table, expected_results, markdown_table,
                             read_tsv, tsv_columns)
from locallip.vectors import RandomVectors


def eval_args(**kw):
    a = dict(bound='local', test_sniter=500, test_opt_iter=50,
             alpha=0.075, niter=10, audit_restarts=2, audit_steps=50)
    a.update(kw)
    return settings_of(a.pop('radii', [0.3, 0.1, 0.6]), **a)


def test_one_pass_global_equals_global_mode():
    """The global column of one propagation equals --bound global (every indicator 1),
    once both runs' iterations have converged. They share the global vectors, which also set
    the boxes (each layer's ball uses ||W||_2): with fresh ones per run and the default
    tolerance 1e-4, this net's slowly converging second layer left the two runs' boxes 5.5e-4
    and their worst-case margins 7e-4 apart (measured)."""
    net = copy.deepcopy(trained_tiny('relux')).double()
    x, y = dev(*blobs(8, 3))
    x = x.double()
    gv = {}
    kw = dict(sniter=40000, opt_iter=100, tol=1e-11, global_tol=1e-11)
    with torch.no_grad():
        both = compute_bound(net, x, y, 0.3, RandomVectors(8, DEVICE), gv, also_global=True, **kw)
        glo = compute_bound(net, x, y, 0.3, RandomVectors(8, DEVICE), gv, bound='global', **kw)
    assert both.global_converged and glo.global_converged and glo.converged.all()
    assert torch.allclose(both.r_global, glo.r_local, rtol=1e-8)
    assert torch.allclose(both.worst_global, glo.worst, rtol=1e-7, atol=1e-9)
    assert (both.worst_global > 0).any()       # not only margins clipped to 0
    assert (both.worst <= both.worst_global + 1e-9).all()


def test_tsv_agrees_with_summary_and_plots(tmp_path):
    net = trained_tiny('relux')
    tsv = str(tmp_path / 'rows.tsv')
    res = full_evaluation(net, blob_loader(64), eval_args(), DEVICE, tsv_path=tsv)
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
    assert radii == [0.0, 0.1, 0.3, 0.6]                       # radius 0: the clean accuracy
    assert local[0] == strict[0] == glob[0] == pytest.approx(100 * res['clean_acc'])
    assert local[1:] == pytest.approx([100 * res['radii'][f"{e:g}"]['certified_acc'] for e in radii[1:]])
    assert glob[1:] == pytest.approx([100 * res['radii'][f"{e:g}"]['certified_acc_global']
                                      for e in radii[1:]])
    ratio = tightness_data(rows)
    assert ratio == pytest.approx([r['local_bound'] / r['global_bound'] for r in rows])
    layers, frac = sparsity_data(header, rows)
    assert layers == [1, 3, 6]
    for i, f in zip(layers, frac):
        assert f == pytest.approx(res['varying_fraction'][str(i)], rel=1e-5)


def test_interrupted_tsv_is_readable(tmp_path):
    net = trained_tiny('relux')
    tsv = str(tmp_path / 'rows.tsv')
    full_evaluation(net, blob_loader(16), eval_args(radii=[0.3]), DEVICE, tsv_path=tsv)
    text = open(tsv).read()
    cut = tmp_path / 'cut.tsv'
    cut.write_text(text[:len(text) - 7])          # killed in the middle of the last row
    header, rows = read_tsv(str(cut))
    assert len(rows) == 15 and rows[-1]['idx'] == 14


def test_unconverged_evaluation_is_reported():
    net = trained_tiny('relux')
    res = full_evaluation(net, blob_loader(32), eval_args(test_sniter=1), DEVICE)
    assert res['unconverged'] == 32
    for v in res['radii'].values():
        assert v['certified_acc_converged_only'] == 0
    assert not res['global_converged']        # one iteration: the global norms did not converge
    from locallip.report import GLOBAL_WARNING, radius_lines, summary_line
    lines = radius_lines(res)
    assert GLOBAL_WARNING in lines and all('NOT converged' in l for l in lines[:-1])
    assert 'global iterations NOT converged' in summary_line(res)
    res = full_evaluation(net, blob_loader(32), eval_args(test_sniter=3000), DEVICE)
    assert res['unconverged'] == 0 and res['global_converged']
    assert GLOBAL_WARNING not in radius_lines(res) and 'NOT' not in summary_line(res)


def test_audit_catches_a_shrunk_bound(monkeypatch):
    net = trained_tiny('relu', eps=0.0)     # clean training: attackable at radius 1.5
    args = eval_args(radii=[0.3, 1.5], audit_restarts=3, audit_steps=100, audit=True)
    honest = full_evaluation(net, blob_loader(64), args, DEVICE)
    assert honest['audit']['attacked'] > 0 and honest['audit']['broken'] == 0
    real = local_bound.worst_case_margins
    monkeypatch.setattr(local_bound, 'worst_case_margins', lambda *a: 0.05 * real(*a))
    wrong = full_evaluation(net, blob_loader(64), args, DEVICE)
    assert wrong['radii']['1.5']['certified_acc'] > honest['radii']['1.5']['certified_acc']
    assert wrong['audit']['broken'] > 0


def test_resumed_evaluation_equals_uninterrupted(tmp_path):
    """Kill in the middle of batch 2 (of 4): --resume keeps batch 1, redoes the rest, and the
    rows and the summary equal an uninterrupted run (every batch is seeded by its number).
    test_sniter 5 leaves points unconverged, so the rows depend on the random vectors."""
    net = trained_tiny('relux')
    args = eval_args(radii=[0.3, 0.6], test_sniter=5, seed=3, niter=3, audit_restarts=1,
                     audit_steps=5, audit=True)
    full_path, cut_path = str(tmp_path / 'full.tsv'), str(tmp_path / 'cut.tsv')
    full = full_evaluation(net, blob_loader(64, batch=16), args, DEVICE, tsv_path=full_path)
    text = open(full_path).read()
    lines = text.split('\n')
    open(cut_path, 'w').write('\n'.join(lines[:1 + 16 + 5]) + '\n' + lines[22][:9])
    assert len(read_tsv(cut_path)[1]) == 21
    resumed = full_evaluation(net, blob_loader(64, batch=16), args, DEVICE, tsv_path=cut_path,
                              resume=True)
    _, rows_full = read_tsv(full_path)
    _, rows_resumed = read_tsv(cut_path)
    strip = [{k: v for k, v in r.items() if k != 'seconds'} for r in rows_full]
    assert [{k: v for k, v in r.items() if k != 'seconds'} for r in rows_resumed] == strip
    for k in ('clean_acc', 'pgd_acc', 'radii', 'unconverged', 'varying_fraction'):
        assert resumed[k] == full[k], k
    # the audit's counts must agree; its wall time is measured, not reproduced
    timeless = [{k: v for k, v in r['audit'].items() if k != 'seconds_this_run'}
                for r in (resumed, full)]
    assert timeless[0] == timeless[1] and timeless[0]['attacked'] > 0
    assert resumed['audit']['seconds_this_run'] >= 0
    assert full['unconverged'] > 0
    # a different seed changes unconverged rows: the equality above is not vacuous
    other = full_evaluation(net, blob_loader(64, batch=16), eval_args(radii=[0.3], test_sniter=5,
                                                                       seed=4, niter=1), DEVICE)
    assert [p['local_bound'] for p in other['per_sample']] != \
        [p['local_bound'] for p in full['per_sample']]


def test_resume_refuses_other_radii(tmp_path):
    net = trained_tiny('relux')
    tsv = str(tmp_path / 'rows.tsv')
    full_evaluation(net, blob_loader(16), eval_args(radii=[0.3]), DEVICE, tsv_path=tsv)
    with pytest.raises(UserError, match='other radii'):
        full_evaluation(net, blob_loader(16), eval_args(radii=[0.3, 0.5]), DEVICE, tsv_path=tsv,
                        resume=True)


def test_expect_accepts_its_record_and_rejects_a_shift():
    net = trained_tiny('relux')
    res = full_evaluation(net, blob_loader(32), eval_args(test_sniter=50, niter=2), DEVICE)
    rec = expected_results(res)
    assert rec['clean_acc'] == pytest.approx(100 * res['clean_acc'])
    assert check_expected(res, rec) == []
    near = copy.deepcopy(rec)
    near['clean_acc'] += 0.49
    near['certified_acc']['0.6'] -= 0.49
    assert check_expected(res, near) == []
    for key, radius, shift in (('clean_acc', None, 0.51), ('certified_acc', '0.1', -0.6)):
        off = copy.deepcopy(rec)
        if radius is None:
            off[key] += shift
        else:
            off[key][radius] += shift
        bad = check_expected(res, off)
        assert len(bad) == 1 and 'pp' in bad[0], bad
    off = copy.deepcopy(rec)
    off['n'] = 500
    assert 'the record is for 500' in check_expected(res, off)[0]
    off = copy.deepcopy(rec)
    off['certified_acc']['2.0'] = 0.0
    assert 'not evaluated' in check_expected(res, off)[0]
    table = comparison_table({'local': res, 'global': res})
    lines = table.split('\n')
    assert len(lines) == 4 and lines[2].startswith('| local | ') and lines[3].startswith('| global | ')
    v = res['radii']['0.6']
    assert f"{100 * v['certified_acc']:.2f}% / {100 * v['certified_acc_global']:.2f}%" in lines[2]


def test_certification_runs_without_tf32(monkeypatch):
    """Certification disables TF32 for CUDA convolutions and matmuls (10-bit mantissas
    perturb the products enough to break a bound) and restores the previous settings; the
    training step keeps PyTorch's settings."""
    from locallip import certificates
    seen = []
    real = certificates.compute_bound

    def spy(*a, **k):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return real(*a, **k)
    monkeypatch.setattr(certificates, 'compute_bound', spy)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        full_evaluation(trained_tiny('relux'), blob_loader(16), eval_args(radii=[0.3, 0.1],
                                                                          niter=1), DEVICE)
        assert seen and all(s == (False, False) for s in seen)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_fold_part_files_keeps_whole_batches(tmp_path):
    """The part files of an interrupted distributed evaluation fold into the TSV: whole
    batches only, a part file cut before its header is dropped, the part files removed."""
    from locallip.evaluation import fold_part_files
    from locallip.report import write_tsv
    header = tsv_columns([0.5], [2])
    row = lambda i: {c: (i if c in ('idx', 'label', 'pred') else 0.25) for c in header}
    indices = [[0, 1], [2, 3], [4, 5]]
    out = str(tmp_path / 'rows.tsv')
    write_tsv(out + '.rank0', header, [row(0), row(1), row(4)])     # batch 2 cut off
    write_tsv(out + '.rank1', header, [row(2), row(3)])
    open(out + '.rank2', 'w').close()                               # killed at once
    fold_part_files(out, [0.5], indices, 'reference', False)
    h, rows = read_tsv(out)
    assert h == header and [r['idx'] for r in rows] == [0, 1, 2, 3]
    assert not [f for f in os.listdir(tmp_path) if '.rank' in f]
