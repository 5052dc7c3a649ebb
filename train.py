"""The one training loop of MNIST, Fashion-MNIST, CIFAR-10 and TinyImageNet.

The entry scripts (train_mnist.py, train_cifar10.py, TinyImagenet/train.py) only choose
dataset defaults and call ``main``. Schedule (the reference's, docs/training.md): ``warmup``
epochs of plain cross-entropy, then certified training with eps and kappa ramped over ``rampup`` epochs
(with the reference's within-epoch increments), Adam with a constant then exponentially
decaying learning rate, certified test error after every epoch at the next epoch's eps,
best (after the ramp) and last checkpoints, and a final clean / PGD / certified
evaluation of the best model at --epsilon.

Every epoch re-seeds all random generators from (seed, epoch), and the checkpoint holds
the model, optimiser, scheduler, power-iteration vectors and arguments, so that
``--resume`` after a killed run reaches the same result as an uninterrupted run.
"""
import bisect
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data_load import get_loaders
from certify import certify_loader
from evaluate import eval_settings
from evaluation import full_evaluation
from progress import PROGRESS_EVERY_S
from report import summary_line
from local_bound import FLOOR, certified_loss, compute_bound, sparsity_loss
from networks import (BATCHNORM, DROPOUTS, bound_structure, check_supported, fold_batchnorm,
                      layer_input_shapes, layer_list, training_view)
from operators import NORM_EPS, global_vector_shape
from vectors import GivenVectors, VectorStore
from checkpoints import atomic_save, checkpoint_base, load_checkpoint, safe_load
from errors import UnsupportedModel, UserError
from models import clamp_thresholds, select_model
from utils import (all_reduce_sum, argparser, distributed, init_distributed, run_main, seed_all,
                   use_deterministic_kernels)


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------
def epoch_eps_kappa(args, epoch):
    """(eps, kappa) at the start of ``epoch`` (before ``warmup``: a clean epoch, (0, 1)):
    eps = linspace(starting_epsilon, epsilon_train, schedule_length)[t - warmup], then
    epsilon_train; kappa = linspace(starting_kappa, kappa, kappa_schedule_length)[...], then
    kappa."""
    k = epoch - args.warmup
    if k < 0:
        return 0.0, 1.0
    n_eps, n_kappa = args.schedule_length, args.kappa_schedule_length
    eps = (np.linspace(args.starting_epsilon, args.epsilon_train, n_eps)[k] if k < n_eps
           else args.epsilon_train)
    kappa = (np.linspace(args.starting_kappa, args.kappa, n_kappa)[k] if k < n_kappa
             else args.kappa)
    return float(eps), float(kappa)


def batch_eps_kappa(args, epoch, i, n_batches):
    """Within-epoch values (reference quirks kept: the eps increment uses the evaluation
    radius --epsilon, and both increments continue after the ramp)."""
    eps, kappa = epoch_eps_kappa(args, epoch)
    if epoch < args.warmup:
        return eps, kappa
    frac = i / n_batches
    if args.schedule_length > 0:
        eps += frac * (args.epsilon - args.starting_epsilon) / args.schedule_length
    if args.kappa_schedule_length > 0:
        kappa += frac * (args.kappa - args.starting_kappa) / args.kappa_schedule_length
    return eps, kappa


def lr_factor(args):
    """The learning rate of epoch t is lr * f(t) (the reference's schedulers):
    exp: 1 until epochs//2 + more, then (end_lr / lr)^((t - (epochs//2 + more - 1)) /
    (epochs//2 - more)); step: gamma^(e // step_size) and multistep: gamma^(number of
    --wd_list milestones <= e), with e = max(t - (rampup + warmup - 1) + 1, 0), i.e.
    constant until the ramp ends."""
    if args.lr_scheduler == 'exp':
        start = args.epochs // 2 + args.more
        span = args.epochs // 2 - args.more
        ratio = args.end_lr / args.lr

        def f(t):
            if t < start or span <= 0:
                return 1.0
            return ratio ** ((t - (start - 1)) / span)
        return f

    def after_ramp(t):
        return max(t - (args.rampup + args.warmup - 1) + 1, 0)
    if args.lr_scheduler == 'step':
        return lambda t: args.gamma ** (after_ramp(t) // args.step_size)
    milestones = sorted(args.wd_list)
    return lambda t: args.gamma ** bisect.bisect_right(milestones, after_ramp(t))


def make_optimizer(args, model):
    """Adam(lr), or SGD(lr, momentum, weight_decay) with --opt sgd (reference)."""
    if args.opt == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=args.lr)


# ----------------------------------------------------------------------------------------
# Vector stores
# ----------------------------------------------------------------------------------------
def available_ram():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:     # no /proc/meminfo (not Linux): the kernel's free pages instead
        pass
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


