"""Certified training on CIFAR-10 (4C3F relux, 6C2F c6f2_relux / standrelu / c6f2_clmaxmin).
Defaults: utils.CIFAR10.

    python train_cifar10.py --model c6f2_relux --sniter 2 --init 2.0 --end_lr 1e-6 --prefix 'relu/cifar_6C2F'
"""
from train import main
from utils import run_main

if __name__ == '__main__':
    run_main(lambda: main(data='cifar10'))
