"""The one training loop of MNIST, Fashion-MNIST, CIFAR-10 and TinyImageNet.

The entry scripts (train_mnist.py, train_cifar10.py, TinyImagenet/train.py) only choose
dataset defaults and call ``main``. Schedule (spec section 5): ``warmup`` epochs of plain
cross-entropy, then certified training with eps and kappa ramped over ``rampup`` epochs
(with the reference's within-epoch increments), Adam with a constant then exponentially
decaying learning rate, certified test error after every epoch at the next epoch's eps,
best (after the ramp) and last checkpoints, and a final clean / PGD / certified
evaluation of the best model at --epsilon.

Every epoch re-seeds all random generators from (seed, epoch), and the checkpoint holds
the model, optimiser, scheduler, power-iteration vectors and arguments, so that
``--resume`` after a killed run reaches the same result as an uninterrupted run.
"""
import os
import sys
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data_load import get_loaders
from evaluate import certify, full_evaluation, summary_line
from local_bound import VectorStore, certified_loss, compute_bound, layer_input_shapes, sparsity_loss
from utils import (UserError, argparser, atomic_save, checkpoint_base, clamp_thresholds,
                   get_device, load_checkpoint, run_main, seed_all, select_model)


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------
def epoch_eps_kappa(args, epoch):
    """(eps, kappa) at the start of ``epoch``; eps = 0 means a clean (warmup) epoch."""
    k = epoch - args.warmup
    if k < 0:
        return 0.0, 1.0
    if k < args.rampup:
        eps = np.linspace(args.starting_epsilon, args.epsilon_train, args.rampup)[k]
        kappa = np.linspace(1, 0, args.rampup)[k]
        return float(eps), float(kappa)
    return args.epsilon_train, 0.0


def batch_eps_kappa(args, epoch, i, n_batches):
    """Within-epoch values (reference quirk kept: the eps increment uses the evaluation
    radius --epsilon, and both increments continue after the ramp)."""
    eps, kappa = epoch_eps_kappa(args, epoch)
    if epoch < args.warmup or args.rampup <= 0:
        return eps, kappa
    frac = i / n_batches
    return (eps + frac * (args.epsilon - args.starting_epsilon) / args.rampup,
            kappa + frac * (0 - 1) / args.rampup)


def lr_factor(args):
    """lr multiplier per epoch: 1 until epochs//2 + more, then exponential to end_lr."""
    start = args.epochs // 2 + args.more
    span = args.epochs - start
    gamma = (args.end_lr / args.lr) ** (1.0 / span) if span > 0 else 1.0
    return lambda e: 1.0 if e < start else gamma ** (e - start + 1)


# ----------------------------------------------------------------------------------------
# Vector stores
# ----------------------------------------------------------------------------------------
def available_ram():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
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


def make_stores(args, model, input_shape, n_train, n_test, base):
    """Train and test VectorStores, sized and typed by --store_dtype / --indices."""
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
    dtype, on_disk = choose_store(per32, n, budget, args.store_dtype)
    path = base + '_store' if on_disk else None
    total = n * per32 // (1 if dtype == torch.float32 else 2)
    where = f"disk files {path}_{{train,test}}.bin" if path else "RAM"
    print(f"vector store: {per32 // 4} floats per sample x {n} samples, "
          f"{str(dtype).replace('torch.', '')} in {where}: {total / 2 ** 30:.2f} GiB "
          f"(half the available RAM is {budget / 2 ** 30:.1f} GiB)", flush=True)
    if dtype == torch.float32 and args.store_dtype == 'float32' and total > 2 * budget:
        raise UserError(f"--store_dtype float32 needs {total / 2 ** 30:.1f} GiB, more than the "
                        f"{2 * budget / 2 ** 30:.1f} GiB available; use --store_dtype auto or float16")
    train = VectorStore(shapes, n_train, dtype, path and path + '_train.bin', keys)
    test = VectorStore(shapes, n_test, dtype, path and path + '_test.bin', keys)
    return train, test


