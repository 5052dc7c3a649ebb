"""Every flag of the reference's command line with its reference default, the reference's
own command lines, and its learning-rate schedulers epoch by epoch."""
import pytest
import torch

from locallip.errors import UserError
from locallip.schedule import lr_factor, make_optimizer
from utils import argparser

# flag -> reference default, root scripts (train_mnist.py / train_cifar10.py / evaluate.py)
ROOT = {
    'project': 'debug_bcp', 'sniter': 1, 'opt_iter': 1, 'no_save': False, 'test_pth': None,
    'print': False, 'real_time': False, 'opt': 'adam', 'momentum': 0.9, 'weight_decay': 0.0,
    'lr': 1e-3, 'end_lr': 5e-6, 'lr_scheduler': 'exp', 'step_size': 10, 'gamma': 0.5,
    'wd_list': None, 'more': 25, 'test_sniter': 100, 'test_opt_iter': 1000, 'niter': 100,
    'starting_epsilon': 0.0, 'kappa': 0.0, 'starting_kappa': 1.0, 'gloro': False,
    'init': 1.0, 'seed': 2019, 'verbose': 200, 'cuda_ids': '0', 'batch_size': 256,
    'test_batch_size': 256, 'normalization': False, 'drop_last': False, 'no_shuffle': False,
    'saved_model': None, 'local_rank': -1, 'world_size': -1, 'node_rank': 0,
    'dist_backend': 'nccl',
}
# dataset columns: (epochs, warmup, rampup, epsilon, epsilon_train, no_augmentation)
COLUMNS = {'mnist': (300, 0, 150, 1.58, 1.58, True),
           'cifar10': (800, 20, 400, 36 / 255, 0.1551, False),
           'tinyimagenet': (250, 0, 125, 36 / 255, 0.16, False)}
TINY = dict(ROOT, batch_size=32, test_batch_size=32, lr=2.5e-4, end_lr=5e-7, sparse=0.1,
            sp_thres=0.1, indices='')


@pytest.mark.parametrize('data', sorted(COLUMNS))
def test_every_reference_flag_has_its_default(data):
    a = argparser([], data=data)
    want = TINY if data == 'tinyimagenet' else ROOT
    for flag, value in want.items():
        got = getattr(a, flag)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, flag
    epochs, warmup, rampup, eps, eps_train, no_aug = COLUMNS[data]
    assert (a.epochs, a.warmup, a.rampup, a.no_augmentation) == (epochs, warmup, rampup, no_aug)
    assert a.epsilon == pytest.approx(eps) and a.epsilon_train == pytest.approx(eps_train)
    # derived defaults: schedule lengths = rampup, PGD radius and step from --epsilon
    assert a.schedule_length == a.kappa_schedule_length == rampup
    assert a.epsilon_pgd == a.epsilon and a.alpha == pytest.approx(a.epsilon / 4)


def test_every_flag_has_help():
    import argparse

    import utils
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured['parser'] = self
        return real(self, *a, **k)
    argparse.ArgumentParser.parse_args = grab
    try:
        utils.argparser([])
    finally:
        argparse.ArgumentParser.parse_args = real
    actions = [x for x in captured['parser']._actions if x.dest != 'help']
    assert len(actions) > 60
    assert not [x.dest for x in actions if not x.help], "flags without help="


def test_rampup_sets_both_schedule_lengths():
    a = argparser(['--rampup', '7', '--schedule_length', '3', '--kappa_schedule_length', '4'])
    assert (a.schedule_length, a.kappa_schedule_length) == (7, 7)
    a = argparser(['--rampup', '0', '--schedule_length', '3', '--kappa_schedule_length', '4'])
    assert (a.schedule_length, a.kappa_schedule_length) == (3, 4)
    with pytest.raises(UserError, match='--wd_list'):
        argparser(['--lr_scheduler', 'multistep'])


