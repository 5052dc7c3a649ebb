"""Hyper-parameter defaults and the command line of the entry scripts (train_mnist.py,
train_cifar10.py, evaluate.py, TinyImagenet/): edit the defaults here. The library they run
is the package ``locallip`` (devices, processes and seeds: locallip/runtime.py).

Nothing here parses arguments or touches a device at import time.
"""
import argparse
import difflib
import sys

from locallip.errors import UserError

# ========================================================================================
# Hyper-parameter defaults (one per line, with why). The entry scripts pick a column:
# train_mnist.py / evaluate.py --data mnist|fashionmnist use MNIST, train_cifar10.py and
# --data cifar10 use CIFAR10, TinyImagenet/ uses TINYIMAGENET. Edit here to change a default.
# ========================================================================================
DEFAULTS = dict(
    batch_size=256,          # reference batch size for MNIST and CIFAR-10
    test_batch_size=256,     # certification batch; memory-bound, not accuracy-relevant
    lr=1e-3,                 # Adam, reference
    end_lr=5e-6,             # exp decay target at the last epoch (reference; its CIFAR scripts pass 1e-6)
    more=25,                 # lr constant until epoch epochs//2 + more, then decays
    seed=2019,               # reference default; everything random derives from it (per epoch)
    init=1.0,                # ReLU_x threshold init for c6f2_relux / tinyimagenet_relux
    opt_iter=1,              # worst-case-logit rounds in training (reference default)
    test_opt_iter=1000,      # rounds at test: the tightest bound, still sound at any count
    sniter=1,                # per-sample power iterations per step (scripts use 2 or 5)
    test_sniter=100,         # power iterations per test batch during training (reference)
    niter=100,               # PGD-L2 steps at the end of training / in evaluate.py
    alpha=None,              # PGD step size; None means epsilon / 4 (reference)
    starting_epsilon=0.0,    # eps at the start of the ramp (reference)
    warmup=0,                # epochs of plain cross-entropy before certified training
    sparse=0.0,              # weight of the sparsity loss (TinyImageNet uses 0.01)
    sp_thres=0.1,            # weight of the ReLU_x upper-threshold term in that loss (reference)
    n_train=0,               # use only the first N training images (0 = all); demos, CI
    n_test=0,                # use only the first N test images (0 = all)
    workers=0,               # DataLoader workers; 0 is fastest for in-memory MNIST on 2 cores
    store_dtype='auto',      # per-sample vector store: fp32 if it fits in RAM, else fp16, else disk
    delta=1e-4,              # guaranteed certificate: failure probability of each (point, radius)
    radius_rtol=1e-3,        # certified-radius search: relative bracket width at which it stops
    radius_steps=256,        # Lanczos steps of a guaranteed radius's norm bounds (fewer: looser)
    audit_restarts=2,        # audit attack restarts: 2 x 100 steps catch the broken bounds we tried
    audit_steps=100,         # steps of each audit attack
)
MNIST = dict(
    data='mnist', model='relux',
    epochs=300,              # reference MNIST schedule
    rampup=150,              # eps/kappa ramp length (epochs)
    epsilon=1.58,            # evaluation radius of the paper's MNIST table
    epsilon_train=1.58,      # the paper's script trains at 1.75 (--epsilon_train 1.75)
    augmentation=False,      # the reference never augments MNIST (no augmentation exists for it)
)
CIFAR10 = dict(
    data='cifar10', model='c6f2_relux',
    epochs=800,              # reference CIFAR-10 schedule
    warmup=20,               # 20 epochs of clean training first
    rampup=400,              # eps/kappa ramp length (epochs)
    epsilon=36 / 255,        # 0.141, the paper's CIFAR-10 radius
    epsilon_train=0.1551,    # slightly above the evaluation radius, as in the reference
    augmentation=True,       # random crop 32 pad 4 + horizontal flip
)
TINYIMAGENET = dict(
    data='tinyimagenet', model='tinyimagenet_relux',
    epochs=250, rampup=125,  # paper's TinyImageNet schedule
    batch_size=32,           # per process (the paper used 4 GPUs x 32)
    test_batch_size=32,      # 200 classes: keep the worst-case-logit tensor small
    lr=2.5e-4,               # ReLU_x; the MaxMin model used 1e-4
    epsilon=36 / 255, epsilon_train=0.16,
    sparse=0.1,              # reference TinyImageNet default (the paper's runs pass --sparse 0.01)
    end_lr=5e-7,             # reference TinyImageNet default
    store_dtype='float16',   # the reference stores TinyImageNet's per-sample vectors in half precision
    augmentation=True,       # random crop 64 pad 4 + horizontal flip
)
DATA_DEFAULTS = {'mnist': MNIST, 'fashionmnist': MNIST, 'cifar10': CIFAR10,
                 'tinyimagenet': TINYIMAGENET}


