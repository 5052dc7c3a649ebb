"""The optimised bound equals a literal transcription of the spec (sections 3 and 4):
certified loss and every parameter gradient, to 1e-5 relative."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import dev, tiny_net
from local_bound import apply_W, apply_WT, certified_loss, compute_bound
from utils import ClampGroupSort, Flatten, ReLU_x, select_model


class FixedVectors:
    """The same starting vectors for both implementations."""

    def __init__(self, vecs):
        self.vecs = vecs

    def get(self, key, shape):
        return self.vecs[key].clone()

    def put(self, key, u):
        pass


def unit(u):
    return u / u.flatten(1).norm(dim=1).view(-1, *([1] * (u.dim() - 1)))


def literal_loss(model, x, y, eps, vecs, gvecs, sniter, opt_iter, kappa, tol=1e-3):
    """Spec sections 3-4, written out with no fusion and the all-pairs worst case."""
    affine = [i for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = affine[-1]
    mu, r = x, torch.full((x.shape[0],), eps, dtype=x.dtype, device=x.device)
    lb, ub = x - eps, x + eps
    bc = lambda v, t: v.view(-1, *([1] * (t.dim() - 1)))
    feeding = None           # indicator of the activation feeding the next affine layer
    layers = []              # [module index, D_in, D_out]
    for i, m in enumerate(model):
        if isinstance(m, Flatten):
            mu, lb, ub = mu.flatten(1), lb.flatten(1), ub.flatten(1)
            feeding = None if feeding is None else feeding.flatten(1)
        elif i == last:
            break
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                u = unit(gvecs[i])
                for _ in range(sniter):
                    u = unit(apply_WT(m, apply_W(m, u), u.shape[1:]))
            sig = apply_W(m, u).flatten().norm()
            c, h = (lb + ub) / 2, (ub - lb) / 2
            c, h, mu = m(c), apply_W(m, h, m.weight.abs()), m(mu)
            rn = m.weight.flatten(1).norm(dim=1)
            rn = rn.view(1, -1, 1, 1) if isinstance(m, nn.Conv2d) else rn.view(1, -1)
            lb = torch.maximum(c - h, mu - bc(r, mu) * rn)
            ub = torch.minimum(c + h, mu + bc(r, mu) * rn)
            r = r * sig
            layers.append([i, feeding, None])
            feeding = None
        else:
            g_lb = torch.maximum(m(lb), m(mu - bc(r, mu)))
            g_ub = torch.minimum(m(ub), m(mu + bc(r, mu)))
            if isinstance(m, ReLU_x):
                D = (~((lb > m.threshold) | (ub <= 0))).to(x.dtype)
            elif isinstance(m, nn.ReLU):
                D = (ub > 0).to(x.dtype)
            else:
                hc = g_lb.shape[1] // 2
                D = torch.cat([(g_lb[:, :hc] < m.max), (g_ub[:, hc:] > m.min)], 1).to(x.dtype)
            if not isinstance(m, ClampGroupSort):
                layers[-1][2] = D
            feeding = D
            mu, lb, ub = m(mu), g_lb, g_ub
    prod = torch.ones_like(r)
    for i, d_in, d_out in layers:
        m = model[i]
        din = torch.ones_like(vecs[i]) if d_in is None else d_in
        u = unit(vecs[i] * din)
        for _ in range(sniter):
            v = apply_W(m, u * din)
            v = v if d_out is None else v * d_out
            new = unit(apply_WT(m, v, u.shape[1:]) * din)
            change = (new - u).flatten(1).norm(dim=1).max().item()
            u = new
            if change < tol:
                break
        v = apply_W(m, u * din)
        v = v if d_out is None else v * d_out
        prod = prod * v.flatten(1).norm(dim=1)
    r_tight = eps * prod
    W = model[last].weight
    logits = model[last](mu)
    lo = torch.clamp(lb - mu, max=0)
    hi = torch.clamp(ub - mu, min=0)
    b, c = logits.shape
    a = torch.zeros(b, c, c, dtype=x.dtype, device=x.device)                       # a[:, i, j], all pairs
    for j in range(c):
        for k in range(c):
            if k == j:
                continue
            w = (W[k] - W[j]).expand(b, -1)
            d = w / w.norm(dim=1, keepdim=True) * r_tight.view(-1, 1)
            fixed = torch.zeros_like(d, dtype=torch.bool)
            for _ in range(opt_iter):
                out = ((d > hi) | (d < lo)) & ~fixed
                if not out.any():
                    break
                fixed = fixed | out
                df = torch.where(fixed, torch.clamp(d, min=lo, max=hi), torch.zeros_like(d))
                rem = torch.sqrt(r_tight ** 2 - (df ** 2).sum(1))
                wf = torch.where(fixed, torch.zeros_like(w), w)
                d = df + wf / wf.norm(dim=1, keepdim=True) * rem.view(-1, 1)
            a[:, k, j] = (w * d).sum(1)
    worst = logits + a[torch.arange(b, device=x.device), :, y]
    return kappa * F.cross_entropy(logits, y) + (1 - kappa) * F.cross_entropy(worst, y)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [('relux', lambda: tiny_net('relux', seed=0), (1, 8, 8)),
         ('relu', lambda: tiny_net('relu', seed=1), (1, 8, 8)),
         ('maxmin', lambda: tiny_net('maxmin', seed=2), (1, 8, 8)),
         ('c6f2_relux', lambda: select_model('cifar10', 'c6f2_relux', 0.5), (3, 32, 32))]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('name,make,shape', CASES, ids=[c[0] for c in CASES])
def test_optimised_equals_literal(name, make, shape, dtype):
    torch.manual_seed(0)
    net = dev(make().to(dtype))
    b = 4
    x = dev(torch.rand(b, *shape, dtype=dtype))
    y = dev(torch.arange(b) % 3)
    eps, kappa = 0.1, 0.3
    # vectors, of the right shapes, drawn once
    from local_bound import layer_input_shapes
    shapes = layer_input_shapes(net, shape)
    vecs = {k: dev(torch.randn(b, *s, dtype=dtype)) for k, s in shapes.items()}
    gvecs = {k: dev(torch.randn(1, *s, dtype=dtype)) for k, s in shapes.items()}
    for sniter, opt_iter in ((2, 1), (5, 10)):
        ref_loss = literal_loss(net, x, y, eps, vecs, gvecs, sniter, opt_iter, kappa)
        ref = grads(net, ref_loss)
        res = compute_bound(net, x, y, eps, FixedVectors(vecs), copy.deepcopy(gvecs),
                            sniter=sniter, opt_iter=opt_iter)
        loss, _, _ = certified_loss(res, y, kappa)
        got = grads(net, loss)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert set(got) == set(ref)
        for k in ref:
            scale = ref[k].abs().max().item()
            assert (got[k] - ref[k]).abs().max().item() <= 1e-5 * max(scale, 1e-12), k


def test_box_max_min_equal_torch_with_ties():
    from local_bound import box_max, box_min
    torch.manual_seed(0)
    a = torch.randint(-3, 4, (5, 7)).double()      # many exact ties
    b = torch.randint(-3, 4, (5, 7)).double()
    g = torch.randn(5, 7, dtype=torch.float64)
    for mine, ref in ((box_max, torch.maximum), (box_min, torch.minimum)):
        outs = []
        for fn in (mine, ref):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            out = fn(x, y)
            out.backward(g)
            outs.append((out.detach(), x.grad, y.grad))
        assert (a == b).any()
        for got, want in zip(*outs):
            assert torch.equal(got, want)
