"""Tune the Triton experts' launch configs on this GPU; prints and writes a JSON table.

For each benchmark shape and size (rocm_moe/benchmarks/experts.py), tries BLOCK_M x BLOCK_N x
BLOCK_K x num_warps x num_stages around the batch's mean slots per local expert, times each with
CUDA-graph replay (median), and keeps the fastest per (device, H x I, bucket). Merge the output
into rocm_moe/experts/triton_configs.json.

Usage on the GPU machine: python3 bench/tune_experts.py OUT.json [MIN_ROWS [BASE.json]]
(MIN_ROWS skips smaller sizes; BASE is a table to start from, its other entries are kept).
"""

import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from rocm_moe.benchmarks.experts import SHAPES, _case
from rocm_moe.experts import triton as tx


def _time(cfg, args) -> float:
    experts = tx.TritonExperts(config=cfg)

    def call():
        return experts(*args, mode="weighted", validate=False)

    return do_bench_cudagraph(call, rep=25, return_mode="median")


def main(path: str, min_rows: int = 0, base: str | None = None) -> None:
    dev = torch.cuda.get_device_name()
    table: dict = json.loads(Path(base).read_text()) if base else {dev: {}}
    table.setdefault(dev, {})
    gen = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        key = f"{shape['H']}x{shape['I']}"
        for R in shape["sizes"]:
            args = _case(shape, R, gen)
            mean = R * shape["K"] / args[-1].num_local
            bucket = str(tx._bucket(mean))
            bms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * tx._bucket(mean))][-2:]
            if R < min_rows:
                continue
            best = None
            space = list(itertools.product(bms, (32, 64, 128), (64, 128), (4, 8), (3, 4)))
            if mean >= 64:  # wide tiles for the compute-bound sizes (2 stages fit in smem)
                space += [(128, 256, 64, 8, 2), (128, 256, 32, 8, 3), (64, 256, 64, 8, 3)]
            for bm, bn, bk, nw, ns in space:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
                try:
                    t = _time(cfg, args)
                except Exception as exc:  # out of shared memory and the like
                    print("skip", cfg, type(exc).__name__, flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            print(name, R, "bucket", bucket, "best", best, flush=True)
            table[dev].setdefault(key, {})[bucket] = best[1]
            with open(path, "w") as fh:  # after every size: a cut-off run keeps what it found
                json.dump(table, fh, indent=1)


if __name__ == "__main__":
    # python3 bench/tune_experts.py OUT.json [MIN_ROWS [BASE_TABLE.json]]
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0,
         sys.argv[3] if len(sys.argv) > 3 else None)