def choose_store(per_sample_fp32, n, budget, requested='auto'):
    """(dtype, on_disk) of the vector store: ``requested`` float32 / float16 in RAM, or
    auto: float32 in RAM if n samples fit in ``budget`` bytes, else float16 in RAM if that
    fits, else float16 in a disk file."""
    if requested in ('float32', 'float16'):
        return getattr(torch, requested), False
    if per_sample_fp32 * n <= budget:
        return torch.float32, False
    return torch.float16, per_sample_fp32 // 2 * n > budget


def make_stores(args, model, input_shape, n_train, n_test, base, say=print, rank=0, world=1,
                device=torch.device('cpu')):
    """Train and test VectorStores, sized and typed by --store_dtype / --store_backing /
    --indices. Refuses (UserError) before training when the store cannot fit. On a GPU the
    store lives in GPU memory when it fits in half the free memory (auto) or when asked
    (device). A disk store is one file per split shared by all processes of a node (rank 0
    creates it)."""
    shapes = layer_input_shapes(bound_structure(model), input_shape)
    keys = store_keys(getattr(args, 'indices', None), shapes)
    per32 = VectorStore.bytes_per_sample(shapes, keys, torch.float32)
    plan = plan_store(per32, n_train + n_test, args.store_dtype, args.store_backing, device)
    path = base + '_store' if plan.place == 'disk' else None
    where = {'disk': f"disk files {path}_{{train,test}}.bin", 'ram': "RAM",
             'device': f"{device} memory"}[plan.place]
    say(f"vector store: {per32 // 4} floats per sample x {n_train + n_test} samples, "
        f"{str(plan.dtype).replace('torch.', '')} in {where}: {plan.total / 2 ** 30:.2f} GiB "
        f"({plan.room}); {store_saving(args, plan.place, base, world)}", flush=True)
    if plan.place == 'device':
        if plan.total > 2 * plan.budget:
            raise UserError(f"the vector store needs {plan.total / 2 ** 30:.1f} GiB of GPU "
                            f"memory but only {2 * plan.budget / 2 ** 30:.1f} GiB are free; use "
                            f"--store_dtype float16, --store_backing ram or fewer --indices")
    else:
        check_store_fits(plan.total, path, plan.budget * 2 // world)
    store_device = device if plan.place == 'device' else torch.device('cpu')

    def build():
        return tuple(VectorStore(shapes, n, plan.dtype, path and f"{path}_{split}.bin", keys,
                                 store_device)
                     for n, split in ((n_train, 'train'), (n_test, 'test')))

    if path is None or world == 1:
        return build()
    stores = build() if rank == 0 else None     # rank 0 creates the shared files,
    dist.barrier()                               # the others open them once they exist
    return stores if rank == 0 else build()


def store_saving(args, place: str, base: str, world: int = 1) -> str:
    """Whether and where the vector store of a run is saved for --resume, in words."""
    if args.no_save or args.no_save_vectors:
        why = ('--no_save' if args.no_save else
               '--no_save_vectors: --resume restarts the vectors from random')
        return f"not saved ({why})" + ('; its disk files are scratch' if place == 'disk' else '')
    file = f"{base}_vectors.pt" if world == 1 else f"{base}_vectors.rank<r>.pt (one per process)"
    if place == 'disk':
        return f"the disk files are updated in place, {file} saved every epoch for --resume"
    return f"saved every epoch to {file} for --resume"


def store_keys(indices, shapes) -> Optional[list]:
    """The layer keys of --indices (a comma list; None when empty: every stored layer),
    each checked against ``shapes`` (the layers with stored vectors)."""
    if not indices:
        return None
    keys = [int(k) for k in str(indices).split(',') if k != '']
    bad = [k for k in keys if k not in shapes]
    if bad:
        raise UserError(f"--indices {bad} are not affine layers with stored vectors; "
                        f"choose from {sorted(shapes)}")
    return keys


@dataclass
class StorePlan:
    """Where and how the vector store lives."""
    dtype: torch.dtype
    place: str          # 'ram', 'disk' or 'device' (the GPU's memory)
    total: int          # bytes of both splits
    budget: int         # half the available RAM, or half the free GPU memory ('device')
    room: str           # that budget, in words


def plan_store(per32: int, n: int, store_dtype: str, backing: str, device) -> StorePlan:
    """The plan for n samples of ``per32`` float32 bytes each: --store_dtype / --store_backing
    (auto: the GPU's memory when training on one and it fits in half the free memory, else
    choose_store's RAM or disk)."""
    budget = available_ram() // 2
    on_gpu = device.type == 'cuda'
    if backing == 'device' and not on_gpu:
        raise UserError("--store_backing device needs a CUDA device (training runs on the CPU)")
    gpu_budget = torch.cuda.mem_get_info(device)[0] // 2 if on_gpu else 0
    dtype, on_disk = choose_store(per32, n, budget, store_dtype)
    place = {'auto': 'disk' if on_disk else 'ram', 'ram': 'ram', 'disk': 'disk',
             'device': 'device'}[backing]
    if on_gpu and backing in ('auto', 'device'):
        wanted = ([getattr(torch, store_dtype)] if store_dtype != 'auto'
                  else [torch.float32, torch.float16])
        fitting = [t for t in wanted if n * per32 // (4 // torch.empty((), dtype=t).element_size())
                   <= gpu_budget]
        if fitting or backing == 'device':
            dtype, place = (fitting or wanted)[0], 'device'
    total = n * per32 // (1 if dtype == torch.float32 else 2)
    if place == 'device':
        return StorePlan(dtype, place, total, gpu_budget,
                         f"half the free GPU memory is {gpu_budget / 2 ** 30:.1f} GiB")
    return StorePlan(dtype, place, total, budget,
                     f"half the available RAM is {budget / 2 ** 30:.1f} GiB")


def check_store_fits(total, path, ram_available):
    """UserError unless ``total`` bytes fit: in RAM (this process's share) or on disk."""
    if path is None and total > ram_available:
        raise UserError(f"the vector store needs {total / 2 ** 30:.1f} GiB of RAM but only "
                        f"{ram_available / 2 ** 30:.1f} GiB are available to this process; use "
                        f"--store_dtype float16, --store_backing disk or fewer --indices")
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if total > free:
            raise UserError(f"the vector store needs {total / 2 ** 30:.1f} GiB of disk in {folder} "
                            f"but only {free / 2 ** 30:.1f} GiB are free; use fewer --indices or "
                            f"another --prefix location")


# ----------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    """The switches of the certified step (``step_settings`` reads them from the flags)."""
    sniter: int                      # per-sample and global power iterations (--sniter)
    opt_iter: int                    # worst-case-logit rounds (--opt_iter)
    bound: str = 'local'             # 'local' or 'global'
    pi_grad: str = 'all'             # gradients through every power iteration, or the last
    estimate: str = 'bilinear'       # the spectral-norm estimate
    gloro: bool = False              # the GloRo loss instead of BCP's
    sparse: float = 0.0              # weight of the sparsity loss (TinyImageNet)
    sp_thres: float = 0.1            # its threshold term's weight
    compile: bool = False            # torch.compile'd (sync-free loops)


def step_settings(args) -> StepSettings:
    """The StepSettings of the training flags in ``args``."""
    return StepSettings(args.sniter, args.opt_iter, args.bound, args.pi_grad, args.estimate,
                        args.gloro, args.sparse, args.sp_thres, args.compile)


class StepResult(NamedTuple):
    """certified_step's result (a named tuple: torch.compile returns it as it is)."""
    loss: torch.Tensor               # 0-dim: kappa CE + (1 - kappa) robust (BCP) or robust
    clean: torch.Tensor              # 0-dim clean cross-entropy
    robust: torch.Tensor             # 0-dim cross-entropy on the worst-case logits
    logits: torch.Tensor             # [batch, classes]
    not_certified: torch.Tensor      # 0-dim count
    lip_ratio: torch.Tensor          # 0-dim sum over the batch of local / global bound
    varying: dict                    # activation index -> 0-dim summed fraction varying
    vectors: dict                    # affine index -> final vectors [batch, *in_shape]


def certified_step(model, x, y, eps, kappa, given, global_vectors,
                   settings: StepSettings) -> StepResult:
    """The certified part of a training step: the bound from the ``given`` starting vectors
    {affine index: [batch, *in_shape]} and the training loss (what --compile compiles).
    x [batch, *input_shape], y [batch], eps: the L2 radius (float), kappa: the CE weight;
    ``global_vectors`` is updated in place."""
    s = settings
    vectors = GivenVectors(given)
    res = compute_bound(model, x, y, eps, vectors, global_vectors, sniter=s.sniter,
                        opt_iter=s.opt_iter, bound=s.bound, pi_grad=s.pi_grad,
                        estimate=s.estimate, reference_nan=True, sync_free=s.compile)
    sp = sparsity_loss(model, res, s.sp_thres) if s.sparse else None
    loss, clean, rob = certified_loss(res, y, kappa, s.gloro, sp, s.sparse)
    with torch.no_grad():   # the paper's training figures: local / global bound, sparsity
        rerr = (~res.certified(y)).sum()
        ratio = (res.r_local / res.r_global.clamp_min(FLOOR)).sum()
        varying = {k: d.flatten(1).mean(1).sum() for k, d in res.masks.items()}
    return StepResult(loss, clean, rob, res.logits, rerr, ratio, varying, vectors.out)


def start_global_vectors(global_vectors, model, shapes, x):
    """Draw the missing global power-iteration vectors [1, *global_vector_shape] as
    compute_bound would on first use (same order, same generator), but outside compiled
    code, whose random numbers differ from eager ones."""
    layers = layer_list(model)
    for k, s in shapes.items():
        if k not in global_vectors:
            global_vectors[k] = torch.randn((1, *global_vector_shape(layers[k], s)),
                                            device=x.device, dtype=x.dtype)


GLOBAL_LINEAR_SPACE = 'output'   # checkpoints say where a linear layer's global vector lives


def resumed_global_vectors(saved, model, shapes, device, say, linear_space='output'):
    """The global vectors of a checkpoint, on ``device``. ``linear_space``: where the
    checkpoint's linear-layer vectors live; checkpoints written before they moved to the
    output space (as the reference's) say nothing and hold them in the input space: each is
    carried over as normalize(W u), the output vector the next iteration reaches from it,
    so the warm start is kept. A shape that does not fit is refused, both shapes named."""
    if linear_space not in ('input', 'output'):
        raise UserError(f"checkpoint's global vectors: unknown space {linear_space!r}")
    out, layers = {}, layer_list(model)
    for k, v in saved.items():
        k, v = int(k), v.to(device)
        convert = isinstance(layers[k], torch.nn.Linear) and linear_space == 'input'
        want = (1, *(shapes[k] if convert else global_vector_shape(layers[k], shapes[k])))
        if tuple(v.shape) != want:
            raise UserError(f"checkpoint's global vector of layer {k} has shape "
                            f"{tuple(v.shape)}, the model needs {want}")
        if convert:
            with torch.no_grad():
                w = layers[k].weight
                v = v.to(w.dtype) @ w.t()
                v = v / (v.norm() + NORM_EPS)
            say(f"layer {k}: global vector carried from the input to the output space")
        out[k] = v
    return out


def stored_step(step_fn, model, x, y, eps, kappa, vectors, shapes, global_vectors,
                settings: StepSettings) -> StepResult:
    """``step_fn`` (certified_step, maybe compiled) with its starting vectors read from
    ``vectors`` (a vector store's batch, or RandomVectors) for the layers of ``shapes``
    {affine index: in_shape}, and the final ones written back."""
    try:                                  # BatchNorm folded by the batch's statistics
        model = training_view(model, x)
    except UnsupportedModel as e:
        raise UserError(str(e)) from None
    start_global_vectors(global_vectors, model, shapes, x)
    given = {k: vectors.get(k, s) for k, s in shapes.items()}
    out = step_fn(model, x, y, eps, kappa, given, global_vectors, settings)
    for k, u in out.vectors.items():
        vectors.put(k, u)
    if settings.compile:                  # CUDA graphs reuse their outputs' memory at the
        for k in global_vectors:          # next replay: keep what outlives the step
            global_vectors[k] = global_vectors[k].clone()
        out = out._replace(loss=out.loss.clone())
    return out


_COMPILED = {}


def step_function(compiled: bool, device, backend='inductor', fullgraph=False):
    """certified_step, or when ``compiled`` (--compile) its torch.compile'd version (one per
    device type and backend; 'reduce-overhead', CUDA graphs, on CUDA). The tests compile
    with backend 'aot_eager' (no code generation: fast) and fullgraph=True (a graph break
    raises: the whole step is one graph)."""
    if not compiled:
        return certified_step
    key = (torch.device(device).type, backend, fullgraph)
    if key not in _COMPILED:
        cuda = key[0] == 'cuda' and backend == 'inductor'
        _COMPILED[key] = torch.compile(certified_step, backend=backend, fullgraph=fullgraph,
                                       mode='reduce-overhead' if cuda else None)
    return _COMPILED[key]


@dataclass
class Run:
    """A training run: what every epoch reads and updates (main builds it)."""
    args: object                     # the parsed flags (train.py is where they stop)
    model: torch.nn.Sequential
    opt: torch.optim.Optimizer
    sched: object                    # the learning-rate scheduler
    train_loader: object
    test_loader: object
    stores: tuple                    # (train, test) VectorStore
    device: torch.device
    files: 'EpochFiles'
    base: str                        # pretrained/<prefix>_<model>: its files' common start
    rank: int = 0
    world: int = 1
    writer: Optional[SummaryWriter] = None       # TensorBoard (process 0, unless --no_save)
    global_vectors: dict = field(default_factory=dict)   # affine index -> [1, ...]
    start: int = 0                   # first epoch of this process's run (resume: later)
    best_err: float = 1.0            # the reference: best only strictly below 1
    best_state: Optional[dict] = None   # --no_save: the best model, kept in memory
    say: Callable = print            # process 0 prints, the others say nothing


class _EpochLog:
    """Finiteness check, progress bar, TensorBoard and, when stdout or stderr is not a
    terminal (a log file), a progress line every --verbose batches and at least every
    PROGRESS_EVERY_S seconds, with the epoch's mean losses so far and the rate."""

    def __init__(self, run: Run, epoch: int, bar):
        self.run, self.epoch, self.bar = run, epoch, bar
        self.step0 = epoch * len(run.train_loader)
        self.t0 = self.last_line = time.monotonic()
        self.logged = bar.disable or not sys.stdout.isatty()
        self.sums, self.n = [0.0, 0.0, 0.0], 0      # (loss, clean, robust) x batch size

    def __call__(self, i, losses, eps, kappa, b):
        lv, clean, robust = losses.tolist()          # the step's losses: one host sync
        writer, verbose = self.run.writer, self.run.args.verbose
        self.sums = [s + b * v for s, v in zip(self.sums, (lv, clean, robust))]
        self.n += b
        if not math.isfinite(lv):
            raise UserError(f"loss became {lv} at epoch {self.epoch}, batch {i} (eps {eps:.4g}); "
                            f"lower --lr or check the data")
        if writer is not None:
            writer.add_scalar('train/loss', lv, self.step0 + i)
            writer.add_scalar('train/eps', eps, self.step0 + i)
            writer.add_scalar('train/kappa', kappa, self.step0 + i)
        self.bar.set_postfix(loss=f"{lv:.3f}", eps=f"{eps:.3f}", refresh=False)
        now = time.monotonic()
        if self.logged and verbose and ((i + 1) % verbose == 0
                                        or now - self.last_line >= PROGRESS_EVERY_S):
            self.last_line = now
            print(self.line(i, lv, eps, now), flush=True)

    def line(self, i, lv, eps, now) -> str:
        """'  epoch E batch i/N loss L eps e | mean loss (clean, robust) | rate, time left'."""
        loss, clean, robust = (s / max(self.n, 1) for s in self.sums)
        seconds, total = max(now - self.t0, 1e-9), len(self.bar)
        left = (total - i - 1) * seconds / (i + 1)
        return (f"  epoch {self.epoch} batch {i + 1}/{total} loss {lv:.4f} eps {eps:.4f} | "
                f"mean loss {loss:.4f} (clean {clean:.4f}, robust {robust:.4f}) | "
                f"{(i + 1) / seconds:.3g} batches/s, {self.n / seconds:.4g} samples/s, "
                f"{int(left // 60)}:{int(left % 60):02d} left")


EPOCH_KEYS = ('loss', 'clean_loss', 'robust_loss', 'clean_err', 'robust_err', 'lip_ratio')


def train_epoch(run: Run, epoch: int, first: bool = False) -> dict:
    """One epoch of ``run`` (clean before --warmup, certified after); returns the epoch's
    means over all processes: EPOCH_KEYS and varying@<activation index>."""
    args, model, device, loader = run.args, run.model, run.device, run.train_loader
    model.train()
    step_fn, settings = step_function(args.compile, device), step_settings(args)
    sums = torch.zeros(len(EPOCH_KEYS), dtype=torch.float64, device=device)   # no step syncs
    varying = {}     # activation index -> summed fraction of varying neurons (x batch size)
    n_seen, shapes, pending = 0, None, None
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None, file=sys.stderr)
    report = _EpochLog(run, epoch, bar)
    for i, (x, y, idx) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        eps, kappa = batch_eps_kappa(args, epoch, i, len(loader))
        if epoch >= args.warmup:
            if shapes is None:
                shapes = layer_input_shapes(bound_structure(model), tuple(x.shape[1:]))
            out = stored_step(step_fn, model, x, y, eps, kappa, run.stores[0].batch(idx, device),
                              shapes, run.global_vectors, settings)
            for k, v in out.varying.items():
                varying[k] = varying.get(k, 0) + v.double()
        else:
            out = _clean_step(model, x, y)
        _optimizer_step(run, out.loss)
        if first and i == 0:    # the global batch's mean loss (all processes hold equal shares)
            mean_loss = all_reduce_sum([out.loss.detach()], device, run.world)[0] / run.world
            if run.writer is not None:
                print(f"first step: loss {mean_loss:.8f} (global batch {x.shape[0] * run.world})",
                      flush=True)
        b = x.shape[0]
        n_seen += b
        with torch.no_grad():
            sums += torch.stack([out.loss.detach() * b, out.clean.detach() * b,
                                 out.robust.detach() * b, (out.logits.argmax(1) != y).sum(),
                                 out.not_certified, out.lip_ratio]).to(torch.float64)
        # the previous step's loss is read now, while this step runs on the device: one
        # host sync per step that does not drain the GPU's queue
        if pending is not None:
            report(*pending)
        pending = (i, torch.stack([out.loss, out.clean, out.robust]).detach(), eps, kappa, b)
    if pending is not None:
        report(*pending)
    return _epoch_means(sums, varying, n_seen, device, run.world)


