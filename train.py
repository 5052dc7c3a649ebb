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
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data_load import get_loaders
from certify import PROGRESS_EVERY_S, certify, full_evaluation
from report import summary_line
from local_bound import (BATCHNORM, NOOPS, NORM_EPS, certified_loss, check_supported,
                         compute_bound, global_vector_shape, layer_input_shapes, sparsity_loss)
from vectors import GivenVectors, VectorStore
from checkpoints import atomic_save, checkpoint_base, load_checkpoint, safe_load
from errors import UserError
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
    shapes = layer_input_shapes(model, input_shape)
    keys = None
    if getattr(args, 'indices', None):
        keys = [int(k) for k in str(args.indices).split(',') if k != '']
        bad = [k for k in keys if k not in shapes]
        if bad:
            raise UserError(f"--indices {bad} are not affine layers with stored vectors; "
                            f"choose from {sorted(shapes)}")
    n = n_train + n_test
    per32 = VectorStore.bytes_per_sample(shapes, keys, torch.float32)
    budget = available_ram() // 2
    backing = args.store_backing
    on_gpu = device.type == 'cuda'
    if backing == 'device' and not on_gpu:
        raise UserError("--store_backing device needs a CUDA device (training runs on the CPU)")
    gpu_budget = torch.cuda.mem_get_info(device)[0] // 2 if on_gpu else 0
    dtype, on_disk = choose_store(per32, n, budget, args.store_dtype)
    place = {'auto': 'disk' if on_disk else 'ram', 'ram': 'ram', 'disk': 'disk',
             'device': 'device'}[backing]
    if on_gpu and backing in ('auto', 'device'):
        wanted = ([getattr(torch, args.store_dtype)] if args.store_dtype != 'auto'
                  else [torch.float32, torch.float16])
        fitting = [t for t in wanted if n * per32 // (4 // torch.empty((), dtype=t).element_size())
                   <= gpu_budget]
        if fitting or backing == 'device':
            dtype, place = (fitting or wanted)[0], 'device'
    total = n * per32 // (1 if dtype == torch.float32 else 2)
    path = base + '_store' if place == 'disk' else None
    where = {'disk': f"disk files {path}_{{train,test}}.bin", 'ram': "RAM",
             'device': f"{device} memory"}[place]
    room = (f"half the free GPU memory is {gpu_budget / 2 ** 30:.1f} GiB" if place == 'device'
            else f"half the available RAM is {budget / 2 ** 30:.1f} GiB")
    say(f"vector store: {per32 // 4} floats per sample x {n} samples, "
        f"{str(dtype).replace('torch.', '')} in {where}: {total / 2 ** 30:.2f} GiB ({room})",
        flush=True)
    if place == 'device':
        if total > 2 * gpu_budget:
            raise UserError(f"the vector store needs {total / 2 ** 30:.1f} GiB of GPU memory but "
                            f"only {2 * gpu_budget / 2 ** 30:.1f} GiB are free; use --store_dtype "
                            f"float16, --store_backing ram or fewer --indices")
    else:
        check_store_fits(total, path, budget * 2 // world)
    store_device = device if place == 'device' else torch.device('cpu')

    def build():
        return (VectorStore(shapes, n_train, dtype, path and path + '_train.bin', keys, store_device),
                VectorStore(shapes, n_test, dtype, path and path + '_test.bin', keys, store_device))

    if path is None or world == 1:
        return build()
    stores = build() if rank == 0 else None     # rank 0 creates the shared files,
    dist.barrier()                               # the others open them once they exist
    return stores if rank == 0 else build()


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


def certified_step(model, x, y, eps, kappa, given, global_vectors, args):
    """The certified part of a training step: the bound from the ``given`` starting vectors
    {affine index: [batch, *in_shape]} and the training loss (what --compile compiles).
    x [batch, *input_shape], y [batch], eps: the L2 radius (float), kappa: the CE weight;
    ``global_vectors`` is updated in place. Returns (loss, clean CE, robust CE, logits
    [batch, classes], number not certified (0-dim), sum of local / global bound over the
    batch (0-dim), {activation index: summed fraction of varying neurons (0-dim)}, {affine
    index: final vectors [batch, *in_shape]})."""
    vectors = GivenVectors(given)
    res = compute_bound(model, x, y, eps, vectors, global_vectors, sniter=args.sniter,
                        opt_iter=args.opt_iter, bound=args.bound, pi_grad=args.pi_grad,
                        estimate=args.estimate, reference_nan=True,
                        sync_free=getattr(args, 'compile', False))
    sp = sparsity_loss(model, res, args.sp_thres) if args.sparse else None
    loss, clean, rob = certified_loss(res, y, kappa, args.gloro, sp, args.sparse)
    with torch.no_grad():   # the paper's training figures: local / global bound, sparsity
        rerr = (~res.certified(y)).sum()
        ratio = (res.r_local / res.r_global.clamp_min(1e-30)).sum()
        varying = {k: d.flatten(1).mean(1).sum() for k, d in res.masks.items()}
    return loss, clean, rob, res.logits, rerr, ratio, varying, vectors.out


def start_global_vectors(global_vectors, model, shapes, x):
    """Draw the missing global power-iteration vectors [1, *global_vector_shape] as
    compute_bound would on first use (same order, same generator), but outside compiled
    code, whose random numbers differ from eager ones."""
    for k, s in shapes.items():
        if k not in global_vectors:
            global_vectors[k] = torch.randn((1, *global_vector_shape(model[k], s)),
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
    out = {}
    for k, v in saved.items():
        k, v = int(k), v.to(device)
        convert = isinstance(model[k], torch.nn.Linear) and linear_space == 'input'
        want = (1, *(shapes[k] if convert else global_vector_shape(model[k], shapes[k])))
        if tuple(v.shape) != want:
            raise UserError(f"checkpoint's global vector of layer {k} has shape "
                            f"{tuple(v.shape)}, the model needs {want}")
        if convert:
            with torch.no_grad():
                w = model[k].weight
                v = v.to(w.dtype) @ w.t()
                v = v / (v.norm() + NORM_EPS)
            say(f"layer {k}: global vector carried from the input to the output space")
        out[k] = v
    return out


def stored_step(step_fn, model, x, y, eps, kappa, vectors, shapes, global_vectors, args):
    """``step_fn`` (certified_step, maybe compiled) with its starting vectors read from
    ``vectors`` (a vector store's batch, or RandomVectors) for the layers of ``shapes``
    {affine index: in_shape}, and the final ones written back; returns step_fn's tuple."""
    start_global_vectors(global_vectors, model, shapes, x)
    given = {k: vectors.get(k, s) for k, s in shapes.items()}
    out = step_fn(model, x, y, eps, kappa, given, global_vectors, args)
    for k, u in out[-1].items():
        vectors.put(k, u)
    if getattr(args, 'compile', False):   # CUDA graphs reuse their outputs' memory at the
        for k in global_vectors:          # next replay: keep what outlives the step
            global_vectors[k] = global_vectors[k].clone()
        out = (out[0].clone(), *out[1:])
    return out


_COMPILED = {}


def step_function(args, device, backend='inductor', fullgraph=False):
    """certified_step, or with --compile its torch.compile'd version (one per device type
    and backend; 'reduce-overhead', CUDA graphs, on CUDA). The tests compile with
    backend 'aot_eager' (no code generation: fast) and fullgraph=True (a graph break raises:
    the whole step is one graph)."""
    if not getattr(args, 'compile', False):
        return certified_step
    key = (torch.device(device).type, backend, fullgraph)
    if key not in _COMPILED:
        cuda = key[0] == 'cuda' and backend == 'inductor'
        _COMPILED[key] = torch.compile(certified_step, backend=backend, fullgraph=fullgraph,
                                       mode='reduce-overhead' if cuda else None)
    return _COMPILED[key]


def train_epoch(model, loader, opt, args, epoch, store, global_vectors, device, writer, step0,
                world=1, first=False):
    model.train()
    step_fn = step_function(args, device)
    keys = ('loss', 'clean_loss', 'robust_loss', 'clean_err', 'robust_err', 'lip_ratio')
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)   # no per-step syncs
    varying = {}     # activation index -> summed fraction of varying neurons (x batch size)
    n_seen = 0
    n_batches = len(loader)
    certified_epoch = epoch >= args.warmup
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None, file=sys.stderr)
    pending = None
    last_line = [time.monotonic()]

    def report(i, loss, eps, kappa):
        """Finiteness check, progress bar, TensorBoard and, without a terminal, a progress
        line every --verbose batches and at least once a minute."""
        lv = loss.item()
        if not math.isfinite(lv):
            raise UserError(f"loss became {lv} at epoch {epoch}, batch {i} (eps {eps:.4g}); "
                            f"lower --lr or check the data")
        if writer is not None:
            writer.add_scalar('train/loss', lv, step0 + i)
            writer.add_scalar('train/eps', eps, step0 + i)
            writer.add_scalar('train/kappa', kappa, step0 + i)
        bar.set_postfix(loss=f"{lv:.3f}", eps=f"{eps:.3f}", refresh=False)
        now = time.monotonic()
        if bar.disable and args.verbose and ((i + 1) % args.verbose == 0
                                             or now - last_line[0] >= PROGRESS_EVERY_S):
            last_line[0] = now
            print(f"  epoch {epoch} batch {i + 1}/{n_batches} loss {lv:.4f} eps {eps:.4f}",
                  flush=True)

    shapes = None
    for i, (x, y, idx) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        eps, kappa = batch_eps_kappa(args, epoch, i, n_batches)
        if certified_epoch:
            if shapes is None:
                shapes = layer_input_shapes(model, tuple(x.shape[1:]))
            loss, clean, rob, logits, rerr, ratio, var, _ = stored_step(
                step_fn, model, x, y, eps, kappa, store.batch(idx, device), shapes,
                global_vectors, args)
            for k, v in var.items():
                varying[k] = varying.get(k, 0) + v.double()
        else:
            logits = model(x)
            loss = clean = rob = torch.nn.functional.cross_entropy(logits, y)
            rerr = torch.tensor(float('nan'), device=device)
            ratio = torch.tensor(float('nan'), device=device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, world)
        opt.step()
        clamp_thresholds(model)
        if first and i == 0:    # the global batch's mean loss (all processes hold equal shares)
            mean_loss = all_reduce_sum([loss.detach()], device, world)[0] / world
            if writer is not None:
                print(f"first step: loss {mean_loss:.8f} (global batch {x.shape[0] * world})",
                      flush=True)
        b = x.shape[0]
        n_seen += b
        with torch.no_grad():
            sums += torch.stack([loss.detach() * b, clean.detach() * b, rob.detach() * b,
                                 (logits.argmax(1) != y).sum(), rerr, ratio]).to(torch.float64)
        # the previous step's loss is read now, while this step runs on the device: one
        # host sync per step that does not drain the GPU's queue
        if pending is not None:
            report(*pending)
        pending = (i, loss.detach(), eps, kappa)
    if pending is not None:
        report(*pending)
    vkeys = sorted(varying)
    totals = all_reduce_sum([*sums.unbind(), *(varying[k] for k in vkeys), n_seen], device, world)
    n = max(totals[-1], 1)
    out = {k: v / n for k, v in zip(keys, totals[:len(keys)])}
    out.update({f"varying@{k}": v / n for k, v in zip(vkeys, totals[len(keys):-1])})
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
def check_trainable(model, name):
    """UserError unless the bound can follow ``model`` through training: no BatchNorm or
    Dropout (in training mode neither is a fixed map, so no bound computed for the step
    would hold), every layer supported."""
    bad = [f"{i} ({type(m).__name__})" for i, m in enumerate(model)
           if isinstance(m, BATCHNORM + NOOPS) and not isinstance(m, torch.nn.Identity)]
    if bad:
        raise UserError(f"--model {name}: training does not support layers {', '.join(bad)}: "
                        f"in training mode they are not fixed maps, so no certified bound of "
                        f"the step would hold (evaluation folds eval-mode BatchNorm and skips "
                        f"Dropout)")
    try:
        check_supported(model)
    except ValueError as e:
        raise UserError(f"--model {name}: {e}") from None


