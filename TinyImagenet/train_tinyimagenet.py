"""Certified training on TinyImageNet (8C2F). Defaults: utils.TINYIMAGENET. One process, or several
with torchrun (NCCL on GPUs, gloo on CPU); --batch_size is per process:

    torchrun --nproc_per_node=4 TinyImagenet/train_tinyimagenet.py --model tinyimagenet_relux --sniter 1 ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import main  # noqa: E402
from utils import run_main  # noqa: E402

if __name__ == '__main__':
    run_main(lambda: main(data='tinyimagenet'))
