"""The soundness sweep: every form of model the API accepts (each supported layer, a
Residual block, a traced module with a skip, BatchNorm folded), in float32 and in float64,
certified through ``locallip.certified_radius`` and attacked at every certified radius
(sphere samples and PGD from the steepest direction, tests/soundness_checks.py): none
broken; the same sweep with the radii inflated breaks them (it can fail)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from soundness_checks import radius_check

import locallip
from locallip.models import ClampGroupSort, ReLU_x, Residual

SHAPE = (1, 8, 8)


class _Skip(nn.Module):
    """A user's module with an identity skip, read by torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(h + self.conv2(h))
        return self.fc(torch.flatten(h, 1))


def _batchnorm_net():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.BatchNorm1d(256), nn.Linear(256, 3))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
    return net


FORMS = {
    'linear_relu': lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                                         nn.Linear(16, 3)),
    'conv_relux': lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ReLU_x((4, 8, 8), 1.0),
                                        nn.Flatten(), nn.Linear(256, 3)),
    'avgpool_maxmin': lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AvgPool2d(2),
                                            ClampGroupSort((2, 4, 4)), nn.Flatten(),
                                            nn.Linear(64, 3)),
    'adaptive_noops': lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(),
                                            nn.AdaptiveAvgPool2d(3), nn.Identity(),
                                            nn.Dropout(0.5), nn.Flatten(), nn.Linear(36, 3)),
    'residual': lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(4, 4, 3, padding=1))),
        nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)),
    'traced_skip': _Skip,
    'batchnorm': _batchnorm_net,
}


def _case(form: str, dtype: torch.dtype):
    """The seeded network of ``form`` in ``dtype`` (eval mode) and 6 inputs."""
    torch.manual_seed(sorted(FORMS).index(form))
    net = FORMS[form]().to(dtype).eval()
    x = torch.rand(6, *SHAPE, dtype=dtype)
    return net, x


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['float32', 'float64'])
@pytest.mark.parametrize('certificate', ['guaranteed', 'reference'])
def test_sweep_no_certified_ball_is_broken(dtype, certificate):
    """Every form certified and attacked at its radius: every form has certified points,
    and no attack flips one inside its radius."""
    for form in FORMS:
        net, x = _case(form, dtype)
        out = radius_check(net, x, certificate, samples=100, steps=20)
        assert out['attacked'] > 0, f"{form}: nothing certified, nothing attacked"
        assert out['broken'] == 0, f"{form} ({dtype}, {certificate}): {out['broken']} broken"


def test_sweep_breaks_inflated_radii(monkeypatch):
    """The same sweep, with every guaranteed radius inflated 3 times, finds broken balls
    (in most forms): the attacks reach the radii the bound certifies."""
    real = locallip.certified_radius

    def inflated(*args, **kw):
        r = real(*args, **kw)
        r.radius = r.radius * 3
        return r
    monkeypatch.setattr(locallip, 'certified_radius', inflated)
    broken = {}
    for form in FORMS:
        net, x = _case(form, torch.float64)
        broken[form] = radius_check(net, x, 'guaranteed', samples=100, steps=20)['broken']
    assert sum(b > 0 for b in broken.values()) >= len(FORMS) // 2, broken
