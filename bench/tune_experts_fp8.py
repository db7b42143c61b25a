"""Tune the Triton FP8 experts' launch configs on this GPU (issue 18): whole-stage CUDA-graph
replays (median, the benchmark's own measure) over a small grid, gate/up first (down at the
heuristic's choice), then down with the best gate/up; prints the best per size and writes JSON.

Usage on the GPU machine:
  python3 bench/tune_experts_fp8.py OUT.json [--shapes qwen3 dsv3] [--sizes N ...]
"""

import argparse
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from rocm_moe.benchmarks.experts import SHAPES, _routing
from rocm_moe.experts.fp8 import quantize_experts
from rocm_moe.experts.triton_fp8 import TritonFP8Experts, fp8_block_config
from rocm_moe.quant import native_fp8_dtype

GATE_UP = [dict(BLOCK_N=128, BLOCK_K=128, num_warps=w, num_stages=s)
           for w, s in itertools.product((4, 8), (3, 4, 5))]
DOWN = [dict(BLOCK_N=n, BLOCK_K=128, num_warps=w, num_stages=s)
        for n, w, s in itertools.product((64, 128), (4, 8), (3, 4, 5))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--shapes", nargs="+", default=["qwen3", "dsv3"])
    p.add_argument("--sizes", nargs="+", type=int, default=None)
    p.add_argument("--block-m", nargs="+", type=int, default=[32, 64, 128])
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    dt = native_fp8_dtype("cuda")
    results = []
    for name in a.shapes:
        shape = SHAPES[name]
        for R in a.sizes or [s for s in shape["sizes"] if s >= 256]:
            x, ids, w, emap = _routing(shape, R, gen)
            e, H, I = emap.num_local, shape["H"], shape["I"]
            fw = quantize_experts((torch.randn(e, 2 * I, H, generator=gen) / H**0.5).cuda(),
                                  (torch.randn(e, H, I, generator=gen) / I**0.5).cuda(), dtype=dt)

            def time(cfg, args=(x, ids, w, fw.w13, fw.w2, emap)):
                ex = TritonFP8Experts(config=cfg)
                try:
                    return do_bench_cudagraph(lambda: ex(*args, weight_mode="experts",
                                                         validate=False),
                                              rep=60, return_mode="median") * 1e3
                except Exception as err:  # out of shared memory and the like
                    print(f"  {cfg}: {type(err).__name__}", flush=True)
                    return float("inf")

            base = fp8_block_config(R * shape["K"], e, num_experts=shape["E"])
            t_base = time(base)
            best = (t_base, base)
            for bm in a.block_m:
                for gu in GATE_UP:
                    cfg = dict(BLOCK_M=bm, gate_up=gu, down=best[1]["down"])
                    best = min(best, (time(cfg), cfg), key=lambda b: b[0])
            for dn in DOWN:
                cfg = dict(best[1], down=dn)
                best = min(best, (time(cfg), cfg), key=lambda b: b[0])
            print(f"{name} R={R}: heuristic {t_base:.1f} us -> {best[0]:.1f} us {best[1]}",
                  flush=True)
            results.append(dict(shape=name, rows=R, slots=R * shape["K"], local=e,
                                heuristic_us=t_base, best_us=best[0], best=best[1]))
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=results), f, indent=1)


if __name__ == "__main__":
    main()
