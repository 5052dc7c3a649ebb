"""The floating-point allowance of the guaranteed certificate (docs/method.md, "Floating
point"): what rounding can change between the real-number network the bound is about, the
network as it runs (in the model's dtype) and the bound's own arithmetic.

Rounding model (IEEE 754, round to nearest, unit roundoff u = eps(dtype) / 2; no underflow):
an affine layer's output z = W a + b is computed as a sum of its n products and the bias in
any order, with or without fused multiply-adds, so |fl(z) - z| <= gamma(n + 1) (|W| |a| + |b|)
elementwise, gamma(k) = k u / (1 - k u) (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 3.1). ReLU, clamps, max / min and reshapes are exact. A
residual addition rounds once: |fl(p + q) - (p + q)| <= u |p + q|. A BatchNorm folded into
its affine layer is computed by the running model unfolded, with rounded scale and shift:
its layer carries ``FOLD_TERMS`` more terms and the magnitudes of every term of its bias
(``bias_magnitude``). Not covered: FFT / Winograd convolution algorithms and TF32 (the
certification itself runs with TF32 off, ``bound.exact_float32``).

Errors are propagated elementwise over the whole ball: E bounds |a(x') - fl(a)(x')| for
every x' of the ball, where fl(a) is ANY evaluation in this arithmetic of the layers up to
here (the model's own forward at x', or the bound's forward of the centre), M bounds |a(x')|
(the box). Through an affine layer
    E' = |W| E + gamma(n + PAD) (|W| (M + E) + |b|),
with PAD terms of slack for the bound's own interval arithmetic (centre, half-width, the
ball's box), which therefore rounds by at most gamma(n + PAD) (|W| M + |b|) + the ball term.
"""
import math
from typing import Optional

import torch
import torch.nn as nn

