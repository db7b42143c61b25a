"""Triton kernels of the small-batch experts path (``experts/triton_small.py``; imported only
where triton is installed): two launches (three where a weighted down writes per-slot rows)
that read ``topk_ids`` directly (no layout sort).

``_small_gate_up_kernel``: inter[slot] = SiLU(x[row] @ gate[e].T) * (x[row] @ up[e].T) for the
local slots, one column tile of I per program:
  - PER_SLOT: the programs stride over the slots, one slot per turn as a GEMV on the vector
    units (the weight tile times the row, summed along H); a slot whose expert another slot
    shares re-reads its weights (from L2).
  - otherwise: one program per local expert (and tile) gathers that expert's slots (a scan of
    the ids with a running count; BLOCK_M slots per pass) and runs them through tl.dot, so
    each weight tile is read once per expert; experts without slots end after the scan.
``_small_down_kernel``: one row and one column tile of H per program; its K slots in order
(unrolled, each load predicated on the slot being local): the down GEMV of each, then either
the routing-weighted sum in float32 (WEIGHTED: one store per row, deterministic, no atomics)
or each slot's raw output (exact zeros for non-local and empty slots).
``_small_down_slots_kernel``: the down projection into per-slot rows through tl.dot, per slot
(the grouped path's down without its layout) or per local expert (each weight tile read
once); ``_small_sum_kernel`` adds a row's weighted slots in slot order.

FP8 (block-scaled weights, 1x128 activation groups; ``experts/fp8.py``): the rows come
quantised; the gate/up products are scaled per 128-wide K step by (row scale) x (weight block
scale); the intermediate is stored unquantised in float32 and quantised per 1x128 group by the
down kernel as it reads it (each group is whole there), the arithmetic of
``quant.quantize_rows`` (``_quant_triton._to_fp8``). BLOCK_K is then 128 and BLOCK_N divides 128,
so a tile lies in one weight block.

BOUNDED: only the first ``num_rows[0]`` rows (a device count) hold slots; the programs stride
over those (or scan only their slots), so a grid sized for the rows expected stays correct for
any count.
"""

import triton
import triton.language as tl

from rocm_moe._quant_triton import _to_fp8
from rocm_moe.experts._triton_fp8 import _fp8_dot


@triton.jit
def _local(ids_ptr, map_ptr, s):
    """Local expert of slot ``s`` (scalar), -1 for an empty slot or another rank's expert."""
    g = tl.load(ids_ptr + s)
    return tl.where(g >= 0, tl.load(map_ptr + tl.maximum(g, 0)), -1)


@triton.jit
def _locals(ids_ptr, map_ptr, s, n_slots):
    """Local experts of slots ``s`` (a vector), -1 past ``n_slots``, for empty slots and for
    other ranks' experts."""
    ok = s < n_slots
    g = tl.load(ids_ptr + s, mask=ok, other=-1)
    return tl.load(map_ptr + tl.maximum(g, 0), mask=ok & (g >= 0), other=-1)