# ========================================================================================
# Command line (flag names and meanings of the reference release)
# ========================================================================================
# The range of every numeric flag that has one, as an interval ('[' / ']' include the end,
# '(' / ')' exclude it). A value outside is one `error:` line (exit 2) when the command line is
# parsed, not a traceback later on. The flag table in docs/training.md shows them.
RANGES = {
    'n_train': '[0, inf)', 'n_test': '[0, inf)', 'workers': '[0, inf)',
    'batch_size': '[1, inf)', 'test_batch_size': '[1, inf)', 'epochs': '[0, inf)',
    'lr': '(0, inf)', 'momentum': '[0, inf)', 'weight_decay': '[0, inf)',
    'step_size': '[1, inf)', 'gamma': '(0, inf)', 'end_lr': '(0, inf)', 'warmup': '[0, inf)',
    'rampup': '[0, inf)', 'epsilon': '[0, inf)', 'epsilon_train': '[0, inf)',
    'starting_epsilon': '[0, inf)', 'schedule_length': '[0, inf)', 'kappa': '[0, 1]',
    'starting_kappa': '[0, 1]', 'kappa_schedule_length': '[0, inf)', 'init': '(0, inf)',
    'sniter': '[1, inf)', 'test_sniter': '[1, inf)', 'opt_iter': '[1, inf)',
    'test_opt_iter': '[1, inf)', 'sparse': '[0, inf)', 'sp_thres': '[0, inf)',
    'niter': '[0, inf)', 'alpha': '[0, inf)', 'audit_restarts': '[1, inf)',
    'audit_steps': '[1, inf)', 'radius_rtol': '(0, 1)', 'radius_steps': '[2, inf)',
    'delta': '(0, 1)',
    'verbose': '[0, inf)', 'time_limit': '[0, inf)', 'seed': '[0, 4294967295]',
}


def in_range(value, interval: str) -> bool:
    """Whether ``value`` lies in ``interval`` ('[0, inf)', '(0, 1)', ...); NaN never does."""
    low, high = (float(t) for t in interval[1:-1].split(','))
    above = value > low if interval[0] == '(' else value >= low
    below = value < high if interval[-1] == ')' else value <= high
    return bool(above and below)


def _check_ranges(args):
    for name, interval in RANGES.items():
        values = getattr(args, name)
        for v in (values if isinstance(values, list) else [values]):
            if v is not None and not in_range(v, interval):
                raise UserError(f"--{name} must be in {interval}, got {v:g}")


def argparser(argv=None, **overrides):
    """Parse the command line. Defaults: DEFAULTS, then the dataset column chosen by
    ``--data`` (or ``overrides['data']``), then ``overrides`` (the entry script's)."""
    pre = FlagParser(add_help=False)
    pre.add_argument('--data', default=overrides.get('data', 'mnist'))
    known, _ = pre.parse_known_args(argv)
    return parse(make_parser(known.data, overrides), argv)


class FlagParser(argparse.ArgumentParser):
    """argparse with a short answer to a bad command line: the error, the closest flag to
    each unknown one ('did you mean --epsilon?'), and one usage line pointing to --help
    instead of the whole usage. Exit status 2, as argparse; abbreviations stay accepted."""

    def error(self, message):
        hint = closest_flags(message, list(self._option_string_actions))
        self.exit(2, f"{self.prog}: error: {message}{hint}\n"
                     f"usage: {self.prog} [--flag VALUE ...]; {self.prog} --help lists them\n")


