"""The one training loop of MNIST, Fashion-MNIST, CIFAR-10 and TinyImageNet.

The entry scripts (train_mnist.py, train_cifar10.py, TinyImagenet/train_tinyimagenet.py) only
choose dataset defaults, parse the flags (utils.argparser) and call ``train``. Schedule (the
reference's, docs/training.md; schedule.py): ``warmup`` epochs of plain cross-entropy, then
certified training (step.py) with eps and kappa ramped over ``rampup`` epochs (with the
reference's within-epoch increments), Adam with a constant then exponentially decaying
learning rate, certified test error after every epoch at the next epoch's eps, best (after
the ramp) and last checkpoints, and a final clean / PGD / certified evaluation of the best
model at --epsilon. Where the per-sample vectors live: storage.py.

Every epoch re-seeds all random generators from (seed, epoch), and the checkpoint holds
the model, optimiser, scheduler, power-iteration vectors and arguments, so that
``--resume`` after a killed run reaches the same result as an uninterrupted run.
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from locallip.certificates import certify_loader
from locallip.checkpoints import atomic_save, checkpoint_base, load_checkpoint, safe_load
from locallip.data import get_loaders
from locallip.errors import UserError
from locallip.evaluation import full_evaluation
from locallip.flags import eval_settings, step_settings
from locallip.layers import (BATCHNORM, DROPOUTS, bound_structure, check_supported, fold_batchnorm,
                             layer_input_shapes, layer_list)
from locallip.models import clamp_thresholds, select_model
from locallip.progress import PROGRESS_EVERY_S
from locallip.report import summary_line
from locallip.runtime import (all_reduce_sum, distributed, init_distributed, seed_all,
                              use_deterministic_kernels)
from locallip.schedule import batch_eps_kappa, epoch_eps_kappa, lr_factor, make_optimizer
from locallip.step import (GLOBAL_LINEAR_SPACE, clean_step, resumed_global_vectors,
                           step_function, stored_step)
from locallip.storage import make_stores


# ----------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------
@dataclass
class Run:
    """A training run: what every epoch reads and updates (main builds it)."""
    args: object                     # the parsed flags (utils.argparser)
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
            out = clean_step(model, x, y)
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
    ``layers.training_view``); with ``compiled`` (--compile), no BatchNorm or Dropout
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


def train(args):
    """Train as the parsed flags ``args`` say (utils.argparser: the entry scripts parse them
    with their dataset defaults); returns the final evaluation's results (process 0; None
    elsewhere or when --time_limit stopped the run)."""
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
    rank, world, device = init_distributed(args.cpu, args.cuda_ids, args.dist_backend)
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

