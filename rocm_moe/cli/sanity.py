"""rocm-moe sanity: the single-token single-expert conformance suite on every rank.

Each expert alone (weight 1), weight 0.5 halves it, raw outputs unweighted, K experts sum, both
weight modes agree, the comm identity round trip, the router against an independent one of its
family (--router), and the shared experts alone (--shared-intermediate); every rank against
float64 references.

Exit codes: 0 every check passed (or was skipped, with the reason); 1 a check failed on some
rank; 2 a usage error (an unknown or unusable backend, a bad value).
"""

from __future__ import annotations

import argparse

from rich.table import Table

from rocm_moe._console import console, progress
from rocm_moe.cli import ranks
from rocm_moe.cli.spec import (
    LayerSpec,
    add_checkpoint_args,
    add_layer_args,
    add_router_args,
    check_memory,
    hf_config,
    layer_spec,
)
from rocm_moe.distributed import WorkerInfo
from rocm_moe.sanity import run_sanity


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sanity", help="single-token single-expert suite (exit 1 on failure)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p, E=16, H=256, I=128, K=4)
    add_router_args(p)
    add_checkpoint_args(p)
    p.set_defaults(func=command)


def _rank(info: WorkerInfo, spec: LayerSpec) -> list[dict]:
    spec = spec.on_rank(info)
    dtype = spec.torch_dtype(info.device)
    layer = spec.build(info, dtype)
    rows = run_sanity(layer, seed=spec.seed, expert_weights=spec.expert_weights(dtype),
                      hf_config=hf_config(spec))
    if info.rank == 0:
        progress(f"rank 0: {len(rows)} checks done")
    return [dict(vars(r), passed=r.passed, dtype=str(dtype), comm=spec.comm_name,
                 experts=spec.experts, backends=spec.backends_chosen) for r in rows]


def command(args: argparse.Namespace) -> int:
    W = ranks.world_size(args.world_size)
    spec = layer_spec(args, W, weight_mode="experts", router=args.router,
                      shared_intermediate_size=args.shared_intermediate,
                      checkpoint=args.checkpoint, layer=args.layer)
    check_memory(spec, W, args.device, 64)  # its cases hold a few dozen tokens
    results = ranks.on_ranks(_rank, spec, world_size=W, device_name=args.device)
    if not results:  # a torchrun rank other than 0
        return 0
    W, r0 = len(results), results[0][0]
    table = Table(title=f"sanity: W={W} comm={r0['comm']} experts={r0['experts']} "
                        f"dtype={r0['dtype']} {spec.shape} router={spec.router_name}"
                        + (f" shared={spec.shared_intermediate_size}"
                           if spec.shared_intermediate_size else ""))
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
    console.print(f"backends: {r0['backends']}", markup=False)
    console.print(f"{len(results[0]) - failed} passed, {failed} failed")
    return 1 if failed else 0