def closest_flags(message: str, flags: list) -> str:
    """' (did you mean --epsilon?)' for the unknown flags argparse's ``message`` names, those
    that have a close one among ``flags``; '' for any other message."""
    prefix = 'unrecognized arguments: '
    if not message.startswith(prefix):
        return ''
    unknown = [a.split('=')[0] for a in message[len(prefix):].split() if a.startswith('--')]
    close = {a: difflib.get_close_matches(a, flags, n=1) for a in unknown}
    close = {a: m[0] for a, m in close.items() if m}
    if len(close) == 1:
        return f" (did you mean {next(iter(close.values()))}?)"
    return (" (did you mean " + ", ".join(f"{m} for {a}" for a, m in close.items()) + "?)"
            if close else '')


def make_parser(data='mnist', overrides=None) -> argparse.ArgumentParser:
    """The argument parser with the defaults of dataset column ``data``, then ``overrides``
    (the entry script's, e.g. {'data': 'cifar10'})."""
    d = dict(DEFAULTS)
    d.update(DATA_DEFAULTS.get(data, MNIST))
    d.update(overrides or {})

    p = FlagParser(description="Local-Lip: certified training and evaluation "
                   "with local Lipschitz bounds (L2).")
    _data_flags(p.add_argument_group('data and model').add_argument, d)
    _schedule_flags(p.add_argument_group('optimisation and schedule').add_argument, d)
    _bound_flags(p.add_argument_group('the bound and PGD').add_argument, d)
    _evaluation_flags(p.add_argument_group('evaluate.py').add_argument, d)
    _output_flags(p.add_argument_group('evaluate.py outputs').add_argument)
    _run_flags(p.add_argument_group('files, devices and runs').add_argument)
    _reference_flags(p.add_argument_group("the reference's other flags").add_argument)
    return p


def _data_flags(flag, d):
    """The dataset, its loading and the architecture."""
    flag('--data', default=d['data'], help="dataset: mnist, fashionmnist, cifar10, tinyimagenet")
    flag('--data_dir', default=None, help="where datasets live / are downloaded (default data/; "
         "--data fashionmnist without --data_dir also reads the Debian package "
         "dataset-fashion-mnist). A given folder must hold the dataset or get it by download: "
         "'system' names the package's copy. The start-up line names the folder read")
    flag('--no_download', action='store_true', help="never try to download a missing dataset")
    flag('--model', default=d['model'], help="architecture, e.g. relux, standrelu, c6f2_relux, "
         "c6f2_clmaxmin, res4c3f (not in the reference: 4C3F's layers in two residual blocks; "
         "see models.MODELS), or an import path module.path:function to a function returning "
         "one's own network: an nn.Sequential, or an nn.Module with residual additions read "
         "by torch.fx (checkpoints are then named after the function and hold the module's "
         "own state_dict keys)")
    flag('--init', type=float, default=d['init'], help="initial ReLU_x threshold for c6f2_relux "
         "and tinyimagenet_relux (the 4C3F relux models start at 1.0, as in the reference)")
    flag('--no_augmentation', action='store_true', default=not d['augmentation'],
         help="disable data augmentation (CIFAR-10: random crop 32 pad 4 + flip; TinyImageNet: "
         "crop 64 pad 4 + flip; MNIST is never augmented, as in the reference)")
    flag('--normalization', action='store_true', help="normalise inputs in the loader, as the "
         "reference: CIFAR-10 and TinyImageNet mean (0.485, 0.456, 0.406), std 0.225 (MNIST: no "
         "effect). eps, the certificates and PGD are then in the normalised input space")
    flag('--drop_last', action='store_true', help="drop the last incomplete training batch")
    flag('--no_shuffle', action='store_true', help="do not shuffle the training set")
    flag('--n_train', type=int, default=d['n_train'],
         help="use the first N training images (0 = all)")
    flag('--n_test', type=int, default=d['n_test'], help="use the first N test images (0 = all)")
    flag('--workers', type=int, default=d['workers'], help="DataLoader worker processes")


