"""Time a certified training step against a clean one (the convention of docs/performance.md).

    python bench.py --model c6f2_relux --data cifar10 --batch_size 32 --sniter 2 [--device cpu|cuda]
                    [--threads 2] [--steps 10] [--json FILE] [--mode train|eval]

train mode: in one process, interleaved, after warm-up, the median over --steps of
  clean step     = cross-entropy forward + backward + Adam step
  certified step = Local-Lip robust loss + backward + Adam step, with per-sample vectors
                   freshly random for every step (so all --sniter iterations run)
on the same model and batch (random inputs in [0, 1]); reports both, their ratio, the peak
memory of each (CUDA: max_memory_allocated; CPU: growth of the process's peak RSS) and the
stored-vector bytes per sample.
eval mode: certification of the first --n_test points (default one --test_batch_size batch;
random inputs without --saved_model) at the radii --radii (default --eps), by each of
--methods, on the same points and in the same way as evaluate.py (power iteration: fresh
vectors at the smallest radius, warm at the larger ones, global vectors converged once):
  reference   whole-batch power iteration up to --test_sniter (the reference's loop)
  early       our per-sample early stop (evaluate.py's default)
  guaranteed  Lanczos upper bounds, each certificate false with probability <= --delta
              (evaluate.py --certificate guaranteed; fresh starts at every radius)
  radius      the certified radius of every point (radius.radius_batch, fresh vectors, the
              estimate search of evaluate.py --radius); its "certified accuracy" at a radius
              counts the points whose radius reaches it
  radius_guaranteed  the guaranteed radius alone (locallip.certified_radius(...,
              certificate='guaranteed'): no power iteration; --radius_steps Lanczos steps
              per masked norm, once per point, and box-only searches)
reports seconds, certified points per second and certified accuracy per radius and method.
lanczos mode: the Lanczos runs of the guaranteed certificate on the first --test_batch_size
points at --eps, --radius_steps steps on each masked layer, with partial reorthogonalisation
and with it at every step: per layer the steps that reorthogonalised (mean and most per
point), the measured loss of orthogonality, the rounding slack over |||W|||^2, the Ritz
values' largest relative difference between the two, and the seconds of each.
--vectors store: the certified step takes its per-sample vectors from a VectorStore, as the
training loop does, on rows never written before (so every vector is a fresh draw of the
store's own generator and all iterations run): it times the loop's real vector path.
--profile N: afterwards, N certified steps under torch.profiler: the top operators by device
and by CPU time, and on CUDA the share of the steps' wall time the GPU was busy (union of
kernel intervals), plus the counts of host-device copies and synchronisations.
"""
import argparse
import inspect
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from locallip.bound import (compute_bound, exact_float32, worst_case_margins,
                             worst_case_margins_all_pairs)
from locallip.checkpoints import load_checkpoint, saved_model_path
from locallip.data import get_dataset
from locallip.layers import layer_input_shapes
from locallip.models import clamp_thresholds, select_model
from locallip.step import StepSettings, step_function, stored_step
from locallip.vectors import RandomVectors, VectorStore

INPUT = {'mnist': (1, 28, 28), 'fashionmnist': (1, 28, 28), 'cifar10': (3, 32, 32),
         'tinyimagenet': (3, 64, 64)}
