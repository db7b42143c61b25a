"""A model's worth of MoE layers: N layers (``--layers``, default 8) with a residual between
them, every one borrowing one dispatcher (``rocm_moe.comm.pool``), against one layer alone.

Per tokens-per-rank T, on every rank: the N-layer stack (``rocm_moe.model.MoEStack``) and one of
its layers alone, each captured in its own CUDA graph (``GraphedEPMoE``, bucket T) and replayed
(on GPUs; eager on CPUs); the slowest rank's time per replay, the median over ``--iters``.
Reported: the stack's time, its time per layer, one layer's time, and their ratio (per layer /
alone: 1.00 means N layers cost N single layers; below 1 means the graph hides launch gaps);
whether the replay equals the eager stack bit for bit; the comm memory: one dispatcher for
the whole stack (``comm.pool.comm_bytes`` and the device memory its construction took, which
does not grow with N).

Shapes (``--model``): Qwen3-30B-A3B (E=128, H=2048, I=768, K=8) and DeepSeek-V3 (E=256,
H=7168, I=2048, K=8; routed experts only), bf16, seeded synthetic weights; ``--num-experts``
etc. override (small shapes for CPUs).
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import torch.distributed as dist

from rocm_moe import Placement
from rocm_moe import synthetic as syn
from rocm_moe._console import progress
from rocm_moe.benchmarks import print_rows, write_json
from rocm_moe.benchmarks.comm import _timed
from rocm_moe.benchmarks.layer import _router, add_run_arguments, add_shape_arguments, shape
from rocm_moe.cli import argtypes
from rocm_moe.distributed import WorkerInfo, launch


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def _bench_rank(info: WorkerInfo, cfg: dict) -> dict:
    from rocm_moe import backends
    from rocm_moe.comm import pool
    from rocm_moe.graphs import GraphedEPMoE
    from rocm_moe.model import MoEStack

    s = shape(cfg)
    dtype = getattr(torch, cfg["dtype"])
    group = dist.group.WORLD
    cap = cfg["max_tokens_per_rank"] or max(cfg["tokens"])
    pool.clear()
    before = _free_bytes(info.device)
    disp = pool.shared_dispatcher(cfg["comm"], Placement.contiguous(s["num_experts"],
                                                                     info.world_size),
                                  hidden_size=s["hidden"], top_k=s["top_k"], dtype=dtype,
                                  max_tokens_per_rank=cap, group=None if cfg["comm"] == "local"
                                  else group, rank=info.rank)
    after = _free_bytes(info.device)
    stack = MoEStack.build(cfg["layers"], hidden_size=s["hidden"],
                           intermediate_size=s["intermediate"], router=_router(s),
                           dispatcher=disp, experts=backends.make_experts(cfg["experts"]),
                           dtype=dtype, device=info.device, seed=cfg["seed"], validate=False)
    graphs = info.device.type == "cuda"
    rows = []
    for T in cfg["tokens"]:
        x = syn.tokens(cfg["seed"], info.rank, T, s["hidden"]).to(dtype).to(info.device)
        runs = {"stack": stack, "one": stack.layers[0]}
        if graphs:
            runs = {k: GraphedEPMoE(m, buckets=(T,)) for k, m in runs.items()}
            equal = torch.equal(runs["stack"](x).clone(), stack(x))
        else:
            equal = None
        fns = {k: functools.partial(m, x) for k, m in runs.items()}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for it in range(cfg["warmup"] + cfg["iters"]):
            for k, fn in fns.items():
                t = _timed(fn, info.device, group)
                if it >= cfg["warmup"]:
                    times[k].append(t)
        rows.append(dict(tokens=T, times=times, equal=equal))
        if info.rank == 0:
            progress(f"T={T} done")
    return dict(rows=rows, pooled=len(pool.shared_dispatchers()),
                comm_bytes=pool.comm_bytes(cfg["comm"], info.world_size, cap, s["hidden"],
                                           s["top_k"], dtype, s["num_experts"]),
                comm_measured=None if before is None else before - after,
                graphs=graphs)


def summarise(per_rank: list[dict], cfg: dict) -> list[dict]:
    """Slowest rank per iteration, median over iterations, in microseconds."""
    out, N = [], cfg["layers"]
    for i, row in enumerate(per_rank[0]["rows"]):
        def med(k, i=i):
            its = zip(*(r["rows"][i]["times"][k] for r in per_rank), strict=True)
            return statistics.median(max(t) for t in its) * 1e6
        stack_us, one_us = med("stack"), med("one")
        out.append({"T/rank": row["tokens"], f"stack of {N} us": stack_us,
                    "per layer us": stack_us / N, "one layer us": one_us,
                    "per layer / one": stack_us / N / one_us,
                    "replay == eager": None if row["equal"] is None
                    else all(r["rows"][i]["equal"] for r in per_rank)})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench model``)."""
    p.add_argument("--world-size", type=argtypes.positive_int, default=1,
                   help="ranks to spawn (one per GPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where the ranks run (auto: one GPU per rank where there are GPUs)")
    p.add_argument("--layers", type=argtypes.positive_int, default=8,
                   help="N, MoE layers in the stack")
    add_shape_arguments(p)
    p.add_argument("--tokens", type=argtypes.positive_int, nargs="+", default=[1, 8, 128],
                   help="tokens per rank")
    p.add_argument("--max-tokens-per-rank", type=argtypes.positive_int, default=None,
                   help="the shared dispatcher's capacity (default: the largest --tokens)")
    p.add_argument("--comm", default=None, choices=["local", "torch", "symm", "mori"],
                   help="comm backend (default: symm on GPUs, local (W=1) or torch on CPUs)")
    p.add_argument("--experts", default=None,
                   help="experts backend (default: triton on GPUs, reference on CPUs)")
    add_run_arguments(p)
    p.add_argument("--out", type=argtypes.output_dir, default="bench/results",
                   help="folder for the JSON")
    p.add_argument("--name", type=argtypes.file_stem, default=None,
                   help="file stem (default: model_<model>_W<N>)")


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from rocm_moe.backends import BACKENDS

    # numbers and paths: checked by their argparse types (rocm_moe.cli.argtypes)
    if args.comm == "local" and args.world_size != 1:
        parser.error("--comm local runs one rank: pass --world-size 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    if gpu and args.world_size > torch.cuda.device_count():
        parser.error(f"--world-size {args.world_size}: {torch.cuda.device_count()} GPU(s) here "
                     "(--device cpu runs CPU ranks)")
    if args.comm is None:
        symm_ok = gpu and BACKENDS["comm:symm"].availability() is None
        args.comm = "symm" if symm_ok else ("local" if args.world_size == 1 else "torch")
    if args.experts is None:
        from rocm_moe.backends import default_experts

        args.experts = default_experts(torch.device("cuda" if gpu else "cpu"),
                                       dtype=getattr(torch, args.dtype))[0]
    cap = args.max_tokens_per_rank
    if cap is not None and max(args.tokens) > cap:
        parser.error(f"--tokens {max(args.tokens)} > --max-tokens-per-rank {cap}: a captured "
                     "batch must fit the dispatcher")
    for kind, name in (("comm", args.comm), ("experts", args.experts)):
        key = f"{kind}:{name}"
        if key not in BACKENDS:
            parser.error(f"--{kind} {name}: unknown")
        if (reason := BACKENDS[key].availability()) is not None:
            parser.error(f"--{kind} {name} cannot run here: {reason}")
    s = shape(vars(args))  # the router and the placement each rank builds, refused here
    try:
        _router(s)
        Placement.contiguous(s["num_experts"], args.world_size)
    except (ValueError, TypeError) as exc:  # (they were refused by every rank, after spawning)
        parser.error(str(exc))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.console import Console

    from rocm_moe.backends import device_description

    _check(args, parser)
    cfg = vars(args)
    W = args.world_size
    progress(f"starting {W} rank(s)")
    results = launch(W, _bench_rank, cfg, timeout_s=900,
                     backend="nccl" if args.device == "cuda" else "gloo")
    rows = summarise(results, cfg)
    s, r0 = shape(cfg), results[0]
    device = device_description()
    mode = "CUDA-graph replay" if r0["graphs"] else "eager (no GPU)"
    title = (f"{cfg['layers']} MoE layers on one {cfg['comm']} dispatcher vs one layer, "
             f"{cfg['model']} E={s['num_experts']} H={s['hidden']} I={s['intermediate']} "
             f"K={s['top_k']} {cfg['dtype']}, experts={cfg['experts']}, W={W}, {mode}, "
             f"slowest rank, median of {cfg['iters']}, {device}")
    console = Console(width=220)
    print_rows(console, rows, title=title, small_digits=3)
    measured = r0["comm_measured"]
    console.print(f"comm memory: {r0['pooled']} dispatcher(s) for {cfg['layers']} layers; "
                  f"{r0['comm_bytes'] / 2**20:.1f} MiB by its layout"
                  + ("" if measured is None else
                     f", {measured / 2**20:.1f} MiB of device memory taken by its construction"))
    stem = cfg["name"] or f"model_{cfg['model']}_W{W}"
    path = write_json(cfg["out"], stem, device=device, world_size=W, shape=s, config=cfg,
                      summary=rows, pooled=r0["pooled"], comm_bytes=r0["comm_bytes"],
                      comm_measured=measured)
    console.print(f"json: {path}")
    return 0
