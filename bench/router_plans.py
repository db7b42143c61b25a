"""Sweep of the Triton gate GEMM + router's plans (``rocm_moe._gate_triton.plan_from_spec``:
tiles, splits of H, warps, the router's rows / warps per program, PDL) for the Qwen3-30B-A3B and
DeepSeek-V3 routers at decode sizes, CUDA-graph replayed (issue 33: router <= 8 us at 1-128
tokens).

For every (router, T, plan): the medians (us per call, ``--inner`` calls per graph, ``--replays``
replays) of gate + route (``gate_route`` with the plan), of its GEMM alone (into the [S, T, E]
workspace) and of its split-K router alone (on that workspace); then the best plan per size.

Every plan is checked first, and the run exits 1 naming the failures (after the table):
- the logits within 1e-6 of sum |x w| of the float64 GEMM (float32 logits), or within one
  bf16 ulp of the float64 GEMM rounded once (Qwen3's bf16 logits);
- the weights and ids the bits of the Triton router (``fused_route``) on those logits (the
  router after the GEMM is today's, bit for bit, whatever the plan);
- the ids those of the torch router (``routing._route_torch``: torch's float32 GEMM for
  DeepSeek-V3, on the plan's own bf16 logits for Qwen3) outside float64 near-ties;
- the same bits on a second call, and from a CUDA graph replay (PDL included) as eagerly.

Usage on the GPU machine (repo root): python3 bench/router_plans.py [--out F.json]
(bench/gpu_router_dsv3.sh runs it). On a CPU (TRITON_INTERPRET=1) it checks a small grid
eagerly, times meaningless (``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import router as rb  # (bench/router.py: the cases, the timer, the float64 router)

from rocm_moe._gate_triton import (
    _sm_count,
    gate_gemm,
    gate_route,
    ieee,
    plan_from_spec,
)
from rocm_moe._routing_triton import fused_route, splitk_route
from rocm_moe.routing import _route_torch

# (router, T) -> plan specs ("auto": gate_plan's choice; the TUNED ones are shipped since
# bench/results/router_plans_h100.txt). DeepSeek-V3 at 128 tokens is the one over 8 us there
# (8.3: GEMM 4.0 + route 4.8): its candidates trade the weight's re-reads (one per T tile),
# x's (one per expert tile) and the [S, T, E] float32 partials (written by the GEMM, read by the
# router) against parallelism, and the router's rows / warps per program; "pdl" overlaps the
# router's launch with the GEMM, "pdlin" the GEMM's with the kernel before it (here the
# previous call's router). A SIGTERM (the script's timeout) still prints the summary of the
# plans measured so far.
PLANS: dict[tuple[str, int], tuple[str, ...]] = {  # the missed target first
    ("deepseek-v3", 128): ("auto", "t64 e64 s16 pdl pdlin", "t64 e64 s12 pdl pdlin",
                           "t64 e32 s16 pdl pdlin", "t128 e64 s16 pdl pdlin",
                           "t64 e64 s16 pdl pdlin rr4", "t64 e64 s16 pdl pdlin rr8 rw2",
                           "t64 e64 s16 pdl pdlin rr16 rw4", "t64 e64 s8 pdl pdlin"),
    ("deepseek-v3", 64): ("auto", "t64 e64 s16 pdl", "t64 e64 s16 pdl pdlin",
                          "t64 e64 s16 pdl pdlin rr4"),
    ("deepseek-v3", 8): ("auto", "pdl", "pdl pdlin"),
    ("deepseek-v3", 1): ("auto", "pdl", "pdl pdlin"),
    ("qwen3-30b-a3b", 128): ("auto", "t64 e64 pdl", "t64 e64 pdl pdlin"),
    ("qwen3-30b-a3b", 64): ("auto", "pdl", "pdl pdlin"),
    ("qwen3-30b-a3b", 8): ("auto", "pdl", "pdl pdlin"),
    ("qwen3-30b-a3b", 1): ("auto", "pdl", "pdl pdlin"),
}
SMOKE = {("deepseek-v3", 33): ("auto", "t64 e64 s4", "e32 rr4 rw2", "t16 e64 rr8"),
         ("qwen3-30b-a3b", 33): ("auto", "t64 e32 s2", "rr4")}


def _case(name: str, T: int, device: torch.device, smoke: bool) -> dict:
    """bench/router.py's case (bf16); the smoke test's in float16 with H = 256 (the
    interpreter miscomputes bfloat16 and takes minutes at H = 7168)."""
    gen = torch.Generator().manual_seed(T)
    if not smoke:
        return rb._case(name, T, device, gen)
    cfg = rb.ROUTERS[name]["config"]
    x = torch.randn(T, 256, generator=gen).to(device, torch.float16)
    w = (torch.randn(cfg.num_experts, 256, generator=gen) / 16).to(device, torch.float16)
    bias = (torch.rand(cfg.num_experts, generator=gen) * 0.1).to(device) \
        if cfg.scoring == "sigmoid" else None
    return dict(x=x, w=w.float() if cfg.logits_in_float32 else w, w_stored=w, bias=bias,
                config=cfg)


def _plan(spec: str, case: dict):
    x, w = case["x"], case["w_stored"]
    return plan_from_spec(spec, x.shape[0], w.shape[0], x.shape[1],
                          ieee_fp32=ieee(x.dtype, w.dtype), sms=_sm_count(x.device),
                          amd=torch.version.hip is not None)


def _check(case: dict, plan, name: str) -> list[str]:
    """The plan's failures (empty: correct): see the module docstring."""
    x, w, stored, bias, cfg = (case[k] for k in ("x", "w", "w_stored", "bias", "config"))
    fails = []
    r, logits = gate_route(x_TH=x, weight_EH=stored, config=cfg, bias_E=bias, plan=plan)
    r2, logits2 = gate_route(x_TH=x, weight_EH=stored, config=cfg, bias_E=bias, plan=plan)
    if not (torch.equal(logits, logits2) and torch.equal(r.topk_ids, r2.topk_ids)
            and torch.equal(r.topk_weights, r2.topk_weights)):
        fails.append(f"{name}: not deterministic")
    ref = x.double() @ stored.double().T
    scale = x.double().abs() @ stored.double().abs().T
    if cfg.logits_in_float32:
        rel = float(((logits.double() - ref).abs() / scale).max())
        if rel > 1e-6:
            fails.append(f"{name}: logits off the float64 GEMM by {rel:.2e} of sum|xw|")
    else:
        r16 = ref.to(logits.dtype).double()
        bad = (logits.double() - r16).abs() > r16.abs() * 2**-7 + 1e-6 * scale
        if bool(bad.any()):
            fails.append(f"{name}: {int(bad.sum())} bf16 logits off by more than one ulp")
    want = fused_route(logits_TE=logits, config=cfg, bias_E=bias)
    if not (torch.equal(r.topk_ids, want.topk_ids)
            and torch.equal(r.topk_weights, want.topk_weights)):
        fails.append(f"{name}: weights/ids are not the Triton router's bits on its logits")
    _, near = rb._route64(x, stored, bias, cfg)
    torch_logits = F.linear(x.float(), w.float()) if cfg.logits_in_float32 else logits
    t = _route_torch(torch_logits, cfg, bias)
    same = (t.topk_ids.long().sort(-1).values == r.topk_ids.long().sort(-1).values).all(-1)
    if not bool(same[~near].all()):
        fails.append(f"{name}: ids differ from the torch router's in "
                     f"{int((~same & ~near).sum())} rows without a near-tie")
    return fails


