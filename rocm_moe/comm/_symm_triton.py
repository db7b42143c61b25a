"""Triton kernels behind rocm_moe.comm.symm (imported only where triton is installed).

Every rank holds one symmetric buffer (same size on every rank, mapped into every peer's
address space by torch symmetric memory). ``ptrs_ptr`` is a [W] int64 tensor of the buffers'
base addresses as seen from this rank; a section of peer d's buffer is ``ptrs[d] + offset``
(bytes), cast to a typed pointer. Sections (``comm.symm`` lays them out): received rows, their
ids, weights and token indices, the partials coming back, the [W, W] count matrix, the barrier
flags.

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
def route_counts_kernel(ids_ptr, dest1_ptr, pos_ptr, ptrs_ptr, T, K, me, W, CAP, COUNTS_OFF,
                        FLAG_OFF, status_ptr, K_POW2: tl.constexpr, W_POW2: tl.constexpr,
                        CHUNK: tl.constexpr, SPIN: tl.constexpr):
    """Grid (W,): every program scans this rank's [T, K] ids (int32, -1 = empty) in chunks:
    a token goes once to each unique owner rank (``dest1[g + 1]`` = owner(g) + 1, 0 for -1);
    its index among the tokens sent to rank d is the running count. Program 0 stores
    pos[t, d] = d * CAP + index (its partial's row in this rank's back section), or -1.
    Program p then writes the totals (this rank's send counts) into row ``me`` of peer p's
    [W, W] count matrix, signals p and waits for p's row: after the launch every rank holds
    the whole matrix.
    Example: W = 2, owners of the slots per token [[0, 0], [1, 0], [1, 1]]: pos = [[0, -1],
    [1, CAP + 0], [-1, CAP + 1]], counts [2, 2]."""
    p = tl.program_id(0)
    kk = tl.arange(0, K_POW2)
    d = tl.arange(0, W_POW2)
    carry = tl.zeros([W_POW2], dtype=tl.int32)
    for c in range(0, T, CHUNK):
        t = c + tl.arange(0, CHUNK)
        ok = (t[:, None] < T) & (kk[None, :] < K)
        g = tl.load(ids_ptr + t[:, None] * K + kk[None, :], mask=ok, other=-1)
        dest1 = tl.load(dest1_ptr + g + 1, mask=ok, other=0)  # [CHUNK, K_POW2]
        hit = dest1[:, :, None] == (d + 1)[None, None, :]  # [CHUNK, K_POW2, W_POW2]
        sent = tl.max(hit.to(tl.int32), axis=1)  # [CHUNK, W_POW2]
        idx = tl.cumsum(sent, axis=0) + carry[None, :] - 1
        if p == 0:
            pos = tl.where(sent > 0, d[None, :].to(tl.int64) * CAP + idx, -1)
            tl.store(pos_ptr + t[:, None].to(tl.int64) * W + d[None, :], pos,
                     mask=(t[:, None] < T) & (d[None, :] < W))
        carry += tl.sum(sent, axis=0)
    dst = _addr(ptrs_ptr, p, COUNTS_OFF + me * W * 4).to(tl.pointer_type(tl.int32))
    tl.store(dst + d, carry, mask=d < W)
    _signal_wait(ptrs_ptr, p, me, FLAG_OFF, status_ptr, SPIN)


@triton.jit
def pack_put_kernel(x_ptr, ids_ptr, w_ptr, pos_ptr, counts_ptr, ptrs_ptr, XW, K, RW, me, W,
                    CAP, RECV_OFF, IDS_OFF, WTS_OFF, TOK_OFF, K_POW2: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Grid (T, blocks of row words): token t's payload row [x words | pad] goes to every peer
    d with pos[t, d] >= 0, at row (rows that ranks below this one send to d, from the [W, W]
    count matrix ``counts_ptr``) + pos[t, d] - d * CAP of d's receive section; the programs of
    the first block also write its K ids and K weights to the same row of d's ids and weights
    sections ([rows, K] each, so the receiver's routing is contiguous) and t to its token
    section (where combine_raw sends the row's slots back).

    x_ptr [T, XW] int32 words; ids_ptr [T, K] int32; w_ptr [T, K] float32; pos_ptr [T, W]
    int64 (``route_counts_kernel``'s). Example: W = 2, this is rank 1, its tokens 0 and 2 go
    to rank 0 (pos[:, 0] = [0, -1, 1]) where rank 0 keeps 5 rows of its own (counts[0, 0] =
    5): they land on rank 0's rows 5 and 6.
    """
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + t * XW + j, mask=j < XW, other=0)  # pad words: 0
    kk = tl.arange(0, K_POW2)
    km = kk < tl.where(tl.program_id(1) == 0, K, 0)  # the first block's programs only
    ids = tl.load(ids_ptr + t * K + kk, mask=km, other=-1)
    w = tl.load(w_ptr + t * K + kk, mask=km, other=0.0)
    for d in range(W):
        p = tl.load(pos_ptr + t * W + d)
        if p >= 0:
            base = p - d * CAP
            for s in range(me):
                base += tl.load(counts_ptr + s * W + d)
            peer = tl.load(ptrs_ptr + d)
            # One aligned scalar row pointer: the stores stay 16-byte vectors (rows are padded
            # to 16 bytes; an address cast to a pointer carries no alignment of its own).
            dst = (peer + RECV_OFF + base * RW * 4).to(tl.pointer_type(tl.int32))
            dst = tl.multiple_of(dst, 16)
            tl.store(dst + j, v, mask=j < RW)
            meta = base * K * 4
            tl.store((peer + IDS_OFF + meta).to(tl.pointer_type(tl.int32)) + kk, ids, mask=km)
            tl.store((peer + WTS_OFF + meta).to(tl.pointer_type(tl.float32)) + kk, w, mask=km)
            tok = (peer + TOK_OFF + base * 4).to(tl.pointer_type(tl.int32))
            tl.store(tok + kk, t.to(tl.int32) + kk * 0, mask=(kk == 0) & km)


