"""Triton kernels of the triton experts backend (imported only where triton is installed).

Plain loads, stores and tl.dot, nothing NVIDIA-only (run with CUDA Triton so far);
TRITON_INTERPRET=1 runs them on CPUs (float16/float32 there).
"""

import triton
import triton.language as tl


@triton.jit
def _tile(block_expert_ptr, sorted_ptr, N_SLOTS, N_OUT, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """The (row block, column tile) of this program. Column tiles vary fastest in launch order,
    so the programs running together share the block's input rows and the expert's weights
    in L2 (with the block index fastest, every input block was re-read from HBM once per
    column tile). Returns the block's local expert (-1: unused block), slot positions, slot
    ids, which slots are real, and the tile's columns with their bound mask."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // n_tiles
    e = tl.load(block_expert_ptr + pid_m)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_p)
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, offs_p, slot, slot < N_SLOTS, offs_n, offs_n < N_OUT


@triton.jit
def _k_mask(offs_k, K, EVEN_K: tl.constexpr):
    """Bound mask along the reduction dim; all-true constant when K % BLOCK_K == 0."""
    if EVEN_K:
        return tl.full(offs_k.shape, 1, tl.int1)
    return offs_k < K


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, inter_ptr, sorted_ptr, block_expert_ptr,
    N_SLOTS, H, I, K_TOPK,
    stride_xr, stride_we, stride_wn, stride_ip, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[p, n] = silu(x[row(p)] @ gate[e].T) * (x[row(p)] @ up[e].T) for the padded slot
    positions p of one block (one local expert e per block; sentinel slots give zeros)."""
    e, offs_p, slot, valid, offs_n, n_ok = _tile(block_expert_ptr, sorted_ptr, N_SLOTS, I,
                                                 BLOCK_M, BLOCK_N)
    if e < 0:
        return
    row = tl.where(valid, slot // K_TOPK, 0).to(tl.int64)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w13_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = _k_mask(offs_k, H, EVEN_K)
        a = tl.load(x_ptr + row[:, None] * stride_xr + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        u = tl.load(w_base + (offs_n[None, :] + I) * stride_wn + offs_k[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(inter_ptr + offs_p[:, None].to(tl.int64) * stride_ip + offs_n[None, :],
             h.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    inter_ptr, w2_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
    N_SLOTS, H, I,
    stride_ip, stride_we, stride_wn, stride_os,
    WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[slot(p), n] = (inter[p] @ down[e].T)[n], times the slot's routing weight when
    WEIGHTED (the epilogue); rows are written only for real slots."""
    e, offs_p, slot, valid, offs_n, n_ok = _tile(block_expert_ptr, sorted_ptr, N_SLOTS, H,
                                                 BLOCK_M, BLOCK_N)
    if e < 0:
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w2_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = _k_mask(offs_k, I, EVEN_K)
        a = tl.load(inter_ptr + offs_p[:, None].to(tl.int64) * stride_ip + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    if WEIGHTED:
        w = tl.load(weight_ptr + slot, mask=valid, other=0.0)
        acc = acc * w[:, None]
    safe = tl.where(valid, slot, 0).to(tl.int64)
    tl.store(out_ptr + safe[:, None] * stride_os + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _slot_sum_kernel(slots_ptr, local_ptr, out_ptr, H, K_TOPK, BLOCK_H: tl.constexpr):
    """out[r] = sum over the local slots k (local id >= 0) of slots[r * K + k] (float32, slot
    order); rows of non-local slots are never read, so they need no zero fill."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(K_TOPK):
        if tl.load(local_ptr + r * K_TOPK + k) >= 0:
            acc += tl.load(slots_ptr + (r * K_TOPK + k) * H + h, mask=hm, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * H + h, acc.to(out_ptr.dtype.element_ty), mask=hm)