RESUME_KEYS = ('optimizer', 'scheduler', 'global_vectors', 'epoch', 'best_err')


def main(argv=None, **dataset_defaults):
    args = argparser(argv, **dataset_defaults)
    if len(args.radii) > 1:
        raise UserError("training takes one --epsilon (several radii are for evaluate.py)")
    if args.deterministic:
        use_deterministic_kernels()
    rank, world, device = init_distributed(args)
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    base = checkpoint_base(args.prefix, args.model)
    seed_all(args.seed)
    model = select_model(args.data, args.model, args.init).to(device)
    check_trainable(model, args.model)
    train_loader, test_loader = get_loaders(args, rank=rank, world=world)
    input_shape = tuple(train_loader.dataset[0][0].shape)
    opt = make_optimizer(args, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args))
    train_store, test_store = make_stores(args, model, input_shape, train_loader.n_total,
                                          test_loader.n_total, base, say, rank, world, device)
    train_store.seed = test_store.seed = args.seed
    global_vectors = {}
    start, best_err = 0, 1.0         # the reference: best only strictly below 1 (and later best)
    best_state = None                 # --no_save: the best model, kept in memory
    ckpt_path, best_path = base + '_checkpoint.pth', base + '_best.pth'
    store_path = base + ('_vectors.pt' if world == 1 else f'_vectors.rank{rank}.pt')
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, model, device)
        lacking = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if lacking:
            raise UserError(f"{ckpt_path} cannot be resumed: it lacks {', '.join(lacking)} "
                            f"(a best-model or reference-format file holds weights only)")
        opt.load_state_dict(ckpt['optimizer'])
        sched.load_state_dict(ckpt['scheduler'])
        global_vectors.update(resumed_global_vectors(
            ckpt['global_vectors'], model, layer_input_shapes(model, input_shape), device, say,
            ckpt.get('global_linear_space', 'input')))
        start, best_err = ckpt['epoch'] + 1, ckpt['best_err']
        resume_vectors(store_path, ckpt['epoch'], (train_store, test_store))
        say(f"resuming from {ckpt_path} at epoch {start}", flush=True)
    writer = SummaryWriter(base + '_tb') if lead and not args.no_save else None
    if args.no_save:
        say("--no_save: no checkpoint, vector store or TensorBoard file is written", flush=True)
    else:
        vec_bytes = sum(st.nbytes() for st in (train_store, test_store) if st.path is None)
        vec_note = ("not saved (--no_save_vectors: --resume restarts them from random)"
                    if args.no_save_vectors else f"{store_path} ({vec_bytes / 2 ** 20:.0f} MiB, "
                    f"rewritten every epoch, for --resume)")
        say(f"writing: checkpoints {ckpt_path} (every epoch) and {best_path} (best after the "
            f"ramp); power-iteration vectors {vec_note}; TensorBoard {base}_tb", flush=True)
    say(f"training {args.model} on {args.data} ({train_loader.n_total} train / "
        f"{test_loader.n_total} test from {train_loader.source}) on {world} x {device}"
        f"{' (' + dist.get_backend() + ')' if distributed() else ''}; checkpoints {base}_*.pth",
        flush=True)

    run_t0, longest = time.time(), 0.0
    for epoch in range(start, args.epochs):
        if epoch > start and out_of_time(args, run_t0, longest, device, world):
            say(f"stopping before epoch {epoch}: --time_limit {args.time_limit:g} min would be "
                f"exceeded (longest epoch {longest / 60:.1f} min); the checkpoint of epoch "
                f"{epoch - 1} is saved: continue with --resume", flush=True)
            if writer is not None:
                writer.close()
            if distributed():
                dist.destroy_process_group()
            return None
        seed_all(args.seed * 100003 + epoch)
        train_loader.sampler.set_epoch(epoch)
        train_store.epoch = test_store.epoch = epoch
        t0 = time.time()
        lr = opt.param_groups[0]['lr']
        tr = train_epoch(model, train_loader, opt, args, epoch, train_store, global_vectors,
                         device, writer, epoch * len(train_loader), world, first=(epoch == start))
        sched.step()
        eps_next, _ = epoch_eps_kappa(args, epoch + 1)
        te = certify(model, test_loader, eps_next, sniter=args.test_sniter,
                     opt_iter=args.test_opt_iter, device=device, store=test_store,
                     global_vectors=global_vectors, bound=args.bound, desc='test',
                     estimate=args.estimate)
        n_te, correct, certified = all_reduce_sum(
            [len(te['correct']), te['correct'].sum().item(), te['certified'].sum().item()], device, world)
        clean_err, cert_err = 1 - correct / max(n_te, 1), 1 - certified / max(n_te, 1)
        ramp_over = epoch >= args.warmup + args.rampup      # the epoch after the ramp's last
        is_best = ramp_over and cert_err < best_err
        if is_best:
            best_err = cert_err
            if args.no_save:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if lead and writer is not None:
            for k, v in tr.items():
                writer.add_scalar(f"train/{k}_epoch", v, epoch)
            writer.add_scalar('test/clean_err', clean_err, epoch)
            writer.add_scalar('test/certified_err', cert_err, epoch)
            writer.add_scalar('test/eps', eps_next, epoch)
            writer.add_scalar('lr', lr, epoch)
            writer.flush()
        if not args.no_save:
            state = {'state_dict': model.state_dict(), 'err': cert_err, 'epoch': epoch,
                     'optimizer': opt.state_dict(), 'scheduler': sched.state_dict(),
                     'global_vectors': {k: v.cpu() for k, v in global_vectors.items()},
                     'global_linear_space': GLOBAL_LINEAR_SPACE, 'best_err': best_err,
                     'args': vars(args)}
            vectors = (None if args.no_save_vectors else
                       {'epoch': epoch, 'train': train_store.state_dict(),
                        'test': test_store.state_dict()})
            save_epoch(EpochFiles(ckpt_path, best_path, store_path), state, is_best, vectors,
                       lead)
        say(f"epoch {epoch} | lr {lr:.2e} | train loss {tr['loss']:.4f} clean err "
            f"{100 * tr['clean_err']:.2f}% cert err {100 * tr['robust_err']:.2f}% | test @eps "
            f"{eps_next:.4f}: clean err {100 * clean_err:.2f}% cert err {100 * cert_err:.2f}%"
            f"{' (best)' if is_best else ''} | {time.time() - t0:.1f}s", flush=True)
        longest = max(longest, time.time() - t0)
    if writer is not None:
        writer.close()
    if distributed():
        dist.barrier()
        if not lead:
            dist.destroy_process_group()
            return None

    if args.no_save:
        final = 'the best model (in memory)' if best_state is not None else 'the last model'
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            print("note: no epoch after the ramp certified better than 100% error, so there is "
                  "no best model; evaluating the last")
    else:
        final = best_path if os.path.isfile(best_path) else ckpt_path
        if not os.path.isfile(final):
            raise UserError(f"no checkpoint at {final} to evaluate")
        if final == ckpt_path:
            print("note: there is no best model (it is chosen after the ramp, on a certified "
                  "error below 100%); evaluating the last")
        load_checkpoint(final, model, device)
    seed_all(args.seed)
    if world > 1:   # the final evaluation runs on the whole test set, in this process
        _, test_loader = get_loaders(args, train=False)
    res = full_evaluation(model, test_loader, args, device)
    res['normalization'] = bool(args.normalization)
    print(f"final ({os.path.basename(final)}): " + summary_line(res), flush=True)
    if not args.no_save:
        say(f"wrote {ckpt_path}" + (f" and {best_path}" if os.path.isfile(best_path) else "")
            + ("" if args.no_save_vectors else f"; vectors {store_path}")
            + f"; TensorBoard {base}_tb", flush=True)
    if distributed():
        dist.destroy_process_group()
    return res


if __name__ == '__main__':
    run_main(main)
