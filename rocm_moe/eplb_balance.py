"""Expert-parallel load balancing (EPLB): where each physical expert goes.

Given the measured load of every logical expert (tokens routed to it, per layer), choose
``P = num_physical`` physical experts (``P - E`` of them redundant replicas of hot experts) and
their ranks, so that the most loaded rank carries as little as possible. The answer is one table
per layer, ``phys_to_log_P`` (int64 [P]): physical expert p holds the weights of logical expert
``phys_to_log_P[p]`` and lives on rank ``p // (P / W)`` (ranks own contiguous slices of P
physical experts, P / W each). Every logical expert has at least one replica; a logical expert
with c replicas is assumed to send each of them load / c (the replica choice in the layer
spreads its tokens evenly).

Shape letters: L layers, E logical experts, P physical experts, W ranks (GPUs), N nodes,
G expert groups (DeepSeek-V3's router picks from G = 8 groups of E / G experts).

Two balancers with one interface, both hierarchical and deterministic (ties go to the lower
id, so every rank computes the same table from the same load):

- ``deepseek_rules``: the reference, the published DeepSeek EPLB rule set (deepseek-ai/EPLB,
  also vLLM's default policy and SGLang's ``deepseek`` algorithm), written here from its
  description:
    1. pack the G groups onto the N nodes, G / N per node, heaviest group first onto the
       lightest node that still has room (skipped unless G is a multiple of N; then the whole
       world is one node and one group);
    2. on each node, give its P / N - E / N redundant slots one at a time to the logical expert
       whose load per replica is the largest;
    3. on each node, pack its P / N physical experts (load / replicas each) onto its W / N GPUs,
       P / W per GPU, by the same heaviest-first, lightest-room rule.
- ``rebalance``: the same three steps, each followed by a refinement pass, and never worse
  than ``deepseek_rules`` on max / mean rank load (it keeps the better of the two):
    1'. group swaps: while swapping a group of the heaviest node with a group of another node
        lowers the larger of the two nodes' loads, do the best such swap;
    3'. physical-expert swaps: while swapping a physical expert of the heaviest rank with one of
        another rank of the same node lowers the larger of the two ranks' loads, do the best
        such swap (swaps stay inside a node, so groups stay on their node).
  Both passes only ever lower the largest load, so the result is at most the rules' own.

``rank_loads`` gives the per-rank load of a table and ``max_over_mean`` its imbalance.

Example (E = 4 experts, one hot, 2 ranks, 2 physical experts per rank)::

    >>> rebalance(torch.tensor([6.0, 1.0, 1.0, 0.0]), num_physical=4, num_ranks=2).tolist()
    [0, 3, 1, 2]

    rank 0 holds experts 0 and 3 (load 6), rank 1 holds 1 and 2 (load 2). With two redundant
    slots (num_physical=6, 3 per rank) both go to expert 0 (three replicas of load 2) and the
    table is [0, 0, 3, 0, 1, 2]: both ranks carry 4.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from rocm_moe._checks import check_integer_value, describe, error_message

_LOAD_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Geometry:
    """The checked sizes of one balancing problem."""

    E: int  # logical experts
    P: int  # physical experts
    W: int  # ranks
    N: int  # nodes used by the hierarchy (1 when G is not a multiple of the nodes)
    G: int  # groups used by the hierarchy (1 when G is not a multiple of the nodes)

    @property
    def per_rank(self) -> int:
        return self.P // self.W


# ----------------------------------------------------------------------------------- checks


def _check_load(field: str, load: object) -> torch.Tensor:
    """[E] or [L, E] finite, non-negative load -> [L, E] float64 on the CPU."""
    if not isinstance(load, torch.Tensor):
        raise TypeError(error_message(field, describe(load), "must be a torch.Tensor of "
                                      "per-expert loads", "pass e.g. torch.tensor(counts_E)"))
    if load.dtype not in _LOAD_DTYPES:
        raise TypeError(error_message(f"{field}.dtype", load.dtype, "must be an integer or "
                                      "floating dtype (token counts or fractions)",
                                      f"convert with {field}.to(torch.float64)"))
    if load.dim() not in (1, 2) or load.shape[-1] == 0 or load.numel() == 0:
        raise ValueError(error_message(f"{field}.shape", list(load.shape), "must be [E] or "
                                       "[L, E] with E >= 1 and L >= 1",
                                       "pass one load per logical expert (per layer)"))
    w = load.detach().to("cpu", torch.float64)
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        where = [int(i) for i in (~finite).nonzero()[0]]
        raise ValueError(error_message(field, f"holds {w[~finite][0].item()} at {where}",
                                       "loads must be finite", "pass measured token counts"))
    if bool((w < 0).any()):
        where = [int(i) for i in (w < 0).nonzero()[0]]
        raise ValueError(error_message(field, f"holds {w[w < 0][0].item()} at {where}",
                                       "loads must be >= 0", "pass measured token counts"))
    return w.reshape(-1, w.shape[-1])


def _check_geometry(E: int, num_physical: object, num_ranks: object, num_nodes: object,
                    num_groups: object) -> _Geometry:
    check_integer_value("num_physical", num_physical, minimum=E,
                        fix=f"pass at least one physical expert per logical expert (E={E}): "
                        "num_physical = E + redundant experts")
    check_integer_value("num_ranks", num_ranks, minimum=1, fix="pass the EP world size")
    check_integer_value("num_nodes", num_nodes, minimum=1, fix="pass 1 for one node")
    check_integer_value("num_groups", num_groups, minimum=1, fix="pass 1 for no groups")
    if num_physical % num_ranks:
        raise ValueError(error_message(
            "num_physical", num_physical, f"must be a multiple of num_ranks={num_ranks} (every "
            "rank holds the same number of physical experts)",
            f"pick num_physical = {-(-num_physical // num_ranks) * num_ranks} (or another "
            "multiple)"))
    if num_ranks % num_nodes:
        raise ValueError(error_message(
            "num_nodes", num_nodes, f"must divide num_ranks={num_ranks} (every node has the "
            "same number of ranks)", "pass the number of nodes of the EP group"))
    if E % num_groups:
        raise ValueError(error_message(
            "num_groups", num_groups, f"must divide the number of logical experts E={E}",
            "pass the router's group count (DeepSeek-V3: 8), or 1"))
    if num_groups % num_nodes:  # the published rule: no hierarchy then, one node, one group
        return _Geometry(E, num_physical, num_ranks, 1, 1)
    return _Geometry(E, num_physical, num_ranks, num_nodes, num_groups)


# ------------------------------------------------------------------------ shared pieces


def _pack_heaviest_first(weights: list[float], num_packs: int) -> list[list[int]]:
    """Items to packs, len(weights) / num_packs each: heaviest item first (ties: lower id)
    onto the lightest pack with room (ties: lower pack). Each pack lists its items in the
    order they arrived."""
    per_pack = len(weights) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    totals = [0.0] * num_packs
    for item in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        pack = min((p for p in range(num_packs) if len(packs[p]) < per_pack),
                   key=lambda p: (totals[p], p))
        packs[pack].append(item)
        totals[pack] += weights[item]
    return packs


def _replicate(weights: list[float], num_physical: int, spare: int = 0
               ) -> tuple[list[int], list[int]]:
    """One replica per item, then each extra replica to the item with the largest load per
    replica (ties: lower id); the last ``spare`` extra replicas instead go to the item with the
    smallest load per replica, then the fewest replicas (ties: lower id): they carry almost
    nothing, so the hot items' replica counts can suit the packing. Returns (physical -> item:
    the items in order, then the extra replicas in the order they were given; replicas per
    item)."""
    count = [1] * len(weights)
    phys = list(range(len(weights)))
    hot = [(-w, i) for i, w in enumerate(weights)]
    heapq.heapify(hot)
    for _ in range(num_physical - len(weights) - spare):
        _, i = heapq.heappop(hot)
        phys.append(i)
        count[i] += 1
        heapq.heappush(hot, (-weights[i] / count[i], i))
    cold = [(weights[i] / count[i], count[i], i) for i in range(len(weights))]
    heapq.heapify(cold)
    for _ in range(spare):
        _, _, i = heapq.heappop(cold)
        phys.append(i)
        count[i] += 1
        heapq.heappush(cold, (weights[i] / count[i], count[i], i))
    return phys, count


def _refine_swaps(items: list[list[int]], weights: list[float]) -> list[list[int]]:
    """Swap items between the heaviest pack and another pack while the best swap lowers the
    larger of the two packs' loads below the heaviest load; every swap lowers the sorted load
    vector, so this ends. Packs keep their sizes and slot order."""
    if len(items) < 2:
        return items
    w_PS = torch.tensor([[weights[i] for i in pack] for pack in items], dtype=torch.float64)
    idx_PS = torch.tensor(items, dtype=torch.int64)
    S = w_PS.shape[1]
    tol = 1e-12 * max(float(w_PS.sum()), 1e-300)
    for _ in range(64 * w_PS.numel()):
        load = w_PS.sum(1)
        h = int(torch.argmax(load))  # the first of the heaviest
        delta = w_PS[h][None, :, None] - w_PS[:, None, :]  # [packs, S, S]: leaves h, arrives
        worse = torch.maximum(load[h] - delta, load[:, None, None] + delta)
        worse[h] = torch.inf
        worse = torch.where(delta > 0, worse, torch.inf)
        best = int(torch.argmin(worse.flatten()))  # the first of the best swaps
        if not float(worse.flatten()[best]) < float(load[h]) - tol:
            break
        pack, ij = divmod(best, S * S)
        i, j = divmod(ij, S)
        w_PS[h, i], w_PS[pack, j] = w_PS[pack, j].clone(), w_PS[h, i].clone()
        idx_PS[h, i], idx_PS[pack, j] = idx_PS[pack, j].clone(), idx_PS[h, i].clone()
    return idx_PS.tolist()


def _place_node(w_E: list[float], logical: list[int], num_physical: int, num_ranks: int,
                *, refine: bool, spare: int = 0) -> tuple[list[int], float]:
    """Steps 2 and 3 (3' when ``refine``) on one node: its logical experts -> its slice of
    the table (``num_physical`` entries over ``num_ranks`` ranks), and its heaviest rank's
    load."""
    phys, count = _replicate([w_E[e] for e in logical], num_physical, spare)
    per_phys = [w_E[logical[m]] / count[m] for m in phys]
    packs = _pack_heaviest_first(per_phys, num_ranks)
    if refine:
        packs = _refine_swaps(packs, per_phys)
    heaviest = max(sum(per_phys[q] for q in pack) for pack in packs)
    return [logical[phys[q]] for pack in packs for q in pack], heaviest


def _solve_layer(w_E: list[float], geo: _Geometry, *, refine: bool) -> list[int]:
    """One layer's physical -> logical table by the three hierarchical steps: the published
    rules when ``refine`` is False; rocm_moe's when True (module docstring)."""
    E, N, G = geo.E, geo.N, geo.G
    group_size = E // G
    group_load = [sum(w_E[g * group_size:(g + 1) * group_size]) for g in range(G)]
    packings = [_pack_heaviest_first(group_load, N)]  # the rules' packing first: ties keep it
    if refine and N > 1:
        swapped = _refine_swaps(packings[0], group_load)
        if swapped != packings[0]:
            packings.append(swapped)
    ranks_per_node, phys_per_node = geo.W // N, geo.P // N
    spares = range(min(phys_per_node - E // N, ranks_per_node - 1) + 1) if refine else [0]
    tol = 1e-12 * sum(w_E)  # a candidate replaces an earlier one only if clearly lighter
    best: tuple[float, list[int]] | None = None
    for groups_of_node in packings:
        table: list[int] = []
        heaviest = 0.0
        for node in range(N):
            logical = [g * group_size + j for g in groups_of_node[node]
                       for j in range(group_size)]
            part: tuple[list[int], float] | None = None
            for s in spares:  # spare = 0 first: the rules' own replication
                cand = _place_node(w_E, logical, phys_per_node, ranks_per_node, refine=refine,
                                   spare=s)
                if part is None or cand[1] < part[1] - tol:
                    part = cand
            table += part[0]
            heaviest = max(heaviest, part[1])
        if best is None or heaviest < best[0] - tol:
            best = (heaviest, table)
    return best[1]


def _balance(load_E: object, num_physical: object, num_ranks: object, num_nodes: object,
             num_groups: object, *, refine: bool) -> torch.Tensor:
    w_LE = _check_load("load_E", load_E)
    geo = _check_geometry(w_LE.shape[1], num_physical, num_ranks, num_nodes, num_groups)
    table_LP = torch.tensor([_solve_layer(row, geo, refine=refine) for row in w_LE.tolist()],
                            dtype=torch.int64)
    return table_LP[0] if load_E.dim() == 1 else table_LP


# ------------------------------------------------------------------------------- public


def deepseek_rules(load_E: torch.Tensor, *, num_physical: int, num_ranks: int,
                   num_nodes: int = 1, num_groups: int = 1) -> torch.Tensor:
    """The reference: DeepSeek's published EPLB rules (module docstring, steps 1-3).

    ``load_E``: [E] or [L, E] per-logical-expert load (token counts or fractions; any integer or
    floating dtype, finite, >= 0; any device). Returns int64 [P] (or [L, P]) on the CPU:
    physical expert p holds logical expert ``out[p]`` and lives on rank p // (P / W).
    ``num_groups`` = the router's expert groups; the hierarchy (groups to nodes) applies when
    it is a multiple of ``num_nodes``, otherwise the world is treated as one node.
    """
    return _balance(load_E, num_physical, num_ranks, num_nodes, num_groups, refine=False)


def rebalance(load_E: torch.Tensor, *, num_physical: int, num_ranks: int,
              num_nodes: int = 1, num_groups: int = 1) -> torch.Tensor:
    """rocm_moe's balancer: the published rules plus group swaps, spare replicas and
    physical-expert swaps (module docstring); never worse than ``deepseek_rules`` on the
    heaviest rank's load. Same arguments and result as ``deepseek_rules``; deterministic
    (ties go to the lower id)."""
    return _balance(load_E, num_physical, num_ranks, num_nodes, num_groups, refine=True)


def rank_loads(load_E: torch.Tensor, phys_to_log_P: torch.Tensor,
               num_ranks: int) -> torch.Tensor:
    """Per-rank load of a placement: float64 [W] (or [L, W] for [L, E] loads with [L, P]
    tables), each logical expert's load split evenly over its replicas, rank r holding
    physical experts [r * P / W, (r + 1) * P / W).

    Example: ``rank_loads(torch.tensor([6., 1., 1., 0.]), torch.tensor([0, 1, 0, 2, 3, 0]),
    2)`` is ``[5., 3.]`` (expert 0 has three replicas of 2 each).
    """
    w_LE = _check_load("load_E", load_E)
    L, E = w_LE.shape
    check_integer_value("num_ranks", num_ranks, minimum=1, fix="pass the EP world size")
    if not isinstance(phys_to_log_P, torch.Tensor):
        raise TypeError(error_message("phys_to_log_P", describe(phys_to_log_P), "must be a "
                                      "torch.Tensor", "pass the table rebalance() returned"))
    if phys_to_log_P.dtype.is_floating_point or phys_to_log_P.dtype in (torch.bool,
                                                                        torch.complex64,
                                                                        torch.complex128):
        raise TypeError(error_message("phys_to_log_P.dtype", phys_to_log_P.dtype, "must be "
                                      "an integer dtype (logical expert ids)",
                                      "pass the table rebalance() returned (int64)"))
    want = [phys_to_log_P.shape[-1]] if load_E.dim() == 1 else [L, phys_to_log_P.shape[-1]]
    if list(phys_to_log_P.shape) != want or phys_to_log_P.shape[-1] == 0:
        raise ValueError(error_message("phys_to_log_P.shape", list(phys_to_log_P.shape),
                                       "must be [P] for an [E] load, [L, P] for an [L, E] load "
                                       f"(load_E is {list(load_E.shape)}), P >= 1",
                                       "pass the table computed from this load"))
    table_LP = phys_to_log_P.detach().to("cpu", torch.int64).reshape(L, -1)
    P = table_LP.shape[1]
    if P % num_ranks:
        raise ValueError(error_message("phys_to_log_P.shape[-1]", P, f"must be a multiple of "
                                       f"num_ranks={num_ranks}", "pass the EP world size the "
                                       "table was made for"))
    if int(table_LP.min()) < 0 or int(table_LP.max()) >= E:
        raise ValueError(error_message("phys_to_log_P", f"holds {int(table_LP.min())}.."
                                       f"{int(table_LP.max())}", f"ids must lie in [0, {E})",
                                       "pass a table for this expert count"))
    count_LE = torch.zeros(L, E, dtype=torch.float64).scatter_add_(
        1, table_LP, torch.ones_like(table_LP, dtype=torch.float64))
    if bool((count_LE == 0).any()):
        layer, e = (int(i) for i in (count_LE == 0).nonzero()[0])
        raise ValueError(error_message("phys_to_log_P", f"has no replica of logical expert {e}"
                                       f" (layer {layer})", "every logical expert needs at "
                                       "least one physical expert", "pass a complete table"))
    per_phys_LP = (w_LE / count_LE).gather(1, table_LP)
    loads_LW = per_phys_LP.reshape(L, num_ranks, P // num_ranks).sum(-1)
    return loads_LW[0] if load_E.dim() == 1 else loads_LW


def max_over_mean(loads_W: torch.Tensor) -> torch.Tensor:
    """Imbalance of per-rank loads [W] (or [L, W]): max / mean, float64 (0-d, or [L]);
    1.0 where every rank carries nothing (nothing to balance)."""
    if not isinstance(loads_W, torch.Tensor) or loads_W.dim() not in (1, 2) \
            or loads_W.shape[-1] == 0:
        raise TypeError(error_message("loads_W", describe(loads_W), "must be a [W] or [L, W] "
                                      "tensor", "pass rank_loads(...)"))
    if loads_W.is_complex() or loads_W.dtype == torch.bool or (loads_W.numel() and not bool(
            (torch.isfinite(loads_W) & (loads_W >= 0)).all())):  # ([nan, 1] read as balanced)
        raise ValueError(error_message("loads_W", loads_W.tolist()[:8], "must be finite, real "
                                       "loads >= 0", "pass rank_loads(...) of a measured load"))
    w = loads_W.to(torch.float64)
    mean, top = w.mean(-1), w.max(-1).values
    return torch.where(mean > 0, top / torch.where(mean > 0, mean, 1.0), 1.0)


def imbalance(load_E: torch.Tensor, phys_to_log_P: torch.Tensor, num_ranks: int
              ) -> torch.Tensor:
    """max / mean of ``rank_loads(load_E, phys_to_log_P, num_ranks)``."""
    return max_over_mean(rank_loads(load_E, phys_to_log_P, num_ranks))
