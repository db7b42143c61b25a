"""Comm benchmark; the same as `rocm-moe bench comm` (see rocm_moe/benchmarks/comm.py)."""

import sys

from rocm_moe.benchmarks.comm import main

if __name__ == "__main__":
    sys.exit(main())
