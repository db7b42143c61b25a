"""Routing tables for one rank's batch, all derived from one stable sort.

A *slot* is one (row, k) pair of the [R, K] routing, flattened as ``slot = row * K + k``. Only
slots whose expert is local to the rank (``ExpertMap``) take part; slots of other ranks' experts
and empty slots (id -1) are dropped.

``build_layout`` sorts the local slots by local expert once and derives everything from that
sort: counts, offsets, the expert -> row / slot / weight tables (the routing tensors of seed 002)
and the block-aligned layout a grouped GEMM consumes (each expert's slots padded to a multiple of
``block_size``, a local expert id per block). Because one function produces all of them, the
offsets and every padded layout cannot disagree (the failure of seed 001).

It is CUDA-graph safe: no host synchronisation, and every output has a static size computed from
(R, K, e, block_size) alone. The padded slot list has room for the most blocks any routing can
need (``max_padded_slots``: n + (R*K - n) // block_size blocks, n = min(R*K, e)); unused entries
hold the sentinel ``R*K`` and unused blocks hold expert id -1; ``num_padded`` holds the used
length.

``tables=False`` skips the [e, R] expert tables (a grouped GEMM needs only the block layout);
on a GPU with Triton (or under ``TRITON_INTERPRET=1``) the layout then comes from three short
Triton kernels (``rocm_moe.experts._layout_triton``; one when all slots fit one chunk of 64)
instead of dozens of small torch ops around the sort. Both give identical tensors (the tests compare
them); the torch sort is the reference.

Worked example (block_size=2, K=2, rank owns global experts 2, 3 as local 0, 1):
ids [[2, 0], [3, 2]] -> local slots 0 (e0), 2 (e1), 3 (e0); tokens_per_expert [2, 1];
expert_offsets [0, 2, 3]; padded_offsets [0, 2, 4]; sorted_slot_ids [0, 3, 2, 4, 4, 4, ...];
block_expert_ids [0, 1, -1, ...]; expert_token_table [[0, 1], [1, -1]].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_id_range,
    check_integer,
    check_tensor,
    check_unique_rows,
    error_message,
)
from rocm_moe._libs import triton_runs_on
from rocm_moe.placement import ExpertMap, require_expert_map


@dataclass(frozen=True, kw_only=True, eq=False)
class RoutingLayout:
    """Routing tables of R rows with K slots each on a rank with e local experts."""

    num_rows: int
    top_k: int
    block_size: int
    local_ids: torch.Tensor  # [R, K] int64: local expert of each slot, -1 if not local
    tokens_per_expert: torch.Tensor  # [e] int32: local slots per local expert
    expert_offsets: torch.Tensor  # [e + 1] int32: exclusive prefix sum of tokens_per_expert
    expert_token_table: torch.Tensor | None  # [e, R] int32: rows of each expert, -1 padded
    expert_slot_table: torch.Tensor | None  # [e, R] int32: the k of each row's slot, -1 padded
    expert_weight_table: torch.Tensor | None  # [e, R] float32: slot weights, 0 padded
    # (the three tables are None when built with tables=False; weights also without weights)
    padded_offsets: torch.Tensor  # [e + 1] int32: offsets with each expert padded to blocks
    sorted_slot_ids: torch.Tensor  # [P] int32: slot ids by expert, padded with R*K
    block_expert_ids: torch.Tensor  # [P / block_size] int32: local expert per block, -1 unused
    num_padded: torch.Tensor  # [1] int32: padded_offsets[-1], the used part of sorted_slot_ids

    @property
    def num_local(self) -> int:
        return self.tokens_per_expert.numel()

    @property
    def sentinel(self) -> int:
        return self.num_rows * self.top_k


def max_padded_slots(num_slots: int, num_local: int, block_size: int) -> int:
    """Static length of ``sorted_slot_ids``, the most any routing needs: an expert with c >= 1
    slots takes ceil(c / B) = 1 + floor((c - 1) / B) blocks, so n non-empty experts take at most
    n + floor((slots - n) / B), largest at n = min(slots, e)."""
    n = min(num_slots, num_local)
    return block_size * (n + (num_slots - n) // block_size)


def build_layout(
    topk_ids_RK: torch.Tensor,
    expert_map: ExpertMap,
    *,
    topk_weights_RK: torch.Tensor | None = None,
    block_size: int = 1,
    tables: bool = True,
    validate: bool = True,
) -> RoutingLayout:
    """Sort this rank's local slots by expert and derive every table and offset from that sort.

    Args:
        topk_ids_RK: [R, K] integer global expert ids in [0, E), -1 = empty slot (any other
            negative id is refused, never read as empty).
        expert_map: this rank's ExpertMap (not an AITER 0/1 mask).
        topk_weights_RK: optional [R, K] floating weights, to fill ``expert_weight_table``.
        block_size: grouped-GEMM row block; each expert's slots are padded to a multiple of it.
        tables: build the [e, R] expert -> row / slot / weight tables (False: block layout only,
            through the Triton kernels where they can run).
        validate: check the id range and that no row names an expert twice (host reads;
            skipped under CUDA graph capture). The
            experts backends pass False: their public call has checked the ids already.
            Shapes and dtypes are always checked.
    """
    expert_map = require_expert_map("expert_map", expert_map)
    check_tensor("topk_ids", topk_ids_RK, shape=(None, None))
    check_integer("topk_ids", topk_ids_RK)
    if topk_weights_RK is not None:
        check_tensor("topk_weights", topk_weights_RK, shape=tuple(topk_ids_RK.shape),
                     dtypes=FLOAT_DTYPES, fix="pass one weight per slot, [R, K] like topk_ids")
    check_bool("tables", tables)
    check_bool("validate", validate)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(error_message("block_size", block_size, "must be an int >= 1",
                                       "use a power of two such as 16, 32 or 64"))
    if validate:
        check_id_range("topk_ids", topk_ids_RK, expert_map.num_experts, allow_minus_one=True)
        check_unique_rows("topk_ids", topk_ids_RK)
    if not tables and triton_runs_on(topk_ids_RK.device):
        return _block_layout_triton(topk_ids_RK, expert_map, block_size)
    R, K = topk_ids_RK.shape
    e, N, dev = expert_map.num_local, R * K, topk_ids_RK.device
    local_RK = expert_map.local_ids(topk_ids_RK)

    # One stable sort: local slots grouped by local expert, rows ascending inside an expert;
    # non-local slots get key e and sort last.
    key_N = torch.where(local_RK >= 0, local_RK, torch.full_like(local_RK, e)).flatten()
    sorted_key_N, order_N = torch.sort(key_N, stable=True)
    counts = torch.zeros(e + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key_N, torch.ones_like(key_N))
    counts = counts[:e]
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    offsets = torch.cat([zero, counts.cumsum(0)])
    padded_offsets = torch.cat([zero, ((counts + block_size - 1) // block_size * block_size)
                                .cumsum(0)])
    is_local_N = sorted_key_N < e
    expert_N = sorted_key_N.clamp(max=max(e - 1, 0))
    rank_in_expert_N = torch.arange(N, device=dev) - offsets[expert_N] if e else key_N

    # Block-aligned slot list; non-local slots are written to a trash entry that is cut off.
    P = max_padded_slots(N, e, block_size)
    dest_N = torch.where(is_local_N, padded_offsets[expert_N] + rank_in_expert_N,
                         torch.full_like(order_N, P)) if e else torch.full_like(order_N, P)
    sorted_slot_ids = torch.full((P + 1,), N, dtype=torch.int64, device=dev)
    sorted_slot_ids.scatter_(0, dest_N, order_N)
    block_start = torch.arange(0, P, block_size, device=dev)
    block_expert = torch.searchsorted(padded_offsets[1:], block_start, right=True)
    block_expert_ids = torch.where(block_expert < e, block_expert, torch.full_like(block_expert,
                                                                                   -1))

    i32 = torch.int32
    token_table = slot_table = weight_table = None
    if tables:  # expert -> row / slot / weight tables; a trash column takes non-local slots
        col_N = torch.where(is_local_N, rank_in_expert_N.clamp(max=R),
                            torch.full_like(order_N, R))
        flat_N = expert_N * (R + 1) + col_N

        def table(values_N: torch.Tensor, fill: float, dtype: torch.dtype) -> torch.Tensor:
            t = torch.full((max(e, 1) * (R + 1),), fill, dtype=dtype, device=dev)
            t.scatter_(0, flat_N, values_N.to(dtype))
            return t.view(max(e, 1), R + 1)[:e, :R]

        token_table = table(order_N // K, -1, i32)
        slot_table = table(order_N % K, -1, i32)
        if topk_weights_RK is not None:
            weight_table = table(topk_weights_RK.flatten()[order_N], 0.0, torch.float32)
    return RoutingLayout(
        num_rows=R, top_k=K, block_size=block_size, local_ids=local_RK,
        tokens_per_expert=counts.to(i32), expert_offsets=offsets.to(i32),
        expert_token_table=token_table, expert_slot_table=slot_table,
        expert_weight_table=weight_table, padded_offsets=padded_offsets.to(i32),
        sorted_slot_ids=sorted_slot_ids[:P].to(i32), block_expert_ids=block_expert_ids.to(i32),
        num_padded=padded_offsets[-1:].to(i32),
    )


_SCAN_TILE = 4096  # elements per scan step (tests shrink it to take several steps)


def _block_layout_triton(ids_RK: torch.Tensor, expert_map: ExpertMap,
                         block_size: int) -> RoutingLayout:
    """build_layout(..., tables=False) in one or three Triton launches (_layout_triton)."""
    import triton

    from rocm_moe.experts._layout_triton import count_kernel, place_kernel, scan_kernel

    R, K = ids_RK.shape
    e, N, dev = expert_map.num_local, R * K, ids_RK.device
    P = max_padded_slots(N, e, block_size)
    n_blocks = P // block_size
    e_pow2 = triton.next_power_of_2(e + 1)
    chunk = 64 if N > 64 else max(16, triton.next_power_of_2(N))  # [chunk, chunk] compare
    n_chunks = max(1, -(-N // chunk))
    sub = max(8, min(64, 8192 // e_pow2))
    i32 = torch.int32
    local = torch.empty(R, K, dtype=torch.int64, device=dev)
    sorted_slots = torch.empty(P, dtype=i32, device=dev)
    block_expert = torch.empty(n_blocks, dtype=i32, device=dev)
    tpe = torch.empty(e, dtype=i32, device=dev)
    offsets = torch.empty(e + 1, dtype=i32, device=dev)
    padded = torch.empty(e + 1, dtype=i32, device=dev)
    ids = ids_RK if ids_RK.is_contiguous() else ids_RK.contiguous()
    emap = expert_map.map_E.to(dev)
    fill = -(-P // n_chunks)
    fused = n_chunks == 1
    rank = counts = totals = sorted_slots  # unused by the fused launch
    if not fused:
        rank = torch.empty(N, dtype=i32, device=dev)
        counts = torch.empty(e_pow2, n_chunks, dtype=i32, device=dev)
        totals = torch.empty(e_pow2, dtype=i32, device=dev)
        count_kernel[(n_chunks,)](ids, emap, local, rank, counts, sorted_slots, N,
                                  expert_map.num_experts, e, P, fill, n_chunks, E_POW2=e_pow2,
                                  CHUNK=chunk, num_warps=4)
        cols = min(_SCAN_TILE, triton.next_power_of_2(n_chunks))  # [lanes, cols] tiles
        lanes = min(e_pow2, _SCAN_TILE // cols)
        scan_kernel[(e_pow2 // lanes,)](counts, totals, n_chunks, LANES=lanes, COLS=cols,
                                        num_warps=4)
    place_kernel[(n_chunks,)](ids, emap, local, rank, counts, totals, sorted_slots, block_expert,
                              tpe, offsets, padded, N, expert_map.num_experts, e, n_blocks,
                              -(-n_blocks // n_chunks), P, fill, n_chunks, FUSED=fused,
                              BLOCK=block_size, E_POW2=e_pow2, CHUNK=chunk, SUB=sub, num_warps=4)
    return RoutingLayout(
        num_rows=R, top_k=K, block_size=block_size, local_ids=local, tokens_per_expert=tpe,
        expert_offsets=offsets, expert_token_table=None, expert_slot_table=None,
        expert_weight_table=None, padded_offsets=padded, sorted_slot_ids=sorted_slots,
        block_expert_ids=block_expert, num_padded=padded[-1:])
