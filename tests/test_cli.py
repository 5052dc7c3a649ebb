"""Command-line runs on a tiny generated MNIST-format dataset: training, evaluation with
--results, --resume after a killed run, and every bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DEVICE, ROOT, USER_RESNET, device_flags

from locallip.plots import ramp_end_epoch, read_scalars, series, varying_data

FAST = ['--data_dir', None, '--no_download', '--batch_size', '64', '--test_batch_size', '64',
        '--n_train', '128', '--n_test', '64', '--rampup', '1', '--sniter', '1',
        '--test_sniter', '5', '--test_opt_iter', '5', '--niter', '3', '--epsilon', '0.3',
        '--epsilon_train', '0.3']


def cmd(script, *args, data_dir=None):
    args = [data_dir if a is None else a for a in args]
    return [sys.executable, os.path.join(ROOT, script), *args, *device_flags()]


def run(script, *args, data_dir=None, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2')
    p = subprocess.run(cmd(script, *args, data_dir=data_dir), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def test_train_then_evaluate(tmp_path, mnist_dir):
    prefix = str(tmp_path / 'run')
    # small radius: some test points certified after the ramp, so a best model is chosen
    p = run('train_mnist.py', *FAST, '--epochs', '2', '--epsilon', '0.02', '--epsilon_train',
            '0.02', '--prefix', prefix, data_dir=mnist_dir)
    assert 'epoch 0 |' in p.stdout and 'epoch 1 |' in p.stdout and 'final (' in p.stdout
    assert f"writing: checkpoints {prefix}_relux_checkpoint.pth" in p.stdout      # announced
    assert f"TensorBoard {prefix}_relux_tb" in p.stdout and '_vectors.pt (' in p.stdout
    assert f"test from {os.path.abspath(os.path.join(mnist_dir, 'MNIST'))})" in p.stdout
    best, last = prefix + '_relux_best.pth', prefix + '_relux_checkpoint.pth'
    ck = torch.load(last, weights_only=False)
    assert ck['epoch'] == 1 and ck['args']['epochs'] == 2 and 'optimizer' in ck
    b = torch.load(best, weights_only=False)
    assert 'optimizer' not in b and b['args']['model'] == 'relux'
    # TensorBoard: the per-epoch scalars the training figures (plots.py --runs) read
    sc = read_scalars(prefix + '_relux_tb')
    for tag in ('train/clean_loss_epoch', 'train/robust_loss_epoch', 'test/eps'):
        assert series(sc, tag)[0] == [0, 1], tag
    ratio = series(sc, 'train/lip_ratio_epoch')[1]
    assert 0 < ratio[1] <= 1 + 1e-6
    assert len(varying_data(sc)) == 6 and ramp_end_epoch(sc) == 0
    # training's final evaluation is evaluate.py's: the same numbers for the same checkpoint
    final = next(l for l in p.stdout.splitlines() if l.startswith('final ('))
    q = run('evaluate.py', '--data', 'mnist', '--model', 'relux', '--data_dir', mnist_dir,
            '--no_download', *FAST[3:], '--epsilon', '0.02', '--saved_model', best)  # a file
    assert q.stdout.startswith(f"evaluate: {best} (epoch ")
    strip = lambda line: re.sub(r'\[\d+s\]', '', line.split('): ', 1)[1])
    again = [l for l in q.stdout.splitlines() if l.startswith('eps 0.02 n 64')]
    assert again and strip(final) == re.sub(r'\[\d+s\]', '', again[-1])
    out = str(tmp_path / 'res.json')
    tsv = str(tmp_path / 'rows.tsv')
    p = run('evaluate.py', '--data', 'mnist', '--model', 'relux', '--data_dir', mnist_dir,
            '--no_download', '--epsilon', '0.3', '0.1', '0.02', '--test_sniter', '20', '--niter',
            '3', '--n_test', '64', '--saved_model', prefix + '_relux', '--results', out, '--out',
            tsv, '--audit', '--audit_restarts', '1', '--audit_steps', '10', '--plots', '--markdown')
    r = json.load(open(out))
    # the audit attacks the certified points: none at 0.3 and 0.1 after this short training,
    # some at 0.02 (the training radius), so the audit is not vacuous
    assert set(r['radii']) == {'0.3', '0.1', '0.02'} and r['audit']['broken'] == 0
    assert r['audit']['attacked'] > 0, r['audit']
    assert f"wrote {out}" in p.stdout and f"wrote {tsv} (64 rows)" in p.stdout
    assert '| 0.1 |' in p.stdout and 'eps 0.1: certified acc local' in p.stdout
    for name in ('certified_vs_radius.png', 'tightness.png', 'sparsity.png'):
        assert os.path.getsize(os.path.join(str(tmp_path / 'rows_plots'), name)) > 5000
    assert not os.path.exists(prefix + '_relux_plots')      # never next to the checkpoint
    start = p.stdout.splitlines()[0]
    assert start.startswith(f"evaluate: {prefix}_relux_best.pth (epoch ") and '64 test points' in start
    assert f"points from {os.path.abspath(os.path.join(mnist_dir, 'MNIST'))} in" in start
    assert 'radii 0.3 0.1' in start and 'reference certificates' in start
    from locallip.report import read_tsv
    header, rows = read_tsv(tsv)
    assert len(rows) == 64 and header[:8] == ['idx', 'label', 'pred', 'correct', 'pgd_correct',
                                              'local_bound', 'global_bound', 'margin']
    for k in ('clean_acc', 'pgd_acc', 'certified_acc', 'epsilon', 'n', 'per_sample'):
        assert k in r
    assert r['n'] == 64 and len(r['per_sample']) == 64 and r['epsilon'] == 0.3
    ps = r['per_sample']
    assert r['certified_acc'] == pytest.approx(sum(s['certified'] for s in ps) / 64)
    assert r['clean_acc'] == pytest.approx(sum(s['pred'] == s['label'] for s in ps) / 64)
    assert all(s['pred'] == s['label'] for s in ps if s['certified'])
    assert r['certified_acc'] <= r['pgd_acc'] <= r['clean_acc']
    assert 'certified err' in p.stdout.strip().splitlines()[-1]
    # an existing result is never overwritten by accident: refused before any work
    again = ['evaluate.py', '--data', 'mnist', '--model', 'relux', '--data_dir', mnist_dir,
             '--no_download', '--epsilon', '0.3', '--test_sniter', '5', '--niter', '0',
             '--n_test', '8', '--saved_model', prefix + '_relux', '--results', out, '--out', tsv,
             '--plots']
    before = open(out).read()
    q = run(*again, check=False)
    assert q.returncode == 2 and '--results' in q.stderr and 'exists' in q.stderr, q.stderr
    assert '--overwrite' in q.stderr and q.stdout == '' and open(out).read() == before
    q = run(*again, '--overwrite')
    assert json.load(open(out))['n'] == 8


def kill_at(command, env, marks, rng):
    """Start ``command`` and SIGKILL it a random 0-50 ms after the first stdout line that
    starts with one of ``marks`` (tried in order: the first mark, then the next, ...).
    Returns the mark it was killed at (None: the run ended first)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    at = None
    for line in proc.stdout:
        if line.strip().startswith(marks[0]):
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            at = marks[0]
            break
    proc.stdout.close()
    proc.wait()
    return at


