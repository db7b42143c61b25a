"""The router alone: the torch path (``routing._route_torch``: softmax or sigmoid, bias, group
top-k, top-k, gather, normalise, scale, casts; several small kernels) against the one-launch
Triton router (``rocm_moe._routing_triton.fused_route``), each after the same gate GEMM.

Routers (issue 33): Qwen3-30B-A3B (E=128, K=8, softmax, norm_topk_prob, H=2048, bf16 logits)
and DeepSeek-V3 (E=256, K=8, sigmoid, n_group=8, topk_group=4, e_score_correction_bias,
routed_scaling_factor=2.5, H=7168; its gate GEMM in float32 as ``EPMoE.router_logits`` does,
the weight kept in float32); ``--routers`` adds Kimi K2 (E=384, one group, H=7168, float32
gate). Hidden states are bf16, T tokens.

Each path is captured in a CUDA graph (``--inner`` calls per graph) and replayed; a replay is
timed with CUDA events, the median over ``--replays`` replays (>= 200), in us per call. Columns:
gate GEMM alone; each router alone on precomputed logits; gate + router for each; the speedup
of gate + router; and the rows whose ids and weights are the same bits in both paths (rows
where scores tie may differ: the Triton router breaks ties to the lower id).

A second table (``--gate``, on by default) times the Triton gate GEMM + router
(``routing.gate_route``: the gate weight read as stored, bf16, split over H and experts, the
split-K partials summed inside the router's launch; ``EPMoE(fused_gate=...)``) against
today's torch gate + Triton router, with the weight-read floor: the bf16 gate weight's bytes
over the device's copy bandwidth, measured in the same run (a 1 GiB device copy, read + write
bytes over its time). "ids=f64" counts the rows whose fused ids equal a float64 router's
(float64 gate GEMM, float64 scores) among the rows without a near-tie (rows whose float64
choice scores have a gap < 1e-4 around the top-k or its groups are left out and counted as
"near"; Qwen3's bf16 logits tie often). ``--sweep`` also
times a few other gate plans (expert tile 16-128, programs per SM) and prints the best;
"(gemm route)" are the fused path's two launches timed alone (its gate GEMM into the split-K
workspace, then the split-K router).
"plan" is the default plan (``_gate_triton.default_spec``: ``ROCM_MOE_GATE_PLAN``, ``TUNED``,
else ``gate_plan``).

Usage on the GPU machine: python3 bench/router.py --out bench/results/router_h100.json
(prints the tables; ``--sizes``, ``--replays``, ``--inner`` to change the sweep; the lead's
script is bench/gpu_router_gate.sh). On a CPU it runs eagerly as a smoke test
(TRITON_INTERPRET=1 for the Triton path; times meaningless).
"""

from __future__ import annotations

import argparse
import datetime
import functools
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
    "kimi-k2": dict(H=7168, config=RouterConfig.kimi_k2(384, 8)),  # --routers to add it
}
DEFAULT_ROUTERS = ("qwen3-30b-a3b", "deepseek-v3")
SIZES = (1, 8, 64, 128, 4096)


def _case(name: str, T: int, device: torch.device, gen: torch.Generator) -> dict:
    """Hidden [T, H] bf16, the gate weight (float32 for a float32-logits router, as
    ``EPMoE._gate_weight_f32`` caches it; ``w_stored`` the bf16 weight as stored) and bias."""
    spec = ROUTERS[name]
    cfg: RouterConfig = spec["config"]
    H, E = spec["H"], cfg.num_experts
    x = torch.randn(T, H, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(E, H, generator=gen) / H**0.5).to(device, torch.bfloat16)
    bias = None
    if cfg.scoring == "sigmoid":
        bias = (torch.rand(E, generator=gen) * 0.1).to(device)
    stored = w
    if cfg.logits_in_float32:
        w = w.float()
    return dict(x=x, w=w, w_stored=stored, bias=bias, config=cfg)


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


