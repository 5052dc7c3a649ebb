"""The certified training step: the Local-Lip bound of a batch from its stored
power-iteration vectors, the certified loss (cross-entropy of the worst-case logits mixed
with the clean one by kappa, or GloRo's), and its compiled form (--compile)."""
from dataclasses import dataclass
from typing import NamedTuple

import torch

from locallip.bound import FLOOR, certified_loss, compute_bound, sparsity_loss
from locallip.errors import UnsupportedModel, UserError
from locallip.layers import layer_list, training_view
from locallip.operators import NORM_EPS, global_vector_shape
from locallip.vectors import GivenVectors


@dataclass(frozen=True)
class StepSettings:
    """The switches of the certified step (``step_settings`` reads them from the flags)."""
    sniter: int                      # per-sample and global power iterations (--sniter)
    opt_iter: int                    # worst-case-logit rounds (--opt_iter)
    bound: str = 'local'             # 'local' or 'global'
    pi_grad: str = 'all'             # gradients through every power iteration, or the last
    estimate: str = 'bilinear'       # the spectral-norm estimate
    gloro: bool = False              # the GloRo loss instead of BCP's
    sparse: float = 0.0              # weight of the sparsity loss (TinyImageNet)
    sp_thres: float = 0.1            # its threshold term's weight
    compile: bool = False            # torch.compile'd (sync-free loops)


class StepResult(NamedTuple):
    """certified_step's result (a named tuple: torch.compile returns it as it is)."""
    loss: torch.Tensor               # 0-dim: kappa CE + (1 - kappa) robust (BCP) or robust
    clean: torch.Tensor              # 0-dim clean cross-entropy
    robust: torch.Tensor             # 0-dim cross-entropy on the worst-case logits
    logits: torch.Tensor             # [batch, classes]
    not_certified: torch.Tensor      # 0-dim count
    lip_ratio: torch.Tensor          # 0-dim sum over the batch of local / global bound
    varying: dict                    # activation index -> 0-dim summed fraction varying
    vectors: dict                    # affine index -> final vectors [batch, *in_shape]


def certified_step(model, x, y, eps, kappa, given, global_vectors,
                   settings: StepSettings) -> StepResult:
    """The certified part of a training step: the bound from the ``given`` starting vectors
    {affine index: [batch, *in_shape]} and the training loss (what --compile compiles).
    x [batch, *input_shape], y [batch], eps: the L2 radius (float), kappa: the CE weight;
    ``global_vectors`` is updated in place."""
    s = settings
    vectors = GivenVectors(given)
    res = compute_bound(model, x, y, eps, vectors, global_vectors, sniter=s.sniter,
                        opt_iter=s.opt_iter, bound=s.bound, pi_grad=s.pi_grad,
                        estimate=s.estimate, reference_nan=True, sync_free=s.compile)
    sp = sparsity_loss(model, res, s.sp_thres) if s.sparse else None
    loss, clean, rob = certified_loss(res, y, kappa, s.gloro, sp, s.sparse)
    with torch.no_grad():   # the paper's training figures: local / global bound, sparsity
        rerr = (~res.certified(y)).sum()
        ratio = (res.r_local / res.r_global.clamp_min(FLOOR)).sum()
        varying = {k: d.flatten(1).mean(1).sum() for k, d in res.masks.items()}
    return StepResult(loss, clean, rob, res.logits, rerr, ratio, varying, vectors.out)


def start_global_vectors(global_vectors, model, shapes, x):
    """Draw the missing global power-iteration vectors [1, *global_vector_shape] as
    compute_bound would on first use (same order, same generator), but outside compiled
    code, whose random numbers differ from eager ones."""
    layers = layer_list(model)
    for k, s in shapes.items():
        if k not in global_vectors:
            global_vectors[k] = torch.randn((1, *global_vector_shape(layers[k], s)),
                                            device=x.device, dtype=x.dtype)


GLOBAL_LINEAR_SPACE = 'output'   # checkpoints say where a linear layer's global vector lives


def resumed_global_vectors(saved, model, shapes, device, say, linear_space='output'):
    """The global vectors of a checkpoint, on ``device``. ``linear_space``: where the
    checkpoint's linear-layer vectors live; checkpoints written before they moved to the
    output space (as the reference's) say nothing and hold them in the input space: each is
    carried over as normalize(W u), the output vector the next iteration reaches from it,
    so the warm start is kept. A shape that does not fit is refused, both shapes named."""
    if linear_space not in ('input', 'output'):
        raise UserError(f"checkpoint's global vectors: unknown space {linear_space!r}")
    out, layers = {}, layer_list(model)
    for k, v in saved.items():
        k, v = int(k), v.to(device)
        convert = isinstance(layers[k], torch.nn.Linear) and linear_space == 'input'
        want = (1, *(shapes[k] if convert else global_vector_shape(layers[k], shapes[k])))
        if tuple(v.shape) != want:
            raise UserError(f"checkpoint's global vector of layer {k} has shape "
                            f"{tuple(v.shape)}, the model needs {want}")
        if convert:
            with torch.no_grad():
                w = layers[k].weight
                v = v.to(w.dtype) @ w.t()
                v = v / (v.norm() + NORM_EPS)
            say(f"layer {k}: global vector carried from the input to the output space")
        out[k] = v
    return out


def stored_step(step_fn, model, x, y, eps, kappa, vectors, shapes, global_vectors,
                settings: StepSettings) -> StepResult:
    """``step_fn`` (certified_step, maybe compiled) with its starting vectors read from
    ``vectors`` (a vector store's batch, or RandomVectors) for the layers of ``shapes``
    {affine index: in_shape}, and the final ones written back."""
    try:                                  # BatchNorm folded by the batch's statistics
        model = training_view(model, x)
    except UnsupportedModel as e:
        raise UserError(str(e)) from None
    start_global_vectors(global_vectors, model, shapes, x)
    given = {k: vectors.get(k, s) for k, s in shapes.items()}
    out = step_fn(model, x, y, eps, kappa, given, global_vectors, settings)
    for k, u in out.vectors.items():
        vectors.put(k, u)
    if settings.compile:                  # CUDA graphs reuse their outputs' memory at the
        for k in global_vectors:          # next replay: keep what outlives the step
            global_vectors[k] = global_vectors[k].clone()
        out = out._replace(loss=out.loss.clone())
    return out


_COMPILED = {}


def step_function(compiled: bool, device, backend='inductor', fullgraph=False):
    """certified_step, or when ``compiled`` (--compile) its torch.compile'd version (one per
    device type and backend; 'reduce-overhead', CUDA graphs, on CUDA). The tests compile
    with backend 'aot_eager' (no code generation: fast) and fullgraph=True (a graph break
    raises: the whole step is one graph)."""
    if not compiled:
        return certified_step
    key = (torch.device(device).type, backend, fullgraph)
    if key not in _COMPILED:
        cuda = key[0] == 'cuda' and backend == 'inductor'
        _COMPILED[key] = torch.compile(certified_step, backend=backend, fullgraph=fullgraph,
                                       mode='reduce-overhead' if cuda else None)
    return _COMPILED[key]


def clean_step(model, x, y) -> StepResult:
    """A warm-up step's numbers: cross-entropy only (no bound: NaN statistics)."""
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    nan = torch.tensor(float('nan'), device=x.device)
    return StepResult(loss, loss, loss, logits, nan, nan, {}, {})


