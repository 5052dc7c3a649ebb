"""Local-Lip (Huang et al., NeurIPS 2021) on modern PyTorch: certified training and
evaluation with efficient local Lipschitz bounds (L2).

The public API (``locallip/api.py``; docs/api.md):

    import locallip
    b = locallip.lipschitz_bound(net, x, eps=0.1)     # local / global Lipschitz bounds
    c = locallip.certify(net, x, eps=[0.05, 0.1])      # {eps: [batch] bool}
    r = locallip.certified_radius(net, x)               # r.radius [batch]

The modules, one concern each (docs/code.md draws how they import one another):
bound (the local bound's walk), layers (which networks it reads), tracing (any module read
as a plain sequence of layers), operators (power iteration), lanczos (guaranteed norm upper
bounds), rounding (floating point), certificates (the reference and guaranteed ones at a
radius), radius (certified radii), tightness (empirical lower bounds), attacks (PGD,
audits), vectors (power-iteration vectors), step (the certified training step), storage
(where the training vectors live), schedule, training (the loop), flags (the command line's
flags turned into settings), evaluation, report, plots, data, checkpoints, models, progress,
runtime, errors.
"""
from locallip.api import (DELTA, OPT_ITER, SNITER, CertifiedRadius, LipschitzBound,
                          certified_radius, certify, lipschitz_bound, load_weights, prepare)
from locallip.errors import UnsupportedModel, UserError
from locallip.layers import SUPPORTED

__version__ = '1.0.0'

__all__ = ['LipschitzBound', 'CertifiedRadius', 'UnsupportedModel', 'UserError', 'SUPPORTED',
           'load_weights', 'prepare', 'lipschitz_bound', 'certify', 'certified_radius',
           'SNITER', 'OPT_ITER', 'DELTA']