def _clean_step(model, x, y) -> StepResult:
    """A warm-up step's numbers: cross-entropy only (no bound: NaN statistics)."""
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    nan = torch.tensor(float('nan'), device=x.device)
    return StepResult(loss, loss, loss, logits, nan, nan, {}, {})


def _optimizer_step(run: Run, loss):
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(run.model, run.world)
    run.opt.step()
    clamp_thresholds(run.model)


def _epoch_means(sums, varying, n_seen, device, world) -> dict:
    vkeys = sorted(varying)
    totals = all_reduce_sum([*sums.unbind(), *(varying[k] for k in vkeys), n_seen], device, world)
    n = max(totals[-1], 1)
    out = {k: v / n for k, v in zip(EPOCH_KEYS, totals[:len(EPOCH_KEYS)])}
    out.update({f"varying@{k}": v / n for k, v in zip(vkeys, totals[len(EPOCH_KEYS):-1])})
    return out


def out_of_time(args, run_t0, longest, device, world):
    """True when another epoch as long as the longest so far would end after --time_limit
    minutes from ``run_t0`` (never without a limit). Rank 0 decides for all processes."""
    if not args.time_limit:
        return False
    late = (time.time() - run_t0 + longest) / 60 > args.time_limit
    if distributed():
        late = all_reduce_sum([float(late) if dist.get_rank() == 0 else 0.0], device, world)[0] > 0
    return late


