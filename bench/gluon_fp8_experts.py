"""Issue 31: the grouped block-FP8 experts with the Gluon kernels (``experts/_gluon_fp8.py``,
config ``"gluon": True``) beside the Triton kernels (the tuned table or heuristic), same run,
one sm_90 GPU. bench/gpu_session11.sh runs it (its step 3).

Per shape and size: the whole grouped stage (row quantisation, layout, both GEMMs, the slot
sum) in "weighted" mode, CUDA-graph replay (``do_bench_cudagraph``, median); the floor of
``rocm-moe bench experts-fp8`` (max(FP8 weight bytes / copy rate, flops / the FP8 rate of
``torch._scaled_mm``), both measured in this run); the relative error against the FP8 torch
reference. Exit 1 if a Gluon result is off the reference by 1e-2 or more.

Usage (GPU): python3 bench/gluon_fp8_experts.py [--qwen3 256 1024 4096 16384]
             [--dsv3 1024 8192] [--configs 64 128 ws] [--json FILE]
"""

import argparse
import json
import sys

import torch
from triton.testing import do_bench_cudagraph

from rocm_moe.benchmarks.experts import SHAPES, _routing, touched_experts
from rocm_moe.benchmarks.experts_fp8 import ceilings, expert_weights
from rocm_moe.experts.fp8 import FP8ReferenceExperts, quantize_experts
from rocm_moe.experts.triton_fp8 import GLUON_CONFIGS, TritonFP8Experts
from rocm_moe.oracle import rel_err


def run(name, sizes, ceil, gen, configs) -> list[dict]:
    shape = SHAPES[name]
    rows = []
    for R in sizes:
        x, ids, w, emap = _routing(shape, R, gen)
        e, H, I = emap.num_local, shape["H"], shape["I"]
        fw = quantize_experts(*expert_weights(e, H, I, gen, x.device),
                              dtype=torch.float8_e4m3fn)
        pairs, touched = touched_experts([(x, ids, w)], emap)
        flops = 2 * 3 * H * I * pairs
        floor = max(touched * (fw.nbytes // e) / (ceil["copy_GBps"] * 1e9),
                    flops / (ceil["fp8_matmul_TFLOPs"] * 1e12)) * 1e6
        ref = FP8ReferenceExperts()(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts",
                                    validate=False, out_dtype=torch.float32).out
        line = [f"{name:5} R={R:6}  floor {floor:8.1f} us"]
        for label, cfg in [("triton", None)] + [(f"gluon{k}", GLUON_CONFIGS[k])
                                                for k in configs]:
            ex = TritonFP8Experts(config=cfg, path="grouped")

            def call(ex=ex, fw=fw, x=x, ids=ids, w=w, emap=emap):
                return ex(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts",
                          validate=False)

            err = rel_err(call().out.float(), ref)
            us = do_bench_cudagraph(call, rep=200, return_mode="median") * 1e3
            rows.append(dict(shape=name, rows=R, kernels=label, time_us=us, floor_us=floor,
                             time_over_floor=us / floor, TFLOPs=flops / us / 1e6,
                             rel_err_vs_fp8_reference=err))
            line.append(f"{label} {us:8.1f} us ({us / floor:4.2f}, {flops / us / 1e6:5.0f} "
                        f"TFLOP/s, err {err:.1e})")
        print("  ".join(line), flush=True)
        del fw
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen3", nargs="*", type=int, default=[256, 1024, 4096, 16384])
    ap.add_argument("--dsv3", nargs="*", type=int, default=[1024, 8192])
    ap.add_argument("--configs", nargs="*", choices=list(GLUON_CONFIGS),
                    default=list(GLUON_CONFIGS), help="GLUON_CONFIGS keys to time")
    ap.add_argument("--json")
    args = ap.parse_args()
    ceil = ceilings()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy "
          f"{ceil['copy_GBps']:.0f} GB/s, FP8 _scaled_mm {ceil['fp8_matmul_TFLOPs']:.0f} "
          f"TFLOP/s; gluon configs {json.dumps(GLUON_CONFIGS)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = run("qwen3", args.qwen3, ceil, gen, args.configs) + \
        run("dsv3", args.dsv3, ceil, gen, args.configs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), ceilings=ceil, rows=rows), f,
                      indent=1)
    bad = [r for r in rows if not r["rel_err_vs_fp8_reference"] < 1e-2]
    for r in bad:
        print(f"FAILED: {r['shape']} R={r['rows']} {r['kernels']}: rel err "
              f"{r['rel_err_vs_fp8_reference']:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