def test_resume_after_kill_reaches_the_same_result(tmp_path, mnist_dir):
    """Killed (SIGKILL) twice at random moments inside epochs (a random batch of epoch 0,
    then one of epoch 1 or its test certification and file writes), and resumed each time:
    the same weights, optimiser state and best model as the run that was never killed,
    bitwise on the CPU."""
    import random
    args = [*FAST, '--n_train', '256', '--epochs', '3', '--rampup', '1',
            '--epsilon', '0.02', '--epsilon_train', '0.02', '--verbose', '1']
    ref = str(tmp_path / 'ref')
    run('train_mnist.py', *args, '--prefix', ref, data_dir=mnist_dir)

    rng = random.Random(int(time.time()))      # a different moment on every run of the suite
    cut = str(tmp_path / 'cut')
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2')
    ckpt = cut + '_relux_checkpoint.pth'
    first = f"epoch 0 batch {rng.randint(1, 3)}/4"
    second = rng.choice([f"epoch 1 batch {rng.randint(1, 3)}/4", "epoch 1 batch 4/4"])
    assert kill_at(cmd('train_mnist.py', *args, '--prefix', cut, data_dir=mnist_dir), env,
                   [first], rng) == first
    assert not os.path.exists(ckpt) or torch.load(ckpt, weights_only=False)['epoch'] == 0
    resume = cmd('train_mnist.py', *args, '--prefix', cut, '--resume', data_dir=mnist_dir)
    if os.path.exists(ckpt):
        assert kill_at(resume, env, [second], rng) == second, (first, second)
        p = run('train_mnist.py', *args, '--prefix', cut, '--resume', data_dir=mnist_dir)
        assert "resuming from" in p.stdout and 'restart from random' not in p.stdout, p.stdout
    else:       # killed before the first checkpoint: a fresh start
        run('train_mnist.py', *args, '--prefix', cut, data_dir=mnist_dir)
    a = torch.load(ref + '_relux_checkpoint.pth', weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a['epoch'] == b['epoch'] == 2
    if DEVICE.type == 'cpu':
        for k, v in a['state_dict'].items():
            assert torch.equal(v, b['state_dict'][k]), (k, first, second)
        sa, sb = a['optimizer']['state'], b['optimizer']['state']
        assert all(torch.equal(sa[i][m], sb[i][m]) for i in sa for m in ('exp_avg', 'exp_avg_sq'))
        assert a['err'] == b['err'] and a['best_err'] == b['best_err']
        ba = torch.load(ref + '_relux_best.pth', weights_only=False)
        bb = torch.load(cut + '_relux_best.pth', weights_only=False)
        assert ba['epoch'] == bb['epoch']
        assert all(torch.equal(v, bb['state_dict'][k]) for k, v in ba['state_dict'].items())
    assert not os.path.exists(cut + '_relux_vectors.pt.prev')

    # --time_limit: a clean stop at an epoch's end (exit 0, no final evaluation), then
    # --resume finishes the run
    lim = str(tmp_path / 'lim')
    p = run('train_mnist.py', *args, '--prefix', lim, '--time_limit', '1e-6', data_dir=mnist_dir)
    assert "stopping before epoch 1: --time_limit 1e-06 min" in p.stdout, p.stdout
    assert 'epoch 0 |' in p.stdout and 'epoch 1 |' not in p.stdout and 'final (' not in p.stdout
    lim_ckpt = lim + '_relux_checkpoint.pth'
    assert torch.load(lim_ckpt, weights_only=False)['epoch'] == 0
    p = run('train_mnist.py', *args, '--prefix', lim, '--resume', data_dir=mnist_dir)
    assert f"resuming from {lim_ckpt} at epoch 1" in p.stdout and 'final (' in p.stdout
    c = torch.load(lim_ckpt, weights_only=False)
    assert c['epoch'] == 2
    if DEVICE.type == 'cpu':    # bitwise: the same weights as the uninterrupted run
        assert all(torch.equal(v, c['state_dict'][k]) for k, v in a['state_dict'].items())
        assert a['err'] == c['err']
    else:
        same_as_a_second_run(a, [b, c], args, tmp_path, mnist_dir)


def test_no_save_runs_to_the_end_and_writes_nothing(tmp_path, mnist_dir):
    """--no_save with the reference's ignored switches (--test_pth, --print, --real_time,
    --project) and --verbose: exit 0 after the final evaluation, and not one file written,
    neither under --prefix nor in the working folder."""
    work, prefix = tmp_path / 'cwd', tmp_path / 'out' / 'run'
    work.mkdir()
    (tmp_path / 'out').mkdir()
    command = cmd('train_mnist.py', *FAST, '--epochs', '2', '--no_save', '--prefix', str(prefix),
                  '--test_pth', 'x.pth', '--print', '--real_time', '--project', 'p',
                  '--verbose', '1', data_dir=mnist_dir)
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2')
    p = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert '--no_save: no checkpoint' in p.stdout and 'epoch 1 |' in p.stdout
    assert 'epoch 0 batch 1/2' in p.stdout and 'final (' in p.stdout, p.stdout
    assert os.listdir(work) == [] and os.listdir(tmp_path / 'out') == []


def same_as_a_second_run(a, others, args, tmp_path, mnist_dir):
    """CUDA: convolution backward is not bitwise deterministic without --deterministic and
    Adam amplifies tiny gradient differences (an H100 run differed by more than 1e-4 after
    6 steps): each resumed run must be as close to the first run as a second one is."""
    ref2 = str(tmp_path / 'ref2')
    run('train_mnist.py', *args, '--prefix', ref2, data_dir=mnist_dir)
    c = torch.load(ref2 + '_relux_checkpoint.pth', weights_only=False)
    spread = max((v - c['state_dict'][k]).abs().max().item() for k, v in a['state_dict'].items())
    for other in others:
        gap = max((v - other['state_dict'][k]).abs().max().item()
                  for k, v in a['state_dict'].items())
        assert gap <= 10 * spread + 1e-6, (gap, spread)


def inline(entry, argv, capsys):
    """Run an entry point in this process as its script does (through locallip.runtime.run_main) and
    return (exit status, stderr): the subprocess runs' checks without starting Python and
    importing torch again for each bad input. Any exception other than the UserError that
    run_main turns into exit status 2 propagates and fails the test (a traceback)."""
    from locallip.runtime import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: entry([*argv, *device_flags()]))
    return e.value.code, capsys.readouterr().err