COMMANDS = [
    # (entry script's data, command line, expected settings)
    ('mnist', "--model relux --sniter 5 --init 2.0 --epsilon_train 1.75 --gloro --no_augmentation "
              "--opt_iter 10 --prefix relu/mnist_4C3F",
     dict(model='relux', sniter=5, init=2.0, epsilon_train=1.75, gloro=True, opt_iter=10,
          prefix='relu/mnist_4C3F', epochs=300, rampup=150, warmup=0, epsilon=1.58)),
    ('cifar10', "--model relux --sniter 2 --init 2.0 --end_lr 1e-6",
     dict(model='relux', sniter=2, end_lr=1e-6, epochs=800, warmup=20, rampup=400,
          no_augmentation=False, gloro=False)),
    ('cifar10', "--model c6f2_relux --sniter 2 --init 2.0 --end_lr 1e-6 --prefix relu/cifar_6C2F",
     dict(model='c6f2_relux', init=2.0, prefix='relu/cifar_6C2F')),
    ('cifar10', "--model c6f2_relux --sniter 2 --init 2.0 --end_lr 1e-6 --gloro",
     dict(model='c6f2_relux', gloro=True)),
    ('cifar10', "--model c6f2_clmaxmin --sniter 2 --end_lr 1e-6 --prefix maxmin/cifar_6C2F_maxmin",
     dict(model='c6f2_clmaxmin', prefix='maxmin/cifar_6C2F_maxmin', epsilon_train=0.1551)),
    # TinyImageNet (the reference launched these with torch.distributed.launch, which adds
    # --local_rank=N; torchrun replaces it)
    ('tinyimagenet', "--local_rank=0 --model tinyimagenet_relux --sniter 1 --init 2.0 --epochs 250 "
                     "--rampup 125 --warmup 0 --batch_size 32 --epsilon_train 0.16 --lr 2.5e-4 "
                     "--lr_scheduler exp --sparse 0.01 --indices 0,6,12,14,17",
     dict(model='tinyimagenet_relux', sniter=1, lr=2.5e-4, lr_scheduler='exp', sparse=0.01,
          sp_thres=0.1, indices='0,6,12,14,17', end_lr=5e-7, store_dtype='float16', local_rank=0)),
    ('tinyimagenet', "--local-rank=3 --model tiny_clmaxmin --sniter 3 --epochs 250 --rampup 125 "
                     "--warmup 0 --batch_size 32 --epsilon_train 0.16 --lr 1e-4 --lr_scheduler exp "
                     "--sparse 0.01 --indices 0,6,12,14,17",
     dict(model='tiny_clmaxmin', sniter=3, lr=1e-4, local_rank=3, batch_size=32)),
    # evaluation
    ('mnist', "--data mnist --model relux --epsilon 1.58 --test_batch_size 256 --test_sniter 2000 "
              "--saved_model pretrained/relu/mnist_4C3F",
     dict(data='mnist', epsilon=1.58, test_sniter=2000, saved_model='pretrained/relu/mnist_4C3F',
          alpha=1.58 / 4)),
    ('mnist', "--data cifar10 --model c6f2_relux --epsilon 0.141 --test_batch_size 256 "
              "--test_sniter 2000 --saved_model pretrained/relu/cifar_6C2F",
     dict(data='cifar10', model='c6f2_relux', epsilon=0.141, saved_model='pretrained/relu/cifar_6C2F')),
    ('tinyimagenet', "--model tinyimagenet_relux --epsilon 0.141 --test_batch_size 32 --test_sniter 2000 "
                     "--saved_model TinyImagenet/pretrained/tiny_relu",
     dict(test_batch_size=32, test_sniter=2000)),
]


@pytest.mark.parametrize('data,line,want', COMMANDS, ids=range(len(COMMANDS)))
def test_reference_command_lines(data, line, want):
    a = argparser(line.split(), data=data)
    for k, v in want.items():
        got = getattr(a, k)
        assert got == pytest.approx(v) if isinstance(v, float) else got == v, k


def lrs(argv, epochs):
    """The learning rate of every epoch as the training loop sets it (LambdaLR, stepped
    after each epoch), for a one-parameter model."""
    a = argparser(argv)
    model = torch.nn.Linear(1, 1)
    opt = make_optimizer(a, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(a))
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    return a, opt, out


