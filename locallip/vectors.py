"""Starting vectors of the per-sample power iteration, by provider: fresh Gaussian ones,
ones kept for the same batch bounded again, ones handed in, the rows of a searched subset,
and the per-sample store that keeps them across epochs (train and test sets, indexed by
the loader's sample index; in RAM, on the GPU or in a disk file).

Every provider answers ``get(key, shape) -> [batch, *shape]`` (key: the affine layer's
module index, shape: its per-sample input shape) and ``put(key, u)`` (the final vectors).
"""
import math
import os
from typing import Dict, Optional

import numpy as np
import torch


class RandomVectors:
    """Fresh Gaussian starting vectors for every layer (certification from scratch), drawn
    on ``device`` (with ``generator``, which must live there, if given)."""

    def __init__(self, batch: int, device, generator: Optional[torch.Generator] = None):
        self.batch, self.device, self.generator = batch, torch.device(device), generator

    def get(self, key: int, shape) -> torch.Tensor:
        return torch.randn((self.batch, *shape), generator=self.generator, device=self.device)

    def put(self, key: int, u: torch.Tensor) -> None:
        pass


class KeptVectors(RandomVectors):
    """Fresh Gaussian vectors on a layer's first use, then the last vectors ``put`` for it:
    warm start for the same batch bounded again, e.g. at a larger radius (whose varying
    sets contain the smaller radius's, so the old top vector is a close start)."""

    def __init__(self, batch: int, device, generator: Optional[torch.Generator] = None):
        super().__init__(batch, device, generator)
        self.kept: Dict[int, torch.Tensor] = {}

    def get(self, key: int, shape) -> torch.Tensor:
        if key in self.kept:
            return self.kept[key].clone()
        return super().get(key, shape)

    def put(self, key: int, u: torch.Tensor) -> None:
        self.kept[key] = u.detach()      # get() hands out copies


class GivenVectors:
    """Starting vectors handed in, {module index: [batch, *in_shape]}; ``put`` collects the
    final ones in ``out``: the vector store is read before and written after the bound,
    outside compiled code (training --compile)."""

    def __init__(self, given: Dict[int, torch.Tensor]):
        self.given, self.out = given, {}

    def get(self, key: int, shape) -> torch.Tensor:
        return self.given[key]

    def put(self, key: int, u: torch.Tensor) -> None:
        self.out[key] = u.detach()


class SubsetVectors:
    """Power-iteration vectors of a whole batch [batch, *shape] per layer, handed out for
    the rows ``idx`` of the points still searched (fresh Gaussian rows on a layer's first
    use) and written back: every evaluation of the search starts from the vectors of the
    point's previous one (warm start)."""

    def __init__(self, batch: int, device):
        self.batch, self.device = batch, torch.device(device)
        self.kept = {}
        self.idx = None

    def get(self, key, shape):
        if key not in self.kept:
            self.kept[key] = torch.randn((self.batch, *shape), device=self.device)
        return self.kept[key][self.idx].clone()

    def put(self, key, u):
        self.kept[key][self.idx] = u.detach().to(self.kept[key].dtype)