def test_bad_training_input(tmp_path, mnist_dir, capsys):
    from conftest import train_main
    base = [a if a is not None else mnist_dir for a in FAST] + ['--epochs', '1', '--prefix',
                                                                 str(tmp_path / 'x')]
    # one real process: exit status 2, one line, no traceback
    p = run('train_mnist.py', *base, '--model', 'nosuch', data_dir=mnist_dir, check=False)
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and 'unknown --model' in p.stderr
    for args, message in ((['--data', 'svhn'], 'unknown --data'),
                          (['--epsilon', '-0.5'], '--epsilon must be in [0, inf)'),
                          (['--epsilon_train', '-1'], '--epsilon_train must be in [0, inf)'),
                          (['--time_limit', '-1'], '--time_limit must be in [0, inf)'),
                          (['--epsilon', '0.1', '0.2'], 'training takes one --epsilon')):
        code, err = inline(lambda a: train_main(a, data='mnist'), base + args, capsys)
        assert code == 2 and err.startswith('error:') and message in err, (args, err)
    code, err = inline(lambda a: train_main(a, data='mnist'),
                       ['--data_dir', str(tmp_path / 'nothing'), '--no_download', '--epochs', '1',
                        '--prefix', str(tmp_path / 'x')], capsys)
    assert code == 2 and 'dataset mnist not found' in err and 'nothing' in err and 'to get it' in err
    # torchvision's own advice names a flag that does not exist here
    assert 'download=True' not in err and '--no_download was given' in err


