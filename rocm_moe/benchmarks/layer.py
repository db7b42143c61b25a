"""Whole-layer benchmark: the EPMoE forward (route, dispatch, experts, combine) per rank.

Model shapes (``--model``): Qwen3-30B-A3B (E=128, H=2048, I=768, K=8, softmax router) and
DeepSeek-V3 (E=256, H=7168, I=2048, K=8, grouped sigmoid router, one shared expert of 2048),
bf16, seeded synthetic weights; ``--num-experts`` etc. override the shape (small shapes for
CPUs). Routing skew (``--skew``): ``uniform`` (the synthetic router as is) or ``zipf``, a
hot-expert mix: every token carries a common component that the gate maps to a per-expert
logit bias of ``--zipf-tau * log p_e`` with p_e proportional to 1 / rank_e over a random
expert order, so the real router (inside any CUDA graph) sends more tokens to hot experts.

For every comm backend (``--comm``), tokens per rank T, skew and weight mode, on every rank:
- per-stage times of an eager forward (``layer.Trace``: device-synchronised; a stage's time
  includes waiting for slower peers);
- the eager forward's total, and on GPUs with the symm backend the forward captured in a CUDA
  graph (``GraphedEPMoE``, one bucket T) and replayed;
- traffic from the routing itself: rows (token, destination rank) per (source, destination),
  split into rows that stay on the rank, cross NVLink/xGMI inside a node or cross a node
  boundary, the inter-node rows a per-node deduplicating (two-stage) dispatch would send, and
  the load imbalance (max / mean rows received per rank).
Each timed iteration starts with a barrier; the slowest rank's time; the median over
iterations. tokens/s per GPU = T / that median (graph replay where there is one). Nodes are
taken from the launcher (torchrun's GROUP_RANK, else host name + NCCL_HOSTID), never assumed;
the symm backend is refused across nodes (its puts are peer-to-peer loads/stores).

Runs with ``--world-size N`` (spawned ranks on this host) or under torchrun, single- or
multi-node (see notes/multinode.md for the emulated two-node layout on one host).

``--invariant`` adds a mode "invariant" after the weight modes: the same layer, weights and
tokens with ``layer.invariant = True`` (notes/invariance.md), and reports its time over the
first weight mode's in the same run.

``--overlap`` adds a mode "overlap": the same layer with ``micro_batches`` (``--micro-batches``,
default 2; ``rocm_moe.overlap``: one micro-batch's dispatch / combine on a side stream while the
other's experts compute; symm and MORI dispatchers are then built with ``batches_in_flight=2``),
checks its output equals the un-split layer's bit for bit (column "split == unsplit"), and prints
per (comm, T, skew) the overlap report (``overlap_report``): the un-split layer's eager stage
times (route, dispatch, experts, combine), comm = dispatch + combine and experts, the layer
un-split and split (graph replay where there is one, else eager) and the overlap efficiency =
split layer time / max(comm, experts) (issue 28's target: <= 1.15 at W = 2 and 4; the layer
time also holds route and shared experts, which the denominator leaves out).

Expert work: every case reports the (token, slot) pairs each rank's experts compute (``work``)
and its max / mean over the ranks, and over the physical experts: the load that sets the
layer's time, which the row imbalance (one row per (token, destination rank)) hides.
``--redundant-experts R`` builds the layer with EPLB (notes/eplb.md: P = E + R physical
experts, initially ``ReplicatedPlacement.initial``); ``--rebalance`` then, for every (comm, T,
skew), times the cases "before", rebalances from the load the layer measured in them
(``layer.rebalance()``: ``eplb_balance.rebalance`` of the group's load) and times them again
"after", in the same run, and prints the work and time before and after, and the time after
over the uniform routing's. ``--replica-choice local`` sends a (token, slot) to a replica on
its own rank or node first (default spread: all replicas alike).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from rocm_moe import EPMoE, Placement, RouterConfig, backends
from rocm_moe import synthetic as syn
from rocm_moe._console import Steps, progress
from rocm_moe.benchmarks import write_json
from rocm_moe.benchmarks.comm import _timed
from rocm_moe.cli import argtypes
from rocm_moe.distributed import WorkerInfo, init_from_env, launch, under_torchrun
from rocm_moe.layer import Trace

MODELS = {  # E, H, I, K, router, shared intermediate size
    "qwen3-30b-a3b": dict(num_experts=128, hidden=2048, intermediate=768, top_k=8,
                          router="qwen3", shared_intermediate=None),
    "deepseek-v3": dict(num_experts=256, hidden=7168, intermediate=2048, top_k=8,
                        router="deepseek_v3", shared_intermediate=2048),
}
STAGES = ("route", "dispatch", "experts", "combine", "shared")
_SKEW_SEED = 12345


def shape(cfg: dict) -> dict:
    """The model's shape with the command line's overrides."""
    out = dict(MODELS[cfg["model"]])
    for k in ("num_experts", "hidden", "intermediate", "top_k", "shared_intermediate"):
        if cfg.get(k) is not None:
            out[k] = cfg[k] or None if k == "shared_intermediate" else cfg[k]
    return out


def _router(s: dict) -> RouterConfig:
    if s["router"] == "qwen3":
        return RouterConfig.qwen3_moe(s["num_experts"], s["top_k"])
    if s["num_experts"] == 256 and s["top_k"] == 8:
        return RouterConfig.deepseek_v3()  # the model's own groups: 8 of 32, 4 kept
    from rocm_moe.cli.spec import router_config

    return router_config("deepseek_v3", s["num_experts"], s["top_k"])


def zipf_bias(num_experts: int, tau: float) -> torch.Tensor:
    """[E] float32 logit bias tau * log p_e, p_e ~ 1 / rank_e over a seeded expert order.

    Example: ``zipf_bias(4, 1.0)`` spans log 4 from the hottest expert to the coldest and sums
    to 0 (a softmax does not see the mean).
    """
    g = torch.Generator().manual_seed(_SKEW_SEED)
    order = torch.randperm(num_experts, generator=g)
    bias = torch.empty(num_experts)
    bias[order] = -tau * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    return bias - bias.mean()


def _skew_direction(hidden: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_SKEW_SEED + 1)
    u = torch.randn(hidden, generator=g)
    return u / u.norm()


def _build(cfg: dict, s: dict, comm: str, T: int, info: WorkerInfo, dtype,
           nodes: list[int] | None = None) -> EPMoE:
    from rocm_moe import backends

    R = cfg.get("redundant_experts")
    placement = Placement.contiguous(s["num_experts"] + (R or 0), info.world_size)
    disp = backends.make_dispatcher(comm, placement, info.rank, hidden_size=s["hidden"],
                                    top_k=s["top_k"], dtype=dtype, max_tokens_per_rank=T,
                                    **_lanes(cfg, comm))
    layer = EPMoE(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                  router=_router(s), dispatcher=disp, experts=backends.make_experts(cfg["experts"]),
                  shared_intermediate_size=s["shared_intermediate"], dtype=dtype,
                  device=info.device, validate=False, num_redundant_experts=R,
                  replica_choice=cfg.get("replica_choice") or "spread",
                  replica_nodes=tuple(nodes) if R is not None and nodes is not None
                  and cfg.get("replica_choice") == "local" else None)
    return layer


def _lanes(cfg: dict, comm: str) -> dict:
    """The dispatcher's ``batches_in_flight`` for the overlap mode: 2 on the backends whose
    results are views of their buffers (symm, MORI), nothing elsewhere."""
    held = backends.BACKENDS[f"comm:{comm}"].load().holds_batch
    return {"batches_in_flight": 2} if "overlap" in cfg.get("weight_modes", ()) and held else {}


def _set_mode(layer: EPMoE, mode: str, cfg: dict) -> None:
    """A case's mode: a weight mode, "invariant" or "overlap" (the first weight mode with
    ``--micro-batches``)."""
    layer.invariant = mode == "invariant"
    layer.weight_mode = cfg["weight_modes"][0] if mode in ("invariant", "overlap") else mode
    layer.micro_batches = cfg.get("micro_batches", 2) if mode == "overlap" else 1


def expert_work(layer: EPMoE, topk_ids: torch.Tensor, group) -> dict:
    """Collective: the (token, slot) pairs each physical expert and each rank computes for
    every rank's ``topk_ids`` (logical; mapped to the replicas the layer's forward picks), and
    their max / mean.

    Example: W = 2, E = 4, every rank's ids [[0, 1], [0, 2]]: experts [4, 2, 2, 0], ranks
    [6, 2], rank max / mean 1.5."""
    P = layer.dispatcher.placement.num_experts
    W = layer.dispatcher.world_size
    ids = layer.to_physical(topk_ids).reshape(-1).long()
    per_expert = torch.zeros(P + 1, dtype=torch.float64, device=ids.device)
    per_expert.index_add_(0, ids + 1, torch.ones_like(ids, dtype=torch.float64))
    per_expert = per_expert[1:]
    if W > 1:
        dist.all_reduce(per_expert, group=group)
    per_expert = per_expert.cpu()
    per_rank = per_expert.reshape(W, P // W).sum(1)

    def ratio(t: torch.Tensor) -> float:
        return float(t.max() / t.mean()) if float(t.sum()) > 0 else 1.0

    return dict(per_rank=[int(v) for v in per_rank.tolist()],
                per_expert=[int(v) for v in per_expert.tolist()],
                rank_max_mean=ratio(per_rank), expert_max_mean=ratio(per_expert))


@torch.no_grad()
def _set_skew(layer: EPMoE, skew: str, cfg: dict, base_gate: torch.Tensor) -> None:
    """Gate = the synthetic gate (+ bias_E u^T for zipf: a token with component c*u gets
    logits + c * bias_E)."""
    gate = base_gate.to("cpu", copy=True)  # (bias built on the CPU, copied to the layer below)
    if skew == "zipf":
        u = _skew_direction(layer.hidden_size)
        gate += torch.outer(zipf_bias(layer.router.num_experts, cfg["zipf_tau"]), u) \
            / cfg["skew_scale"]
    layer.gate.weight.copy_(gate.to(layer.gate.weight))


def _tokens(cfg: dict, s: dict, skew: str, T: int, info: WorkerInfo, dtype) -> torch.Tensor:
    x = syn.tokens(cfg["seed"], info.rank, T, s["hidden"])
    if skew == "zipf":
        x = x + cfg["skew_scale"] * _skew_direction(s["hidden"])
    return x.to(dtype).to(info.device)


def node_layout(info: WorkerInfo) -> list[int]:
    """Node index of every rank, from the launcher: torchrun's GROUP_RANK (its node rank),
    else the host name with NCCL_HOSTID (an emulated node)."""
    key = os.environ.get("GROUP_RANK") or \
        f"{socket.gethostname()}/{os.environ.get('NCCL_HOSTID', '')}"
    if info.world_size == 1:
        return [0]
    keys: list = [None] * info.world_size
    dist.all_gather_object(keys, key)
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}  # in order of first rank
    return [index[k] for k in keys]


def destinations(topk_ids: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[T, W] bool: token t has an expert on rank d (its row travels there once)."""
    owner = placement.owner(topk_ids.cpu())  # [T, K], -1 for empty slots
    dest = torch.zeros(topk_ids.shape[0], placement.world_size + 1, dtype=torch.bool)
    dest.scatter_(1, torch.where(owner >= 0, owner, placement.world_size), True)
    return dest[:, :-1]


