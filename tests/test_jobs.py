"""Every run_job.sh and TinyImagenet/run_job.sh entry that trains or evaluates, run end to
end at tiny scale: the entry's own command line (the reference's flags for the paper's
jobs) with a few scale flags appended (argparse keeps the last value), in a copy of the code
whose data/ holds generated files in each dataset's exact on-disk format (MNIST and
Fashion-MNIST IDX, CIFAR-10 python pickles, tiny-imagenet-200 JPEG folders as downloaded,
regrouped by the prepare entry). Each must exit 0 and write what docs/training.md and
docs/evaluation.md say it writes.

The scale flags: --epochs, --n_train, --n_test (and the CIFAR-10 --warmup / --rampup, so
that a warm-up, a ramp and an epoch after it all run), plus --test_sniter / --niter for the
TinyImageNet jobs, whose 64x64 8C2F network takes minutes per point at the reference's
counts on two CPU cores. A slow group (marker ``jobs``, 5-8 minutes on 2 cores): `bash
run_job.sh test_jobs`, which CI runs after the suite.

torchvision checks the md5 sums of the real CIFAR-10 files before reading them; generated
files cannot match, so the copy's interpreter starts with a sitecustomize that replaces that
check by "the file exists" (what tests/test_data.py does in-process)."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, ROOT, make_cifar_like, make_mnist_like, make_tinyimagenet_like

pytestmark = pytest.mark.jobs

SMALL = ['--epochs', '1', '--n_train', '64', '--n_test', '32']
CIFAR = ['--epochs', '3', '--warmup', '1', '--rampup', '1', '--n_train', '64', '--n_test', '32']
TINY = ['--epochs', '1', '--n_train', '32', '--n_test', '16', '--test_sniter', '20',
        '--niter', '5']
# the Fashion-MNIST jobs: a small radius, so that a best model is chosen after the ramp
FASHION = ['--epochs', '2', '--rampup', '1', '--n_train', '256', '--n_test', '32',
           '--batch_size', '32', '--epsilon', '0.02', '--epsilon_train', '0.02',
           '--test_sniter', '20']
SITE = "import os\nimport torchvision.datasets.cifar as c\n" \
       "c.check_integrity = lambda path, md5=None: os.path.isfile(path)\n"


class Repo:
    """A copy of the scripts and the package with generated datasets under data/; ``job``
    runs an entry."""

    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, 'TinyImagenet'))
        for f in glob.glob(os.path.join(ROOT, '*.py')) + [os.path.join(ROOT, 'run_job.sh')]:
            shutil.copy(f, root)
        shutil.copytree(os.path.join(ROOT, 'locallip'), os.path.join(root, 'locallip'),
                        ignore=shutil.ignore_patterns('__pycache__'))
        for f in glob.glob(os.path.join(ROOT, 'TinyImagenet', '*.py')) + [
                os.path.join(ROOT, 'TinyImagenet', 'run_job.sh')]:
            shutil.copy(f, os.path.join(root, 'TinyImagenet'))
        data = os.path.join(root, 'data')
        make_mnist_like(data, 256, 64)
        make_mnist_like(data, 256, 64, seed=1, name='FashionMNIST')
        make_cifar_like(data, n_per_batch=40)
        make_tinyimagenet_like(data)
        site = os.path.join(root, '_site')
        os.makedirs(site)
        with open(os.path.join(site, 'sitecustomize.py'), 'w') as f:
            f.write(SITE)
        self.env = dict(os.environ, PY=sys.executable, PYTHONPATH=site, PYTHONUNBUFFERED='1',
                        OMP_NUM_THREADS='2')
        self.dev = [] if DEVICE.type == 'cuda' else ['--cpu']

    def job(self, script, name, *flags, device=True, **env):
        p = subprocess.run(['bash', script, name, *flags, *(self.dev if device else [])],
                           cwd=self.root,
                           env=dict(self.env, **env), capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"{script} {name} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout

    def path(self, *parts):
        return os.path.join(self.root, *parts)


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    return Repo(str(tmp_path_factory.mktemp('jobs') / 'repo'))


def trained(repo, base, epochs, best=None):
    """The files of a finished training run at pretrained/<base>_*: checkpoint of the last
    epoch with its arguments, vectors, TensorBoard; the best model when ``best``."""
    ck = torch.load(repo.path('pretrained', base + '_checkpoint.pth'), weights_only=True)
    assert ck['epoch'] == epochs - 1 and 'optimizer' in ck and ck['args']['epochs'] == epochs
    assert glob.glob(repo.path('pretrained', base + '_tb', 'events.out.tfevents.*'))
    if best is not None:
        assert os.path.isfile(repo.path('pretrained', base + '_best.pth')) == best, base
    return ck


def test_mnist_paper_jobs(repo):
    out = repo.job('run_job.sh', 'mnist_relu', *SMALL)
    assert 'final (' in out and 'eps 1.58 n 32' in out
    ck = trained(repo, 'relu/mnist_4C3F_relux', 1)
    assert ck['args']['gloro'] and ck['args']['opt_iter'] == 10 and ck['args']['sniter'] == 5
    assert os.path.isfile(repo.path('pretrained', 'relu', 'mnist_4C3F_relux_vectors.pt'))
    # eval_mnist reads the reference's checkpoint name: put the trained one there
    shutil.copy(repo.path('pretrained', 'relu', 'mnist_4C3F_relux_checkpoint.pth'),
                repo.path('pretrained', 'relu', 'mnist_4C3F_best.pth'))
    out = repo.job('run_job.sh', 'eval_mnist', '--n_test', '32')
    assert 'eps 1.58 n 32: clean err' in out and 'certified err' in out


def test_cifar10_paper_jobs(repo):
    """The four CIFAR-10 training commands (warm-up, ramp, an epoch after it; one each with
    the step and multistep schedulers) and eval_cifar."""
    runs = [('cifar_relu_4c3f', 'cifar10_relux', ['--lr_scheduler', 'step', '--step_size', '1']),
            ('cifar_relu_6c2f', 'relu/cifar_6C2F_c6f2_relux',
             ['--lr_scheduler', 'multistep', '--wd_list', '1']),
            ('cifar_relu_6c2f_gloro', 'cifar10_c6f2_relux', []),
            ('cifar_maxmin_6c2f', 'maxmin/cifar_6C2F_maxmin_c6f2_clmaxmin', [])]
    for job, base, extra in runs:
        out = repo.job('run_job.sh', job, *CIFAR, *extra)
        assert 'epoch 2 |' in out and 'final (' in out and 'eps 0.1412 n 32' in out, job
        ck = trained(repo, base, 3)
        assert ck['args']['lr_scheduler'] == (extra[1] if extra else 'exp')
    ck = torch.load(repo.path('pretrained', 'cifar10_c6f2_relux_checkpoint.pth'), weights_only=True)
    assert ck['args']['gloro'] and ck['args']['end_lr'] == 1e-6
    shutil.copy(repo.path('pretrained', 'relu', 'cifar_6C2F_c6f2_relux_checkpoint.pth'),
                repo.path('pretrained', 'relu', 'cifar_6C2F_best.pth'))
    out = repo.job('run_job.sh', 'eval_cifar', '--n_test', '32')
    assert 'eps 0.141 n 32: clean err' in out


def test_tinyimagenet_jobs(repo):
    """prepare (regroup the validation images), both trainings under torchrun with two
    processes (gloo on the CPU) and both evaluations."""
    out = repo.job('TinyImagenet/run_job.sh', 'prepare', '--no_download', device=False)
    assert '16 validation images regrouped' in out
    assert sorted(os.listdir(repo.path('data', 'tiny-imagenet-200', 'val')))[:1] == ['n10000000']
    for job, name in (('relu', 'tiny_relu_tinyimagenet_relux'),
                      ('maxmin', 'tiny_maxmin_tiny_clmaxmin')):
        out = repo.job('TinyImagenet/run_job.sh', 'train_' + job, *TINY, NPROC='2',
                       OMP_NUM_THREADS='1')
        assert '2 x ' in out and 'final (' in out
        ck = trained(repo, '../TinyImagenet/pretrained/' + name, 1)
        assert ck['args']['indices'] == '0,6,12,14,17' and ck['args']['sparse'] == 0.01
        for r in (0, 1):
            assert os.path.isfile(repo.path('TinyImagenet', 'pretrained', f'{name}_vectors.rank{r}.pt'))
        shutil.copy(repo.path('TinyImagenet', 'pretrained', name + '_checkpoint.pth'),
                    repo.path('TinyImagenet', 'pretrained', name + '_best.pth'))
        out = repo.job('TinyImagenet/run_job.sh', 'eval_' + job, '--n_test', '16',
                       '--test_sniter', '20', '--niter', '5')
        assert 'eps 0.141 n 16: clean err' in out


def test_fashion_jobs(repo):
    """fashion_train (one bound stopped by --time_limit and continued with --resume),
    fashion_long side by side (PARALLEL=1), fashion_full (no vectors written), then
    fashion_report with its comparison table and fashion_curves."""
    out = repo.job('run_job.sh', 'fashion_train', 'local', *FASHION, '--time_limit', '1e-6')
    assert 'stopping before epoch 1' in out and 'final (' not in out
    out = repo.job('run_job.sh', 'fashion_train', 'local', *FASHION, '--resume')
    assert 'resuming from' in out and 'final (' in out
    out = repo.job('run_job.sh', 'fashion_train', 'global', *FASHION)
    for b in ('local', 'global'):
        ck = trained(repo, f'fashionmnist/{b}_relux', 2, best=True)
        assert ck['args']['bound'] == b and ck['args']['more'] == 0 and ck['args']['gloro']
    repo.job('run_job.sh', 'fashion_long', *FASHION, PARALLEL='1')
    for b in ('local', 'global'):
        trained(repo, f'fashionmnist_long/{b}_relux', 2)
        assert 'final (' in open(repo.path('pretrained', f'fashionmnist_long_{b}.log')).read()
    repo.job('run_job.sh', 'fashion_full', 'local', *FASHION)
    trained(repo, 'fashionmnist_full/local_relux', 2)
    assert not os.path.exists(repo.path('pretrained', 'fashionmnist_full', 'local_relux_vectors.pt'))

    out = repo.job('run_job.sh', 'fashion_report', '--test_sniter', '20', '--niter', '5',
                   '--audit_steps', '5', N_TEST='32')
    assert '| local |' in out and '| global |' in out, out[-2000:]
    for b in ('local', 'global'):
        r = json.load(open(repo.path('pretrained', 'fashionmnist', f'{b}_relux_report.json')))
        assert r['n'] == 32 and set(r['radii']) == {'0.5', '1', '1.58'}
        assert os.path.isfile(repo.path('pretrained', 'fashionmnist', f'{b}_relux_report.tsv'))
        assert os.listdir(repo.path('pretrained', 'fashionmnist', f'{b}_relux_plots'))
    repo.job('run_job.sh', 'fashion_curves', device=False)
    figures = os.listdir(repo.path('pretrained', 'fashionmnist_long', 'figures'))
    assert {'clean_loss.png', 'robust_loss.png', 'test_error.png'} <= set(figures), figures


def test_report_job(repo):
    """report on a given checkpoint prefix: TSV, JSON, plots and the markdown table under
    runs/report/."""
    out = repo.job('run_job.sh', 'report', 'pretrained/fashionmnist/local_relux', '--niter', '5',
                   '--audit_steps', '5', N_TEST='32', TEST_SNITER='20', RADII='0.02 0.5')
    name = repo.path('runs', 'report', 'local_relux_report')
    r = json.load(open(name + '.json'))
    assert r['n'] == 32 and set(r['radii']) == {'0.02', '0.5'} and r['audit']['broken'] == 0
    assert r['audit']['attacked'] > 0, r['audit']      # not vacuous: certified points attacked
    assert os.path.isfile(name + '.tsv') and os.listdir(name + '_plots')
    assert '| 0.02 |' in out and "report files: runs/report/local_relux_report.tsv" in out
