"""Soundness checks that can fail, shared by test_soundness.py, test_radius.py and
test_mutations.py (which runs them with the bound made deliberately too optimistic and
asserts that they catch it).

* Near-tight networks (their certified radius is within 1% below the exact minimal
  adversarial L2 distance, known in closed form): a single Linear layer (the bound is exact:
  radius = min_j margin_j / ||w_y - w_j||), and ReLU networks whose hidden weight matrices
  are orthogonal times a scalar, with biases large enough that every neuron stays active in
  the balls looked at (the network is affine there, and the product of the layers' norms is
  the norm of their product).
* Attacks at a point's certified radius: samples on the sphere of that radius and PGD in
  the ball of that radius, started from the direction of steepest margin descent.
* The exact minimal adversarial L2 distance of small 2-D ReLU networks, by enumerating
  their linear regions (convex polygons, Sutherland-Hodgman clipping), recomputed in exact
  rational arithmetic where a radius comes within 1e-9 of it.
* patch_everywhere: a function replaced in every module that imported it by name (the
  mutations of test_mutations.py).
"""
import numpy as np
import torch
import torch.nn as nn

import locallip
from locallip.models import ReLU_x


# ----------------------------------------------------------------------------------------
# Near-tight networks
# ----------------------------------------------------------------------------------------
def _orthogonal(n, scale, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)) * scale


def linear_net(d=6, classes=4, seed=0):
    """One Linear layer: the local bound is exact."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, classes)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(classes, d, generator=gen, dtype=torch.float64))
        net[0].bias.copy_(torch.randn(classes, generator=gen, dtype=torch.float64))
    return net


def orthogonal_net(d=6, classes=4, seed=0, scales=(1.5, 0.7), act='relu', bias=30.0):
    """Linear(d, d) A [Linear(d, d) A ...] Linear(d, classes), each hidden weight an
    orthogonal matrix times its scale, biases such that every pre-activation of x = 0 is
    ``bias`` (every neuron active near the inputs ``near_tight_inputs`` gives), the logits
    0 at x = 0; A = nn.ReLU, or ReLU_x with a threshold far above
    the pre-activations (active and below it: varying, the identity)."""
    gen = torch.Generator().manual_seed(seed)
    layers, h0 = [], torch.zeros(d, dtype=torch.float64)    # h0: the features of x = 0
    for s in scales:
        lin = nn.Linear(d, d).double()
        with torch.no_grad():
            lin.weight.copy_(_orthogonal(d, s, gen))
            lin.bias.copy_(bias - lin.weight @ h0)            # every pre-activation of 0: bias
        h0 = torch.full((d,), float(bias), dtype=torch.float64)
        layers += [lin, nn.ReLU() if act == 'relu' else ReLU_x((d,), 1e4).double()]
    last = nn.Linear(d, classes).double()
    net = nn.Sequential(*layers, last).double()
    with torch.no_grad():
        last.weight.copy_(torch.randn(classes, d, generator=gen, dtype=torch.float64))
        last.bias.zero_()
        last.bias.copy_(-net(torch.zeros(1, d, dtype=torch.float64))[0])   # logits 0 at x = 0
    return net


def near_tight_inputs(net, n=24, seed=1, scale=1.0):
    """n seeded float64 inputs of the network's input dimension."""
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, net[0].in_features, generator=gen, dtype=torch.float64)


