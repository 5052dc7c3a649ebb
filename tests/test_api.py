"""One's own model through the locallip API: more layer types (BatchNorm, AvgPool2d,
Dropout, Identity), refusals, bare calls and shapes, models by import path, the README's
example."""
import os
import re

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, randomize_bn

import locallip
from locallip.bound import compute_bound
from locallip.errors import UserError
from locallip.layers import check_supported, fold_batchnorm
from locallip.models import select_model

# ----------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------
# Layers: BatchNorm folded, AvgPool2d, Dropout, Identity; the vjp transpose
# ----------------------------------------------------------------------------------------
def user_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Dropout(0.5), nn.Linear(6 * 2 * 2, 12),
                        nn.BatchNorm1d(12), nn.ReLU(), nn.Identity(), nn.Linear(12, 3))
    return randomize_bn(net.double()).eval()


def hand_folded(net):
    """The same map without BatchNorm, folded by hand (a reading independent of
    fold_batchnorm: W' = diag(g / sqrt(v + e)) W, b' = (b - m) g / sqrt(v + e) + beta)."""
    mods = []
    for m in net:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            a = mods[-1]
            s = m.weight / torch.sqrt(m.running_var + m.eps)
            new = type(a)(*((a.in_channels, a.out_channels, a.kernel_size) if isinstance(a, nn.Conv2d)
                            else (a.in_features, a.out_features)),
                          **({'stride': a.stride, 'padding': a.padding} if isinstance(a, nn.Conv2d)
                             else {})).double()
            with torch.no_grad():
                new.weight.copy_(a.weight * s.view(-1, *([1] * (a.weight.dim() - 1))))
                new.bias.copy_((a.bias - m.running_mean) * s + m.bias)
            mods[-1] = new
        elif not isinstance(m, (nn.Dropout, nn.Identity)):
            mods.append(m)
    return nn.Sequential(*mods).eval()


def test_batchnorm_folds_to_the_hand_folded_bound():
    net, ref = user_net(), hand_folded(user_net())
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(net(x), ref(x), atol=1e-12)
    y = net(x).argmax(1)
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[9], nn.Identity)
    assert isinstance(net[1], nn.BatchNorm2d)          # the user's model is not changed
    # the same bound: same starting vectors (keyed by each model's module indices)
    keys = {0: 0, 3: 2, 4: 3, 8: 6}                     # folded index -> hand-folded index
    shapes = {0: (1, 8, 8), 3: (4, 8, 8), 4: (4, 4, 4), 8: (24,)}
    start = {k: torch.randn(6, *s, dtype=torch.float64) for k, s in shapes.items()}

    class Given:
        def __init__(self, m):
            self.m = m

        def get(self, k, shape):
            return start[self.m[k]].clone()

        def put(self, k, u):
            pass
    inv = {v: k for k, v in keys.items()}
    gv_a = {k: torch.ones(1, *([12] if k == 8 else s), dtype=torch.float64) for k, s in shapes.items()}
    gv_b = {keys[k]: v.clone() for k, v in gv_a.items()}
    with torch.no_grad():
        a = compute_bound(folded, x, y, 0.2, Given({k: k for k in keys}), gv_a, sniter=3000,
                          opt_iter=100, tol=1e-10, global_tol=1e-12, check=True)
        b = compute_bound(ref, x, y, 0.2, Given(inv), gv_b, sniter=3000, opt_iter=100,
                          tol=1e-10, global_tol=1e-12, check=True)
    for name in ('r_local', 'r_global', 'worst', 'logits'):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-9), name