def average_gradients(model, world):
    if not distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(model.parameters(), grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)
        offset += g.numel()


# ----------------------------------------------------------------------------------------
# The files of an epoch, written so that a kill at any moment can be resumed exactly
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpochFiles:
    checkpoint: str      # <base>_checkpoint.pth: everything --resume needs
    best: str            # <base>_best.pth: the best model after the ramp (weights only)
    vectors: str         # <base>_vectors[.rank<r>].pt: the per-sample vector stores


def save_epoch(files: EpochFiles, state: dict, is_best: bool, vectors: Optional[dict],
               lead: bool = True):
    """Write an epoch's files in the order that keeps every moment resumable: the vector
    stores first (the previous epoch's file kept as <vectors>.prev until the checkpoint is
    written), then the best model, then the checkpoint. A kill before the checkpoint lands
    leaves the previous checkpoint and its matching vectors (.prev), so --resume repeats
    the epoch from the same state; after it, everything is of this epoch. ``vectors``
    (every process its own file) None: no vectors are written; ``lead``: this process
    writes the checkpoint and the best model."""
    prev = files.vectors + '.prev'
    if vectors is not None:
        if os.path.isfile(files.vectors):
            os.replace(files.vectors, prev)
        atomic_save(vectors, files.vectors)
    if distributed():          # every process's vectors are written before the checkpoint
        dist.barrier()
    if lead:
        if is_best:   # the best model is for evaluation: no optimiser state (small file)
            atomic_save({k: state[k] for k in ('state_dict', 'err', 'epoch', 'args',
                                               'global_vectors')}, files.best)
        atomic_save(state, files.checkpoint)
    if distributed():          # the checkpoint is written before any .prev goes
        dist.barrier()
    if vectors is not None and os.path.isfile(prev):
        os.remove(prev)