CLASSES = {'mnist': 10, 'fashionmnist': 10, 'cifar10': 10, 'tinyimagenet': 200}


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def make_parser() -> argparse.ArgumentParser:
    """bench.py's flags (declarative)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='c6f2_relux', help="architecture name (models.MODELS)")
    p.add_argument('--data', default='cifar10', help="dataset family: input shape and classes")
    p.add_argument('--batch_size', type=int, default=32, help="training batch size")
    p.add_argument('--sniter', type=int, default=2, help="power iterations per certified step")
    p.add_argument('--opt_iter', type=int, default=1, help="worst-case-logit rounds")
    p.add_argument('--eps', type=float, default=0.1551, help="L2 radius of the certified step")
    p.add_argument('--init', type=float, default=2.0, help="ReLU_x threshold init")
    p.add_argument('--gloro', action='store_true', help="GloRo loss instead of BCP")
    p.add_argument('--pi_grad', choices=('all', 'last'), default='all', help="as in training: "
                   "'last' differentiates only the final power-iteration product")
    p.add_argument('--mode', choices=('train', 'eval', 'worst', 'lanczos'), default='train',
                   help="what to "
                   "measure; worst: peak memory of one worst-case-logit computation, true-class "
                   "column vs all pairs (--classes, --hidden, --batch_size, --opt_iter)")
    p.add_argument('--classes', type=int, default=200, help="worst mode: classes")
    p.add_argument('--hidden', type=int, default=256, help="worst mode: penultimate width")
    p.add_argument('--test_batch_size', type=int, default=256, help="eval mode: batch size")
    p.add_argument('--test_sniter', type=int, default=2000, help="eval mode: power iterations")
    p.add_argument('--test_opt_iter', type=int, default=1000, help="eval mode: worst-case rounds")
    p.add_argument('--methods', nargs='+', choices=('reference', 'early', 'guaranteed', 'radius',
                                                    'radius_guaranteed'),
                   default=None, help="eval mode: certification methods to time (default: "
                   "early, or reference with --batch_stop)")
    p.add_argument('--radii', nargs='+', type=float, default=None, help="eval mode: radii "
                   "(default --eps)")
    p.add_argument('--n_test', type=int, default=None, help="eval mode: points (default "
                   "--test_batch_size)")
    p.add_argument('--delta', type=float, default=1e-4, help="eval mode, guaranteed: failure "
                   "probability of each certificate")
    p.add_argument('--radius_steps', type=int, default=256, help="eval mode, radius_guaranteed: "
                   "Lanczos steps of each masked-norm upper bound")
    p.add_argument('--batch_stop', action='store_true', help="eval mode: hold the whole batch "
                   "to its slowest sample, as the reference does (the 'before' of per-sample stopping)")
    p.add_argument('--saved_model', default=None, help="eval mode: load P_best.pth and certify "
                   "the first --test_batch_size test images of --data (from --data_dir)")
    p.add_argument('--data_dir', default=None, help="with --saved_model: dataset folder "
                   "(as evaluate.py's --data_dir: default data/, 'system' for the Debian "
                   "Fashion-MNIST package)")
    p.add_argument('--steps', type=int, default=10, help="timed steps of each kind (median)")
    p.add_argument('--warmup', type=int, default=2, help="untimed steps of each kind first")
    p.add_argument('--threads', type=int, default=2, help="CPU threads (the convention: 2)")
    p.add_argument('--device', default='cpu', help="cpu or cuda[:N]")
    p.add_argument('--seed', type=int, default=0, help="random seed")
    p.add_argument('--json', default=None, help="also write the results here")
    p.add_argument('--vectors', choices=('random', 'store'), default='random', help="train "
                   "mode: fresh vectors from RandomVectors (the benchmark convention) or from a VectorStore "
                   "on unwritten rows (the training loop's path, store on --store_device)")
    p.add_argument('--store_device', default='auto', help="with --vectors store: cpu, the "
                   "--device, or auto (as training chooses)")
    p.add_argument('--tf32', choices=('default', 'on', 'off'), default='default', help="CUDA: "
                   "TF32 for convolutions and matmuls in the timed steps (default: PyTorch's)")
    p.add_argument('--compile', action='store_true', help="train mode: the certified step "
                   "through torch.compile (train_mnist.py --compile; 'reduce-overhead' on CUDA); "
                   "compiled during the warm-up steps (raise --warmup)")
    p.add_argument('--profile', type=int, default=0, help="train mode: profile this many "
                   "certified steps after the timing (torch.profiler) and print a summary")
    return p


def main(argv=None):
    a = make_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.tf32 != 'default':
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = a.tf32 == 'on'
    if a.mode == 'worst':
        return worst_memory(a)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cuda = dev.type == 'cuda'
    model = select_model(a.data, a.model, a.init).to(dev)
    shape, classes = INPUT[a.data], CLASSES[a.data]
    per_sample = VectorStore.bytes_per_sample(layer_input_shapes(model, shape))
    if a.saved_model:
        load_checkpoint(saved_model_path(a.saved_model), model, dev)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t

    out = {'model': a.model, 'data': a.data, 'device': str(dev), 'threads': a.threads,
           'vectors': a.vectors, 'tf32': a.tf32, 'compile': a.compile,
           'batch_size': a.batch_size, 'sniter': a.sniter, 'mode': a.mode, 'pi_grad': a.pi_grad,
           'stored_vector_bytes_per_sample': per_sample, 'torch': torch.__version__}
    if a.mode == 'eval':
        out.update(eval_methods(a, model, dev, shape, classes, timed))
    elif a.mode == 'lanczos':
        out.update(lanczos_runs(a, model, dev, shape, classes, timed))
    else:
        out.update(train_timing(a, model, dev, timed))
    return write_json(out, a.json)


def train_steps(a, model, dev):
    """(clean_step, certified_step) of the train mode: one Adam step each on a fresh random
    batch, the certified one through the training loop's step (step.certified_step;
    --compile: compiled)."""
    shape, classes = INPUT[a.data], CLASSES[a.data]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gv = {}

    def batch(n):
        return torch.rand(n, *shape, device=dev), torch.randint(0, classes, (n,), device=dev)

    def clean_step():
        x, y = batch(a.batch_size)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    store, next_row = None, [0]
    if a.vectors == 'store':
        rows = a.batch_size * (3 + 2 * a.warmup + 2 * a.steps + a.profile)   # never reused
        sdev = None if a.store_device == 'auto' else torch.device(a.store_device)
        store = VectorStore(layer_input_shapes(model, shape), rows, **store_kwargs(sdev, dev))

    def vectors_for(n):
        if store is None:
            return RandomVectors(n, dev)
        idx = torch.arange(next_row[0], next_row[0] + n)
        next_row[0] += n
        return store.batch(idx, dev)

    # the training loop's certified step (step.certified_step; --compile: compiled)
    step_args = StepSettings(sniter=a.sniter, opt_iter=a.opt_iter, pi_grad=a.pi_grad,
                             gloro=a.gloro, sp_thres=0.0, compile=a.compile)
    step_fn = step_function(a.compile, dev)
    shapes = layer_input_shapes(model, shape)

    def certified_step():
        x, y = batch(a.batch_size)
        loss = stored_step(step_fn, model, x, y, a.eps, 0.5, vectors_for(a.batch_size), shapes,
                           gv, step_args).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_thresholds(model)

    return clean_step, certified_step


def train_timing(a, model, dev, timed) -> dict:
    """train mode: peak memory, then the interleaved median step times of a clean and a
    certified step (the benchmark convention), optionally a profile; prints one line."""
    clean_step, certified_step = train_steps(a, model, dev)
    # peak memory first, measured in a fresh order: certified grows RSS more on CPU
    clean_peak = measure(clean_step, dev)[1]
    cert_peak = measure(certified_step, dev)[1]
    for _ in range(a.warmup):
        clean_step()
        certified_step()
    tc, tr = [], []
    for _ in range(a.steps):
        tc.append(timed(clean_step))
        tr.append(timed(certified_step))
    out = dict(clean_s=statistics.median(tc), certified_s=statistics.median(tr),
               clean_peak_bytes=clean_peak, certified_peak_bytes=cert_peak)
    out['ratio'] = out['certified_s'] / out['clean_s']
    if a.profile:
        out['profile'] = profile_steps(certified_step, a.profile, dev)
    per_sample = VectorStore.bytes_per_sample(layer_input_shapes(model, INPUT[a.data]))
    print(f"{a.model} batch {a.batch_size} sniter {a.sniter} on {dev} ({a.threads} threads, "
          f"{a.vectors} vectors, tf32 {a.tf32}{', compiled' if a.compile else ''}): "
          f"clean {1000 * out['clean_s']:.1f} ms, certified {1000 * out['certified_s']:.1f} ms, "
          f"ratio {out['ratio']:.2f}x | peak memory clean {clean_peak / 2 ** 20:.1f} MiB, "
          f"certified {cert_peak / 2 ** 20:.1f} MiB | stored vectors {per_sample} B/sample")
    return out


def eval_methods(a, model, dev, shape, classes, timed):
    """eval mode: certify the same points with every method of --methods (see the module
    docstring); returns {'methods': {name: {seconds, points_per_s, certified_acc {radius: acc}}},
    ...} and prints one line per method."""
    methods = a.methods or (['reference'] if a.batch_stop else ['early'])
    radii = sorted(a.radii or [a.eps])
    batches, n = eval_batches(a, shape, classes, dev)
    model.eval()
    res = {'radii': radii, 'n': n, 'test_sniter': a.test_sniter,
           'test_opt_iter': a.test_opt_iter, 'delta': a.delta, 'methods': {}}
    for name in methods:
        torch.manual_seed(a.seed)
        tally = Tally({e: 0 for e in radii})
        sec = timed(lambda: certify_all(name, a, model, batches, shape, tally))
        m = res['methods'][name] = {'seconds': sec, 'points_per_s': n / sec, 'certified_acc':
                                    {f"{e:g}": tally.certified[e] / n for e in radii}}
        if tally.radii_found:
            m['median_radius'] = float(torch.cat(tally.radii_found).median())
        if tally.iters:
            m['iterations'] = iteration_stats(tally.iters, a.test_sniter)
        accs = ', '.join(f"{100 * tally.certified[e] / n:.2f}% @{e:g}" for e in radii)
        print(f"{a.model} eval {name:<10} n {n} radii {' '.join(f'{e:g}' for e in radii)} "
              f"test_sniter {a.test_sniter}: {sec:.1f}s, {n / sec:.2f} points/s "
              f"(all radii), certified {accs}", flush=True)
    m = res['methods']
    for slow in ('early', 'reference'):
        if 'guaranteed' in m and slow in m:
            res[f'speedup_vs_{slow}'] = m[slow]['seconds'] / m['guaranteed']['seconds']
            print(f"guaranteed is {res[f'speedup_vs_{slow}']:.1f}x faster than {slow}")
    return res


def lanczos_runs(a, model, dev, shape, classes, timed):
    """lanczos mode (see the module docstring): {'layers': {key: {...}}}, one line per layer."""
    from locallip.lanczos import GuaranteedNorms, Lanczos, masked_operators
    x, y = eval_batches(a, shape, classes, dev)[0][0]
    norms = GuaranteedNorms(model, shape, a.delta, generator_seed=a.seed)
    layers = {}
    for i, layer, d_in, d_out, in_shape in masked_operators(x, y, a.eps, norms).ops:
        runs = []
        for semi in (None, 0.0):          # partial, then at every step
            torch.manual_seed(a.seed)
            lz = Lanczos(layer, d_in, d_out, in_shape, len(x), dev)
            lz.semi = lz.semi if semi is None else semi
            with torch.no_grad():
                sec = timed(lambda: lz.run(a.radius_steps))
                runs.append((lz, sec, lz.ritz_max(), lz.orthogonality(), lz.slack()))
        (lz, sec, xi, eta, slack), (full, sec_full, xi_full, _, _) = runs
        layers[i] = row = {
            'n': lz.q.shape[1], 'steps': lz.steps,
            'reorthogonalised_mean': float(lz.reorthogonalised.double().mean()),
            'reorthogonalised_max': int(lz.reorthogonalised.max()),
            'eta_max': float(eta.max()), 'slack_over_abs_norm2': float(slack.max()) / lz.abs_norm ** 2,
            'ritz_rel_diff': float(((xi - xi_full).abs() / xi_full.abs().clamp_min(1e-300)).max()),
            'seconds': sec, 'seconds_every_step': sec_full}
        print(f"layer {i} n {row['n']}: reorthogonalised {row['reorthogonalised_mean']:.0f} "
              f"(at most {row['reorthogonalised_max']}) of {lz.steps} steps per point, "
              f"eta <= {row['eta_max']:.1e}, slack <= {row['slack_over_abs_norm2']:.1e} |||W|||^2, "
              f"Ritz values within {row['ritz_rel_diff']:.1e} of every-step reorthogonalisation; "
              f"{sec:.2f} s against {sec_full:.2f} s", flush=True)
    return {'layers': layers, 'eps': a.eps, 'points': len(x)}


def eval_batches(a, shape, classes, dev):
    """([(x, y)] batches of --test_batch_size on ``dev``, number of points): the first
    --n_test test points of --saved_model's dataset, or seeded random inputs and labels."""
    n = a.n_test or a.test_batch_size
    if a.saved_model:
        ds = get_dataset(a.data, a.data_dir, train=False, augment=False, download=False)
        items = [ds[k] for k in range(min(n, len(ds)))]
        xs = torch.stack([t[0] for t in items])
        ys = torch.tensor([int(t[1]) for t in items])
    else:
        g = torch.Generator().manual_seed(a.seed)
        xs, ys = torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    batches = [(xs[k:k + a.test_batch_size].to(dev), ys[k:k + a.test_batch_size].to(dev))
               for k in range(0, len(xs), a.test_batch_size)]
    return batches, len(xs)