def test_user_model_is_sound_on_sampled_points():
    """Points on the 0.15-sphere around each input and gradient ascent of every z_i - z_y
    in the ball (of the user's model, BatchNorm and all, not the folded one) stay below
    the worst-case logits; the ascent does raise every gap (it runs). (This random model's
    worst-case logits are loose; test_soundness checks them where they are exact.)"""
    from soundness_checks import largest_gaps
    net = user_net()
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    b = locallip.lipschitz_bound(net, x, eps=0.15)
    y = b.labels
    folded = fold_batchnorm(net)
    with torch.no_grad():
        res = compute_bound(folded, x, y, 0.15, None, None, sniter=2000, check=True)
        z = res.worst_logits(y)
        worst_gap = (z - z.gather(1, y.view(-1, 1)))
        g = torch.Generator().manual_seed(5)
        for _ in range(50):
            d = torch.randn(x.shape, generator=g, dtype=torch.float64)
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.15 * (1 - 1e-12)
            out = net(x + d)
            gap = out - out.gather(1, y.view(-1, 1))
            assert (gap <= worst_gap + 1e-9).all()
    found = largest_gaps(net, x, y, 0.15)
    assert (found <= worst_gap + 1e-9).all()
    clean = res.logits - res.logits.gather(1, y.view(-1, 1))
    other = torch.ones_like(clean, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
    assert (found > clean)[other].all()
    assert (b.local <= b.global_ * (1 + 1e-6)).all()
    assert set(b.sigmas) == {0, 3, 4, 8} and set(b.varying) == {2, 5, 10}


def test_unsupported_and_training_mode_are_refused():
    with pytest.raises(ValueError, match=r"layer 1 \(MaxPool2d\) is not supported"):
        check_supported(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(2, 2)))
    net = user_net().train()
    with pytest.raises(ValueError, match='training mode'):
        locallip.lipschitz_bound(net, torch.rand(2, 1, 8, 8, dtype=torch.float64), 0.1)
    drop = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Dropout\) is in training mode"):
        check_supported(drop)
    with pytest.raises(ValueError, match='fold it first'):
        check_supported(user_net())


class Skip(nn.Module):
    """A user's residual block: a module with its own forward (no nn.Sequential)."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(128, 2)

    def forward(self, x):
        return self.fc(torch.cat([x, self.conv(x)], 1).flatten(1))


def test_refusals_are_one_documented_exception():
    """Every refusal of the API is a locallip.UnsupportedModel (a ValueError) raised from
    the API call itself (no frames inside the bound), naming the module and the accepted
    layers in one line."""
    import traceback
    x = torch.rand(2, 1, 8, 8)
    pool = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 2))
    cases = ((Skip(), "must be nn.Linear (the logit layer), outside any residual block"),
             (pool, "layer 1 (MaxPool2d) is not supported"),
             (Concat(), "Concat: graph node 'cat' (call_function cat) is not a layer"),
             (nn.Sequential(Skip(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2)),
              "layer 1 (MaxPool2d)"),
             (nn.Sequential(nn.Flatten(), nn.Linear(64, 2), nn.ReLU()), "must be nn.Linear"))
    for net, message in cases:
        for call in (lambda: locallip.lipschitz_bound(net, x, 0.1),
                     lambda: locallip.certify(net, x, eps=0.1),
                     lambda: locallip.certified_radius(net, x)):
            with pytest.raises(locallip.UnsupportedModel) as e:
                call()
            text = str(e.value)
            assert message in text and '\n' not in text and isinstance(e.value, ValueError)
            files = {os.path.basename(f.filename) for f in traceback.extract_tb(e.tb)}
            assert files == {'test_api.py', 'api.py'}, files
        if 'must be' not in message:
            assert locallip.SUPPORTED in text and 'ClampGroupSort' in locallip.SUPPORTED


def test_bare_calls_work_and_bad_shapes_say_so():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    x = torch.rand(3, 1, 8, 8)
    y = net(x).argmax(1)
    with torch.no_grad():
        res = compute_bound(net, x, y, 0.1)            # no vectors: fresh ones
    assert res.r_local.shape == (3,) and torch.isfinite(res.r_local).all()
    with pytest.raises(ValueError, match='batch axis'):
        compute_bound(net, torch.rand(8), y[:1], 0.1)
    with pytest.raises(ValueError, match='3 labels'):
        compute_bound(net, x, y[:2], 0.1)
    one = locallip.certify(net, x[0], eps=0.01)         # one input without its batch axis
    assert one[0.01].shape == (1,)


def test_model_import_path(tmp_path, monkeypatch):
    (tmp_path / 'mynets.py').write_text(
        "import torch.nn as nn\n"
        "def small():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
        "def notseq():\n"
        "    return 3\n")
    monkeypatch.chdir(tmp_path)
    assert isinstance(select_model('mnist', 'mynets:small')[1], nn.Linear)
    for spec, message in (('mynets:nosuch', 'no function nosuch'), ('nomod:f', 'cannot import'),
                          ('mynets:notseq', 'returned a int, not an nn.Module')):
        with pytest.raises(UserError, match=message):
            select_model('mnist', spec)


# ----------------------------------------------------------------------------------------
# The README's example and the certified radius
# ----------------------------------------------------------------------------------------
def readme_example():
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text[text.index('## Your own model'):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs(capsys):
    exec(compile(readme_example(), 'README.md', 'exec'), {})
    out = capsys.readouterr().out
    assert 'certified radius' in out