def test_bad_evaluation_input(tmp_path, mnist_dir, capsys):
    from evaluate import main
    base = ['--data_dir', mnist_dir, '--no_download', '--n_test', '16', '--test_sniter', '2',
            '--niter', '1']
    p = run('evaluate.py', *base, '--saved_model', str(tmp_path / 'missing'), check=False)
    assert p.returncode == 2 and 'checkpoint not found' in p.stderr and 'missing_best.pth' in p.stderr
    assert 'Traceback' not in p.stderr and 'P loads P_best.pth' in p.stderr
    from locallip.models import select_model
    torch.save({'state_dict': select_model('mnist', 'relux').state_dict(), 'err': 1, 'epoch': 0},
               str(tmp_path / 'm_best.pth'))
    m = str(tmp_path / 'm')
    for args, message in ((['--model', 'standrelu', '--saved_model', m], 'does not match the model'),
                          (['--saved_model', m, '--epsilon', '-1'], '--epsilon must be in [0, inf)'),
                          ([], '--saved_model'),
                          (['--saved_model', m, '--resume'], 'give --out')):
        code, err = inline(main, base + args, capsys)
        assert code == 2 and message in err, (args, err)
    # a given --data_dir without the dataset: refused, never replaced by the system copy
    code, err = inline(main, ['--data', 'fashionmnist', '--data_dir', str(tmp_path / 'no' / 'such'),
                              *base[2:], '--saved_model', m], capsys)
    assert code == 2 and err.count('\n') == 1 and 'dataset fashionmnist not found under' in err
    assert '--data_dir system' in err, err
    # a truncated file, a file that is not a checkpoint, one without a state_dict, NaN weights
    good = open(str(tmp_path / 'm_best.pth'), 'rb').read()
    open(str(tmp_path / 'cut_best.pth'), 'wb').write(good[:1000])
    torch.save([1, 2, 3], str(tmp_path / 'list_best.pth'))
    torch.save({'epoch': 3, 'err': 0.5}, str(tmp_path / 'nostate_best.pth'))
    state = select_model('mnist', 'relux').state_dict()
    state['0.weight'][0, 0, 0, 0] = float('nan')
    torch.save({'state_dict': state}, str(tmp_path / 'nan_best.pth'))
    open(str(tmp_path / 'text_best.pth'), 'w').write("this is a text file, not weights\n")
    open(str(tmp_path / 'empty_best.pth'), 'w').close()
    torch.save({'state_dict': select_model('mnist', 'relux').state_dict()},      # torch < 1.6
               str(tmp_path / 'legacy.pth'), _use_new_zipfile_serialization=False)
    for size in (100, 5000):
        legacy = open(str(tmp_path / 'legacy.pth'), 'rb').read()[:size]
        open(str(tmp_path / f'legacy{size}_best.pth'), 'wb').write(legacy)
    for name, message in (('cut', 'cut short at 1000 bytes'), ('list', 'holds no state_dict'),
                          ('text', 'not a PyTorch checkpoint (33 bytes'),
                          ('empty', 'the file is empty (0 bytes)'),
                          ('legacy100', 'cut short at 100 bytes (a legacy PyTorch pickle'),
                          ('legacy5000', 'cut short at 5000 bytes (a legacy PyTorch pickle'),
                          ('nostate', 'holds no state_dict'), ('nan', "NaN or infinite weights in ['0.weight']")):
        code, err = inline(main, base + ['--saved_model', str(tmp_path / name)], capsys)
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], lines