def send_rows(topk_ids: torch.Tensor, placement: Placement, rank: int,
              nodes: list[int]) -> tuple[list[int], int]:
    """This rank's rows (token, destination rank) per destination [W], and the inter-node rows
    a dispatch that sends each token once per other destination node would send.

    Example: E=4 over W=2 ranks on two nodes, rank 0's ids [[0, 2], [2, 3], [-1, 1]]: rows
    ([2, 2], 2) (rank 0 gets tokens 0, 2; rank 1 gets tokens 0, 1, once each)."""
    W = placement.world_size
    dest = destinations(topk_ids, placement)
    other = {nodes[d] for d in range(W) if nodes[d] != nodes[rank]}
    hier = sum(int(dest[:, [d for d in range(W) if nodes[d] == n]].any(1).sum()) for n in other)
    return dest.sum(0).tolist(), hier


def traffic(topk_ids: torch.Tensor, placement: Placement, rank: int, nodes: list[int],
            group) -> dict:
    """``send_rows`` of every rank (collective): the [W, W] (source, destination) row matrix,
    its split into rows that stay on the rank, stay in the node or cross nodes, the two-stage
    dispatch's inter-node rows and the load imbalance (max / mean rows received per rank)."""
    W = placement.world_size
    row, hier = send_rows(topk_ids, placement, rank, nodes)
    # (collectives on the group's device: NCCL has no CPU tensors)
    matrix = torch.zeros(W, W + 1, dtype=torch.float64, device=topk_ids.device)
    matrix[rank] = torch.tensor([*row, hier], dtype=torch.float64)
    if W > 1:
        dist.all_reduce(matrix, group=group)
    matrix = matrix.cpu()
    m = matrix[:, :W]
    node_of = torch.tensor(nodes)
    same = node_of[:, None] == node_of[None, :]
    eye = torch.eye(W, dtype=torch.bool)
    recv = m.sum(0)
    return dict(matrix=m.tolist(), local_rows=float(m[eye].sum()),
                intra_node_rows=float(m[same & ~eye].sum()),
                inter_node_rows=float(m[~same].sum()), hier_inter_rows=float(matrix[:, W].sum()),
                imbalance=float(recv.max() / recv.mean()) if recv.sum() > 0 else 1.0)


