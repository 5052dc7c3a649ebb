"""Certified training on MNIST (4C3F); also --data fashionmnist. Defaults: utils.MNIST.

    python train_mnist.py --model relux --sniter 5 --init 2.0 --epsilon_train 1.75 --gloro \
        --no_augmentation --opt_iter 10 --prefix 'relu/mnist_4C3F'
"""
from train import main
from utils import run_main

if __name__ == '__main__':
    run_main(lambda: main(data='mnist'))
