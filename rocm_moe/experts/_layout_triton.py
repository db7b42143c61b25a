"""Triton kernels behind ``layout.build_layout(..., tables=False)`` (imported only where triton
is installed): the same block-aligned layout as the sort, with no host sync, in three short
launches (one when every slot fits one chunk).

Slots are cut into chunks of CHUNK, one program each. ``count``: each program maps its slots'
global ids to local ids, ranks each slot among the same expert's slots of its chunk (a
[CHUNK, CHUNK] comparison) and counts its slots per local expert into ``counts[:, chunk]``
(row e takes the non-local slots); it also writes the sentinel over its share of the padded
slot list. ``scan``: per expert row, the exclusive prefix sum of the counts over the chunks
(in place) and the expert's total. ``place``: each program derives the padded offsets from the
totals; a slot's position is padded_offset[expert] + slots of its expert in earlier chunks +
its rank in its chunk, which is exactly the stable sort's order.

Every program does a few wide steps and no long loop: the earlier design (at most 256 chunks,
each program reading the whole counts table and walking its slots in sub-tiles) spent 57 us
on the 512 slots of 64 tokens (one program) and 134 us at 131072 slots on an H100
(``bench/results/profile_experts_h100_tma_ab.txt``). Counts come from ``tl.histogram``, so
the largest temporary is the [CHUNK, CHUNK] comparison (at [128, 256] an earlier kernel
spilled).

Nothing NVIDIA-only: plain loads, stores, reductions, scans and ``tl.gather``.
"""

import triton
import triton.language as tl


@triton.jit
def _chunk(c, ids_ptr, map_ptr, local_ptr, sorted_ptr, N, E, NUM_LOCAL, P, FILL,
           E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk c: its slots, their local ids (stored to ``local``; -1: not local), their rank
    among the same expert's slots of the chunk, the chunk's per-expert counts (lane e counts
    the non-local slots), and the sentinel over its share [c * FILL, (c + 1) * FILL) of the
    padded slot list."""
    i = tl.arange(0, CHUNK)
    offs = c * CHUNK + i
    ok = offs < N
    g = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    known = ok & (g >= 0) & (g < E)
    loc = tl.load(map_ptr + tl.where(known, g, 0), mask=known, other=-1)
    tl.store(local_ptr + offs, loc, mask=ok)
    key = tl.where(loc >= 0, loc, NUM_LOCAL)  # past N too: bin e is never read as a count
    hist = tl.histogram(key, E_POW2)
    key = tl.where(ok, key, -1)
    rank = tl.sum(((key[:, None] == key[None, :]) & (i[None, :] < i[:, None])).to(tl.int32),
                  axis=1)
    for f0 in range(c * FILL, c * FILL + FILL, 1024):
        f = f0 + tl.arange(0, 1024)
        tl.store(sorted_ptr + f, tl.zeros([1024], dtype=tl.int32) + N,
                 mask=(f < P) & (f < c * FILL + FILL))
    return offs, loc, rank, hist


@triton.jit
def count_kernel(ids_ptr, map_ptr, local_ptr, rank_ptr, counts_ptr, sorted_ptr,
                 N, E, NUM_LOCAL, P, FILL, N_CHUNKS, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    offs, _, rank, hist = _chunk(c, ids_ptr, map_ptr, local_ptr, sorted_ptr, N, E,
                                 NUM_LOCAL, P, FILL, E_POW2, CHUNK)
    tl.store(rank_ptr + offs, rank, mask=offs < N)
    tl.store(counts_ptr + tl.arange(0, E_POW2) * N_CHUNKS + c, hist)


@triton.jit
def scan_kernel(counts_ptr, totals_ptr, N_CHUNKS, LANES: tl.constexpr, COLS: tl.constexpr):
    """counts[lane, c] <- sum of counts[lane, c'] over c' < c (in place); totals[lane] <- the
    row's sum. One program per LANES expert rows, COLS chunks per step."""
    lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
    run = tl.zeros([LANES], dtype=tl.int32)
    for c0 in range(0, N_CHUNKS, COLS):
        cols = c0 + tl.arange(0, COLS)
        ptrs = counts_ptr + lanes[:, None] * N_CHUNKS + cols[None, :]
        t = tl.load(ptrs, mask=cols[None, :] < N_CHUNKS, other=0)
        tl.store(ptrs, run[:, None] + tl.cumsum(t, axis=1) - t, mask=cols[None, :] < N_CHUNKS)
        run += tl.sum(t, axis=1)
    tl.store(totals_ptr + lanes, run)


@triton.jit
def place_kernel(ids_ptr, map_ptr, local_ptr, rank_ptr, before_ptr, totals_ptr, sorted_ptr,
                 block_expert_ptr, tpe_ptr, offsets_ptr, padded_ptr, N, E, NUM_LOCAL, N_BLOCKS,
                 BLOCKS_PER_PROG, P, FILL, N_CHUNKS, FUSED: tl.constexpr, BLOCK: tl.constexpr,
                 E_POW2: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr):
    """FUSED (one chunk holds every slot): count here too, in one launch instead of three."""
    c = tl.program_id(0)
    lanes = tl.arange(0, E_POW2)
    is_expert = lanes < NUM_LOCAL
    if FUSED:
        offs, loc, rank, total = _chunk(0, ids_ptr, map_ptr, local_ptr, sorted_ptr, N, E,
                                        NUM_LOCAL, P, FILL, E_POW2, CHUNK)
        tl.debug_barrier()  # the sentinels are written before slots are placed over them
    else:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        loc = tl.load(local_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
        rank = tl.load(rank_ptr + offs, mask=offs < N, other=0)
        total = tl.load(totals_ptr + lanes)
    total = tl.where(is_expert, total, 0)
    padded = (total + BLOCK - 1) // BLOCK * BLOCK
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    if c == 0:  # lanes 0..e of the exclusive sums are the [e + 1] offsets
        tl.store(tpe_ptr + lanes, total, mask=is_expert)
        tl.store(offsets_ptr + lanes, tl.cumsum(total, axis=0) - total, mask=lanes <= NUM_LOCAL)
        tl.store(padded_ptr + lanes, padded_start, mask=lanes <= NUM_LOCAL)

    # This program's share of the block -> expert table (-1 past the last expert's blocks).
    for b0 in range(c * BLOCKS_PER_PROG, c * BLOCKS_PER_PROG + BLOCKS_PER_PROG, SUB):
        b = b0 + tl.arange(0, SUB)
        ended = (padded_end[None, :] <= b[:, None] * BLOCK) & is_expert[None, :]
        expert = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(expert < NUM_LOCAL, expert, -1),
                 mask=b < N_BLOCKS)

    # Positions of this chunk's local slots (the slots of its expert in earlier chunks: the
    # scanned counts, gathered from memory; none before the one chunk of a fused launch).
    mine = loc >= 0
    e_of = tl.where(mine, loc, 0)
    dest = tl.gather(padded_start, e_of, 0) + rank
    if not FUSED:
        dest += tl.load(before_ptr + e_of * N_CHUNKS + c, mask=mine, other=0)
    tl.store(sorted_ptr + dest, offs.to(tl.int32), mask=mine)
