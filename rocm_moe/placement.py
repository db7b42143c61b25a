"""Which rank owns which expert, and the two id conventions that must never pass for each other.

- ``ExpertMap`` (vLLM's ``expert_map``): [E] int32, entry g is the local id of global expert g on
  this rank, or -1 where another rank owns it. Used to turn global ids into local weight rows.
- ``ExpertMask`` (AITER's ``expert_mask``): [E] or [E + 1] int32 of 0/1, 1 where this rank owns
  the expert; the optional trailing sentinel slot (always 0) is vLLM's convention for
  ``fused_moe`` under EP. AITER derives local ids as a prefix sum of the mask, so a mask only
  describes placements whose local ids follow global order.

Taking one for the other broke accuracy twice upstream (vllm#49758, ROCm/ATOM#887); here they are
distinct types that validate their contents, and functions that take one reject the other.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from rocm_moe._checks import (
    check_bool,
    check_id_range,
    check_integer,
    check_integer_value,
    error_message,
)


@dataclass(frozen=True, eq=False)
class ExpertMap:
    """[E] int32: global expert id -> local id on ``rank``, or -1 (not local)."""

    map_E: torch.Tensor
    rank: int

    def __post_init__(self) -> None:
        m = self.map_E
        if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.dtype != torch.int32:
            raise TypeError(error_message(
                "ExpertMap.map_E", _desc(m), "must be a 1-D int32 tensor of local ids or -1",
                "build it with Placement.expert_map(rank)"))
        check_integer_value("ExpertMap.rank", self.rank, minimum=0)
        local = m[m >= 0].sort().values.cpu()
        if bool((m < -1).any()) or not torch.equal(local, torch.arange(local.numel(),
                                                                       dtype=torch.int32)):
            hint = " (this looks like a 0/1 expert_mask)" if bool(((m == 0) | (m == 1)).all()) \
                else ""
            raise ValueError(error_message(
                "ExpertMap.map_E", m.tolist()[:16], "entries must be -1 or local ids "
                "0..e-1, each local id exactly once" + hint,
                "use Placement.expert_map(rank); convert a mask with ExpertMask.to_expert_map()"))

    @property
    def num_experts(self) -> int:
        return self.map_E.numel()

    @cached_property
    def num_local(self) -> int:
        return int((self.map_E >= 0).sum())

    def to(self, device: torch.device | str) -> ExpertMap:
        return ExpertMap(self.map_E.to(device), self.rank)

    def local_ids(self, topk_ids_RK: torch.Tensor) -> torch.Tensor:
        """[R, K] global ids (-1 = empty slot) -> [R, K] int64 local ids, -1 where not local.
        Integer ids only (a float id is refused, never truncated); their range is the caller's
        to check (the hot paths' public calls do: ``check_id_range``)."""
        check_integer("topk_ids", topk_ids_RK)
        m = self.map_E.to(topk_ids_RK.device).long()
        valid = topk_ids_RK >= 0
        local = m[topk_ids_RK.long().clamp(min=0)]
        return torch.where(valid, local, torch.full_like(local, -1))

    def to_expert_mask(self, *, sentinel: bool) -> ExpertMask:
        """AITER's 0/1 mask; needs local ids in global order (AITER uses a prefix sum)."""
        check_bool("sentinel", sentinel)
        owned = (self.map_E >= 0).nonzero().flatten()
        if owned.numel() > 1 and not bool((self.map_E[owned].diff() > 0).all()):
            raise ValueError(error_message(
                "ExpertMap", self.map_E.tolist()[:16], "an AITER expert_mask can only describe "
                "local ids that increase with the global id", "reorder the local weights"))
        mask = (self.map_E >= 0).to(torch.int32)
        if sentinel:
            mask = torch.cat([mask, mask.new_zeros(1)])
        return ExpertMask(mask, num_experts=self.num_experts)


@dataclass(frozen=True, eq=False)
class ExpertMask:
    """AITER's ``expert_mask``: [E] or [E + 1] int32 of 0/1; 1 = this rank owns the expert."""

    mask: torch.Tensor
    num_experts: int

    def __post_init__(self) -> None:
        m, E = self.mask, self.num_experts
        check_integer_value("ExpertMask.num_experts", E, minimum=1)
        if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.dtype != torch.int32:
            raise TypeError(error_message(
                "ExpertMask.mask", _desc(m), "must be a 1-D int32 tensor of 0/1",
                "build it with Placement.expert_mask(rank, sentinel=...)"))
        if m.numel() not in (E, E + 1):
            raise ValueError(error_message(
                "ExpertMask.mask.shape", list(m.shape), f"must be [E={E}] or [E + 1={E + 1}] "
                "(with the trailing sentinel slot)", "build it with Placement.expert_mask"))
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(error_message(
                "ExpertMask.mask", m.tolist()[:16], "entries must be 0 or 1 (this looks like an "
                "expert_map of local ids / -1)", "use ExpertMap.to_expert_mask(sentinel=...)"))
        if self.has_sentinel and int(m[-1]) != 0:
            raise ValueError(error_message(
                "ExpertMask.mask[-1]", int(m[-1]), "the sentinel slot must be 0",
                "set mask[-1] = 0"))

    @property
    def has_sentinel(self) -> bool:
        return self.mask.numel() == self.num_experts + 1

    def to_expert_map(self, rank: int) -> ExpertMap:
        """Local ids as AITER derives them: prefix sum of the mask."""
        owned = self.mask[: self.num_experts]
        local = torch.cumsum(owned, 0, dtype=torch.int32) - 1
        return ExpertMap(torch.where(owned == 1, local, torch.full_like(local, -1)), rank)


def _expert_id(g: object) -> int:
    """An expert id given as an int or an integer 0-d tensor; TypeError for anything else."""
    if isinstance(g, torch.Tensor) and g.dim() == 0 and not g.is_floating_point() \
            and g.dtype != torch.bool:
        return int(g)
    if isinstance(g, bool) or not isinstance(g, numbers.Integral):
        raise TypeError(error_message("Placement.experts_of_rank", f"holds {g!r}", "expert ids "
                                      "must be ints", "pass integer global expert ids"))
    return int(g)


def _desc(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"Tensor(shape={list(t.shape)}, dtype={t.dtype})"
    return type(t).__name__


def require_expert_map(field: str, obj: object) -> ExpertMap:
    """Reject anything that is not an ExpertMap, naming the likely confusion."""
    if isinstance(obj, ExpertMap):
        return obj
    hint = ("an ExpertMask is AITER's 0/1 ownership mask, not an id map (vllm#49758)"
            if isinstance(obj, ExpertMask) else "raw tensors are ambiguous (map or mask?)")
    raise TypeError(error_message(field, _desc(obj), f"must be an ExpertMap; {hint}",
                                  "pass placement.expert_map(rank)"))


@dataclass(frozen=True, eq=False)
class Placement:
    """Expert ownership for a world of ``world_size`` ranks.

    ``experts_of_rank[d]`` lists the global experts of rank d in local-id order. Every expert has
    exactly one owner. Build with ``Placement.contiguous`` (rank d owns [d*E/W, (d+1)*E/W)) or
    ``Placement.from_lists`` for an explicit, possibly non-contiguous placement.
    """

    num_experts: int
    experts_of_rank: tuple[tuple[int, ...], ...]

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> Placement:
        check_integer_value("num_experts", num_experts, minimum=1)
        check_integer_value("world_size", world_size, minimum=1)
        if world_size < 1 or num_experts < 1 or num_experts % world_size:
            raise ValueError(error_message(
                "num_experts, world_size", (num_experts, world_size),
                "contiguous placement needs E divisible by W (each rank owns E / W experts)",
                "choose an EP size that divides the expert count, or use Placement.from_lists"))
        e = num_experts // world_size
        return cls(num_experts, tuple(tuple(range(d * e, (d + 1) * e))
                                      for d in range(world_size)))

    @classmethod
    def from_lists(cls, experts_of_rank: Sequence[Sequence[int]], num_experts: int) -> Placement:
        """Rank d owns ``experts_of_rank[d]`` (global ids in local-id order): ints, or integer
        0-d tensors; a float is refused, never truncated."""
        if isinstance(experts_of_rank, (str, bytes)) or not all(
                hasattr(r, "__iter__") and not isinstance(r, (str, bytes))
                for r in experts_of_rank):
            raise TypeError(error_message(
                "Placement.experts_of_rank", repr(experts_of_rank)[:80],
                "must be one sequence of expert ids per rank", "pass e.g. [[0, 1], [2, 3]]"))
        return cls(num_experts, tuple(tuple(_expert_id(g) for g in r) for r in experts_of_rank))

    def __post_init__(self) -> None:
        E = self.num_experts
        check_integer_value("Placement.num_experts", E, minimum=1)
        for d, r in enumerate(self.experts_of_rank):
            for g in r:
                if isinstance(g, bool) or not isinstance(g, int):
                    raise TypeError(error_message(
                        f"Placement.experts_of_rank[{d}]", list(r)[:8], f"holds {g!r}: expert "
                        "ids must be ints", "build it with Placement.from_lists (ints)"))
                if not 0 <= g < E:
                    raise ValueError(error_message(
                        f"Placement.experts_of_rank[{d}]", list(r)[:8], f"holds {g}: expert "
                        f"ids must lie in [0, {E})", "list the global experts of each rank"))
        flat = sorted(g for r in self.experts_of_rank for g in r)
        if not self.experts_of_rank or flat != list(range(self.num_experts)):
            raise ValueError(error_message(
                "Placement.experts_of_rank", [list(r)[:8] for r in self.experts_of_rank][:8],
                f"every expert 0..{self.num_experts - 1} must be owned by exactly one rank",
                "list each global expert once"))

    @property
    def world_size(self) -> int:
        return len(self.experts_of_rank)

    @cached_property
    def owner_E(self) -> torch.Tensor:
        """[E] int32: the rank that owns each global expert."""
        owner = torch.empty(self.num_experts, dtype=torch.int32)
        for d, experts in enumerate(self.experts_of_rank):
            owner[list(experts)] = d
        return owner

    @property
    def is_contiguous(self) -> bool:
        e = self.num_experts // self.world_size
        return all(r == tuple(range(d * e, (d + 1) * e))
                   for d, r in enumerate(self.experts_of_rank))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Placement) and other.num_experts == self.num_experts
                and other.experts_of_rank == self.experts_of_rank)

    def __hash__(self) -> int:
        return hash((self.num_experts, self.experts_of_rank))

    def _check_rank(self, rank: int) -> None:
        check_integer_value("rank", rank, minimum=0, fix="pass this process's EP rank")
        if not 0 <= rank < self.world_size:
            raise ValueError(error_message("rank", rank, f"must lie in [0, {self.world_size})",
                                           "pass this process's EP rank"))

    def num_local(self, rank: int) -> int:
        self._check_rank(rank)
        return len(self.experts_of_rank[rank])

    def local_experts(self, rank: int) -> tuple[int, ...]:
        self._check_rank(rank)
        return self.experts_of_rank[rank]

    def owner(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Owner rank of each global id (int64, same shape); -1 for empty slots (id -1). Ids are
        checked: integers in [0, E) or -1 (one host read)."""
        check_integer("topk_ids", topk_ids)
        check_id_range("topk_ids", topk_ids, self.num_experts, allow_minus_one=True)
        owner = self.owner_E.to(topk_ids.device).long()[topk_ids.long().clamp(min=0)]
        return torch.where(topk_ids >= 0, owner, torch.full_like(owner, -1))

    def expert_map(self, rank: int) -> ExpertMap:
        self._check_rank(rank)
        m = torch.full((self.num_experts,), -1, dtype=torch.int32)
        m[list(self.experts_of_rank[rank])] = torch.arange(self.num_local(rank), dtype=torch.int32)
        return ExpertMap(m, rank)

    def expert_mask(self, rank: int, *, sentinel: bool) -> ExpertMask:
        """AITER's mask for ``rank``; ``sentinel=True`` appends vLLM's trailing 0 slot."""
        return self.expert_map(rank).to_expert_mask(sentinel=sentinel)

    def global_to_local(self, topk_ids: torch.Tensor, rank: int) -> torch.Tensor:
        """``ExpertMap.local_ids`` of ``rank``, the ids checked (in [0, E) or -1)."""
        check_integer("topk_ids", topk_ids)
        check_id_range("topk_ids", topk_ids, self.num_experts, allow_minus_one=True)
        return self.expert_map(rank).local_ids(topk_ids)

    def local_to_global(self, local_ids: torch.Tensor, rank: int) -> torch.Tensor:
        check_integer("local_ids", local_ids)
        experts = torch.tensor(self.local_experts(rank), dtype=torch.int64,
                               device=local_ids.device)
        if local_ids.numel() and (int(local_ids.min()) < 0
                                  or int(local_ids.max()) >= experts.numel()):
            raise ValueError(error_message("local_ids", local_ids.tolist()[:8],
                                           f"must lie in [0, {experts.numel()})",
                                           "pass local ids of this rank"))
        return experts[local_ids.long()]
