"""Evaluate a TinyImageNet checkpoint (clean, PGD-L2 and certified error); see ../evaluate.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluate import main  # noqa: E402
from locallip.runtime import run_main  # noqa: E402

if __name__ == '__main__':
    run_main(lambda: main(data='tinyimagenet'))
