"""Where the training's per-sample power-iteration vectors live (--store_dtype,
--store_backing, --indices): float32 or float16, in RAM, in GPU memory or in a disk file
shared by the processes of a node; refused before training when they cannot fit."""
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from locallip.errors import UserError
from locallip.layers import bound_structure, layer_input_shapes
from locallip.vectors import VectorStore


def available_ram():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:     # no /proc/meminfo (not Linux): the kernel's free pages instead
        pass
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


def choose_store(per_sample_fp32, n, budget, requested='auto'):
    """(dtype, on_disk) of the vector store: ``requested`` float32 / float16 in RAM, or
    auto: float32 in RAM if n samples fit in ``budget`` bytes, else float16 in RAM if that
    fits, else float16 in a disk file."""
    if requested in ('float32', 'float16'):
        return getattr(torch, requested), False
    if per_sample_fp32 * n <= budget:
        return torch.float32, False
    return torch.float16, per_sample_fp32 // 2 * n > budget


def make_stores(args, model, input_shape, n_train, n_test, base, say=print, rank=0, world=1,
                device=torch.device('cpu')):
    """Train and test VectorStores, sized and typed by --store_dtype / --store_backing /
    --indices. Refuses (UserError) before training when the store cannot fit. On a GPU the
    store lives in GPU memory when it fits in half the free memory (auto) or when asked
    (device). A disk store is one file per split shared by all processes of a node (rank 0
    creates it)."""
    shapes = layer_input_shapes(bound_structure(model), input_shape)
    keys = store_keys(getattr(args, 'indices', None), shapes)
    per32 = VectorStore.bytes_per_sample(shapes, keys, torch.float32)
    plan = plan_store(per32, n_train + n_test, args.store_dtype, args.store_backing, device)
    path = base + '_store' if plan.place == 'disk' else None
    where = {'disk': f"disk files {path}_{{train,test}}.bin", 'ram': "RAM",
             'device': f"{device} memory"}[plan.place]
    say(f"vector store: {per32 // 4} floats per sample x {n_train + n_test} samples, "
        f"{str(plan.dtype).replace('torch.', '')} in {where}: {plan.total / 2 ** 30:.2f} GiB "
        f"({plan.room}); {store_saving(args, plan.place, base, world)}", flush=True)
    if plan.place == 'device':
        if plan.total > 2 * plan.budget:
            raise UserError(f"the vector store needs {plan.total / 2 ** 30:.1f} GiB of GPU "
                            f"memory but only {2 * plan.budget / 2 ** 30:.1f} GiB are free; use "
                            f"--store_dtype float16, --store_backing ram or fewer --indices")
    else:
        check_store_fits(plan.total, path, plan.budget * 2 // world)
    store_device = device if plan.place == 'device' else torch.device('cpu')

    def build():
        return tuple(VectorStore(shapes, n, plan.dtype, path and f"{path}_{split}.bin", keys,
                                 store_device)
                     for n, split in ((n_train, 'train'), (n_test, 'test')))

    if path is None or world == 1:
        return build()
    stores = build() if rank == 0 else None     # rank 0 creates the shared files,
    dist.barrier()                               # the others open them once they exist
    return stores if rank == 0 else build()


def store_saving(args, place: str, base: str, world: int = 1) -> str:
    """Whether and where the vector store of a run is saved for --resume, in words."""
    if args.no_save or args.no_save_vectors:
        why = ('--no_save' if args.no_save else
               '--no_save_vectors: --resume restarts the vectors from random')
        return f"not saved ({why})" + ('; its disk files are scratch' if place == 'disk' else '')
    file = f"{base}_vectors.pt" if world == 1 else f"{base}_vectors.rank<r>.pt (one per process)"
    if place == 'disk':
        return f"the disk files are updated in place, {file} saved every epoch for --resume"
    return f"saved every epoch to {file} for --resume"


def store_keys(indices, shapes) -> Optional[list]:
    """The layer keys of --indices (a comma list; None when empty: every stored layer),
    each checked against ``shapes`` (the layers with stored vectors)."""
    if not indices:
        return None
    keys = [int(k) for k in str(indices).split(',') if k != '']
    bad = [k for k in keys if k not in shapes]
    if bad:
        raise UserError(f"--indices {bad} are not affine layers with stored vectors; "
                        f"choose from {sorted(shapes)}")
    return keys


@dataclass
class StorePlan:
    """Where and how the vector store lives."""
    dtype: torch.dtype
    place: str          # 'ram', 'disk' or 'device' (the GPU's memory)
    total: int          # bytes of both splits
    budget: int         # half the available RAM, or half the free GPU memory ('device')
    room: str           # that budget, in words


def plan_store(per32: int, n: int, store_dtype: str, backing: str, device) -> StorePlan:
    """The plan for n samples of ``per32`` float32 bytes each: --store_dtype / --store_backing
    (auto: the GPU's memory when training on one and it fits in half the free memory, else
    choose_store's RAM or disk)."""
    budget = available_ram() // 2
    on_gpu = device.type == 'cuda'
    if backing == 'device' and not on_gpu:
        raise UserError("--store_backing device needs a CUDA device (training runs on the CPU)")
    gpu_budget = torch.cuda.mem_get_info(device)[0] // 2 if on_gpu else 0
    dtype, on_disk = choose_store(per32, n, budget, store_dtype)
    place = {'auto': 'disk' if on_disk else 'ram', 'ram': 'ram', 'disk': 'disk',
             'device': 'device'}[backing]
    if on_gpu and backing in ('auto', 'device'):
        wanted = ([getattr(torch, store_dtype)] if store_dtype != 'auto'
                  else [torch.float32, torch.float16])
        fitting = [t for t in wanted if n * per32 // (4 // torch.empty((), dtype=t).element_size())
                   <= gpu_budget]
        if fitting or backing == 'device':
            dtype, place = (fitting or wanted)[0], 'device'
    total = n * per32 // (1 if dtype == torch.float32 else 2)
    if place == 'device':
        return StorePlan(dtype, place, total, gpu_budget,
                         f"half the free GPU memory is {gpu_budget / 2 ** 30:.1f} GiB")
    return StorePlan(dtype, place, total, budget,
                     f"half the available RAM is {budget / 2 ** 30:.1f} GiB")


def check_store_fits(total, path, ram_available):
    """UserError unless ``total`` bytes fit: in RAM (this process's share) or on disk."""
    if path is None and total > ram_available:
        raise UserError(f"the vector store needs {total / 2 ** 30:.1f} GiB of RAM but only "
                        f"{ram_available / 2 ** 30:.1f} GiB are available to this process; use "
                        f"--store_dtype float16, --store_backing disk or fewer --indices")
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if total > free:
            raise UserError(f"the vector store needs {total / 2 ** 30:.1f} GiB of disk in {folder} "
                            f"but only {free / 2 ** 30:.1f} GiB are free; use fewer --indices or "
                            f"another --prefix location")


