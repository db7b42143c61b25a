"""Scaling model: tokens/s per GPU of the DeepSeek-V3 MoE layer at EP 8 to 64 (a model, not a
run; no GPU needed). notes/scaling.md explains it; the numbers it is fed:

- measured (bench/results, this repository): the NVLink all-to-all on 4x H100 (latency and
  bandwidth fitted on ``comm_4xh100.json``'s raw all_to_all_single at 128 and 16384 tokens per
  rank), the Triton experts' time over their floor for the DeepSeek-V3 rank-local shape
  (``experts_h100.json``) and the H100's measured copy and matmul rates;
- published or assumed (``--nic-GBps``, ``--nic-efficiency``, ``--mi300x-*``): 400 Gb/s NIC per
  GPU, MORI's EP8 dispatch/combine on MI300X (307 / 330 GB/s), the MI300X's HBM and bf16 rates
  taken at the fraction of peak the H100 measured.

Per layer and rank, with T tokens per rank, N ranks (nodes of G = min(N, 8) GPUs), E=256
experts, K=8, uniform routing: a token reaches each other rank with probability
p_rank = 1 - C(E - E/N, K) / C(E, K) and each other node with p_node = 1 - C(E - E G/N, K) /
C(E, K). Dispatch bytes per rank: intra-node (G - 1) p_rank T H 2, inter-node (N - G) p_rank T H
2 (flat) or (N/G - 1) p_node T H 2 (two-stage: one copy per node, then NVLink). Time = latency +
max(intra / NVLink rate, inter / NIC rate) (links work in parallel); combine moves the same bytes.
Experts: T K (token, expert) pairs on E/N local experts, floor = max(weight bytes touched / copy
rate, FLOPs / matmul rate) times the measured time/floor at that many rows; the shared expert
(I=2048) is a dense GEMM at its floor; stages do not overlap (as EPMoE runs them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from rocm_moe.cli import argtypes

E, K, H, I, SHARED_I = 256, 8, 7168, 2048, 2048
BYTES = 2  # bf16


@dataclass(frozen=True)
class Machine:
    name: str
    intra_GBps: float  # per-rank all-to-all rate inside a node
    intra_latency_us: float
    copy_GBps: float  # HBM rate reached by a copy
    matmul_TFLOPs: float  # bf16 dense matmul rate reached
    nic_GBps: float  # per GPU, after efficiency
    nic_latency_us: float  # added once a dispatch crosses nodes


def _fit_intra(comm: dict) -> tuple[float, float]:
    """(GB/s, latency us) through the raw all_to_all's first and last points."""
    rows = comm["summary"]
    a, b = rows[0], rows[-1]

    def mb(r):
        return r["mean_recv_rows"] * comm["config"]["hidden"] * BYTES / 1e6

    bw = (mb(b) - mb(a)) / (b["a2a us"] - a["a2a us"]) * 1e3  # MB/us -> GB/s
    return bw, a["a2a us"] - mb(a) / bw * 1e3


def intra_check(comm: dict) -> list[dict]:
    """The fit against every measured all_to_all (the middle points were not used)."""
    bw, lat = _fit_intra(comm)
    out = []
    for r in comm["summary"]:
        mb = r["mean_recv_rows"] * comm["config"]["hidden"] * BYTES / 1e6
        pred = lat + mb / bw * 1e3
        out.append(dict(tokens=r["tokens"], measured_us=r["a2a us"], model_us=pred,
                        model_over_measured=pred / r["a2a us"]))
    return out


def machines(results: Path, nic_GBps: float, nic_eff: float, nic_lat: float,
             mi300x: dict) -> list[Machine]:
    comm = json.loads((results / "comm_4xh100.json").read_text())
    experts = json.loads((results / "experts_h100.json").read_text())
    bw, lat = _fit_intra(comm)
    c = experts["ceilings"]
    h100 = Machine("H100 (8 per node)", bw, lat, c["copy_GBps"], c["matmul_TFLOPs"],
                   nic_GBps * nic_eff, nic_lat)
    frac_copy, frac_mm = c["copy_GBps"] / 3350.0, c["matmul_TFLOPs"] / 989.0
    mi = Machine("MI300X (8 per node)", mi300x["intra_GBps"], lat,
                 mi300x["hbm_GBps"] * frac_copy, mi300x["bf16_TFLOPs"] * frac_mm,
                 nic_GBps * nic_eff, nic_lat)
    return [h100, mi]


def _p_hit(n_parts: float) -> float:
    """Probability that a token's K distinct experts (uniform over E) hit one of n_parts equal
    parts of the experts."""
    per = E / n_parts
    return 1.0 - math.comb(E - int(per), K) / math.comb(E, K)