def test_audit_failure_exits_nonzero(tmp_path, mnist_dir, monkeypatch, capsys):
    """A wrong (shrunk) bound on purpose: the audit with its default restarts and steps
    prints the sample and exits with 3."""
    import evaluate
    from locallip import bound as local_bound
    from locallip.models import select_model
    torch.manual_seed(0)
    torch.save({'state_dict': select_model('mnist', 'relux').state_dict(), 'err': 1, 'epoch': 0},
               str(tmp_path / 'm_best.pth'))
    monkeypatch.setattr(local_bound, 'worst_case_margins', lambda *a: 0 * a[2].view(-1, 1) * a[0][:, 0])
    with pytest.raises(SystemExit) as e:
        evaluate.main(['--data_dir', mnist_dir, '--no_download', '--n_test', '64',
                       '--test_sniter', '2', '--niter', '1', '--epsilon', '3.0', '--audit',
                       '--saved_model',
                       str(tmp_path / 'm'), *device_flags()])
    assert e.value.code == evaluate.AUDIT_FAILED
    err = capsys.readouterr().err
    assert 'AUDIT FAILURE: test point' in err and 'certified at eps 3' in err


def test_progress_lines_without_a_terminal(monkeypatch, capsys):
    """Without a terminal an epoch of fewer than --verbose batches still prints progress at
    least every PROGRESS_EVERY_S seconds (here 0: every batch; by default none in 4 quick
    batches)."""
    from conftest import blob_loader, tiny_net

    from locallip import training as train
    from locallip.layers import layer_input_shapes
    from locallip.vectors import VectorStore
    from utils import argparser
    args = argparser(['--verbose', '200', '--sniter', '1', '--rampup', '1', '--epsilon', '0.1',
                      '--epsilon_train', '0.1'])
    net = tiny_net('relux')
    opt = torch.optim.Adam(net.parameters())

    def epoch():
        store = VectorStore(layer_input_shapes(net, (1, 8, 8)), 64)
        run = train.Run(args, net, opt, None, blob_loader(64, batch=16), None, (store, None),
                        torch.device('cpu'), None, '')
        train.train_epoch(run, 0)
        return capsys.readouterr().out.count('epoch 0 batch ')
    assert epoch() == 0
    monkeypatch.setattr(train, 'PROGRESS_EVERY_S', 0.0)
    assert epoch() == 4


def test_evaluation_heartbeat_without_a_terminal(capsys):
    """Without a terminal, evaluate prints a line per batch and, while a batch runs longer
    than the interval, its status at least once per interval."""
    from locallip.progress import Heartbeat
    beat = Heartbeat(0.2)
    beat.status = 'evaluate: batch 1/3 running'
    time.sleep(0.75)
    beat.say('evaluate: batch 1/3 done')
    beat.stop()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == 'evaluate: batch 1/3 done'
    assert 2 <= len([l for l in lines if l.startswith('evaluate: batch 1/3 running (')]) <= 4
    silent = Heartbeat(None)          # a terminal: the progress bar instead
    silent.status = 'x'
    silent.say('y')
    silent.stop()
    assert capsys.readouterr().out == ''


