"""Figures: analysis plots from the per-sample TSV of ``evaluate.py --out``, and the paper's
training curves from the TensorBoard scalars that the training loop writes.

From the TSV (``evaluate.py --plots``):
  certified_vs_radius.png  certified accuracy against the L2 radius, local and global bound
                           (with --radius: the continuous curve of the per-point radii)
  tightness.png            histogram of local_bound / global_bound per test point
  sparsity.png             fraction of varying neurons per activation layer (first radius)

From TensorBoard runs (``python plots.py --runs local=DIR global=DIR --out DIR``), one curve
per run, per training epoch:
  clean_loss.png   train/clean_loss_epoch   (cross-entropy of the clean logits)
  robust_loss.png  train/robust_loss_epoch  (cross-entropy of the worst-case logits)
  lip_ratio.png    train/lip_ratio_epoch    (mean local / global Lipschitz bound of the
                                             training batches, at the batch's radius)
  varying.png      train/varying@<k>_epoch  (fraction of varying neurons per activation)
  test_error.png   test/clean_err, test/certified_err (at that epoch's radius)

Each ``*_data`` function returns the numbers its figure shows (tests compare them with the
inputs); matplotlib is imported only when drawing.
"""
import os

from locallip.report import read_tsv


def radius_data(header, rows):
    """(radii, local acc, local acc counting unconverged as not certified, global acc), %,
    starting at radius 0 where every curve is the clean accuracy."""
    radii = sorted(float(h.split('@')[1]) for h in header if h.startswith('certified@'))
    n = max(len(rows), 1)
    clean = 100 * sum(r['correct'] for r in rows) / n
    local = [clean] + [100 * sum(r[f"certified@{e:g}"] for r in rows) / n for e in radii]
    strict = [clean] + [100 * sum(r[f"certified@{e:g}"] * r['converged'] for r in rows) / n
                        for e in radii]
    glob = [clean] + [100 * sum(r[f"certified_global@{e:g}"] for r in rows) / n for e in radii]
    return [0.0] + radii, local, strict, glob


def radius_curve(rows, column='radius'):
    """(radii, certified accuracy %) of the step curve "fraction of points whose certified
    radius is >= r": at each distinct radius of ``column`` (from 0) the accuracy just
    before it drops. Misclassified points have radius 0 and count for no r > 0."""
    n = max(len(rows), 1)
    vals = sorted(r[column] for r in rows)
    xs, ys = [0.0], [100 * sum(1 for v in vals if v > 0) / n]
    left = len([v for v in vals if v > 0])
    for v in sorted(set(v for v in vals if v > 0)):
        xs += [v, v]
        ys += [100 * left / n, 100 * (left - vals.count(v)) / n]
        left -= vals.count(v)
    return xs, ys


def global_converged(rows):
    """True when every row's global power iterations converged (else the global curve is
    not a bound: power iteration approaches the norms from below)."""
    return all(r['global_converged'] for r in rows)


def tightness_data(rows):
    """local_bound / global_bound of every test point with a finite, positive global bound."""
    return [r['local_bound'] / r['global_bound'] for r in rows
            if r['global_bound'] > 0 and r['local_bound'] == r['local_bound']]


def lower_data(rows):
    """local_bound / lower_bound of every point with a positive lower bound (>= 1)."""
    return [r['local_bound'] / r['lower_bound'] for r in rows if r['lower_bound'] > 0]


def _plain_log_ticks(axis):
    """Tick labels of a log axis as plain numbers (1.2, not 1.2 x 10^0)."""
    from matplotlib.ticker import LogFormatter
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _lower_figure(rows, eps0, out_dir, title):
    """Histogram of bound / lower bound (log axis): how far the bound can be from the truth."""
    import matplotlib.pyplot as plt
    ratio = lower_data(rows)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if ratio:
        lo, hi = min(ratio), max(ratio)
        edges = [lo * (hi / lo) ** (k / 40) for k in range(41)] if hi > lo else 10
        ax.hist(ratio, bins=edges, color='tab:orange', edgecolor='white')
        ax.set_xscale('log')
        _plain_log_ticks(ax.xaxis)
        med = sorted(ratio)[len(ratio) // 2]
        ax.axvline(med, color='black', ls=':', label=f"median {med:.3g}")
        ax.legend()
    ax.set_xlabel(f"local bound / empirical lower bound of the local constant at eps {eps0}")
    ax.set_ylabel('test points')
    ax.set_title(f"Bound over lower bound{' - ' + title if title else ''} (n = {len(ratio)})")
    return _save(fig, out_dir, 'bound_over_lower.png')


def sparsity_data(header, rows):
    """(activation module indices, mean fraction of varying neurons)."""
    layers = [h for h in header if h.startswith('varying@')]
    n = max(len(rows), 1)
    return [int(h.split('@')[1]) for h in layers], [sum(r[h] for r in rows) / n for h in layers]


def _save(fig, out_dir, name):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120, bbox_inches='tight')   # a long title widens the image
    plt.close(fig)
    return path


