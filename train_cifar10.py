"""Certified training on CIFAR-10 (4C3F relux, 6C2F c6f2_relux / standrelu / c6f2_clmaxmin).
Defaults: utils.CIFAR10.

    python train_cifar10.py --model c6f2_relux --sniter 2 --init 2.0 --end_lr 1e-6 --prefix 'relu/cifar_6C2F'
"""
from locallip.runtime import run_main
from locallip.training import train
from utils import argparser


def main(argv=None):
    """Train as the flags say, with the cifar10 defaults (utils.py)."""
    return train(argparser(argv, data='cifar10'))


if __name__ == '__main__':
    run_main(main)