def affine_exact_distance(net, x, y):
    """Exact minimal adversarial L2 distance [batch] of a network that is affine around x
    (a Linear layer, or orthogonal_net while no neuron leaves its active side): min over
    j != y of (z_y - z_j) / ||J_y - J_j||, J the Jacobian. Checks that the network is affine
    on a ball of twice that radius (every pre-activation stays positive there)."""
    xr = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = net(xr)
        jac = torch.stack([torch.autograd.grad(z[:, j].sum(), xr, retain_graph=True)[0]
                           for j in range(z.shape[1])], 1)          # [batch, classes, d]
    with torch.no_grad():
        z = net(x)
        gap = z.gather(1, y.view(-1, 1)) - z                       # z_y - z_j
        diff = (jac.gather(1, y.view(-1, 1, 1).expand(-1, 1, jac.shape[2])) - jac).norm(dim=2)
        dist = (gap / diff).scatter(1, y.view(-1, 1), float('inf')).min(1).values
        h, radius = x, 2 * dist
        for m in list(net)[:-1]:
            if isinstance(m, nn.Linear):
                h = m(h)
                radius = radius * torch.linalg.matrix_norm(m.weight, 2)
                # every pre-activation stays above 0 (and below a ReLU_x threshold) in the ball
                assert (h.min(1).values > radius).all(), "the network is not affine there"
            else:
                top = float(m.threshold.min()) if isinstance(m, ReLU_x) else float('inf')
                assert (h.max(1).values + radius < top).all(), "the network is not affine there"
                h = m(h)
    return dist


# ----------------------------------------------------------------------------------------
# Attacks at the certified radius
# ----------------------------------------------------------------------------------------
INSIDE = 1e-12      # attack points are placed this much (relative) inside the sphere, so
#                     that rounding never puts one outside the ball (they are checked)


def _bview(t, like):
    return t.view(-1, *([1] * (like.dim() - 1)))


def _margins(net, x, y):
    """[batch, classes] z_j - z_y (0 at y); > 0 somewhere: the label changed."""
    z = net(x)
    return z - z.gather(1, y.view(-1, 1))


def steepest_start(net, x, y):
    """Unit directions [batch, ...] of steepest margin descent: for each class j the
    gradient g_j of z_j - z_y, normalised; the one whose first-order distance to the
    boundary, (z_y - z_j) / ||g_j||, is the smallest (exact for an affine network)."""
    classes = net(x[:1]).shape[1]
    xr = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        m = _margins(net, xr, y)
        grads = torch.stack([torch.autograd.grad(m[:, j].sum(), xr, retain_graph=True)[0]
                             for j in range(classes)], 1)          # [batch, classes, ...]
    norms = grads.flatten(2).norm(dim=2)
    first = (-m.detach() / norms.clamp_min(1e-300)).scatter(1, y.view(-1, 1), float('inf'))
    j = first.argmin(1)
    g = grads[torch.arange(x.shape[0]), j]
    return g / _bview(norms[torch.arange(x.shape[0]), j].clamp_min(1e-300), x)