def test_epoch_logs_the_training_figures():
    """Each certified epoch reports the paper's training-figure quantities: the mean local /
    global Lipschitz ratio (<= 1) and the fraction of varying neurons per activation."""
    from conftest import blob_loader, tiny_net

    from locallip import training as train
    from locallip.layers import layer_input_shapes
    from locallip.vectors import VectorStore
    from utils import argparser
    args = argparser(['--sniter', '2', '--rampup', '1', '--epsilon', '0.2', '--epsilon_train', '0.2'])
    net = tiny_net('relux')
    store = VectorStore(layer_input_shapes(net, (1, 8, 8)), 64)
    run = train.Run(args, net, torch.optim.Adam(net.parameters()), None,
                    blob_loader(64, batch=16), None, (store, None), torch.device('cpu'), None, '')
    out = train.train_epoch(run, 0)
    assert 0 < out['lip_ratio'] <= 1 + 1e-6
    assert sorted(k for k in out if k.startswith('varying@')) == ['varying@1', 'varying@3', 'varying@6']
    assert all(0 <= out[k] <= 1 for k in out if k.startswith('varying@'))


def test_old_checkpoints_global_vectors_carry_over():
    """A checkpoint written before a linear layer's global vector moved to its output space
    (as the reference's; such a checkpoint names no space) resumes with normalize(W u) in its
    place, square layers too; the conv vectors and the new format pass unchanged; a shape
    that does not fit is refused with both shapes named."""
    from conftest import _build

    from locallip import step
    from locallip.errors import UserError
    from locallip.layers import layer_input_shapes
    from locallip.models import ReLU_x
    from locallip.operators import global_power_iteration, global_vector_shape
    torch.manual_seed(3)   # conv, linear 32 -> 16, square linear 16 -> 16, logits
    net = _build([(1, 2, 4, 2, 1, 4)], [(32, 16), (16, 16), (16, 3)],
                 lambda shape, j: ReLU_x(shape, 1.0)).to(DEVICE)
    shapes = layer_input_shapes(net, (1, 8, 8))
    lin = [k for k in shapes if isinstance(net[k], torch.nn.Linear)]
    assert [(net[k].in_features, net[k].out_features) for k in lin] == [(32, 16), (16, 16)]
    g = torch.Generator().manual_seed(0)
    old = {k: torch.randn(1, *s, generator=g) for k, s in shapes.items()}
    said = []
    assert step.GLOBAL_LINEAR_SPACE == 'output'     # the space a new checkpoint names
    got = step.resumed_global_vectors(old, net, shapes, DEVICE, said.append, 'input')
    for k, s in shapes.items():
        assert tuple(got[k].shape) == (1, *global_vector_shape(net[k], s))
        if k in lin:
            w = net[k].weight.detach()
            want = old[k].to(DEVICE) @ w.t()
            assert torch.allclose(got[k], want / want.norm(), atol=1e-6)
            global_power_iteration(net[k], got[k], 2)      # usable as it is
        else:
            assert torch.equal(got[k], old[k].to(DEVICE))
    assert len(said) == len(lin)
    again = step.resumed_global_vectors(got, net, shapes, DEVICE, said.append, 'output')
    assert all(torch.equal(again[k], got[k]) for k in got) and len(said) == len(lin)
    bad = {**old, lin[0]: torch.randn(1, 5)}
    for space in ('input', 'output'):
        with pytest.raises(UserError, match=r"layer %d .*\(1, 5\)" % lin[0]):
            step.resumed_global_vectors(bad, net, shapes, DEVICE, said.append, space)