def _node_groups(nodes: list[int]) -> dict[int, object]:
    """One process group per node (``new_group`` is collective: every rank makes all)."""
    return {n: dist.new_group([r for r, m in enumerate(nodes) if m == n])
            for n in sorted(set(nodes))}


def hier_probe(topk_ids, placement: Placement, info: WorkerInfo, nodes: list[int],
               node_groups: dict, x: torch.Tensor, cfg: dict) -> dict:
    """Raw collectives with this routing's row counts: the flat dispatch (one
    ``all_to_all_single`` carrying each token once per destination rank) against a two-stage
    one (each token once per other destination node, to the rank of the same local index there,
    then an ``all_to_all_single`` inside each node fans rows out to their ranks). Payload rows
    of H elements only; seconds per stage as lists over iterations."""
    W, rank = info.world_size, info.rank
    local = [r for r in range(W) if nodes[r] == nodes[rank]]
    L, N = len(local), len(set(nodes))
    if any(sum(1 for m in nodes if m == n) != L for n in set(nodes)):
        return {"skipped": "nodes of different sizes"}
    dest = destinations(topk_ids, placement)
    rank_in = {r: [q for q in range(W) if nodes[q] == nodes[r]].index(r) for r in range(W)}
    by_node = torch.zeros(topk_ids.shape[0], N, L, dtype=torch.bool)  # [T, node, local]
    for d in range(W):
        by_node[:, nodes[d], rank_in[d]] = dest[:, d]
    flat_send = dest.sum(0).tolist()
    # stage 1: to (m, my local index) for every other node m the token needs
    s1 = [0] * W
    for d in range(W):
        if nodes[d] != nodes[rank] and rank_in[d] == rank_in[rank]:
            s1[d] = int(by_node[:, nodes[d]].any(1).sum())
    # stage 2 counts: per (source rank, local dest) rows that the forwarder of this node fans out
    H, dev = x.shape[1], x.device  # (collectives on the group's device: NCCL has no CPU tensors)
    need = torch.zeros(N, L, dtype=torch.float64)  # my tokens needing (node, local) ...
    for m in range(N):  # ... counted once per node that receives them
        need[m] = by_node[:, m].sum(0).double()
    need = need.to(dev)
    everyone = [torch.zeros_like(need) for _ in range(W)]
    dist.all_gather(everyone, need)
    everyone = [t.cpu() for t in everyone]
    s2 = [0] * L  # rows this rank sends to each local rank of its node in stage 2
    for src in range(W):  # own tokens, and those forwarded to me from my local index elsewhere
        if src == rank or (nodes[src] != nodes[rank] and rank_in[src] == rank_in[rank]):
            s2 = [a + int(b) for a, b in zip(s2, everyone[src][nodes[rank]].tolist(),
                                             strict=True)]
    group = node_groups[nodes[rank]]
    counts = torch.tensor([flat_send, s1], dtype=torch.int64, device=dev)
    all_counts = [torch.zeros_like(counts) for _ in range(W)]
    dist.all_gather(all_counts, counts)
    all_counts = [c.cpu() for c in all_counts]
    flat_recv = [int(c[0, rank]) for c in all_counts]
    s1_recv = [int(c[1, rank]) for c in all_counts]
    s2_all = [torch.zeros(L, dtype=torch.int64, device=dev) for _ in range(L)]
    dist.all_gather(s2_all, torch.tensor(s2, dtype=torch.int64, device=dev), group=group)
    s2_recv = [int(c[rank_in[rank]]) for c in s2_all]

    def buf(n):
        return torch.empty(n, H, dtype=x.dtype, device=dev)

    fsend, frecv = buf(sum(flat_send)), buf(sum(flat_recv))
    h1s, h1r, h2s, h2r = buf(sum(s1)), buf(sum(s1_recv)), buf(sum(s2)), buf(sum(s2_recv))

    def flat():
        dist.all_to_all_single(frecv, fsend, flat_recv, flat_send)

    def stage1():
        dist.all_to_all_single(h1r, h1s, s1_recv, s1)

    def stage2():
        dist.all_to_all_single(h2r, h2s, s2_recv, s2, group=group)

    times: dict[str, list[float]] = {"flat": [], "two-stage network": [], "two-stage node": []}
    for it in range(cfg["warmup"] + cfg["iters"]):
        for name, fn in (("flat", flat), ("two-stage network", stage1),
                         ("two-stage node", stage2)):
            t = _timed(fn, dev, None)
            if it >= cfg["warmup"]:
                times[name].append(t)
    return dict(times=times, flat_rows=sum(flat_send), network_rows=sum(s1),
                node_rows=sum(s2))


