"""Datasets and loaders. Every loader yields ``(x, y, index)``, index = position in the
dataset, which keys the per-sample power-iteration vectors.

  mnist        torchvision MNIST under --data_dir (downloaded if missing and allowed)
  fashionmnist torchvision FashionMNIST under --data_dir (or IDX files in it directly); with
               no --data_dir, data/ and then the Debian package dataset-fashion-mnist
               (/usr/share/datasets/fashion-mnist/); --data_dir system: only the package
  cifar10      torchvision CIFAR-10 under --data_dir; random crop 32 pad 4 + flip
  tinyimagenet --data_dir/tiny-imagenet-200/{train,val} as ImageFolders (val regrouped
               into one folder per class by TinyImagenet/prepare_data.py)
"""
import gzip
import os
import shutil
import urllib.error

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import download_and_extract_archive

from locallip.errors import UserError

DEFAULT_DATA_DIR = 'data'        # --data_dir not given
SYSTEM = 'system'                # --data_dir system: the Debian Fashion-MNIST package's copy
DEBIAN_FASHION = '/usr/share/datasets/fashion-mnist'
HOW_TO_GET = {
    'mnist': "run once with internet access (torchvision downloads it into --data_dir), "
             "or copy MNIST/raw/*-ubyte files there",
    'fashionmnist': "apt-get install dataset-fashion-mnist and give --data_dir system (or no "
                    "--data_dir), or run once with internet access",
    'cifar10': "run once with internet access (torchvision downloads it into --data_dir), "
               "or copy cifar-10-batches-py there",
    'tinyimagenet': "run python TinyImagenet/prepare_data.py --data_dir DIR with internet access",
}


class IndexedDataset(Dataset):
    """Wraps a dataset so that items are (x, y, index)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


def read_idx(path):
    """Read an IDX file (MNIST format), optionally gzip-compressed, into a numpy array."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], 'big') for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: header says {dims}, file holds {data.size} bytes")
    return data.reshape(dims)


class IdxImages(Dataset):
    """Grey images from IDX files (train-images-idx3-ubyte[.gz] + labels), like MNIST."""

    def __init__(self, folder, train, transform):
        stem = 'train' if train else 't10k'
        files = []
        for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'):
            name = os.path.join(folder, f"{stem}-{kind}")
            name = name if os.path.exists(name) else name + '.gz'
            files.append(name)
        self.images = torch.from_numpy(read_idx(files[0]).copy())
        self.targets = torch.from_numpy(read_idx(files[1]).astype(np.int64))
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i].unsqueeze(0).float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])


def has_idx(folder, train):
    stem = 'train' if train else 't10k'
    return any(os.path.exists(os.path.join(folder, f"{stem}-images-idx3-ubyte{ext}"))
               for ext in ('', '.gz'))


def download_idx_split(cls, root, train):
    """Download only one split's two IDX files of an MNIST-like torchvision dataset ``cls``
    (torchvision's own download fetches both splits) into its raw folder, checked against
    torchvision's md5 sums. A raw folder this call created is removed again on failure."""
    folder = os.path.join(root, cls.__name__, 'raw')
    created = not os.path.isdir(folder)
    stem = 'train' if train else 't10k'
    try:
        os.makedirs(folder, exist_ok=True)
        for filename, md5 in cls.resources:
            if not filename.startswith(stem):
                continue
            errors = []
            for mirror in cls.mirrors:
                try:
                    download_and_extract_archive(mirror + filename, download_root=folder,
                                                 filename=filename, md5=md5)
                    break
                except (urllib.error.URLError, OSError, RuntimeError) as e:
                    errors.append(f"{mirror}: {' '.join(str(e).split())}")
            else:
                raise OSError(f"{filename}: " + '; '.join(errors))
    except OSError:
        if created:
            shutil.rmtree(os.path.join(root, cls.__name__), ignore_errors=True)
        raise
    return folder


def _torchvision(cls, name, root, train, transform, download):
    """torchvision dataset; downloads when missing and allowed; one clear error otherwise.
    MNIST-like test splits are read from their raw IDX files when only those are there, and
    only they are downloaded (evaluation needs no training images)."""
    folder = os.path.join(root, getattr(cls, 'base_folder', cls.__name__))  # CIFAR10's own name
    try:
        return from_folder(cls(root, train=train, transform=transform, download=False), folder)
    except RuntimeError as missing:
        # torchvision's text ends with advice for its own API ("You can use download=True")
        reason = str(missing).split(' You can use download=True')[0].rstrip('. ')
    idx_like = cls in (datasets.MNIST, datasets.FashionMNIST)
    raw = os.path.join(root, cls.__name__, 'raw')
    if idx_like and not train and has_idx(raw, train):
        return from_folder(IdxImages(raw, train, None), raw)
    if not download:
        reason += "; --no_download was given, so it was not downloaded"
    else:
        try:
            if idx_like and not train:
                return from_folder(IdxImages(download_idx_split(cls, root, train), train, None), raw)
            return from_folder(cls(root, train=train, transform=transform, download=True), folder)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            reason = "download failed: " + ' '.join(str(e).split())
    raise UserError(f"dataset {name} not found under {os.path.abspath(root)} ({reason}); "
                    f"to get it: {HOW_TO_GET[name]}")