def resume_vectors(path: str, epoch: int, stores) -> bool:
    """Load the (train, test) vector stores saved with the checkpoint of ``epoch`` from
    ``path`` or, when a kill came between the two writes, from ``path``.prev. Returns
    whether they were found; otherwise warns that the vectors restart from random (the run
    then differs from an uninterrupted one). A disk-backed store holds its arrays in its
    own file, updated in place, which after a kill mid-epoch holds that epoch's vectors."""
    found = []
    for candidate in (path, path + '.prev'):
        if os.path.isfile(candidate):
            saved = safe_load(candidate, 'cpu', 'vector store')
            found.append(saved.get('epoch'))
            if saved.get('epoch') == epoch:
                for store, key in zip(stores, ('train', 'test')):
                    store.load_state_dict(saved[key])
                if any(st.path is not None for st in stores):
                    print(f"note: the disk-backed vector store {stores[0].path} is updated in "
                          f"place; if the run was killed during an epoch its vectors are from "
                          f"that epoch (valid warm starts; the resumed run is then not bitwise "
                          f"equal to an uninterrupted one)", flush=True)
                return True
    what = (f"{path} is from epoch {found[0]}" if found else f"no {path}")
    print(f"warning: {what}, the checkpoint from epoch {epoch}: power-iteration vectors "
          f"restart from random", flush=True)
    return False


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
def check_trainable(model, name, compiled=False):
    """UserError unless the bound can follow ``model`` through training: every layer
    supported (BatchNorm with running statistics: each step folds the batch's own,
    ``networks.training_view``); with ``compiled`` (--compile), no BatchNorm or Dropout
    (the step's fold is a new network every step)."""
    try:
        check_supported(bound_structure(model))
    except ValueError as e:
        raise UserError(f"--model {name}: {e}") from None
    bad = [f"{i} ({type(m).__name__})" for i, m in enumerate(layer_list(model))
           if isinstance(m, BATCHNORM + DROPOUTS)]
    if compiled and bad:
        raise UserError(f"--model {name}: --compile does not take layers {', '.join(bad)} "
                        f"(each step folds them anew); train without --compile")