def test_step_and_multistep_learning_rates():
    common = ['--lr', '0.1', '--epochs', '30', '--warmup', '2', '--rampup', '5']
    # step: gamma^(e // step_size), e = max(t - (rampup + warmup - 1) + 1, 0) = max(t - 5, 0)
    a, opt, got = lrs(common + ['--opt', 'sgd', '--lr_scheduler', 'step', '--step_size', '3',
                                '--gamma', '0.5', '--weight_decay', '1e-4'], 14)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]['momentum'] == 0.9 and opt.param_groups[0]['weight_decay'] == 1e-4
    assert got == pytest.approx([0.1] * 8 + [0.05] * 3 + [0.025] * 3)
    # multistep at e = 2 and 4: t = 7 and 9
    _, _, got = lrs(common + ['--lr_scheduler', 'multistep', '--wd_list', '2', '4',
                              '--gamma', '0.5'], 11)
    assert got == pytest.approx([0.1] * 7 + [0.05] * 2 + [0.025] * 2)


def test_exp_learning_rate():
    # epochs 10, more 1: constant until epoch 6, then (end/lr)^((t - 5) / 4)
    a, opt, got = lrs(['--lr', '1e-3', '--end_lr', '1e-5', '--epochs', '10', '--more', '1'], 10)
    assert isinstance(opt, torch.optim.Adam)
    assert got == pytest.approx([1e-3] * 6 + [10 ** -3.5, 1e-4, 10 ** -4.5, 1e-5], rel=1e-9)


# numeric flags without a range, and why: any integer is meaningful, or the flag is ignored
NO_RANGE = {'more': "lr decay start offset, any integer", 'wd_list': "milestone epochs",
            'epsilon_pgd': "ignored", 'local_rank': "set by the launcher",
            'world_size': "accepted, ignored", 'node_rank': "accepted, ignored"}


def _outside(interval):
    """Values just outside ``interval`` on each finite side, and NaN."""
    import math
    low, high = (float(t) for t in interval[1:-1].split(','))
    out = [low if interval[0] == '(' else low - 1]
    if math.isfinite(high):
        out.append(high if interval[-1] == ')' else high + 1)
    return out


def test_every_numeric_flag_has_a_range_and_out_of_range_is_one_error():
    import re

    import utils
    numeric = {x.dest for x in utils.make_parser()._actions if x.type in (int, float)}
    assert numeric - set(utils.RANGES) - set(NO_RANGE) == set(), "numeric flag without a range"
    for flag, interval in utils.RANGES.items():
        for bad in _outside(interval):
            with pytest.raises(UserError, match=rf"--{flag} must be in {re.escape(interval)}, got"):
                argparser([f'--{flag}', str(int(bad)) if bad == int(bad) else str(bad)])
        if utils.make_parser()._option_string_actions[f'--{flag}'].type is float:
            with pytest.raises(UserError, match=rf"--{flag} must be in"):
                argparser([f'--{flag}', 'nan'])
    # the defaults of every dataset column are in range
    for data in COLUMNS:
        argparser([], data=data)


def test_out_of_range_in_a_real_process_is_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    for argv in (['--n_test', '-5'], ['--test_sniter', '0']):
        p = subprocess.run([sys.executable, 'evaluate.py', '--saved_model', str(tmp_path / 'm'),
                            *argv], capture_output=True, text=True, cwd=ROOT)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error:'), p.stderr


def test_defaults_edited_in_utils_take_effect(monkeypatch):
    """utils.py's DEFAULTS block is where a user edits the defaults, and the only source of
    them: an edit reaches the flags, the evaluation's settings and the step's; EvalSettings
    has no defaults of its own (but the heartbeat, which has no flag)."""
    from dataclasses import MISSING, fields

    import utils
    from locallip.evaluation import EvalSettings
    from locallip.flags import eval_settings, step_settings
    monkeypatch.setitem(utils.DEFAULTS, 'audit_steps', 7)
    monkeypatch.setitem(utils.DEFAULTS, 'delta', 0.01)
    monkeypatch.setitem(utils.DEFAULTS, 'radius_steps', 64)
    monkeypatch.setitem(utils.DEFAULTS, 'opt_iter', 3)
    monkeypatch.setitem(utils.MNIST, 'epochs', 5)
    a = utils.argparser([])
    s = eval_settings(a)
    assert (s.audit_steps, s.delta, s.radius_steps, a.epochs) == (7, 0.01, 64, 5)
    assert step_settings(a).opt_iter == 3
    assert [f.name for f in fields(EvalSettings)
            if f.default is not MISSING or f.default_factory is not MISSING] == ['heartbeat']
