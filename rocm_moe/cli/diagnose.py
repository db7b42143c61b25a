"""rocm-moe diagnose: run the pipeline once on every rank with every stage recorded, judge each
stage (route, dispatch, experts, weighting, combine) against a reference computed from its own
inputs, and at the first wrong stage name the known bug class whose prediction matches.

Exit codes: 0 every stage is clean on every rank; 1 a stage diverges (the first one is printed,
with the bug class and its fix when one matches); 2 a usage error (an unknown or unusable backend,
a bad value).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from rocm_moe import faults, synthetic
from rocm_moe._console import console, progress
from rocm_moe.cli import argtypes, ranks
from rocm_moe.cli.spec import (
    LayerSpec,
    add_checkpoint_args,
    add_layer_args,
    add_router_args,
    check_memory,
    check_writable,
    hf_config,
    layer_spec,
)
from rocm_moe.distributed import WorkerInfo
from rocm_moe.faults import FAULTS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="find the first wrong stage and name the bug class "
                       "(exit 0 clean, 1 diverges, 2 usage error)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p, E=16, H=64, I=32, K=4)
    add_router_args(p)
    add_checkpoint_args(p)
    p.add_argument("--batch", type=argtypes.positive_int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=argtypes.positive_int, default=9, help="tokens per sequence")
    p.add_argument("--weight-mode", choices=["experts", "combine"], default="experts")
    p.add_argument("--inject", choices=sorted(FAULTS), default=None,
                   help="plant a known bug to see its diagnosis")
    p.add_argument("--json", action="store_true", help="print the per-rank reports as JSON")
    p.add_argument("--dump", default=None,
                   help="write the stage tensors to DUMP.rank<r>.safetensors")
    p.set_defaults(func=command)


@dataclass(frozen=True, kw_only=True)
class DiagnoseJob:
    spec: LayerSpec
    batch: int  # B sequences per rank
    seq: int  # S tokens per sequence
    inject: str | None  # a planted bug (rocm_moe.faults), None for none
    dump: str | None  # file stem for the stage tensors


def _rank(info: WorkerInfo, job: DiagnoseJob) -> dict:
    from rocm_moe.diagnose import diagnose

    spec = job.spec.on_rank(info)
    dtype = spec.torch_dtype(info.device)
    layer = spec.build(info, dtype)
    faults.plant(layer, job.inject)  # (from outside: the layer carries no fault code)
    x = synthetic.tokens(spec.seed, info.rank, job.batch * job.seq, spec.hidden_size)
    x = x.reshape(job.batch, job.seq, spec.hidden_size).to(dtype).to(info.device)
    report = diagnose(layer, x, expert_weights=spec.expert_weights(dtype), dump=job.dump,
                      hf_config=hf_config(spec))
    if info.rank == 0:
        progress("rank 0: stages judged")
    return dict(report.to_dict(), comm=spec.comm_name, experts=spec.experts,
                backends=spec.backends_chosen)


def command(args: argparse.Namespace) -> int:
    if args.dump:  # files DUMP.rank<r>.safetensors, checked before the run
        check_writable("--dump", f"{args.dump}.rank0.safetensors")
    W = ranks.world_size(args.world_size)
    spec = layer_spec(args, W, weight_mode=args.weight_mode,
                      max_tokens_per_rank=max(args.batch * args.seq, 16), router=args.router,
                      shared_intermediate_size=args.shared_intermediate,
                      checkpoint=args.checkpoint, layer=args.layer)
    check_memory(spec, W, args.device, args.batch * args.seq)
    job = DiagnoseJob(spec=spec, batch=args.batch, seq=args.seq, inject=args.inject,
                      dump=args.dump)
    results = ranks.on_ranks(_rank, job, world_size=W, device_name=args.device)
    if not results:
        return 0
    if args.json:
        print(json.dumps(results, indent=1))
        return 0 if all(r["first_bad"] is None for r in results) else 1
    _print_stages(spec, job, results)
    return _print_verdict(results)


def _print_stages(spec: LayerSpec, job: DiagnoseJob, results: list[dict]) -> None:
    r0 = results[0]
    console.print(f"diagnose: W={len(results)} comm={r0['comm']} "
                  f"experts={r0['experts']} weight_mode={spec.weight_mode} "
                  f"router={spec.router_name} "
                  f"dtype={results[0]['dtype']} E={spec.num_experts} K={spec.top_k} "
                  f"tokens/rank={job.batch}x{job.seq}" +
                  (f" injected={job.inject}" if job.inject else ""))
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
    console.print(f"backends: {r0['backends']}", markup=False)
    for stage in results[0]["stages"]:
        if stage["note"]:
            console.print(f"{stage['stage']}: {stage['note']}", markup=False)
    by_part: dict[str, list[str]] = {}
    for s in results[0]["stages"]:
        for part in filter(None, s["shares"].split("; ")):
            by_part.setdefault(part, []).append(s["stage"])
    if by_part:
        console.print("what the references still share with the checked path:")
        for part, stages in by_part.items():
            console.print(f"  {', '.join(stages)}: {part}", markup=False)


def _print_verdict(results: list[dict]) -> int:
    """Print the first wrong stage and its bug class; the exit code (0 clean, 1 not)."""
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
        # The signature is text, not markup: "[id0, 0, id1, 0, ...]" must print as it is.
        console.print(f"bug: [bold]{escape(d['bug'])}[/bold]: {escape(d['signature'])} "
                      f"(prediction matches to {d['match_rel_err']:.1e})", markup=True)
        console.print(f"fix: {d['fix']}", markup=False)
    else:
        console.print("no known bug class matches this stage's output; dump the stage tensors "
                      "with --dump and compare them offline")
    return 1