@dataclass
class Tally:
    """What one method found: certified points per radius, the certified radii ([batch]
    tensors, radius methods) and the per-sample iterations of every layer."""
    certified: dict
    radii_found: list = field(default_factory=list)
    iters: dict = field(default_factory=dict)


def certify_all(name, a, model, batches, shape, tally: Tally):
    """Certify every batch with method ``name`` at every radius of ``tally``, counting into
    it (the timed part: the global vectors and norms are set up here, as evaluate.py does)."""
    from locallip.certificates import converged_global_vectors
    from locallip.lanczos import GuaranteedNorms
    dev = batches[0][0].device
    norms = gv0 = None
    if name in ('guaranteed', 'radius_guaranteed'):
        norms = GuaranteedNorms(model, shape, a.delta, generator_seed=a.seed)
    if 'guaranteed' not in name:   # the global vectors, converged once, as evaluate.py does
        gv0 = converged_global_vectors(model, shape, a.test_sniter, a.seed, dev)
    for x, y in batches:
        if name.startswith('radius'):
            _radius_tally(a, model, x, y, gv0, norms, tally)
        elif name == 'guaranteed':
            _guaranteed_tally(a, model, x, y, norms, tally)
        else:
            _estimate_tally(a, model, x, y, gv0, name == 'early', tally)


