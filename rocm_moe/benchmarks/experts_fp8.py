"""FP8 experts benchmark (issue 18): the Triton FP8 block-scale experts against their floor,
the bf16 Triton experts of the same shape beside them, all in one run on one GPU.

Whole stage (activation quantisation per 1x128 group, layout sort, both FP8 GEMMs with block
scales, SiLU and the intermediate's quantisation, weighting, reduction) in "weighted" mode,
timed as CUDA-graph replays (``triton.testing.do_bench_cudagraph``, median) after warm-up.

Floor = max(FP8 bytes / copy bandwidth, flops / FP8 matmul rate), both ceilings measured in
the same run: a 1 GiB device-to-device copy (bytes read + written) and ``torch._scaled_mm`` of
8192^3 FP8 (e4m3fn; e4m3fnuz on MI300) with float32 scales and a bfloat16 output, the faster
of its precise and fast accumulation (both recorded).
FP8 bytes = weights and block scales of the local experts the batch touches (issue 18's
floor: activations not counted); flops = 2 * 3 * H * I * (local (row, slot) pairs).
Accuracy: relative error against the FP8 torch reference (same quantisation) and against
the bf16 Triton experts on the dequantised weights.

Shapes: Qwen3-30B-A3B (E=128 all local, H=2048, I=768, K=8) at M tokens, and DeepSeek-V3
rank-local (E=256 global, experts 160..191 local, H=7168, I=2048, K=8) at R rows.
"""

from __future__ import annotations

import argparse

import torch

from rocm_moe._console import progress
from rocm_moe.benchmarks import write_json
from rocm_moe.benchmarks.experts import SHAPES, _routing, copy_rate
from rocm_moe.cli import argtypes
from rocm_moe.experts.fp8 import FP8ReferenceExperts, quantize_experts
from rocm_moe.experts.triton import TritonExperts
from rocm_moe.experts.triton_fp8 import TritonFP8Experts
from rocm_moe.quant import native_fp8_dtype