def pgd_at_radius(net, x, y, radius, steps=30):
    """PGD-L2 on the margin max_{j != y} z_j - z_y in the ball of radius ``radius`` [batch]
    around each point, from x + radius * steepest_start, steps of radius / 8 (halved after
    each third of the run), every iterate projected into the ball and checked. Returns
    [batch] bool: some iterate inside the ball changes the label."""
    radius = radius.to(device=x.device, dtype=x.dtype)
    rr = _bview(radius, x) * (1 - INSIDE)
    d = steepest_start(net, x, y) * rr
    flipped = torch.zeros(x.shape[0], dtype=torch.bool)
    for k in range(steps + 1):
        d = d * (rr / d.flatten(1).norm(dim=1).view_as(rr).clamp_min(1e-300)).clamp(max=1.0)
        xa = (x + d).detach().requires_grad_(True)
        with torch.enable_grad():
            m = _margins(net, xa, y).scatter(1, y.view(-1, 1), float('-inf')).max(1).values
            g, = torch.autograd.grad(m.sum(), xa)
        inside = (xa - x).flatten(1).norm(dim=1) <= radius
        flipped |= ((m > 0) & inside).detach().cpu()
        if k == steps:
            break
        step = rr / 8 / 2 ** (3 * k // steps)
        d = d + step * g / _bview(g.flatten(1).norm(dim=1).clamp_min(1e-300), x)
    return flipped


def largest_gaps(net, x, y, eps, steps=40):
    """[batch, classes] the largest z_i - z_y that projected gradient ascent finds in the
    L2 eps-ball around each point, for every class i (0 at y): from x + eps * the unit
    gradient of z_i - z_y, steps of eps / 8 (halved after each third), every iterate
    projected into the ball and counted. A lower bound of the true maximum: the bound's
    worst-case logits must lie above it."""
    classes = net(x[:1]).shape[1]
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0])
    rr = _bview(eps, x) * (1 - INSIDE)
    best = torch.full((x.shape[0], classes), -float('inf'), dtype=x.dtype, device=x.device)

    def gap_and_grad(p, i):
        p = p.detach().requires_grad_(True)
        with torch.enable_grad():
            g = _margins(net, p, y)[:, i]
            grad, = torch.autograd.grad(g.sum(), p)
        return g.detach(), grad
    for i in range(classes):
        _, grad = gap_and_grad(x, i)
        unit = grad / _bview(grad.flatten(1).norm(dim=1).clamp_min(1e-300), x)
        d = unit * rr
        for k in range(steps + 1):
            d = d * (rr / _bview(d.flatten(1).norm(dim=1), x).clamp_min(1e-300)).clamp(max=1.0)
            g, grad = gap_and_grad(x + d, i)
            best[:, i] = torch.maximum(best[:, i], g)
            if k == steps:
                break
            step = rr / 8 / 2 ** (3 * k // steps)
            d = d + step * grad / _bview(grad.flatten(1).norm(dim=1).clamp_min(1e-300), x)
    return best.scatter(1, y.view(-1, 1), 0.0)


def sphere_flips(net, x, y, radius, n=200, seed=0):
    """[batch] bool: one of n seeded points on the sphere of radius ``radius`` [batch]
    around each point (float64) changes its label."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, *x.shape, generator=gen, dtype=torch.float64).to(x.device)
    d = d / d.flatten(2).norm(dim=2).view(n, -1, *([1] * (x.dim() - 1)))
    radius = radius.to(device=x.device, dtype=torch.float64)
    d = d * radius.view(1, -1, *([1] * (x.dim() - 1))) * (1 - INSIDE)
    pts = (x.double().unsqueeze(0) + d).to(x.dtype)
    keep = ((pts - x.unsqueeze(0)).flatten(2).norm(dim=2) <= radius.view(1, -1)).view(
        n, -1, *([1] * (x.dim() - 1)))
    pts = torch.where(keep, pts, x.unsqueeze(0))       # never a point outside the ball
    with torch.no_grad():
        pred = net(pts.reshape(-1, *x.shape[1:])).argmax(1).view(n, -1)
    return (pred != y.view(1, -1)).any(0).cpu()


def flips_within(net, x, y, radius, samples=200, steps=30):
    """[batch] bool: the sphere samples or PGD change the label within ``radius``."""
    out = pgd_at_radius(net, x, y, radius, steps)
    return out | sphere_flips(net, x, y, radius, samples) if samples else out


# ----------------------------------------------------------------------------------------
# Checks: each returns what it found, every count a test can assert on
# ----------------------------------------------------------------------------------------
REFERENCE_RTOL = 1e-6   # the reference certificate's allowance above the exact distance: its
#                        power-iteration estimates approach each norm from below and stop at a
#                        change of TOL = 1e-3 in the vector, i.e. ~TOL^2 on the norm
ATTACK_SLACK = {'reference': REFERENCE_RTOL, 'guaranteed': 1e-9}   # attacked this much inside


def radius_check(net, x, certificate, exact=None, samples=200, steps=30):
    """The certified radii of ``net`` at x (labels: its predictions) attacked at the radius
    itself (sphere samples, PGD; ATTACK_SLACK inside it) and, with ``exact``, compared with
    the exact minimal adversarial distances: a tensor [batch] (float64, affine networks; allowance
    REFERENCE_RTOL for the reference certificate, 1e-12 for the guaranteed one, the float64
    error of the distance) or an ExactDistances (2-D networks; the guaranteed radius checked
    in rational arithmetic where it is within 1e-9 of the distance: no allowance).
    Returns a dict: radius [batch] (float64), attacked (points with radius > 0), broken
    (certified points an attack flipped within their radius), above (radii above the exact
    distance), tight (radii above 2/3 of it: what a radius inflated 1.5 times would break)."""
    with torch.no_grad():
        y = net(x).argmax(1)
    r = locallip.certified_radius(net, x, y, certificate=certificate)
    radius = r.radius.to(torch.float64)
    sel = (radius > 0).nonzero().flatten()
    out = {'radius': radius, 'attacked': int(sel.numel()), 'broken': 0, 'above': 0, 'tight': 0}
    if sel.numel():
        # attacked just inside the radius (ATTACK_SLACK): where the radius is the exact
        # distance, a point on the boundary ties in exact arithmetic and float rounding
        # decides its label; an infinite or huge radius is attacked at 1e6
        rad = radius[sel].clamp(max=1e6) * (1 - ATTACK_SLACK[certificate])
        idx = sel.to(x.device)
        out['broken'] = int(flips_within(net, x[idx], y[idx], rad, samples, steps).sum())
    if exact is not None:
        dist = exact.dist if isinstance(exact, ExactDistances) else exact.double().cpu()
        known = torch.isfinite(dist)
        if certificate == 'reference':
            above = radius > dist * (1 + REFERENCE_RTOL)
        elif isinstance(exact, ExactDistances):
            above = above_exact(radius, exact)
        else:
            above = radius > dist * (1 + 1e-12)
        out['above'] = int((above & known).sum())
        out['tight'] = int((radius > dist / 1.5).sum())
    return out


def worst_logit_check(net, x, y, eps):
    """compute_bound's worst-case logits at radius eps (converged power iterations) against
    the largest gaps ascent finds in the ball: returns {'above': found gaps above the bound
    (violations), 'attained': the smallest fraction of a_iy that ascent reaches, over the
    classes i != y of every point}."""
    from locallip.bound import compute_bound
    with torch.no_grad():
        res = compute_bound(net, x, y, eps, None, None, sniter=2000, tol=1e-10, opt_iter=1000,
                            check=True)
    clean = res.logits - res.logits.gather(1, y.view(-1, 1))
    worst = res.worst.to(clean.dtype)
    found = largest_gaps(net, x, y, eps)
    other = torch.ones_like(clean, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
    bound = clean + worst
    above = (found > bound + 1e-9 * (1 + bound.abs())) & other
    return {'above': int(above.sum()), 'attained': float(((found - clean) / worst)[other].min())}


def attack_works(net, x, factor=1.05, samples=200, steps=30):
    """How many of the points x the attacks flip at ``factor`` times their exact minimal
    adversarial distance (affine_exact_distance): the attacks' own check."""
    with torch.no_grad():
        y = net(x).argmax(1)
    dist = affine_exact_distance(net, x, y)
    return int(flips_within(net, x, y, factor * dist, samples, steps).sum())


def certify_check(net, x, exact, certificate, factors=(0.5, 0.999, 1.001, 1.05)):
    """certify(...) of each point at eps = f * exact[k] for each f (one call per point, all
    its radii): a certificate with f > 1 is a violation. Returns {'certified': {f: count},
    'above': certificates with f > 1, 'points': points checked}."""
    with torch.no_grad():
        y = net(x).argmax(1)
    counts = dict.fromkeys(factors, 0)
    for k in range(x.shape[0]):
        radii = [f * float(exact[k]) for f in factors]
        got = locallip.certify(net, x[k:k + 1], y[k:k + 1], eps=radii, certificate=certificate)
        for f, e in zip(factors, radii):
            counts[f] += int(got[e][0])
    return {'certified': counts, 'above': sum(c for f, c in counts.items() if f > 1),
            'points': x.shape[0]}


# ----------------------------------------------------------------------------------------
# Exact minimal adversarial distance of 2-D ReLU networks
# ----------------------------------------------------------------------------------------
def clip_halfplane(poly, a, c):
    """Sutherland-Hodgman: the convex polygon ``poly`` [k, 2] (counter-clockwise) clipped to
    {p : a . p + c >= 0}; [m, 2] (m may be 0, or < 3 where it only touches the line)."""
    if len(poly) == 0:
        return poly
    s = poly @ a + c
    out = []
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if s[i] >= 0:
            out.append(poly[i])
        if (s[i] >= 0) != (s[j] >= 0):
            t = s[i] / (s[i] - s[j])
            out.append(poly[i] + t * (poly[j] - poly[i]))
    return np.array(out).reshape(-1, 2)


def polygon_area(poly):
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _layers(net):
    mods = list(net)
    for m in mods:
        assert isinstance(m, (nn.Linear, nn.ReLU)), f"exact regions: Linear / ReLU only, got {m}"
    lin = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
           for m in mods if isinstance(m, nn.Linear)]
    assert net[0].in_features == 2, "exact regions: 2-D inputs only"
    return lin[:-1], lin[-1]


