"""Experts benchmark; the same as `rocm-moe bench experts` (see rocm_moe/benchmarks/experts.py)."""

import sys

from rocm_moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "experts", *sys.argv[1:]]))
