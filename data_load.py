"""Datasets and loaders of the entry scripts (MNIST, Fashion-MNIST, CIFAR-10, TinyImageNet):
the code is ``locallip/data.py``; this file hands on its names for the reference's
``from data_load import ...``."""
from locallip.data import get_dataset, get_loaders  # noqa: F401