def _bench_case(layer, x, info, group, cfg, graphed) -> dict:
    fns = {"eager": lambda: layer(x)}
    if graphed is not None:
        fns["graph"] = lambda: graphed(x)
    times: dict[str, list[float]] = {n: [] for n in fns}
    stages: dict[str, list[float]] = {}
    for it in range(cfg["warmup"] + cfg["iters"]):
        for name, fn in fns.items():
            t = _timed(fn, info.device, group)
            if it >= cfg["warmup"]:
                times[name].append(t)
        if group is not None:
            dist.barrier(group=group)
        trace = Trace()
        layer(x, trace=trace)
        if it >= cfg["warmup"]:
            for st, t in trace.times.items():
                stages.setdefault(st, []).append(t)
    return dict(times=times, stages=stages)


def default_backends(cfg: dict, info: WorkerInfo, dtype: torch.dtype, multinode: bool) -> dict:
    """The comm backends and experts this rank runs where --comm / --experts are not given,
    chosen from the rank's own device (``backends.default_experts`` / ``default_comm``): torch,
    plus symm where the defaults pick it (GPUs of one node; W = 1 too), and the Triton
    experts on GPUs. A rank spawned on the CPUs of a GPU host gets torch and the reference."""
    from rocm_moe import backends

    experts, why = (cfg["experts"], "--experts") if cfg["experts"] else \
        backends.default_experts(info.device, dtype=dtype)
    comm, comm_why = cfg["comm"], "--comm"
    if not comm:
        name, comm_why = backends.default_comm(max(2, info.world_size), info.device, multinode)
        comm = ["torch", "symm"] if name == "symm" else ["torch"]
        if name == "symm":
            comm_why += "; torch beside it as the baseline"
    return dict(cfg, comm=comm, comm_why=comm_why, experts=experts, experts_why=why)


