"""Comm benchmark; the same as `rocm-moe bench comm` (see rocm_moe/benchmarks/comm.py)."""

import sys

from rocm_moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "comm", *sys.argv[1:]]))
