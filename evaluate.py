"""Evaluate a checkpoint: clean error, PGD-L2 error and certified error.

    python evaluate.py --data mnist --model relux --epsilon 1.58 --test_batch_size 256 \
        --test_sniter 2000 --saved_model pretrained/relu/mnist_4C3F [--results out.json]

    # several radii, per-sample rows, soundness audit, plots, markdown table:
    python evaluate.py ... --epsilon 0.5 1.0 1.58 --out rows.tsv --audit --plots --markdown

    # the certified radius of every point (TSV columns, median, a continuous curve):
    python evaluate.py ... --radius [--certificate guaranteed] --out rows.tsv --plots

    # one's own network: --model module.path:function (returns the nn.Sequential)

Certification starts every sample from fresh random power-iteration vectors at the smallest
radius and iterates up to --test_sniter (each sample stops at tolerance 1e-3); each larger
radius starts from the previous radius's vectors (its varying sets contain the smaller
radius's; ~10x fewer iterations, same stopping rule). One propagation per radius gives
both the local bound and the global one (product of the layers' spectral norms, same box).
A sample with a NaN anywhere in its bound is NOT certified. Power iteration approaches each
spectral norm from below, so accuracy is reported twice: as the reference counts it, and
counting samples whose iterations did not converge as not certified.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from locallip.checkpoints import load_checkpoint, saved_model_path
from locallip.data import get_loaders
from locallip.errors import UserError
from locallip.evaluation import full_evaluation
from locallip.flags import eval_settings
from locallip.layers import check_supported, fold_batchnorm
from locallip.models import select_model
from locallip.report import (check_expected, comparison_table, expected_results, lower_line,
                             markdown_table, radius_line, radius_lines, summary_line)
from locallip.runtime import distributed, init_distributed, run_main
from utils import argparser

AUDIT_FAILED = 3   # exit status when the audit breaks a certificate
EXPECT_FAILED = 4  # exit status when --expect numbers are not reproduced


def refuse_overwrite(args, plot_dir):
    """Stop (UserError) before any work if this run would replace an existing result:
    --results, --record, --out (unless --resume continues it) or a non-empty plot folder."""
    files = [(args.results, '--results'), (args.record, '--record')]
    if not args.resume:
        files.append((args.out, '--out'))
    for path, flag in files:
        if path and os.path.exists(path):
            raise UserError(f"{flag} {path} exists; pass --overwrite to replace it, or write "
                            f"elsewhere")
    if plot_dir and os.path.isdir(plot_dir) and os.listdir(plot_dir):
        raise UserError(f"plot folder {plot_dir} exists; pass --overwrite to replace its "
                        f"figures, or give --plot_dir elsewhere")


def main(argv=None, **defaults):
    args = argparser(argv, **defaults)
    if args.compare:
        named = {}
        for item in args.compare:
            name, sep, path = item.partition('=')
            if not sep:
                raise UserError(f"--compare wants NAME=results.json, got {item!r}")
            try:
                with open(path) as f:
                    named[name] = json.load(f)
            except FileNotFoundError:
                raise UserError(f"--compare: no {path} (run the evaluation with --results first)")
        print(comparison_table(named))
        return named
    if args.saved_model is None:
        raise UserError("--saved_model P is required (loads P_best.pth, or the file P)")
    if args.resume and not args.out:
        raise UserError("evaluate.py --resume continues the --out TSV of an interrupted run; "
                        "give --out")
    plot_dir = args.plot_dir or (os.path.splitext(args.out)[0] + '_plots'
                                 if args.plots and args.out else None)
    if (args.plots or args.plot_dir) and not args.out:
        raise UserError("--plots / --plot_dir need --out (the plots are drawn from its rows)")
    rank, world, device = init_distributed(args.cpu, args.cuda_ids, args.dist_backend)
    try:
        return evaluate(args, plot_dir, rank, world, device)
    finally:
        if distributed():
            dist.destroy_process_group()


def evaluate(args, plot_dir, rank, world, device):
    """The evaluation of ``main`` in process ``rank`` of ``world`` (torchrun; 0 of 1 without):
    every process certifies its share of the batches, process 0 writes and prints."""
    if not args.overwrite:
        refuse_overwrite(args, plot_dir)
    if world > 1:
        dist.barrier()        # every process has checked before process 0 writes anything
    model, path, epoch = load_for_evaluation(args, device)
    _, test_loader = get_loaders(args, train=False)
    torch.manual_seed(args.seed)
    if rank == 0:
        print(header_line(args, path, epoch, test_loader, world, device), flush=True)
    t0 = time.time()
    res = full_evaluation(model, test_loader, eval_settings(args), device, tsv_path=args.out,
                          resume=args.resume, rank=rank, world=world)
    if rank != 0:
        return None
    res.update(wall_seconds=time.time() - t0, checkpoint=path,
               normalization=bool(getattr(args, 'normalization', False)))
    write_outputs(args, res, plot_dir)
    print_summary(args, res)
    check_and_record(args, res)
    return res


def load_for_evaluation(args, device):
    """(model in eval mode with BatchNorm folded, on ``device``; checkpoint path; its epoch
    or '?'), every layer checked (one UserError line otherwise)."""
    model = select_model(args.data, args.model, args.init)
    path = saved_model_path(args.saved_model)
    ckpt = load_checkpoint(path, model, 'cpu')
    model.eval().to(device)      # before folding: every batch is compared with this model
    try:           # eval-mode BatchNorm folded into affine layers; every layer checked
        model = fold_batchnorm(model)
        check_supported(model)
    except ValueError as err:
        raise UserError(f"--model {args.model}: {err}") from None
    return model, path, ckpt.get('epoch', '?')


def header_line(args, path, epoch, test_loader, world, device) -> str:
    """The first line: what is evaluated, on which points, how and where."""
    radii = ' '.join(f'{e:g}' for e in args.radii)
    delta = f' (delta {args.delta:g})' if args.certificate == 'guaranteed' else ''
    where = f"{f'{world} x ' if world > 1 else ''}{device}"
    backend = f' ({dist.get_backend()})' if distributed() else ''
    return (f"evaluate: {path} (epoch {epoch}), {len(test_loader.dataset)} test points from "
            f"{test_loader.source} in {len(test_loader)} batches, radii {radii}, "
            f"{args.certificate} certificates{delta}"
            f"{', certified radius' if args.radius else ''}, test_sniter {args.test_sniter}, "
            f"PGD {args.niter} steps{', audit' if args.audit else ''}, on {where}{backend}")


def write_outputs(args, res, plot_dir):
    """The results JSON (--results), the TSV's note (--out) and the plots (--plot_dir)."""
    if args.results:
        os.makedirs(os.path.dirname(args.results) or '.', exist_ok=True)
        with open(args.results, 'w') as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.results}")
    if args.out:
        print(f"wrote {args.out} ({res['n']} rows)")
    if plot_dir:
        from locallip.plots import make_plots
        for p in make_plots(args.out, plot_dir, title=os.path.basename(args.saved_model)):
            print(f"wrote {p}")


