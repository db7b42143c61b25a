"""Where the time of the Triton expert stage goes, per kernel, on one GPU.

For each (shape, rows): the whole stage as a CUDA-graph replay (median, as the benchmark times
it), then torch.profiler over 10 eager calls: each kernel's mean device time. The difference
between the replay and the sum of kernel times is launch gaps and idle time.

Usage on the GPU machine: python3 bench/profile_experts.py [shape:rows ...] [--tma auto|on|off|both]
(default cases qwen3:1 qwen3:64 qwen3:1024 qwen3:4096 qwen3:16384 dsv3:128 dsv3:8192; --tma:
weights through tensor descriptors or pointers, "both" profiles each case both ways)

--ncu: no timing; each case runs once to compile and once inside cudaProfilerStart/Stop, for
  ncu --profile-from-start off --clock-control none [--section ...] \
      python3 bench/profile_experts.py --ncu CASES
--fp8: the block-FP8 experts (``TritonFP8Experts``, weights quantised from the same draws, its
  tuned configs; --tma does not apply) in place of the bf16 ones; --gluon NAME: with --fp8,
  the Gluon kernels of ``triton_fp8.GLUON_CONFIGS[NAME]`` (e.g. ws_persistent).
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench_cudagraph

from rocm_moe.benchmarks.experts import SHAPES, _case
from rocm_moe.experts.triton import TritonExperts
from rocm_moe.experts.triton_fp8 import GLUON_CONFIGS

DEFAULT = ["qwen3:1", "qwen3:64", "qwen3:1024", "qwen3:4096", "qwen3:16384", "dsv3:128",
           "dsv3:8192"]


def profile_case(name: str, rows: int, tma: bool | None, ncu: bool = False,
                 fp8: bool = False, gluon: str | None = None) -> None:
    args = _case(SHAPES[name], rows, torch.Generator().manual_seed(0))
    tri = TritonExperts(tma=tma)
    if fp8:
        from rocm_moe.experts.fp8 import quantize_experts
        from rocm_moe.experts.triton_fp8 import TritonFP8Experts
        from rocm_moe.quant import native_fp8_dtype

        x, ids, w, w13, w2, emap = args
        fw = quantize_experts(w13.float(), w2.float(), dtype=native_fp8_dtype("cuda"))
        args = (x, ids, w, fw.w13, fw.w2, emap)
        tri = TritonFP8Experts()  # (its tuned table says where TMA loads the weights)
        if gluon is not None:
            tri = TritonFP8Experts(config=GLUON_CONFIGS[gluon], path="grouped")

    def call():
        return tri(*args, weight_mode="experts", validate=False)

    call()
    if ncu:  # the profiled call: ncu reads its kernels' hardware counters
        torch.cuda.synchronize()
        with torch.cuda.profiler.profile():
            call()
            torch.cuda.synchronize()
        return
    t_graph = do_bench_cudagraph(call, rep=100, return_mode="median") * 1e3
    torch.cuda.synchronize()
    n = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:60]] += ev.device_time / n
    total = sum(per.values())
    label = {None: "", True: " tma=on", False: " tma=off"}[tma] + (" fp8" if fp8 else "")
    print(f"\n{name} rows={rows}{label}: graph replay {t_graph:.1f} us, kernels {total:.1f} us, "
          f"{len(per)} kernel kinds")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {v:9.1f} us  {k}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", default=DEFAULT, help="shape:rows")
    p.add_argument("--tma", choices=["auto", "on", "off", "both"], default="auto")
    p.add_argument("--ncu", action="store_true", help="one untimed call per case, for ncu")
    p.add_argument("--fp8", action="store_true", help="the block-FP8 experts")
    p.add_argument("--gluon", help="with --fp8: a triton_fp8.GLUON_CONFIGS key (e.g. "
                   "ws_persistent) in place of the tuned Triton kernels")
    args = p.parse_args(argv)
    if args.fp8 and args.tma != "auto":
        p.error("--fp8 takes its tuned table's TMA choice: leave --tma out")
    if args.gluon is not None and (not args.fp8 or args.gluon not in GLUON_CONFIGS):
        p.error(f"--gluon takes --fp8 and one of {sorted(GLUON_CONFIGS)}, not {args.gluon!r}")
    modes = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}[args.tma]
    print(torch.cuda.get_device_name())
    for c in args.cases:
        name, rows = c.split(":")
        for tma in modes:
            profile_case(name, int(rows), tma, args.ncu, args.fp8, args.gluon)


if __name__ == "__main__":
    main()