RESUME_KEYS = ('optimizer', 'scheduler', 'global_vectors', 'epoch', 'best_err')


def main(argv=None, **dataset_defaults):
    """Train as the flags in ``argv`` say (the entry scripts pass their dataset defaults);
    returns the final evaluation's results (process 0; None elsewhere or when --time_limit
    stopped the run)."""
    args = argparser(argv, **dataset_defaults)
    if len(args.radii) > 1:
        raise UserError("training takes one --epsilon (several radii are for evaluate.py)")
    if args.deterministic:
        use_deterministic_kernels()
    run = start_run(args)
    finished = train_epochs(run)
    if run.writer is not None:
        run.writer.close()
    if not finished or (distributed() and _not_lead_after_training(run)):
        if distributed():
            dist.destroy_process_group()
        return None
    res = final_evaluation(run)
    if distributed():
        dist.destroy_process_group()
    return res


def start_run(args) -> Run:
    """The model, loaders, optimiser, vector stores and files of a run (resumed from its
    checkpoint with --resume), announced in the start-up lines."""
    rank, world, device = init_distributed(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    base = checkpoint_base(args.prefix, args.model)
    seed_all(args.seed)
    model = select_model(args.data, args.model, args.init).to(device)
    check_trainable(model, args.model, args.compile)
    train_loader, test_loader = get_loaders(args, rank=rank, world=world)
    opt = make_optimizer(args, model)
    stores = make_stores(args, model, tuple(train_loader.dataset[0][0].shape),
                         train_loader.n_total, test_loader.n_total, base, say, rank, world, device)
    stores[0].seed = stores[1].seed = args.seed
    files = EpochFiles(base + '_checkpoint.pth', base + '_best.pth',
                       base + ('_vectors.pt' if world == 1 else f'_vectors.rank{rank}.pt'))
    run = Run(args, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args)),
              train_loader, test_loader, stores, device, files, base, rank, world, say=say)
    if args.resume:
        resume_run(run)
    run.writer = SummaryWriter(base + '_tb') if rank == 0 and not args.no_save else None
    _announce(run)
    return run


