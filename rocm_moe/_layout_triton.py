"""Triton kernels behind ``layout.build_layout(..., tables=False)`` (imported only where triton
is installed): the same block-aligned layout as the sort, in two launches (one for up to 512
slots) and no host sync.

Slots are cut into chunks, one program each. ``count``: each program maps its slots' global
ids to local ids, counts its slots per local expert into ``counts[chunk, :]`` (column e takes
the non-local slots) and writes the sentinel over its share of the padded slot list. ``place``:
each program reads the whole (small) counts table, so it knows every expert's total (hence the
padded offsets) and how many slots of each expert the chunks before it hold; a slot's position
is padded_offset[expert] + earlier chunks' count + its rank among the same expert's slots in
this chunk, which is exactly the stable sort's order. The ranks inside a chunk come from an
[SUB, SUB] comparison per sub-tile plus a running per-expert count (one-hot sums: Triton has
no register gather). SUB and CT keep every 2-D temporary near 8K elements (32 per thread at 8
warps): at [128, 256] the place kernel spilled and took 53 us for 8 slots on an H100.

Nothing NVIDIA-only: plain loads, stores and reductions.
"""

import triton
import triton.language as tl


@triton.jit
def _count_chunk(c, ids_ptr, map_ptr, local_ptr, sorted_ptr, N, E, NUM_LOCAL, CHUNK, P, FILL,
                 E_POW2: tl.constexpr, SUB: tl.constexpr):
    """Local ids of chunk c's slots (stored), its per-expert counts (returned; lane e counts
    the non-local slots) and the sentinel over its share [c * FILL, (c + 1) * FILL) of the
    padded slot list."""
    lanes = tl.arange(0, E_POW2)
    hist = tl.zeros([E_POW2], dtype=tl.int32)
    for s0 in range(0, tl.minimum(CHUNK, N - c * CHUNK), SUB):
        offs = c * CHUNK + s0 + tl.arange(0, SUB)
        ok = offs < N
        g = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
        known = ok & (g >= 0) & (g < E)
        loc = tl.load(map_ptr + tl.where(known, g, 0), mask=known, other=-1)
        tl.store(local_ptr + offs, loc, mask=ok)
        key = tl.where(ok, tl.where(loc >= 0, loc, NUM_LOCAL), E_POW2)  # E_POW2: no bin
        hist += tl.sum((key[:, None] == lanes[None, :]).to(tl.int32), axis=0)
    sentinel = N
    for f0 in range(c * FILL, c * FILL + FILL, 1024):
        offs = f0 + tl.arange(0, 1024)
        tl.store(sorted_ptr + offs, tl.zeros([1024], dtype=tl.int32) + sentinel,
                 mask=(offs < P) & (offs < c * FILL + FILL))
    return hist


@triton.jit
def count_kernel(ids_ptr, map_ptr, local_ptr, counts_ptr, sorted_ptr,
                 N, E, NUM_LOCAL, CHUNK, P, FILL,
                 E_POW2: tl.constexpr, SUB: tl.constexpr):
    c = tl.program_id(0)
    hist = _count_chunk(c, ids_ptr, map_ptr, local_ptr, sorted_ptr, N, E, NUM_LOCAL, CHUNK, P,
                        FILL, E_POW2, SUB)
    tl.store(counts_ptr + c * E_POW2 + tl.arange(0, E_POW2), hist)


@triton.jit
def place_kernel(ids_ptr, map_ptr, local_ptr, counts_ptr, sorted_ptr, block_expert_ptr, tpe_ptr,
                 offsets_ptr, padded_ptr, N, E, NUM_LOCAL, CHUNK, N_CHUNKS, N_BLOCKS,
                 BLOCKS_PER_PROG, P, FILL, FUSED: tl.constexpr, BLOCK: tl.constexpr,
                 E_POW2: tl.constexpr, SUB: tl.constexpr, CT: tl.constexpr):
    """FUSED (one chunk holds every slot): count here too, in one launch instead of two."""
    c = tl.program_id(0)
    lanes = tl.arange(0, E_POW2)
    is_expert = lanes < NUM_LOCAL
    total = tl.zeros([E_POW2], dtype=tl.int32)
    before = tl.zeros([E_POW2], dtype=tl.int32)  # slots of each expert in chunks < c
    if FUSED:
        total = _count_chunk(0, ids_ptr, map_ptr, local_ptr, sorted_ptr, N, E, NUM_LOCAL,
                             CHUNK, P, FILL, E_POW2, SUB)
        tl.debug_barrier()  # local ids and sentinels are written before they are read below
    else:
        for r0 in range(0, N_CHUNKS, CT):
            rows = r0 + tl.arange(0, CT)
            t = tl.load(counts_ptr + rows[:, None] * E_POW2 + lanes[None, :],
                        mask=rows[:, None] < N_CHUNKS, other=0)
            total += tl.sum(t, axis=0)
            before += tl.sum(tl.where(rows[:, None] < c, t, 0), axis=0)
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

    # Positions of this chunk's local slots.
    running = padded_start + before
    i = tl.arange(0, SUB)
    for s0 in range(0, tl.minimum(CHUNK, N - c * CHUNK), SUB):
        offs = c * CHUNK + s0 + i
        ok = offs < N
        loc = tl.load(local_ptr + offs, mask=ok, other=-1)
        mine = ok & (loc >= 0)
        key = tl.where(mine, loc, E_POW2)
        onehot = (key[:, None] == lanes[None, :]).to(tl.int32)
        earlier = ((key[:, None] == key[None, :]) & (i[None, :] < i[:, None])).to(tl.int32)
        dest = tl.sum(onehot * running[None, :], axis=1) + tl.sum(earlier, axis=1)
        tl.store(sorted_ptr + dest, offs.to(tl.int32), mask=mine)
        running += tl.sum(onehot, axis=0)
