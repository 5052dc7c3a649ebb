"""Certified training on TinyImageNet (8C2F). Defaults: utils.TINYIMAGENET. One process, or several
with torchrun (NCCL on GPUs, gloo on CPU); --batch_size is per process:

    torchrun --nproc_per_node=4 TinyImagenet/train_tinyimagenet.py --model tinyimagenet_relux --sniter 1 ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locallip.runtime import run_main  # noqa: E402
from locallip.training import train  # noqa: E402
from utils import argparser  # noqa: E402


def main(argv=None):
    """Train as the flags say, with the tinyimagenet defaults (utils.py)."""
    return train(argparser(argv, data='tinyimagenet'))


if __name__ == '__main__':
    run_main(main)