@pytest.mark.parametrize('backend', ['aot_eager'] + (['inductor'] if DEVICE.type == 'cuda' else []))
def test_compiled_step_equals_eager(backend):
    """--compile: torch.compile'd certified_step (sync-free loops) is one graph (fullgraph:
    no graph break, so CUDA graphs can replay the whole step) and gives the eager step's
    loss, statistics, vectors and gradients. On the CPU the suite compiles with 'aot_eager'
    (the graph and its autograd as inductor receives them, without inductor's C++ code
    generation, which takes about 100 s cold on 2 cores; with 'inductor' and without
    fullgraph this test was run once and passed). On CUDA it also runs 'inductor', i.e. what
    --compile uses there: mode 'reduce-overhead', CUDA graphs. TF32 is off in both runs so
    that they compute the same products. The GPU timing is bench.py --compile."""
    from conftest import tiny_net

    from locallip import flags, step
    from locallip.bound import exact_float32
    from locallip.layers import layer_input_shapes
    from utils import argparser
    x, y = torch.rand(8, 1, 8, 8).to(DEVICE), torch.randint(0, 3, (8,)).to(DEVICE)
    results = []
    for compiled in (False, True):
        args = argparser(['--sniter', '2', '--opt_iter', '2', '--gloro'] +
                         (['--compile'] if compiled else []))
        net = tiny_net('relux', seed=4).to(DEVICE)
        shapes = layer_input_shapes(net, (1, 8, 8))
        g = torch.Generator().manual_seed(1)
        given = {k: torch.randn(8, *s, generator=g).to(DEVICE) for k, s in shapes.items()}
        gv = {}
        torch.manual_seed(2)            # the global vectors' first draw, outside compiled code
        step.start_global_vectors(gv, net, shapes, x)
        fn = step.step_function(args.compile, DEVICE, backend=backend, fullgraph=True)
        assert (fn is step.certified_step) != compiled
        with exact_float32():
            outs = [fn(net, x, y, 0.3, 0.5, given, gv, flags.step_settings(args))]
            outs[-1][0].backward()
        results.append((outs, [p.grad.clone() for p in net.parameters()], gv))
    (o0, g0, gv0), (o1, g1, gv1) = results
    for a, b in zip(o0, o1):
        for k, (t0, t1) in enumerate(zip(a[:6], b[:6])):
            assert torch.allclose(t0, t1, rtol=1e-5, atol=1e-6), (k, t0, t1)
        assert a[6].keys() == b[6].keys() and a[7].keys() == b[7].keys()
        for k in a[7]:
            assert torch.allclose(a[7][k], b[7][k], rtol=1e-5, atol=1e-6), k
    for p0, p1 in zip(g0, g1):
        assert torch.allclose(p0, p1, rtol=1e-4, atol=1e-6), (p0 - p1).abs().max()
    for k in gv0:
        assert torch.allclose(gv0[k], gv1[k], rtol=1e-5, atol=1e-6), k


