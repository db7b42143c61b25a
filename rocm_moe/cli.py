"""rocm-moe: info, sanity, run.

    rocm-moe info      what this machine has and which backends can run here (and why not)
    rocm-moe sanity    single-token single-expert suite; exits 1 on any failure
    rocm-moe diagnose  find the first wrong stage of a pipeline and name the known bug class
    rocm-moe bench comm  dispatch/combine GB/s against raw all_to_all_single (benchmarks/)
    rocm-moe run       the main job: an EPMoE of the Qwen3-30B-A3B MoE shape on seeded random
                       weights over W ranks, checked against the float64 oracle, with per-stage
                       times per rank

Several ranks: --world-size N spawns N processes on this host; under torchrun (any number of
nodes) every rank joins the group from torchrun's environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from rocm_moe import backends, synthetic
from rocm_moe._libs import library_version
from rocm_moe.distributed import WorkerInfo, init_from_env, launch, under_torchrun
from rocm_moe.experts.reference import dense_moe_reference
from rocm_moe.faults import FAULTS
from rocm_moe.layer import EPMoE, Trace
from rocm_moe.placement import Placement
from rocm_moe.routing import RouterConfig
from rocm_moe.sanity import TOLERANCE, rel_err, run_sanity

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 140)


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
    p.add_argument("--comm", default=None,
                   help=f"comm backend: {backends.names('comm')}; default local for one rank, "
                   "torch for several")
    p.add_argument("--world-size", type=int, default=None,
                   help="EP ranks to spawn (gloo on CPU, NCCL one per GPU); default: torchrun's, "
                   "else one per GPU, else 2 on a CPU")
    p.add_argument("--experts", default="reference",
                   help=f"experts backend: {backends.names('experts')}")
    p.add_argument("--seed", type=int, default=0)


def _world_size(args) -> int:
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if args.world_size:
        return args.world_size
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _comm(args, world_size: int) -> str:
    """The comm backend asked for, else local for one rank and torch for several."""
    return args.comm or ("local" if world_size == 1 else "torch")


def _tokens_per_rank(args) -> int:
    if hasattr(args, "tokens"):
        return args.tokens
    return getattr(args, "batch", 1) * getattr(args, "seq", 1)


def _build_layer(args, info: WorkerInfo, dtype: torch.dtype, weight_mode: str) -> EPMoE:
    W = info.world_size
    comm = _comm(args, W)
    placement = Placement.contiguous(args.num_experts, W)
    dispatcher = backends.make_dispatcher(
        comm, placement, info.rank, hidden_size=args.hidden,
        top_k=args.top_k, dtype=dtype, max_tokens_per_rank=max(_tokens_per_rank(args), 16))
    experts = backends.make_experts(args.experts)
    if getattr(args, "checkpoint", None):
        from rocm_moe.integrations import hf

        weights = hf.load_moe_layer(args.checkpoint, args.layer, placement, info.rank)
        return hf.build_layer(weights, dispatcher=dispatcher, experts=experts,
                              weight_mode=weight_mode, dtype=dtype, device=info.device)
    router = RouterConfig.qwen3_moe(args.num_experts, args.top_k)
    layer = EPMoE(hidden_size=args.hidden, intermediate_size=args.intermediate, router=router,
                  dispatcher=dispatcher, experts=experts,
                  weight_mode=weight_mode, dtype=dtype, device=info.device)
    layer.reset_parameters(seed=args.seed)
    return layer


def _checkpoint_shape(args) -> None:
    """Take E, H, I, K from the checkpoint's config (before any rank starts)."""
    if not getattr(args, "checkpoint", None):
        return
    from rocm_moe.families import family
    from rocm_moe.integrations import hf

    cfg = hf.Checkpoint(args.checkpoint).config()
    router = RouterConfig.from_hf_config(cfg)
    args.num_experts, args.top_k = router.num_experts, router.top_k
    args.hidden, args.intermediate = cfg.hidden_size, family(cfg.model_type).intermediate_size(cfg)


def _expert_weights(args, dtype: torch.dtype):
    """Expert g's weights as the layer holds them (rounded to its dtype): synthetic, or read
    from the checkpoint on demand."""
    if getattr(args, "checkpoint", None):
        from rocm_moe.integrations import hf

        read = hf.expert_reader(args.checkpoint, args.layer)
    else:
        def read(g: int):
            return synthetic.expert_weights(args.seed, g, args.hidden, args.intermediate)

    def weights(g: int):
        w13, w2 = read(g)
        return w13.to(dtype), w2.to(dtype)
    return weights


def _on_ranks(args, worker) -> list:
    """Run ``worker(info, args)`` on every rank: in-process (W = 1), under torchrun, or spawned.
    Returns the results of all ranks (under torchrun: gathered to every rank)."""
    if under_torchrun():
        info = init_from_env()
        try:
            result = worker(info, args)
            everyone = [None] * info.world_size
            torch.distributed.all_gather_object(everyone, result)
            return everyone if info.rank == 0 else []
        finally:
            torch.distributed.destroy_process_group()
    W = _world_size(args)
    # Refuse unusable backends here, in one line, before any rank is spawned.
    backends.require("experts", args.experts)
    backends.require("comm", _comm(args, W))
    if W == 1:
        device = _device(args.device)
        return [worker(WorkerInfo(0, 1, device, "none"), args)]
    return launch(W, worker, args)


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
        libs.add_row(lib, library_version(lib) or "not installed")
    console.print(libs)
    return 0