# ----------------------------------------------------------------------------------------
# Per-sample vectors stored across epochs
# ----------------------------------------------------------------------------------------
M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 tensors holding values in [0, 2^32) (products stay
    below 2^63, so it is exact on every device). Works in place on x."""
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(M32)
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(M32)
    x ^= x >> 16
    return x


def counter_normal(seed: int, epoch: int, idx: torch.Tensor, key: int, shape,
                   device) -> torch.Tensor:
    """Standard normal vectors [len(idx), *shape] that depend only on (seed, epoch, sample
    index, layer key, element): the same on every device, batch and process, drawn on
    ``device`` in one pass (a hash of a counter, then Box-Muller), with no host loop."""
    n = math.prod(shape)
    half = (n + 1) // 2
    s = torch.full((1,), (seed * 0x9E3779B1 + 0x7F4A7C15) & M32, dtype=torch.long, device=device)
    s = _mix32(_mix32(s) ^ (epoch & M32))
    s = _mix32(s ^ (key & M32))
    s = _mix32(s ^ idx.to(device=device, dtype=torch.long).view(-1, 1))        # [b, 1]
    j = torch.arange(half, dtype=torch.long, device=device).view(1, -1)
    u1 = _mix32(s ^ _mix32(2 * j)).float().add_(0.5).mul_(1.0 / 2 ** 32)       # (0, 1)
    u2 = _mix32(s ^ _mix32(2 * j + 1)).float().mul_(2 * math.pi / 2 ** 32)     # [0, 2 pi)
    r = u1.log_().mul_(-2.0).sqrt_()
    z = torch.cat([r * torch.cos(u2), r.mul_(torch.sin(u2))], dim=1)[:, :n]
    return z.reshape(len(idx), *shape)


class VectorStore:
    """The per-sample power-iteration vectors of one dataset (train or test), indexed by
    the loader's sample index, one array [n, *in_shape] per stored layer.

    keys: module indices that keep vectors (``--indices``); the others restart from random
    vectors at every step. dtype: storage dtype (float32 or float16; computation is always
    in the model's dtype). path: back the arrays by a file (numpy memmap) instead of RAM.
    device: where the arrays live without a path: 'cpu' (RAM) or a CUDA device (no copies
    between host and GPU at every step). Rows never written hold no vector yet and are handed
    out as fresh Gaussian vectors (``counter_normal``: the same on every device and process).
    """

    def __init__(self, shapes: Dict[int, tuple], n: int, dtype=torch.float32,
                 path: Optional[str] = None, keys=None, device='cpu'):
        self.shapes = {k: tuple(s) for k, s in shapes.items() if keys is None or k in keys}
        self.n, self.dtype, self.path = n, dtype, path
        self.device = torch.device(device)
        if path is not None and self.device.type != 'cpu':
            raise ValueError("a disk-backed vector store lives on the CPU")
        self.seed, self.epoch = 0, 0     # fresh vectors depend on (seed, epoch, sample, layer)
        self.initialized = torch.zeros(n, dtype=torch.bool)     # on the CPU: no GPU syncs
        self.data = {}
        if path is not None:
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            size = n + self.nbytes()          # n flag bytes ("row written"), then the arrays
            reuse = os.path.isfile(path) and os.path.getsize(path) == size   # resume, other ranks
            mm = np.memmap(path, dtype=np.uint8, mode='r+' if reuse else 'w+', shape=(size,))
            self.initialized = torch.from_numpy(mm[:n].view(np.bool_))   # shared by processes
            offset = n
            for k, s in self.shapes.items():
                size = n * math.prod(s) * np.dtype(np_dtype).itemsize
                arr = mm[offset:offset + size].view(np_dtype).reshape(n, *s)
                self.data[k] = torch.from_numpy(arr)
                offset += size
            self._mm = mm
        else:
            for k, s in self.shapes.items():
                self.data[k] = torch.empty((n, *s), dtype=dtype, device=self.device)

    @staticmethod
    def bytes_per_sample(shapes, keys=None, dtype=torch.float32) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) for k, s in shapes.items() if keys is None or k in keys) * elem

    def nbytes(self) -> int:
        return self.n * self.bytes_per_sample(self.shapes, None, self.dtype)

    def batch(self, idx: torch.Tensor, device) -> 'StoredVectors':
        return StoredVectors(self, idx.cpu(), device)

    def state_dict(self):
        if self.path is not None:
            self._mm.flush()
            return {'initialized': self.initialized.clone(), 'path': self.path}
        return {'initialized': self.initialized.clone(), 'data': self.data}

    def load_state_dict(self, state):
        self.initialized.copy_(state['initialized'])
        if 'data' in state:
            for k in self.data:
                self.data[k].copy_(state['data'][k])


class StoredVectors:
    """The vectors of one batch: ``get`` reads the stored rows (fresh where none is stored
    yet or the layer is not stored), ``put`` writes them back."""

    def __init__(self, store: VectorStore, idx: torch.Tensor, device):
        self.store, self.idx, self.device = store, idx, torch.device(device)
        self.fresh = ~store.initialized[idx]
        self.fresh_rows = self.fresh.nonzero().flatten()         # CPU, no device sync
        self.all_fresh = len(self.fresh_rows) == len(idx)
        self._idx_store = idx.to(store.device, non_blocking=True)

    def _fresh(self, key, idx, shape):
        st = self.store
        return counter_normal(st.seed, st.epoch, idx, key, shape, self.device)

    def get(self, key: int, shape) -> torch.Tensor:
        if key not in self.store.data or self.all_fresh:
            return self._fresh(key, self.idx, shape)
        u = self.store.data[key][self._idx_store].to(self.device, torch.float32, non_blocking=True)
        if len(self.fresh_rows):
            rows = self.fresh_rows.to(self.device, non_blocking=True)
            u[rows] = self._fresh(key, self.idx[self.fresh_rows], shape)
        return u

    def put(self, key: int, u: torch.Tensor) -> None:
        if key in self.store.data:
            self.store.data[key][self._idx_store] = u.detach().to(self.store.device, self.store.dtype)
            self.store.initialized[self.idx] = True
