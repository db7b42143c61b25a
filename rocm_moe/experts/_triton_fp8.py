"""Triton kernels of the FP8 experts (``experts/triton_fp8.py``; imported only with triton).

w8a8 with block scales: FP8 operands into tl.dot (float32 accumulator), each 128-wide K step's
partial product scaled by (row scale of the activations) x (block scale of the weights) before
it is added, the scheme of vLLM's and SGLang's w8a8 block kernels. BLOCK_K is 128, the scale
group, so one K step reads one scale per row and one per weight tile; BLOCK_N divides 128, so a
column tile lies in one weight block. ``UPCAST``: FP8 tiles are converted to float16 (exact:
every e4m3 value is a float16) before tl.dot, for devices without FP8 matrix instructions and
for Triton's interpreter; the products and sums are the same. ``ROUND``: values are rounded to
the FP8 grid (round to nearest even) in float32 before the cast, for Triton's interpreter
(3.9), whose float32 -> FP8 cast drops the carry of a mantissa that rounds up into the next
binade (124.3 -> 64 instead of 128); on GPUs the cast itself rounds (RNE, saturating).

Launch variants (constexprs, chosen by the launch config; issue 31): ``DESC``: the weights (and
the down GEMM's intermediate rows, which are contiguous per block) through tensor descriptors
(TMA on Hopper; the gathered activation rows stay pointer loads); ``AHEAD``: each K
step's scales loaded one step ahead (Triton's pipeliner prefetches only the dot operands: the
scale loads otherwise stall every step on their latency); ``FUSED`` (gate/up): the gate and up
tiles as one [BLOCK_K, 256] operand and one dot (one MMA chain and one wait per K step instead
of two; pointer loads); the down GEMM's BLOCK_N
may be 256 (two weight-scale blocks: the scale product becomes a [BLOCK_M, BLOCK_N] outer
product, computed once per K step). Every variant computes the same sums in the same order.
"""

import triton
import triton.language as tl

from rocm_moe._quant_triton import _quant_rows_kernel, _to_fp8  # noqa: F401 (moved there)
from rocm_moe.experts._triton_kernels import _num_tiles, _tile, _w_tile


@triton.jit
def _fp8_dot(a, b, acc, scale, UPCAST: tl.constexpr, PRECISE: tl.constexpr):
    """acc + (a @ b) * scale, a [M, K] and b [K, N] FP8, float32 accumulation. ``PRECISE``:
    the FP8 products are promoted to a float32 sum after every MMA instruction (Triton's
    default on sm_90 keeps the tensor core's reduced-precision accumulator for the whole dot)."""
    if UPCAST:
        a = a.to(tl.float16)
        b = b.to(tl.float16)
    if PRECISE:
        return acc + tl.dot(a, b, max_num_imprecise_acc=0) * scale
    return acc + tl.dot(a, b) * scale


@triton.jit
def _fp8_gate_up_scales(kb, as_ptr, row, valid, ws_g, ws_u, stride_as):
    """K step ``kb``'s scales of the gate/up tile: the rows' [BLOCK_M], the gate and the up
    weight block's (scalars); multiplied where they are used (``_fp8_gate_up_step``), so a
    load issued a step ahead is not waited for at once."""
    return (tl.load(as_ptr + row * stride_as + kb, mask=valid, other=0.0), tl.load(ws_g + kb),
            tl.load(ws_u + kb))


