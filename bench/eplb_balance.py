"""EPLB balancing quality on a recorded Zipf routing: max / mean load per rank, unbalanced vs the
published DeepSeek EPLB rules (``rocm_moe.eplb_balance.deepseek_rules``) vs rocm_moe's
``rebalance``. CPU only; no GPU involved.

The routing is the one ``rocm-moe bench layer --model deepseek-v3 --skew zipf`` times: the
DeepSeek-V3 router (E = 256, K = 8, 8 groups, 4 kept) over the synthetic gate (seed 0) plus the
Zipf logit bias (``zipf_bias``, tau 1.0) along the skew direction, and the synthetic tokens of
16 ranks (2048 each, skew scale 4.0). ``--record`` routes those 32768 tokens and writes the
per-expert (token, slot) counts to bench/results/eplb_balance_cpu.json; without it the script
reads that file, so the table is computed from the recorded counts.

Load per rank = the (token, slot) pairs its physical experts serve, a logical expert's count
split evenly over its replicas. "unbalanced": the contiguous placement without replicas (rank r
owns experts [r E / W, (r + 1) E / W)). Nodes: 2 nodes puts the 8 groups 4 to a node (the
hierarchical rule); 1 node balances over all ranks.

Usage: python3 bench/eplb_balance.py [--record]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

from rocm_moe import synthetic as syn
from rocm_moe.benchmarks.layer import _skew_direction, zipf_bias  # the bench's own skew
from rocm_moe.eplb_balance import deepseek_rules, imbalance, rebalance
from rocm_moe.routing import RouterConfig, route

RESULTS = Path(__file__).parent / "results"
JSON = RESULTS / "eplb_balance_cpu.json"
TXT = RESULTS / "eplb_balance_cpu.txt"
E, K, H, GROUPS = 256, 8, 7168, 8
SOURCE_RANKS, TOKENS_PER_RANK, SEED, TAU, SKEW_SCALE = 16, 2048, 0, 1.0, 4.0


@torch.no_grad()
def record() -> dict:
    """Route the synthetic Zipf tokens through the DeepSeek-V3 router; count (token, slot)."""
    u = _skew_direction(H)
    gate_EH = syn.gate_weight(SEED, E, H) + torch.outer(zipf_bias(E, TAU), u) / SKEW_SCALE
    config = RouterConfig.deepseek_v3()
    counts_E = torch.zeros(E, dtype=torch.int64)
    for rank in range(SOURCE_RANKS):
        x_TH = syn.tokens(SEED, rank, TOKENS_PER_RANK, H) + SKEW_SCALE * u
        ids_TK = route(x_TH @ gate_EH.T, config).topk_ids
        counts_E += torch.bincount(ids_TK.flatten().long(), minlength=E)
    return dict(
        what="(token, slot) pairs per logical expert, DeepSeek-V3 router, bench layer's zipf "
             "skew", num_experts=E, top_k=K, hidden=H, n_group=GROUPS, topk_group=4,
        source_ranks=SOURCE_RANKS, tokens_per_rank=TOKENS_PER_RANK, seed=SEED, zipf_tau=TAU,
        skew_scale=SKEW_SCALE, date=datetime.datetime.now(datetime.UTC).isoformat(
            timespec="minutes"), torch=torch.__version__, counts_E=counts_E.tolist())


def lower_bound(load_E: torch.Tensor, R: int, W: int, nodes: int) -> float:
    """A bound no placement can beat, as max / mean: the mean itself; the smallest possible
    largest load per replica with R redundant slots (the greedy replication is optimal for it);
    with nodes, the best split of the groups onto the nodes (every split tried) over the node's
    ranks."""
    w = load_E.double()
    mean = float(w.sum()) / W
    per_replica = w.clone()
    count = torch.ones_like(w)
    for _ in range(R):
        e = int(torch.argmax(per_replica))
        count[e] += 1
        per_replica[e] = w[e] / count[e]
    bound = max(mean, float(per_replica.max()))
    if R == 0:  # the hottest expert's rank also holds E / W - 1 others, at least the coldest
        hot = int(torch.argmax(w))
        rest = torch.cat([w[:hot], w[hot + 1:]]).sort().values
        bound = max(bound, float(w[hot] + rest[:len(w) // W - 1].sum()))
    if nodes > 1 and GROUPS % nodes == 0:
        group = w.reshape(GROUPS, -1).sum(1).tolist()
        per_node = GROUPS // nodes
        if nodes == 2:
            best = min(max(sum(group[g] for g in c), sum(group) - sum(group[g] for g in c))
                       for c in itertools.combinations(range(GROUPS), per_node))
            bound = max(bound, best / (W // nodes))
    return bound / mean


def table(rec: dict) -> list[str]:
    load_E = torch.tensor(rec["counts_E"], dtype=torch.int64)
    top = load_E.sort(descending=True).values
    lines = [
        f"recorded routing: {rec['source_ranks']} x {rec['tokens_per_rank']} tokens, "
        f"E={rec['num_experts']}, K={rec['top_k']}, DeepSeek-V3 router (8 groups, 4 kept), "
        f"zipf tau {rec['zipf_tau']}, skew scale {rec['skew_scale']} ({rec['date']})",
        f"(token, slot) pairs: {int(load_E.sum())}; hottest experts "
        f"{[round(float(t) / float(load_E.float().mean()), 2) for t in top[:4]]} x the mean; "
        f"coldest {int(top[-1])}",
        "max / mean load per rank (1.000 = perfect); bound: no placement does better (the mean;",
        "the best largest load per replica, at R = 0 with the coldest experts beside it; the best",
        "split of the groups onto 2 nodes); time: the balancer's wall time on this CPU",
        "",
        f"{'W':>3} {'R':>3} {'nodes':>5} | {'unbalanced':>10} | {'bound':>6} | {'deepseek':>8} "
        f"{'time':>7} | {'ours':>8} {'time':>7} | {'ours vs rules':>13}",
    ]
    for W in (8, 16):
        for R in (0, 32):
            for nodes in (1, 2):
                kw = dict(num_physical=E + R, num_ranks=W, num_nodes=nodes, num_groups=GROUPS)
                t0 = time.perf_counter()
                ds = deepseek_rules(load_E, **kw)
                t1 = time.perf_counter()
                ours = rebalance(load_E, **kw)
                t2 = time.perf_counter()
                flat = float(imbalance(load_E, torch.arange(E), W))
                d, o = float(imbalance(load_E, ds, W)), float(imbalance(load_E, ours, W))
                lines.append(
                    f"{W:>3} {R:>3} {nodes:>5} | {flat:>10.3f} | "
                    f"{lower_bound(load_E, R, W, nodes):>6.4f} | {d:>8.4f} {t1 - t0:>6.2f}s | "
                    f"{o:>8.4f} {t2 - t1:>6.2f}s | {100 * (o / d - 1):>+12.2f}%")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true",
                   help=f"route the tokens again and rewrite {JSON.name} (about a minute)")
    args = p.parse_args()
    if args.record:
        JSON.write_text(json.dumps(record(), indent=1) + "\n")
    rec = json.loads(JSON.read_text())
    lines = table(rec)
    lines.append("")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.machine()) \
        if Path("/proc/cpuinfo").exists() else platform.machine()
    lines.append(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
                 f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='minutes')}")
    TXT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