# ---- sanity -------------------------------------------------------------------------------------
def _sanity_rank(info: WorkerInfo, args) -> list[dict]:
    dtype = _dtype(args.dtype, info.device)
    layer = _build_layer(args, info, dtype, "experts")
    rows = run_sanity(layer, seed=args.seed, expert_weights=_expert_weights(args, dtype))
    return [dict(vars(r), passed=r.passed, dtype=str(dtype)) for r in rows]


def cmd_sanity(args) -> int:
    results = _on_ranks(args, _sanity_rank)
    if not results:  # a torchrun rank other than 0
        return 0
    W = len(results)
    table = Table(title=f"sanity: W={W} comm={_comm(args, W)} "
                        f"experts={args.experts} dtype={results[0][0]['dtype']} "
                        f"E={args.num_experts} H={args.hidden} I={args.intermediate} "
                        f"K={args.top_k}")
    for col in ("check", "weight_mode", "cases", "max rel err (all ranks)", "tolerance",
                "result"):
        table.add_column(col)
    failed = 0
    for i, row in enumerate(results[0]):
        err = max(rank_rows[i]["max_rel_err"] for rank_rows in results)
        ok = all(rank_rows[i]["passed"] for rank_rows in results)
        failed += not ok
        verdict = "PASS" if ok else "[red]FAIL[/red]"
        if row["skipped"]:
            verdict = f"SKIP: {row['skipped']}"
        table.add_row(row["check"], row["weight_mode"], str(row["cases"]), f"{err:.2e}",
                      f"{row['tolerance']:.0e}", verdict)
    console.print(table)
    console.print(f"{len(results[0]) - failed} passed, {failed} failed")
    return 1 if failed else 0


# ---- run ----------------------------------------------------------------------------------------
def _run_rank(info: WorkerInfo, args) -> dict:
    dtype = _dtype(args.dtype, info.device)
    t0 = time.perf_counter()
    layer = _build_layer(args, info, dtype, args.weight_mode)
    x = synthetic.tokens(args.seed, info.rank, args.tokens, args.hidden).to(dtype)
    x = x.to(info.device)
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        layer(x)  # warm-up
        traces, totals = [], []
        for _ in range(args.iters):
            trace = Trace()
            start = time.perf_counter()
            layer(x, trace=trace)
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            totals.append(time.perf_counter() - start)
            traces.append(trace)
        checked = layer(x, return_raw=True)
        y_ref, raw_ref = dense_moe_reference(x, checked.topk_weights, checked.topk_ids,
                                             expert_weights=_expert_weights(args, dtype))
        if layer.shared_experts is not None:
            y_ref = y_ref + layer.shared_experts.reference(x)
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    return dict(rank=info.rank, build_s=build_s, dtype=str(dtype), backend=info.backend,
                layer_bytes=params,
                device=str(info.device),
                stage_ms={n: 1e3 * statistics.median(t.times[n] for t in traces)
                          for n in traces[0].times},
                total_ms=1e3 * statistics.median(totals),
                rel_err={"out": rel_err(checked.out, y_ref), "raw": rel_err(checked.raw, raw_ref)},
                tolerance=TOLERANCE[dtype])


def _weights_source(args) -> str:
    if getattr(args, "checkpoint", None):
        return f"{args.checkpoint} layer {args.layer}"
    return f"synthetic seed {args.seed}"