@triton.jit
def _fp8_gate_up_step(
    kb, acc_g, acc_u, a_s, w_g, w_u, aq_ptr, w_ptr, row, valid, n0, n_ok, H, I, stride_ar,
    stride_wn, UPCAST: tl.constexpr, PRECISE: tl.constexpr, DESC: tl.constexpr,
    FUSED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One 128-wide K step of the gate/up tile: both partial products, each scaled by (row
    scale ``a_s``) x (its weight block's, ``w_g`` / ``w_u``), that product computed once.
    FUSED: one [BLOCK_K, 2 * BLOCK_N] weight tile (the gate rows, then the up rows) and one
    dot into ``acc_g`` [BLOCK_M, 2 * BLOCK_N] (``acc_u`` unused), its scale per column half."""
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < H
    a = tl.load(aq_ptr + row[:, None] * stride_ar + offs_k[None, :],
                mask=valid[:, None] & k_ok[None, :], other=0.0)
    if FUSED:  # (pointer loads: the two row ranges are one gather; I % 128 == 0, no n bound)
        j = tl.arange(0, 2 * BLOCK_N)
        up = j >= BLOCK_N
        rows = (n0 + j + tl.where(up, I - BLOCK_N, 0)).to(tl.int64)
        b = tl.load(w_ptr + rows[None, :] * stride_wn + offs_k[:, None], mask=k_ok[:, None],
                    other=0.0)
        acc_g = _fp8_dot(a, b, acc_g, a_s[:, None] * tl.where(up, w_u, w_g)[None, :], UPCAST,
                         PRECISE)
    else:
        g = _w_tile(w_ptr, n0, n_ok, kb * BLOCK_K, offs_k, k_ok, stride_wn, DESC, BLOCK_N)
        u = _w_tile(w_ptr, n0 + I, n_ok, kb * BLOCK_K, offs_k, k_ok, stride_wn, DESC, BLOCK_N)
        acc_g = _fp8_dot(a, g, acc_g, a_s[:, None] * w_g, UPCAST, PRECISE)
        acc_u = _fp8_dot(a, u, acc_u, a_s[:, None] * w_u, UPCAST, PRECISE)
    return acc_g, acc_u


@triton.jit
def _fp8_gate_up_tile(
    t, aq_ptr, as_ptr, w_ptr, ws_ptr, iq_ptr, is_ptr, sorted_ptr, block_expert_ptr,
    N_SLOTS, H, I, K_TOPK, N_KB,
    stride_ar, stride_as, stride_wn, stride_wse, stride_wsn, stride_ip, stride_is,
    UPCAST: tl.constexpr, PRECISE: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
    MIN_EXP: tl.constexpr, DESC: tl.constexpr, AHEAD: tl.constexpr,
    FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, offs_p, slot, valid, n_start, offs_n, n_ok = _tile(
        t, block_expert_ptr, sorted_ptr, N_SLOTS, I, BLOCK_M, BLOCK_N)
    if e < 0:
        return
    row = tl.where(valid, slot // K_TOPK, 0).to(tl.int64)
    if FUSED:  # gate columns then up columns in one accumulator
        acc_g = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((1, 1), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n0 = e * 2 * I + n_start  # the gate tile's first weight row; the up tile's is n0 + I
    ws_g = ws_ptr + e.to(tl.int64) * stride_wse + (n_start // 128) * stride_wsn
    ws_u = ws_g + (I // 128) * stride_wsn
    if AHEAD:  # the scales' loads one K step ahead of their use (their latency hidden)
        a_s, w_g, w_u = _fp8_gate_up_scales(0, as_ptr, row, valid, ws_g, ws_u, stride_as)
        for kb in range(0, N_KB):
            n_a, n_g, n_u = _fp8_gate_up_scales(tl.minimum(kb + 1, N_KB - 1), as_ptr, row,
                                                valid, ws_g, ws_u, stride_as)
            acc_g, acc_u = _fp8_gate_up_step(
                kb, acc_g, acc_u, a_s, w_g, w_u, aq_ptr, w_ptr, row, valid, n0, n_ok, H, I,
                stride_ar, stride_wn, UPCAST, PRECISE, DESC, FUSED, BLOCK_N, BLOCK_K)
            a_s, w_g, w_u = n_a, n_g, n_u
    else:
        for kb in range(0, N_KB):
            a_s, w_g, w_u = _fp8_gate_up_scales(kb, as_ptr, row, valid, ws_g, ws_u, stride_as)
            acc_g, acc_u = _fp8_gate_up_step(
                kb, acc_g, acc_u, a_s, w_g, w_u, aq_ptr, w_ptr, row, valid, n0, n_ok, H, I,
                stride_ar, stride_wn, UPCAST, PRECISE, DESC, FUSED, BLOCK_N, BLOCK_K)
    if FUSED:  # [BLOCK_M, 2, BLOCK_N] -> [BLOCK_M, BLOCK_N, 2] -> the two halves
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc_g, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    amax = tl.maximum(tl.max(tl.abs(h), axis=1), 1e-10)
    s = tl.div_rn(amax, amax * 0.0 + FP8_MAX)
    q = tl.clamp(tl.div_rn(h, s[:, None] + tl.zeros_like(h)), -FP8_MAX, FP8_MAX)
    p64 = offs_p.to(tl.int64)
    tl.store(iq_ptr + p64[:, None] * stride_ip + offs_n[None, :],
             _to_fp8(q, iq_ptr.dtype.element_ty, ROUND, MIN_EXP), mask=n_ok[None, :])
    tl.store(is_ptr + p64 * stride_is + n_start // 128, s)


@triton.jit
def _fp8_gate_up_kernel(
    aq_ptr, as_ptr, w_ptr, ws_ptr, iq_ptr, is_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    N_SLOTS, H, I, K_TOPK, N_KB,
    stride_ar, stride_as, stride_wn, stride_wse, stride_wsn, stride_ip, stride_is,
    UPCAST: tl.constexpr, PRECISE: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
    MIN_EXP: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DESC: tl.constexpr = False, AHEAD: tl.constexpr = False, FUSED: tl.constexpr = False,
):
    """iq[p], is[p] = quantise(silu(a[row(p)] @ gate[e].T) * (a[row(p)] @ up[e].T)) for the
    padded slot positions p of one block (one local expert e). ``aq`` [R, H] FP8 rows with
    ``as`` [R, N_KB] scales; ``w`` [e * 2I, H] FP8 (pointer, or with DESC a descriptor of
    [BLOCK_N, BLOCK_K] tiles) with ``ws`` [e, 2I/128, N_KB]; the intermediate ``iq`` [P, I] FP8
    with ``is`` [P, I/128] scales, quantised in the epilogue (BLOCK_N == 128: a tile is one
    scale group of each row). ``DESC``, ``AHEAD``, ``FUSED``: the module's launch variants."""
    if PERSISTENT:  # the programs stride over the tiles in use (as _gate_up_kernel)
        n_tiles = _num_tiles(num_padded_ptr, I, BLOCK_M, BLOCK_N)
        for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _fp8_gate_up_tile(
                t, aq_ptr, as_ptr, w_ptr, ws_ptr, iq_ptr, is_ptr, sorted_ptr, block_expert_ptr,
                N_SLOTS, H, I, K_TOPK, N_KB, stride_ar, stride_as, stride_wn, stride_wse,
                stride_wsn, stride_ip, stride_is, UPCAST, PRECISE, FP8_MAX, ROUND, MIN_EXP, DESC,
                AHEAD, FUSED, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _fp8_gate_up_tile(
            tl.program_id(0), aq_ptr, as_ptr, w_ptr, ws_ptr, iq_ptr, is_ptr, sorted_ptr,
            block_expert_ptr, N_SLOTS, H, I, K_TOPK, N_KB, stride_ar, stride_as, stride_wn,
            stride_wse, stride_wsn, stride_ip, stride_is, UPCAST, PRECISE, FP8_MAX, ROUND,
            MIN_EXP, DESC, AHEAD, FUSED, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _fp8_down_scales(kb, is_ptr, ws, p64, offs_n, n_ok, stride_is, stride_wsn,
                     BLOCK_N: tl.constexpr):
    """K step ``kb``'s scales of the down tile: the rows' [BLOCK_M] and the weights' (BLOCK_N
    <= 128: the tile's one block, a scalar; 256: each column's block, [BLOCK_N])."""
    a_s = tl.load(is_ptr + p64 * stride_is + kb)
    if BLOCK_N > 128:
        w_s = tl.load(ws + (offs_n // 128) * stride_wsn + kb, mask=n_ok, other=0.0)
    else:
        w_s = tl.load(ws + kb)
    return a_s, w_s


@triton.jit
def _fp8_down_step(
    kb, acc, a_s, w_s, iq_ptr, w_ptr, p0, p64, n0, n_ok, stride_ip, stride_wn,
    UPCAST: tl.constexpr, PRECISE: tl.constexpr, DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One 128-wide K step of the down tile, scaled by a_s x w_s (``_fp8_down_scales``; 256
    columns: an outer product, computed once for the step)."""
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    if DESC:
        a = iq_ptr.load([p0, kb * BLOCK_K])
    else:
        a = tl.load(iq_ptr + p64[:, None] * stride_ip + offs_k[None, :])
    b = _w_tile(w_ptr, n0, n_ok, kb * BLOCK_K, offs_k, tl.full(offs_k.shape, 1, tl.int1),
                stride_wn, DESC, BLOCK_N)  # (I % 128 == 0: no K bound)
    if BLOCK_N > 128:  # noqa: SIM108 (a constexpr branch)
        scale = a_s[:, None] * w_s[None, :]
    else:
        scale = a_s[:, None] * w_s
    return _fp8_dot(a, b, acc, scale, UPCAST, PRECISE)


@triton.jit
def _fp8_down_tile(
    t, iq_ptr, is_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
    N_SLOTS, H, I, N_KB,
    stride_ip, stride_is, stride_wn, stride_wse, stride_wsn, stride_os,
    WEIGHTED: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr, DESC: tl.constexpr,
    AHEAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, offs_p, slot, valid, n_start, offs_n, n_ok = _tile(
        t, block_expert_ptr, sorted_ptr, N_SLOTS, H, BLOCK_M, BLOCK_N)
    if e < 0:
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p64 = offs_p.to(tl.int64)
    p0 = t // tl.cdiv(H, BLOCK_N) * BLOCK_M  # the block's first position
    n0 = e * H + n_start  # the tile's first weight row
    ws = ws_ptr + e.to(tl.int64) * stride_wse
    if BLOCK_N <= 128:
        ws += (n_start // 128) * stride_wsn
    if AHEAD:  # the scales' loads one K step ahead of their use (their latency hidden)
        a_s, w_s = _fp8_down_scales(0, is_ptr, ws, p64, offs_n, n_ok, stride_is, stride_wsn,
                                    BLOCK_N)
        for kb in range(0, N_KB):
            n_a, n_w = _fp8_down_scales(tl.minimum(kb + 1, N_KB - 1), is_ptr, ws, p64, offs_n,
                                        n_ok, stride_is, stride_wsn, BLOCK_N)
            acc = _fp8_down_step(kb, acc, a_s, w_s, iq_ptr, w_ptr, p0, p64, n0, n_ok,
                                 stride_ip, stride_wn, UPCAST, PRECISE, DESC, BLOCK_M, BLOCK_N,
                                 BLOCK_K)
            a_s, w_s = n_a, n_w
    else:
        for kb in range(0, N_KB):
            a_s, w_s = _fp8_down_scales(kb, is_ptr, ws, p64, offs_n, n_ok, stride_is,
                                        stride_wsn, BLOCK_N)
            acc = _fp8_down_step(kb, acc, a_s, w_s, iq_ptr, w_ptr, p0, p64, n0, n_ok,
                                 stride_ip, stride_wn, UPCAST, PRECISE, DESC, BLOCK_M, BLOCK_N,
                                 BLOCK_K)
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + slot, mask=valid, other=0.0)[:, None]
    safe = tl.where(valid, slot, 0).to(tl.int64)
    tl.store(out_ptr + safe[:, None] * stride_os + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _fp8_down_kernel(
    iq_ptr, is_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
    num_padded_ptr, N_SLOTS, H, I, N_KB,
    stride_ip, stride_is, stride_wn, stride_wse, stride_wsn, stride_os,
    PERSISTENT: tl.constexpr, WEIGHTED: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DESC: tl.constexpr = False, AHEAD: tl.constexpr = False,
):
    """out[slot(p), n] = (d[p] @ down[e].T)[n] (times the slot's weight when WEIGHTED) with
    d = iq * is the FP8 intermediate; ``w`` [e * H, I] FP8, ``ws`` [e, ceil(H/128), I/128].
    With DESC, ``iq`` and ``w`` are descriptors of [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K]
    tiles. BLOCK_N: 16-128 (within one weight-scale block) or 256."""
    if PERSISTENT:  # the programs stride over the tiles in use (as _down_kernel)
        n_tiles = _num_tiles(num_padded_ptr, H, BLOCK_M, BLOCK_N)
        for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _fp8_down_tile(
                t, iq_ptr, is_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr,
                weight_ptr, N_SLOTS, H, I, N_KB, stride_ip, stride_is, stride_wn, stride_wse,
                stride_wsn, stride_os, WEIGHTED, UPCAST, PRECISE, DESC, AHEAD, BLOCK_M, BLOCK_N,
                BLOCK_K)
    else:
        _fp8_down_tile(
            tl.program_id(0), iq_ptr, is_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr,
            block_expert_ptr, weight_ptr, N_SLOTS, H, I, N_KB, stride_ip, stride_is, stride_wn,
            stride_wse, stride_wsn, stride_os, WEIGHTED, UPCAST, PRECISE, DESC, AHEAD,
            BLOCK_M, BLOCK_N, BLOCK_K)
