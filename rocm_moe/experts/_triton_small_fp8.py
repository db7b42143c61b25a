"""Triton kernels of the streaming block-FP8 small-batch experts (``experts/triton_small_fp8.py``;
imported only with triton): two launches (three for weighted per-slot down rows) that read
``topk_ids`` directly and stream each FP8 weight tile once through the vector units.

Why not tl.dot: at 1-8 tokens an expert sees one row, so a [16, N] x [N, K] tensor-core tile
is 15/16 padding, and the tl.dot forms of ``_triton_small.py`` move FP8 weight tiles through
shared memory in 32-128-column tiles that leave too few bytes in flight (66.8 us for 15.4 us
of weight reads at one token on an H100). Here each program loads [S, BLOCK_N, BLOCK_K] FP8
weight tiles straight into registers (BLOCK_K up to 512: several 128-groups per load, many
16-byte loads in flight per thread), converts them to float32 and multiplies them with the
activation already scaled by the weight block scale (one multiply per activation element,
amortised over BLOCK_N weight rows), float32 sums.

Arithmetic (``ACT_Q``, the FP8 contract of ``experts/fp8.py``): the rows quantised per 1x128
group (``quant.quantize_rows``'s bits: FP8Rows dequantised, or float rows quantised here as they
load), SiLU(gate) * up in float32 into an unquantised float32 intermediate, quantised per 1x128
group by the down kernel as it reads it. Without ``ACT_Q`` the activations stay float (bf16 /
fp16 / float32 rows, the float32 intermediate): only the weights are FP8 (w8a16).

``_stream_gate_up_kernel``: one program per (slot, column tile of I) (``PER_ROW`` False, S = 1)
or per (row, tile) with the row's K slots as S = next_pow2(K) lanes of one 3-D tile.
``_stream_down_kernel``: per (row, column tile of H) with the row's K slots as S lanes (the
weighted sum in the same launch, a fixed order, no atomics; raw: each slot, exact zeros for
non-local and empty slots), or per (slot, tile) into per-slot rows (``PER_ROW`` False).
BOUNDED: the programs stride over the first ``num_rows[0]`` rows (a device count).
SPLIT (split-K, for grids with too few programs: one local slot, DeepSeek-V3's H = 7168): the
gate/up programs split H and store partial sums that the down kernel adds in a fixed order.
PREFETCH: the weight tiles of K step k + 1 are loaded before step k's are summed (two steps of
loads in flight a thread; Triton pipelines only loads that feed tl.dot).
PRELOAD (down, 0-4): the first PRELOAD K steps' weight tiles are loaded before the kernel waits
for the intermediate: with PDL the down programs that are resident while gate/up runs stream
their weights then, instead of after gate/up's last program (the same sums in the same order:
the same bits).
WFP8 False: bf16 / fp16 weights without scales (the bf16 small path, ``triton_small``): the
same streaming, float rows and the float32 intermediate as they are (ACT_Q and XFP8 off).
"""

import triton
import triton.language as tl

from rocm_moe._quant_triton import _to_fp8
from rocm_moe._routing_triton import _grid_launch_dependents, _grid_wait
from rocm_moe.experts._triton_small import _locals