def _bench_rank(info: WorkerInfo, cfg: dict) -> dict:
    from rocm_moe.graphs import GraphedEPMoE

    s = shape(cfg)
    dtype = getattr(torch, cfg["dtype"])
    nodes = node_layout(info)
    multinode = len(set(nodes)) > 1
    cfg = default_backends(cfg, info, dtype, multinode)
    node_groups = _node_groups(nodes) if multinode and cfg["hier_probe"] else None
    rows, refused, probes = [], {}, []
    n_stages = 2 if cfg.get("rebalance") else 1
    steps = Steps("rank 0: cases done", len(cfg["comm"]) * len(cfg["tokens"]) * len(cfg["skew"])
                  * len(cfg["weight_modes"]) * n_stages, enabled=info.rank == 0, every_s=0.0)
    layer = None
    for comm in cfg["comm"]:
        if comm == "symm" and len(set(nodes)) > 1:
            refused[comm] = (f"the group spans {len(set(nodes))} nodes; symm's puts are "
                             "peer-to-peer loads/stores inside one node")
            steps.total -= len(cfg["tokens"]) * len(cfg["skew"]) * len(cfg["weight_modes"]) \
                * n_stages
            continue
        for T in cfg["tokens"]:
            if layer is None:  # one set of weights, built once (DeepSeek-V3's take a while)
                layer = _build(cfg, s, comm, T, info, dtype, nodes)  # synthetic weights, seed 0
                if cfg["seed"]:
                    layer.reset_parameters(seed=cfg["seed"])
                base_gate = layer.gate.weight.detach().float().clone()
                initial = layer.replicas
            else:  # the same weights behind a dispatcher sized for this T
                from rocm_moe import backends

                layer.dispatcher = backends.make_dispatcher(
                    comm, layer.dispatcher.placement, info.rank, hidden_size=s["hidden"],
                    top_k=s["top_k"], dtype=dtype, max_tokens_per_rank=T, **_lanes(cfg, comm))
            group = layer.dispatcher.group if info.world_size > 1 else None
            for skew in cfg["skew"]:
                _set_skew(layer, skew, cfg, base_gate)
                x = _tokens(cfg, s, skew, T, info, dtype)
                routing = layer.route_tokens(x)
                if node_groups is not None and comm == cfg["comm"][0]:
                    probes.append(dict(tokens=T, skew=skew, **hier_probe(
                        routing.topk_ids, layer.dispatcher.placement, info, nodes, node_groups,
                        x, cfg)))
                stages = ["before", "after"] if cfg.get("rebalance") else [
                    "-" if layer.replicas is None else f"R={layer.replicas.num_redundant}"]
                for stage in stages:
                    if stage == "before":  # every skew starts from the same placement
                        if layer.replicas != initial:
                            layer.rebalance(initial.phys_to_log)
                        layer.reset_expert_load()
                    elif stage == "after":  # the load the layer counts in one forward of
                        layer.reset_expert_load()  # these tokens (graph warmups route zeros)
                        layer(x)
                        layer.rebalance(num_nodes=len(set(nodes)))
                    tr = traffic(layer.to_physical(routing.topk_ids), layer.dispatcher.placement,
                                 info.rank, nodes, group)
                    work = expert_work(layer, routing.topk_ids, group)
                    for mode in cfg["weight_modes"]:
                        split_bits = None
                        if mode == "overlap":  # split == unsplit, bit for bit
                            _set_mode(layer, cfg["weight_modes"][0], cfg)
                            unsplit = layer(x)
                            _set_mode(layer, mode, cfg)
                            split_bits = bool(torch.equal(layer(x), unsplit))
                        _set_mode(layer, mode, cfg)
                        use_graph = comm == "symm" and info.device.type == "cuda"
                        graphed = GraphedEPMoE(layer, buckets=(T,)) if use_graph else None
                        row = dict(comm=comm, tokens=T, skew=skew, mode=mode, rank=info.rank,
                                   eplb=stage, traffic=tr, work=work,
                                   **_bench_case(layer, x, info, group, cfg, graphed))
                        if graphed is not None:
                            row["graph_equals_eager"] = bool(torch.equal(graphed(x), layer(x)))
                            layer.dispatcher.check_peers()  # a timed-out barrier voids them
                        if split_bits is not None:
                            row["split_equals_unsplit"] = split_bits
                        rows.append(row)
                        del graphed
                        steps.what = f"rank 0: {comm} T={T} {skew} {mode} {stage} done, cases"
                        steps.step()
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
    return dict(rows=rows, refused=refused, nodes=nodes, probes=probes,
                device=str(info.device), comm=cfg["comm"], experts=cfg["experts"],
                comm_why=cfg["comm_why"], experts_why=cfg["experts_why"])


def _median_slowest(ranks: list[dict], get) -> float:
    series = [get(r) for r in ranks]
    n = min(len(x) for x in series)
    return statistics.median(max(x[j] for x in series) for j in range(n)) if n else 0.0


def summarise(per_rank: list[dict], cfg: dict) -> list[dict]:
    """One row per case: slowest-rank medians (us), tokens/s per GPU, traffic, imbalance."""
    s = shape(cfg)
    row_bytes = s["hidden"] * torch.empty((), dtype=getattr(torch, cfg["dtype"])).element_size()
    out = []
    for i, first in enumerate(per_rank[0]["rows"]):
        ranks = [r["rows"][i] for r in per_rank]
        row = {k: first[k] for k in ("comm", "tokens", "skew", "mode")}
        row["eplb"] = first.get("eplb", "-")
        for st in STAGES:
            if st in first["stages"]:
                row[f"{st} us"] = _median_slowest(ranks, lambda r, st=st: r["stages"][st]) * 1e6
        for name in first["times"]:
            row[f"{name} us"] = _median_slowest(ranks, lambda r, n=name: r["times"][n]) * 1e6
        best = row.get("graph us", row["eager us"])
        row["tokens/s/GPU"] = first["tokens"] / best * 1e6
        tr = first["traffic"]
        row.update({f"{k} MB": tr[f"{k}_rows"] * row_bytes / 1e6
                    for k in ("intra_node", "inter_node", "hier_inter")})
        row["imbalance"] = tr["imbalance"]
        if "work" in first:
            row["work max/mean"] = first["work"]["rank_max_mean"]
            row["expert max/mean"] = first["work"]["expert_max_mean"]
            row["work per rank"] = first["work"]["per_rank"]  # (JSON only: a list)
        if "graph_equals_eager" in first:
            row["graph == eager"] = all(r["graph_equals_eager"] for r in ranks)
        if "split_equals_unsplit" in first:
            row["split == unsplit"] = all(r["split_equals_unsplit"] for r in ranks)
        out.append(row)
    return out