def _graph_check(case: dict, plan, name: str) -> list[str]:
    """A CUDA graph of the plan's gate + route, replayed on new hidden states, against eager."""
    x, stored, bias, cfg = (case[k] for k in ("x", "w_stored", "bias", "config"))
    x = x.clone()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        gate_route(x_TH=x, weight_EH=stored, config=cfg, bias_E=bias, plan=plan)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r, logits = gate_route(x_TH=x, weight_EH=stored, config=cfg, bias_E=bias, plan=plan)
    x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x))
    graph.replay()
    eager, elog = gate_route(x_TH=x, weight_EH=stored, config=cfg, bias_E=bias, plan=plan)
    if not (torch.equal(logits, elog) and torch.equal(r.topk_ids, eager.topk_ids)
            and torch.equal(r.topk_weights, eager.topk_weights)):
        return [f"{name}: graph replay differs from eager"]
    return []


def _stages(case: dict, plan) -> dict:
    """name -> callable: gate + route, the GEMM alone, the split-K router alone."""
    x, stored, bias, cfg = (case[k] for k in ("x", "w_stored", "bias", "config"))
    (T, _), E = x.shape, stored.shape[0]
    part = torch.zeros(plan.splits, T, E, dtype=torch.float32, device=x.device)
    logits = torch.empty(T, E, dtype=torch.float32 if cfg.logits_in_float32 else x.dtype,
                         device=x.device)
    gate_gemm(x, stored, part, plan)
    return {
        "gate+route": lambda: gate_route(x_TH=x, weight_EH=stored, config=cfg, bias_E=bias,
                                         plan=plan),
        "gemm": lambda: gate_gemm(x, stored, part, plan),
        "route": lambda: splitk_route(part_STE=part, logits_TE=logits, config=cfg,
                                      bias_E=bias, rows=plan.route_rows,
                                      num_warps=plan.route_warps),
    }


