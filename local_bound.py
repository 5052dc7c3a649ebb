"""Where a reader finds the bound of Local-Lip (Huang et al., NeurIPS 2021): the local
Lipschitz bound of a network over the L2 ball {x : ||x - x0||_2 <= eps}, the worst-case
logits and the certified loss. The code is ``locallip/bound.py`` (the walk over the layers),
with ``locallip/operators.py`` (power iteration on the masked layers), ``locallip/layers.py``
(which networks it reads), ``locallip/lanczos.py`` (the guaranteed upper bounds) and
``locallip/rounding.py`` (floating point); docs/method.md states the method.

This file hands on the package's names, for the reference's ``from local_bound import ...``:

    from locallip.bound import compute_bound
    res = compute_bound(model, x, y, eps)          # a BoundResult: [batch, classes] logits ...
"""
from locallip.bound import (  # noqa: F401
                            BoundError,
                            BoundOptions,
                            BoundResult,
                            certified_loss,
                            compute_bound,
                            lipschitz_of,
                            robust_loss,
                            sparsity_loss,
                            structure_terms,
                            worst_case_margins,
                            worst_case_margins_all_pairs,
)
from locallip.errors import UnsupportedModel  # noqa: F401
