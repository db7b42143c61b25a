"""FP8 experts benchmark; the same as `rocm-moe bench experts-fp8` (see
rocm_moe/benchmarks/experts_fp8.py)."""

import sys

from rocm_moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "experts-fp8", *sys.argv[1:]]))
