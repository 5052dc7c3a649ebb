"""Reporting of evaluation results: the per-sample TSV rows, the results summary (JSON),
the --expect record check and the text / markdown tables (no certification here)."""
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from locallip.errors import UserError

# ----------------------------------------------------------------------------------------
# Per-sample rows
# ----------------------------------------------------------------------------------------
RADIUS_COLUMNS = ('radius', 'radius_upper', 'radius_evals', 'radius_converged', 'seconds_radius')
RADIUS_GUARANTEED_COLUMNS = ('radius_guaranteed', 'radius_guaranteed_upper',
                             'radius_guaranteed_evals')


def tsv_columns(radii, act_layers, guaranteed=False, radius=False, lower=False):
    g = ([f"certified_guaranteed@{e:g}" for e in radii] + ['guaranteed_bound', 'seconds_guaranteed']
         if guaranteed else [])
    rad = (list(RADIUS_COLUMNS) + (list(RADIUS_GUARANTEED_COLUMNS) if guaranteed else [])
           if radius else [])
    return (['idx', 'label', 'pred', 'correct', 'pgd_correct', 'local_bound', 'global_bound',
             'margin'] + [f"certified@{e:g}" for e in radii]
            + [f"certified_global@{e:g}" for e in radii] + g + [f"varying@{i}" for i in act_layers]
            + ['converged', 'global_converged', 'audited', 'broken', 'seconds'] + rad
            + (['lower_bound', 'seconds_lower'] if lower else []))


INT_COLUMNS = ('idx', 'label', 'pred')
RADIUS_VALUES = ('radius', 'radius_guaranteed')


def read_tsv(path):
    """Rows of a TSV written by --out as dicts of floats (idx, label, pred as ints). A last
    line cut off by an interrupted run is ignored."""
    with open(path) as f:
        text = f.read()
    lines = text.split('\n')
    header = lines[0].split('\t')
    rows = []
    for line in lines[1:-1]:        # the part after the last newline is incomplete or empty
        parts = line.split('\t')
        if len(parts) != len(header):
            raise UserError(f"{path}: malformed row {line[:80]!r}")
        row = {h: float(v) for h, v in zip(header, parts)}
        for k in INT_COLUMNS:
            row[k] = int(row[k])
        rows.append(row)
    return header, rows


def tsv_line(header, row):
    """One TSV line of ``row`` (a dict) in the column order of ``header``."""
    return '\t'.join(cell(c, row[c]) for c in header) + '\n'


def write_tsv(path, header, rows):
    """Write ``rows`` under ``header`` to ``path`` atomically (a temporary file, then rename)."""
    with open(path + '.tmp', 'w') as f:
        f.write('\t'.join(header) + '\n')
        f.writelines(tsv_line(header, r) for r in rows)
    os.replace(path + '.tmp', path)


class TsvWriter:
    """Rows appended to a TSV as they are made, flushed after every batch (a killed run
    keeps its finished batches). ``header`` and ``kept``: the columns and rows of an
    interrupted run, rewritten first (atomically) and appended to; without them the header
    line is written with the first rows."""

    def __init__(self, path: str, header: Optional[List[str]] = None, kept=()):
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        self.path, self.header, self.file = path, header, None
        if header is not None:
            write_tsv(path, header, kept)

    def write(self, header: List[str], rows) -> None:
        if self.file is None:
            self.file = open(self.path, 'a' if self.header is not None else 'w')
        if self.header is None:
            self.header = header
            self.file.write('\t'.join(header) + '\n')
        self.file.writelines(tsv_line(self.header, row) for row in rows)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def fmt_value(v):
    """One TSV cell: booleans and integers as integers, floats to 6 significant digits."""
    if isinstance(v, (bool, int)):
        return str(int(v))
    return 'nan' if v != v else f"{v:.6g}"


def cell(column, v):
    """The TSV cell of ``v`` in ``column``: certified radii exactly (repr: the value read
    back is the radius certified, never a rounded-up one), the rest by fmt_value."""
    if column in RADIUS_VALUES and isinstance(v, float) and math.isfinite(v):
        return repr(v)
    return fmt_value(v)


