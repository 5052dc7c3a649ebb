"""Analysis plots drawn from the per-sample TSV of ``evaluate.py --out``.

  certified_vs_radius.png  certified accuracy against the L2 radius, local and global bound
  tightness.png            histogram of local_bound / global_bound per test point
  sparsity.png             fraction of varying neurons per activation layer (first radius)

Each ``*_data`` function returns the numbers its figure shows (tests compare them with the
TSV); matplotlib is imported only when drawing.
"""
import os

from report import read_tsv


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


def global_converged(rows):
    """True when every row's global power iterations converged (else the global curve is
    not a bound: power iteration approaches the norms from below)."""
    return all(r['global_converged'] for r in rows)


def tightness_data(rows):
    """local_bound / global_bound of every test point with a finite, positive global bound."""
    return [r['local_bound'] / r['global_bound'] for r in rows
            if r['global_bound'] > 0 and r['local_bound'] == r['local_bound']]


def sparsity_data(header, rows):
    """(activation module indices, mean fraction of varying neurons)."""
    layers = [h for h in header if h.startswith('varying@')]
    n = max(len(rows), 1)
    return [int(h.split('@')[1]) for h in layers], [sum(r[h] for r in rows) / n for h in layers]


def _save(fig, out_dir, name):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_plots(tsv_path, out_dir, title=''):
    """Draw the three PNGs from ``tsv_path`` into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    header, rows = read_tsv(tsv_path)
    os.makedirs(out_dir, exist_ok=True)
    eps0 = next(h.split('@')[1] for h in header if h.startswith('certified@'))
    paths = []
    n = len(rows)

    radii, local, strict, glob = radius_data(header, rows)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(radii, local, 'o-', color='tab:blue', lw=3, ms=9, label='local bound (Local-Lip)')
    ax.plot(radii, strict, 's--', color='tab:cyan', lw=1.5, ms=4,
            label='local, unconverged = not certified')
    g_ok = global_converged(rows)
    ax.plot(radii, glob, '^-' if g_ok else '^:', color='tab:red',
            label='global bound (product of norms)' if g_ok else
            'global bound: iterations NOT converged (not a bound)')
    ax.set_xlabel('L2 radius eps (pixels in [0, 1])')
    ax.set_ylabel('certified accuracy (%)')
    ax.set_ylim(0, 100)
    ax.set_xlim(0, max(radii) * 1.05 if radii and max(radii) > 0 else 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Certified accuracy vs radius{' - ' + title if title else ''} (n = {n})")
    paths.append(_save(fig, out_dir, 'certified_vs_radius.png'))

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
    ax.set_title(f"Tightness of the local bound{' - ' + title if title else ''} (n = {len(ratio)})")
    paths.append(_save(fig, out_dir, 'tightness.png'))

    layers, frac = sparsity_data(header, rows)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    names = [f"{k + 1}\n[{i}]" for k, i in enumerate(layers)]
    bars = ax.bar(names, [100 * f for f in frac], color='tab:green')
    for b_, f in zip(bars, frac):
        ax.text(b_.get_x() + b_.get_width() / 2, 100 * f + 1, f"{100 * f:.1f}", ha='center', fontsize=8)
    ax.set_xlabel('activation layer [module index in the nn.Sequential]')
    ax.set_ylabel('varying neurons (% of the layer)')
    ax.set_ylim(0, 105)
    ax.set_title(f"Varying neurons per activation at eps {eps0}{' - ' + title if title else ''} "
                 f"(n = {n})")
    paths.append(_save(fig, out_dir, 'sparsity.png'))
    return paths
