"""Triton kernels of the triton experts backend (imported only where triton is installed).

Loads, stores and tl.dot, nothing NVIDIA-only (run with CUDA Triton so far). The contiguous
operands (expert weights; the down GEMM's intermediate rows) come either through pointers or
through tensor descriptors (``DESC``; TMA copies on Hopper, which Triton's pipeliner overlaps
with the matrix instructions); the gathered input rows of the gate/up GEMM always through
pointers (Hopper's TMA has no row gather). TRITON_INTERPRET=1 runs both forms on CPUs
(float16/float32 there).
"""

import triton
import triton.language as tl


@triton.jit
def _tile(t, block_expert_ptr, sorted_ptr, N_SLOTS, N_OUT, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """Tile ``t``: (row block, column tile). Column tiles vary fastest in tile order, so the
    tiles running together share the block's input rows and the expert's weights in L2 (with
    the block index fastest, every input block was re-read from HBM once per column tile).
    Returns the block's local expert (-1: unused block), slot positions, slot ids, which slots
    are real, the tile's first column, its columns and their bound mask."""
    n_tiles = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = t // n_tiles
    e = tl.load(block_expert_ptr + pid_m)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_p)
    n_start = (t % n_tiles) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    return e, offs_p, slot, slot < N_SLOTS, n_start, offs_n, offs_n < N_OUT