def make_plots(tsv_path, out_dir, title=''):
    """Draw the PNGs from ``tsv_path`` into ``out_dir`` (three; a fourth, bound / lower
    bound, when the rows have --lower_bound's column); returns their paths."""
    import matplotlib
    matplotlib.use('Agg')

    header, rows = read_tsv(tsv_path)
    os.makedirs(out_dir, exist_ok=True)
    eps0 = next(h.split('@')[1] for h in header if h.startswith('certified@'))
    suffix = f" - {title}" if title else ''
    paths = [_certified_figure(header, rows, out_dir, suffix),
             _tightness_figure(rows, eps0, out_dir, suffix)]
    if 'lower_bound' in header:
        paths.append(_lower_figure(rows, eps0, out_dir, title))
    paths.append(_sparsity_figure(header, rows, eps0, out_dir, suffix))
    return paths


def _certified_figure(header, rows, out_dir, suffix) -> str:
    """Certified accuracy against the radius: local (and strict), global, and the
    continuous certified-radius curves when the rows have them."""
    import matplotlib.pyplot as plt
    radii, local, strict, glob = radius_data(header, rows)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(radii, local, 'o-', color='tab:blue', lw=3, ms=9, label='local bound (Local-Lip)')
    ax.plot(radii, strict, 's--', color='tab:cyan', lw=1.5, ms=4,
            label='local, unconverged = not certified')
    if 'radius' in header:
        xs, ys = radius_curve(rows)
        ax.plot(xs, ys, '-', color='black', lw=1.2, label='certified radius >= eps (--radius)')
        if 'radius_guaranteed' in header:
            xs, ys = radius_curve(rows, 'radius_guaranteed')
            ax.plot(xs, ys, ':', color='tab:purple', lw=1.2, label='guaranteed radius >= eps')
        radii = radii + [max(xs)]
    g_ok = global_converged(rows)
    ax.plot(radii[:len(glob)], glob, '^-' if g_ok else '^:', color='tab:red',
            label='global bound (product of norms)' if g_ok else
            'global bound: iterations NOT converged (not a bound)')
    ax.set_xlabel('L2 radius eps (pixels in [0, 1])')
    ax.set_ylabel('certified accuracy (%)')
    ax.set_ylim(0, 100)
    ax.set_xlim(0, max(radii) * 1.05 if radii and max(radii) > 0 else 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Certified accuracy vs radius{suffix} (n = {len(rows)})")
    return _save(fig, out_dir, 'certified_vs_radius.png')


def _tightness_figure(rows, eps0, out_dir, suffix) -> str:
    """Histogram of local / global Lipschitz bound at the first radius."""
    import matplotlib.pyplot as plt
    ratio = tightness_data(rows)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.hist(ratio, bins=40, range=(0, 1.0001), color='tab:blue', edgecolor='white')
    ax.axvline(1.0, color='tab:red', ls='--', label='global bound (ratio 1)')
    if ratio:
        med = sorted(ratio)[len(ratio) // 2]
        ax.axvline(med, color='black', ls=':', label=f"median {med:.3g}")
    ax.set_xlabel(f"local / global Lipschitz bound at eps {eps0} (lower = tighter)")
    ax.set_ylabel('test points')
    ax.legend()
    ax.set_title(f"Tightness of the local bound{suffix} (n = {len(ratio)})")
    return _save(fig, out_dir, 'tightness.png')


def _sparsity_figure(header, rows, eps0, out_dir, suffix) -> str:
    """Bars of the varying neurons per activation layer at the first radius."""
    import matplotlib.pyplot as plt
    layers, frac = sparsity_data(header, rows)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    names = [f"{k + 1}\n[{i}]" for k, i in enumerate(layers)]
    bars = ax.bar(names, [100 * f for f in frac], color='tab:green')
    for b_, f in zip(bars, frac):
        ax.text(b_.get_x() + b_.get_width() / 2, 100 * f + 1, f"{100 * f:.1f}", ha='center',
                fontsize=8)
    ax.set_xlabel('activation layer [layer key: the module index in a plain nn.Sequential]')
    ax.set_ylabel('varying neurons (% of the layer)')
    ax.set_ylim(0, 105)
    ax.set_title(f"Varying neurons per activation at eps {eps0}{suffix} (n = {len(rows)})")
    return _save(fig, out_dir, 'sparsity.png')


# ----------------------------------------------------------------------------------------
# Training curves from TensorBoard event files
# ----------------------------------------------------------------------------------------
TRAINING_FIGURES = (     # file, tag, y label
    ('clean_loss.png', 'train/clean_loss_epoch', 'clean loss (training, per epoch)'),
    ('robust_loss.png', 'train/robust_loss_epoch', 'robust loss (training, per epoch)'),
    ('lip_ratio.png', 'train/lip_ratio_epoch', 'local / global Lipschitz bound (training)'),
)


def read_scalars(tb_dir):
    """{tag: {step: value}} of every scalar in the TensorBoard event files under ``tb_dir``
    (one file per training run: a resumed run adds one). Events are taken in the order
    they were written (wall time), so a step written twice, an epoch redone after --resume,
    keeps its last value."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util
    files = sorted(os.path.join(tb_dir, f) for f in os.listdir(tb_dir) if 'tfevents' in f) \
        if os.path.isdir(tb_dir) else []
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files in {tb_dir}")
    events = []
    for path in files:
        for ev in EventFileLoader(path).Load():
            for v in ev.summary.value:
                if v.HasField('simple_value'):
                    val = float(v.simple_value)
                elif v.HasField('tensor'):
                    val = float(tensor_util.make_ndarray(v.tensor).reshape(-1)[0])
                else:
                    continue
                events.append((ev.wall_time, v.tag, int(ev.step), val))
    out = {}
    for _, tag, step, val in sorted(events, key=lambda e: e[0]):
        out.setdefault(tag, {})[step] = val
    return out


def series(scalars, tag):
    """(steps, values) of one tag, by step; empty lists when the run never logged it."""
    d = scalars.get(tag, {})
    steps = sorted(d)
    return steps, [d[k] for k in steps]


def ramp_end_epoch(scalars):
    """The first epoch after which the radius is at its final value (from test/eps, the
    radius of the next epoch), or None while the largest radius logged so far has been
    logged only once (the ramp may still be going on)."""
    steps, eps = series(scalars, 'test/eps')
    at_max = [s for s, e in zip(steps, eps) if e >= max(eps, default=0) * (1 - 1e-6)]
    return at_max[0] if len(at_max) >= 2 else None


def varying_data(scalars):
    """{activation index: (epochs, fraction of varying neurons)} of one run."""
    out = {}
    for tag in scalars:
        if tag.startswith('train/varying@') and tag.endswith('_epoch'):
            out[int(tag[len('train/varying@'):-len('_epoch')])] = series(scalars, tag)
    return dict(sorted(out.items()))


COLORS = ['tab:blue', 'tab:red', 'tab:green', 'tab:purple']   # one per run
STYLES = ['-', '--', ':', '-.']                               # one per run (varying.png)


def make_training_plots(runs, out_dir, title=''):
    """Draw the training figures (see the module docstring) of ``runs`` {label: tb_dir}
    into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use('Agg')
    data = {label: read_scalars(d) for label, d in runs.items()}
    os.makedirs(out_dir, exist_ok=True)
    suffix = f" - {title}" if title else ''
    paths = [_series_figure(data, name, tag, ylabel, out_dir, suffix)
             for name, tag, ylabel in TRAINING_FIGURES]
    paths.append(_varying_figure(data, out_dir, suffix))
    paths.append(_test_error_figure(data, out_dir, suffix))
    return paths


def _mark_ramp(ax, data):
    """Integer epochs, and a dotted line where each run's radius reached its final value."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ends = {ramp_end_epoch(sc) for sc in data.values()} - {None}
    for e in ends:
        ax.axvline(e, color='gray', ls=':', lw=1)
    if ends:
        ax.text(min(ends), ax.get_ylim()[1], ' radius at its final value', color='gray',
                fontsize=8, va='top')


def _series_figure(data, name, tag, ylabel, out_dir, suffix) -> str:
    """One TensorBoard scalar ``tag`` per epoch, a line per run."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for k, (label, sc) in enumerate(data.items()):
        x, y = series(sc, tag)
        ax.plot(x, y, 'o-', ms=3, color=COLORS[k % 4], label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel(ylabel)
    if name == 'lip_ratio.png':
        ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    _mark_ramp(ax, data)
    ax.set_title(ylabel.split(' (')[0] + suffix)
    return _save(fig, out_dir, name)


def _varying_figure(data, out_dir, suffix) -> str:
    """Varying neurons per activation layer during training, a line per run and layer."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.6))
    cmap = plt.get_cmap('viridis')
    for k, (label, sc) in enumerate(data.items()):
        layers = varying_data(sc)
        for j, (idx, (x, y)) in enumerate(layers.items()):
            ax.plot(x, [100 * v for v in y], STYLES[k % 4], color=cmap(j / max(len(layers) - 1, 1)),
                    label=f"{label}: activation {j + 1} [{idx}]")
    ax.set_xlabel('epoch')
    ax.set_ylabel('varying neurons (% of the layer, training)')
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _mark_ramp(ax, data)
    ax.set_title('Varying neurons per activation' + suffix)
    return _save(fig, out_dir, 'varying.png')


def _test_error_figure(data, out_dir, suffix) -> str:
    """Clean and certified test error per epoch, two lines per run."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for k, (label, sc) in enumerate(data.items()):
        for tag, st, what in (('test/clean_err', 'o-', 'clean'),
                              ('test/certified_err', 's--', 'certified')):
            x, y = series(sc, tag)
            ax.plot(x, [100 * v for v in y], st, ms=3, color=COLORS[k % 4],
                    label=f"{label}: {what}")
    ax.set_xlabel('epoch')
    ax.set_ylabel("test error (%), certified at that epoch's radius")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    _mark_ramp(ax, data)
    ax.set_title('Test error during training' + suffix)
    return _save(fig, out_dir, 'test_error.png')
