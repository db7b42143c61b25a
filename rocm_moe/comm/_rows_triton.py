"""Triton kernels behind rocm_moe.comm.rows (imported only where triton is installed).

Nothing here is NVIDIA-only (plain loads and stores); run with CUDA Triton so far.
"""

import triton
import triton.language as tl


@triton.jit
def pack_rows_kernel(x_ptr, meta_ptr, csum_ptr, pos_ptr, send_ptr, T, XW, MW, RW, W,
                     BLOCK: tl.constexpr):
    """One program per (token, block of row words): read once, write to every destination.

    x_ptr [T, XW] int32 words of x; meta_ptr [T, MW] int32 (ids then weight bits);
    csum_ptr [W, T] int64 inclusive prefix counts per destination; pos_ptr [T, W] int64 out
    (written by the first block of each token); send_ptr [P, RW] int32.
    """
    t = tl.program_id(0).to(tl.int64)
    first_block = tl.program_id(1) == 0
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_x = j < XW
    in_meta = (j >= XW) & (j < XW + MW)
    v = tl.load(x_ptr + t * XW + j, mask=in_x, other=0)
    m = tl.load(meta_ptr + t * MW + (j - XW), mask=in_meta, other=0)
    v = tl.where(in_x, v, m)
    offset = tl.zeros([], dtype=tl.int64)  # rows of the destinations before d
    for d in range(W):
        c = tl.load(csum_ptr + d * T + t)
        prev = tl.load(csum_ptr + d * T + t - 1, mask=t > 0, other=0)
        p = tl.where(c > prev, offset + c - 1, -1)
        if first_block:
            tl.store(pos_ptr + t * W + d, p)
        if p >= 0:
            tl.store(send_ptr + p * RW + j, v, mask=j < RW)
        offset += tl.load(csum_ptr + d * T + T - 1)


@triton.jit
def gather_sum_kernel(back_ptr, pos_ptr, out_ptr, H, W, BLOCK: tl.constexpr):
    """out[t, h] = sum_d back[pos[t, d], h] over d in order, float32 accumulation.

    back_ptr [S, H]; pos_ptr [T, W] int64 (-1 = no partial); out_ptr [T, H] (back's dtype).
    Example: pos = [[0, 2], [1, -1]], back rows b0, b1, b2 -> out = [b0 + b2, b1].
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    hm = h < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for d in range(W):
        p = tl.load(pos_ptr + t * W + d)
        if p >= 0:
            acc += tl.load(back_ptr + p * H + h, mask=hm, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=hm)