@triton.jit
def _num_tiles(num_padded_ptr, N_OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tiles of the blocks in use (``layout.num_padded``, read on the device): a PERSISTENT
    launch loops over these only, so its cost follows the rows received, not the capacity
    its buffers were sized for (every block below num_padded has a local expert)."""
    return tl.load(num_padded_ptr) // BLOCK_M * tl.cdiv(N_OUT, BLOCK_N)


@triton.jit
def _k_mask(offs_k, K, EVEN_K: tl.constexpr):
    """Bound mask along the reduction dim; all-true constant when K % BLOCK_K == 0."""
    if EVEN_K:
        return tl.full(offs_k.shape, 1, tl.int1)
    return offs_k < K


@triton.jit
def _w_tile(w, row0, n_ok, k0, offs_k, k_ok, stride_wn, DESC: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile (transposed for tl.dot) of a weight matrix seen as 2-D
    [experts x out rows, in dim]: rows row0 + [0, BLOCK_N), columns k0 + offs_k. The
    descriptor zero-fills past the matrix and does not stop at ``n_ok`` (callers mask those
    output columns when they store)."""
    if DESC:
        t = w.load([row0, k0]).T
    else:  # (an early return would not stop Triton from compiling the pointer path too)
        rows = row0.to(tl.int64) + tl.arange(0, BLOCK_N)
        t = tl.load(w + rows[None, :] * stride_wn + offs_k[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
    return t


@triton.jit
def _activate(g, u, OAI: tl.constexpr, ALPHA: tl.constexpr, CLAMP: tl.constexpr,
              LIMIT: tl.constexpr):
    """The gated activation of float32 gate and up tiles: silu(g) * u, or gpt-oss's (OAI)
    (min(u, L) clamped to [-L, L] + 1) * g * sigmoid(ALPHA * g) with g = min(g, L) (CLAMP)."""
    if OAI:
        if CLAMP:
            g = tl.minimum(g, LIMIT)
            u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        return (u + 1.0) * (g / (1.0 + tl.exp(-ALPHA * g)))
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _gate_up_tile(
    t, x_ptr, w13, inter_ptr, sorted_ptr, block_expert_ptr, b13_ptr, weight_ptr, N_SLOTS, H, I,
    K_TOPK, stride_xr, stride_wn, stride_ip, EVEN_K: tl.constexpr, DESC: tl.constexpr,
    BIAS: tl.constexpr, ON_INPUT: tl.constexpr, OAI: tl.constexpr, ALPHA: tl.constexpr,
    CLAMP: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, offs_p, slot, valid, n_start, offs_n, n_ok = _tile(t, block_expert_ptr, sorted_ptr,
                                                          N_SLOTS, I, BLOCK_M, BLOCK_N)
    if e >= 0:
        row = tl.where(valid, slot // K_TOPK, 0).to(tl.int64)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ON_INPUT:  # the slot's routing weight in x's dtype, as weighting.weight_inputs
            w_in = tl.load(weight_ptr + slot, mask=valid, other=0.0)
            w_in = w_in.to(x_ptr.dtype.element_ty).to(tl.float32)
        n0 = e * 2 * I + n_start  # first weight row of the gate tile; the up tile's is n0 + I
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = _k_mask(offs_k, H, EVEN_K)
            a = tl.load(x_ptr + row[:, None] * stride_xr + offs_k[None, :],
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            if ON_INPUT:  # rounded to x's dtype: the model scales its input there
                a = (a.to(tl.float32) * w_in[:, None]).to(x_ptr.dtype.element_ty)
            g = _w_tile(w13, n0, n_ok, k0, offs_k, k_ok, stride_wn, DESC, BLOCK_N)
            u = _w_tile(w13, n0 + I, n_ok, k0, offs_k, k_ok, stride_wn, DESC, BLOCK_N)
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        if BIAS:  # [e, 2I] in x's dtype: gate columns then up columns
            b = b13_ptr + e.to(tl.int64) * 2 * I + offs_n
            acc_g += tl.load(b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b + I, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(acc_g, acc_u, OAI, ALPHA, CLAMP, LIMIT)
        tl.store(inter_ptr + offs_p[:, None].to(tl.int64) * stride_ip + offs_n[None, :],
                 h.to(inter_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _gate_up_kernel(
    x_ptr, w13, inter_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, b13_ptr, weight_ptr,
    N_SLOTS, H, I, K_TOPK,
    stride_xr, stride_wn, stride_ip, EVEN_K: tl.constexpr, DESC: tl.constexpr,
    PERSISTENT: tl.constexpr, BIAS: tl.constexpr, ON_INPUT: tl.constexpr, OAI: tl.constexpr,
    ALPHA: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[p, n] = act(x[row(p)] @ gate[e].T, x[row(p)] @ up[e].T) for the padded slot
    positions p of one block (one local expert e per block; its sentinel rows get zeros);
    act = silu(gate) * up, or gpt-oss's clamped SwiGLU (OAI; ``_activate``).
    ``w13``: the weights as [e * 2I, H] (pointer, or descriptor of [BLOCK_N, BLOCK_K] tiles).
    Expert variants: ``BIAS``: ``b13`` [e, 2I] added to gate and up; ``ON_INPUT``: each row
    scaled by its slot's routing weight (``weight_ptr`` [R * K]) before the GEMM (Llama 4).
    One tile per program, or PERSISTENT: the programs stride over the tiles in use."""
    if PERSISTENT:
        for t in range(tl.program_id(0), _num_tiles(num_padded_ptr, I, BLOCK_M, BLOCK_N),
                       tl.num_programs(0)):
            _gate_up_tile(t, x_ptr, w13, inter_ptr, sorted_ptr, block_expert_ptr, b13_ptr,
                          weight_ptr, N_SLOTS, H, I, K_TOPK, stride_xr, stride_wn, stride_ip,
                          EVEN_K, DESC, BIAS, ON_INPUT, OAI, ALPHA, CLAMP, LIMIT, BLOCK_M,
                          BLOCK_N, BLOCK_K)
    else:
        _gate_up_tile(tl.program_id(0), x_ptr, w13, inter_ptr, sorted_ptr, block_expert_ptr,
                      b13_ptr, weight_ptr, N_SLOTS, H, I, K_TOPK, stride_xr, stride_wn,
                      stride_ip, EVEN_K, DESC, BIAS, ON_INPUT, OAI, ALPHA, CLAMP, LIMIT,
                      BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _down_tile(
    t, inter, w2, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr, b2_ptr, N_SLOTS, H, I,
    stride_ip, stride_wn, stride_os,
    WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, DESC: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, offs_p, slot, valid, n_start, offs_n, n_ok = _tile(t, block_expert_ptr, sorted_ptr,
                                                          N_SLOTS, H, BLOCK_M, BLOCK_N)
    if e >= 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n0 = e * H + n_start
        p0 = t // tl.cdiv(H, BLOCK_N) * BLOCK_M  # the block's first position
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = _k_mask(offs_k, I, EVEN_K)
            if DESC:
                a = inter.load([p0, k0])
            else:
                a = tl.load(inter + offs_p[:, None].to(tl.int64) * stride_ip + offs_k[None, :],
                            mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = _w_tile(w2, n0, n_ok, k0, offs_k, k_ok, stride_wn, DESC, BLOCK_N)
            acc = tl.dot(a, b, acc)
        if BIAS:  # [e, H] in the output's dtype, before the routing weight
            acc += tl.load(b2_ptr + e.to(tl.int64) * H + offs_n, mask=n_ok,
                           other=0.0).to(tl.float32)[None, :]
        if WEIGHTED:
            w = tl.load(weight_ptr + slot, mask=valid, other=0.0)
            acc = acc * w[:, None]
        safe = tl.where(valid, slot, 0).to(tl.int64)
        tl.store(out_ptr + safe[:, None] * stride_os + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    inter, w2, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr, num_padded_ptr, b2_ptr,
    N_SLOTS, H, I,
    stride_ip, stride_wn, stride_os,
    WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, DESC: tl.constexpr, PERSISTENT: tl.constexpr,
    BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[slot(p), n] = (inter[p] @ down[e].T)[n] (plus ``b2`` [e, H] when BIAS), times the
    slot's routing weight when WEIGHTED (the epilogue); rows are written only for real slots.
    ``inter`` [P, I] and ``w2`` as [e * H, I]: pointers, or descriptors of [BLOCK_M, BLOCK_K]
    and [BLOCK_N, BLOCK_K] tiles. One tile per program, or PERSISTENT: the programs stride
    over the tiles in use."""
    if PERSISTENT:
        for t in range(tl.program_id(0), _num_tiles(num_padded_ptr, H, BLOCK_M, BLOCK_N),
                       tl.num_programs(0)):
            _down_tile(t, inter, w2, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr, b2_ptr,
                       N_SLOTS, H, I, stride_ip, stride_wn, stride_os, WEIGHTED, EVEN_K, DESC,
                       BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _down_tile(tl.program_id(0), inter, w2, out_ptr, sorted_ptr, block_expert_ptr,
                   weight_ptr, b2_ptr, N_SLOTS, H, I, stride_ip, stride_wn, stride_os, WEIGHTED,
                   EVEN_K, DESC, BIAS, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _slot_sum_kernel(slots_ptr, local_ptr, out_ptr, num_rows_ptr, R, H, K_TOPK: tl.constexpr,
                     BOUNDED: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r] = sum over the local slots k (local id >= 0) of slots[r * K + k], in float32, slot
    order. The K slots are unrolled, each load predicated on its slot's local id, so no load
    waits on a branch (a loop that branched on each id waited for it before the next load) and
    rows of non-local slots are never read (they need no zero fill). The programs stride over
    the rows: all R, or BOUNDED: the first ``num_rows[0]`` (read on the device; the rest of
    ``out`` is not written)."""
    end = tl.load(num_rows_ptr) if BOUNDED else R
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    for r in range(tl.program_id(0), end, tl.num_programs(0)):
        r64 = tl.cast(r, tl.int64)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(K_TOPK):
            stop = tl.where(tl.load(local_ptr + r64 * K_TOPK + k) >= 0, H, 0)  # non-local: none
            acc += tl.load(slots_ptr + (r64 * K_TOPK + k) * H + h, mask=h < stop,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + r64 * H + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)
