"""Dispatch/combine benchmark of comm backends against raw all_to_all_single of the same bytes
and the machine's peer-to-peer copy bandwidth, in one run.

DeepSeek-V3 shape by default: H=7168 bf16, E=256, K=8, uniform random routing, T tokens per
rank. For each T it times, on every rank, after a barrier and device synchronisation, with
device events around the measured region:

- dispatch: the whole call with ``validate=False`` (input validation reads tensors on the host
  and is meant to run once per batch upstream, not in every layer);
- combine: the whole call on the experts' output (identity experts: the received rows), with
  the float32 per-token sum;
- a2a: ``all_to_all_single`` of a contiguous [S, H] tensor with exactly the split sizes of that
  dispatch (the bytes MORI counts).

The torch backend reads split sizes on the host, so it is timed call by call, eagerly. The
symm backend and the a2a are captured in a CUDA graph of ``--inner`` back-to-back calls and
replayed (how an engine runs them); one iteration is one replay divided by ``--inner``. An
iteration's time is the slowest rank's; the median over iterations is reported. The symm
dispatcher of each T is built with max_tokens_per_rank = T (``--symm-capacity`` overrides).

Bandwidth is MORI's counting: rows received by a rank x H x element size / time, averaged over
ranks (for combine, the same rows travelling back). The ceiling ``p2p`` is each rank copying
``--p2p-mb`` MB to every peer at once through symmetric memory (one copy stream per peer),
counted as bytes sent per rank / time.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from rocm_moe._console import progress
from rocm_moe.benchmarks import NO_PLOT, pyplot, write_json
from rocm_moe.cli import argtypes
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


def _graphed(fn, inner: int, device: torch.device):
    """A CUDA graph of ``inner`` back-to-back calls of fn (after one eager warm-up call);
    returns its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return g.replay


def _p2p_ceiling(info: WorkerInfo, group, mb: int, iters: int) -> float:
    """GB/s per rank: this rank copying ``mb`` MB to every peer at once (one stream each)
    through symmetric memory, all ranks together."""
    import torch.distributed._symmetric_memory as symm_mem

    W, dev = info.world_size, info.device
    n = mb * 2**20 // 2
    buf = symm_mem.empty(W * n, dtype=torch.bfloat16, device=dev)
    hdl = symm_mem.rendezvous(buf, group.group_name)
    src = torch.randn(n, device=dev).bfloat16()
    dsts = [hdl.get_buffer(d, (n,), torch.bfloat16, info.rank * n)
            for d in range(W) if d != info.rank]
    streams = [torch.cuda.Stream(dev) for _ in dsts]

    def copy_all():
        cur = torch.cuda.current_stream(dev)
        for st, dst in zip(streams, dsts, strict=True):
            st.wait_stream(cur)
            with torch.cuda.stream(st):
                dst.copy_(src)
        for st in streams:
            cur.wait_stream(st)

    copy_all()
    times = [_timed(copy_all, dev, group) for _ in range(iters)]
    dist.barrier(group=group)
    return len(dsts) * n * 2 / statistics.median(times) / 1e9


