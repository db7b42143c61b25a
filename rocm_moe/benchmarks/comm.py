"""Dispatch/combine benchmark of a comm backend against raw all_to_all_single of the same bytes.

DeepSeek-V3 shape by default: H=7168 bf16, E=256, K=8, uniform random routing, T tokens per
rank. For each T it times, on every rank, with a barrier and device synchronisation before each
iteration and device events around the call:

- dispatch: the whole call with ``validate=False`` (owner lookup, counts exchange, host read of
  the splits, packing, payload all-to-all); input validation reads tensors on the host and is
  meant to run once per batch upstream, not in every layer;
- combine: the whole call on the experts' output (identity experts: the received rows), with
  the float32 per-token sum;
- ceiling: ``all_to_all_single`` of a contiguous bf16 [S, H] tensor with exactly the split sizes
  of that dispatch (the bytes MORI counts), in the same run.

An iteration's time is the slowest rank's; the median over iterations is reported. Bandwidth is
MORI's counting: rows received by a rank x H x element size / time, averaged over ranks (for
combine, the same rows travelling back). Dispatch does a host read of the split sizes, so it
cannot be captured in a CUDA graph; nothing here is graph-replayed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from rocm_moe.benchmarks import NO_PLOT, pyplot
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import WorkerInfo, launch
from rocm_moe.placement import Placement
from rocm_moe.weighting import ExpertsOutput


def _timed(fn, device: torch.device, group) -> float:
    """Seconds of one call of fn on this rank, all ranks starting together."""
    dist.barrier(group=group)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _routing(T: int, E: int, K: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices  # uniform, distinct per row
    return ids.to(device), torch.rand(T, K, generator=g).to(device)


def _bench_rank(info: WorkerInfo, cfg: dict) -> list[dict]:
    dtype = getattr(torch, cfg["dtype"])
    H, E, K = cfg["hidden"], cfg["num_experts"], cfg["top_k"]
    dev = info.device
    disp = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                           dtype=dtype)
    group = disp.group
    rows = []
    for T in cfg["tokens"]:
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(info.rank)).to(dtype)
        x = x.to(dev)
        ids, w = _routing(T, E, K, cfg["seed"] * 1000 + info.rank, dev)
        res = disp.dispatch(x, w, ids)
        eo = ExpertsOutput(out=res.x.contiguous(), weights_applied=True)
        h = res.handle
        send = torch.randn(sum(h.send_counts), H, device=dev).to(dtype)
        recv = torch.empty(sum(h.recv_counts), H, device=dev, dtype=dtype)

        def raw_a2a(recv=recv, send=send, h=h):
            dist.all_to_all_single(recv, send, list(h.recv_counts), list(h.send_counts),
                                   group=group)

        # The hot path: a server validates once upstream, not in every layer's dispatch.
        fns = {"dispatch": lambda x=x, w=w, ids=ids: disp.dispatch(x, w, ids, validate=False),
               "combine": lambda eo=eo, h=h: disp.combine(eo, h),
               "all_to_all_single": raw_a2a}
        times: dict[str, list[float]] = {n: [] for n in fns}
        for it in range(cfg["warmup"] + cfg["iters"]):
            for name, fn in fns.items():  # interleaved: drift hits all three alike
                t = _timed(fn, dev, group)
                if it >= cfg["warmup"]:
                    times[name].append(t)
        rows.append(dict(tokens=T, rank=info.rank, recv_rows=res.num_received,
                         recv_bytes=res.num_received * H * x.element_size(), times=times))
    return rows


def summarise(per_rank: list[list[dict]]) -> list[dict]:
    """Slowest rank per iteration, median over iterations, MORI-counted GB/s."""
    out = []
    for i, first in enumerate(per_rank[0]):
        ranks = [rows[i] for rows in per_rank]
        mean_bytes = statistics.mean(r["recv_bytes"] for r in ranks)
        row = dict(tokens=first["tokens"], mean_recv_rows=statistics.mean(r["recv_rows"]
                                                                          for r in ranks))
        for name in first["times"]:
            slowest = [max(r["times"][name][j] for r in ranks)
                       for j in range(len(first["times"][name]))]
            t = statistics.median(slowest)
            row[f"{name}_us"] = t * 1e6
            row[f"{name}_GBps"] = mean_bytes / t / 1e9
        for name in ("dispatch", "combine"):
            row[f"{name}_vs_a2a"] = row[f"{name}_GBps"] / row["all_to_all_single_GBps"]
        out.append(row)
    return out


def _plot(rows: list[dict], path: Path, title: str) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tokens = [r["tokens"] for r in rows]
    for name, style in (("dispatch", "o-"), ("combine", "s-"), ("all_to_all_single", "k--")):
        ax.plot(tokens, [r[f"{name}_GBps"] for r in rows], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("GB/s per rank (received rows x H x bytes / time)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rocm-moe bench comm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to spawn (default: one per GPU, else 2)")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 4096, 16384])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="folder for the JSON and the PNG")
    p.add_argument("--name", default=None, help="file stem (default: comm_<device>_W<N>)")
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from rocm_moe.backends import device_description

    W = args.world_size or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    cfg = vars(args)
    per_rank = launch(W, _bench_rank, cfg, timeout_s=600)
    rows = summarise(per_rank)
    device = device_description()
    title = (f"torch comm backend, W={W}, {device}, H={args.hidden} {args.dtype}, "
             f"E={args.num_experts}, K={args.top_k}")
    table = Table(title=title)
    cols = ["tokens", "recv rows", "dispatch us", "dispatch GB/s", "combine us", "combine GB/s",
            "a2a us", "a2a GB/s", "dispatch/a2a", "combine/a2a"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["tokens"]), f"{r['mean_recv_rows']:.0f}",
                      f"{r['dispatch_us']:.1f}", f"{r['dispatch_GBps']:.1f}",
                      f"{r['combine_us']:.1f}", f"{r['combine_GBps']:.1f}",
                      f"{r['all_to_all_single_us']:.1f}", f"{r['all_to_all_single_GBps']:.1f}",
                      f"{r['dispatch_vs_a2a']:.0%}", f"{r['combine_vs_a2a']:.0%}")
    console = Console(width=160)
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"comm_{'gpu' if torch.cuda.is_available() else 'cpu'}_W{W}"
    (out / f"{stem}.json").write_text(json.dumps(dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=device,
        torch=torch.__version__, world_size=W, config=cfg, dispatch_validate=False,
        summary=rows, per_rank=per_rank),
        indent=1))
    console.print(f"json: {out / f'{stem}.json'}")
    console.print(_plot(rows, out / f"{stem}.png", title), markup=False)
    return 0