def _radius_tally(a, model, x, y, gv0, norms, tally: Tally):
    """The certified radius of every point (guaranteed with ``norms``, else the estimate's)."""
    from locallip.radius import RadiusSearch, radius_batch
    search = RadiusSearch(sniter=a.test_sniter, opt_iter=a.test_opt_iter, steps=a.radius_steps)
    r = radius_batch(model, x, y, gv0, search, norms=norms, reference=norms is None)
    found = r.radius if norms is None else r.radius_guaranteed
    tally.radii_found.append(found)
    for e in tally.certified:
        tally.certified[e] += int((found >= e).sum())


def _guaranteed_tally(a, model, x, y, norms, tally: Tally):
    """Guaranteed certificates (Lanczos upper bounds) at every radius."""
    from locallip.certificates import guaranteed_certify
    for e in tally.certified:
        tally.certified[e] += int(guaranteed_certify(model, x, y, e, norms,
                                                     opt_iter=a.test_opt_iter).certified.sum())


def _estimate_tally(a, model, x, y, gv0, early: bool, tally: Tally):
    """Power-iteration certificates at the radii in increasing order, each starting from the
    previous radius's vectors; each point stops on its own (``early``) or with the batch."""
    from locallip.vectors import KeptVectors
    vec, gv = KeptVectors(x.shape[0], x.device), {k: v.clone() for k, v in gv0.items()}
    for e in tally.certified:
        with torch.no_grad(), exact_float32():
            r = compute_bound(model, x, y, e, vec, gv, sniter=a.test_sniter,
                              opt_iter=a.test_opt_iter, check=True, per_sample_stop=early)
        tally.certified[e] += int(r.certified(y).sum())
        for k, it in r.iters.items():       # per-sample iterations, each layer
            tally.iters.setdefault(k, []).append(it.cpu())