@dataclass
class BatchOutcome:
    """Everything measured on one test batch (evaluation.py), per sample [batch] on the CPU:
    what ``batch_rows`` turns into TSV rows."""
    idx: torch.Tensor                    # sample indices
    labels: torch.Tensor
    by_eps: Dict[float, Any]             # radius -> certificates.BatchCertificate
    pgd: torch.Tensor                    # bool: correct, and still after PGD at radii[0]
    global_converged: bool               # every global power iteration met its tolerance
    audited: Optional[torch.Tensor] = None   # radii at which the audit attacked the point
    broken: Optional[torch.Tensor] = None    # ... and broke its certificate
    seconds: float = 0.0                 # per point, certification + PGD + audit
    seconds_guaranteed: Optional[float] = None   # per point; set: guaranteed columns
    radius: Any = None                   # radius.RadiusResult; set: radius columns
    seconds_radius: Optional[float] = None
    lower: Optional[torch.Tensor] = None     # lower bound of the local constant at radii[0]
    seconds_lower: Optional[float] = None


def batch_rows(out: BatchOutcome, radii) -> List[dict]:
    """One row dict per sample of a batch (the TSV's columns, as Python numbers); with
    ``seconds_guaranteed`` also the guaranteed columns, with ``radius`` the radius columns."""
    first = out.by_eps[radii[0]]
    converged = torch.stack([out.by_eps[e].converged for e in radii]).all(0)
    zeros = torch.zeros(len(out.idx), dtype=torch.long)
    audited = zeros if out.audited is None else out.audited
    broken = zeros if out.broken is None else out.broken
    rows = []
    for k in range(len(out.idx)):
        row = {'idx': int(out.idx[k]), 'label': int(out.labels[k]), 'pred': int(first.pred[k]),
               'correct': int(first.correct[k]), 'pgd_correct': int(out.pgd[k]),
               'local_bound': float(first.lip_local[k]),
               'global_bound': float(first.lip_global[k]), 'margin': float(first.margin[k])}
        for e in radii:
            row[f"certified@{e:g}"] = int(out.by_eps[e].certified[k])
        for e in radii:
            row[f"certified_global@{e:g}"] = int(out.by_eps[e].certified_global[k])
        if out.seconds_guaranteed is not None:
            for e in radii:
                row[f"certified_guaranteed@{e:g}"] = int(out.by_eps[e].certified_guaranteed[k])
            row['guaranteed_bound'] = float(first.lip_guaranteed[k])
            row['seconds_guaranteed'] = out.seconds_guaranteed
        for i, v in first.varying.items():
            row[f"varying@{i}"] = float(v[k])
        row.update(converged=int(converged[k]), global_converged=int(out.global_converged),
                   audited=int(audited[k]), broken=int(broken[k]), seconds=out.seconds)
        if out.radius is not None:
            row.update(_radius_cells(out.radius, k, out.seconds_radius))
        if out.lower is not None:
            row.update(lower_bound=float(out.lower[k]), seconds_lower=out.seconds_lower)
        # floats as the TSV holds them, so a summary of read-back rows is the same
        rows.append({c: float(cell(c, v)) if isinstance(v, float) else v for c, v in row.items()})
    return rows


def _radius_cells(rad, k: int, seconds: float) -> dict:
    """The radius columns of sample k of a radius.RadiusResult."""
    cells = dict(radius=float(rad.radius[k]), radius_upper=float(rad.radius_upper[k]),
                 radius_evals=int(rad.evals[k]), radius_converged=int(rad.converged[k]),
                 seconds_radius=seconds)
    if rad.radius_guaranteed is not None:
        cells.update(radius_guaranteed=float(rad.radius_guaranteed[k]),
                     radius_guaranteed_upper=float(rad.radius_guaranteed_upper[k]),
                     radius_guaranteed_evals=int(rad.evals_guaranteed[k]))
    return cells