# ----------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------
def train_epoch(model, loader, opt, args, epoch, store, global_vectors, device, writer, step0):
    model.train()
    stats = {'loss': 0.0, 'clean_loss': 0.0, 'robust_loss': 0.0, 'clean_err': 0.0,
             'robust_err': 0.0, 'n': 0}
    n_batches = len(loader)
    certified_epoch = epoch >= args.warmup
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None, file=sys.stderr)
    for i, (x, y, idx) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        eps, kappa = batch_eps_kappa(args, epoch, i, n_batches)
        if certified_epoch:
            res = compute_bound(model, x, y, eps, store.batch(idx, device), global_vectors,
                                sniter=args.sniter, opt_iter=args.opt_iter, bound=args.bound,
                                pi_grad=args.pi_grad)
            loss, clean, rob = certified_loss(res, y, kappa, args.gloro)
            if args.sparse:
                loss = loss + args.sparse * sparsity_loss(model, res, args.sp_thres)
            logits = res.logits
            rerr = (~res.certified(y)).float().sum().item()
        else:
            logits = model(x)
            loss = clean = rob = torch.nn.functional.cross_entropy(logits, y)
            rerr = float('nan')
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at epoch {epoch}, batch {i} (eps {eps:.4g}); "
                            f"lower --lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_thresholds(model)
        b = x.shape[0]
        stats['n'] += b
        stats['loss'] += loss.item() * b
        stats['clean_loss'] += clean.item() * b
        stats['robust_loss'] += rob.item() * b
        stats['clean_err'] += (logits.argmax(1) != y).float().sum().item()
        stats['robust_err'] += rerr
        if writer is not None:
            step = step0 + i
            writer.add_scalar('train/loss', loss.item(), step)
            writer.add_scalar('train/eps', eps, step)
            writer.add_scalar('train/kappa', kappa, step)
        bar.set_postfix(loss=f"{loss.item():.3f}", eps=f"{eps:.3f}")
        if bar.disable and args.verbose and (i + 1) % args.verbose == 0:
            print(f"  epoch {epoch} batch {i + 1}/{n_batches} loss {loss.item():.4f} eps {eps:.4f}",
                  flush=True)
    n = max(stats.pop('n'), 1)
    return {k: v / n for k, v in stats.items()}


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
def main(argv=None, **dataset_defaults):
    args = argparser(argv, **dataset_defaults)
    if len(args.radii) > 1:
        raise UserError("training takes one --epsilon (several radii are for evaluate.py)")
    device = get_device(args)
    base = checkpoint_base(args)
    seed_all(args.seed)
    model = select_model(args.data, args.model, args.init).to(device)
    train_loader, test_loader = get_loaders(args)
    input_shape = tuple(train_loader.dataset[0][0].shape)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args))
    train_store, test_store = make_stores(args, model, input_shape, len(train_loader.dataset),
                                          len(test_loader.dataset), base)
    global_vectors = {}
    start, best_err = 0, float('inf')
    ckpt_path, best_path, store_path = (base + '_checkpoint.pth', base + '_best.pth',
                                        base + '_vectors.pt')
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, model, device)
        opt.load_state_dict(ckpt['optimizer'])
        sched.load_state_dict(ckpt['scheduler'])
        global_vectors.update({int(k): v.to(device) for k, v in ckpt['global_vectors'].items()})
        start, best_err = ckpt['epoch'] + 1, ckpt['best_err']
        if os.path.isfile(store_path):
            saved = torch.load(store_path, map_location='cpu', weights_only=False)
            if saved['epoch'] == ckpt['epoch']:
                train_store.load_state_dict(saved['train'])
                test_store.load_state_dict(saved['test'])
            else:
                print(f"warning: {store_path} is from epoch {saved['epoch']}, the checkpoint "
                      f"from epoch {ckpt['epoch']}: power-iteration vectors restart from random")
        else:
            print(f"warning: no {store_path}: power-iteration vectors restart from random")
        print(f"resuming from {ckpt_path} at epoch {start}", flush=True)
    writer = SummaryWriter(base + '_tb')
    print(f"training {args.model} on {args.data} ({len(train_loader.dataset)} train / "
          f"{len(test_loader.dataset)} test) on {device}; checkpoints {base}_*.pth", flush=True)

    for epoch in range(start, args.epochs):
        seed_all(args.seed * 100003 + epoch)
        train_loader.generator.manual_seed(args.seed * 100003 + epoch)
        t0 = time.time()
        lr = opt.param_groups[0]['lr']
        tr = train_epoch(model, train_loader, opt, args, epoch, train_store, global_vectors,
                         device, writer, epoch * len(train_loader))
        sched.step()
        eps_next, _ = epoch_eps_kappa(args, epoch + 1)
        te = certify(model, test_loader, eps_next, sniter=args.test_sniter,
                     opt_iter=args.test_opt_iter, device=device, store=test_store,
                     global_vectors=global_vectors, bound=args.bound, desc='test')
        clean_err = 1 - te['correct'].float().mean().item()
        cert_err = 1 - te['certified'].float().mean().item()
        ramp_over = epoch + 1 >= args.warmup + args.rampup
        is_best = ramp_over and cert_err <= best_err
        if is_best:
            best_err = cert_err
        for k, v in tr.items():
            writer.add_scalar(f"train/{k}_epoch", v, epoch)
        writer.add_scalar('test/clean_err', clean_err, epoch)
        writer.add_scalar('test/certified_err', cert_err, epoch)
        writer.add_scalar('test/eps', eps_next, epoch)
        writer.add_scalar('lr', lr, epoch)
        writer.flush()
        state = {'state_dict': model.state_dict(), 'err': cert_err, 'epoch': epoch,
                 'optimizer': opt.state_dict(), 'scheduler': sched.state_dict(),
                 'global_vectors': {k: v.cpu() for k, v in global_vectors.items()},
                 'best_err': best_err, 'args': vars(args)}
        atomic_save({'epoch': epoch, 'train': train_store.state_dict(),
                     'test': test_store.state_dict()}, store_path)
        atomic_save(state, ckpt_path)
        if is_best:   # the best model is for evaluation: no optimiser state (small file)
            atomic_save({k: state[k] for k in ('state_dict', 'err', 'epoch', 'args',
                                               'global_vectors')}, best_path)
        print(f"epoch {epoch} | lr {lr:.2e} | train loss {tr['loss']:.4f} clean err "
              f"{100 * tr['clean_err']:.2f}% cert err {100 * tr['robust_err']:.2f}% | test @eps "
              f"{eps_next:.4f}: clean err {100 * clean_err:.2f}% cert err {100 * cert_err:.2f}%"
              f"{' (best)' if is_best else ''} | {time.time() - t0:.1f}s", flush=True)
    writer.close()

    final = best_path if os.path.isfile(best_path) else ckpt_path
    if not os.path.isfile(final):
        raise UserError(f"no checkpoint at {final} to evaluate")
    if final == ckpt_path:
        print("note: the ramp did not finish, so there is no best model; evaluating the last")
    load_checkpoint(final, model, device)
    seed_all(args.seed)
    res = full_evaluation(model, test_loader, args, device)
    print(f"final ({os.path.basename(final)}): " + summary_line(res), flush=True)
    return res


if __name__ == '__main__':
    run_main(main)
