"""BatchNorm and Dropout in certified training: each step bounds the network with every
BatchNorm folded by the batch's own statistics (``layers.training_view``), whose
logits and gradients are those of the model's own training-mode forward without Dropout;
the README's own-model example (a residual block, BatchNorm, Dropout) trains and evaluates
from the command line."""
import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import DEVICE, ROOT, dev
from test_cli import FAST, run

from locallip.bound import compute_bound
from locallip.errors import UnsupportedModel, UserError
from locallip.layers import bound_structure, layer_input_shapes, training_view
from locallip.training import check_trainable


class BNNet(nn.Module):
    """BatchNorm after a conv, in both arms of a block (a 1x1 projection shortcut), on its
    own after a ReLU, after a Linear; Dropout; an in-place ReLU called twice (8x8, 3 classes)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.proj, self.bp = nn.Conv2d(4, 6, 1, stride=2), nn.BatchNorm2d(6)
        self.relu, self.alone = nn.ReLU(inplace=True), nn.BatchNorm2d(6)
        self.fc1, self.bf, self.drop = nn.Linear(6 * 16, 12), nn.BatchNorm1d(12), nn.Dropout(0.5)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.relu(self.b1(self.c1(x)) + self.bp(self.proj(x)))
        x = self.alone(x).flatten(1)
        return self.fc(self.drop(F.relu(self.bf(self.fc1(x)))))


def _randomized(seed=0):
    torch.manual_seed(seed)
    net = BNNet().double()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.uniform_(m.weight, 0.5, 2.0)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return dev(net)


def test_training_view_is_the_training_forward_with_its_gradients():
    net = _randomized()
    x = dev(torch.rand(16, 1, 8, 8, dtype=torch.float64))
    ref = copy.deepcopy(net)
    ref.drop.eval()                          # the view leaves Dropout out
    r = torch.randn(16, 3, dtype=torch.float64, device=DEVICE)
    (ref(x) * r).sum().backward()
    tracked = int(net.bn.num_batches_tracked)
    view = training_view(net, x)
    assert int(net.bn.num_batches_tracked) == tracked + 1       # running statistics: once
    assert torch.allclose(net.bn.running_mean, ref.bn.running_mean)
    out = view(x)
    assert torch.allclose(out, ref(x).detach(), rtol=1e-10, atol=1e-12)
    (out * r).sum().backward()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-10), name
    assert net.drop.training and net.bn.training                 # the model's modes are kept


def test_the_bound_of_a_training_step_reaches_every_parameter():
    net = _randomized(1)
    x = dev(torch.rand(8, 1, 8, 8, dtype=torch.float64))
    view = training_view(net, x)
    assert set(layer_input_shapes(bound_structure(net), (1, 8, 8))) == set(
        layer_input_shapes(view, (1, 8, 8)))                      # the same keys, so one store
    y = view(x).argmax(1)
    res = compute_bound(view, x, y, 0.1, sniter=5)
    res.worst_logits(y).sum().backward()                          # the robust loss's logits
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert training_view(net.eval(), x) is net                    # eval mode: the model itself


class SharedBN(nn.Module):
    """One BatchNorm called on two different tensors: a fold by one batch's statistics per
    module cannot match, and the first step says so."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        return self.fc(F.relu(self.bn(self.c2(x))).flatten(1))


def test_a_batchnorm_called_twice_is_refused_on_the_first_step():
    torch.manual_seed(0)
    net = dev(SharedBN())
    with pytest.raises(UnsupportedModel, match="SharedBN: the network with BatchNorm folded by "
                                               "the batch's statistics differs"):
        training_view(net, dev(torch.rand(8, 1, 8, 8)))


def test_compile_refuses_batchnorm_and_dropout():
    with pytest.raises(UserError, match=r"--compile does not take layers 1 \(BatchNorm2d\)"):
        check_trainable(BNNet(), 'bn', compiled=True)
    check_trainable(BNNet(), 'bn')


def test_readme_model_trains_and_evaluates_from_the_command_line(tmp_path, mnist_dir,
                                                                 monkeypatch):
    """The README's own-model class (residual block, BatchNorm, Dropout) as a module given
    to train_mnist.py and evaluate.py: trained with the certified loss (the BatchNorm's
    running statistics move), then certified with guaranteed certificates and radii, and
    every certificate attacked (none broken)."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    code = re.search(r"```python\n(.*?)```", text[text.index('## Your own model'):], re.S).group(1)
    classes = code[:code.index('torch.manual_seed(0)')].replace('import locallip\n', '')
    (tmp_path / 'readme_net.py').write_text(classes + "\n\ndef net():\n    return Net()\n")
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    prefix = str(tmp_path / 'run')
    p = run('train_mnist.py', *FAST, '--model', 'readme_net:net', '--epochs', '2',
            '--epsilon', '0.05', '--epsilon_train', '0.05', '--prefix', prefix,
            data_dir=mnist_dir)
    assert 'first step: loss' in p.stdout and 'final (' in p.stdout
    state = torch.load(prefix + '_net_checkpoint.pth', weights_only=True)['state_dict']
    assert int(state['bn.num_batches_tracked']) == 4 and state['bn.running_var'].std() > 0
    out = str(tmp_path / 'res.json')
    run('evaluate.py', '--data', 'mnist', '--model', 'readme_net:net', '--data_dir', mnist_dir,
        '--no_download', '--epsilon', '0.05', '--n_test', '32', '--test_sniter', '50',
        '--niter', '3', '--saved_model', prefix + '_net_checkpoint.pth', '--certificate',
        'guaranteed', '--radius', '--radius_steps', '32', '--audit', '--audit_restarts', '1',
        '--audit_steps', '20', '--results', out)
    r = json.load(open(out))
    assert r['n'] == 32 and r['audit']['broken'] == 0
    assert r['audit']['attacked'] > 0, r['audit']      # not vacuous: certified points attacked