def summarize(rows, settings):
    """The results dict (JSON-ready) of a list of rows under ``settings`` (an
    evaluation.EvalSettings): everything is counted per sample, so a resumed evaluation
    gives the same summary as an uninterrupted one."""
    radii = settings.radii
    n = max(len(rows), 1)
    eps0 = radii[0]

    def frac(f):
        return sum(f(r) for r in rows) / n
    per_radius = {}
    for e in radii:
        c, g = f"certified@{e:g}", f"certified_global@{e:g}"
        per_radius[f"{e:g}"] = {'certified_acc': frac(lambda r: r[c]),
                                'certified_acc_converged_only': frac(lambda r: r[c] * r['converged']),
                                'certified_acc_global': frac(lambda r: r[g])}
        if rows and f"certified_guaranteed@{e:g}" in rows[0]:
            per_radius[f"{e:g}"]['certified_acc_guaranteed'] = frac(
                lambda r: r[f"certified_guaranteed@{e:g}"])
    layers = [k.split('@')[1] for k in (rows[0] if rows else {}) if k.startswith('varying@')]
    first = per_radius[f"{eps0:g}"]
    out = {
        'clean_acc': frac(lambda r: r['correct']), 'pgd_acc': frac(lambda r: r['pgd_correct']),
        'certified_acc': first['certified_acc'], 'epsilon': eps0, 'n': len(rows),
        'bound': settings.bound, 'certified_acc_converged_only': first['certified_acc_converged_only'],
        'radii': per_radius,
        'unconverged': sum(1 for r in rows if not r['converged']),
        'global_converged': all(r['global_converged'] for r in rows),
        'nan_bounds': sum(1 for r in rows if math.isnan(r['margin'])),
        'varying_fraction': {i: frac(lambda r: r[f"varying@{i}"]) for i in layers},
        'test_sniter': settings.test_sniter, 'test_opt_iter': settings.test_opt_iter,
        'seconds': sum(r['seconds'] for r in rows),
        'per_sample': [{'idx': r['idx'], 'label': r['label'], 'pred': r['pred'],
                        'certified': bool(r[f"certified@{eps0:g}"]),
                        'pgd_correct': bool(r['pgd_correct']),
                        'margin': None if math.isnan(r['margin']) else r['margin'],
                        'local_bound': r['local_bound'], 'converged': bool(r['converged']),
                        **({'certified_guaranteed': bool(r[f"certified_guaranteed@{eps0:g}"])}
                           if f"certified_guaranteed@{eps0:g}" in r else {}),
                        **{k: r[k] for k in ('radius', 'radius_upper', 'radius_guaranteed',
                                             'radius_guaranteed_upper') if k in r}}
                       for r in rows],
    }
    if rows and 'radius' in rows[0]:
        out['certified_radius'] = radius_summary(rows, settings.radius_rtol)
    if rows and 'lower_bound' in rows[0]:
        out['lower_bound'] = lower_summary(rows)
    if rows and 'seconds_guaranteed' in rows[0]:
        out['certificate'] = {'mode': 'guaranteed', 'delta': settings.delta,
                              'seconds_guaranteed': sum(r['seconds_guaranteed'] for r in rows)}
    if settings.audit:
        out['audit'] = {'attacked': int(sum(r['audited'] for r in rows)),
                        'broken': int(sum(r['broken'] for r in rows)),
                        'restarts': settings.audit_restarts, 'steps': settings.audit_steps}
    return out


def lower_summary(rows) -> dict:
    """The local bound over the empirical lower bound of the local constant (>= 1 for a
    sound bound): median, 90th percentile and the smallest, over the points with a
    positive lower bound; and the seconds the lower bounds took."""
    ratio = sorted(r['local_bound'] / r['lower_bound'] for r in rows if r['lower_bound'] > 0)
    pick = (lambda q: ratio[min(int(q * len(ratio)), len(ratio) - 1)]) if ratio else \
        (lambda q: math.nan)
    return {'median_bound_over_lower': pick(0.5), 'p90_bound_over_lower': pick(0.9),
            'min_bound_over_lower': ratio[0] if ratio else math.nan, 'points': len(ratio),
            'seconds_lower': sum(r['seconds_lower'] for r in rows)}


def median(values):
    v = sorted(values)
    if not v:
        return math.nan
    h = len(v) // 2
    return v[h] if len(v) % 2 else (v[h - 1] + v[h]) / 2


def radius_summary(rows, rtol):
    """Median / mean certified radius over all points (misclassified: 0), the search's
    tolerance and cost, for --radius."""
    out = {'rtol': rtol,
           'median': median([r['radius'] for r in rows]),
           'mean': sum(r['radius'] for r in rows) / max(len(rows), 1),
           'evaluations_per_point': sum(r['radius_evals'] for r in rows) / max(len(rows), 1),
           'unconverged': sum(1 for r in rows if not r['radius_converged']),
           'seconds': sum(r['seconds_radius'] for r in rows)}
    if 'radius_guaranteed' in rows[0]:
        out.update(median_guaranteed=median([r['radius_guaranteed'] for r in rows]),
                   mean_guaranteed=sum(r['radius_guaranteed'] for r in rows) / len(rows),
                   guaranteed_evaluations_per_point=sum(
                       r['radius_guaranteed_evals'] for r in rows) / len(rows))
    return out