def invariant_costs(rows: list[dict]) -> list[str]:
    """Per (comm, T, skew): the invariant mode's time over the first weight mode's (graph
    replay where there is one, else eager). Example: rows experts 100 us and invariant 120 us
    -> "... invariant 1.20x experts ..."."""
    out = []
    for inv in (r for r in rows if r["mode"] == "invariant"):
        base = next((r for r in rows if r["mode"] != "invariant" and all(
            r.get(k) == inv.get(k) for k in ("comm", "tokens", "skew", "eplb"))), None)
        if base is None:
            continue
        key = "graph us" if "graph us" in inv else "eager us"
        out.append(f"{inv['comm']} T={inv['tokens']} {inv['skew']}: invariant "
                   f"{inv[key] / base[key]:.2f}x {base['mode']} ({key[:-3]}: {inv[key]:.1f} vs "
                   f"{base[key]:.1f} us)")
    return out


def overlap_report(rows: list[dict], micro_batches: int = 2) -> list[str]:
    """Per (comm, T, skew, eplb) with an "overlap" row: the un-split layer's eager stage times
    (slowest rank, median), comm = dispatch + combine, experts, the layer's time un-split and
    split (graph replay where both have one, else eager) and the overlap efficiency = split
    time / max(comm, experts).

    Example: stages dispatch 300, experts 500, combine 300 us (comm 600), split layer 660 us
    -> "... efficiency 1.10x max(comm 600.0, experts 500.0) ..."."""
    out = []
    for ov in (r for r in rows if r["mode"] == "overlap"):
        base = next((r for r in rows if r["mode"] not in ("invariant", "overlap") and all(
            r.get(k) == ov.get(k) for k in ("comm", "tokens", "skew", "eplb"))), None)
        if base is None:
            continue
        st = {k: base.get(f"{k} us", 0.0) for k in ("route", "dispatch", "experts", "combine")}
        comm, experts = st["dispatch"] + st["combine"], st["experts"]
        key = "graph us" if "graph us" in ov and "graph us" in base else "eager us"
        bound = max(comm, experts)
        eff = f"{ov[key] / bound:.2f}x" if bound > 0 else "-"
        out.append(
            f"{ov['comm']} T={ov['tokens']} {ov['skew']}: eager stages "
            + " ".join(f"{k} {v:.1f}" for k, v in st.items())
            + f" us; comm {comm:.1f} us, experts {experts:.1f} us; layer ({key[:-3]}) "
            f"un-split {base[key]:.1f} us, micro_batches={micro_batches} {ov[key]:.1f} us "
            f"({ov[key] / base[key]:.2f}x); efficiency {eff} max(comm, experts) (target "
            f"<= 1.15); split == unsplit: {ov.get('split == unsplit', '-')}")
    return out


def eplb_effects(rows: list[dict]) -> list[str]:
    """Per (comm, T, skew, mode) run before and after a rebalance: the expert work's max / mean
    over the ranks and the layer's time (graph replay where there is one, else eager) before
    and after, and the time after over the same case's uniform routing before.

    Example: zipf work 2.00 -> 1.05 and 200 -> 110 us, uniform 100 us -> "... (after / before
    0.55x); after / uniform 1.10x"."""
    out = []
    for after in (r for r in rows if r.get("eplb") == "after"):
        same = ("comm", "tokens", "skew", "mode")
        before = next((r for r in rows if r.get("eplb") == "before"
                       and all(r[k] == after[k] for k in same)), None)
        if before is None:
            continue
        key = "graph us" if "graph us" in after else "eager us"
        line = (f"{after['comm']} T={after['tokens']} {after['skew']} {after['mode']}: work "
                f"max/mean {before['work max/mean']:.2f} -> {after['work max/mean']:.2f}, "
                f"{key[:-3]} {before[key]:.1f} -> {after[key]:.1f} us (after / before "
                f"{after[key] / before[key]:.2f}x)")
        uniform = next((r for r in rows if r.get("eplb") == "before" and r["skew"] == "uniform"
                        and all(r[k] == after[k] for k in ("comm", "tokens", "mode"))), None)
        if uniform is not None and after["skew"] != "uniform":
            line += f"; after / uniform {after[key] / uniform[key]:.2f}x"
        out.append(line)
    return out


def summarise_probes(per_rank: list[dict]) -> list[dict]:
    """Flat against two-stage dispatch (slowest rank, median, us) per (T, skew)."""
    out = []
    for i, first in enumerate(per_rank[0]["probes"]):
        if "skipped" in first:
            out.append(dict(tokens=first["tokens"], skew=first["skew"], **first))
            continue
        ranks = [r["probes"][i] for r in per_rank]
        row = dict(tokens=first["tokens"], skew=first["skew"])
        for name in first["times"]:
            row[f"{name} us"] = _median_slowest(ranks, lambda r, n=name: r["times"][n]) * 1e6
        row["two-stage / flat"] = (row["two-stage network us"] + row["two-stage node us"]) \
            / row["flat us"]
        for k in ("flat_rows", "network_rows", "node_rows"):
            row[k] = sum(r[k] for r in ranks)
        out.append(row)
    return out