def _schedule_flags(flag, d):
    """Optimiser, learning rate, eps and kappa ramps, seed."""
    flag('--batch_size', type=int, default=d['batch_size'], help="training batch size")
    flag('--test_batch_size', type=int, default=d['test_batch_size'], help="evaluation batch size")
    flag('--epochs', type=int, default=d['epochs'], help="number of training epochs")
    flag('--lr', type=float, default=d['lr'], help="learning rate")
    flag('--opt', choices=('adam', 'sgd'), default='adam', help="optimiser: Adam, or SGD with "
         "--momentum and --weight_decay (reference)")
    flag('--momentum', type=float, default=0.9, help="SGD momentum (--opt sgd)")
    flag('--weight_decay', type=float, default=0.0, help="SGD weight decay (--opt sgd)")
    flag('--lr_scheduler', choices=('exp', 'step', 'multistep'), default='exp', help="exp: lr "
         "constant until epoch epochs//2 + more, then exponential to --end_lr at the last epoch; "
         "step: x --gamma every --step_size epochs counted from the ramp's last epoch; multistep: "
         "x --gamma at each epoch of --wd_list, counted the same way (reference)")
    flag('--step_size', type=int, default=10, help="epochs per lr step (--lr_scheduler step)")
    flag('--gamma', type=float, default=0.5, help="lr factor per step (step, multistep)")
    flag('--wd_list', type=int, nargs='+', default=None, help="milestones (epochs after the "
         "ramp) of --lr_scheduler multistep")
    flag('--end_lr', type=float, default=d['end_lr'], help="learning rate reached at the last "
         "epoch by exponential decay starting at epoch epochs//2 + more")
    flag('--more', type=int, default=d['more'], help="lr decay starts at epoch epochs//2 + more")
    flag('--warmup', type=int, default=d['warmup'], help="epochs of clean training first")
    flag('--rampup', type=int, default=d['rampup'], help="epochs over which eps and kappa ramp")
    flag('--epsilon', type=float, nargs='+', default=[d['epsilon']], help="L2 radius for "
         "evaluation (and the within-epoch eps increment, as in the reference); evaluate.py "
         "takes several radii, the first is the primary one (PGD, margins, sparsity)")
    flag('--epsilon_train', type=float, default=d['epsilon_train'], help="L2 radius reached by "
         "the training ramp")
    flag('--starting_epsilon', type=float, default=d['starting_epsilon'], help="eps at ramp start")
    flag('--schedule_length', type=int, default=None, help="eps ramp length in epoch (default and "
         "whenever --rampup is non-zero: --rampup, as the reference)")
    flag('--kappa', type=float, default=0.0, help="final weight of the clean loss (BCP loss)")
    flag('--starting_kappa', type=float, default=1.0, help="weight of the clean loss at ramp start")
    flag('--kappa_schedule_length', type=int, default=None, help="kappa ramp length (default and "
         "whenever --rampup is non-zero: --rampup)")
    flag('--epsilon_pgd', type=float, default=None, help="accepted for the reference's command "
         "line, which parses it but attacks at --epsilon; so does this code (ignored)")
    flag('--seed', type=int, default=d['seed'], help="random seed")