def radius_line(r):
    """One line on the certified radii of a results dict ('' without --radius)."""
    c = r.get('certified_radius')
    if not c:
        return ''
    s = (f"certified radius (reference): median {c['median']:.4f}, mean {c['mean']:.4f} "
         f"(rtol {c['rtol']:g}, {c['evaluations_per_point']:.1f} evaluations per point, "
         f"{c['unconverged']} unconverged) [{c['seconds']:.0f}s]")
    if 'median_guaranteed' in c:
        s += (f"; guaranteed: median {c['median_guaranteed']:.4f}, mean "
              f"{c['mean_guaranteed']:.4f} (each radius false with probability <= "
              f"{r['certificate']['delta']:g})")
    return s


def lower_line(r):
    """One line on the local bound over its empirical lower bound (--lower_bound)."""
    c = r.get('lower_bound')
    if not c:
        return ''
    return (f"local bound / lower bound of the local constant at eps {r['epsilon']:g}: median "
            f"{c['median_bound_over_lower']:.3g}, 90th percentile {c['p90_bound_over_lower']:.3g}, "
            f"smallest {c['min_bound_over_lower']:.3g} ({c['points']} points; >= 1 for a sound "
            f"bound) [{c['seconds_lower']:.0f}s]")


def resume_rows(tsv_path, radii, loader_indices, certificate='reference', radius=False,
                lower=False):
    """Rows of an interrupted --out TSV that can be kept: whole batches only (a batch cut
    off in the middle is certified again). Returns (header, rows, set of done batches)."""
    header, rows = read_tsv(tsv_path)
    want = [f"certified@{e:g}" for e in radii]
    have = [h for h in header if h.startswith('certified@')]
    if have != want or 'audited' not in header or (
            ('seconds_guaranteed' in header) != (certificate == 'guaranteed')) or (
            ('radius' in header) != bool(radius)) or ('lower_bound' in header) != bool(lower):
        raise UserError(f"--resume: {tsv_path} was written with other radii, another "
                        f"--certificate, with{'out' if radius else ''} --radius, "
                        f"with{'out' if lower else ''} --lower_bound or by an older "
                        f"version ({', '.join(have)}); remove it or choose another --out")
    done = {r['idx'] for r in rows}
    batches = {b for b, ids in enumerate(loader_indices) if all(i in done for i in ids)}
    keep = {i for b in batches for i in loader_indices[b]}
    return header, [r for r in rows if r['idx'] in keep], batches


def expected_results(res):
    """The numbers --expect compares, from a results dict: n, clean and certified accuracy
    (reference count) per radius, in percent."""
    return {'n': res['n'], 'clean_acc': round(100 * res['clean_acc'], 4),
            'certified_acc': {e: round(100 * v['certified_acc'], 4) for e, v in res['radii'].items()}}


def check_expected(res, expected, tol_pp=0.5):
    """Messages for every number of ``expected`` (as written by expected_results) that
    ``res`` misses by more than ``tol_pp`` percentage points; [] when all agree."""
    got = expected_results(res)
    bad = []
    if got['n'] != expected['n']:
        bad.append(f"n: evaluated {got['n']} points, the record is for {expected['n']}")
    pairs = [('clean accuracy', got['clean_acc'], expected['clean_acc'])]
    for e, want in expected['certified_acc'].items():
        if e not in got['certified_acc']:
            bad.append(f"certified accuracy at eps {e}: not evaluated (add it to --epsilon)")
            continue
        pairs.append((f"certified accuracy at eps {e}", got['certified_acc'][e], want))
    for name, g, w in pairs:
        if not abs(g - w) <= tol_pp:
            bad.append(f"{name}: got {g:.2f}%, recorded {w:.2f}% (off by {g - w:+.2f} pp, "
                       f"tolerance {tol_pp} pp)")
    return bad


