"""The router alone: the torch path (``routing._route_torch``: softmax or sigmoid, bias, group
top-k, top-k, gather, normalise, scale, casts; several small kernels) against the one-launch
Triton router (``rocm_moe._routing_triton.fused_route``), each after the same gate GEMM.

Routers (issue 33): Qwen3-30B-A3B (E=128, K=8, softmax, norm_topk_prob, H=2048, bf16 logits)
and DeepSeek-V3 (E=256, K=8, sigmoid, n_group=8, topk_group=4, e_score_correction_bias,
routed_scaling_factor=2.5, H=7168; its gate GEMM in float32 as ``EPMoE.router_logits`` does,
the weight kept in float32). Hidden states are bf16, T tokens.

Each path is captured in a CUDA graph (``--inner`` calls per graph) and replayed; a replay is
timed with CUDA events, the median over ``--replays`` replays (>= 200), in us per call. Columns:
gate GEMM alone; each router alone on precomputed logits; gate + router for each; the speedup
of gate + router; and the rows whose ids and weights are the same bits in both paths (rows
where scores tie may differ: the Triton router breaks ties to the lower id).

Usage on the GPU machine: python3 bench/router.py --out bench/results/router_h100.json
(prints the table; ``--sizes``, ``--replays``, ``--inner`` to change the sweep). On a CPU it
runs eagerly as a smoke test (TRITON_INTERPRET=1 for the Triton path; times meaningless).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rocm_moe.routing import RouterConfig, _route_torch

ROUTERS = {
    "qwen3-30b-a3b": dict(H=2048, config=RouterConfig.qwen3_moe(128, 8)),
    "deepseek-v3": dict(H=7168, config=RouterConfig.deepseek_v3(256, 8)),
}
SIZES = (1, 8, 64, 128, 4096)


def _case(name: str, T: int, device: torch.device, gen: torch.Generator) -> dict:
    """Hidden [T, H] bf16, the gate weight (float32 for a float32-logits router) and bias."""
    spec = ROUTERS[name]
    cfg: RouterConfig = spec["config"]
    H, E = spec["H"], cfg.num_experts
    x = torch.randn(T, H, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(E, H, generator=gen) / H**0.5).to(device, torch.bfloat16)
    bias = None
    if cfg.scoring == "sigmoid":
        bias = (torch.rand(E, generator=gen) * 0.1).to(device)
    if cfg.logits_in_float32:
        w = w.float()
    return dict(x=x, w=w, bias=bias, config=cfg)


def _paths(case: dict) -> dict:
    """name -> a no-argument callable (capturable: no host read)."""
    from rocm_moe._routing_triton import fused_route

    x, w, bias, cfg = case["x"], case["w"], case["bias"], case["config"]

    def gate():
        return F.linear(x.float() if cfg.logits_in_float32 else x, w)

    logits = gate()

    def torch_router(lg=None):
        r = _route_torch(logits if lg is None else lg, cfg, bias)
        return r.topk_weights, r.topk_ids

    def triton_router(lg=None):
        r = fused_route(logits_TE=logits if lg is None else lg, config=cfg, bias_E=bias)
        return r.topk_weights, r.topk_ids

    return {"gate": gate, "torch router": torch_router, "triton router": triton_router,
            "gate + torch": lambda: torch_router(gate()),
            "gate + triton": lambda: triton_router(gate())}


def _time_us(fn, device: torch.device, replays: int, inner: int) -> float:
    """Median us per call: CUDA-graph replays of ``inner`` calls timed with events on GPUs;
    eager perf_counter elsewhere (a smoke test)."""
    if device.type != "cuda":
        times = []
        for _ in range(replays):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up: compiles the Triton kernel outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(20):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / inner


def _same_rows(a, b) -> tuple[int, int]:
    (wa, ia), (wb, ib) = a, b
    same = (ia == ib).all(1) & (wa == wb).all(1)
    return int(same.sum()), same.numel()


def run(sizes, replays: int, inner: int, device: torch.device) -> list[dict]:
    rows = []
    for name in ROUTERS:
        for T in sizes:
            case = _case(name, T, device, torch.Generator().manual_seed(T))
            paths = _paths(case)
            us = {p: _time_us(fn, device, replays, inner) for p, fn in paths.items()}
            same, total = _same_rows(paths["torch router"](), paths["triton router"]())
            rows.append(dict(router=name, T=T, **{f"{p} us": v for p, v in us.items()},
                             speedup=us["gate + torch"] / us["gate + triton"],
                             same_rows=same, rows=total))
            _print_row(rows[-1])
    return rows


HEADER = (f"{'router':14} {'T':>5} {'gate':>8} {'torch rt':>9} {'triton rt':>9} "
          f"{'gate+torch':>11} {'gate+triton':>12} {'speedup':>8} {'same bits':>11}")


def _print_row(r: dict) -> None:
    print(f"{r['router']:14} {r['T']:5d} {r['gate us']:8.1f} {r['torch router us']:9.1f} "
          f"{r['triton router us']:9.1f} {r['gate + torch us']:11.1f} "
          f"{r['gate + triton us']:12.1f} {r['speedup']:7.2f}x "
          f"{r['same_rows']:>5}/{r['rows']:<5}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--replays", type=int, default=500, help="timed replays (>= 200 on GPUs)")
    ap.add_argument("--inner", type=int, default=1, help="router calls per CUDA graph")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and args.replays < 200:
        ap.error(f"--replays={args.replays}: must be >= 200 on GPUs (medians of enough replays)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (eager smoke)"
    print(f"router alone and with its gate GEMM, us per call (median of {args.replays} "
          f"replays, {args.inner} call(s) per CUDA graph) on {name}")
    print(HEADER)
    rows = run(args.sizes, args.replays, args.inner, device)
    if args.out:
        import triton

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            device=name, torch=torch.__version__, triton=triton.__version__,
            replays=args.replays, inner=args.inner,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            rows=rows), indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