def linear_regions(net, half=30.0):
    """The linear regions of a 2-D ReLU network (Linear, ReLU, ..., Linear) within the box
    [-half, half]^2: [(polygon [k, 2], A [classes, 2], c [classes], pattern)], the logits
    A p + c on the polygon, pattern the tuple of each hidden layer's 0/1 activation
    pattern. Each hidden layer splits every region by the sign of each of its
    pre-activations, affine in the input within the region."""
    hidden, (wf, bf) = _layers(net)
    box = np.array([[-half, -half], [half, -half], [half, half], [-half, half]], dtype=np.float64)
    regions = [(box, np.eye(2), np.zeros(2), ())]
    for w, b in hidden:
        new = []
        for poly, a, c, pattern in regions:
            wa, wc = w @ a, w @ c + b
            pieces = [(poly, np.ones(len(b)))]
            for k in range(len(b)):
                nxt = []
                for p, pat in pieces:
                    for side in (1.0, 0.0):
                        sign = 1.0 if side else -1.0
                        q = clip_halfplane(p, sign * wa[k], sign * wc[k])
                        if polygon_area(q) > 0:
                            pat2 = pat.copy()
                            pat2[k] = side
                            nxt.append((q, pat2))
                pieces = nxt
            new += [(p, pat[:, None] * wa, pat * wc, pattern + (pat,)) for p, pat in pieces]
        regions = new
    return [(p, wf @ a, wf @ c + bf, pattern) for p, a, c, pattern in regions]