def iteration_stats(iters, sniter):
    """Per layer, the per-sample power iterations of all radii: mean, median, 99th
    percentile, max and the fraction of points that ran all ``sniter``; printed, returned."""
    out = {}
    for k, parts in sorted(iters.items()):   # by module index
        it = torch.cat(parts).double()
        out[str(k)] = {'mean': float(it.mean()), 'median': float(it.median()),
                       'p99': float(torch.quantile(it, 0.99)), 'max': int(it.max()),
                       'at_cap': float((it >= sniter).double().mean())}
    print("  power iterations per point and layer (mean / median / p99 / max): " + "; ".join(
        f"{k}: {v['mean']:.0f} / {v['median']:.0f} / {v['p99']:.0f} / {v['max']}"
        for k, v in out.items()), flush=True)
    return out


def measure(fn, dev):
    """Run fn once: (its result, peak memory growth in bytes, seconds). CUDA:
    max_memory_allocated; CPU: growth of the process's peak RSS (monotone, so measure the
    smaller computation first)."""
    cuda = dev.type == 'cuda'
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else peak_rss()
    t = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    return result, (torch.cuda.max_memory_allocated(dev) if cuda else peak_rss()) - base, seconds


def store_kwargs(store_device, dev):
    """VectorStore keyword arguments placing the store (older versions keep it on the CPU)."""
    if 'device' not in inspect.signature(VectorStore).parameters:
        return {}
    return {'device': dev if store_device is None else store_device}


