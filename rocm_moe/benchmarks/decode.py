"""Decode at W = 1: the whole layer, its experts alone and its router alone, each replayed from a
CUDA graph, in one run (issue 33), and the layer's cost against the capacity its comm buffers
were sized for.

One rank on one GPU (W = 1; ``--comm local``, or ``--comm symm`` on a one-rank group, the
engines' capturable backend), the Triton experts, model shapes from ``--model`` (Qwen3-30B-A3B;
DeepSeek-V3, whose 256 experts fit one GPU in bf16), seeded synthetic weights and tokens. For
every capacity (``--max-tokens-per-rank``, several values: one layer and dispatcher each) and
tokens T (``--tokens``):
- layer: the layer's forward (route, dispatch, experts, combine, shared experts);
- router: ``layer.route_tokens`` (gate GEMM + router; ``--fused-router`` picks the one-launch
  Triton router, the default, or the torch path);
- experts: ``layer.experts`` on the routed tokens (what a one-rank dispatch hands them);
- floor: the weight bytes of the distinct experts the batch touches (plus the shared expert's
  for the layer's floor) / the device's copy rate measured in the same run (a device-to-device
  copy of 1 GiB, bytes read + written / time: ``benchmarks.experts.copy_rate``).
Each graph holds ``--inner`` back-to-back calls; a replay is timed with CUDA events; the
median over ``--iters`` replays (after ``--warmup``), in us per call. ``--batches N``: the
calls cycle through N seeded token batches, each its own routing, so that consecutive calls
read other experts' weights (from HBM: one Qwen3 token's 8 experts are 75 MB in bf16 and 38 MB
in FP8, against an H100's 50 MB of L2, which one batch replayed keeps partly warm); the floor
is then the mean over the batches. Columns ``layer /
experts`` and ``experts / floor`` are the issue's ratios; ``cap / first`` is the layer's time
over the same T at the first capacity of the run; ``kernels``: the GPU kernels one eager layer
forward launches (torch.profiler; copies and memsets not counted; ``--kernel-table`` prints
each with its device time). ``--experts-path`` (several
values: a row set each, one layer each) picks the Triton experts' path: "auto" (by batch size),
"small" (``experts/triton_small.py``, no layout sort) or "grouped" (layout + grouped GEMMs).

On a CPU it runs eagerly once per stage as a smoke test (times meaningless).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.distributed as dist

from rocm_moe import synthetic as syn
from rocm_moe._console import progress
from rocm_moe.benchmarks import print_rows, rotations, write_json
from rocm_moe.benchmarks.layer import (
    _router,
    add_run_arguments,
    add_shape_arguments,
    check_shape_args,
    shape,
)
from rocm_moe.cli import argtypes
from rocm_moe.distributed import WorkerInfo, launch


def _timer(fn, device: torch.device, inner: int):
    """A callable returning seconds per call of fn: a CUDA graph of ``inner`` calls replayed
    and timed with events on GPUs; one eager call on CPUs."""
    if device.type != "cuda":
        def eager() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return eager
    from rocm_moe.benchmarks.comm import _graphed

    replay = _graphed(fn, inner, device)

    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    return timed


def _median_us(timer, cfg: dict) -> float:
    times = [timer() for _ in range(cfg["warmup"] + cfg["iters"])][cfg["warmup"]:]
    return statistics.median(times) * 1e6


def copy_rate(device: torch.device) -> float | None:
    """Bytes per second of a device-to-device copy (read + write): ``benchmarks.experts``'
    measurement (eager ``copy_``, median), the one every experts benchmark and sweep divides
    by. (Until 2026-12-07 this benchmark timed ``copy_`` replayed from a CUDA graph: 2.75 TB/s
    on an H200 where the sweeps' eager copy measured 4.24 the same hour, so its floors were too
    high and its experts / floor ratios below 1; ``bench/copy_rate_probe.py`` times both.)"""
    if device.type != "cuda":
        return None
    from rocm_moe.benchmarks.experts import copy_rate as gbps

    return gbps() * 1e9


def _layer(cfg: dict, s: dict, cap: int, info: WorkerInfo, dtype, path: str = "auto"):
    from rocm_moe import EPMoE, Placement, backends

    placement = Placement.contiguous(s["num_experts"], 1)
    kw = dict(hidden_size=s["hidden"], top_k=s["top_k"], dtype=dtype)
    if cfg["comm"] == "local":
        disp = backends.make_dispatcher("local", placement, 0)
    else:
        disp = backends.make_dispatcher(cfg["comm"], placement, 0, max_tokens_per_rank=cap,
                                        group=dist.group.WORLD, **kw)
    fp8, gpu = cfg["format"] == "fp8", info.device.type == "cuda"
    if fp8:
        from rocm_moe.experts.triton_fp8 import TritonFP8Experts

        experts = TritonFP8Experts(path=path) if gpu else None
    else:
        from rocm_moe.experts.triton import TritonExperts

        experts = TritonExperts(path=path) if gpu else None
    layer = EPMoE(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                  router=_router(s), dispatcher=disp, experts=experts,
                  weight_format="block_fp8" if fp8 else "dense",
                  shared_intermediate_size=s["shared_intermediate"],
                  dtype=dtype, device=info.device, validate=False,
                  fused_router=cfg["fused_router"] and gpu, fused_gate=cfg.get("fused_gate"))
    # (drawn on the GPU: the same distribution; DeepSeek-V3's 11G CPU draws took minutes)
    layer.reset_parameters(cfg["seed"], draws_on=info.device if gpu else None)
    return layer


def _expert_bytes(layer, ids: torch.Tensor) -> int:
    """Weight bytes of the distinct local experts ``ids`` touch (FP8: values + scales)."""
    used = ids[ids >= 0].unique().numel()
    w13, w2 = layer.expert_weights()[:2]
    e = w13.shape[0] if isinstance(w13, torch.Tensor) else w13.weight.shape[0]
    return used * (_nbytes(w13) + _nbytes(w2)) // e


def _nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return sum(_nbytes(t) for t in (w.weight, w.scale_inv))  # quant.BlockFP8Weight


def device_kernels(fn, device: torch.device) -> list[tuple[str, float]] | None:
    """(name, device us) of each GPU kernel, copy and memset one call of fn launches, in
    launch order (torch.profiler's device events; None on CPUs)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return [(e.name, e.device_time) for e in prof.events() if e.device_type.name == "CUDA"]


def _is_copy(name: str) -> bool:
    """A copy or memset event (not counted as a kernel launch)."""
    return "memcpy" in name.lower() or "memset" in name.lower()


def _time_case(layer, xs: list[torch.Tensor], cfg: dict) -> tuple[dict, list[torch.Tensor]]:
    """us per call of the graph-replayed layer, router and experts, the calls cycling through
    the token batches ``xs`` (a graph records each call's batch); each batch's ids."""
    dev = xs[0].device
    routes = [layer.route_tokens(x) for x in xs]
    ids = [r.topk_ids.to(torch.int32) for r in routes]
    ws = [r.topk_weights.float() for r in routes]
    emap = layer.dispatcher.expert_map_on(dev)
    weights = layer.expert_weights()
    batches = [(x,) for x in xs]
    fns = {"layer": rotations(layer, batches),
           "router": rotations(layer.route_tokens, batches),
           "experts": rotations(lambda x, i, w: layer.experts(x, i, w, *weights, emap,
                                                              weight_mode=layer.weight_mode,
                                                              validate=False),
                                list(zip(xs, ids, ws, strict=True)))}
    return {k: _median_us(_timer(fn, dev, cfg["inner"]), cfg) for k, fn in fns.items()}, ids


@torch.no_grad()  # as engines run a step (no autograd records; the gate cast cache holds)
def _bench_rank(info: WorkerInfo, cfg: dict) -> dict:
    s = shape(cfg)
    dtype = getattr(torch, cfg["dtype"])
    dev = info.device
    rate = copy_rate(dev)
    rows = []
    for cap in cfg["max_tokens_per_rank"]:
        for path in cfg["experts_path"]:
            layer = _layer(cfg, s, cap, info, dtype, path)
            for T in [t for t in cfg["tokens"] if t <= cap]:
                xs = [syn.tokens(cfg["seed"] + i, 0, T, s["hidden"]).to(dtype).to(dev)
                      for i in range(cfg["batches"])]
                times, ids = _time_case(layer, xs, cfg)
                floor = None if rate is None else \
                    statistics.mean(_expert_bytes(layer, i) for i in ids) / rate * 1e6
                events = device_kernels(functools.partial(layer, xs[0]), dev)
                rows.append(dict(cap=cap, path=path, tokens=T,
                                 **{f"{k} us": v for k, v in times.items()},
                                 floor_us=floor, launches=None if events is None else
                                 sum(not _is_copy(name) for name, _ in events)))
                progress(f"cap={cap} path={path} T={T}: layer {times['layer']:.1f} us")
                if cfg["kernel_table"] and events:  # eager, launch order
                    for name, us in events:
                        progress(f"  {us:8.1f} us  {name[:100]}")
            if dev.type == "cuda":
                layer = None
                torch.cuda.empty_cache()
    return dict(rows=rows, copy_rate=rate)


def summarise(rows: list[dict]) -> list[dict]:
    first = {(r["path"], r["tokens"]): r["layer us"] for r in rows if r["cap"] == rows[0]["cap"]}
    out = []
    for r in rows:
        f = r["floor_us"]
        key = (r["path"], r["tokens"])
        out.append({"cap": r["cap"], "path": r["path"], "T": r["tokens"],
                    "layer us": r["layer us"],
                    "experts us": r["experts us"], "router us": r["router us"],
                    "layer / experts": r["layer us"] / r["experts us"],
                    "experts floor us": f,
                    "experts / floor": None if not f else r["experts us"] / f,
                    "cap / first": r["layer us"] / first[key] if key in first else None,
                    "kernels": r["launches"]})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench decode``)."""
    add_shape_arguments(p)
    p.add_argument("--tokens", type=argtypes.positive_int, nargs="+",
                   default=[1, 8, 64, 128], help="tokens T")
    p.add_argument("--max-tokens-per-rank", type=argtypes.positive_int, nargs="+",
                   default=[128], help="capacities to size the comm buffers for (symm)")
    p.add_argument("--comm", choices=["local", "symm"], default="local",
                   help="local (no comm) or symm on a one-rank group")
    p.add_argument("--format", choices=["bf16", "fp8"], default="bf16",
                   help="expert weights: bf16 or block-FP8 (128x128)")
    p.add_argument("--fused-router", action=argparse.BooleanOptionalAction, default=True,
                   help="the one-launch Triton router (GPUs; --no-fused-router: torch path)")
    p.add_argument("--fused-gate", choices=["off", "float32", "all"], default=None,
                   help="the Triton gate GEMM with the router (routing.gate_route; default "
                   "routing.FUSED_GATE_DEFAULT): float32 gates (DeepSeek-V3) or all")
    p.add_argument("--experts-path", nargs="+", choices=["auto", "small", "grouped"],
                   default=["auto"], help="the Triton experts' path (several: a row set each): "
                   "auto (by batch size), small (no layout sort) or grouped (layout + GEMMs)")
    p.add_argument("--kernel-table", action="store_true",
                   help="print each case's kernels, copies and memsets with their device "
                   "time (one eager layer forward under torch.profiler; GPUs)")
    p.add_argument("--inner", type=argtypes.positive_int, default=20,
                   help="calls per CUDA graph")
    p.add_argument("--batches", type=argtypes.positive_int, default=1,
                   help="token batches the calls cycle through, each its own routing (at "
                   "most --inner): N >= 2 reads the experts' weights from HBM, not L2")
    add_run_arguments(p)
    p.add_argument("--out", type=argtypes.output_dir, default="bench/results",
                   help="folder for the JSON")
    p.add_argument("--name", type=argtypes.file_stem, default=None,
                   help="file stem (default: decode_<model>_<format>_<comm>)")


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    check_shape_args(args, parser)
    if args.format == "fp8" and args.dtype != "bfloat16":
        parser.error("--format fp8 computes in bfloat16: pass --dtype bfloat16")
    if args.comm == "symm" and not torch.cuda.is_available():
        parser.error("--comm symm needs a GPU (torch symmetric memory)")
    if args.comm == "local" and len(args.max_tokens_per_rank) > 1:
        parser.error("--comm local has no buffers to size: pass one --max-tokens-per-rank")
    if args.batches > args.inner:
        parser.error(f"argument --batches: value={args.batches}: must be <= --inner="
                     f"{args.inner} (a graph of --inner calls cycles through the batches)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.console import Console

    from rocm_moe.backends import device_description

    _check(args, parser)
    cfg = vars(args)
    gpu = torch.cuda.is_available()
    if not gpu:
        cfg.update(warmup=0, iters=1)
    progress("starting 1 rank")
    res = launch(1, _bench_rank, cfg, timeout_s=900, backend="nccl" if gpu else "gloo")[0]
    rows = summarise(res["rows"])
    s, device = shape(cfg), device_description()
    rate = res["copy_rate"]
    title = (f"decode at W=1, {cfg['model']} E={s['num_experts']} H={s['hidden']} "
             f"I={s['intermediate']} K={s['top_k']} {cfg['format']}, comm={cfg['comm']}, "
             f"router={'fused' if cfg['fused_router'] else 'torch'}, "
             f"gate={cfg.get('fused_gate') or 'default'}, "
             + (f"CUDA-graph replay x{cfg['inner']} over {cfg['batches']} batch(es), median "
                f"of {cfg['iters']}, copy rate "
                f"{rate / 1e12:.2f} TB/s" if rate else "eager smoke run (no GPU)")
             + f", {device}")
    console = Console(width=220)
    print_rows(console, rows, title=title)
    stem = cfg["name"] or f"decode_{cfg['model']}_{cfg['format']}_{cfg['comm']}"
    path = write_json(cfg["out"], stem, device=device, shape=s, config=cfg, copy_rate=rate,
                      summary=rows)
    console.print(f"json: {path}")
    return 0