def _bound_flags(flag, d):
    """The bound, its power iterations, the loss terms, the vector store and PGD."""
    flag('--bound', choices=('local', 'global'), default='local', help="'local': varying-neuron "
         "indicators from the boxes (Local-Lip); 'global': every indicator 1, the product of "
         "spectral norms (BCP-style baseline) through the same code")
    flag('--sniter', type=int, default=d['sniter'], help="power iterations per training step")
    flag('--pi_grad', choices=('all', 'last'), default='all', help="'all' (faithful): "
         "differentiate through every per-sample power iteration; 'last' (DEVIATION, faster, "
         "opt-in): iterate without gradient and differentiate only the final estimate "
         "v^T D W D u with v and u held fixed, as torch.nn.utils.spectral_norm does; changes the "
         "training gradients, not the bound")
    flag('--estimate', choices=('bilinear', 'forward'), default='bilinear', help="spectral-norm "
         "estimate of every power iteration, in training and certification: 'bilinear' "
         "(reference, v^T A u = ||A^T v|| with the last v and u); 'forward' (DEVIATION, opt-in: "
         "||A u|| after the last half-step, this project's estimate before the reference was "
         "matched; a larger certified loss and other gradients: docs/method.md)")
    flag('--compile', action='store_true', help="(not in the reference, opt-in) torch.compile "
         "the certified training step (bound and loss; on CUDA with mode 'reduce-overhead', i.e. "
         "CUDA graphs): its loops then run their full counts with the iterations after each "
         "early stop discarded on the device, the same values without host synchronisation; the "
         "first steps compile (minutes)")
    flag('--test_sniter', type=int, default=d['test_sniter'], help="max power iterations at test "
         "(each sample stops at tolerance 1e-3)")
    flag('--opt_iter', type=int, default=d['opt_iter'], help="worst-case-logit rounds in training")
    flag('--test_opt_iter', type=int, default=d['test_opt_iter'], help="worst-case-logit rounds "
         "at test")
    flag('--gloro', action='store_true', help="GloRo loss (extra 'bottom' logit) instead of BCP")
    flag('--sparse', type=float, default=d['sparse'], help="weight of the sparsity loss")
    flag('--sp_thres', type=float, default=d['sp_thres'], help="weight of the ReLU_x threshold "
         "term of the sparsity loss")
    flag('--indices', default='', help="comma list of layer keys whose per-sample vectors "
         "are stored across epochs (the module indices of a plain nn.Sequential; with residual "
         "blocks, indices into locallip.layers.layer_list; default: all affine layers but the last)")
    flag('--store_backing', choices=('auto', 'device', 'ram', 'disk'), default='auto', help="where "
         "the per-sample vectors live: 'device' in the GPU's memory (no host-device copies), RAM, "
         "or a disk file next to the checkpoint shared by all processes of a node; auto: the GPU "
         "when training on one and the store fits in half its free memory, else RAM unless even "
         "float16 does not fit in half the RAM, else disk")
    flag('--store_dtype', choices=('auto', 'float32', 'float16'), default=d['store_dtype'],
         help="dtype of the stored per-sample vectors; auto: float32 when it fits in half the "
         "available RAM, else float16, else a disk-backed float16 file")
    flag('--niter', type=int, default=d['niter'],
         help="PGD-L2 steps (the reference's attack: advertorch L2PGDAttack, summed "
         "cross-entropy, random start, inputs clipped to [0, 1])")
    flag('--alpha', type=float, default=d['alpha'], help="PGD-L2 step size (default epsilon/4)")


def _evaluation_flags(flag, d):
    """What evaluate.py certifies and attacks."""
    flag('--saved_model', default=None, help="evaluate.py: load <saved_model>_best.pth (the "
         "reference's prefix), or the checkpoint file <saved_model> itself")
    flag('--certificate', choices=('reference', 'guaranteed'), default='reference',
         help="evaluate.py: 'reference': certificates from power-iteration norm estimates "
         "(approached from below, as the reference); 'guaranteed': ALSO certificates whose every "
         "spectral norm is a Lanczos upper bound false with probability <= --delta (per point "
         "and radius, over the random starts; locallip/lanczos.py), columns certified_guaranteed@<eps>")
    flag('--delta', type=float, default=d['delta'], help="evaluate.py --certificate guaranteed: "
         "failure probability of each certificate (split over its norm bounds)")
    flag('--radius', action='store_true', help="(not in the reference) evaluate.py: also the "
         "certified radius of every point, the largest eps at which it is certified (a search "
         "over eps to --radius_rtol; with --certificate guaranteed also the guaranteed radius): "
         "TSV columns radius / radius_upper, the median in the summary, a continuous curve in "
         "the plots")
    flag('--radius_rtol', type=float, default=d['radius_rtol'], help="evaluate.py --radius: relative "
         "tolerance of the search (the point is certified at radius and not at radius_upper <= "
         "radius * (1 + rtol))")
    flag('--radius_steps', type=int, default=d['radius_steps'], help="evaluate.py --radius "
         "--certificate guaranteed: Lanczos steps of each masked-norm upper bound of the "
         "guaranteed radius (fewer: faster and looser; docs/performance.md)")
    flag('--lower_bound', action='store_true', help="(not in the reference) evaluate.py: "
         "also an empirical LOWER bound of every point's local Lipschitz constant at the first "
         "--epsilon (secant ratios raised by gradient ascent over pairs of points of the ball, "
         "and Jacobian spectral norms at its final points; locallip/tightness.py): TSV columns "
         "lower_bound / seconds_lower, the median local_bound / lower_bound in the summary, "
         "a figure of the ratio with --plots")
    flag('--audit', action='store_true', help="evaluate.py: attack every certified point inside "
         "its ball (PGD-L2 on the margin, --audit_restarts x --audit_steps, no clipping) and "
         "stop with exit status 3 if any certified prediction flips")
    flag('--audit_restarts', type=int, default=d['audit_restarts'], help="random restarts of "
         "the audit attack")
    flag('--audit_steps', type=int, default=d['audit_steps'], help="steps of each audit attack")