def profile_steps(step, n, dev):
    """Run ``step`` n times under torch.profiler; print and return a summary: the top
    operators, and on CUDA the fraction of the wall time with a kernel running."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    sort = 'self_cuda_time_total' if dev.type == 'cuda' else 'self_cpu_time_total'
    print(ka.table(sort_by=sort, row_limit=15))
    print(ka.table(sort_by='self_cpu_time_total', row_limit=12))
    summary = {'steps': n, 'wall_s': wall}
    counts = {e.key: e.count for e in ka}
    for name in ('aten::item', 'aten::_local_scalar_dense', 'cudaStreamSynchronize',
                 'cudaDeviceSynchronize', 'aten::to', 'aten::copy_', 'aten::randn',
                 'aten::normal_', 'cudaMemcpyAsync', 'Memcpy HtoD (Pageable -> Device)',
                 'Memcpy DtoH (Device -> Pageable)', 'cudaLaunchKernel'):
        if name in counts:
            summary[f"count {name}"] = counts[name] / n
    if dev.type == 'cuda':
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type.name == 'CUDA')
        busy, cur_s, cur_e = 0.0, None, None
        for s0, e0 in spans:
            if cur_e is None or s0 > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = s0, e0
            else:
                cur_e = max(cur_e, e0)
        if cur_e is not None:
            busy += cur_e - cur_s
        cpu = [e.time_range for e in prof.events() if e.device_type.name == 'CPU']
        span = (max(t.end for t in cpu) - min(t.start for t in cpu)) if cpu else wall * 1e6
        summary['gpu_busy_fraction'] = busy / max(span, 1e-9)
        summary['gpu_kernel_ms_per_step'] = busy / 1000 / n
        summary['profiled_ms_per_step'] = span / 1000 / n
    print("profile summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in summary.items()))
    return summary


def write_json(out, path):
    if path:
        with open(path, 'w') as f:
            json.dump(out, f, indent=1)
    return out


def worst_memory(a):
    """Peak memory of the worst-case logits: true-class column (ours) then all pairs (the
    reference's layout), in that order so that each peak-RSS growth is its own."""
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(a.seed)
    W = torch.randn(a.classes, a.hidden, generator=g).to(dev)
    y = torch.randint(0, a.classes, (a.batch_size,), generator=g).to(dev)
    r = (torch.rand(a.batch_size, generator=g) + 0.5).to(dev)
    lo = (-torch.rand(a.batch_size, a.hidden, generator=g) * 0.3).to(dev)
    hi = (torch.rand(a.batch_size, a.hidden, generator=g) * 0.3).to(dev)
    out = {'mode': 'worst', 'classes': a.classes, 'hidden': a.hidden, 'batch_size': a.batch_size,
           'opt_iter': a.opt_iter, 'device': str(dev)}
    results = {}
    for name, fn in (('true_class', lambda: worst_case_margins(W, y, r, lo, hi, a.opt_iter)),
                     ('all_pairs', lambda: worst_case_margins_all_pairs(W, r, lo, hi, a.opt_iter))):
        with torch.no_grad():
            results[name], peak, seconds = measure(fn, dev)
        out[f"{name}_peak_bytes"], out[f"{name}_s"] = peak, seconds
    col = results['all_pairs'][torch.arange(a.batch_size), :, y]
    out['identical'] = bool(torch.equal(col, results['true_class']))
    print(f"worst-case logits, {a.classes} classes, hidden {a.hidden}, batch {a.batch_size}, "
          f"opt_iter {a.opt_iter} on {dev}: true-class column {out['true_class_peak_bytes'] / 2 ** 20:.1f} MiB "
          f"({out['true_class_s']:.3f}s), all pairs {out['all_pairs_peak_bytes'] / 2 ** 20:.1f} MiB "
          f"({out['all_pairs_s']:.3f}s); identical results: {out['identical']}")
    return write_json(out, a.json)


if __name__ == '__main__':
    main(sys.argv[1:])
