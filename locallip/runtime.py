"""What a run needs around the library: its device, its processes (torchrun), its seeds and
random streams, deterministic kernels, and the entry scripts' error handling.

Nothing here parses arguments or touches a device at import time.
"""
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from locallip.errors import UserError


def get_device(cpu: bool, cuda_ids: str = '0') -> torch.device:
    """The first GPU of the comma list ``cuda_ids`` when CUDA is available and ``cpu`` is
    false (--cpu, --cuda_ids), else the CPU."""
    if torch.cuda.is_available() and not cpu:
        return torch.device(f"cuda:{cuda_ids.split(',')[0]}")
    return torch.device('cpu')


# Distributed helpers (torchrun; one process works without it): training and evaluation
def init_distributed(cpu: bool, cuda_ids: str = '0', backend: str = 'nccl'):
    """(rank, world, device). Under torchrun (its RANK / WORLD_SIZE environment, also with
    one process): a process group, ``backend`` on GPUs (--dist-backend), gloo on CPU;
    otherwise one plain process on get_device(cpu, cuda_ids)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if 'RANK' not in os.environ or 'MASTER_ADDR' not in os.environ:
        if world > 1:
            raise UserError("WORLD_SIZE > 1 without torchrun's RANK / MASTER_ADDR; launch with "
                            "torchrun --nproc_per_node=N")
        return 0, 1, get_device(cpu, cuda_ids)
    use_cuda = torch.cuda.is_available() and not cpu
    dist.init_process_group(backend if use_cuda else 'gloo')
    local = int(os.environ.get('LOCAL_RANK', '0'))
    if use_cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), world, torch.device(f'cuda:{local}' if use_cuda else 'cpu')


def distributed():
    """True inside a torchrun process group (also of one process)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values, device, world):
    """Sum a list of floats (or 0-dim tensors) over processes."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if distributed():
        dist.all_reduce(t)
    return t.tolist()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# The random streams of an evaluation, derived from --seed: each is seed * SEED_STRIDE +
# its offset (+ the batch number), so that a batch's draws depend only on the seed and the
# batch (resumable, the same with any process count) and no two streams meet for fewer
# than 500009 batches.
SEED_STRIDE = 1000003          # a prime above any offset + batch count
BATCH_STREAM = 0               # a batch's power-iteration starts and PGD
GUARANTEED_STREAM = 500009     # a batch's Lanczos starts (guaranteed certificates)
RADIUS_STREAM = 700001         # a batch's certified-radius search
LOWER_STREAM = 800011          # a batch's lower-bound ascent (--lower_bound)
NORMS_STREAM = 999979          # the global Lanczos norm bounds, once per evaluation
GLOBAL_STREAM = 999983         # the global power-iteration vectors, once per evaluation


def derived_seed(seed: int, stream: int, batch: int = 0) -> int:
    """The seed of random ``stream`` (one of the *_STREAM offsets) for ``batch``."""
    return seed * SEED_STRIDE + stream + batch


def use_deterministic_kernels():
    """Deterministic kernels from here on (--deterministic): the cuBLAS workspace setting
    must precede the first cuBLAS call, so call this before any CUDA work."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def run_main(fn):
    """Run an entry point; a UserError becomes one line on stderr and exit status 2."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