def _plot(rows: list[dict], path: Path, title: str) -> str:
    from rocm_moe.benchmarks import NO_PLOT, pyplot

    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    cases = sorted({(r["comm"], r["skew"], r["mode"], r.get("eplb", "-")) for r in rows})
    for case in cases:
        pts = [r for r in rows if (r["comm"], r["skew"], r["mode"], r.get("eplb", "-")) == case]
        ax.plot([r["tokens"] for r in pts], [r["tokens/s/GPU"] for r in pts], "o-",
                label=" ".join(case))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("tokens/s per GPU (whole layer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    T = max(r["tokens"] for r in rows)
    big = [r for r in rows if r["tokens"] == T]
    left = [0.0] * len(big)
    for st in STAGES:
        vals = [r.get(f"{st} us", 0.0) for r in big]
        bx.barh(range(len(big)), vals, left=left, label=st)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    bx.set_yticks(range(len(big)), [f"{r['comm']} {r['skew']} {r['mode']} {r.get('eplb', '-')}"
                                    for r in big],
                  fontsize=7)
    bx.set_xlabel(f"us per stage at {T} tokens/rank (eager, slowest rank)")
    bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """--model and its shape overrides (``shape``), shared by bench layer and bench model."""
    p.add_argument("--model", choices=list(MODELS), default="qwen3-30b-a3b")
    p.add_argument("--num-experts", type=argtypes.positive_int, default=None,
                   help="override the model's E")
    p.add_argument("--hidden", type=argtypes.positive_int, default=None,
                   help="override the model's H")
    p.add_argument("--intermediate", type=argtypes.positive_int, default=None,
                   help="override the model's I")
    p.add_argument("--top-k", type=argtypes.positive_int, default=None,
                   help="override the model's K")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --warmup, --iters, --seed, shared by bench layer and bench model."""
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=argtypes.nonnegative_int, default=3)
    p.add_argument("--iters", type=argtypes.positive_int, default=20)
    p.add_argument("--seed", type=argtypes.seed_int, default=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``rocm-moe bench layer``)."""
    p.add_argument("--world-size", type=argtypes.positive_int, default=None,
                   help="ranks to spawn (default: one per GPU, else 2); ignored under torchrun")
    add_shape_arguments(p)
    p.add_argument("--shared-intermediate", type=argtypes.nonnegative_int, default=None,
                   help="override the model's shared expert size (0: none, where the model "
                   "has one)")
    p.add_argument("--tokens", type=argtypes.positive_int, nargs="+", default=[1, 128, 4096, 16384],
                   help="tokens per rank")
    p.add_argument("--comm", nargs="+", default=None, choices=["torch", "symm", "mori"],
                   help="comm backends (default: torch, and symm on ranks on the GPUs of one "
                   "node)")
    p.add_argument("--experts", default=None, choices=backends.names("experts"),
                   help="experts backend (default: triton on ranks on GPUs, reference on CPU "
                   "ranks, even on a GPU host)")
    p.add_argument("--weight-modes", nargs="+", default=["experts"],
                   choices=["experts", "combine"])
    p.add_argument("--invariant", action="store_true",
                   help="also time the layer with invariant=True (mode 'invariant') in the run")
    p.add_argument("--overlap", action="store_true",
                   help="also time the layer with --micro-batches micro-batches (mode "
                   "'overlap': comm on a side stream) and print the overlap report")
    p.add_argument("--micro-batches", type=argtypes.positive_int, default=2,
                   action=argtypes.Given,
                   help="with --overlap: micro-batches of the overlapped layer (>= 2)")
    p.add_argument("--skew", nargs="+", default=["uniform"], choices=["uniform", "zipf"])
    p.add_argument("--zipf-tau", type=argtypes.finite_nonnegative_float, default=1.0,
                   action=argtypes.Given,
                   help="hot-expert strength: logit bias tau * log(1 / rank_e)")
    p.add_argument("--skew-scale", type=argtypes.finite_positive_float, default=4.0,
                   action=argtypes.Given,
                   help="size of the tokens' common component that carries the bias")
    p.add_argument("--redundant-experts", type=argtypes.nonnegative_int, default=None,
                   help="EPLB: R redundant experts (E + R divisible by the ranks; 0: no "
                   "replicas, placement still movable); default: no EPLB")
    p.add_argument("--replica-choice", choices=["spread", "local"], default="spread",
                   help="with --redundant-experts: a (token, slot) picks among all replicas "
                   "evenly, or a replica on its own rank / node first")
    p.add_argument("--rebalance", action="store_true",
                   help="with --redundant-experts: time each case before and after a "
                   "rebalance from the measured load")
    p.add_argument("--hier-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="across nodes: time a flat against a two-stage dispatch's collectives")
    add_run_arguments(p)
    p.add_argument("--out", type=argtypes.output_dir, default="bench/results",
                   help="folder for the JSON and the PNG")
    p.add_argument("--name", type=argtypes.file_stem, default=None,
                   help="file stem (default: layer_<model>_W<N>)")


def check_shape_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--top-k against --num-experts (or the model's), before any rank starts (the router
    failed inside every rank)."""
    s = shape(vars(args))
    if s["top_k"] > s["num_experts"]:
        parser.error(f"--top-k {s['top_k']}: must be <= the {s['num_experts']} experts (each "
                     "token picks K distinct experts)")


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from rocm_moe.backends import BACKENDS

    def availability(kind: str, name: str) -> str | None:
        return BACKENDS[f"{kind}:{name}"].availability()

    # numbers and paths: checked by their argparse types (rocm_moe.cli.argtypes)
    # --comm / --experts not given: each rank picks them from its own device (default_backends)
    check_shape_args(args, parser)
    if getattr(args, "rebalance", False) and args.redundant_experts is None:
        parser.error("--rebalance needs --redundant-experts R (R = 0: rebalance without "
                     "replicas)")
    R = getattr(args, "redundant_experts", None)
    W = getattr(args, "world_size", None)
    if R is not None and W is not None and not under_torchrun():
        E = shape(vars(args))["num_experts"]
        if (E + R) % W:
            parser.error(f"--redundant-experts {R}: E + R = {E + R} must be divisible by the "
                         f"{W} ranks (each holds (E + R) / W physical experts); use R = "
                         f"{-E % W} + a multiple of {W}")
    given = argtypes.given(args)  # flags that only mean something with another one
    for flag, needs, on in (("--micro-batches", "--overlap", getattr(args, "overlap", False)),
                            ("--zipf-tau", "--skew zipf", "zipf" in getattr(args, "skew", ())),
                            ("--skew-scale", "--skew zipf", "zipf" in getattr(args, "skew", ()))):
        if flag in given and not on:
            parser.error(f"{flag} only applies with {needs} (it would be ignored): add "
                         f"{needs} or drop {flag}")
    if getattr(args, "invariant", False) and "invariant" not in args.weight_modes:
        args.weight_modes = [*args.weight_modes, "invariant"]
    if getattr(args, "overlap", False):
        if args.micro_batches < 2:
            parser.error(f"--micro-batches {args.micro_batches}: the overlapped layer needs >= "
                         "2 (1 is the un-split layer, timed anyway)")
        if "overlap" not in args.weight_modes:
            args.weight_modes = [*args.weight_modes, "overlap"]
    for kind, names in (("comm", args.comm or []), ("experts", [args.experts] if args.experts
                                                     else [])):
        for name in names:
            if (reason := availability(kind, name)) is not None:
                parser.error(f"--{kind} {name} cannot run here: {reason}")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run it with parsed ``args``; ``parser`` reports a machine that cannot run it."""
    _check(args, parser)
    cfg = vars(args)
    if under_torchrun():
        info = init_from_env(timeout_s=900)
        try:
            mine = _bench_rank(info, cfg)
            results: list = [None] * info.world_size
            dist.all_gather_object(results, mine)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if info.rank != 0:
            return 0
        W = info.world_size
    else:
        W = args.world_size or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
        progress(f"starting {W} ranks")
        results = launch(W, _bench_rank, cfg, timeout_s=900)
    return report(results, cfg, W)


def report(results: list[dict], cfg: dict, W: int) -> int:
    from rich.console import Console
    from rich.table import Table

    from rocm_moe.backends import device_description

    cfg = dict(cfg, comm=results[0]["comm"], experts=results[0]["experts"])  # as the ranks ran
    rows = summarise(results, cfg)
    nodes = results[0]["nodes"]
    layout = f"{len(set(nodes))} node(s): " + " ".join(
        f"n{n}:[{','.join(str(r) for r in range(W) if nodes[r] == n)}]"
        for n in sorted(set(nodes)))
    s = shape(cfg)
    device = device_description()
    title = (f"EPMoE forward, {cfg['model']} E={s['num_experts']} H={s['hidden']} "
             f"I={s['intermediate']} K={s['top_k']} shared={s['shared_intermediate']} "
             f"{cfg['dtype']}, experts={cfg['experts']} ({results[0]['experts_why']}), "
             f"W={W}, {layout}, {device}")
    console = Console(width=220)
    table = Table(title=title, title_justify="left")
    keys = [k for k in rows[0] if k not in ("comm", "tokens", "skew", "mode")
            and not isinstance(rows[0][k], list)] if rows else []
    for c in ["comm", "T/rank", "skew", "mode", *keys]:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["comm"], str(r["tokens"]), r["skew"], r["mode"],
                      *[_fmt(r.get(k)) for k in keys])
    console.print(table)
    r0 = results[0]
    console.print(f"backends: comm {', '.join(r0['comm'])} ({r0['comm_why']}), experts "
                  f"{r0['experts']} ({r0['experts_why']})", markup=False)
    for line in invariant_costs(rows):
        console.print(line)
    for line in overlap_report(rows, cfg.get("micro_batches", 2)):
        console.print(f"overlap: {line}", markup=False, soft_wrap=True)  # one line each
    for line in eplb_effects(rows):
        console.print(f"rebalance: {line}", markup=False)
    probes = summarise_probes(results)
    if probes:
        pt = Table(title="dispatch collectives across nodes: flat all_to_all vs two-stage "
                   "(network hop to the same local rank, then inside the node)",
                   title_justify="left")
        pkeys = [k for k in probes[0] if k not in ("tokens", "skew")]
        for c in ["T/rank", "skew", *pkeys]:
            pt.add_column(c, justify="right")
        for r in probes:
            pt.add_row(str(r["tokens"]), r["skew"], *[_fmt(r.get(k)) for k in pkeys])
        console.print(pt)
    for comm, why in results[0]["refused"].items():
        console.print(f"{comm}: not run: {why}")
    stem = cfg["name"] or f"layer_{cfg['model']}_W{W}"
    path = write_json(cfg["out"], stem, device=device, world_size=W, nodes=nodes, shape=s,
                      config=cfg, refused=results[0]["refused"], summary=rows, hier_probe=probes)
    console.print(f"json: {path}")
    if rows:
        console.print(_plot(rows, path.with_suffix(".png"), title))
    return 0


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if v < 100 else f"{v:,.0f}"
    return str(v)
