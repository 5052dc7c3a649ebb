"""Architectures: reference parameter names and shapes, checkpoints written by the
reference release load as they are, save/load round trip."""
import pytest
import torch
from conftest import DEVICE, dev

from locallip.checkpoints import load_checkpoint
from locallip.errors import UserError
from locallip.models import MODELS, ClampGroupSort, ReLU_x, select_model


def spec_layout(convs, fcs, act):
    """Expected state_dict {key: shape} from the spec's tables.
    convs: (cin, cout, k, out_hw); fcs: (fin, fout); act: 'relux' | 'relu' | 'maxmin'."""
    out, i = {}, 0

    def activation(shape):
        nonlocal i
        if act == 'relux':
            out[f"{i}.threshold"] = (1, *shape)
        elif act == 'maxmin':
            half = (shape[0] // 2, *shape[1:])
            out[f"{i}.max"] = (1, *half)
            out[f"{i}.min"] = (1, *half)
        i += 1

    for cin, cout, k, hw in convs:
        out[f"{i}.weight"], out[f"{i}.bias"] = (cout, cin, k, k), (cout,)
        i += 1
        activation((cout, hw, hw))
    i += 1   # Flatten
    for n, (fin, fout) in enumerate(fcs):
        out[f"{i}.weight"], out[f"{i}.bias"] = (fout, fin), (fout,)
        i += 1
        if n < len(fcs) - 1:
            activation((fout,))
    return out


C4F3_MNIST = ([(1, 32, 3, 28), (32, 32, 4, 14), (32, 64, 3, 14), (64, 64, 4, 7)],
              [(3136, 512), (512, 512), (512, 10)])
C4F3_CIFAR = ([(3, 32, 3, 32), (32, 32, 4, 16), (32, 64, 3, 16), (64, 64, 4, 8)],
              [(4096, 512), (512, 512), (512, 10)])
C6F2 = ([(3, 32, 3, 32), (32, 32, 3, 32), (32, 32, 4, 16), (32, 64, 3, 16), (64, 64, 3, 16),
         (64, 64, 4, 8)], [(4096, 512), (512, 10)])
C8F2 = ([(3, 64, 3, 64), (64, 64, 3, 64), (64, 64, 4, 31), (64, 128, 3, 31), (128, 128, 3, 31),
         (128, 128, 4, 14), (128, 256, 3, 14), (256, 256, 4, 6)], [(9216, 256), (256, 200)])
EXPECTED = {
    ('mnist', 'relux'): (C4F3_MNIST, 'relux', (1, 28, 28)),
    ('mnist', 'standrelu'): (C4F3_MNIST, 'relu', (1, 28, 28)),
    ('cifar10', 'relux'): (C4F3_CIFAR, 'relux', (3, 32, 32)),
    ('cifar10', 'c6f2_relux'): (C6F2, 'relux', (3, 32, 32)),
    ('cifar10', 'standrelu'): (C6F2, 'relu', (3, 32, 32)),
    ('cifar10', 'c6f2_clmaxmin'): (C6F2, 'maxmin', (3, 32, 32)),
    ('tinyimagenet', 'tinyimagenet_relux'): (C8F2, 'relux', (3, 64, 64)),
    ('tinyimagenet', 'tiny_clmaxmin'): (C8F2, 'maxmin', (3, 64, 64)),
}


# the project's residual model (not the reference's): 4C3F's layers, two blocks
RES4C3F = {
    '0.weight': (32, 1, 3, 3), '0.bias': (32,), '1.threshold': (1, 32, 28, 28),
    '2.branch.0.weight': (32, 32, 4, 4), '2.branch.0.bias': (32,),
    '2.branch.1.threshold': (1, 32, 14, 14), '2.branch.2.weight': (64, 32, 3, 3),
    '2.branch.2.bias': (64,), '2.shortcut.weight': (64, 32, 1, 1), '2.shortcut.bias': (64,),
    '3.threshold': (1, 64, 14, 14), '4.branch.weight': (64, 64, 4, 4), '4.branch.bias': (64,),
    '5.threshold': (1, 64, 7, 7), '7.weight': (512, 3136), '7.bias': (512,),
    '8.threshold': (1, 512), '9.weight': (512, 512), '9.bias': (512,),
    '10.threshold': (1, 512), '11.weight': (10, 512), '11.bias': (10,)}
RESIDUAL = {('mnist', 'res4c3f'), ('cifar10', 'res4c3f')}


def test_every_model_is_covered():
    assert set(EXPECTED) | RESIDUAL == set(MODELS)


def test_residual_model_keys_and_forward():
    """res4c3f: 4C3F's convolutions and linear layers (shapes as 4C3F's), plus a 1x1
    projection and an average-pooling shortcut; its forward is the blocks' sums."""
    model = select_model('mnist', 'res4c3f')
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == RES4C3F
    x = torch.rand(2, 1, 28, 28)
    b1, b2 = model[2], model[4]
    h = model[1](model[0](x))
    h = model[3](b1.shortcut(h) + b1.branch(h))
    h = model[5](torch.nn.functional.avg_pool2d(h, 2) + b2.branch(h))
    with torch.no_grad():
        assert torch.equal(model(x), model[7:](h.flatten(1)))
    cifar = select_model('cifar10', 'res4c3f')
    assert cifar(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('data,name', sorted(EXPECTED))
def test_reference_keys_and_shapes(data, name):
    (convs, fcs), act, in_shape = EXPECTED[(data, name)]
    model = select_model(data, name, 2.0)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_layout(convs, fcs, act)
    with torch.no_grad():
        out = model(torch.rand(2, *in_shape))
    assert out.shape == (2, fcs[-1][1])


def test_activation_values_from_spec():
    assert all((m.threshold == 1.0).all() for m in select_model('mnist', 'relux', 2.0)
               if isinstance(m, ReLU_x))            # reference builder ignores --init here
    assert all((m.threshold == 2.0).all() for m in select_model('cifar10', 'c6f2_relux', 2.0)
               if isinstance(m, ReLU_x))
    mm = [m for m in select_model('cifar10', 'c6f2_clmaxmin') if isinstance(m, ClampGroupSort)]
    assert [(round(m.max.flatten()[0].item(), 4), round(m.min.flatten()[0].item(), 4)) for m in mm] == \
        [(0.1, -0.1), (0.1, -0.15), (0.15, -0.15), (0.15, -0.15), (0.2, -0.2), (0.3, -0.3), (1.2, -1.2)]
    tiny = [m.max.flatten()[0].item() for m in select_model('tinyimagenet', 'tiny_clmaxmin')
            if isinstance(m, ClampGroupSort)]
    assert tiny == pytest.approx([0.8, 1.0, 1.4, 1.4, 1.4, 1.6, 2.0, 3.0, 1.6])
    # forward of the activations
    r = ReLU_x((3,), 1.0)
    assert r(torch.tensor([[-1.0, 0.5, 3.0]])).tolist() == [[0.0, 0.5, 1.0]]
    g = ClampGroupSort((2,), 1.0, -0.5)
    x = torch.tensor([[0.25, -2.0, 2.0, -1.0]])   # a = (0.25, -2), b = (2, -1)
    assert g(x).tolist() == [[1.0, -1.0, 0.25, -0.5]]


@pytest.mark.parametrize('data,name', sorted(EXPECTED))
def test_reference_checkpoint_loads(tmp_path, data, name):
    """A file in the reference release's format: {'state_dict', 'err', 'epoch'} with the
    spec's keys (built here from the spec layout, not from our builder)."""
    (convs, fcs), act, _ = EXPECTED[(data, name)]
    torch.manual_seed(0)
    state = {k: torch.randn(s) for k, s in spec_layout(convs, fcs, act).items()}
    path = tmp_path / 'ref_best.pth'
    torch.save({'state_dict': state, 'err': 0.5, 'epoch': 3}, path)
    model = dev(select_model(data, name))
    ckpt = load_checkpoint(str(path), model, DEVICE)
    assert ckpt['epoch'] == 3
    for k, v in model.state_dict().items():
        assert v.device.type == DEVICE.type and torch.equal(v.cpu(), state[k])


def test_round_trip_and_mismatch(tmp_path):
    a = select_model('mnist', 'relux')
    path = str(tmp_path / 'x_best.pth')
    torch.save({'state_dict': a.state_dict(), 'err': 0.1, 'epoch': 0}, path)
    b = select_model('mnist', 'relux')
    load_checkpoint(path, b)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(UserError, match='does not match the model'):
        load_checkpoint(path, select_model('mnist', 'standrelu'))
    with pytest.raises(UserError, match='checkpoint not found'):
        load_checkpoint(str(tmp_path / 'nope_best.pth'), b)


def test_unknown_names():
    with pytest.raises(UserError, match='unknown --model'):
        select_model('mnist', 'c6f2_relux')
    with pytest.raises(UserError, match='unknown --data'):
        select_model('svhn', 'relux')
