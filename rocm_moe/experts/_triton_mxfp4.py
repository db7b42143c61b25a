"""Triton kernels of the MXFP4 experts (``experts/mxfp4.py``; imported only with triton).

Weight-only MXFP4: the weights stay packed in memory (``formats/mxfp4.py``: two E2M1 values per
byte, one E8M0 scale per 32 values along the input dim) and each weight tile is dequantised in
registers to the activations' dtype (bfloat16 on GPUs; H100 and MI300 have no FP4 matrix
instructions), then ``tl.dot`` with float32 accumulation, as the bf16 experts do
(``_triton_kernels.py``: the same layout of blocks, one local expert each, the same expert
variants and epilogues). A tile reads 0.5 byte per weight plus 1 per 32, against 2 for bf16.

A K step of BLOCK_K values loads BLOCK_K / 2 bytes per weight row, contiguous (vectorised
loads), and splits them instead of interleaving: the low nibbles (values 2j) and the high ones
(2j + 1) make two [BLOCK_K/2, BLOCK_N] tiles, each met by the activations' even or odd columns
in its own ``tl.dot`` (the same products and sums as one dot over BLOCK_K).

Decoding (exact in float32): code c = sign (bit 3), exponent e (bits 2-1), mantissa m (bit 0);
2 * |value| = m if e == 0 else (2 + m) << (e - 1), i.e. 0, 1, 2, 3, 4, 6, 8, 12; the E8M0 scale
s gives 2 ** (s - 128) (the half folded in) built from its bits. Scales below 2 ** -126 (s < 2,
subnormal float32) may flush to zero on GPUs; no trained weight has them.
"""

import triton
import triton.language as tl

from rocm_moe.experts._triton_kernels import _activate, _num_tiles, _tile