@triton.jit
def barrier_scrub_kernel(ptrs_ptr, me, W, FLAG_OFF, status_ptr, counts_ptr, recv_ptr,
                         nvalid_ptr, ids_ptr, w_ptr, K, N_ROWS, SPIN: tl.constexpr,
                         K_POW2: tl.constexpr, W_POW2: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (W + scrub programs,): programs p < W are a barrier (every rank's rows have
    arrived); the others, meanwhile, copy column ``me`` of the count matrix (rows received
    from each rank) to ``recv_ptr`` [W] and R to ``nvalid_ptr`` [1], and mark every row at or
    past R empty in this rank's ids and weights sections (``ids_ptr`` / ``w_ptr``, [N_ROWS, K]:
    ids -1, weights 0). Peers only write rows below R, so both run at once."""
    p = tl.program_id(0)
    if p < W:
        _signal_wait(ptrs_ptr, p, me, FLAG_OFF, status_ptr, SPIN)
    else:
        q = tl.arange(0, W_POW2)
        recv = tl.load(counts_ptr + q * W + me, mask=q < W, other=0)
        R = tl.sum(recv, axis=0)
        if p == W:
            tl.store(recv_ptr + q, recv, mask=q < W)
            tl.store(nvalid_ptr, R)
        r = (p - W) * BLOCK_R + tl.arange(0, BLOCK_R)
        kk = tl.arange(0, K_POW2)
        m = (r[:, None] >= R) & (r[:, None] < N_ROWS) & (kk[None, :] < K)
        at = r[:, None].to(tl.int64) * K + kk[None, :]
        tl.store(ids_ptr + at, tl.full([BLOCK_R, K_POW2], -1, tl.int32), mask=m)
        tl.store(w_ptr + at, tl.zeros([BLOCK_R, K_POW2], dtype=tl.float32), mask=m)


@triton.jit
def _received(recv_ptr, W):
    """R: the rows received from all W ranks (``recv_ptr`` [W], rank order)."""
    R = tl.load(recv_ptr)
    for q in range(1, W):
        R += tl.load(recv_ptr + q)
    return R


@triton.jit
def _row_source(recv_ptr, W, r):
    """(source rank, its first received row) of received row r (rows are in rank order)."""
    src = 0
    start = 0
    end = 0
    for q in range(W):
        c = tl.load(recv_ptr + q)
        past = r >= end + c
        src = tl.where(past, q + 1, src)
        start = tl.where(past, end + c, start)
        end += c
    return src, start


@triton.jit
def _row_mask(hm, flag):
    """``hm`` and-ed with one row's scalar flag, as a [BLOCK_H] mask (Triton's interpreter
    refuses a tensor mask and-ed with a scalar one, so CPU tests could not run the push
    kernels)."""
    return hm & ((tl.zeros_like(hm).to(tl.int32) + flag.to(tl.int32)) != 0)


@triton.jit
def _store_row(addr, h, v, m, ALIGNED: tl.constexpr):
    """Store one row's block ``v`` at the peer address ``addr`` (an int64 byte address) + h,
    through one scalar base pointer, so the stores stay contiguous and vectorised; ALIGNED:
    rows 16-byte aligned (H * itemsize % 16 == 0), so the 16-byte store hint holds."""
    dst = addr.to(tl.pointer_type(v.dtype))
    if ALIGNED:
        dst = tl.multiple_of(dst, 16)
    tl.store(dst + h, v, mask=m)


@triton.jit
def push_back_kernel(y_ptr, y_stride, recv_ptr, ptrs_ptr, me, W, CAP, H, BACK_OFF,
                     ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (P programs over row blocks, blocks of H): received rows r < R send y[r] (row stride
    ``y_stride`` elements) to their source rank's back section, at row (this rank) * CAP + (r's
    index among the rows from that source). Row sources come from ``recv_ptr`` [W] (rows
    received from each rank); program p takes row blocks p, p + P, ... below R, so the launch is
    sized by at most P, not by the capacity (issue 33: a grid over 16384 rows' blocks, all but
    one exiting at once, cost 4.3 us at 1 received row). Each row goes through one scalar base
    pointer (``_store_row``; a pointer per element, built from a tensor of addresses, made the
    stores scalar: combine ran at a third of the speed)."""
    ELEM: tl.constexpr = y_ptr.dtype.element_ty.primitive_bitwidth // 8
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    R = _received(recv_ptr, W)
    for r0 in range(tl.program_id(0) * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        for rr in tl.static_range(BLOCK_R):
            r = r0 + rr
            src, start = _row_source(recv_ptr, W, r)
            ok = r < R
            m = _row_mask(hm, ok)
            v = tl.load(y_ptr + r.to(tl.int64) * y_stride + h, mask=m)
            row = tl.load(ptrs_ptr + src, mask=ok, other=0) + BACK_OFF + \
                (me * CAP + r - start).to(tl.int64) * H * ELEM
            _store_row(row, h, v, m, ALIGNED)


@triton.jit
def push_raw_kernel(y_ptr, local_ptr, recv_ptr, tok_ptr, ptrs_ptr, me, W, K, H, K0, N, P,
                    BACK_OFF, ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """Grid (P programs over row blocks, blocks of H): one round of combine_raw. Received row
    r < R's raw outputs y[r, k] ([R, K, H] contiguous) of the round's slots k in [K0, K0 + N)
    with ``local[r, k]`` != 0 (int8: expert local here) go to row tok[r] * P + k - K0 of their
    source rank's back section, tok[r] being the row's token index on its source (the lane's
    token section, written by ``pack_put_kernel``; P slots a round, so a source's T * P rows
    fit its W * cap). A slot has one owner, so each valid [t, k] of a source is written by
    exactly one rank. Rows and their sources as in ``push_back_kernel``."""
    ELEM: tl.constexpr = y_ptr.dtype.element_ty.primitive_bitwidth // 8
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    R = _received(recv_ptr, W)
    for r0 in range(tl.program_id(0) * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        for rr in tl.static_range(BLOCK_R):
            r = r0 + rr
            src, _ = _row_source(recv_ptr, W, r)
            ok = r < R
            t = tl.load(tok_ptr + r, mask=ok, other=0).to(tl.int64)
            base = tl.load(ptrs_ptr + src, mask=ok, other=0) + BACK_OFF
            for i in range(N):
                k = K0 + i
                sel = tl.load(local_ptr + r.to(tl.int64) * K + k, mask=ok, other=0) != 0
                m = _row_mask(hm, ok & sel)
                v = tl.load(y_ptr + (r.to(tl.int64) * K + k) * H + h, mask=m)
                _store_row(base + (t * P + i) * H * ELEM, h, v, m, ALIGNED)