def print_summary(args, res):
    """Per radius lines, the radius and lower-bound lines, the markdown table, the summary."""
    print('\n'.join(radius_lines(res)))
    if args.radius:
        print(radius_line(res))
    if args.lower_bound:
        print(lower_line(res))
    if args.markdown:
        print(markdown_table(res))
    print(summary_line(res))


def check_and_record(args, res):
    """--expect (exit EXPECT_FAILED when the results differ), --record, and the audit
    (exit AUDIT_FAILED when it broke a certificate)."""
    if args.expect:
        with open(args.expect) as f:
            expected = json.load(f)
        tol = expected.get('tolerance_pp', 0.5)
        bad = check_expected(res, expected, tol)
        for line in bad:
            print(f"error: {line}", file=sys.stderr)
        if bad:
            print(f"error: the results differ from {args.expect}", file=sys.stderr)
            sys.exit(EXPECT_FAILED)
        print(f"results agree with {args.expect} (within {tol} pp)")
    if args.record:
        rec = dict(expected_results(res), tolerance_pp=0.5, checkpoint=res['checkpoint'],
                   test_sniter=args.test_sniter, test_opt_iter=args.test_opt_iter)
        with open(args.record, 'w') as f:
            json.dump(rec, f, indent=1)
        print(f"wrote {args.record}")
    if args.audit and res['audit']['broken']:
        print(f"error: the audit broke {res['audit']['broken']} certified points", file=sys.stderr)
        sys.exit(AUDIT_FAILED)


if __name__ == '__main__':
    run_main(main)