def _overhead(experts: dict, pairs: float) -> float:
    """Measured time / floor of the DeepSeek-V3 rank-local experts, interpolated in log rows."""
    pts = sorted((r["local_pairs"], r["time_over_floor"]) for r in experts["rows"]
                 if r["shape"] == "dsv3")
    if pairs <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if pairs <= x1:
            f = (math.log(pairs) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return pts[-1][1]


def predict(m: Machine, N: int, T: int, experts: dict) -> dict:
    G = min(N, 8)
    p_rank, p_node = _p_hit(N), _p_hit(N / G)
    row = T * H * BYTES / 1e6  # MB per "every token once"
    intra_mb = (G - 1) * p_rank * row
    flat_inter_mb = (N - G) * p_rank * row
    hier_inter_mb = (N / G - 1) * p_node * row
    comm = {}
    for name, inter in (("flat", flat_inter_mb), ("two-stage", hier_inter_mb)):
        latency = m.intra_latency_us + (m.nic_latency_us if N > G else 0.0)
        one_way = latency + max(intra_mb / m.intra_GBps * 1e3, inter / m.nic_GBps * 1e3)
        comm[name] = 2 * one_way  # dispatch + combine
    e_local = E / N
    pairs = T * K
    touched = e_local * _p_hit_local(pairs, e_local)
    w_bytes = touched * 3 * H * I * BYTES
    flops = 2 * pairs * 3 * H * I
    floor = max(w_bytes / (m.copy_GBps * 1e9), flops / (m.matmul_TFLOPs * 1e12)) * 1e6
    experts_us = floor * _overhead(experts, pairs)
    shared_us = max(3 * H * SHARED_I * BYTES / (m.copy_GBps * 1e9),
                    2 * T * 3 * H * SHARED_I / (m.matmul_TFLOPs * 1e12)) * 1e6
    out = dict(EP=N, nodes=N // G, tokens=T, intra_MB=intra_mb, flat_inter_MB=flat_inter_mb,
               two_stage_inter_MB=hier_inter_mb, experts_us=experts_us, shared_us=shared_us)
    for name, t in comm.items():
        total = t + experts_us + shared_us
        out[f"{name} comm_us"] = t
        out[f"{name} tokens/s/GPU"] = T / total * 1e6
    return out


def _p_hit_local(pairs: float, e_local: float) -> float:
    """Fraction of the e local experts that get at least one of ``pairs`` uniform pairs."""
    return 1.0 - (1.0 - 1.0 / e_local) ** pairs


def _fmt(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def routing_check(comm: dict) -> dict:
    """Distinct destination ranks per token: the uniform-routing model (W p_rank) against the
    4-GPU run's received rows per token (its synthetic router)."""
    W = comm["world_size"]  # the top-level one: the ranks that ran
    measured = statistics.mean(r["mean_recv_rows"] / r["tokens"] for r in comm["summary"])
    return dict(model=W * _p_hit(W), measured=measured)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=argtypes.existing_dir, default="bench/results",
                   help="folder of the measured JSON")
    p.add_argument("--ep", type=argtypes.positive_int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--tokens", type=argtypes.positive_int, nargs="+", default=[128, 4096])
    p.add_argument("--nic-GBps", type=argtypes.finite_positive_float, default=50.0,
                   help="per GPU (400 Gb/s)")
    p.add_argument("--nic-efficiency", type=argtypes.fraction, default=0.8)
    p.add_argument("--nic-latency-us", type=argtypes.finite_nonnegative_float, default=15.0,
                   help="added to a dispatch or combine that crosses nodes")
    p.add_argument("--mi300x-intra-GBps", type=argtypes.finite_positive_float, default=307.0,
                   help="MORI's published EP8 dispatch rate on MI300X")
    p.add_argument("--mi300x-hbm-GBps", type=argtypes.finite_positive_float, default=5300.0)
    p.add_argument("--mi300x-bf16-TFLOPs", type=argtypes.finite_positive_float, default=1307.0)
    p.add_argument("--json", type=argtypes.writable_file, default=None,
                   help="also write the table here")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.console import Console
    from rich.table import Table

    results = Path(args.results)
    for f in ("comm_4xh100.json", "experts_h100.json"):
        if not (results / f).is_file():
            parser.error(f"--results {results}: {f} is missing (the model is fed by it)")
    experts = json.loads((results / "experts_h100.json").read_text())
    comm = json.loads((results / "comm_4xh100.json").read_text())
    console = Console(width=200)
    check = Table(title="check: the NVLink fit against every measured all_to_all (4x H100)",
                  title_justify="left")
    for c in ("T/rank", "measured us", "model us", "model / measured"):
        check.add_column(c, justify="right")
    for r in intra_check(comm):
        check.add_row(str(r["tokens"]), f"{r['measured_us']:.1f}", f"{r['model_us']:.1f}",
                      f"{r['model_over_measured']:.2f}")
    console.print(check)
    rc = routing_check(comm)
    console.print(f"check: distinct destination ranks per token at W=4: model {rc['model']:.3f}, "
                  f"measured {rc['measured']:.3f}")
    rows = []
    mi = dict(intra_GBps=args.mi300x_intra_GBps, hbm_GBps=args.mi300x_hbm_GBps,
              bf16_TFLOPs=args.mi300x_bf16_TFLOPs)
    for m in machines(results, args.nic_GBps, args.nic_efficiency, args.nic_latency_us, mi):
        table = Table(title=f"DeepSeek-V3 layer, {m.name}: NVLink/xGMI {m.intra_GBps:.0f} GB/s, "
                      f"NIC {m.nic_GBps:.0f} GB/s, HBM {m.copy_GBps:.0f} GB/s, "
                      f"{m.matmul_TFLOPs:.0f} TFLOP/s", title_justify="left")
        keys = ["EP", "nodes", "tokens", "intra_MB", "flat_inter_MB", "two_stage_inter_MB",
                "experts_us", "shared_us", "flat comm_us", "two-stage comm_us",
                "flat tokens/s/GPU", "two-stage tokens/s/GPU"]
        for k in keys:
            table.add_column(k, justify="right")
        for N in args.ep:
            for T in args.tokens:
                r = predict(m, N, T, experts)
                rows.append(dict(machine=m.name, **r))
                table.add_row(*[_fmt(r[k]) for k in keys])
        console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(check=intra_check(comm), routing_check=rc, rows=rows), indent=1))
    return 0