def _output_flags(flag):
    """What evaluate.py writes and checks."""
    flag('--results', default=None, help="evaluate.py: write a JSON summary here")
    flag('--out', default=None, help="evaluate.py: write one tab-separated row per test point "
         "here, flushed as it goes")
    flag('--plot_dir', default=None, help="evaluate.py: write the analysis PNGs here")
    flag('--plots', action='store_true', help="evaluate.py: write the PNGs to <out>_plots/ (the "
         "--out TSV's name without its extension)")
    flag('--overwrite', action='store_true', help="(not in the reference) evaluate.py: replace "
         "existing --results, --record, --out (without --resume) files and a non-empty plot "
         "folder; without it an existing one stops the run before any work (so a bundled result "
         "is never overwritten by accident)")
    flag('--markdown', action='store_true', help="evaluate.py: end with a markdown table")
    flag('--expect', default=None, help="evaluate.py: JSON of recorded clean / certified "
         "accuracies (written by --record); exit status 4 if a number differs by more than its "
         "tolerance_pp (0.5 percentage points)")
    flag('--compare', nargs='+', default=None, metavar='NAME=JSON', help="evaluate.py: only "
         "print a markdown table comparing --results files (e.g. local=a.json global=b.json)")
    flag('--record', default=None, help="evaluate.py: write the clean / certified accuracies of "
         "this evaluation as a JSON for --expect")


def _run_flags(flag):
    """Checkpoints, devices, progress and run control."""
    flag('--prefix', default=None, help="checkpoints go to pretrained/<prefix>_<model>_{best,"
         "checkpoint}.pth (default: the dataset name); an absolute path is used as is")
    flag('--resume', action='store_true', help="training: continue from "
         "<prefix>_<model>_checkpoint.pth; evaluate.py: continue the --out TSV of an interrupted "
         "run (its finished batches are kept)")
    flag('--cuda_ids', default='0',
         help="GPU to use when CUDA is available (first of a comma list)")
    flag('--cpu', action='store_true', help="run on the CPU even when CUDA is available")
    flag('--verbose', type=int, default=200, help="print a progress line every N batches when "
         "stdout or stderr is not a terminal, and at least once a minute (0: never)")
    flag('--time_limit', type=float, default=0.0, help="(not in the reference) training: stop "
         "cleanly before an epoch that would end more than this many minutes after the start "
         "(judged by the longest epoch so far), with exit status 0, so that --resume continues; "
         "for wall-clock-limited jobs. 0 = no limit")
    flag('--deterministic', action='store_true', help="(not in the reference) training: "
         "deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic without "
         "benchmarking, CUBLAS_WORKSPACE_CONFIG=:4096:8) so that CUDA runs of one --seed end on "
         "the same weights; slower on GPUs. CPU training is reproducible without it at a fixed "
         "thread count")
    flag('--no_save_vectors', action='store_true', help="training: do not write the per-sample "
         "vector store <prefix>_<model>_vectors.pt each epoch (it can be large: the start-up line "
         "gives its size); --resume then restarts the vectors from random")
    flag('--no_save', action='store_true', help="training: write no checkpoint, vector store or "
         "TensorBoard file (the final evaluation uses the best model kept in memory)")