def comparison_table(named):
    """Markdown table of several results dicts ({name: results}, e.g. the models trained
    with each bound): clean, PGD, certified accuracy (local / global bound) per radius,
    unconverged points and the audit."""
    radii = list(next(iter(named.values()))['radii'])
    guaranteed = all('certificate' in r for r in named.values())
    pgd_eps = next(iter(named.values()))['epsilon']
    head = (["trained with", "clean", f"PGD @{pgd_eps:g}"]
            + [f"certified @{e} (local / global bound{' / guaranteed' if guaranteed else ''})"
               for e in radii]
            + ["unconverged", "audit: broken / attacked"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in named.items():
        cells = [name, f"{100 * r['clean_acc']:.2f}%", f"{100 * r['pgd_acc']:.2f}%"]
        for e in radii:
            v = r['radii'].get(e)
            cells.append("-" if v is None else
                         f"{100 * v['certified_acc']:.2f}% / {100 * v['certified_acc_global']:.2f}%"
                         + (f" / {100 * v['certified_acc_guaranteed']:.2f}%" if guaranteed else ""))
        a = r.get('audit')
        cells += [f"{r['unconverged']} of {r['n']}",
                  "-" if a is None else f"{a['broken']} / {a['attacked']}"]
        rows.append("| " + " | ".join(cells) + " |")
    return '\n'.join(rows)


def summary_line(r):
    s = (f"eps {r['epsilon']:.4g} n {r['n']}: clean err {100 * (1 - r['clean_acc']):.2f}% "
         f"| PGD err {100 * (1 - r['pgd_acc']):.2f}% | certified err "
         f"{100 * (1 - r['certified_acc']):.2f}% (certified acc {100 * r['certified_acc']:.2f}%, "
         f"{100 * r['certified_acc_converged_only']:.2f}% counting unconverged as not certified; "
         f"{r['unconverged']} unconverged, {r['nan_bounds']} NaN) [{r['seconds']:.0f}s]")
    c = r.get('certificate')
    if c:
        g = r['radii'][f"{r['epsilon']:g}"]['certified_acc_guaranteed']
        s += (f" | guaranteed certified acc {100 * g:.2f}% (each certificate false with "
              f"probability <= {c['delta']:g}) [{c['seconds_guaranteed']:.0f}s]")
    if 'audit' in r:
        s += f" | audit: {r['audit']['broken']} of {r['audit']['attacked']} certified points broken"
        if 'seconds_this_run' in r['audit']:
            s += f" [{r['audit']['seconds_this_run']:.0f}s]"
    if not r.get('global_converged', True):
        s += " | global iterations NOT converged"
    if r.get('normalization'):
        s += " | eps in the NORMALISED input space ((x - mean) / 0.225, --normalization)"
    return s


GLOBAL_WARNING = ("WARNING: the global power iterations did not converge within --test_sniter: "
                  "the global-bound numbers rest on underestimated norms and are not certificates")


def radius_lines(r):
    lines = []
    g_note = "" if r['global_converged'] else " (global iterations NOT converged)"
    for e, v in r['radii'].items():
        lines.append(f"  eps {e}: certified acc local {100 * v['certified_acc']:.2f}% "
                     f"(converged only {100 * v['certified_acc_converged_only']:.2f}%), "
                     f"global {100 * v['certified_acc_global']:.2f}%{g_note}"
                     + (f", guaranteed {100 * v['certified_acc_guaranteed']:.2f}% (delta "
                        f"{r['certificate']['delta']:g})" if 'certified_acc_guaranteed' in v
                        else ""))
    if not r['global_converged']:
        lines.append(GLOBAL_WARNING)
    return lines


def markdown_table(r):
    c = r.get('certificate')
    rows = ["| radius | clean acc | PGD acc | certified, local (reference count) | "
            "certified, local (unconverged = not certified) | certified, global |"
            + (f" certified, guaranteed (delta {c['delta']:g}) |" if c else ""),
            "|---|---|---|---|---|---|" + ("---|" if c else "")]
    for k, (e, v) in enumerate(r['radii'].items()):
        pgd = f"{100 * r['pgd_acc']:.2f}%" if k == 0 else "-"
        rows.append(f"| {e} | {100 * r['clean_acc']:.2f}% | {pgd} | {100 * v['certified_acc']:.2f}% | "
                    f"{100 * v['certified_acc_converged_only']:.2f}% | "
                    f"{100 * v['certified_acc_global']:.2f}% |"
                    + (f" {100 * v['certified_acc_guaranteed']:.2f}% |" if c else ""))
    rows.append("")
    rows.append(f"n = {r['n']} test points, test_sniter {r['test_sniter']}, test_opt_iter "
                f"{r['test_opt_iter']}; unconverged: {r['unconverged']}; NaN bounds: "
                f"{r['nan_bounds']}; global power iterations converged: {r['global_converged']}"
                + (f"; audit: {r['audit']['broken']} of {r['audit']['attacked']} certified "
                   f"(point, radius) pairs broken by {r['audit']['restarts']} x "
                   f"{r['audit']['steps']}-step PGD-L2" if 'audit' in r else ""))
    return '\n'.join(rows)
