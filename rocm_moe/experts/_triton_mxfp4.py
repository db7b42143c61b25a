"""Triton kernels of the MXFP4 experts (``experts/mxfp4.py``; imported only with triton).

Weight-only MXFP4: the weights stay packed in memory (``formats/mxfp4.py``: two E2M1 values per
byte, one E8M0 scale per 32 values along the input dim) and each [BLOCK_N, BLOCK_K] weight tile
is dequantised in registers to the activations' dtype (bfloat16 on GPUs; H100 and MI300 have no
FP4 matrix instructions), then ``tl.dot`` with float32 accumulation, as the bf16 experts do
(``_triton_kernels.py``: the same layout of blocks, one local expert each, the same expert
variants and epilogues). A tile reads 0.5 byte per weight plus 1 per 32, against 2 for bf16.

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
def _mxfp4_tile(blk_ptr, scl_ptr, rows, n_ok, k0, K, stride_b, stride_s, dtype,
                EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile (transposed for tl.dot) in ``dtype`` of an MXFP4 matrix whose
    ``rows`` (int64 [BLOCK_N]) are read, columns k0 + [0, BLOCK_K) of K: bytes ``blk`` [rows,
    K/2] (value 2j low nibble, 2j + 1 high), scales ``scl`` [rows, K/32]. Each element loads
    its own byte and scale (neighbours share addresses, so memory traffic is the packed
    bytes'), so the decode is elementwise: no interleave or reshape of register tiles. Rows
    past ``n_ok`` and columns past K read as zeros (K % 32 == 0: whole groups)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m = n_ok[None, :] if EVEN_K else n_ok[None, :] & (offs_k < K)[:, None]
    b = tl.load(blk_ptr + rows[None, :] * stride_b + (offs_k // 2)[:, None], mask=m, other=0)
    s = tl.load(scl_ptr + rows[None, :] * stride_s + (offs_k // 32)[:, None], mask=m,
                other=128)
    c = (b.to(tl.int32) >> ((offs_k & 1) * 4)[:, None]) & 15
    return (_e2m1_x2(c) * _e8m0_half(s.to(tl.int32))).to(dtype)


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
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + row[:, None] * stride_xr + offs_k[None, :],
                        mask=valid[:, None] & (offs_k < H)[None, :], other=0.0)
            if ON_INPUT:
                a = (a.to(tl.float32) * w_in[:, None]).to(dt)
            g = _mxfp4_tile(wb_ptr, ws_ptr, rows_g, n_ok, k0, H, stride_wb, stride_ws, dt,
                            EVEN_K, BLOCK_N, BLOCK_K)
            u = _mxfp4_tile(wb_ptr, ws_ptr, rows_g + I, n_ok, k0, H, stride_wb, stride_ws, dt,
                            EVEN_K, BLOCK_N, BLOCK_K)
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
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
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(inter_ptr + p64[:, None] * stride_ip + offs_k[None, :],
                        mask=valid[:, None] & (offs_k < I)[None, :], other=0.0)
            b = _mxfp4_tile(wb_ptr, ws_ptr, rows_w, n_ok, k0, I, stride_wb, stride_ws, dt,
                            EVEN_K, BLOCK_N, BLOCK_K)
            acc = tl.dot(a, b, acc)
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