def cmd_run(args) -> int:
    _checkpoint_shape(args)
    results = _on_ranks(args, _run_rank)
    if not results:
        return 0
    W, r0 = len(results), results[0]
    comm = _comm(args, W)
    console.print(f"EPMoE E={args.num_experts} H={args.hidden} I={args.intermediate} "
                  f"K={args.top_k}, {args.tokens} tokens per rank, W={W} ({r0['backend']}), "
                  f"{r0['dtype']}, {r0['device']} ({backends.device_description()}), "
                  f"comm={comm}, experts={args.experts}, weight_mode={args.weight_mode}, "
                  f"weights: {_weights_source(args)}; "
                  f"built in {max(r['build_s'] for r in results):.1f} s")
    stages = list(r0["stage_ms"])
    table = Table(title=f"median ms of {args.iters} iterations per rank "
                        "(stage times device-synchronised)")
    for col in ("rank", *stages, "total (untraced)", "out rel err", "raw rel err", "layer MiB"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["rank"]), *(f"{r['stage_ms'][n]:.3f}" for n in stages),
                      f"{r['total_ms']:.3f}", f"{r['rel_err']['out']:.2e}",
                      f"{r['rel_err']['raw']:.2e}", f"{r['layer_bytes'] / 2**20:.3f}")
    console.print(table)
    slowest = max(r["total_ms"] for r in results) / 1e3
    console.print(f"throughput: {W * args.tokens / slowest:,.0f} tokens/s "
                  f"({W} ranks x {args.tokens} tokens / slowest rank's time)")
    tol = r0["tolerance"]
    ok = all(e <= tol for r in results for e in r["rel_err"].values())
    worst = max(e for r in results for e in r["rel_err"].values())
    console.print(f"check against the float64 oracle: worst rel err {worst:.2e} "
                  f"(tolerance {tol:.0e}) {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "command": "rocm-moe " + " ".join(sys.argv[1:]),
                       "config": {k: v for k, v in vars(args).items() if k != "func"},
                       "device": backends.device_description(), "world_size": W,
                       "ranks": results, "tokens_per_s": W * args.tokens / slowest,
                       "passed": ok}, f, indent=2)
    return 0 if ok else 1


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
    p.add_argument("--checkpoint", default=None,
                   help="a safetensors checkpoint directory (Qwen2/3-MoE, Mixtral, DeepSeek-V3):"
                   " run its MoE layer instead of random weights; E, H, I, K come from it")
    p.add_argument("--layer", type=int, default=1, help="the checkpoint's MoE layer index")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("diagnose", help="find the first wrong stage and name the bug class")
    _add_shape_args(p, E=16, H=64, I=32, K=4)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=9, help="tokens per sequence")
    p.add_argument("--weight-mode", choices=["experts", "combine"], default="experts")
    p.add_argument("--inject", choices=sorted(FAULTS), default=None,
                   help="plant a known bug to see its diagnosis")
    p.add_argument("--json", action="store_true", help="print the per-rank reports as JSON")
    p.add_argument("--dump", default=None,
                   help="write the stage tensors to DUMP.rank<r>.safetensors")
    p.set_defaults(func=cmd_diagnose)
    p = sub.add_parser("bench", help="benchmarks: rocm-moe bench comm --help")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    return parser


# ---- diagnose -----------------------------------------------------------------------------------
def _diagnose_rank(info: WorkerInfo, args) -> dict:
    from rocm_moe.diagnose import diagnose

    dtype = _dtype(args.dtype, info.device)
    layer = _build_layer(args, info, dtype, args.weight_mode)
    layer.fault = args.inject
    x = synthetic.tokens(args.seed, info.rank, args.batch * args.seq, args.hidden)
    x = x.reshape(args.batch, args.seq, args.hidden).to(dtype).to(info.device)
    return diagnose(layer, x, expert_weights=_expert_weights(args, dtype),
                    dump=args.dump).to_dict()


def cmd_diagnose(args) -> int:
    results = _on_ranks(args, _diagnose_rank)
    if not results:
        return 0
    if args.json:
        print(json.dumps(results, indent=1))
        return 0 if all(r["first_bad"] is None for r in results) else 1
    W = len(results)
    console.print(f"diagnose: W={W} comm={_comm(args, W)} "
                  f"experts={args.experts} weight_mode={args.weight_mode} "
                  f"dtype={results[0]['dtype']} E={args.num_experts} K={args.top_k} "
                  f"tokens/rank={args.batch}x{args.seq}" +
                  (f" injected={args.inject}" if args.inject else ""))
    table = Table()
    table.add_column("stage")
    for r in results:
        table.add_column(f"rank {r['rank']} rel err", justify="right")
    table.add_column("verdict")
    for i, stage in enumerate(results[0]["stages"]):
        errs = [r["stages"][i]["rel_err"] for r in results]
        bad = [r["rank"] for r in results if not r["stages"][i]["ok"]]
        verdict = "ok" if not bad else f"[red]DIVERGES[/red] on ranks {bad}"
        table.add_row(stage["stage"], *(f"{e:.1e}" for e in errs), verdict)
    console.print(table)
    firsts = {r["first_bad"] for r in results} - {None}
    if not firsts:
        console.print(f"all stages clean (tolerance {results[0]['tolerance']:.0e})")
        return 0
    order = [s["stage"] for s in results[0]["stages"]]
    first = min(firsts, key=order.index)
    found = [r["diagnosis"] for r in results if r["first_bad"] == first and r["diagnosis"]]
    console.print(f"first wrong stage: [bold]{first}[/bold]")
    if found:
        d = found[0]
        console.print(f"bug: [bold]{d['bug']}[/bold]: {d['signature']} "
                      f"(prediction matches to {d['match_rel_err']:.1e})", markup=True)
        console.print(f"fix: {d['fix']}", markup=False)
    else:
        console.print("no known bug class matches this stage's output; dump the stage tensors "
                      "with --dump and compare them offline")
    return 1


BENCHMARKS = {"comm": "rocm_moe.benchmarks.comm", "experts": "rocm_moe.benchmarks.experts",
              "layer": "rocm_moe.benchmarks.layer"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHMARKS:
        import importlib

        return importlib.import_module(BENCHMARKS[argv[1]]).main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:  # user errors: one clear line, no traceback
        print(f"rocm-moe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
