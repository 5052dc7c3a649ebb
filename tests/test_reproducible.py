"""Run-to-run reproducibility of training on the CPU at a fixed thread count: the same
seed gives bitwise-identical gradients, hence weights (docs/training.md, Reproducibility).

The cause found and removed: autograd's backward of ``weight[y]`` (the true-class rows of
the last layer in the worst-case logits) is an accumulating index_put_, which on the CPU
adds repeated labels' rows from several threads in a varying order once the gradient has
32768 elements or more (64 points x 512 hidden units, the 4C3F models)."""
import torch
from conftest import DEVICE, dev

from locallip.bound import take_rows
from locallip.layers import layer_input_shapes
from locallip.models import select_model
from locallip.step import certified_step, start_global_vectors
from locallip.flags import step_settings
from utils import argparser


def distinct(fn, params, n=12):
    """How many different gradients (bitwise) ``n`` runs of fn().backward() give."""
    seen = set()
    for _ in range(n):
        for p in params:
            p.grad = None
        fn().backward()
        seen.add(torch.cat([p.grad.flatten() for p in params]).cpu().numpy().tobytes())
    return len(seen)


def test_take_rows_values_and_reproducible_gradient():
    assert torch.get_num_threads() >= 2          # conftest: the nondeterminism needs threads
    g0 = torch.Generator().manual_seed(0)
    w = torch.randn(10, 512, generator=g0, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g0)
    up = torch.randn(64, 512, generator=g0, dtype=torch.float64)
    w32, y, up32 = dev(w.float().requires_grad_(), y, up.float())
    rows = take_rows(w32, y)
    assert torch.equal(rows, w32[y])                         # the values of weight[y]
    (rows * up32).sum().backward()
    exact = torch.zeros(10, 512, dtype=torch.float64).index_add_(0, y.cpu(), up)
    assert torch.allclose(w32.grad.cpu().double(), exact, rtol=0, atol=1e-5)
    if DEVICE.type == 'cpu':
        assert distinct(lambda: (take_rows(w32, y) * up32).sum(), [w32]) == 1
    with torch.no_grad():            # no gradient to record: plain indexing
        assert torch.equal(take_rows(w32, y), w32[y])


def test_certified_step_gradient_is_reproducible():
    """The whole certified step (bound, worst-case logits, GloRo / BCP loss) of the MNIST
    4C3F ReLU_x and ReLU networks and the CIFAR-10 6C2F MaxMin network on 64 points: one
    gradient over repeated runs."""
    if DEVICE.type != 'cpu':
        return       # CUDA: bitwise only under --deterministic (tested by the CUDA suite's CLI run)
    g0 = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (64,), generator=g0)
    for data, model, flags in (('mnist', 'relux', ['--gloro']), ('mnist', 'standrelu', []),
                               ('cifar10', 'c6f2_clmaxmin', ['--sniter', '2'])):
        args = argparser(['--data', data, '--cpu', '--model', model, *flags])
        shape = (1, 28, 28) if data == 'mnist' else (3, 32, 32)
        x = torch.rand(64, *shape, generator=g0)
        torch.manual_seed(0)
        net = select_model(data, model, 2.0)
        shapes = layer_input_shapes(net, shape)
        given = {k: torch.randn(64, *s, generator=g0) for k, s in shapes.items()}
        gv0 = {}
        start_global_vectors(gv0, net, shapes, x)

        def step():
            gv = {k: v.clone() for k, v in gv0.items()}
            return certified_step(net, x, y, 0.5, 0.5, dict(given), gv, step_settings(args)).loss
        assert distinct(step, list(net.parameters()), n=4) == 1, (model, flags)


class Killed(Exception):
    """Stands for a SIGKILL between two file operations."""


def test_a_kill_between_any_two_epoch_writes_resumes_matching_vectors(tmp_path, monkeypatch,
                                                                      capsys):
    """save_epoch cut after each of its file operations (rename, vector store, best model,
    checkpoint, removal of .prev): the checkpoint on disk always finds the vectors of its
    own epoch (resume_vectors), so --resume repeats the cut epoch from the same state."""
    from locallip import training as train
    from locallip.vectors import VectorStore
    files = train.EpochFiles(str(tmp_path / 'r_checkpoint.pth'), str(tmp_path / 'r_best.pth'),
                             str(tmp_path / 'r_vectors.pt'))

    def stores(value):
        out = (VectorStore({0: (3,)}, 4), VectorStore({0: (3,)}, 2))
        for st in out:
            st.data[0].fill_(value)
            st.initialized.fill_(True)
        return out

    def save(epoch):
        tr, te = stores(float(epoch))
        train.save_epoch(files, {'state_dict': {}, 'err': 0.5, 'epoch': epoch, 'args': {},
                                 'global_vectors': {}}, True,
                         {'epoch': epoch, 'train': tr.state_dict(), 'test': te.state_dict()})
    save(0)
    real = {'atomic_save': train.atomic_save, 'replace': train.os.replace,
            'remove': train.os.remove}
    n_ops = 0
    for cut in range(10):
        budget = [cut]

        def counted(name):
            def op(*a, **k):
                if budget[0] == 0:
                    raise Killed
                budget[0] -= 1
                return real[name](*a, **k)
            return op
        monkeypatch.setattr(train, 'atomic_save', counted('atomic_save'))
        monkeypatch.setattr(train.os, 'replace', counted('replace'))
        monkeypatch.setattr(train.os, 'remove', counted('remove'))
        try:
            save(1)
            n_ops = cut
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        epoch = torch.load(files.checkpoint, weights_only=True)['epoch']
        tr, te = stores(-1.0)
        assert train.resume_vectors(files.vectors, epoch, (tr, te)), (cut, capsys.readouterr())
        assert (tr.data[0] == epoch).all() and (te.data[0] == epoch).all(), cut
        best = torch.load(files.best, weights_only=True)['epoch']
        assert best >= epoch            # the best model is never behind the checkpoint
        if finished:
            assert epoch == 1 and not tmp_path.joinpath('r_vectors.pt.prev').exists()
            break
        # back to the state after epoch 0 for the next cut
        for p in tmp_path.iterdir():
            p.unlink()
        save(0)
    # rename, vectors, best, checkpoint (each a temporary file and its rename: os.replace
    # is patched everywhere), removal of .prev: every cut was tried
    assert n_ops == 8