def adversarial_polygons(regions, label):
    """[(polygon, region index, j)]: convex polygons whose union is {p in the box :
    z_j(p) >= z_label(p) for some j}."""
    out = []
    for r, (poly, a, c, _) in enumerate(regions):
        for j in range(a.shape[0]):
            if j != label:
                q = clip_halfplane(poly, a[j] - a[label], c[j] - c[label])
                if len(q):
                    out.append((q, r, j))
    return out


def polygon_distance(poly, pts):
    """(distance [n], nearest point [n, 2]) from each point to the closed convex polygon
    (a segment or a point when degenerate): 0 inside, else the nearest edge point."""
    v, w = poly, np.roll(poly, -1, axis=0)
    e = w - v                                                    # [k, 2]
    rel = pts[:, None, :] - v[None]                              # [n, k, 2]
    ee = np.maximum((e * e).sum(1), 1e-300)
    t = np.clip((rel * e[None]).sum(2) / ee[None], 0.0, 1.0)
    near = v[None] + t[..., None] * e[None]                      # [n, k, 2]
    dist = np.linalg.norm(pts[:, None, :] - near, axis=2)
    k = dist.argmin(1)
    best, point = dist[np.arange(len(pts)), k], near[np.arange(len(pts)), k]
    if polygon_area(poly) > 0:
        cross = e[None, :, 0] * rel[..., 1] - e[None, :, 1] * rel[..., 0]
        inside = (cross >= 0).all(1)
        best = np.where(inside, 0.0, best)
        point = np.where(inside[:, None], pts, point)
    return best, point