def _bench_rank(info: WorkerInfo, cfg: dict) -> dict:
    if not cfg["comm"]:  # not given: torch, and symm where this rank's device gets it by default
        from rocm_moe.backends import default_comm

        symm = default_comm(max(2, info.world_size), info.device, False)[0] == "symm"
        cfg = dict(cfg, comm=["torch"] + (["symm"] if symm else []))
    dtype = getattr(torch, cfg["dtype"])
    H, E, K, W = cfg["hidden"], cfg["num_experts"], cfg["top_k"], info.world_size
    dev = info.device
    placement = Placement.contiguous(E, W)
    torch_disp = TorchDispatcher(placement, hidden_size=H, top_k=K, dtype=dtype)
    group = torch_disp.group
    fp8_disp = None
    if "torch-fp8" in cfg["comm"]:  # rows in FP8 on the wire (issue 18); built on every rank
        fp8_disp = TorchDispatcher(placement, hidden_size=H, top_k=K, dtype=dtype,
                                   fp8_dtype="e4m3fn")
    graphs = dev.type == "cuda"
    rows = []
    for T in cfg["tokens"]:
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(info.rank)).to(dtype)
        x = x.to(dev)
        ids, w = _routing(T, E, K, cfg["seed"] * 1000 + info.rank, dev)
        res = torch_disp.dispatch(x, w, ids)
        h = res.handle
        send = torch.randn(sum(h.send_counts), H, device=dev).to(dtype)
        recv = torch.empty(sum(h.recv_counts), H, device=dev, dtype=dtype)

        def raw_a2a(recv=recv, send=send, h=h):
            dist.all_to_all_single(recv, send, list(h.recv_counts), list(h.send_counts),
                                   group=group)

        fns, inner = {}, {}
        if "torch" in cfg["comm"]:
            eo = ExpertsOutput(out=res.x.contiguous(), weights_applied=True)
            fns["torch dispatch"] = lambda x=x, w=w, ids=ids: torch_disp.dispatch(
                x, w, ids, validate=False)
            fns["torch combine"] = lambda eo=eo, h=h: torch_disp.combine(eo, h)
        if fp8_disp is not None:
            fns["torch-fp8 dispatch"] = lambda x=x, w=w, ids=ids: fp8_disp.dispatch(
                x, w, ids, validate=False)
        if "symm" in cfg["comm"]:
            from rocm_moe.comm.symm import SymmDispatcher

            symm = SymmDispatcher(placement, hidden_size=H, top_k=K, dtype=dtype,
                                  max_tokens_per_rank=cfg["symm_capacity"] or T)
            fns["symm dispatch"] = _graphed(
                lambda x=x, w=w, ids=ids, d=symm: _dispatch_only(d, x, w, ids), cfg["inner"],
                dev)
            r = symm.dispatch(x, w, ids)  # the batch the combine graph returns
            eo_s = ExpertsOutput(out=r.x.contiguous(), weights_applied=True)
            fns["symm combine"] = _graphed(lambda eo=eo_s, r=r, d=symm: d.combine(eo, r.handle),
                                           cfg["inner"], dev)
            inner["symm dispatch"] = inner["symm combine"] = cfg["inner"]
            assert int(r.num_valid) == res.num_received, "symm and torch received rows differ"
        if "symm-fp8" in cfg["comm"]:  # FP8 rows on the symm transport (issue 18)
            from rocm_moe.comm.symm import SymmDispatcher

            symm8 = SymmDispatcher(placement, hidden_size=H, top_k=K, dtype=dtype,
                                   max_tokens_per_rank=cfg["symm_capacity"] or T,
                                   fp8_dtype="e4m3fn")
            fns["symm-fp8 dispatch"] = _graphed(
                lambda x=x, w=w, ids=ids, d=symm8: _dispatch_only(d, x, w, ids), cfg["inner"],
                dev)
            inner["symm-fp8 dispatch"] = cfg["inner"]
            r8 = symm8.dispatch(x, w, ids)
            assert int(r8.num_valid) == res.num_received, "symm-fp8 and torch rows differ"
        if graphs:
            fns["a2a"] = _graphed(raw_a2a, cfg["inner"], dev)
            inner["a2a"] = cfg["inner"]
        else:
            fns["a2a"] = raw_a2a
        times: dict[str, list[float]] = {n: [] for n in fns}
        for it in range(cfg["warmup"] + cfg["iters"]):
            for name, fn in fns.items():  # interleaved: drift hits all alike
                t = _timed(fn, dev, group) / inner.get(name, 1)
                if it >= cfg["warmup"]:
                    times[name].append(t)
        rows.append(dict(tokens=T, rank=info.rank, recv_rows=res.num_received,
                         recv_bytes=res.num_received * H * x.element_size(), times=times,
                         wire_row_bytes=_wire_row_bytes(H, dtype, K, cfg["comm"])))
        if info.rank == 0:
            progress(f"rank 0: {T} tokens per rank done")
    p2p = _p2p_ceiling(info, group, cfg["p2p_mb"], cfg["iters"]) if graphs else None
    return dict(rows=rows, p2p_GBps=p2p, comm=cfg["comm"])