def ceilings() -> dict:
    """Copy GB/s (1 GiB, read + write) and FP8 TFLOP/s (torch._scaled_mm 8192^3), measured."""
    from triton.testing import do_bench

    copy = copy_rate()
    torch.cuda.empty_cache()  # (its 2 GiB back before the matmul's operands)
    dt = native_fp8_dtype("cuda")
    m = torch.randn(8192, 8192, device="cuda").to(dt)
    mt = torch.randn(8192, 8192, device="cuda").to(dt).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda")

    def mm(fast: bool):
        return torch._scaled_mm(m, mt, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    rates = {fast: 2 * 8192**3 / (do_bench(lambda f=fast: mm(f), return_mode="median") / 1e3)
             / 1e12 for fast in (False, True)}
    # the faster of the two accumulation modes: the strictest floor
    return dict(copy_GBps=copy, fp8_matmul_TFLOPs=max(rates.values()),
                fp8_matmul_TFLOPs_precise_accum=rates[False],
                fp8_matmul_TFLOPs_fast_accum=rates[True], fp8_dtype=str(dt))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_shape(name: str, shape: dict, ceil: dict, sizes: list[int],
              paths: tuple[str, ...] = ("auto",)) -> list[dict]:
    """Rows of one shape: each size once per Triton experts ``path`` (auto, small, grouped)."""
    from triton.testing import do_bench_cudagraph

    gen = torch.Generator().manual_seed(0)
    dt = native_fp8_dtype("cuda")
    rows = []
    for R in sizes:
        progress(f"{name}: {R} rows")
        x, ids, w, emap = _routing(shape, R, gen)
        e, H, I = emap.num_local, shape["H"], shape["I"]
        w13 = (torch.randn(e, 2 * I, H, generator=gen) / H**0.5).cuda()
        w2 = (torch.randn(e, H, I, generator=gen) / I**0.5).cuda()
        fw = quantize_experts(w13, w2, dtype=dt)
        d13, d2 = (t.bfloat16() for t in fw.dequantize(torch.float32))
        w13 = w2 = None
        loc = emap.local_ids(ids)
        pairs = int((loc >= 0).sum())
        touched = int(loc[loc >= 0].unique().numel())
        nbytes = touched * (fw.nbytes // e)
        flops = 2 * 3 * H * I * pairs
        floor = max(nbytes / (ceil["copy_GBps"] * 1e9),
                    flops / (ceil["fp8_matmul_TFLOPs"] * 1e12))
        ref = FP8ReferenceExperts()(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts",
                                    validate=False, out_dtype=torch.float32).out
        for path in paths:
            fp8, bf16 = TritonFP8Experts(path=path), TritonExperts(path=path)

            def call_fp8(fp8=fp8, x=x, ids=ids, w=w, fw=fw, emap=emap):
                return fp8(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts", validate=False)

            def call_bf16(bf16=bf16, x=x, ids=ids, w=w, d13=d13, d2=d2, emap=emap):
                return bf16(x, ids, w, d13, d2, emap, weight_mode="experts", validate=False)

            out = call_fp8().out
            out_bf16 = call_bf16().out
            t = do_bench_cudagraph(call_fp8, rep=200, return_mode="median") / 1e3
            t_bf16 = do_bench_cudagraph(call_bf16, rep=200, return_mode="median") / 1e3
            rows.append(dict(shape=name, path=path, rows=R, local_pairs=pairs,
                             experts_touched=touched, time_us=t * 1e6, floor_us=floor * 1e6,
                             time_over_floor=t / floor,
                             bf16_time_us=t_bf16 * 1e6, fp8_speedup_over_bf16=t_bf16 / t,
                             TFLOPs=flops / t / 1e12, GBps=nbytes / t / 1e9,
                             rel_err_vs_fp8_reference=_rel(out, ref),
                             rel_err_vs_bf16=_rel(out, out_bf16)))
        torch.cuda.empty_cache()
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench experts-fp8``)."""
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sizes", nargs="+", type=argtypes.positive_int, default=None,
                   help="rows (dsv3) / tokens (qwen3) instead of each shape's default sizes")
    p.add_argument("--paths", nargs="+", default=["auto"], choices=["auto", "small", "grouped"],
                   help="the Triton experts' paths to time (a row each): auto (by batch size), "
                   "small (no layout sort, experts/triton_small.py) or grouped")
    p.add_argument("--out", type=argtypes.output_dir, default="bench/results")
    p.add_argument("--name", type=argtypes.file_stem, default="experts_fp8")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run it with parsed ``args``; ``parser`` reports a machine that cannot run it."""
    if not torch.cuda.is_available():
        parser.error("needs a GPU (it times the Triton FP8 experts), and torch sees none here "
                     "(torch.cuda.is_available() is False); run it on a CUDA or ROCm machine")
    from rich.console import Console
    from rich.table import Table

    from rocm_moe.backends import device_description

    progress("measuring the copy and FP8 matmul ceilings")
    ceil = ceilings()
    rows = [r for name in args.shapes for r in run_shape(
        name, SHAPES[name], ceil, args.sizes or SHAPES[name]["sizes"], tuple(args.paths))]
    table = Table(title=f"triton FP8 experts ({ceil['fp8_dtype']}), {device_description()}: "
                        f"copy {ceil['copy_GBps']:.0f} GB/s, FP8 _scaled_mm "
                        f"{ceil['fp8_matmul_TFLOPs']:.0f} TFLOP/s (measured)")
    for c in ("shape", "path", "rows", "time us", "floor us", "time/floor", "bf16 us", "bf16/fp8",
              "TFLOP/s", "GB/s", "err vs fp8 ref", "err vs bf16"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["shape"], r["path"], str(r["rows"]), f"{r['time_us']:.1f}",
                      f"{r['floor_us']:.1f}",
                      f"{r['time_over_floor']:.2f}", f"{r['bf16_time_us']:.1f}",
                      f"{r['fp8_speedup_over_bf16']:.2f}", f"{r['TFLOPs']:.1f}",
                      f"{r['GBps']:.0f}", f"{r['rel_err_vs_fp8_reference']:.1e}",
                      f"{r['rel_err_vs_bf16']:.1e}")
    console = Console(width=170)
    console.print(table)
    path = write_json(args.out, args.name, device=device_description(), ceilings=ceil, rows=rows)
    console.print(f"json: {path}")
    return 0
