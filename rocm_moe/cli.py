"""rocm-moe: info, sanity, run.

    rocm-moe info      what this machine has and which backends can run here (and why not)
    rocm-moe sanity    single-token single-expert suite; exits 1 on any failure
    rocm-moe run       the main job: an EPMoE of the Qwen3-30B-A3B MoE shape on seeded random
                       weights, checked against the float64 oracle, with per-stage times
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from rocm_moe import backends
from rocm_moe.experts.reference import dense_moe_reference
from rocm_moe.layer import EPMoE, Trace
from rocm_moe.placement import Placement
from rocm_moe.routing import RouterConfig
from rocm_moe.sanity import TOLERANCE, rel_err, run_sanity

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
console = Console(highlight=False, soft_wrap=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 GEMMs are the norm on GPUs; a CPU runs float32 much faster
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _add_shape_args(p: argparse.ArgumentParser, *, E: int, H: int, I: int, K: int) -> None:
    p.add_argument("--num-experts", type=int, default=E, help="E, routed experts")
    p.add_argument("--hidden", type=int, default=H, help="H, hidden size")
    p.add_argument("--intermediate", type=int, default=I, help="I, per-expert intermediate size")
    p.add_argument("--top-k", type=int, default=K, help="K, experts per token")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--comm", default="local", help=f"comm backend: {backends.names('comm')}")
    p.add_argument("--experts", default="reference",
                   help=f"experts backend: {backends.names('experts')}")
    p.add_argument("--seed", type=int, default=0)


def _build_layer(args, device: torch.device, dtype: torch.dtype, weight_mode: str) -> EPMoE:
    router = RouterConfig.qwen3_moe(args.num_experts, args.top_k)
    dispatcher = backends.make_dispatcher(args.comm, Placement.contiguous(args.num_experts, 1), 0)
    layer = EPMoE(hidden_size=args.hidden, intermediate_size=args.intermediate, router=router,
                  dispatcher=dispatcher, experts=backends.make_experts(args.experts),
                  weight_mode=weight_mode, dtype=dtype, device=device)
    layer.reset_parameters(seed=args.seed)
    return layer


# ---- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    console.print(f"rocm_moe {__import__('rocm_moe').__version__}, torch {torch.__version__}, "
                  f"Python {platform.python_version()}, device: {backends.device_description()}")
    table = Table(title="backends")
    for col in ("kind", "name", "status"):
        table.add_column(col)
    for b in backends.BACKENDS.values():
        reason = b.availability()
        table.add_row(b.kind, b.name, "usable" if reason is None else f"unavailable: {reason}")
    console.print(table)
    libs = Table(title="optional libraries")
    for col in ("library", "version"):
        libs.add_column(col)
    for lib in ("triton", "mori", "aiter", "transformers", "safetensors", "matplotlib"):
        libs.add_row(lib, backends.library_version(lib) or "not installed")
    console.print(libs)
    return 0


# ---- sanity -------------------------------------------------------------------------------------
def cmd_sanity(args) -> int:
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    layer = _build_layer(args, device, dtype, "experts")
    rows = run_sanity(layer, seed=args.seed)
    table = Table(title=f"sanity: comm={args.comm} experts={args.experts} dtype={dtype} "
                        f"E={args.num_experts} H={args.hidden} I={args.intermediate}")
    for col in ("check", "weight_mode", "cases", "max rel err", "tolerance", "result"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.check, r.weight_mode, str(r.cases), f"{r.max_rel_err:.2e}",
                      f"{r.tolerance:.0e}", "PASS" if r.passed else "[red]FAIL[/red]")
    console.print(table)
    failed = [r for r in rows if not r.passed]
    console.print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# ---- run ----------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    t0 = time.perf_counter()
    layer = _build_layer(args, device, dtype, args.weight_mode)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, args.hidden, generator=gen)
    x = x.to(dtype).to(device)
    build_s = time.perf_counter() - t0

    with torch.no_grad():
        layer(x)  # warm-up
        traces, totals = [], []
        for _ in range(args.iters):
            trace = Trace()
            start = time.perf_counter()
            layer(x, trace=trace)
            totals.append(time.perf_counter() - start)
            traces.append(trace)
        checked = layer(x, return_raw=True)
        y_ref, raw_ref = dense_moe_reference(x, checked.topk_weights, checked.topk_ids,
                                             layer.w13, layer.w2)
    stages = {name: statistics.median(t.times[name] for t in traces) for name in traces[0].times}
    total = statistics.median(totals)
    errors = {"out vs float64 oracle": rel_err(checked.out, y_ref),
              "raw vs float64 oracle": rel_err(checked.raw, raw_ref)}
    tol = TOLERANCE[dtype]

    console.print(f"EPMoE E={args.num_experts} H={args.hidden} I={args.intermediate} "
                  f"K={args.top_k}, T={args.tokens} tokens, {dtype}, {device} "
                  f"({backends.device_description()}), comm={args.comm}, "
                  f"experts={args.experts}, weight_mode={args.weight_mode}; built in "
                  f"{build_s:.1f} s")
    table = Table(title=f"median of {args.iters} iterations (stage times device-synchronised)")
    for col in ("stage", "ms", "share"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in stages.items():
        table.add_row(name, f"{s * 1e3:.3f}", f"{s / max(sum(stages.values()), 1e-12):.0%}")
    table.add_row("total (untraced)", f"{total * 1e3:.3f}", "")
    console.print(table)
    console.print(f"throughput: {args.tokens / total:,.0f} tokens/s")
    for name, err in errors.items():
        verdict = "PASS" if err <= tol else "FAIL"
        console.print(f"{name}: rel err {err:.2e} (tolerance {tol:.0e}) {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "command": "rocm-moe " + " ".join(sys.argv[1:]),
                       "config": {k: v for k, v in vars(args).items() if k != "func"},
                       "dtype": str(dtype), "device": backends.device_description(),
                       "stage_ms": {k: v * 1e3 for k, v in stages.items()},
                       "total_ms": total * 1e3, "tokens_per_s": args.tokens / total,
                       "rel_err": errors, "tolerance": tol}, f, indent=2)
    return 0 if all(e <= tol for e in errors.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocm-moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="machine, torch, and which backends run here")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("sanity", help="single-token single-expert suite (exit 1 on failure)")
    _add_shape_args(p, E=16, H=256, I=128, K=4)
    p.set_defaults(func=cmd_sanity)
    p = sub.add_parser("run", help="main job: Qwen3-30B-A3B MoE shape, checked, timed")
    _add_shape_args(p, E=128, H=2048, I=768, K=8)
    p.add_argument("--tokens", type=int, default=256, help="T, tokens in the batch")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (after 1 warm-up)")
    p.add_argument("--weight-mode", choices=["experts", "combine"], default="experts")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:  # user errors: one clear line, no traceback
        print(f"rocm-moe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