def _reference_flags(flag):
    """Flags the reference parses and never uses (ignored), and its distributed flags
    (torchrun's environment RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR wins): accepted so
    that its scripts run."""
    flag('--project', default='debug_bcp',
         help="ignored (the reference's experiment-tracking name)")
    flag('--test_pth', default=None, help="ignored (parsed, unused by the reference)")
    flag('--print', action='store_true', help="ignored (parsed, unused by the reference)")
    flag('--real_time', action='store_true', help="ignored (parsed, unused by the reference)")
    flag('--local_rank', '--local-rank', dest='local_rank', type=int, default=-1, help="set by "
         "the old torch.distributed.launch; LOCAL_RANK from the environment wins")
    flag('--world-size', dest='world_size', type=int, default=-1, help="accepted; WORLD_SIZE "
         "from torchrun's environment wins")
    flag('--node-rank', dest='node_rank', type=int, default=0, help="accepted; torchrun's "
         "--node_rank / RANK wins")
    flag('--dist-url', dest='dist_url', default='tcp://127.0.0.1:23456', help="accepted; "
         "torchrun's MASTER_ADDR / MASTER_PORT win")
    flag('--dist-backend', dest='dist_backend', default='nccl', help="process-group backend on "
         "GPUs (nccl); CPU processes use gloo")


def parse(p: argparse.ArgumentParser, argv=None):
    """Parse ``argv`` with ``p`` (make_parser), check every range and derive the defaults
    that depend on other flags."""
    args = p.parse_args(argv)
    if args.data not in DATA_DEFAULTS:
        raise UserError(f"unknown --data {args.data!r}; choose from {', '.join(sorted(DATA_DEFAULTS))}")
    _check_ranges(args)
    args.radii = list(args.epsilon)
    args.epsilon = args.radii[0]
    if args.alpha is None:
        args.alpha = args.epsilon / 4
    if args.epsilon_pgd is None:
        args.epsilon_pgd = args.epsilon
    # the reference: a non-zero --rampup sets both schedule lengths
    if args.rampup or args.schedule_length is None:
        args.schedule_length = args.rampup
    if args.rampup or args.kappa_schedule_length is None:
        args.kappa_schedule_length = args.rampup
    if args.lr_scheduler == 'multistep' and not args.wd_list:
        raise UserError("--lr_scheduler multistep needs --wd_list (its milestone epochs)")
    if args.prefix is None:
        args.prefix = args.data
    return args


# ========================================================================================
# The flag table of docs/training.md, generated: python utils.py --flags-markdown
# ========================================================================================
def _fmt_default(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ' '.join(_fmt_default(v) for v in value)
    return '' if value is None else str(value)


def flags_markdown() -> str:
    """A markdown table of every flag of the entry scripts (train_mnist.py and evaluate.py use
    the MNIST column, train_cifar10.py CIFAR-10, TinyImagenet/ TinyImageNet): name, default
    per dataset column, range (RANGES) and help."""
    columns = (('MNIST', 'mnist'), ('CIFAR-10', 'cifar10'), ('TinyImageNet', 'tinyimagenet'))
    parsers = [make_parser(data) for _, data in columns]
    lines = ["| flag | " + " | ".join(c for c, _ in columns) + " | range | meaning |",
             "|---|" + "---|" * len(columns) + "---|---|"]
    for action in parsers[0]._actions:
        if action.dest == 'help':
            continue
        name = ', '.join(f"`{s}`" for s in action.option_strings)
        defaults = [next(a for a in p._actions if a.dest == action.dest).default for p in parsers]
        if action.choices:
            kind = '{' + ','.join(map(str, action.choices)) + '}'
        elif isinstance(action, argparse._StoreTrueAction):
            kind = 'switch'
        else:
            kind = RANGES.get(action.dest, '')
        meaning = ' '.join(action.help.split()).replace('|', '\\|').replace('%%', '%')
        lines.append(f"| {name} | " + " | ".join(_fmt_default(d) for d in defaults)
                     + f" | {kind} | {meaning} |")
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    if sys.argv[1:] != ['--flags-markdown']:
        raise SystemExit("usage: python utils.py --flags-markdown")
    sys.stdout.write(flags_markdown())
