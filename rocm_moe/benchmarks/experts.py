"""Expert-stage benchmark: the triton backend against its floor, the torch reference beside it.

Whole stage (layout sort, both GEMMs, activation, weighting, reduction) in "weighted" mode,
timed as CUDA-graph replays (``triton.testing.do_bench_cudagraph``, median) after warm-up, the
calls cycling through ``--batches`` routings (default BATCHES; one routing replayed keeps the
experts' weights of a small batch in L2: 75 MB for one Qwen3 token in bf16 against an H100's
50 MB); floor and counts are the routings' means. The reference backend (host-synchronising)
is timed with events on the first routing, median of a few calls.

Floor = max(bytes / copy bandwidth, flops / bf16 matmul rate), both ceilings measured in the
same run: a 1 GiB device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul.
bytes = weights of the local experts the batch touches + activations in and out;
flops = 2 * 3 * H * I * (local (row, slot) pairs).

Shapes (issue 4): Qwen3-30B-A3B (E=128 all local, H=2048, I=768, K=8) at M tokens, and
DeepSeek-V3 rank-local (E=256 global, experts 160..191 local, H=7168, I=2048, K=8) at R rows.

gpt-oss (issue 30; ``--shapes gpt-oss-20b gpt-oss-120b``: E=32 / 128 all local, H=I=2880,
K=4, its expert variant: biases, clamped SwiGLU): one row set per weight format (``--formats``):
"bf16" (the Triton experts) and "mxfp4" (``experts/mxfp4.py``: MXFP4 weights dequantised in
registers), both on the same values (random MXFP4 codes and scales, the bf16 weights their
exact dequantisation), so rel err is against the same reference (the reference experts in
bf16). Each format's floor counts its own weight bytes: bf16 2 B per value, MXFP4 0.5 B per
value + 1 B per 32 (4.25 bits); ``vs_bf16`` is the bf16 row's time over this one's. MXFP4 rows:
path "auto" (its heuristic launch config) and "w8" (the same tiles on 8 warps, for tuning).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from rocm_moe._console import progress
from rocm_moe.benchmarks import NO_PLOT, cell, pyplot, rotations, write_json
from rocm_moe.cli import argtypes
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.experts.triton import TritonExperts
from rocm_moe.placement import Placement

SHAPES = {
    "qwen3": dict(E=128, W=1, rank=0, H=2048, I=768, K=8,
                  sizes=[1, 4, 16, 64, 256, 1024, 4096, 16384]),
    "dsv3": dict(E=256, W=8, rank=5, H=7168, I=2048, K=8, sizes=[128, 1024, 8192]),
    "gpt-oss-20b": dict(E=32, W=1, rank=0, H=2880, I=2880, K=4,
                        sizes=[1, 4, 16, 64, 256, 1024, 4096]),
    "gpt-oss-120b": dict(E=128, W=1, rank=0, H=2880, I=2880, K=4,
                         sizes=[1, 4, 16, 64, 256, 1024, 4096]),
}
DEFAULT_SHAPES = ["qwen3", "dsv3"]
GPT_OSS = ("gpt-oss-20b", "gpt-oss-120b")  # MXFP4 checkpoints, gpt-oss's expert variant
FORMATS = ("bf16", "mxfp4")
BYTES_PER_VALUE = {"bf16": 2.0, "mxfp4": 0.5 + 1 / 32}  # weights read by each format


def copy_rate() -> float:
    """Device-to-device copy GB/s of 1 GiB of bf16 (bytes read + written), median."""
    from triton.testing import do_bench

    n = 2**29  # 1 GiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t_copy = do_bench(lambda: b.copy_(a), return_mode="median") / 1e3
    return 2 * n * 2 / t_copy / 1e9


def fp8_matmul_rates(n: int = 8192) -> dict | None:
    """The FP8 ceiling of this GPU, measured: TFLOP/s of ``torch._scaled_mm`` on n^3 FP8 (the
    device's encoding, ``quant.native_fp8_dtype``) with a bfloat16 output, per-tensor scales
    (precise and fast accumulation) and rowwise scales (float32 [n, 1] x [1, n]) where this
    torch has them; ``fp8_matmul_TFLOPs`` is the fastest, the strictest floor. None where there
    is nothing to measure: no CUDA/ROCm GPU, or one whose matrix units take no FP8 (NVIDIA
    before sm_89, ROCm before gfx94x)."""
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench

    from rocm_moe.experts.triton_fp8 import _fp8_dot_native
    from rocm_moe.quant import native_fp8_dtype

    dev = torch.device("cuda", torch.cuda.current_device())
    dt = native_fp8_dtype("cuda")
    if not _fp8_dot_native(dev, dt):
        return None
    torch.cuda.empty_cache()
    m = torch.randn(n, n, device=dev).to(dt)
    mt = torch.randn(n, n, device=dev).to(dt).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device=dev)
    rows, cols = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
    calls = {"precise_accum": lambda: torch._scaled_mm(m, mt, scale_a=one, scale_b=one,
                                                       out_dtype=torch.bfloat16),
             "fast_accum": lambda: torch._scaled_mm(m, mt, scale_a=one, scale_b=one,
                                                    out_dtype=torch.bfloat16,
                                                    use_fast_accum=True),
             "rowwise": lambda: torch._scaled_mm(m, mt, scale_a=rows, scale_b=cols,
                                                 out_dtype=torch.bfloat16)}
    rates = {}
    for name, call in calls.items():
        try:
            call()
        except (RuntimeError, NotImplementedError):  # (rowwise scales: not in every torch)
            continue
        rates[name] = 2 * n**3 / (do_bench(call, return_mode="median") / 1e3) / 1e12
    if not rates:
        return None
    out = {f"fp8_matmul_TFLOPs_{k}": v for k, v in rates.items()}
    return dict(out, fp8_matmul_TFLOPs=max(rates.values()), fp8_dtype=str(dt))


def ceiling_line(ceil: dict) -> str:
    """The ceilings of a benchmark's header: ``copy 3000 GB/s, bf16 matmul 700 TFLOP/s, FP8
    _scaled_mm 1400 TFLOP/s (measured)``; the parts measured only (FP8: "none" when the GPU
    has no FP8 matrix units)."""
    parts = [f"copy {ceil['copy_GBps']:.0f} GB/s"]
    if "matmul_TFLOPs" in ceil:
        parts.append(f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    if "fp8_matmul_TFLOPs" in ceil:
        fp8 = ceil["fp8_matmul_TFLOPs"]
        parts.append("FP8 _scaled_mm " + ("none" if fp8 is None else f"{fp8:.0f} TFLOP/s"))
    return ", ".join(parts) + " (measured)"


def ceilings() -> dict:
    """Copy GB/s, bf16 matmul TFLOP/s (8192^3) and the FP8 ceiling (``fp8_matmul_rates``,
    None fields where the GPU has no FP8 matrix units), measured now."""
    from triton.testing import do_bench

    copy = copy_rate()
    torch.cuda.empty_cache()  # (its 2 GiB back before the matmuls' operands)
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = do_bench(lambda: m @ m, return_mode="median") / 1e3
    m = None  # (freed before the FP8 operands)
    fp8 = fp8_matmul_rates() or dict(fp8_matmul_TFLOPs=None)
    return dict(copy_GBps=copy, matmul_TFLOPs=2 * 8192**3 / t_mm / 1e12, **fp8)


def _routing(shape: dict, rows: int, gen: torch.Generator, device: str = "cuda"):
    """The case's input rows, ids, weights and expert map: the first draws of ``gen``, so
    ``bench/padding.py`` counts the benchmark's routing on a CPU without drawing weights."""
    emap = Placement.contiguous(shape["E"], shape["W"]).expert_map(shape["rank"]).to(device)
    x = torch.randn(rows, shape["H"], generator=gen).bfloat16().to(device)
    ids = torch.rand(rows, shape["E"], generator=gen).topk(shape["K"], dim=1).indices.int()
    w = torch.rand(rows, shape["K"], generator=gen)
    return x, ids.to(device), w.to(device), emap


BATCHES = 8  # routings the timed calls cycle through (``--batches``)


def touched_experts(sets: list[tuple], emap) -> tuple[float, float]:
    """(local (row, slot) pairs, distinct local experts touched), each the mean over the
    routings ``sets`` of (x, ids, w)."""
    locs = [emap.local_ids(ids) for _, ids, _ in sets]
    return (statistics.mean(int((loc >= 0).sum()) for loc in locs),
            statistics.mean(int(loc[loc >= 0].unique().numel()) for loc in locs))


def _case(shape: dict, rows: int, gen: torch.Generator):
    x, ids, w, emap = _routing(shape, rows, gen)
    e, H, I = emap.num_local, shape["H"], shape["I"]
    w13 = (torch.randn(e, 2 * I, H, generator=gen) / H**0.5).bfloat16().cuda()
    w2 = (torch.randn(e, H, I, generator=gen) / I**0.5).bfloat16().cuda()
    return x, ids, w, w13, w2, emap


def run_shape(name: str, shape: dict, ceil: dict, sizes: list[int],
              paths: tuple[str, ...] = ("auto",), batches: int = 1) -> list[dict]:
    """Rows of one shape: each size, once per Triton experts ``path`` (auto, small, grouped;
    the reference timed once per size); the timed calls cycle through ``batches`` routings."""
    from triton.testing import do_bench_cudagraph

    gen = torch.Generator().manual_seed(0)
    rows = []
    for R in sizes:
        progress(f"{name}: {R} rows")
        x, ids, w, w13, w2, emap = _case(shape, R, gen)
        sets = [(x, ids, w)] + [_routing(shape, R, gen)[:3] for _ in range(batches - 1)]
        pairs, touched = touched_experts(sets, emap)
        H, I = shape["H"], shape["I"]
        nbytes = touched * 3 * H * I * 2 + 2 * R * H * 2
        flops = 2 * 3 * H * I * pairs
        floor = max(nbytes / (ceil["copy_GBps"] * 1e9), flops / (ceil["matmul_TFLOPs"] * 1e12))
        ref_backend = ReferenceExperts()
        ref = ref_backend(x, ids, w, w13, w2, emap, weight_mode="experts", validate=False).out
        times, errs = {}, {}
        for path in paths:
            tri = TritonExperts(path=path)

            def call(x, ids, w, tri=tri, w13=w13, w2=w2, emap=emap):
                return tri(x, ids, w, w13, w2, emap, weight_mode="experts", validate=False)

            out = call(x, ids, w).out
            errs[path] = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            times[path] = do_bench_cudagraph(rotations(call, sets), rep=200,
                                             return_mode="median") / 1e3
        ref_times = []
        for _ in range(5):
            s, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            ref_backend(x, ids, w, w13, w2, emap, weight_mode="experts", validate=False)
            e_.record()
            e_.synchronize()
            ref_times.append(s.elapsed_time(e_) / 1e3)
        rows += [dict(shape=name, format="bf16", path=path, rows=R, local_pairs=pairs,
                      experts_touched=touched, time_us=t * 1e6, floor_us=floor * 1e6,
                      time_over_floor=t / floor, TFLOPs=flops / t / 1e12, GBps=nbytes / t / 1e9,
                      rel_err=errs[path], reference_us=statistics.median(ref_times) * 1e6,
                      vs_bf16=None)
                 for path, t in times.items()]
    return rows


def _mxfp4_case(shape: dict, gen: torch.Generator, device: str = "cuda"):
    """gpt-oss's local experts: random MXFP4 codes with scales 2**-9..2**-6 (trained weights'
    range), their exact bf16 dequantisation, bf16 biases; built on the GPU, one expert at a
    time (the 120b's e = 128 in float64 at once would not fit)."""
    from rocm_moe.formats.mxfp4 import MXFP4Tensor

    e, H, I = shape["E"] // shape["W"], shape["H"], shape["I"]
    g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,),
                                                                     generator=gen)))
    q = [MXFP4Tensor(torch.randint(0, 256, (e, n, k // 2), generator=g, device=device,
                                   dtype=torch.uint8),
                     torch.randint(118, 122, (e, n, k // 32), generator=g, device=device,
                                   dtype=torch.uint8)) for n, k in ((2 * I, H), (H, I))]
    dense = [torch.stack([t[j].dequantize(torch.float32).bfloat16() for j in range(e)])
             for t in q]
    biases = (0.1 * torch.randn(e, 2 * I, generator=g, device=device)).bfloat16(), \
        (0.1 * torch.randn(e, H, generator=g, device=device)).bfloat16()
    return q, dense, biases


def _graph_time(call) -> float:
    """Seconds per CUDA-graph replay of ``call``, median."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(call, rep=200, return_mode="median") / 1e3


def run_gpt_oss(name: str, shape: dict, ceil: dict, sizes: list[int],
                paths: tuple[str, ...] = ("auto",), formats: tuple[str, ...] = FORMATS, *,
                device: str = "cuda", timer=_graph_time, dtype=torch.bfloat16) -> list[dict]:
    """Rows of a gpt-oss shape: each size, the bf16 Triton experts (once per ``path``) and the
    MXFP4 ones, gpt-oss's variant, each against its own weight-read floor (``device``,
    ``timer`` and ``dtype``: a CPU test runs it in the interpreter, float16)."""
    from rocm_moe.experts.base import ExpertVariant
    from rocm_moe.experts.mxfp4 import TritonMXFP4Experts, mxfp4_block_config

    if "small" in paths:  # (triton_small runs plain SwiGLU only)
        progress(f"{name}: the small path runs plain SwiGLU only; gpt-oss's variant skips it")
        paths = tuple(p for p in paths if p != "small") or ("auto",)
    gen = torch.Generator().manual_seed(0)
    (q13, q2), (w13, w2), (b13, b2) = _mxfp4_case(shape, gen, device)
    w13, w2, b13, b2 = (t.to(dtype) for t in (w13, w2, b13, b2))
    var = dict(variant=ExpertVariant.gpt_oss(), w13_bias=b13, w2_bias=b2)
    H, I = shape["H"], shape["I"]
    rows = []
    for R in sizes:
        progress(f"{name}: {R} rows")
        x, ids, w, emap = _routing(shape, R, gen, device)
        x = x.to(dtype)
        loc = emap.local_ids(ids)
        pairs = int((loc >= 0).sum())
        touched = int(loc[loc >= 0].unique().numel())
        flops = 2 * 3 * H * I * pairs
        ref = ReferenceExperts()(x, ids, w, w13, w2, emap, weight_mode="experts",
                                 validate=False, **var).out.double()
        runs = [("bf16", p, TritonExperts(path=p), (w13, w2)) for p in paths
                if "bf16" in formats]
        if "mxfp4" in formats:  # its heuristic config, and the same tiles on 8 warps (tuning)
            runs.append(("mxfp4", "auto", TritonMXFP4Experts(), (q13, q2)))
            cfg = mxfp4_block_config(R * shape["K"], emap.num_local,
                                     amd=torch.version.hip is not None and device == "cuda")
            w8 = {**cfg, **{k: dict(cfg[k], num_warps=8) for k in ("gate_up", "down")}}
            runs.append(("mxfp4", "w8", TritonMXFP4Experts(config=w8), (q13, q2)))
        bf16_t = None
        for fmt, path, backend, weights in runs:
            def call(backend=backend, weights=weights, x=x, ids=ids, w=w, emap=emap):
                return backend(x, ids, w, *weights, emap, weight_mode="experts",
                               validate=False, **var)

            err = ((call().out.double() - ref).norm() / ref.norm()).item()
            t = timer(call)
            nbytes = touched * 3 * H * I * BYTES_PER_VALUE[fmt] + 2 * R * H * 2
            floor = max(nbytes / (ceil["copy_GBps"] * 1e9),
                        flops / (ceil["matmul_TFLOPs"] * 1e12))
            if fmt == "bf16" and bf16_t is None:
                bf16_t = t
            rows.append(dict(shape=name, format=fmt, path=path, rows=R, local_pairs=pairs,
                             experts_touched=touched, time_us=t * 1e6, floor_us=floor * 1e6,
                             time_over_floor=t / floor, TFLOPs=flops / t / 1e12,
                             GBps=nbytes / t / 1e9, rel_err=err, reference_us=None,
                             vs_bf16=None if bf16_t is None else bf16_t / t))
    return rows


def _plot(rows: list[dict], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    names = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rs = [r for r in rows if r["shape"] == name]
        for fp in dict.fromkeys((r["format"], r["path"]) for r in rs):
            rp = [r for r in rs if (r["format"], r["path"]) == fp]
            ax.plot([r["rows"] for r in rp], [r["time_over_floor"] for r in rp], "o-",
                    label=f"triton {fp[0]} ({fp[1]})")
        ref = [r for r in {r["rows"]: r for r in rs}.values() if r["reference_us"] is not None]
        if ref:
            ax.plot([r["rows"] for r in ref], [r["reference_us"] / r["floor_us"] for r in ref],
                    "s--", label="torch reference")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (qwen3) / received rows (dsv3)")
        ax.set_ylabel("time / floor")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench experts``, which ``bench/experts.py`` runs)."""
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES),
                   help=f"default {DEFAULT_SHAPES}; {list(GPT_OSS)}: gpt-oss's experts, a row "
                   "set per --formats")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS),
                   action=argtypes.Given,
                   help="gpt-oss shapes: the weight formats to time (bf16: the Triton experts, "
                   "mxfp4: the MXFP4 ones), each against its own weight-read floor")
    p.add_argument("--paths", nargs="+", default=["auto"], choices=["auto", "small", "grouped"],
                   help="the Triton experts' paths to time (a row each): auto (by batch size), "
                   "small (no layout sort, experts/triton_small.py) or grouped")
    p.add_argument("--sizes", type=argtypes.positive_int, nargs="+", default=None,
                   help="tokens / rows to time (default: each shape's list)")
    p.add_argument("--batches", type=argtypes.positive_int, default=BATCHES,
                   help=f"routings the timed calls cycle through (default {BATCHES}: the "
                   "experts' weights read from HBM, not left in L2 by the call before; the "
                   "gpt-oss rows replay one)")
    p.add_argument("--out", type=argtypes.output_dir, default="bench/results")
    p.add_argument("--name", type=argtypes.file_stem, default="experts")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run it with parsed ``args``; ``parser`` reports a machine that cannot run it."""
    if "--formats" in argtypes.given(args) and not set(args.shapes) & set(GPT_OSS):
        parser.error(f"--formats picks the weight formats of the gpt-oss shapes "
                     f"{list(GPT_OSS)}, and --shapes {' '.join(args.shapes)} has none (it "
                     "would be ignored): add one or drop --formats")
    if not torch.cuda.is_available():
        parser.error("needs a GPU (it times the Triton experts), and torch sees none here "
                     "(torch.cuda.is_available() is False); run it on a CUDA or ROCm machine")
    from rich.console import Console
    from rich.table import Table

    from rocm_moe.backends import device_description

    progress("measuring the copy and matmul ceilings")
    ceil = ceilings()
    rows = []
    for name in args.shapes:
        sizes = args.sizes or SHAPES[name]["sizes"]
        if name in GPT_OSS:
            rows += run_gpt_oss(name, SHAPES[name], ceil, sizes, tuple(args.paths),
                                tuple(args.formats))
        else:
            rows += run_shape(name, SHAPES[name], ceil, sizes, tuple(args.paths), args.batches)
    table = Table(title=f"triton experts, {device_description()}: {ceiling_line(ceil)}")
    for c in ("shape", "format", "path", "rows", "time us", "floor us", "time/floor",
              "TFLOP/s", "GB/s", "rel err", "reference us", "bf16 / this"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["shape"], r["format"], r["path"], str(r["rows"]), f"{r['time_us']:.1f}",
                      f"{r['floor_us']:.1f}",
                      f"{r['time_over_floor']:.2f}", f"{r['TFLOPs']:.1f}", f"{r['GBps']:.0f}",
                      f"{r['rel_err']:.1e}", cell(r["reference_us"], small_digits=0),
                      cell(r["vs_bf16"]))
    console = Console(width=150)
    console.print(table)
    path = write_json(args.out, args.name, device=device_description(), ceilings=ceil, rows=rows)
    console.print(f"json: {path}")
    console.print(_plot(rows, path.with_suffix(".png")), markup=False)
    return 0