PAD = 8           # slack terms per layer: the bound's own subtractions, halvings, sqrt
FOLD_TERMS = 16   # a BatchNorm folded into its layer: its rounded scale and shift, unfolded


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating dtype (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def gamma(k: int, u: float) -> float:
    """gamma(k) = k u / (1 - k u): the relative error bound of a k-term sum of products."""
    if not k * u < 0.5:
        raise ValueError(f"rounding: {k} terms at unit roundoff {u:g} is beyond the model")
    return k * u / (1 - k * u)


def fan_in(layer: nn.Module, in_shape) -> int:
    """The most terms one output of an affine layer sums (bias and fold slack excluded)."""
    if isinstance(layer, nn.Conv2d):
        return (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.AvgPool2d):
        k = layer.kernel_size
        return math.prod(k) if isinstance(k, (tuple, list)) else k * k
    return math.prod(in_shape[-2:])          # AdaptiveAvgPool2d: at most the whole plane


def fan_out(layer: nn.Module, in_shape) -> int:
    """The most terms one entry of W^T y sums (the transpose's fan-in): an input feeds at most
    this many outputs, whatever the stride."""
    if isinstance(layer, nn.Conv2d):
        return (layer.out_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return fan_in(layer, in_shape)           # pools: as many windows as a window has entries
    #                                          (AdaptiveAvgPool2d: at most the whole plane)


def layer_gamma(layer: nn.Module, in_shape, u: float, transpose: bool = False) -> float:
    """gamma(n + PAD) of one affine layer's product W x (``transpose``: W^T y), plus
    FOLD_TERMS for a folded BatchNorm."""
    extra = FOLD_TERMS if getattr(layer, 'bias_magnitude', None) is not None else 0
    n = fan_out(layer, in_shape) if transpose else fan_in(layer, in_shape)
    return gamma(n + PAD + extra, u)


def bias_magnitude(layer: nn.Module, like: torch.Tensor) -> Optional[torch.Tensor]:
    """|b| (or, for a folded BatchNorm, the sum of its terms' magnitudes) shaped to
    broadcast over ``like`` [batch, *out_shape]; None without a bias."""
    mag = getattr(layer, 'bias_magnitude', None)
    if mag is None:
        b = getattr(layer, 'bias', None)
        if b is None:
            return None
        mag = b.detach().abs()
    return mag.to(like).view(1, -1, *([1] * (like.dim() - 2)))


def through_affine(layer: nn.Module, err: torch.Tensor, mag: torch.Tensor, in_shape,
                   u: float, apply_abs) -> tuple:
    """(E', S) [batch, *out_shape] of an affine layer: E' the error bound after it (the
    docstring's recurrence) and S = |W| M + |b|, the scale of its own interval arithmetic's
    rounding. err, mag: E and M [batch, *in_shape]; apply_abs(layer, v) = |W| v."""
    g = layer_gamma(layer, in_shape, u)
    both = apply_abs(layer, torch.cat([err * (1 + g) + g * mag, mag], 0))
    e_out, scale = both[:err.shape[0]], both[err.shape[0]:]
    b = bias_magnitude(layer, e_out)
    if b is not None:
        e_out, scale = e_out + g * b, scale + b
    # every term is >= 0, so rounding the recurrence itself loses at most gamma(n + 4)
    return e_out * (1 + 2 * g), scale * (1 + 2 * g)


def l2_error(prev: torch.Tensor, scale: torch.Tensor, sigma: float, abs_w: float,
             g: float) -> torch.Tensor:
    """[batch] a bound of the L2 norm of the error vector after an affine layer, from the
    one before it ``prev`` [batch]: sigma prev + g (||S||_2 + |||W||| prev), S = |W| M + |b|
    [batch, *out_shape] (``through_affine``), sigma >= ||W||_2, abs_w >= |||W|||. Each entry
    of the error is at most this norm, which grows like the network's Lipschitz bound where
    the entrywise recurrence grows like interval arithmetic."""
    own = torch.linalg.vector_norm(scale.flatten(1), dim=1)
    return ((sigma + g * abs_w) * prev + g * own) * (1 + 4 * g)


def abs_norm(layer: nn.Module, in_shape, apply_abs) -> float:
    """An upper bound of |||W||| = ||(|W_ij|)||_2 (itself >= ||W||_2): sqrt(max row sum x max
    column sum) of |W|, from |W| 1 and |W|^T 1, raised by their rounding. apply_abs(layer, v)
    = |W| v."""
    p = next(layer.parameters(), None)
    dtype = torch.float64 if p is None else p.dtype
    ones = torch.ones((1, *in_shape), dtype=dtype, device=None if p is None else p.device)
    with torch.enable_grad():
        ones.requires_grad_(True)
        rows = apply_abs(layer, ones)
        cols, = torch.autograd.grad(rows.sum(), ones)
    bound = math.sqrt(rows.max().item() * cols.max().item())
    return bound * (1 + 2 * gamma(math.prod(in_shape) + PAD, unit_roundoff(dtype)))


def through_groupsort(err: torch.Tensor) -> torch.Tensor:
    """E after MaxMin (ClampGroupSort) of channel halves: max and min of two values move by
    at most the larger of their errors; the clamps are exact."""
    a, b = err.chunk(2, dim=1)
    m = torch.maximum(a, b)
    return torch.cat([m, m], dim=1)


def margin_allowance(weight: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                     worst: torch.Tensor, logit_err: torch.Tensor, r: torch.Tensor,
                     lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[batch, classes] (0 at the label): what rounding can take from the margin of class
    j against label y, to be subtracted before a certificate is decided:
      2 (E_y + E_j)       the logits at the centre and at any point of the ball, each against
                          the real network (logit_err = E of the logit layer [batch, classes]);
      the worst-case-logit algorithm's own rounding (it runs in float64): gamma(h + PAD) of
      |w_j - w_y|^T max(|lo|, |hi|), plus ||w_j - w_y|| r sqrt(3 gamma(h + PAD)) for the
      square root of its remaining budget r^2 - sum c_i^2 (a difference that may cancel);
      the margin's subtraction in float64: gamma(3) (|z_y| + |z_j| + |a_j|).
    weight [classes, hidden] (float64), y [batch], logits [batch, classes], worst a_j
    [batch, classes], r [batch] and lo, hi [batch, hidden] as given to the algorithm."""
    u64 = unit_roundoff(torch.float64)
    g = gamma(weight.shape[1] + PAD, u64)
    weight, logits, worst, logit_err, r, lo, hi = (t.double() for t in (
        weight, logits, worst, logit_err, r, lo, hi))
    w = weight.unsqueeze(0) - weight[y].unsqueeze(1)               # [batch, classes, hidden]
    reach = torch.maximum(lo.abs(), hi.abs()).unsqueeze(1)         # [batch, 1, hidden]
    bcp = g * (w.abs() * reach).sum(-1) + w.norm(dim=-1) * r.view(-1, 1) * math.sqrt(3 * g)
    ey = logit_err.gather(1, y.view(-1, 1))
    zy = logits.gather(1, y.view(-1, 1)).abs()
    total = 2 * (ey + logit_err) + bcp * (1 + g) + gamma(3, u64) * (zy + logits.abs()
                                                                     + worst.abs())
    return total.scatter(1, y.view(-1, 1), 0.0)