def run(sizes, replays: int, inner: int, device: torch.device,
        routers=DEFAULT_ROUTERS) -> list[dict]:
    rows = []
    for name in routers:
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


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy (read + write bytes over the time), median
    of 20 copies of 1 GiB; 1e11 on CPUs (the smoke test)."""
    if device.type != "cuda":
        return 1e11
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times[2:])


def _route64(x, w, bias, cfg: RouterConfig):
    """The float64 router (logits rounded to x's dtype first where the router's logits are in
    the model dtype): (ids [T, K] sorted per row, near [T] bool: a choice-score gap < 1e-4,
    ties included, at the top-k's edge or at the kept groups' edge)."""
    logits = x.double() @ w.double().T
    if not cfg.logits_in_float32:  # rounded once to the model dtype, as the GEMM's output
        logits = logits.to(x.dtype).double()
    s = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = s if bias is None else s + bias.double()
    T, E, G = choice.shape[0], cfg.num_experts, cfg.n_group
    near = torch.zeros(T, dtype=torch.bool, device=x.device)
    if G > 1:
        gs = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1).sort(-1, True).values
        near |= (gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group]).abs() < 1e-4
        keep = torch.zeros(T, G, dtype=torch.bool, device=x.device)
        top = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group)
        keep.scatter_(1, top.indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, 1), float("-inf"))
    top = choice.topk(cfg.top_k + 1, dim=-1).values
    near |= (top[:, :-1] - top[:, 1:]).abs().min(-1).values < 1e-4
    return choice.topk(cfg.top_k, dim=-1).indices.sort(-1).values, near


def _gate_plans(case: dict, sweep: bool) -> dict:
    """name -> GatePlan | None (None: gate_plan's choice); the sweep adds a few others."""
    from rocm_moe._gate_triton import _sm_count, gate_plan

    plans: dict = {"auto": None}
    if not sweep:
        return plans
    x, w = case["x"], case["w_stored"]
    (T, H), E = x.shape, w.shape[0]
    sms = _sm_count(x.device)
    for block_e in (16, 32, 64, 128):
        for waves in (1.0, 2.0, 4.0):
            plans[f"e{block_e} w{waves:g}"] = gate_plan(
                T, E, H, ieee_fp32=False, sms=sms, amd=torch.version.hip is not None,
                block_e=block_e, waves=waves)
    return plans


def _gate_paths(case: dict):
    """(today, fused): torch gate + Triton router, and the Triton gate + router
    (``fused(plan)``); each returns (weights, ids), capturable."""
    from rocm_moe._gate_triton import gate_route
    from rocm_moe._routing_triton import fused_route

    x, w, stored, bias, cfg = (case[k] for k in ("x", "w", "w_stored", "bias", "config"))

    def today():
        lg = F.linear(x.float() if cfg.logits_in_float32 else x, w)
        r = fused_route(logits_TE=lg, config=cfg, bias_E=bias)
        return r.topk_weights, r.topk_ids

    def fused(plan=None):
        r, _ = gate_route(x_TH=x, weight_EH=stored, config=cfg, bias_E=bias, plan=plan)
        return r.topk_weights, r.topk_ids

    return today, fused


def _gate_stages(case: dict, plan) -> dict:
    """The two launches of the Triton gate + router alone (``plan``): "gemm" (the split-K gate
    GEMM into its [S, T, E] workspace) and "reduce+route" (the split-K router on it)."""
    from rocm_moe._gate_triton import gate_gemm
    from rocm_moe._routing_triton import splitk_route

    x, stored, bias, cfg = (case[k] for k in ("x", "w_stored", "bias", "config"))
    T, E = x.shape[0], stored.shape[0]
    part = torch.zeros(plan.splits, T, E, dtype=torch.float32, device=x.device)
    logits = torch.empty(T, E, dtype=torch.float32 if cfg.logits_in_float32 else x.dtype,
                         device=x.device)

    def gemm():
        gate_gemm(x, stored, part, plan)

    def route():
        r = splitk_route(part_STE=part, logits_TE=logits, config=cfg, bias_E=bias,
                         rows=plan.route_rows, num_warps=plan.route_warps)
        return r.topk_weights, r.topk_ids

    return {"gemm": gemm, "reduce+route": route}


def run_gate(sizes, replays: int, inner: int, device: torch.device, bw: float,
             sweep: bool, routers=DEFAULT_ROUTERS) -> list[dict]:
    from rocm_moe._gate_triton import _sm_count, default_spec, plan_from_spec

    rows = []
    for name in routers:
        for T in sizes:
            case = _case(name, T, device, torch.Generator().manual_seed(T))
            x, stored, bias, cfg = (case[k] for k in ("x", "w_stored", "bias", "config"))

            today, fused = _gate_paths(case)
            t_today = _time_us(today, device, replays, inner)
            plans = {k: _time_us(functools.partial(fused, p), device, replays, inner)
                     for k, p in _gate_plans(case, sweep).items()}
            best = min(plans, key=plans.get)
            auto = plan_from_spec(default_spec(T, cfg.num_experts, x.shape[1], device), T,
                                  cfg.num_experts, x.shape[1], ieee_fp32=False,
                                  sms=_sm_count(device), amd=torch.version.hip is not None)
            stages = {k: _time_us(fn, device, replays, inner)
                      for k, fn in _gate_stages(case, auto).items()}
            floor = stored.numel() * stored.element_size() / bw * 1e6
            ids64, near = _route64(x, stored, bias, cfg)
            ids = fused()[1].long().sort(-1).values
            same64 = int(((ids == ids64).all(-1) & ~near).sum())
            rows.append(dict(router=name, T=T, today_us=t_today, fused_us=plans["auto"],
                             gemm_us=stages["gemm"], route_us=stages["reduce+route"],
                             floor_us=floor, plans_us=plans, best_plan=best,
                             ids_same_f64=same64, near_ties=int(near.sum()), rows=T,
                             auto_plan=auto.spec))
            _print_gate_row(rows[-1])
    return rows


GATE_HEADER = (f"{'router':14} {'T':>5} {'gate+triton':>12} {'fused':>8} {'(gemm':>7} "
               f"{'route)':>7} {'floor':>7} "
               f"{'fused/floor':>11} {'speedup':>8} {'ids=f64':>9} {'near':>5}  plan (best)")


def _print_gate_row(r: dict) -> None:
    best = "" if r["best_plan"] == "auto" else \
        f" ({r['best_plan']}: {r['plans_us'][r['best_plan']]:.1f})"
    print(f"{r['router']:14} {r['T']:5d} {r['today_us']:12.1f} {r['fused_us']:8.1f} "
          f"{r['gemm_us']:7.1f} {r['route_us']:7.1f} "
          f"{r['floor_us']:7.2f} {r['fused_us'] / r['floor_us']:10.2f}x "
          f"{r['today_us'] / r['fused_us']:7.2f}x "
          f"{r['ids_same_f64']:>4}/{r['rows'] - r['near_ties']:<4} "
          f"{r['near_ties']:>5}  {r['auto_plan']}{best}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--replays", type=int, default=500, help="timed replays (>= 200 on GPUs)")
    ap.add_argument("--inner", type=int, default=1, help="router calls per CUDA graph")
    ap.add_argument("--no-gate", dest="gate", action="store_false",
                    help="skip the Triton gate GEMM + router table")
    ap.add_argument("--sweep", action="store_true", help="also time other gate plans")
    ap.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(DEFAULT_ROUTERS))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and args.replays < 200:
        ap.error(f"--replays={args.replays}: must be >= 200 on GPUs (medians of enough replays)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (eager smoke)"
    print(f"router alone and with its gate GEMM, us per call (median of {args.replays} "
          f"replays, {args.inner} call(s) per CUDA graph) on {name}")
    print(HEADER)
    rows = run(args.sizes, args.replays, args.inner, device, args.routers)
    gate_rows = []
    if args.gate:
        bw = copy_bandwidth(device)
        print(f"\nTriton gate GEMM + router (routing.gate_route, weight bf16 as stored) vs "
              f"torch gate + Triton router; floor = bf16 gate weight bytes / {bw / 1e12:.2f} "
              "TB/s (this device's copy bandwidth, measured now)")
        print(GATE_HEADER)
        gate_rows = run_gate(args.sizes, args.replays, args.inner, device, bw, args.sweep,
                             args.routers)
    if args.out:
        import triton

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            device=name, torch=torch.__version__, triton=triton.__version__,
            replays=args.replays, inner=args.inner,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            rows=rows, gate_rows=gate_rows), indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
