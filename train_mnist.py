"""Certified training on MNIST (4C3F); also --data fashionmnist. Defaults: utils.MNIST.

    python train_mnist.py --model relux --sniter 5 --init 2.0 --epsilon_train 1.75 --gloro \
        --no_augmentation --opt_iter 10 --prefix 'relu/mnist_4C3F'
"""
from locallip.runtime import run_main
from locallip.training import train
from utils import argparser


def main(argv=None):
    """Train as the flags say, with the mnist defaults (utils.py)."""
    return train(argparser(argv, data='mnist'))


if __name__ == '__main__':
    run_main(main)
