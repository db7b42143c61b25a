"""Triton kernels behind rocm_moe.comm.symm (imported only where triton is installed).

Every rank holds one symmetric buffer (same size on every rank, mapped into every peer's
address space by torch symmetric memory). ``ptrs_ptr`` is a [W] int64 tensor of the buffers'
base addresses as seen from this rank; a section of peer d's buffer is ``ptrs[d] + offset``
(bytes), cast to a typed pointer. Sections (``comm.symm`` lays them out): received rows, the
partials coming back, the [W, W] count matrix, the barrier flags.

Only plain loads, stores and atomic compare-and-swap at system scope: nothing vendor-specific,
so the same kernels build for CUDA and ROCm (gfx942).

Barrier (``signal_wait``): flag [s] of rank d says "rank s has arrived". Program p of a grid of
W sets flag [me] on peer p from 0 to 1 (spinning until p consumed the previous signal, so
consecutive barriers can share the flags) with release semantics, then waits for its own flag
[p] to turn 1 and resets it to 0 with acquire semantics. Every spin is bounded by ``SPIN``
iterations; a peer that never arrives leaves ``status[p] = 1`` instead of hanging the GPU.
"""

import triton
import triton.language as tl


@triton.jit
def _addr(ptrs_ptr, rank, offset):
    """Byte address of ``offset`` in rank's symmetric buffer (int64)."""
    return tl.load(ptrs_ptr + rank) + offset


@triton.jit
def _signal_wait(ptrs_ptr, peer, me, FLAG_OFF, status_ptr, SPIN: tl.constexpr):
    out_flag = _addr(ptrs_ptr, peer, FLAG_OFF + me * 4).to(tl.pointer_type(tl.int32))
    in_flag = _addr(ptrs_ptr, me, FLAG_OFF + peer * 4).to(tl.pointer_type(tl.int32))
    tl.debug_barrier()  # every thread's earlier stores happen before the release below
    old = tl.atomic_cas(out_flag, 0, 1, sem="release", scope="sys")
    n = 1
    while (old != 0) & (n < SPIN):
        old = tl.atomic_cas(out_flag, 0, 1, sem="release", scope="sys")
        n += 1
    got = tl.atomic_cas(in_flag, 1, 0, sem="acquire", scope="sys")
    m = 1
    while (got != 1) & (m < SPIN):
        got = tl.atomic_cas(in_flag, 1, 0, sem="acquire", scope="sys")
        m += 1
    if (old != 0) | (got != 1):
        tl.store(status_ptr + peer, 1)
    tl.debug_barrier()


@triton.jit
def barrier_kernel(ptrs_ptr, me, FLAG_OFF, status_ptr, SPIN: tl.constexpr):
    """Grid (W,): all ranks' earlier kernels on this stream are done (and their stores to any
    peer visible) once every rank has passed it."""
    _signal_wait(ptrs_ptr, tl.program_id(0), me, FLAG_OFF, status_ptr, SPIN)


@triton.jit
def put_counts_kernel(counts_ptr, ptrs_ptr, me, W, COUNTS_OFF, FLAG_OFF, status_ptr,
                      W_POW2: tl.constexpr, SPIN: tl.constexpr):
    """Grid (W,): program p writes this rank's send counts [W] into row ``me`` of peer p's
    [W, W] count matrix, then signals p and waits for p's row (a barrier carrying data)."""
    p = tl.program_id(0)
    j = tl.arange(0, W_POW2)
    c = tl.load(counts_ptr + j, mask=j < W, other=0)
    dst = _addr(ptrs_ptr, p, COUNTS_OFF + me * W * 4).to(tl.pointer_type(tl.int32))
    tl.store(dst + j, c, mask=j < W)
    _signal_wait(ptrs_ptr, p, me, FLAG_OFF, status_ptr, SPIN)


@triton.jit
def pack_put_kernel(x_ptr, meta_ptr, pos_ptr, base_ptr, ptrs_ptr, XW, MW, RW, W, RECV_OFF,
                    BLOCK: tl.constexpr):
    """Grid (T, blocks of row words): token t's packed row [x words | meta words | pad] goes
    to row ``base[d] + pos[t, d]`` of every peer d's receive section where pos[t, d] >= 0.

    x_ptr [T, XW] int32 words; meta_ptr [T, MW] int32 (ids, weight bits); pos_ptr [T, W]
    int64 (the token's index among the tokens this rank sends to d, -1 if none); base_ptr [W]
    int64 (rows that lower ranks put at d: this rank's first row there).
    Example: W = 2, rank 1 sends tokens 0 and 2 to rank 0, where rank 0 put 5 rows of its own:
    pos[:, 0] = [0, -1, 1], base[0] = 5, so they land on rank 0's rows 5 and 6.
    """
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_x = j < XW
    in_meta = (j >= XW) & (j < XW + MW)
    v = tl.load(x_ptr + t * XW + j, mask=in_x, other=0)
    m = tl.load(meta_ptr + t * MW + (j - XW), mask=in_meta, other=0)
    v = tl.where(in_x, v, m)
    for d in range(W):
        p = tl.load(pos_ptr + t * W + d)
        if p >= 0:
            row = tl.load(base_ptr + d) + p
            dst = _addr(ptrs_ptr, d, RECV_OFF).to(tl.pointer_type(tl.int32))
            tl.store(dst + row * RW + j, v, mask=j < RW)


@triton.jit
def push_back_kernel(y_ptr, y_stride, sel_ptr, src_ptr, back_row_ptr, nvalid_ptr, ptrs_ptr,
                     H, BACK_OFF, NPROG, USE_SEL: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (NPROG, blocks of H): received row i < R (R = nvalid[0], read on the device) sends
    y[i] (row stride ``y_stride`` elements) to row ``back_row[i]`` of the back section of its
    source rank ``src[i]``; with USE_SEL only rows with sel[i] != 0."""
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    R = tl.load(nvalid_ptr)
    for i in range(tl.program_id(0), R, NPROG):
        go = True
        if USE_SEL:
            go = tl.load(sel_ptr + i) != 0
        if go:
            s = tl.load(src_ptr + i)
            brow = tl.load(back_row_ptr + i).to(tl.int64)
            v = tl.load(y_ptr + i.to(tl.int64) * y_stride + h, mask=hm)
            dst = _addr(ptrs_ptr, s, BACK_OFF).to(tl.pointer_type(y_ptr.dtype.element_ty))
            tl.store(dst + brow * H + h, v, mask=hm)