@triton.jit
def _e2m1_x2(c):
    """Twice the value of E2M1 codes ``c`` (int32 0..15), float32."""
    e = (c >> 1) & 3
    m = c & 1
    v = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0)).to(tl.float32)
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def _e8m0_half(s):
    """2 ** (s - 128) for E8M0 scales ``s`` (int32 0..254), float32, from its bits."""
    bits = tl.where(s >= 2, (s - 1) << 23, tl.where(s == 1, 0x00400000, 0x00200000))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_halves(blk_ptr, scl_ptr, rows, n_ok, offs_j, K, stride_b, stride_s, dtype,
                  EVEN_K: tl.constexpr):
    """The weights of packed columns ``offs_j`` ([BLOCK_K/2] byte indices: values 2j and
    2j + 1) of an MXFP4 matrix's ``rows`` (int64 [BLOCK_N]), as two [BLOCK_K/2, BLOCK_N] tiles
    (transposed for tl.dot) in ``dtype``: the even values (low nibbles) and the odd ones (high
    nibbles). Bytes ``blk`` [rows, K/2] load contiguously along K (vectorised), scales ``scl``
    [rows, K/32] once per 16 bytes. Rows past ``n_ok`` and columns past K read as zeros."""
    m = n_ok[None, :] if EVEN_K else n_ok[None, :] & (offs_j < K // 2)[:, None]
    b = tl.load(blk_ptr + rows[None, :] * stride_b + offs_j[:, None], mask=m, other=0)
    s = tl.load(scl_ptr + rows[None, :] * stride_s + (offs_j // 16)[:, None], mask=m,
                other=128)
    b = b.to(tl.int32)
    scale = _e8m0_half(s.to(tl.int32))
    return (_e2m1_x2(b & 15) * scale).to(dtype), (_e2m1_x2(b >> 4) * scale).to(dtype)


@triton.jit
def _rows_even_odd(ptr, rows, row_ok, stride, offs_j, K):
    """[BLOCK_M, BLOCK_K/2] tiles of columns 2j and 2j + 1 of the rows ``rows`` of a
    row-major [*, K] matrix (the activations that meet the even and odd weights)."""
    base = ptr + rows[:, None] * stride + 2 * offs_j[None, :]
    m = row_ok[:, None] & (2 * offs_j < K)[None, :]
    return tl.load(base, mask=m, other=0.0), tl.load(base + 1, mask=m, other=0.0)


@triton.jit
def _mxfp4_gate_up_tile(
    t, x_ptr, wb_ptr, ws_ptr, inter_ptr, sorted_ptr, block_expert_ptr, b13_ptr, weight_ptr,
    N_SLOTS, H, I, K_TOPK, stride_xr, stride_wb, stride_ws, stride_ip,
    EVEN_K: tl.constexpr, BIAS: tl.constexpr, ON_INPUT: tl.constexpr, OAI: tl.constexpr,
    ALPHA: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, offs_p, slot, valid, _, offs_n, n_ok = _tile(t, block_expert_ptr, sorted_ptr,
                                                    N_SLOTS, I, BLOCK_M, BLOCK_N)
    if e >= 0:
        dt = x_ptr.dtype.element_ty
        row = tl.where(valid, slot // K_TOPK, 0).to(tl.int64)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ON_INPUT:  # the slot's routing weight in x's dtype, as weighting.weight_inputs
            w_in = tl.load(weight_ptr + slot, mask=valid, other=0.0).to(dt).to(tl.float32)
        rows_g = e.to(tl.int64) * 2 * I + offs_n  # the gate tile's weight rows; up: + I
        for k0 in range(0, H, BLOCK_K):
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            a0, a1 = _rows_even_odd(x_ptr, row, valid, stride_xr, offs_j, H)
            if ON_INPUT:
                a0 = (a0.to(tl.float32) * w_in[:, None]).to(dt)
                a1 = (a1.to(tl.float32) * w_in[:, None]).to(dt)
            g0, g1 = _mxfp4_halves(wb_ptr, ws_ptr, rows_g, n_ok, offs_j, H, stride_wb,
                                   stride_ws, dt, EVEN_K)
            acc_g = tl.dot(a1, g1, tl.dot(a0, g0, acc_g))
            u0, u1 = _mxfp4_halves(wb_ptr, ws_ptr, rows_g + I, n_ok, offs_j, H, stride_wb,
                                   stride_ws, dt, EVEN_K)
            acc_u = tl.dot(a1, u1, tl.dot(a0, u0, acc_u))
        if BIAS:  # [e, 2I] in x's dtype: gate columns then up columns
            bp = b13_ptr + e.to(tl.int64) * 2 * I + offs_n
            acc_g += tl.load(bp, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bp + I, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(acc_g, acc_u, OAI, ALPHA, CLAMP, LIMIT)
        tl.store(inter_ptr + offs_p[:, None].to(tl.int64) * stride_ip + offs_n[None, :],
                 h.to(inter_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _mxfp4_gate_up_kernel(
    x_ptr, wb_ptr, ws_ptr, inter_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, b13_ptr,
    weight_ptr, N_SLOTS, H, I, K_TOPK, stride_xr, stride_wb, stride_ws, stride_ip,
    EVEN_K: tl.constexpr, PERSISTENT: tl.constexpr, BIAS: tl.constexpr, ON_INPUT: tl.constexpr,
    OAI: tl.constexpr, ALPHA: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[p, n] = act(x[row(p)] @ gate[e].T, x[row(p)] @ up[e].T) for the padded slot
    positions p of one block (one local expert e), the weights read as MXFP4: bytes ``wb``
    [e * 2I, H/2], scales ``ws`` [e * 2I, H/32] (gate rows then up rows per expert), each tile
    dequantised to x's dtype in registers. Variants as ``_triton_kernels._gate_up_kernel``
    (BIAS: ``b13`` [e, 2I]; ON_INPUT: routing weights ``weight_ptr`` [R * K] on the rows; OAI:
    gpt-oss's clamped SwiGLU). One tile per program, or PERSISTENT: the programs stride over
    the tiles in use."""
    if PERSISTENT:
        for t in range(tl.program_id(0), _num_tiles(num_padded_ptr, I, BLOCK_M, BLOCK_N),
                       tl.num_programs(0)):
            _mxfp4_gate_up_tile(
                t, x_ptr, wb_ptr, ws_ptr, inter_ptr, sorted_ptr, block_expert_ptr, b13_ptr,
                weight_ptr, N_SLOTS, H, I, K_TOPK, stride_xr, stride_wb, stride_ws, stride_ip,
                EVEN_K, BIAS, ON_INPUT, OAI, ALPHA, CLAMP, LIMIT, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _mxfp4_gate_up_tile(
            tl.program_id(0), x_ptr, wb_ptr, ws_ptr, inter_ptr, sorted_ptr, block_expert_ptr,
            b13_ptr, weight_ptr, N_SLOTS, H, I, K_TOPK, stride_xr, stride_wb, stride_ws,
            stride_ip, EVEN_K, BIAS, ON_INPUT, OAI, ALPHA, CLAMP, LIMIT, BLOCK_M, BLOCK_N,
            BLOCK_K)


@triton.jit
def _mxfp4_down_tile(
    t, inter_ptr, wb_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr, b2_ptr,
    N_SLOTS, H, I, stride_ip, stride_wb, stride_ws, stride_os,
    WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, offs_p, slot, valid, _, offs_n, n_ok = _tile(t, block_expert_ptr, sorted_ptr,
                                                    N_SLOTS, H, BLOCK_M, BLOCK_N)
    if e >= 0:
        dt = inter_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rows_w = e.to(tl.int64) * H + offs_n
        p64 = offs_p.to(tl.int64)
        for k0 in range(0, I, BLOCK_K):
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            a0, a1 = _rows_even_odd(inter_ptr, p64, valid, stride_ip, offs_j, I)
            b0, b1 = _mxfp4_halves(wb_ptr, ws_ptr, rows_w, n_ok, offs_j, I, stride_wb,
                                   stride_ws, dt, EVEN_K)
            acc = tl.dot(a1, b1, tl.dot(a0, b0, acc))
        if BIAS:  # [e, H], before the routing weight
            acc += tl.load(b2_ptr + e.to(tl.int64) * H + offs_n, mask=n_ok,
                           other=0.0).to(tl.float32)[None, :]
        if WEIGHTED:
            acc = acc * tl.load(weight_ptr + slot, mask=valid, other=0.0)[:, None]
        safe = tl.where(valid, slot, 0).to(tl.int64)
        tl.store(out_ptr + safe[:, None] * stride_os + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _mxfp4_down_kernel(
    inter_ptr, wb_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
    num_padded_ptr, b2_ptr, N_SLOTS, H, I, stride_ip, stride_wb, stride_ws, stride_os,
    WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, PERSISTENT: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[slot(p), n] = (inter[p] @ down[e].T)[n] (+ ``b2`` [e, H] when BIAS), times the
    slot's routing weight when WEIGHTED; ``wb`` [e * H, I/2] bytes and ``ws`` [e * H, I/32]
    scales dequantised per tile; rows are written only for real slots. One tile per program,
    or PERSISTENT: the programs stride over the tiles in use."""
    if PERSISTENT:
        for t in range(tl.program_id(0), _num_tiles(num_padded_ptr, H, BLOCK_M, BLOCK_N),
                       tl.num_programs(0)):
            _mxfp4_down_tile(
                t, inter_ptr, wb_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
                b2_ptr, N_SLOTS, H, I, stride_ip, stride_wb, stride_ws, stride_os, WEIGHTED,
                EVEN_K, BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _mxfp4_down_tile(
            tl.program_id(0), inter_ptr, wb_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr,
            weight_ptr, b2_ptr, N_SLOTS, H, I, stride_ip, stride_wb, stride_ws, stride_os,
            WEIGHTED, EVEN_K, BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
