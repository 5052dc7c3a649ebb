"""Datasets and loaders of the entry scripts (MNIST, Fashion-MNIST, CIFAR-10, TinyImageNet).
The code is ``locallip/data.py``; this file hands on every public name of it, for the
reference's ``from data_load import ...``."""
from locallip.data import (DEBIAN_FASHION, DEFAULT_DATA_DIR, HOW_TO_GET, NORMALIZE,  # noqa: F401
                           SYSTEM, IdxImages, IndexedDataset, download_idx_split, fashion_mnist,
                           from_folder, get_dataset, get_loaders, has_idx, read_idx)
