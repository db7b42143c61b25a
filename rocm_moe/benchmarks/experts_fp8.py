"""FP8 experts benchmark (issue 18): the Triton FP8 block-scale experts against their floor,
the bf16 Triton experts of the same shape beside them, all in one run on one GPU.

Whole stage (activation quantisation per 1x128 group, layout sort, both FP8 GEMMs with block
scales, SiLU and the intermediate's quantisation, weighting, reduction) in "weighted" mode,
timed as CUDA-graph replays (``triton.testing.do_bench_cudagraph``, median) after warm-up, the
calls cycling through ``--batches`` routings (``benchmarks.experts.BATCHES``: one Qwen3
token's FP8 experts, 38 MB, would otherwise stay in an H100's 50 MB L2); floor and counts are
the routings' means.

Floor = max(FP8 bytes / copy bandwidth, flops / FP8 matmul rate), both ceilings measured in
the same run: a 1 GiB device-to-device copy (bytes read + written) and ``torch._scaled_mm`` of
8192^3 FP8 (e4m3fn; e4m3fnuz on MI300) with a bfloat16 output, the fastest of per-tensor
scales with precise and with fast accumulation and rowwise scales (each recorded;
``benchmarks.experts.fp8_matmul_rates``).
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
from rocm_moe.benchmarks import cell, rotations, write_json
from rocm_moe.benchmarks.experts import (
    BATCHES,
    SHAPES,
    _routing,
    ceiling_line,
    copy_rate,
    fp8_matmul_rates,
    touched_experts,
)
from rocm_moe.cli import argtypes
from rocm_moe.experts.fp8 import FP8ReferenceExperts, quantize_experts
from rocm_moe.experts.triton import TritonExperts
from rocm_moe.experts.triton_fp8 import TritonFP8Experts
from rocm_moe.quant import native_fp8_dtype


def ceilings() -> dict:
    """Copy GB/s (1 GiB, read + write) and the FP8 TFLOP/s of ``torch._scaled_mm`` 8192^3
    (``benchmarks.experts.fp8_matmul_rates``: per-tensor precise / fast and rowwise scales, the
    fastest the floor's), measured now; a GPU without FP8 matrix units is refused."""
    copy = copy_rate()
    fp8 = fp8_matmul_rates()
    if fp8 is None:
        raise RuntimeError(
            "torch._scaled_mm has no FP8 rate here: the GPU's matrix units take no FP8 "
            "(NVIDIA sm_89+ and MI300/MI350 do); this benchmark needs one of those")
    return dict(copy_GBps=copy, **fp8)


def expert_weights(e: int, H: int, I: int, gen: torch.Generator, device: torch.device):
    """Gaussian float32 w13 [e, 2I, H] and w2 [e, H, I] (scaled by 1/sqrt of their input dim),
    drawn on ``device`` by a generator seeded from ``gen`` (DeepSeek-V3's 32 local experts:
    1.4 G values, seconds on a GPU where a CPU takes tens of seconds)."""
    wgen = torch.Generator(device=device).manual_seed(
        int(torch.randint(2**31 - 1, (1,), generator=gen)))
    return (torch.randn(e, 2 * I, H, generator=wgen, device=device) / H**0.5,
            torch.randn(e, H, I, generator=wgen, device=device) / I**0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_shape(name: str, shape: dict, ceil: dict, sizes: list[int],
              paths: tuple[str, ...] = ("auto",), *, bf16: bool = True,
              batches: int = 1) -> list[dict]:
    """Rows of one shape: each size once per Triton experts ``path`` (auto, small, grouped);
    ``bf16``: the bf16 Triton experts on the dequantised weights timed beside them;
    ``batches``: the timed calls cycle through that many routings (``rotations``)."""
    from triton.testing import do_bench_cudagraph

    gen = torch.Generator().manual_seed(0)
    dt = native_fp8_dtype("cuda")
    rows = []
    for R in sizes:
        progress(f"{name}: {R} rows")
        x, ids, w, emap = _routing(shape, R, gen)
        e, H, I = emap.num_local, shape["H"], shape["I"]
        w13, w2 = expert_weights(e, H, I, gen, x.device)
        fw = quantize_experts(w13, w2, dtype=dt)
        d13, d2 = (t.bfloat16() for t in fw.dequantize(torch.float32))
        w13 = w2 = None
        sets = [(x, ids, w)] + [_routing(shape, R, gen)[:3] for _ in range(batches - 1)]
        pairs, touched = touched_experts(sets, emap)
        nbytes = touched * (fw.nbytes // e)
        flops = 2 * 3 * H * I * pairs
        floor = max(nbytes / (ceil["copy_GBps"] * 1e9),
                    flops / (ceil["fp8_matmul_TFLOPs"] * 1e12))
        ref = FP8ReferenceExperts()(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts",
                                    validate=False, out_dtype=torch.float32).out
        for path in paths:
            fp8_ex, bf16_ex = TritonFP8Experts(path=path), TritonExperts(path=path)

            def call_fp8(x, ids, w, ex=fp8_ex, fw=fw, emap=emap):
                return ex(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts", validate=False)

            def call_bf16(x, ids, w, ex=bf16_ex, d13=d13, d2=d2, emap=emap):
                return ex(x, ids, w, d13, d2, emap, weight_mode="experts", validate=False)

            out = call_fp8(x, ids, w).out
            t = do_bench_cudagraph(rotations(call_fp8, sets), rep=200,
                                   return_mode="median") / 1e3
            row = dict(shape=name, path=path, rows=R, local_pairs=pairs,
                       experts_touched=touched, time_us=t * 1e6, floor_us=floor * 1e6,
                       time_over_floor=t / floor, bf16_time_us=None,
                       fp8_speedup_over_bf16=None, TFLOPs=flops / t / 1e12,
                       GBps=nbytes / t / 1e9, rel_err_vs_fp8_reference=_rel(out, ref),
                       rel_err_vs_bf16=None)
            if bf16:
                out_bf16 = call_bf16(x, ids, w).out
                t_bf16 = do_bench_cudagraph(rotations(call_bf16, sets), rep=200,
                                            return_mode="median") / 1e3
                row.update(bf16_time_us=t_bf16 * 1e6, fp8_speedup_over_bf16=t_bf16 / t,
                           rel_err_vs_bf16=_rel(out, out_bf16))
            rows.append(row)
        torch.cuda.empty_cache()
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench experts-fp8``)."""
    block = [n for n, s in SHAPES.items() if s["I"] % 128 == 0]  # whole 128-row scale blocks
    p.add_argument("--shapes", nargs="+", default=block, choices=block,
                   help=f"default {block} (gpt-oss's I = 2880 is not whole 128-row blocks)")
    p.add_argument("--sizes", nargs="+", type=argtypes.positive_int, default=None,
                   help="rows (dsv3) / tokens (qwen3) instead of each shape's default sizes")
    p.add_argument("--paths", nargs="+", default=["auto"], choices=["auto", "small", "grouped"],
                   help="the Triton experts' paths to time (a row each): auto (by batch size), "
                   "small (no layout sort, experts/triton_small.py) or grouped")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="skip the bf16 Triton experts beside each row (half the run time)")
    p.add_argument("--batches", type=argtypes.positive_int, default=BATCHES,
                   help=f"routings the timed calls cycle through (default {BATCHES}: the "
                   "experts' weights read from HBM, not left in L2 by the call before)")
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
        name, SHAPES[name], ceil, args.sizes or SHAPES[name]["sizes"], tuple(args.paths),
        bf16=args.bf16, batches=args.batches)]
    table = Table(title=f"triton FP8 experts ({ceil['fp8_dtype']}), {device_description()}: "
                        f"{ceiling_line(ceil)}")
    for c in ("shape", "path", "rows", "time us", "floor us", "time/floor", "bf16 us", "bf16/fp8",
              "TFLOP/s", "GB/s", "err vs fp8 ref", "err vs bf16"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["shape"], r["path"], str(r["rows"]), f"{r['time_us']:.1f}",
                      f"{r['floor_us']:.1f}",
                      f"{r['time_over_floor']:.2f}", cell(r["bf16_time_us"], small_digits=1),
                      cell(r["fp8_speedup_over_bf16"]), f"{r['TFLOPs']:.1f}",
                      f"{r['GBps']:.0f}", f"{r['rel_err_vs_fp8_reference']:.1e}",
                      "-" if r["rel_err_vs_bf16"] is None else f"{r['rel_err_vs_bf16']:.1e}")
    console = Console(width=170)
    console.print(table)
    path = write_json(args.out, args.name, device=device_description(), ceilings=ceil, rows=rows)
    console.print(f"json: {path}")
    return 0
