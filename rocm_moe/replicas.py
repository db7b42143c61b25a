"""Redundant experts: E logical experts held as P = E + R physical experts, some of them copies.

Letters: E logical experts (the router's), P physical experts (what the ranks hold), R = P - E
redundant ones, W ranks, e = P / W physical experts per rank, C = R + 1 the most replicas one
logical expert can have, T tokens, K slots.

``ReplicatedPlacement`` is one immutable table, ``phys_to_log`` [P]: physical expert p holds
the weights of logical expert ``phys_to_log[p]``; physical experts [r * e, (r + 1) * e) live on
rank r (the contiguous ``Placement`` of P experts, which comm and the experts backends already
understand, with ``ExpertMap`` / ``ExpertMask`` of physical ids). Every logical expert has at
least one replica. From it: ``log_to_phys`` [E, C] (replicas in increasing physical id, -1
padded), ``replica_count`` [E].

The layer keeps the router, comm and experts as they are and maps ids between route and
dispatch: each (token, slot) of logical expert g goes to ONE replica of g, chosen on the
device (``ReplicaChoice``: two table lookups, no host read, fixed shapes, so a CUDA graph
captures it and a rebalance updates the tables in place): replica ``(t + k + rank) mod
replica_count[g]`` of slot k of token t ("spread", the default: every rank's slots spread
evenly over all the replicas, so each carries 1 / count of the expert's load, as the balancing
algorithm assumes), or with ``choice="local"`` among the replicas on the token's own rank
where there are any, else on its node (``nodes``), else all of them (fewer rows leave the rank,
but a replica then carries one rank's tokens, whose count varies: on bench layer's zipf
routing at W = 4, E = 128, K = 8, R = 32, T = 256 per rank, with eplb_balance's table, the
ranks' work max / mean is 1.051 local against 1.016 spread). Distinct
logical experts have distinct replicas, so a token's rows stay unique and weighting stays
exactly-once.

Worked example (a test asserts it): E = 3, W = 2, ``phys_to_log = [0, 1, 2, 0]`` (logical 0 has
a replica on each rank): ``log_to_phys = [[0, 3], [1, -1], [2, -1]]``, ``replica_count =
[2, 1, 1]``; rank 1 sends its tokens' logical ids [[0, 1]] to physical [[3, 1]] (its own
replica of 0), rank 0 sends them to [[0, 1]].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from rocm_moe._checks import check_integer, check_integer_value, describe, error_message
from rocm_moe.placement import ExpertMap, ExpertMask, Placement

_FIX = "pass rocm_moe.eplb_balance.rebalance(...)'s result, or ReplicatedPlacement.initial"


@dataclass(frozen=True, eq=False)
class ReplicatedPlacement:
    """[P] int64 ``phys_to_log`` over ``world_size`` ranks (see the module docstring).

    ``num_experts`` (E) defaults to ``max(phys_to_log) + 1``; pass it to catch a table that
    leaves out the highest logical experts. The table is copied (to the CPU, int64): later
    changes of the caller's tensor do not reach it."""

    phys_to_log: torch.Tensor
    world_size: int
    num_experts: int | None = None

    def __post_init__(self) -> None:
        t = self.phys_to_log
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() \
                or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(error_message(
                "phys_to_log", describe(t), "must be a 1-D integer tensor [P] of logical "
                "expert ids (a float would be truncated)", _FIX))
        check_integer_value("world_size", self.world_size, minimum=1)
        if t.is_meta:
            raise ValueError(error_message("phys_to_log.device", t.device, "holds no data "
                                           "(a meta tensor)", _FIX))
        t = t.detach().to("cpu", torch.int64).clone()
        P, W = t.numel(), self.world_size
        if P == 0 or P % W:
            raise ValueError(error_message(
                "phys_to_log.shape", [P], f"P must be a positive multiple of world_size={W} "
                "(rank r holds physical experts [r*P/W, (r+1)*P/W))",
                "choose num_redundant_experts so that E + R is divisible by the EP size"))
        E = int(t.max()) + 1 if self.num_experts is None else self.num_experts
        check_integer_value("num_experts", E, minimum=1)
        if int(t.min()) < 0 or int(t.max()) >= E:
            raise ValueError(error_message(
                "phys_to_log", t.tolist()[:16], f"entries must be logical ids in [0, E={E})",
                _FIX))
        missing = (torch.bincount(t, minlength=E) == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(error_message(
                "phys_to_log", t.tolist()[:16], f"logical expert(s) {missing[:8]} have no "
                "replica: every logical expert needs at least one physical expert", _FIX))
        object.__setattr__(self, "phys_to_log", t)
        object.__setattr__(self, "num_experts", E)

    @classmethod
    def initial(cls, num_experts: int, num_redundant: int, world_size: int
                ) -> ReplicatedPlacement:
        """Before any load is known. Where W divides E and R: rank r holds its E / W logical
        experts [r E/W, (r+1) E/W) followed by replicas of the first R / W experts of rank
        r - 1 (mod W), so under uniform routing every rank does the same work (each gives
        away half of R / W experts' load and takes half of R / W others'). Otherwise physical
        p holds logical p mod E. Examples: E = 4, R = 2, W = 2 -> [0, 1, 2, 2, 3, 0];
        E = 3, R = 1, W = 2 -> [0, 1, 2, 0]."""
        check_integer_value("num_experts", num_experts, minimum=1)
        check_integer_value("num_redundant_experts", num_redundant, minimum=0)
        check_integer_value("world_size", world_size, minimum=1)
        E, R, W = num_experts, num_redundant, world_size
        if (E + R) % W:
            raise ValueError(error_message(
                "num_redundant_experts", R, f"E + R = {E + R} must be divisible by the "
                f"EP size W={W} (every rank holds (E + R) / W physical experts)",
                f"use R = {-E % W} + a multiple of {W}"))
        if E % W or R % W:
            return cls(torch.arange(E + R) % E, W, E)
        own, extra = E // W, R // W
        table = []
        for r in range(W):
            prev = (r - 1) % W
            table += list(range(r * own, (r + 1) * own))
            table += [prev * own + j % own for j in range(extra)]
        return cls(torch.tensor(table), W, E)

    # ---- sizes and tables ---------------------------------------------------------------------
    @property
    def num_physical(self) -> int:
        return self.phys_to_log.numel()

    @property
    def num_redundant(self) -> int:
        return self.num_physical - self.num_experts

    @property
    def num_local(self) -> int:
        """e = P / W physical experts on every rank."""
        return self.num_physical // self.world_size

    @cached_property
    def physical(self) -> Placement:
        """The contiguous placement of the P physical experts (for the dispatcher)."""
        return Placement.contiguous(self.num_physical, self.world_size)

    @cached_property
    def replica_count(self) -> torch.Tensor:
        """[E] int64: how many physical experts hold each logical expert (>= 1)."""
        return torch.bincount(self.phys_to_log, minlength=self.num_experts)

    @cached_property
    def log_to_phys(self) -> torch.Tensor:
        """[E, max replicas] int64: physical ids of each logical expert's replicas, increasing,
        -1 padded."""
        order = torch.argsort(self.phys_to_log, stable=True)  # grouped by logical id
        C = int(self.replica_count.max())
        starts = torch.cumsum(self.replica_count, 0) - self.replica_count
        out = torch.full((self.num_experts, C), -1, dtype=torch.int64)
        col = torch.arange(self.num_physical) - starts[self.phys_to_log[order]]
        out[self.phys_to_log[order], col] = order
        return out

    def _check_rank(self, rank: int) -> None:
        check_integer_value("rank", rank, minimum=0)
        if rank >= self.world_size:
            raise ValueError(error_message("rank", rank, f"must lie in [0, {self.world_size})",
                                           "pass this process's EP rank"))

    def physical_experts(self, rank: int) -> range:
        """The physical ids rank ``rank`` holds, in local order."""
        self._check_rank(rank)
        return range(rank * self.num_local, (rank + 1) * self.num_local)

    def logical_experts(self, rank: int) -> tuple[int, ...]:
        """The logical expert of each of rank ``rank``'s physical experts, in local order (a
        logical id may appear twice: two replicas on one rank)."""
        r = self.physical_experts(rank)
        return tuple(self.phys_to_log[r.start:r.stop].tolist())

    def expert_map(self, rank: int) -> ExpertMap:
        """[P] physical id -> local id on ``rank`` (the physical placement's)."""
        return self.physical.expert_map(rank)

    def expert_mask(self, rank: int, *, sentinel: bool) -> ExpertMask:
        return self.physical.expert_mask(rank, sentinel=sentinel)

    def rank_load(self, physical_load_P: torch.Tensor) -> torch.Tensor:
        """[P] counts per physical expert -> [W] per rank (sum of each rank's block)."""
        if not isinstance(physical_load_P, torch.Tensor) or tuple(physical_load_P.shape) != (
                self.num_physical,):
            raise ValueError(error_message(
                "physical_load_P", describe(physical_load_P), f"must be a [P={self.num_physical}]"
                " tensor (one count per physical expert)", "pass expert_load().physical"))
        return physical_load_P.reshape(self.world_size, self.num_local).sum(1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplicatedPlacement) and other.world_size == self.world_size \
            and other.num_experts == self.num_experts \
            and torch.equal(other.phys_to_log, self.phys_to_log)

    def __hash__(self) -> int:
        return hash((self.world_size, self.num_experts, tuple(self.phys_to_log.tolist())))

    def __repr__(self) -> str:
        return (f"ReplicatedPlacement(E={self.num_experts}, P={self.num_physical}, "
                f"W={self.world_size}, phys_to_log={self.phys_to_log.tolist()[:16]}"
                f"{'...' if self.num_physical > 16 else ''})")

    # ---- the choice of a replica --------------------------------------------------------------
    def check_nodes(self, nodes: object) -> tuple[int, ...] | None:
        """``nodes``: None, or the node index of every rank (W ints >= 0, rank order)."""
        if nodes is None:
            return None
        if isinstance(nodes, (str, bytes)) or not hasattr(nodes, "__len__") or any(
                isinstance(n, bool) or not isinstance(n, int) for n in nodes):
            raise TypeError(error_message(
                "replica_nodes", repr(nodes)[:60], "must be a sequence of ints (the node "
                "index of every EP rank)", "pass e.g. [0, 0, 1, 1], or None"))
        if len(nodes) != self.world_size or min(nodes) < 0:
            raise ValueError(error_message(
                "replica_nodes", list(nodes)[:16], f"must hold W={self.world_size} node "
                "indices >= 0, one per EP rank", "pass the node of every rank in rank order"))
        return tuple(nodes)

    def choice_tables(self, rank: int, max_replicas: int | None = None,
                      nodes: tuple[int, ...] | None = None, *, choice: str = "spread"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates [E, C] int64, counts [E] int64) of ``rank``: every replica of each
        logical expert (``choice="spread"``), or (``"local"``) the replicas on ``rank`` where
        it has any, else (with ``nodes``, the node of every rank) those on ``rank``'s node
        where it has any, else all; C = ``max_replicas`` (default R + 1: fixed for a given R,
        so tables of later placements fit the same buffers)."""
        self._check_rank(rank)
        nodes = self.check_nodes(nodes)
        check_choice(choice, nodes)
        C = self.num_redundant + 1 if max_replicas is None else max_replicas
        if C < int(self.replica_count.max()):
            raise ValueError(error_message(
                "max_replicas", C, f"must be >= the most replicas of one expert "
                f"({int(self.replica_count.max())})", "leave it None (R + 1)"))
        lp = self.log_to_phys
        owner = torch.where(lp >= 0, lp // self.num_local, -1)
        use = lp >= 0  # [E, C'] replicas to choose from: all, narrowed below
        near = [owner == rank] if choice == "local" else []
        if nodes is not None:
            node_of = torch.tensor(nodes)
            near.append((owner >= 0) & (node_of[owner.clamp(min=0)] == nodes[rank]))
        for pref in reversed(near):  # the nearest set that holds any replica wins
            use = torch.where(pref.any(1, keepdim=True), pref, use)
        counts = use.sum(1)
        # the chosen replicas first (stable: in increasing physical id), -1 after
        order = torch.argsort((~use).to(torch.int8), dim=1, stable=True)
        cand = torch.gather(torch.where(use, lp, -1), 1, order)
        out = torch.full((self.num_experts, C), -1, dtype=torch.int64)
        out[:, :cand.shape[1]] = cand
        return out, counts


CHOICES = ("spread", "local")


def check_choice(choice: object, nodes: object) -> None:
    """``choice`` is one of ``CHOICES``; ``nodes`` only with "local"."""
    if choice not in CHOICES:
        raise ValueError(error_message("replica_choice", repr(choice), f"must be one of "
                                       f"{CHOICES}", "pass 'spread' (default) or 'local'"))
    if nodes is not None and choice != "local":
        raise ValueError(error_message(
            "replica_nodes", list(nodes)[:16], "only applies to replica_choice='local' "
            "(spread uses every replica alike)", "pass replica_choice='local' too, or no nodes"))


class ReplicaChoice(nn.Module):
    """The device tables of one rank's replica choice (fixed shapes [E, R + 1] and [E]; buffers,
    so ``layer.to(device)`` moves them), updated in place by ``update`` so a captured CUDA
    graph sees a new placement."""

    def __init__(self, placement: ReplicatedPlacement, rank: int, device, *,
                 choice: str = "spread", nodes: tuple[int, ...] | None = None):
        super().__init__()
        cand, counts = placement.choice_tables(rank, nodes=nodes, choice=choice)
        self.rank, self.nodes, self.choice = rank, nodes, choice
        self.register_buffer("cand_EC", cand.to(device), persistent=False)
        self.register_buffer("count_E", counts.to(device), persistent=False)

    def update(self, placement: ReplicatedPlacement) -> None:
        cand, counts = placement.choice_tables(self.rank, self.cand_EC.shape[1], self.nodes,
                                               choice=self.choice)
        self.cand_EC.copy_(cand)
        self.count_E.copy_(counts)

    def forward(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        return self.to_physical(topk_ids_TK)

    def to_physical(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] logical ids (-1 = empty slot) -> [T, K] physical ids in the same dtype, -1
        kept; candidate (t + k + rank) mod count (see the module docstring). Integer ids only
        (the forward's routing checked their range; device ops only here)."""
        check_integer("topk_ids", topk_ids_TK)
        if topk_ids_TK.dim() != 2:
            raise ValueError(error_message("topk_ids.shape", list(topk_ids_TK.shape),
                                           "must be [T, K]", "pass the router's topk_ids"))
        T, K = topk_ids_TK.shape
        g = topk_ids_TK.long().clamp(min=0)
        dev = topk_ids_TK.device
        t = torch.arange(T, device=dev)[:, None] + torch.arange(K, device=dev) + self.rank
        pick = torch.remainder(t, self.count_E[g])
        phys = self.cand_EC[g, pick]
        return torch.where(topk_ids_TK >= 0, phys, -1).to(topk_ids_TK.dtype)