class ExactDistances:
    """The exact minimal adversarial L2 distances of 2-D inputs x [n, 2] of a ReLU
    network (labels: its predictions y [n]): ``dist`` [n] to the nearest point where
    another logit reaches the label's (NaN where that point may lie outside the box, whose
    boundary is nearer than every adversarial polygon found), ``near`` [n, 2] that point
    and ``polygon[k]`` the adversarial polygon it lies on.
    Float64; ``squared_fraction(k)`` recomputes point k's squared distance in exact
    rational arithmetic (from the float64 weights and input)."""

    def __init__(self, net, x, half=30.0):
        self.net, self.half = net, half
        with torch.no_grad():
            self.y = net(x).argmax(1)
        self.regions = linear_regions(net, half)
        self.pts = x.detach().double().numpy()
        n = len(self.pts)
        dist, near = np.full(n, np.inf), np.zeros_like(self.pts)
        self.polygon = [None] * n      # the adversarial polygon holding each ``near``
        labels = self.y.numpy()
        self.candidates = [[] for _ in range(n)]       # (float distance, region, j) per point
        for label in np.unique(labels):
            rows = np.nonzero(labels == label)[0]
            for poly, r, j in adversarial_polygons(self.regions, int(label)):
                d, p = polygon_distance(poly, self.pts[rows])
                for k, dk in zip(rows, d):
                    self.candidates[k].append((float(dk), r, j))
                better = d < dist[rows]
                dist[rows[better]], near[rows[better]] = d[better], p[better]
                for k in rows[better]:
                    self.polygon[k] = poly
        to_box = half - np.abs(self.pts).max(1)
        self.dist = torch.from_numpy(np.where(dist <= to_box, dist, np.nan))
        self.near = torch.from_numpy(near)

    def squared_fraction(self, k, rel=1e-9):
        """Point k's squared exact distance as a Fraction: the minimum over the adversarial
        polygons within ``rel`` of its float distance, each the set {p : a_i . p + c_i >= 0}
        of its region's half-planes (box, activation pattern, z_j >= z_y), in rationals."""
        from fractions import Fraction as Q
        hidden, (wf, bf) = _layers(self.net)
        hidden_q = [([[Q(float(v)) for v in row] for row in w], [Q(float(v)) for v in b])
                    for w, b in hidden]
        wf_q = [[Q(float(v)) for v in row] for row in wf]
        bf_q = [Q(float(v)) for v in bf]
        px, py = (Q(float(v)) for v in self.pts[k])
        best = min(d for d, _, _ in self.candidates[k])
        out = None
        label = int(self.y[k])
        for d, r, j in self.candidates[k]:
            if d > best * (1 + rel) + 1e-12:
                continue
            h = Q(self.half)
            planes = [(Q(1), Q(0), h), (Q(-1), Q(0), h), (Q(0), Q(1), h), (Q(0), Q(-1), h)]
            a = [[Q(1), Q(0)], [Q(0), Q(1)]]             # features = a p + c
            c = [Q(0), Q(0)]
            for (w, b), pat in zip(hidden_q, self.regions[r][3]):
                pa = [[sum(w[i][m] * a[m][t] for m in range(len(a))) for t in range(2)]
                      for i in range(len(w))]
                pc = [sum(w[i][m] * c[m] for m in range(len(c))) + b[i] for i in range(len(w))]
                for i in range(len(w)):
                    s = 1 if pat[i] else -1
                    planes.append((s * pa[i][0], s * pa[i][1], s * pc[i]))
                a = [[pa[i][t] * int(pat[i]) for t in range(2)] for i in range(len(w))]
                c = [pc[i] * int(pat[i]) for i in range(len(w))]
            za = [[sum(wf_q[i][m] * a[m][t] for m in range(len(a))) for t in range(2)]
                  for i in range(len(wf_q))]
            zc = [sum(wf_q[i][m] * c[m] for m in range(len(c))) + bf_q[i] for i in range(len(wf_q))]
            planes.append((za[j][0] - za[label][0], za[j][1] - za[label][1], zc[j] - zc[label]))
            d2 = _halfplanes_distance2(planes, px, py)
            if d2 is not None and (out is None or d2 < out):
                out = d2
        return out