def test_run_job_names_an_unknown_job():
    for script in ('run_job.sh', os.path.join('TinyImagenet', 'run_job.sh')):
        p = subprocess.run(['bash', script, 'frobnicate'], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2 and "unknown job 'frobnicate'" in p.stderr, p.stderr
        assert 'quickstart' in p.stderr or 'train_relu' in p.stderr     # then the job list


def test_user_residual_module_trains_resumes_and_evaluates(tmp_path, mnist_dir, monkeypatch):
    """A user's plain nn.Module with skips, from the command line: trained (one process and
    two under torchrun agree on the first step), resumed (1 + 1 epochs = 2 epochs, the same
    weights), then evaluated with guaranteed certificates, radii, the lower bound and the
    audit; the checkpoint holds the user's own state_dict keys."""
    (tmp_path / 'myres.py').write_text(USER_RESNET)
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    args = [*FAST, '--model', 'myres:net', '--epsilon', '0.05', '--epsilon_train', '0.05',
            '--sniter', '2']
    straight, cut = str(tmp_path / 'straight'), str(tmp_path / 'cut')
    p = run('train_mnist.py', *args, '--epochs', '2', '--prefix', straight, data_dir=mnist_dir)
    loss1 = re.search(r"first step: loss ([0-9.]+)", p.stdout).group(1)
    run('train_mnist.py', *args, '--epochs', '1', '--prefix', cut, data_dir=mnist_dir)
    p = run('train_mnist.py', *args, '--epochs', '2', '--prefix', cut, '--resume',
            data_dir=mnist_dir)
    assert 'at epoch 1' in p.stdout
    a = torch.load(straight + '_net_checkpoint.pth', weights_only=True)['state_dict']
    b = torch.load(cut + '_net_checkpoint.pth', weights_only=True)['state_dict']
    assert 'block.conv1.weight' in a and 'proj.weight' in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                          '--master_port', '29541', *cmd('train_mnist.py', *args, '--epochs', '1',
                                                         '--batch_size', '32', '--prefix',
                                                         str(tmp_path / 'ddp'),
                                                         data_dir=mnist_dir)[1:]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    m = re.search(r"first step: loss ([0-9.]+) \(global batch 64\)", ddp.stdout)
    assert m and float(m.group(1)) == pytest.approx(float(loss1), rel=1e-5)
    out, tsv = str(tmp_path / 'res.json'), str(tmp_path / 'rows.tsv')
    p = run('evaluate.py', '--data', 'mnist', '--model', 'myres:net', '--data_dir', mnist_dir,
            '--no_download', '--epsilon', '0.05', '0.1', '0.01', '--n_test', '32', '--test_sniter',
            '50', '--niter', '3', '--saved_model', straight + '_net_checkpoint.pth',
            '--certificate', 'guaranteed', '--radius', '--radius_steps', '32', '--lower_bound',
            '--audit', '--audit_restarts', '1', '--audit_steps', '20', '--results', out,
            '--out', tsv, '--plots')
    r = json.load(open(out))
    # the audit attacks the certified points: none at 0.05 and 0.1 after this short training,
    # some at 0.01, so it is not vacuous
    assert r['audit']['broken'] == 0 and r['n'] == 32
    assert r['audit']['attacked'] > 0, r['audit']
    assert r['lower_bound']['min_bound_over_lower'] >= 1.0 and r['lower_bound']['points'] > 0
    assert 'bound / lower bound' in p.stdout
    assert os.path.getsize(str(tmp_path / 'rows_plots' / 'bound_over_lower.png')) > 5000
    from locallip.report import read_tsv
    header, rows = read_tsv(tsv)
    assert 'lower_bound' in header and 'radius_guaranteed' in header
    assert all(row['radius_guaranteed'] <= row['radius'] * (1 + 1e-3) + 1e-12 for row in rows)


def test_a_user_module_ending_in_log_softmax_trains_and_certifies_as_its_logits(tmp_path,
                                                                                  mnist_dir,
                                                                                  monkeypatch):
    """The same user module with and without a final F.log_softmax, trained from the same
    seed and evaluated with guaranteed certificates, radii and the audit: the same weights
    (the certified loss reads the logits either way) and the same accuracies."""
    (tmp_path / 'myres.py').write_text(USER_RESNET)
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    results = {}
    for fn in ('net', 'net_log_softmax'):
        prefix = str(tmp_path / fn)
        run('train_mnist.py', *FAST, '--model', f'myres:{fn}', '--epsilon', '0.05',
            '--epsilon_train', '0.05', '--sniter', '2', '--epochs', '1', '--prefix', prefix,
            data_dir=mnist_dir)
        out = str(tmp_path / f'{fn}.json')
        run('evaluate.py', '--data', 'mnist', '--model', f'myres:{fn}', '--data_dir', mnist_dir,
            '--no_download', '--epsilon', '0.05', '0.01', '--n_test', '32', '--test_sniter', '50',
            '--niter', '3', '--saved_model', f'{prefix}_{fn}_checkpoint.pth',
            '--certificate', 'guaranteed', '--radius', '--radius_steps', '32', '--audit',
            '--audit_restarts', '1', '--audit_steps', '20', '--results', out)
        results[fn] = (json.load(open(out)),
                       torch.load(f'{prefix}_{fn}_checkpoint.pth', weights_only=True)['state_dict'])
    (a, wa), (b, wb) = results['net'], results['net_log_softmax']
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # the audit attacks the certified points (none at 0.05, some at 0.01): not vacuous
    assert a['audit']['broken'] == b['audit']['broken'] == 0
    assert a['audit']['attacked'] == b['audit']['attacked'] > 0, (a['audit'], b['audit'])
    assert (a['clean_acc'], a['certified_acc']) == (b['clean_acc'], b['certified_acc'])
    rows = list(zip(a['per_sample'], b['per_sample']))
    assert all(p['pred'] == q['pred'] and p['certified_guaranteed'] == q['certified_guaranteed']
               for p, q in rows)
    for col in ('radius', 'radius_guaranteed'):
        assert all(p[col] == pytest.approx(q[col], rel=1e-4, abs=1e-7) for p, q in rows), col
    assert any(p['radius_guaranteed'] > 0 for p, _ in rows)