def resume_run(run: Run):
    """Continue ``run`` from its checkpoint: model, optimiser, scheduler, global and
    per-sample vectors, epoch and best error."""
    path = run.files.checkpoint
    ckpt = load_checkpoint(path, run.model, run.device)
    lacking = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if lacking:
        raise UserError(f"{path} cannot be resumed: it lacks {', '.join(lacking)} "
                        f"(a best-model or reference-format file holds weights only)")
    run.opt.load_state_dict(ckpt['optimizer'])
    run.sched.load_state_dict(ckpt['scheduler'])
    shapes = layer_input_shapes(bound_structure(run.model),
                                tuple(run.train_loader.dataset[0][0].shape))
    run.global_vectors.update(resumed_global_vectors(
        ckpt['global_vectors'], run.model, shapes, run.device, run.say,
        ckpt.get('global_linear_space', 'input')))
    run.start, run.best_err = ckpt['epoch'] + 1, ckpt['best_err']
    resume_vectors(run.files.vectors, ckpt['epoch'], run.stores)
    run.say(f"resuming from {path} at epoch {run.start}", flush=True)


def _announce(run: Run):
    """The start-up lines: what is written where, and what is trained on what."""
    args, say = run.args, run.say
    if args.no_save:
        say("--no_save: no checkpoint, vector store or TensorBoard file is written", flush=True)
    else:
        vec_bytes = sum(st.nbytes() for st in run.stores if st.path is None)
        vec_note = ("not saved (--no_save_vectors: --resume restarts them from random)"
                    if args.no_save_vectors else f"{run.files.vectors} ({vec_bytes / 2 ** 20:.0f} "
                    f"MiB, rewritten every epoch, for --resume)")
        say(f"writing: checkpoints {run.files.checkpoint} (every epoch) and {run.files.best} "
            f"(best after the ramp); power-iteration vectors {vec_note}; TensorBoard "
            f"{run.base}_tb", flush=True)
    say(f"training {args.model} on {args.data} ({run.train_loader.n_total} train / "
        f"{run.test_loader.n_total} test from {run.train_loader.source}) on {run.world} x "
        f"{run.device}{' (' + dist.get_backend() + ')' if distributed() else ''}; checkpoints "
        f"{run.base}_*.pth", flush=True)


def train_epochs(run: Run) -> bool:
    """Every epoch from ``run.start``; False when --time_limit stopped the run early (the
    last epoch's checkpoint is saved: --resume continues)."""
    args, longest, run_t0 = run.args, 0.0, time.time()
    for epoch in range(run.start, args.epochs):
        if epoch > run.start and out_of_time(args, run_t0, longest, run.device, run.world):
            run.say(f"stopping before epoch {epoch}: --time_limit {args.time_limit:g} min would "
                    f"be exceeded (longest epoch {longest / 60:.1f} min); the checkpoint of "
                    f"epoch {epoch - 1} is saved: continue with --resume", flush=True)
            return False
        t0 = time.time()
        one_epoch(run, epoch)
        longest = max(longest, time.time() - t0)
    return True