def _halfplanes_distance2(planes, px, py):
    """Squared distance (Fraction) from (px, py) to {p : ax p_x + ay p_y + c >= 0 for each
    plane}, a bounded convex polygon, or None when it is empty: 0 inside, else the nearest
    of the feasible projections onto one line and the feasible vertices of two."""
    def feasible(qx, qy):
        return all(ax * qx + ay * qy + c >= 0 for ax, ay, c in planes)
    if feasible(px, py):
        return 0
    best = None
    for ax, ay, c in planes:
        nn2 = ax * ax + ay * ay
        if nn2 == 0:
            continue
        s = (ax * px + ay * py + c) / nn2
        qx, qy = px - s * ax, py - s * ay
        if feasible(qx, qy):
            d2 = (qx - px) ** 2 + (qy - py) ** 2
            best = d2 if best is None or d2 < best else best
    for i, (a1x, a1y, c1) in enumerate(planes):
        for a2x, a2y, c2 in planes[i + 1:]:
            det = a1x * a2y - a1y * a2x
            if det == 0:
                continue
            qx, qy = (-c1 * a2y + c2 * a1y) / det, (-a1x * c2 + a2x * c1) / det
            if feasible(qx, qy):
                d2 = (qx - px) ** 2 + (qy - py) ** 2
                best = d2 if best is None or d2 < best else best
    return best


def above_exact(radius, exact: 'ExactDistances', rel=1e-9):
    """[n] bool: radius > the exact distance: clearly (by more than ``rel`` relative, in
    float64), or, within that, in exact rational arithmetic (radius^2 > distance^2)."""
    from fractions import Fraction as Q
    radius = radius.to(torch.float64)
    dist = exact.dist
    out = radius > dist * (1 + rel)
    near = (radius > dist * (1 - rel)) & ~out
    for k in near.nonzero().flatten().tolist():
        d2 = exact.squared_fraction(k)
        out[k] = d2 is not None and Q(float(radius[k])) ** 2 > d2
    return out


def random_relu_net(hidden=(5,), classes=3, seed=0, bias=0.5):
    """A seeded float64 Linear(2, h1) ReLU [Linear(h1, h2) ReLU] Linear(h, classes)."""
    gen = torch.Generator().manual_seed(seed)
    dims, layers = (2, *hidden), []
    for i, o in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(i, o), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], classes))
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(bias * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
    return net


# ----------------------------------------------------------------------------------------
# Mutations: the bound made deliberately too optimistic
# ----------------------------------------------------------------------------------------
def patch_everywhere(monkeypatch, module, name, replacement):
    """Replace module.name by ``replacement`` in every loaded module that holds it (the
    module itself and every ``from module import name``); returns how many were patched."""
    import sys
    original = getattr(module, name)
    count = 0
    for mod in list(sys.modules.values()):
        if mod is None:
            continue
        try:
            attrs = vars(mod)
        except TypeError:
            continue
        for attr, value in list(attrs.items()):
            if value is original:
                monkeypatch.setattr(mod, attr, replacement)
                count += 1
    return count