def from_folder(ds, folder):
    """``ds`` marked with the folder it was read from (``ds.source``, for the start-up lines)."""
    ds.source = os.path.abspath(folder)
    return ds


def fashion_mnist(data_dir, train, download):
    """Fashion-MNIST from ``data_dir`` (FashionMNIST/raw or IDX files directly in it; a given
    folder without them is downloaded into or refused, never replaced by another copy), from
    data/ and then the Debian package when ``data_dir`` is None, or only from the package when
    it is ``SYSTEM``."""
    split = 'train' if train else 't10k'
    if data_dir == SYSTEM:
        if not has_idx(DEBIAN_FASHION, train):
            raise UserError(f"--data_dir {SYSTEM}: no {split}-images-idx3-ubyte[.gz] in "
                            f"{DEBIAN_FASHION}; apt-get install dataset-fashion-mnist")
        return from_folder(IdxImages(DEBIAN_FASHION, train, None), DEBIAN_FASHION)
    root = data_dir or DEFAULT_DATA_DIR
    folders = [os.path.join(root, 'FashionMNIST', 'raw'), root]
    for folder in folders + ([DEBIAN_FASHION] if data_dir is None else []):
        if has_idx(folder, train):
            return from_folder(IdxImages(folder, train, None), folder)
    return _torchvision(datasets.FashionMNIST, 'fashionmnist', root, train, transforms.ToTensor(),
                        download)


NORMALIZE = transforms.Normalize((0.485, 0.456, 0.406), (0.225, 0.225, 0.225))  # the reference's


def get_dataset(name, data_dir, train, augment, download=True, normalization=False):
    """The (x, y) dataset ``name``, read from ``data_dir`` (None: data/), with the folder it
    came from as ``.source``; x in [0, 1], unless ``normalization`` (CIFAR-10 and
    TinyImageNet: (x - mean) / 0.225, as the reference's --normalization). MNIST and
    Fashion-MNIST are never augmented nor normalised (as in the reference)."""
    if name == 'fashionmnist':
        return fashion_mnist(data_dir, train, download)
    if data_dir == SYSTEM:
        raise UserError(f"--data_dir {SYSTEM} is the Debian Fashion-MNIST package; --data {name} "
                        f"needs a folder")
    data_dir = data_dir or DEFAULT_DATA_DIR
    if name == 'mnist':
        return _torchvision(datasets.MNIST, name, data_dir, train, transforms.ToTensor(), download)
    norm = [NORMALIZE] if normalization else []
    if name == 'cifar10':
        aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        tf = transforms.Compose((aug if (augment and train) else []) + [transforms.ToTensor()] + norm)
        return _torchvision(datasets.CIFAR10, name, data_dir, train, tf, download)
    if name == 'tinyimagenet':
        folder = os.path.join(data_dir, 'tiny-imagenet-200', 'train' if train else 'val')
        if not os.path.isdir(folder):
            raise UserError(f"dataset tinyimagenet not found: no folder {os.path.abspath(folder)}; "
                            f"to get it: {HOW_TO_GET[name]}")
        aug = [transforms.RandomCrop(64, padding=4), transforms.RandomHorizontalFlip()]
        tf = transforms.Compose((aug if (augment and train) else []) + [transforms.ToTensor()] + norm)
        return from_folder(datasets.ImageFolder(folder, transform=tf), folder)
    raise UserError(f"unknown --data {name!r}; choose from mnist, fashionmnist, cifar10, tinyimagenet")


def get_loaders(args, train=True, test=True, rank=0, world=1):
    """(train_loader, test_loader) of ``args.data``; either may be None if not asked for.

    Items carry the index in the full dataset. Training: a DistributedSampler (also for one
    process) shuffles with (seed, epoch), set per epoch by the training loop
    (``loader.sampler.set_epoch``): an epoch's order does not depend on what ran before it
    (exact --resume), and the global batch of N processes x b equals the batch of one
    process x N*b. Test: process ``rank`` of ``world`` takes samples rank, rank + world, ...
    """
    pin = torch.cuda.is_available() and not getattr(args, 'cpu', False)
    out = []
    for is_train, wanted in ((True, train), (False, test)):
        if not wanted:
            out.append(None)
            continue
        base = get_dataset(args.data, args.data_dir, is_train, not args.no_augmentation,
                           download=not args.no_download,
                           normalization=getattr(args, 'normalization', False))
        ds = IndexedDataset(base)
        n = args.n_train if is_train else args.n_test
        if n and n < len(ds):
            ds = Subset(ds, range(n))
        n_total = len(ds)
        if is_train:
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank,
                                         shuffle=not getattr(args, 'no_shuffle', False),
                                         seed=args.seed)
            out.append(DataLoader(ds, batch_size=args.batch_size, sampler=sampler,
                                  num_workers=args.workers, pin_memory=pin,
                                  drop_last=getattr(args, 'drop_last', False)))
        else:
            if world > 1:
                ds = Subset(ds, range(rank, len(ds), world))
            out.append(DataLoader(ds, batch_size=args.test_batch_size, shuffle=False,
                                  num_workers=args.workers, pin_memory=pin))
        out[-1].n_total = n_total     # samples of the whole split (sizes the vector stores)
        out[-1].source = base.source  # the folder it was read from
    return tuple(out)
