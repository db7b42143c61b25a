"""rocm-moe run: the main job. An EPMoE of the Qwen3-30B-A3B MoE shape (E=128, H=2048, I=768,
K=8) on seeded random weights, or one MoE layer of a safetensors checkpoint, over W ranks: every
rank is timed per stage and checked against the float64 oracle.

Exit codes: 0 every rank within tolerance; 1 a rank's output is off; 2 a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from rich.table import Table

from rocm_moe import backends, synthetic
from rocm_moe._console import console, progress
from rocm_moe.cli import argtypes, ranks
from rocm_moe.cli.spec import (
    LayerSpec,
    add_checkpoint_args,
    add_layer_args,
    check_memory,
    layer_spec,
)
from rocm_moe.distributed import WorkerInfo
from rocm_moe.experts.reference import dense_moe_reference
from rocm_moe.formats.block_fp8 import FP8_TOLERANCE
from rocm_moe.layer import Trace
from rocm_moe.sanity import TOLERANCE, rel_err


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="main job: Qwen3-30B-A3B MoE shape, checked, timed",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p, E=128, H=2048, I=768, K=8)
    p.add_argument("--tokens", type=argtypes.positive_int, default=256,
                   help="T, tokens in the batch")
    p.add_argument("--iters", type=argtypes.positive_int, default=5,
                   help="timed iterations (after 1 warm-up)")
    p.add_argument("--weight-mode", choices=["experts", "combine"], default="experts")
    p.add_argument("--shared-intermediate", type=argtypes.shared_intermediate, default=None,
                   action=argtypes.Given,
                   help="add dense shared experts of this intermediate size (synthetic weights)")
    p.add_argument("--json", type=argtypes.writable_file,
                   help="also write the results to this JSON file")
    add_checkpoint_args(p)
    p.add_argument("--fp8-dispatch", action="store_true",
                   help="an FP8 checkpoint: rows quantised per 1x128 on their owner and "
                   "dispatched in FP8 (torch-fp8 / symm-fp8), read by the FP8 experts as they are")
    p.set_defaults(func=command)


@dataclass(frozen=True, kw_only=True)
class RunJob:
    spec: LayerSpec
    tokens: int  # T per rank
    iters: int  # timed iterations after one warm-up


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank(info: WorkerInfo, job: RunJob) -> dict:
    spec = job.spec.on_rank(info)
    dtype = spec.torch_dtype(info.device)
    first = info.rank == 0  # rank 0 tells the steps every rank takes together
    if first:
        progress(f"rank 0: building the layer ({spec.weights_source}, {spec.backends_chosen})")
    t0 = time.perf_counter()
    layer = spec.build(info, dtype)
    x = synthetic.tokens(spec.seed, info.rank, job.tokens, spec.hidden_size).to(dtype)
    x = x.to(info.device)
    build_s = time.perf_counter() - t0
    progress(f"rank {info.rank}/{info.world_size}: weights built in {build_s:.1f} s")
    with torch.no_grad():
        t0 = time.perf_counter()
        layer(x)  # warm-up (Triton compiles its kernels here)
        _synchronize(info.device)
        if first:
            progress(f"rank 0: warm-up forward done in {time.perf_counter() - t0:.1f} s")
        traces, totals = [], []
        for i in range(job.iters):
            trace = Trace()
            start = time.perf_counter()
            layer(x, trace=trace)
            _synchronize(info.device)
            totals.append(time.perf_counter() - start)
            traces.append(trace)
            if first:
                progress(f"rank 0: iteration {i + 1}/{job.iters} ({1e3 * totals[-1]:.1f} ms)")
        if first:
            progress("rank 0: checking against the float64 oracle")
        t0 = time.perf_counter()
        checked = layer(x, return_raw=True)
        # zero-computation experts (LongCat-Flash): identity, raw output the token itself
        zero_TK = checked.topk_ids >= layer.router.routed_experts
        y_ref, raw_ref = dense_moe_reference(x, checked.topk_weights.masked_fill(zero_TK, 0.0),
                                             checked.topk_ids.masked_fill(zero_TK, -1),
                                             expert_weights=spec.expert_weights(dtype),
                                             variant=layer.expert_variant)
        x64 = x.double()
        y_ref = y_ref + x64 * (checked.topk_weights.double() * zero_TK).sum(-1, keepdim=True)
        raw_ref = torch.where(zero_TK[..., None], x64[:, None, :], raw_ref)
        if layer.shared_experts is not None:
            y_ref = y_ref + layer.shared_experts.reference(x)
    if first:
        progress(f"rank 0: checked against the float64 oracle in {time.perf_counter() - t0:.1f} s")
    params = sum(p.numel() * p.element_size()  # buffers: quantised experts (formats)
                 for p in (*layer.parameters(), *layer.buffers()))
    fp8 = getattr(layer, "fp8_dtype", None)
    return dict(rank=info.rank, build_s=build_s, dtype=str(dtype), backend=info.backend,
                comm=spec.comm_name, experts=spec.experts, backends=spec.backends_chosen,
                layer_bytes=params,
                device=str(info.device),
                stage_ms={n: 1e3 * statistics.median(t.times[n] for t in traces)
                          for n in traces[0].times},
                total_ms=1e3 * statistics.median(totals),
                rel_err={"out": rel_err(checked.out, y_ref), "raw": rel_err(checked.raw, raw_ref)},
                fp8=None if fp8 is None else str(fp8).removeprefix("torch."),
                tolerance=FP8_TOLERANCE if fp8 is not None else TOLERANCE[dtype])


def command(args: argparse.Namespace) -> int:
    W = ranks.world_size(args.world_size)
    spec = layer_spec(args, W, weight_mode=args.weight_mode,
                      shared_intermediate_size=args.shared_intermediate,
                      checkpoint=args.checkpoint, layer=args.layer,
                      max_tokens_per_rank=max(args.tokens, 16), fp8_dispatch=args.fp8_dispatch)
    check_memory(spec, W, args.device, args.tokens)
    results = ranks.on_ranks(_rank, RunJob(spec=spec, tokens=args.tokens, iters=args.iters),
                             world_size=W, device_name=args.device)
    if not results:
        return 0
    W, r0 = len(results), results[0]
    console.print(f"EPMoE {spec.shape}, {args.tokens} tokens per rank, W={W} ({r0['backend']}), "
                  f"{r0['dtype']}, {r0['device']} ({backends.device_description()}), "
                  f"{r0['backends']}, weight_mode={spec.weight_mode}, "
                  + ("invariant, " if spec.invariant else "") + f"weights: {spec.weights_source}"
                  + (f" (FP8 {r0['fp8']}, 128x128 block scales)" if r0.get("fp8") else "")
                  + "; "
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
        _write_json(args, spec, results, W * args.tokens / slowest, ok)
    return 0 if ok else 1


def _write_json(args: argparse.Namespace, spec: LayerSpec, results: list[dict],
                tokens_per_s: float, passed: bool) -> None:
    # The command line's arguments, with the shape the layer had (a checkpoint's, if any).
    config = {k: v for k, v in vars(args).items() if k not in ("func", "_given")}
    config.update(num_experts=spec.num_experts, hidden=spec.hidden_size,
                  intermediate=spec.intermediate_size, top_k=spec.top_k)
    with open(args.json, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "command": "rocm-moe " + " ".join(sys.argv[1:]), "config": config,
                   "device": backends.device_description(), "world_size": len(results),
                   "ranks": results, "tokens_per_s": tokens_per_s, "passed": passed}, f,
                  indent=2)
