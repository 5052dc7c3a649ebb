"""Where a reader finds the bound of Local-Lip (Huang et al., NeurIPS 2021): the local
Lipschitz bound of a network over the L2 ball {x : ||x - x0||_2 <= eps}, the worst-case
logits and the certified loss. The code is ``locallip/bound.py`` (the walk over the layers),
with ``locallip/operators.py`` (power iteration on the masked layers), ``locallip/layers.py``
(which networks it reads), ``locallip/lanczos.py`` (the guaranteed upper bounds) and
``locallip/rounding.py`` (floating point); docs/method.md states the method.

This file hands on every public name of ``locallip/bound.py``, for the reference's imports:

    from local_bound import compute_bound
    res = compute_bound(model, x, y, eps)          # a BoundResult: [batch, classes] logits ...
"""
from locallip.bound import (CONVERGED_SNITER, FLOOR, TEST_OPT_ITER, TEST_SNITER,  # noqa: F401
                            BoundError, BoundOptions, BoundResult, Sum, box_max, box_min,
                            certified_loss, compute_bound, exact_float32, lipschitz_of,
                            robust_loss, rounded_margins, rounded_radius, sparsity_loss,
                            structure_terms, take_rows, worst_case_margins,
                            worst_case_margins_all_pairs)
from locallip.errors import UnsupportedModel  # noqa: F401