def _dispatch_only(disp, x, w, ids) -> None:
    """One timed dispatch of a buffer-holding backend whose batch the timing loop never
    combines: its buffers are released at once (a second dispatch is refused while a batch is
    held; the repeated identical batches write the same counts and rows, so the overlap of one
    dispatch's writes with the last one's reads changes no value)."""
    res = disp.dispatch(x, w, ids, validate=False)
    disp.abandon(res.handle, "bench comm (dispatch timed alone)", RuntimeError("not combined"))


def _wire_row_bytes(H: int, dtype: torch.dtype, K: int, comm=()) -> dict:
    """Bytes of one dispatch row on the wire: torch's packed row, and each other backend's
    that runs (symm: the payload padded to 16 bytes, then its ids, weights and token index,
    8 K + 4 bytes, to sections of their own)."""
    from rocm_moe.comm.rows import row_words
    from rocm_moe.comm.wire import fp8_row_bytes

    def symm(P: int, wire_dtype: torch.dtype) -> int:
        from rocm_moe.comm.symm import buffer_layout

        return 4 * buffer_layout(1, 1, H, K, dtype, payload=(P, wire_dtype)).row_words + \
            8 * K + 4

    out = {"torch": 4 * row_words(H, dtype, K)}
    if "symm" in comm or "symm-fp8" in comm:
        out["symm"] = symm(H, dtype)
    if "torch-fp8" in comm:
        out["torch-fp8"] = 4 * row_words(fp8_row_bytes(H), torch.uint8, K)
    if "symm-fp8" in comm:
        out["symm-fp8"] = symm(fp8_row_bytes(H), torch.uint8)
    return out


def summarise(per_rank: list[list[dict]]) -> list[dict]:
    """Slowest rank per iteration, median over iterations, MORI-counted GB/s, and each
    dispatch / combine against the a2a of the same bytes (a2a time / its time)."""
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
            row[f"{name} us"] = t * 1e6
            row[f"{name} GB/s"] = mean_bytes / t / 1e9
        for name in first["times"]:
            if name != "a2a":
                row[f"{name} / a2a"] = row["a2a us"] / row[f"{name} us"]
        out.append(row)
    return out


def fp8_line(base: str, wire: dict, rows: list[dict]) -> str:
    """One line: an FP8 backend's row bytes and dispatch time against its bf16 sibling's."""
    fp8 = f"{base}-fp8"
    line = (f"dispatch row on the wire: {base} {wire[base]} B, {fp8} {wire[fp8]} B "
            f"({wire[base] / wire[fp8]:.2f}x fewer)")
    times = [f"{r['tokens']}: {r[f'{base} dispatch us'] / r[f'{fp8} dispatch us']:.2f}x"
             for r in rows if f"{base} dispatch us" in r and f"{fp8} dispatch us" in r]
    if times:
        line += f"; dispatch time {base} / {fp8} per tokens/rank: {', '.join(times)}"
    return line