def one_epoch(run: Run, epoch: int):
    """Train one epoch, test at the next epoch's eps, log, write the epoch's files."""
    args, t0 = run.args, time.time()
    seed_all(args.seed * 100003 + epoch)
    run.train_loader.sampler.set_epoch(epoch)
    run.stores[0].epoch = run.stores[1].epoch = epoch
    lr = run.opt.param_groups[0]['lr']
    train_means = train_epoch(run, epoch, first=(epoch == run.start))
    run.sched.step()
    eps_next, _ = epoch_eps_kappa(args, epoch + 1)
    run.model.eval()                     # BatchNorm by its running statistics
    test_cert = certify_loader(
        fold_batchnorm(run.model), run.test_loader, eps_next, run.device, store=run.stores[1],
        global_vectors=run.global_vectors, desc=f'epoch {epoch} test',
        heartbeat=run.rank == 0 and bool(args.verbose), sniter=args.test_sniter,
        opt_iter=args.test_opt_iter, bound=args.bound, estimate=args.estimate)
    n_te, correct, certified = all_reduce_sum(
        [len(test_cert.correct), test_cert.correct.sum().item(),
         test_cert.certified.sum().item()], run.device, run.world)
    clean_err, cert_err = 1 - correct / max(n_te, 1), 1 - certified / max(n_te, 1)
    ramp_over = epoch >= args.warmup + args.rampup      # the epoch after the ramp's last
    is_best = ramp_over and cert_err < run.best_err
    if is_best:
        run.best_err = cert_err
        if args.no_save:
            run.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    if run.writer is not None:
        for k, v in train_means.items():
            run.writer.add_scalar(f"train/{k}_epoch", v, epoch)
        for k, v in (('test/clean_err', clean_err), ('test/certified_err', cert_err),
                     ('test/eps', eps_next), ('lr', lr)):
            run.writer.add_scalar(k, v, epoch)
        run.writer.flush()
    if not args.no_save:
        _save(run, epoch, cert_err, is_best)
    run.say(f"epoch {epoch} | lr {lr:.2e} | train loss {train_means['loss']:.4f} clean err "
            f"{100 * train_means['clean_err']:.2f}% cert err "
            f"{100 * train_means['robust_err']:.2f}% | test @eps {eps_next:.4f}: clean err {100 * clean_err:.2f}% cert err {100 * cert_err:.2f}%"
            f"{' (best)' if is_best else ''} | {time.time() - t0:.1f}s", flush=True)


def _save(run: Run, epoch: int, cert_err: float, is_best: bool):
    """The epoch's checkpoint (everything --resume needs), best model and vector stores."""
    state = {'state_dict': run.model.state_dict(), 'err': cert_err, 'epoch': epoch,
             'optimizer': run.opt.state_dict(), 'scheduler': run.sched.state_dict(),
             'global_vectors': {k: v.cpu() for k, v in run.global_vectors.items()},
             'global_linear_space': GLOBAL_LINEAR_SPACE, 'best_err': run.best_err,
             'args': vars(run.args)}
    vectors = (None if run.args.no_save_vectors else
               {'epoch': epoch, 'train': run.stores[0].state_dict(),
                'test': run.stores[1].state_dict()})
    save_epoch(run.files, state, is_best, vectors, run.rank == 0)


def _not_lead_after_training(run: Run) -> bool:
    """Several processes: wait for all; True in the processes other than 0 (they are done)."""
    dist.barrier()
    return run.rank != 0


def final_evaluation(run: Run) -> dict:
    """Clean, PGD and certified accuracy of the best model (or the last, named) at
    --epsilon, as evaluate.py computes them, on the whole test set in process 0."""
    args, model, files = run.args, run.model, run.files
    if args.no_save:
        final = 'the best model (in memory)' if run.best_state is not None else 'the last model'
        if run.best_state is not None:
            model.load_state_dict(run.best_state)
        else:
            print("note: no epoch after the ramp certified better than 100% error, so there is "
                  "no best model; evaluating the last")
    else:
        final = files.best if os.path.isfile(files.best) else files.checkpoint
        if not os.path.isfile(final):
            raise UserError(f"no checkpoint at {final} to evaluate")
        if final == files.checkpoint:
            print("note: there is no best model (it is chosen after the ramp, on a certified "
                  "error below 100%); evaluating the last")
        load_checkpoint(final, model, run.device)
    seed_all(args.seed)
    test_loader = run.test_loader
    if run.world > 1:   # the final evaluation runs on the whole test set, in this process
        _, test_loader = get_loaders(args, train=False)
    res = full_evaluation(fold_batchnorm(model.eval()), test_loader,
                          eval_settings(args, audit=False), run.device)
    res['normalization'] = bool(args.normalization)
    print(f"final ({os.path.basename(final)}): " + summary_line(res), flush=True)
    if not args.no_save:
        run.say(f"wrote {files.checkpoint}"
                + (f" and {files.best}" if os.path.isfile(files.best) else "")
                + ("" if args.no_save_vectors else f"; vectors {files.vectors}")
                + f"; TensorBoard {run.base}_tb", flush=True)
    return res


if __name__ == '__main__':
    run_main(main)
