"""Whole-layer benchmark: an EPMoE forward (route, dispatch, experts, combine) per rank.

Qwen3-30B-A3B MoE shape by default (E=128, H=2048, I=768, K=8, bf16, seeded synthetic weights,
tokens from rocm_moe.synthetic). For each tokens-per-rank T and weight mode it builds the layer
on the symm comm backend (max_tokens_per_rank = T) with the given experts backend, captures the
forward in a CUDA graph (``GraphedEPMoE`` with the single bucket T) and times its replays;
``--baseline torch`` also times the same layer on the torch backend, eagerly (it cannot be
captured), in the same run. Each iteration: a barrier, device synchronisation, device events
around one call; the slowest rank's time; the median over iterations. The replayed output is
checked bit-identical to the eager forward, and the eager forward against the float64 oracle
(rank 0's tokens, T <= 512; relative error reported).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

from rocm_moe import EPMoE, Placement, RouterConfig
from rocm_moe import synthetic as syn
from rocm_moe._console import progress
from rocm_moe.benchmarks.comm import _timed
from rocm_moe.distributed import WorkerInfo, launch


def _layer(cfg: dict, comm: str, mode: str, T: int, info: WorkerInfo) -> EPMoE:
    from rocm_moe import backends

    E, H, I, K = cfg["num_experts"], cfg["hidden"], cfg["intermediate"], cfg["top_k"]
    placement = Placement.contiguous(E, info.world_size)
    disp = backends.make_dispatcher(comm, placement, info.rank, hidden_size=H, top_k=K,
                                    dtype=torch.bfloat16, max_tokens_per_rank=T)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=disp, experts=backends.make_experts(cfg["experts"]),
                  weight_mode=mode, dtype=torch.bfloat16, device=info.device, validate=False)
    layer.reset_parameters(seed=cfg["seed"])
    return layer


def _oracle_error(layer: EPMoE, x: torch.Tensor, cfg: dict) -> float:
    from rocm_moe.experts.reference import dense_moe_reference
    from rocm_moe.sanity import rel_err

    H, I = cfg["hidden"], cfg["intermediate"]
    res = layer(x, return_raw=True)
    y_ref, _ = dense_moe_reference(
        x.double(), res.topk_weights, res.topk_ids,
        expert_weights=lambda g: syn.expert_weights(cfg["seed"], g, H, I))
    return rel_err(layer(x), y_ref)


def _bench_rank(info: WorkerInfo, cfg: dict) -> list[dict]:
    from rocm_moe.graphs import GraphedEPMoE

    group = None
    out = []
    for T in cfg["tokens"]:
        x = syn.tokens(cfg["seed"], info.rank, T, cfg["hidden"]).bfloat16().to(info.device)
        for mode in cfg["weight_modes"]:
            row = dict(tokens=T, mode=mode, rank=info.rank)
            layer = _layer(cfg, "symm", mode, T, info)
            group = layer.dispatcher.group
            eager = layer(x)
            graphed = GraphedEPMoE(layer, buckets=(T,))
            row["graph_equals_eager"] = bool(torch.equal(graphed(x), eager))
            if T <= 512:
                row["rel_err"] = _oracle_error(layer, x, cfg)
            layer.dispatcher.check_peers()  # a barrier that timed out makes the numbers void
            fns = {"symm graph": lambda g=graphed, x=x: g(x)}
            if cfg["baseline"]:
                base = _layer(cfg, cfg["baseline"], mode, T, info)
                fns[f"{cfg['baseline']} eager"] = lambda b=base, x=x: b(x)
            times = {n: [] for n in fns}
            for it in range(cfg["warmup"] + cfg["iters"]):
                for name, fn in fns.items():
                    t = _timed(fn, info.device, group)
                    if it >= cfg["warmup"]:
                        times[name].append(t)
            row["times"] = times
            layer.dispatcher.check_peers()
            out.append(row)
            if info.rank == 0:
                progress(f"rank 0: {T} tokens per rank, weight_mode={mode} done")
            del graphed, layer
            torch.cuda.empty_cache()
    return out


def summarise(per_rank: list[list[dict]]) -> list[dict]:
    rows = []
    for i, first in enumerate(per_rank[0]):
        ranks = [r[i] for r in per_rank]
        row = dict(tokens=first["tokens"], mode=first["mode"],
                   graph_equals_eager=all(r["graph_equals_eager"] for r in ranks))
        if "rel_err" in first:
            row["rel_err"] = max(r["rel_err"] for r in ranks)
        for name in first["times"]:
            slowest = [max(r["times"][name][j] for r in ranks)
                       for j in range(len(first["times"][name]))]
            row[f"{name} us"] = statistics.median(slowest) * 1e6
        rows.append(row)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench layer``)."""
    p.add_argument("--world-size", type=int, default=None, help="default: one rank per GPU")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096])
    p.add_argument("--weight-modes", nargs="+", default=["experts", "combine"],
                   choices=["experts", "combine"])
    p.add_argument("--experts", default="triton", help="experts backend (default triton)")
    p.add_argument("--baseline", default="torch", help="comm backend timed eagerly beside "
                   "(default torch; '' for none)")
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="file stem (default: layer_W<N>)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run it with parsed ``args``; ``parser`` reports a machine that cannot run it."""
    from rich.console import Console
    from rich.table import Table

    from rocm_moe.backends import device_description
    from rocm_moe.comm.symm import SymmDispatcher

    if (reason := SymmDispatcher.availability()) is not None:
        parser.error(f"the layer benchmark runs the symm backend, which cannot run here: {reason}")
    W = args.world_size or torch.cuda.device_count()
    cfg = vars(args)
    progress(f"starting {W} ranks (nccl)")
    rows = summarise(launch(W, _bench_rank, cfg, backend="nccl", timeout_s=900))
    device = device_description()
    title = (f"EPMoE forward, symm + {args.experts} graph-replayed vs {args.baseline or '-'} "
             f"eager, W={W}, {device}, E={args.num_experts} H={args.hidden} "
             f"I={args.intermediate} K={args.top_k} bf16")
    table = Table(title=title)
    names = [k[:-3] for k in rows[0] if k.endswith(" us")]
    for c in ["tokens/rank", "weight mode", *[f"{n} us" for n in names], "graph == eager",
              "rel err"]:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["tokens"]), r["mode"], *[f"{r[n + ' us']:.1f}" for n in names],
                      str(r["graph_equals_eager"]),
                      f"{r['rel_err']:.1e}" if "rel_err" in r else "-")
    console = Console(width=200)
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"layer_W{W}"
    (out / f"{stem}.json").write_text(json.dumps(dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=device,
        torch=torch.__version__, world_size=W, config=cfg, summary=rows), indent=1))
    console.print(f"json: {out / f'{stem}.json'}")
    return 0