@triton.jit
def _gemv_slot(s, e, x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, H, I, K_TOPK,
               stride_xr, stride_xs, stride_wn, stride_wse, stride_wsn, stride_ir,
               FP8: tl.constexpr, QUANT_X: tl.constexpr, FP8_MAX: tl.constexpr,
               ROUND: tl.constexpr, MIN_EXP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """inter[s, tile] for one slot ``s`` of local expert ``e``, on the vector units
    (QUANT_X: the float row quantised per 1x128 group here, as ``quant.quantize_rows``)."""
    row = (s // K_TOPK).to(tl.int64)
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    rows_g = e.to(tl.int64) * 2 * I + offs_n
    # element-wise float32 partial sums, reduced along H once at the end (not every K step)
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(x_ptr + row * stride_xr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        m = n_ok[:, None] & k_ok[None, :]
        g = tl.load(w_ptr + rows_g[:, None] * stride_wn + offs_k[None, :], mask=m, other=0.0)
        u = tl.load(w_ptr + (rows_g + I)[:, None] * stride_wn + offs_k[None, :], mask=m,
                    other=0.0)
        if FP8:  # one activation group and one weight block per K step (BLOCK_K == 128)
            kb = k0 // BLOCK_K
            if QUANT_X:
                q, a_s = _quant_group(a, w_ptr.dtype.element_ty, FP8_MAX, ROUND, MIN_EXP)
                a = q.to(tl.float32)
            else:
                a_s = tl.load(xs_ptr + row * stride_xs + kb)
            ws = ws_ptr + e.to(tl.int64) * stride_wse + (n_start // 128) * stride_wsn + kb
            acc_g += g.to(tl.float32) * (a * (a_s * tl.load(ws)))[None, :]
            acc_u += u.to(tl.float32) * (a * (a_s * tl.load(ws + (I // 128) * stride_wsn)))[
                None, :]
        else:
            acc_g += g.to(tl.float32) * a[None, :]
            acc_u += u.to(tl.float32) * a[None, :]
    acc_g = tl.sum(acc_g, axis=1)
    acc_u = tl.sum(acc_u, axis=1)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(inter_ptr + tl.cast(s, tl.int64) * stride_ir + offs_n,
             h.to(inter_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gather_expert(e, ids_ptr, map_ptr, n_slots, p0, CHUNK: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """(slot ids of local expert ``e``'s matches number p0 .. p0 + BLOCK_M - 1 in slot order,
    ``n_slots`` where there are fewer; the number of its slots): a scan of the ids in chunks
    with a running count (the layout sort, for one expert, without a launch of its own)."""
    sel = tl.full((BLOCK_M,), 0, tl.int32) + n_slots
    want = p0 + tl.arange(0, BLOCK_M)
    base = p0 * 0
    for c0 in range(0, n_slots, CHUNK):
        s = c0 + tl.arange(0, CHUNK)
        m = _locals(ids_ptr, map_ptr, s, n_slots) == e
        rank = base + tl.cumsum(m.to(tl.int32), axis=0) - 1
        hit = m[None, :] & (rank[None, :] == want[:, None])
        sel = tl.minimum(sel, tl.min(tl.where(hit, s[None, :], n_slots), axis=1))
        base += tl.sum(m.to(tl.int32), axis=0)
    return sel, base


@triton.jit
def _dot_tile(sel, e, x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, n_slots, H, I, K_TOPK,
              stride_xr, stride_xs, stride_wn, stride_wse, stride_wsn, stride_ir,
              FP8: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr,
              QUANT_X: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
              MIN_EXP: tl.constexpr, DESC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """inter[sel, tile] of slots ``sel`` ([BLOCK_M] slot ids of local expert ``e``, n_slots
    where unused) through tl.dot (QUANT_X: as ``_gemv_slot``; DESC: ``w_ptr`` is a tensor
    descriptor of [BLOCK_N, BLOCK_K] weight tiles, TMA copies on Hopper)."""
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    rows_g = e.to(tl.int64) * 2 * I + offs_n
    ws_g = ws_ptr + e.to(tl.int64) * stride_wse + (n_start // 128) * stride_wsn
    ws_u = ws_g + (I // 128) * stride_wsn
    valid = sel < n_slots
    row = tl.where(valid, sel // K_TOPK, 0).to(tl.int64)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(x_ptr + row[:, None] * stride_xr + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        if DESC:  # (zero-filled past the matrix; columns past I are not stored)
            g = w_ptr.load([e * 2 * I + n_start, k0]).T
            up = w_ptr.load([e * 2 * I + I + n_start, k0]).T
        else:
            m = n_ok[None, :] & k_ok[:, None]
            g = tl.load(w_ptr + rows_g[None, :] * stride_wn + offs_k[:, None], mask=m,
                        other=0.0)
            up = tl.load(w_ptr + (rows_g + I)[None, :] * stride_wn + offs_k[:, None], mask=m,
                         other=0.0)
        if FP8:
            kb = k0 // BLOCK_K
            if QUANT_X:
                a, a_s = _quant_groups(a.to(tl.float32), w_ptr.dtype.element_ty, FP8_MAX,
                                       ROUND, MIN_EXP)
            else:
                a_s = tl.load(xs_ptr + row * stride_xs + kb, mask=valid, other=0.0)
            acc_g = _fp8_dot(a, g, acc_g, a_s[:, None] * tl.load(ws_g + kb), UPCAST, PRECISE)
            acc_u = _fp8_dot(a, up, acc_u, a_s[:, None] * tl.load(ws_u + kb), UPCAST, PRECISE)
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, up, acc_u)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(inter_ptr + sel[:, None].to(tl.int64) * stride_ir + offs_n[None, :],
             h.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _dot_expert(e, x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, ids_ptr, map_ptr, n_slots, H, I,
                K_TOPK, stride_xr, stride_xs, stride_wn, stride_wse, stride_wsn, stride_ir,
                FP8: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr,
                QUANT_X: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
                MIN_EXP: tl.constexpr, DESC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """inter[tile] of every slot of local expert ``e``, BLOCK_M slots per pass through
    ``_dot_tile`` (one pass unless the expert has more slots)."""
    sel, total = _gather_expert(e, ids_ptr, map_ptr, n_slots, 0, CHUNK, BLOCK_M)
    for p0 in range(0, total, BLOCK_M):
        if p0 > 0:
            sel, _ = _gather_expert(e, ids_ptr, map_ptr, n_slots, p0, CHUNK, BLOCK_M)
        _dot_tile(sel, e, x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, n_slots, H, I, K_TOPK,
                  stride_xr, stride_xs, stride_wn, stride_wse, stride_wsn, stride_ir, FP8,
                  UPCAST, PRECISE, QUANT_X, FP8_MAX, ROUND, MIN_EXP, DESC, BLOCK_M, BLOCK_N,
                  BLOCK_K)


@triton.jit
def _small_gate_up_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, ids_ptr, map_ptr, num_rows_ptr,
    R, H, I, K_TOPK,
    stride_xr, stride_xs, stride_wn, stride_wse, stride_wsn, stride_ir,
    FP8: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr, QUANT_X: tl.constexpr,
    FP8_MAX: tl.constexpr, ROUND: tl.constexpr, MIN_EXP: tl.constexpr, BOUNDED: tl.constexpr,
    PER_SLOT: tl.constexpr, DOT: tl.constexpr, DESC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """inter [R * K, I] (rows by slot) = SiLU(gate) * up of each local slot (module docstring);
    rows of other slots are not written. ``x`` [R, H] (FP8: quantised, ``xs`` [R, H/128]
    scales, or QUANT_X: float rows quantised per 1x128 group as they load); ``w`` [e * 2I, H]
    (FP8: ``ws`` [e, 2I/128, H/128]); ``ids`` [R * K] int32 global ids (-1 empty); ``map``
    [E] int32 global -> local (-1 elsewhere). Grid: (PER_SLOT:
    programs striding over the slots, else one per local expert; column tiles of I)."""
    n_slots = (tl.load(num_rows_ptr) if BOUNDED else R) * K_TOPK
    if PER_SLOT:
        for u in range(tl.program_id(0), n_slots, tl.num_programs(0)):
            e = _local(ids_ptr, map_ptr, u)
            if e >= 0:
                if DOT:  # the slot as the one row of a BLOCK_M tile: tl.dot's pipelined loads
                    sel = tl.where(tl.arange(0, BLOCK_M) == 0, u, n_slots)
                    _dot_tile(sel, e, x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, n_slots, H, I,
                              K_TOPK, stride_xr, stride_xs, stride_wn, stride_wse, stride_wsn,
                              stride_ir, FP8, UPCAST, PRECISE, QUANT_X, FP8_MAX, ROUND,
                              MIN_EXP, DESC, BLOCK_M, BLOCK_N, BLOCK_K)
                else:
                    _gemv_slot(u, e, x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, H, I, K_TOPK,
                               stride_xr, stride_xs, stride_wn, stride_wse, stride_wsn,
                               stride_ir, FP8, QUANT_X, FP8_MAX, ROUND, MIN_EXP, BLOCK_N,
                               BLOCK_K)
    else:
        _dot_expert(tl.program_id(0), x_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr, ids_ptr,
                    map_ptr, n_slots, H, I, K_TOPK, stride_xr, stride_xs, stride_wn,
                    stride_wse, stride_wsn, stride_ir, FP8, UPCAST, PRECISE, QUANT_X, FP8_MAX,
                    ROUND, MIN_EXP, DESC, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK)


@triton.jit
def _quant_group(a, dtype, FP8_MAX: tl.constexpr, ROUND: tl.constexpr, MIN_EXP: tl.constexpr):
    """(q, s): one 1x128 group of float32 ``a`` ([128]) quantised to FP8 ``dtype`` as
    ``quant.quantize_rows`` does, and its scale."""
    amax = tl.maximum(tl.max(tl.abs(a), axis=0), 1e-10)
    s = tl.div_rn(amax, amax * 0.0 + FP8_MAX)
    q = tl.clamp(tl.div_rn(a, s + tl.zeros_like(a)), -FP8_MAX, FP8_MAX)
    return _to_fp8(q, dtype, ROUND, MIN_EXP), s


@triton.jit
def _quant_groups(a, dtype, FP8_MAX: tl.constexpr, ROUND: tl.constexpr, MIN_EXP: tl.constexpr):
    """``_quant_group`` of each row of ``a`` ([M, 128]): (q [M, 128], s [M])."""
    amax = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10)
    s = tl.div_rn(amax, amax * 0.0 + FP8_MAX)
    q = tl.clamp(tl.div_rn(a, s[:, None] + tl.zeros_like(a)), -FP8_MAX, FP8_MAX)
    return _to_fp8(q, dtype, ROUND, MIN_EXP), s


@triton.jit
def _down_dot_tile(sel, e, inter_ptr, w_ptr, ws_ptr, out_ptr, weight_ptr, n_slots, H, I,
                   stride_ir, stride_wn, stride_wse, stride_wsn, stride_os,
                   FP8: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr,
                   FP8_MAX: tl.constexpr, ROUND: tl.constexpr, MIN_EXP: tl.constexpr,
                   WEIGHTED: tl.constexpr, DESC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[sel, tile] = inter[sel] @ down[e].T (times each slot's weight when WEIGHTED) for
    slots ``sel`` ([BLOCK_M] slot ids of local expert ``e``, n_slots where unused) through
    tl.dot (FP8: the intermediate quantised per 1x128 group as it loads)."""
    n_start = tl.program_id(1) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    rows_w = e.to(tl.int64) * H + offs_n
    ws = ws_ptr + e.to(tl.int64) * stride_wse + (n_start // 128) * stride_wsn
    valid = sel < n_slots
    s64 = tl.where(valid, sel, 0).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(inter_ptr + s64[:, None] * stride_ir + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        if DESC:  # (as in _dot_tile)
            b = w_ptr.load([e * H + n_start, k0]).T
        else:
            b = tl.load(w_ptr + rows_w[None, :] * stride_wn + offs_k[:, None],
                        mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if FP8:
            q, a_s = _quant_groups(a.to(tl.float32), w_ptr.dtype.element_ty, FP8_MAX, ROUND,
                                   MIN_EXP)
            acc = _fp8_dot(q, b, acc, a_s[:, None] * tl.load(ws + k0 // BLOCK_K), UPCAST,
                           PRECISE)
        else:
            acc = tl.dot(a, b, acc)
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + s64, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + s64[:, None] * stride_os + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _small_down_slots_kernel(
    inter_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weight_ptr, num_rows_ptr,
    R, H, I, K_TOPK,
    stride_ir, stride_wn, stride_wse, stride_wsn, stride_os,
    FP8: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr, FP8_MAX: tl.constexpr,
    ROUND: tl.constexpr, MIN_EXP: tl.constexpr, WEIGHTED: tl.constexpr, BOUNDED: tl.constexpr,
    PER_SLOT: tl.constexpr, DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """out[slot] = inter[slot] @ down[e].T (times the slot's weight when WEIGHTED) for the
    local slots, one column tile of H per program, through tl.dot: PER_SLOT, the programs
    stride over the slots (each slot the one row of a BLOCK_M tile; the grouped path's down
    without its layout); else one program per local expert gathers its slots (each weight
    tile read once per expert). ``out`` [R * K, H]: the raw [R, K, H] output or the weighted
    slots that ``_small_sum_kernel`` adds up; rows of other slots are not written."""
    n_slots = (tl.load(num_rows_ptr) if BOUNDED else R) * K_TOPK
    if PER_SLOT:
        for u in range(tl.program_id(0), n_slots, tl.num_programs(0)):
            e = _local(ids_ptr, map_ptr, u)
            if e >= 0:
                sel = tl.where(tl.arange(0, BLOCK_M) == 0, u, n_slots)
                _down_dot_tile(sel, e, inter_ptr, w_ptr, ws_ptr, out_ptr, weight_ptr, n_slots,
                               H, I, stride_ir, stride_wn, stride_wse, stride_wsn, stride_os,
                               FP8, UPCAST, PRECISE, FP8_MAX, ROUND, MIN_EXP, WEIGHTED, DESC,
                               BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        e = tl.program_id(0)
        sel, total = _gather_expert(e, ids_ptr, map_ptr, n_slots, 0, CHUNK, BLOCK_M)
        for p0 in range(0, total, BLOCK_M):
            if p0 > 0:
                sel, _ = _gather_expert(e, ids_ptr, map_ptr, n_slots, p0, CHUNK, BLOCK_M)
            _down_dot_tile(sel, e, inter_ptr, w_ptr, ws_ptr, out_ptr, weight_ptr, n_slots, H,
                           I, stride_ir, stride_wn, stride_wse, stride_wsn, stride_os, FP8,
                           UPCAST, PRECISE, FP8_MAX, ROUND, MIN_EXP, WEIGHTED, DESC, BLOCK_M,
                           BLOCK_N, BLOCK_K)


@triton.jit
def _small_sum_kernel(slots_ptr, ids_ptr, map_ptr, out_ptr, num_rows_ptr, R, H,
                      K_TOPK: tl.constexpr, BOUNDED: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r] = sum over the local slots k of slots[r * K + k] (float32, slot order; loads of
    other slots predicated off, their rows never read), for the rows r below ``num_rows[0]``
    (BOUNDED) or R, the programs striding over them."""
    n_rows = tl.load(num_rows_ptr) if BOUNDED else R
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        r64 = tl.cast(r, tl.int64)
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k in tl.static_range(K_TOPK):
            stop = tl.where(_local(ids_ptr, map_ptr, r64 * K_TOPK + k) >= 0, H, 0)
            acc += tl.load(slots_ptr + (r64 * K_TOPK + k) * H + h, mask=h < stop,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + r64 * H + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)


@triton.jit
def _down_row_dot(r64, n_start, inter_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weight_ptr,
                  H, I, stride_ir, stride_wn, stride_wse, stride_wsn, stride_or, stride_ok,
                  K_TOPK: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISE: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
                  MIN_EXP: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_small_down_kernel``'s row ``r64`` through tl.dot: each slot's intermediate row as
    the one row of a BLOCK_M tile (tl.dot's pipelined weight loads), the slots in order."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    row0 = tl.arange(0, BLOCK_M) == 0
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(K_TOPK):
        s = r64 * K_TOPK + k
        e = _local(ids_ptr, map_ptr, s)
        stop = tl.where(e >= 0, I, 0)  # another rank's or an empty slot: nothing loaded
        e64 = tl.maximum(e, 0).to(tl.int64)
        rows_w = e64 * H + offs_n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < stop
            a = tl.load(inter_ptr + s * stride_ir + offs_k[None, :]
                        + tl.zeros((BLOCK_M, 1), dtype=tl.int64),
                        mask=row0[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + rows_w[None, :] * stride_wn + offs_k[:, None],
                        mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if FP8:
                q, a_s = _quant_groups(a.to(tl.float32), w_ptr.dtype.element_ty, FP8_MAX,
                                       ROUND, MIN_EXP)
                ws = ws_ptr + e64 * stride_wse + (n_start // 128) * stride_wsn + k0 // BLOCK_K
                acc = _fp8_dot(q, b, acc, a_s[:, None] * tl.load(ws), UPCAST, PRECISE)
            else:
                acc = tl.dot(a, b, acc)
        y = tl.sum(tl.where(row0[:, None], acc, 0.0), axis=0)
        if WEIGHTED:
            total += y * tl.where(e >= 0, tl.load(weight_ptr + s), 0.0)
        else:
            tl.store(out_ptr + r64 * stride_or + k * stride_ok + offs_n,
                     y.to(out_ptr.dtype.element_ty), mask=n_ok)
    if WEIGHTED:
        tl.store(out_ptr + r64 * stride_or + offs_n, total.to(out_ptr.dtype.element_ty),
                 mask=n_ok)


@triton.jit
def _small_down_kernel(
    inter_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weight_ptr, num_rows_ptr,
    R, H, I,
    stride_ir, stride_wn, stride_wse, stride_wsn, stride_or, stride_ok,
    K_TOPK: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, PRECISE: tl.constexpr,
    FP8_MAX: tl.constexpr, ROUND: tl.constexpr, MIN_EXP: tl.constexpr, WEIGHTED: tl.constexpr,
    BOUNDED: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per row r and column tile of H: y_k = inter[r * K + k] @ down[e_k].T for its local slots
    (FP8: the intermediate quantised per 1x128 group on the way in; ``ws`` [e, H/128, I/128]);
    WEIGHTED: out[r] = sum_k weight[r * K + k] * y_k in float32, a fixed order ([R, H]); else
    out[r, k] = y_k, zeros for other slots ([R, K, H]). GEMVs on the vector units, or DOT:
    ``_down_row_dot``. Grid: (programs striding over the rows, column tiles of H); rows past
    ``num_rows[0]`` (BOUNDED) are not written."""
    n_rows = tl.load(num_rows_ptr) if BOUNDED else R
    n_start = tl.program_id(1) * BLOCK_N
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        r64 = tl.cast(r, tl.int64)
        if DOT:
            _down_row_dot(r64, n_start, inter_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr,
                          weight_ptr, H, I, stride_ir, stride_wn, stride_wse, stride_wsn,
                          stride_or, stride_ok, K_TOPK, FP8, UPCAST, PRECISE, FP8_MAX, ROUND,
                          MIN_EXP, WEIGHTED, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _down_row_gemv(r64, n_start, inter_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr,
                           weight_ptr, H, I, stride_ir, stride_wn, stride_wse, stride_wsn,
                           stride_or, stride_ok, K_TOPK, FP8, FP8_MAX, ROUND, MIN_EXP,
                           WEIGHTED, BLOCK_N, BLOCK_K)


@triton.jit
def _down_row_gemv(r64, n_start, inter_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr,
                   weight_ptr, H, I, stride_ir, stride_wn, stride_wse, stride_wsn, stride_or,
                   stride_ok, K_TOPK: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
                   ROUND: tl.constexpr, MIN_EXP: tl.constexpr, WEIGHTED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_small_down_kernel``'s row ``r64`` as GEMVs on the vector units."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    # element-wise float32 partial sums, reduced along I once per slot (raw) or once per
    # row (weighted: every slot's products enter scaled by its routing weight)
    total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(K_TOPK):
        s = r64 * K_TOPK + k
        e = _local(ids_ptr, map_ptr, s)
        stop = tl.where(e >= 0, I, 0)  # another rank's or an empty slot: nothing loaded
        rows_w = tl.maximum(e, 0).to(tl.int64) * H + offs_n
        c = tl.where(e >= 0, tl.load(weight_ptr + s), 0.0) if WEIGHTED else 1.0
        if not WEIGHTED:
            total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < stop
            a = tl.load(inter_ptr + s * stride_ir + offs_k, mask=k_ok,
                        other=0.0).to(tl.float32)
            b = tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if FP8:  # quant.quantize_rows of the group, as the grouped kernels store it
                q, a_s = _quant_group(a, w_ptr.dtype.element_ty, FP8_MAX, ROUND, MIN_EXP)
                ws = ws_ptr + tl.maximum(e, 0).to(tl.int64) * stride_wse \
                    + (n_start // 128) * stride_wsn + k0 // BLOCK_K
                a = q.to(tl.float32) * (a_s * tl.load(ws) * c)
            else:
                a = a * c
            total += b.to(tl.float32) * a[None, :]
        if not WEIGHTED:
            tl.store(out_ptr + r64 * stride_or + k * stride_ok + offs_n,
                     tl.sum(total, axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)
    if WEIGHTED:
        tl.store(out_ptr + r64 * stride_or + offs_n,
                 tl.sum(total, axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)
