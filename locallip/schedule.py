"""The training schedules of the reference (docs/training.md): eps and kappa ramped over
--rampup epochs after --warmup (with the reference's within-epoch increments), and the
learning rate, constant then decaying (exp) or stepped; the optimiser."""
import bisect

import numpy as np
import torch


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