@triton.jit
def _dequant_groups(a, dtype, S: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr,
                    ROUND: tl.constexpr, MIN_EXP: tl.constexpr):
    """a [S, BLOCK_K] float32 quantised per 1x128 group to FP8 ``dtype`` as
    ``quant.quantize_rows`` does, returned dequantised (q * scale, float32)."""
    g = tl.reshape(a, (S * (BLOCK_K // 128), 128))
    amax = tl.maximum(tl.max(tl.abs(g), axis=1), 1e-10)
    s = tl.div_rn(amax, amax * 0.0 + FP8_MAX)
    q = tl.clamp(tl.div_rn(g, s[:, None] + tl.zeros_like(g)), -FP8_MAX, FP8_MAX)
    d = _to_fp8(q, dtype, ROUND, MIN_EXP).to(tl.float32) * s[:, None]
    return tl.reshape(d, (S, BLOCK_K))


@triton.jit
def _act_tile(x_ptr, xs_ptr, row, ok, offs_k, k_ok, stride_xr, stride_xs, dtype,
              XFP8: tl.constexpr, ACT_Q: tl.constexpr, FP8_MAX: tl.constexpr,
              ROUND: tl.constexpr, MIN_EXP: tl.constexpr, S: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Activations [S, BLOCK_K] float32 of rows ``row`` ([S] int64, lanes ``ok``): FP8 rows
    times their group scales (XFP8), float rows quantised per group (ACT_Q), or as they are."""
    m = ok[:, None] & k_ok[None, :]
    a = tl.load(x_ptr + row[:, None] * stride_xr + offs_k[None, :], mask=m,
                other=0.0).to(tl.float32)
    if XFP8:
        a = a * tl.load(xs_ptr + row[:, None] * stride_xs + (offs_k // 128)[None, :], mask=m,
                        other=0.0)
    elif ACT_Q:
        a = _dequant_groups(a, dtype, S, BLOCK_K, FP8_MAX, ROUND, MIN_EXP)
    return a


@triton.jit
def _w_tile(w_ptr, rows, k0, wm, K_DIM, k_end, BLOCK_K: tl.constexpr):
    """FP8 weight tile [S, BLOCK_N, BLOCK_K] of ``rows`` ([S, BLOCK_N], row length K_DIM) at
    K step ``k0``; zeros from ``k_end`` on (a step past the end loads nothing) and off ``wm``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + rows[:, :, None] * K_DIM + offs_k[None, None, :],
                   mask=wm & (offs_k < k_end)[None, None, :], other=0.0)


@triton.jit
def _inter_tile(inter_ptr, s64, ok, offs_k, k_ok, stride_ir, stride_ip, SPLIT: tl.constexpr):
    """The intermediate [S, BLOCK_K] (float32) of slots ``s64``: as stored (SPLIT 1), or
    SiLU(sum of the gate partials) * (sum of the up partials) over the SPLIT K splits of the
    gate/up kernel, summed in split order (planes ``stride_ip`` apart: split 0 gate, split 0
    up, split 1 gate, ...)."""
    ptrs = inter_ptr + s64[:, None] * stride_ir + offs_k[None, :]
    m = ok[:, None] & k_ok[None, :]
    if SPLIT == 1:
        return tl.load(ptrs, mask=m, other=0.0)
    g = tl.load(ptrs, mask=m, other=0.0)
    u = tl.load(ptrs + stride_ip, mask=m, other=0.0)
    for sp in tl.static_range(1, SPLIT):
        g += tl.load(ptrs + (2 * sp) * stride_ip, mask=m, other=0.0)
        u += tl.load(ptrs + (2 * sp + 1) * stride_ip, mask=m, other=0.0)
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _down_step(acc, b, k0, inter_ptr, ws, s64, ok, I, stride_ir, stride_ip, dtype,
               ACT_Q: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
               MIN_EXP: tl.constexpr, S: tl.constexpr, BLOCK_K: tl.constexpr,
               SPLIT: tl.constexpr, WFP8: tl.constexpr):
    """acc [S, BLOCK_N] plus K step ``k0`` of the down GEMM: the weight tile ``b`` [S, BLOCK_N,
    BLOCK_K] times the intermediate's columns k0.. of slots ``s64`` (quantised per group with
    ACT_Q, times the weight blocks' scales ``ws`` with WFP8)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < I
    a = _inter_tile(inter_ptr, s64, ok, offs_k, k_ok, stride_ir, stride_ip, SPLIT)
    if ACT_Q:
        a = _dequant_groups(a, dtype, S, BLOCK_K, FP8_MAX, ROUND, MIN_EXP)
    if WFP8:
        a = a * tl.load(ws[:, None] + (offs_k // 128)[None, :], mask=ok[:, None] & k_ok[None, :],
                        other=0.0)
    return acc + tl.sum(b.to(tl.float32) * a[:, None, :], axis=2)


@triton.jit
def _lanes(u, ids_ptr, map_ptr, n_slots, K_TOPK: tl.constexpr, PER_ROW: tl.constexpr,
           S: tl.constexpr):
    """(slots [S], local experts [S], -1 for lanes without a local slot) of work unit ``u``:
    row u's K slots (PER_ROW) or slot u (S = 1)."""
    j = tl.arange(0, S)
    if PER_ROW:
        slot = u * K_TOPK + j
        lane = j < K_TOPK
    else:
        slot = u + j
        lane = j < 1
    e = tl.where(lane, _locals(ids_ptr, map_ptr, slot, n_slots), -1)
    return slot, e


@triton.jit(do_not_specialize=["R", "stride_xs", "stride_wse", "stride_wsn", "stride_ip",
                               "K_STEPS"])
def _stream_gate_up_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, ids_ptr, map_ptr, num_rows_ptr,
    R, H, I, stride_xr, stride_xs, stride_wse, stride_wsn, stride_ir, stride_ip, K_STEPS,
    K_TOPK: tl.constexpr, XFP8: tl.constexpr, ACT_Q: tl.constexpr, FP8_MAX: tl.constexpr,
    ROUND: tl.constexpr, MIN_EXP: tl.constexpr, BOUNDED: tl.constexpr, PER_ROW: tl.constexpr,
    S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    SPLIT: tl.constexpr, PDL: tl.constexpr = False, WFP8: tl.constexpr = True,
):
    """inter[slot, tile] = SiLU(a @ gate[e].T) * (a @ up[e].T) (float32) of the local slots;
    other slots' rows are not written. ``x`` [R, H] float rows, or FP8 (XFP8) with ``xs``
    [R, ceil(H/128)] scales; ``w`` [e * 2I, H] FP8 (row stride H), ``ws`` [e, 2I/128,
    ceil(H/128)]; ``inter`` [R * K, I]. SPLIT > 1 (split-K): program (., ., sp) sums the
    K_STEPS * BLOCK_K columns of H from sp times that and stores its gate and up partials (no
    SiLU) in planes 2 sp and 2 sp + 1 of ``inter`` [2 SPLIT, R * K, I] (``stride_ip``
    apart), which the down kernel adds up. Grid: (rows or slots expected, column tiles of I,
    SPLIT). PDL (NVIDIA sm_90+, compiled): launched with ``launch_pdl=True`` behind whatever
    wrote its inputs (waits for it first), and lets the down kernel launched so behind it start
    (it waits for this grid before reading ``inter``)."""
    if PDL:  # wait first: the down kernel, launched by the next line, reads the ids unwaited
        _grid_wait()
        _grid_launch_dependents()
    n_rows = tl.load(num_rows_ptr) if BOUNDED else R
    n_slots = n_rows * K_TOPK
    n_units = n_rows if PER_ROW else n_slots
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    for u in range(tl.program_id(0), n_units, tl.num_programs(0)):
        slot, e = _lanes(u, ids_ptr, map_ptr, n_slots, K_TOPK, PER_ROW, S)
        if tl.max(e, axis=0) >= 0:
            ok = e >= 0
            e64 = tl.maximum(e, 0).to(tl.int64)
            row = tl.where(ok, slot // K_TOPK, 0).to(tl.int64)
            rows_g = e64[:, None] * 2 * I + offs_n[None, :]  # [S, BLOCK_N] gate rows
            ws_g = ws_ptr + e64 * stride_wse + (n_start // 128) * stride_wsn  # [S]
            ws_u = ws_g + (I // 128) * stride_wsn
            wm = ok[:, None, None] & n_ok[None, :, None]
            acc_g = tl.zeros((S, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((S, BLOCK_N), dtype=tl.float32)
            k_lo = tl.program_id(2) * K_STEPS * BLOCK_K  # (a multiple of BLOCK_K: aligned)
            k_hi = tl.minimum(k_lo + K_STEPS * BLOCK_K, H)
            if PREFETCH:  # the next K step's tiles load while this one's are summed
                g_n = _w_tile(w_ptr, rows_g, k_lo, wm, H, k_hi, BLOCK_K)
                u_n = _w_tile(w_ptr, rows_g + I, k_lo, wm, H, k_hi, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H
                if PREFETCH:
                    g = g_n
                    up = u_n
                    g_n = _w_tile(w_ptr, rows_g, k0 + BLOCK_K, wm, H, k_hi, BLOCK_K)
                    u_n = _w_tile(w_ptr, rows_g + I, k0 + BLOCK_K, wm, H, k_hi, BLOCK_K)
                else:
                    g = _w_tile(w_ptr, rows_g, k0, wm, H, H, BLOCK_K)
                    up = _w_tile(w_ptr, rows_g + I, k0, wm, H, H, BLOCK_K)
                a = _act_tile(x_ptr, xs_ptr, row, ok, offs_k, k_ok, stride_xr, stride_xs,
                              w_ptr.dtype.element_ty, XFP8, ACT_Q, FP8_MAX, ROUND, MIN_EXP, S,
                              BLOCK_K)
                if WFP8:  # the activations times the weight blocks' scales
                    sm = ok[:, None] & k_ok[None, :]
                    kb = (offs_k // 128)[None, :]
                    a_g = a * tl.load(ws_g[:, None] + kb, mask=sm, other=0.0)
                    a_u = a * tl.load(ws_u[:, None] + kb, mask=sm, other=0.0)
                else:
                    a_g = a
                    a_u = a
                acc_g += tl.sum(g.to(tl.float32) * a_g[:, None, :], axis=2)
                acc_u += tl.sum(up.to(tl.float32) * a_u[:, None, :], axis=2)
            ptrs = inter_ptr + slot.to(tl.int64)[:, None] * stride_ir + offs_n[None, :]
            m = ok[:, None] & n_ok[None, :]
            if SPLIT == 1:
                tl.store(ptrs, acc_g / (1.0 + tl.exp(-acc_g)) * acc_u, mask=m)
            else:
                plane = (2 * tl.program_id(2)).to(tl.int64) * stride_ip
                tl.store(ptrs + plane, acc_g, mask=m)
                tl.store(ptrs + plane + stride_ip, acc_u, mask=m)


@triton.jit(do_not_specialize=["R", "stride_wse", "stride_wsn", "stride_ip"])
def _stream_down_kernel(
    inter_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weight_ptr, num_rows_ptr,
    R, H, I, stride_ir, stride_ip, stride_wse, stride_wsn, stride_or, stride_ok,
    K_TOPK: tl.constexpr, ACT_Q: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
    MIN_EXP: tl.constexpr, WEIGHTED: tl.constexpr, BOUNDED: tl.constexpr,
    PER_ROW: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False,
    WFP8: tl.constexpr = True, PRELOAD: tl.constexpr = 0,
):
    """y_slot = d_slot @ down[e].T for the local slots, d the float32 intermediate (ACT_Q:
    quantised per 1x128 group as it loads; SPLIT > 1: made from the gate/up kernel's split-K
    partials, ``_inter_tile``); ``w`` [e * H, I] FP8, ``ws`` [e, ceil(H/128), I/128].
    PER_ROW (S lanes = the row's K slots): WEIGHTED out[r] = sum_k weight_k * y_k
    ([R, H], row stride ``stride_or``), else out[r, k] = y_k with exact zeros for other slots
    (``stride_or``, ``stride_ok``); per slot (S = 1): out[slot] = y (times its weight when
    WEIGHTED), rows of other slots not written (``stride_ok``: the slot row stride).
    Grid: (rows or slots expected, column tiles of H). PDL: launched with ``launch_pdl=True``
    behind the gate/up kernel (its PDL): the ids, the map and num_rows load first, then the
    first PRELOAD weight tiles and the next one (PREFETCH), then it waits for ``inter``.
    Reading the ids before the wait is safe only because gate/up lets this grid launch after
    its own wait (so whatever wrote the ids has finished): keep that order there."""
    n_rows = tl.load(num_rows_ptr) if BOUNDED else R
    n_slots = n_rows * K_TOPK
    n_units = n_rows if PER_ROW else n_slots
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    for u in range(tl.program_id(0), n_units, tl.num_programs(0)):
        slot, e = _lanes(u, ids_ptr, map_ptr, n_slots, K_TOPK, PER_ROW, S)
        ok = e >= 0
        e64 = tl.maximum(e, 0).to(tl.int64)
        s64 = tl.where(ok, slot, 0).to(tl.int64)
        rows_w = e64[:, None] * H + offs_n[None, :]  # [S, BLOCK_N]
        ws = ws_ptr + e64 * stride_wse + (n_start // 128) * stride_wsn  # [S]
        wm = ok[:, None, None] & n_ok[None, :, None]
        acc = tl.zeros((S, BLOCK_N), dtype=tl.float32)
        if tl.max(e, axis=0) >= 0:
            # PRELOAD: the first K steps' weight tiles (up to 4; steps past I load nothing)
            # into registers before the wait, so that with PDL they stream while gate/up runs
            if PRELOAD > 0:
                b0 = _w_tile(w_ptr, rows_w, 0, wm, I, I, BLOCK_K)
            if PRELOAD > 1:
                b1 = _w_tile(w_ptr, rows_w, BLOCK_K, wm, I, I, BLOCK_K)
            if PRELOAD > 2:
                b2 = _w_tile(w_ptr, rows_w, 2 * BLOCK_K, wm, I, I, BLOCK_K)
            if PRELOAD > 3:
                b3 = _w_tile(w_ptr, rows_w, 3 * BLOCK_K, wm, I, I, BLOCK_K)
            if PREFETCH:  # (as in the gate/up kernel)
                b_n = _w_tile(w_ptr, rows_w, PRELOAD * BLOCK_K, wm, I, I, BLOCK_K)
            if PDL:
                _grid_wait()
            for j in tl.static_range(PRELOAD):  # the preloaded steps, then the rest
                acc = _down_step(acc, b0 if j == 0 else b1 if j == 1 else b2 if j == 2 else b3,
                                 j * BLOCK_K, inter_ptr, ws, s64, ok, I, stride_ir, stride_ip,
                                 w_ptr.dtype.element_ty, ACT_Q, FP8_MAX, ROUND, MIN_EXP, S,
                                 BLOCK_K, SPLIT, WFP8)
            for k0 in range(PRELOAD * BLOCK_K, I, BLOCK_K):  # (no step is preloaded twice)
                if PREFETCH:
                    b = b_n
                    b_n = _w_tile(w_ptr, rows_w, k0 + BLOCK_K, wm, I, I, BLOCK_K)
                else:
                    b = _w_tile(w_ptr, rows_w, k0, wm, I, I, BLOCK_K)
                acc = _down_step(acc, b, k0, inter_ptr, ws, s64, ok, I, stride_ir, stride_ip,
                                 w_ptr.dtype.element_ty, ACT_Q, FP8_MAX, ROUND, MIN_EXP, S,
                                 BLOCK_K, SPLIT, WFP8)
        if WEIGHTED:
            acc = acc * tl.load(weight_ptr + s64, mask=ok, other=0.0)[:, None]
        if PER_ROW:
            r64 = tl.cast(u, tl.int64)
            if WEIGHTED:
                tl.store(out_ptr + r64 * stride_or + offs_n,
                         tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=n_ok)
            else:
                j = tl.arange(0, S)
                tl.store(out_ptr + r64 * stride_or + j[:, None] * stride_ok + offs_n[None, :],
                         acc.to(out_ptr.dtype.element_ty),
                         mask=(j < K_TOPK)[:, None] & n_ok[None, :])
        else:
            tl.store(out_ptr + s64[:, None] * stride_ok + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=ok[:, None] & n_ok[None, :])
    if PDL:  # (every program waits, those without a local slot too: the grid then ends only
        _grid_wait()  # after gate/up's, whatever the kernels behind it assume)