def _plot(rows: list[dict], path: Path, title: str) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tokens = [r["tokens"] for r in rows]
    names = [k[:-len(" GB/s")] for k in rows[0] if k.endswith(" GB/s")]
    for name in names:
        style = "k--" if name == "a2a" else ("o-" if "dispatch" in name else "s-")
        ax.plot(tokens, [r[f"{name} GB/s"] for r in rows], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("GB/s per rank (received rows x H x bytes / time)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench comm``, which ``bench/comm.py`` runs)."""
    p.add_argument("--world-size", type=argtypes.positive_int, default=None,
                   help="ranks to spawn (default: one per GPU, else 2)")
    p.add_argument("--comm", nargs="+", default=None,
                   choices=["torch", "torch-fp8", "symm", "symm-fp8"],
                   help="backends to time (default: torch, and symm on ranks on GPUs)")
    p.add_argument("--tokens", type=argtypes.positive_int, nargs="+",
                   default=[128, 512, 4096, 16384])
    p.add_argument("--hidden", type=argtypes.positive_int, default=7168)
    p.add_argument("--num-experts", type=argtypes.positive_int, default=256)
    p.add_argument("--top-k", type=argtypes.positive_int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=argtypes.nonnegative_int, default=5)
    p.add_argument("--iters", type=argtypes.positive_int, default=30)
    p.add_argument("--inner", type=argtypes.positive_int, default=10, help="calls per graph replay")
    p.add_argument("--symm-capacity", type=argtypes.positive_int, default=None,
                   action=argtypes.Given,
                   help="symm max_tokens_per_rank for every T (default: T itself)")
    p.add_argument("--p2p-mb", type=argtypes.positive_int, default=64,
                   help="MB per peer of the p2p ceiling")
    p.add_argument("--seed", type=argtypes.seed_int, default=0)
    p.add_argument("--out", type=argtypes.output_dir, default="bench/results",
                   help="folder for the JSON and the PNG")
    p.add_argument("--name", type=argtypes.file_stem, default=None,
                   help="file stem (default: comm_<device>_W<N>)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run it with parsed ``args``; ``parser`` reports a machine that cannot run it."""
    from rich.console import Console
    from rich.table import Table

    from rocm_moe.backends import device_description
    from rocm_moe.comm.symm import SymmDispatcher

    # --comm not given: each rank picks torch, and symm on GPUs (never on CPU ranks of a GPU host)
    if args.top_k > args.num_experts:
        parser.error(f"--top-k {args.top_k}: must be <= --num-experts {args.num_experts} (each "
                     "token picks K distinct experts)")
    if "--symm-capacity" in argtypes.given(args) and args.comm and \
            not {"symm", "symm-fp8"} & set(args.comm):
        parser.error(f"--symm-capacity sizes the symm backend's buffers, and --comm "
                     f"{' '.join(args.comm)} has none (it would be ignored): add symm or drop it")
    for name in {"symm", "symm-fp8"} & set(args.comm or []):
        if (reason := SymmDispatcher.availability()) is not None:
            parser.error(f"--comm {name} cannot run here: {reason}")
    W = args.world_size or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    cfg = vars(args)
    progress(f"starting {W} ranks: {len(args.tokens)} sizes x {args.warmup} + {args.iters} "
             "iterations")
    results = launch(W, _bench_rank, cfg, timeout_s=600)
    cfg["comm"] = args.comm = results[0]["comm"]  # as the ranks ran
    rows = summarise([r["rows"] for r in results])
    p2p = [r["p2p_GBps"] for r in results]
    device = device_description()
    title = (f"comm backends {'+'.join(args.comm)}, W={W}, {device}, H={args.hidden} "
             f"{args.dtype}, E={args.num_experts}, K={args.top_k}")
    table = Table(title=title)
    names = [k[:-len(" us")] for k in rows[0] if k.endswith(" us")]
    for c in ["tokens", "recv rows"] + [f"{n} us (GB/s)" for n in names] + \
            [f"{n} / a2a" for n in names if n != "a2a"]:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["tokens"]), f"{r['mean_recv_rows']:.0f}",
                      *[f"{r[n + ' us']:.1f} ({r[n + ' GB/s']:.0f})" for n in names],
                      *[f"{r[n + ' / a2a']:.0%}" for n in names if n != "a2a"])
    console = Console(width=200)
    console.print(table)
    wire = results[0]["rows"][0]["wire_row_bytes"] if results[0]["rows"] else {}
    for base in ("torch", "symm"):
        if f"{base}-fp8" in wire:
            console.print(fp8_line(base, wire, rows))
    if p2p[0] is not None:
        console.print(f"p2p copy ceiling (each rank to all peers at once, {args.p2p_mb} MB "
                      f"each): min {min(p2p):.0f} GB/s, per rank {[round(v) for v in p2p]}")
    stem = args.name or f"comm_{'gpu' if torch.cuda.is_available() else 'cpu'}_W{W}"
    path = write_json(args.out, stem, device=device, world_size=W, config=cfg,
                      dispatch_validate=False, p2p_GBps=p2p, summary=rows,
                      per_rank=[r["rows"] for r in results])
    console.print(f"json: {path}")
    console.print(_plot(rows, path.with_suffix(".png"), title), markup=False)
    return 0