def run(plans: dict, replays: int, inner: int, device: torch.device, smoke: bool,
        rows: list, fails: list) -> None:
    """Checks and times every plan, appending to ``rows`` and ``fails`` as it goes."""
    print(f"{'router':14} {'T':>4}  {'plan':34} {'gate+route':>10} {'gemm':>6} {'route':>6}  "
          "check", flush=True)
    for (name, T), specs in plans.items():
        case = _case(name, T, device, smoke)
        for spec in specs:
            label = f"{name} T={T} '{spec}'"
            try:
                plan = _plan(spec, case)
                bad = _check(case, plan, label)
                if device.type == "cuda":
                    bad += _graph_check(case, plan, label)
                us = {k: rb._time_us(fn, device, replays, inner)
                      for k, fn in _stages(case, plan).items()}
            except Exception as exc:  # a plan that cannot compile or launch here: say so
                bad, us, plan = [f"{label}: {type(exc).__name__}: {str(exc)[:200]}"], {}, None
            fails += bad
            row = dict(router=name, T=T, spec=spec, plan=plan.spec if plan else None,
                       ok=not bad, **{f"{k} us": v for k, v in us.items()})
            rows.append(row)
            t = "  ".join(f"{us[k]:{w}.1f}" for k, w in (("gate+route", 8), ("gemm", 4),
                                                            ("route", 4))) if us else "  -"
            shown = f"{spec} = {plan.spec}" if plan and spec != plan.spec else spec
            print(f"{name:14} {T:4d}  {shown[:34]:34} {t}  {'ok' if not bad else 'FAIL'}",
                  flush=True)


def best(rows: list) -> list[str]:
    out = []
    for key in dict.fromkeys((r["router"], r["T"]) for r in rows):
        ok = [r for r in rows if (r["router"], r["T"]) == key and r["ok"]
              and "gate+route us" in r]
        if not ok:
            out.append(f"{key[0]:14} {key[1]:4d}  no plan passed")
            continue
        b = min(ok, key=lambda r: r["gate+route us"])
        auto = next((r for r in ok if r["spec"] == "auto"), None)
        vs = f" (auto {auto['gate+route us']:.1f})" if auto else ""
        out.append(f"{key[0]:14} {key[1]:4d}  best '{b['spec']}' = {b['plan']}: "
                   f"{b['gate+route us']:.1f} us{vs}")
    return out


def tuned(rows: list) -> list[str]:
    """``_gate_triton.TUNED`` entries from the best plans (by the gate's (E, H))."""
    shapes = {name: (rb.ROUTERS[name]["config"].num_experts, rb.ROUTERS[name]["H"])
              for name in dict.fromkeys(r["router"] for r in rows)}
    out = []
    for name, shape in shapes.items():
        picks = []
        for T in sorted({r["T"] for r in rows if r["router"] == name}):
            ok = [r for r in rows if r["router"] == name and r["T"] == T and r["ok"]
                  and "gate+route us" in r]
            if ok:
                picks.append((T, min(ok, key=lambda r: r["gate+route us"])["spec"]))
        out.append(f"    {shape}: {tuple(picks)},  # {name}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--replays", type=int, default=200, help="timed replays (>= 200 on GPUs)")
    ap.add_argument("--inner", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--smoke", action="store_true", help="a small grid (CPU interpreter)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and args.replays < 200:
        ap.error(f"--replays={args.replays}: must be >= 200 on GPUs")
    smoke = args.smoke or device.type != "cuda"
    plans = SMOKE if smoke else PLANS
    t0 = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    print(f"gate + route plans on {name}: median us per call ({args.replays} replays of "
          f"{args.inner} calls per CUDA graph)")
    rows: list = []
    fails: list = []
    # `timeout` (bench/gpu_router_dsv3.sh) ends a slow sweep: still print what it measured
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped by SIGTERM after {len(rows)} "
                                                       "plans"))
    try:
        run(plans, args.replays, args.inner, device, smoke, rows, fails)
    except SystemExit as stop:
        fails.append(str(stop.code))
    print("\n".join(["", "best plan per size (among plans that passed):", *best(rows)]))
    print("\n".join(["_gate_triton.TUNED from these (T_max, spec):", *tuned(rows)]))
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=name, replays=args.replays,
                                            inner=args.inner, rows=rows, fails=fails),
                                       indent=1) + "\n")
    if fails:
        print("\nFAILED CHECKS:\n" + "\n".join(fails))
        sys.exit(1)


if __name__ == "__main__":
    main()
