"""Gluon kernels of the grouped block-FP8 experts on Hopper (issue 31; imported only where
Triton has Gluon's NVIDIA Hopper modules; launched by ``TritonFP8Experts`` when its config says
``"gluon": True``, on NVIDIA sm_90 only).

The same layout, buffers and arithmetic as ``_triton_fp8.py``'s ``_fp8_gate_up_kernel`` and
``_fp8_down_kernel`` (each 128-wide K step's FP8 product, from the tensor core's own
accumulator, times (row scale) x (weight block scale) added to a float32 sum; SiLU(gate) * up
quantised per 1x128 group in the gate/up epilogue; the slot's routing weight in the down
epilogue), written in Gluon because Triton's ``tl.dot`` drains the wgmma pipeline every K step
(``warp_group_dot_wait 0``) and leaves the operand loads to its pipeliner. Here:
- operands go into NVMMA shared memory by cp.async (the gathered input rows of gate/up are a
  row gather, which Hopper's TMA cannot do), STAGES deep, one commit group per K step;
- each K step's MMA is an async wgmma into a fresh accumulator (``use_acc=False``) whose
  product is promoted into the float32 sum. Gate/up waits for each MMA before its promotion
  (its two float32 sums and one product take 192 registers a thread; a second product in
  flight would spill); the down kernel takes the K steps in pairs and promotes step k while
  step k + 1 runs (``bench/gluon_fp8_probe.py`` measured that pair loop at 787 against 733
  TFLOP/s drained, dense, on an H100).
  ptxas serialises every wgmma of a loop that carries one in flight across its back edge
  (warning C7514), so nothing is in flight at a back edge;
- tiles: BLOCK_M rows of the layout (64: one warpgroup, 4 warps; 128: two, 8 warps) x 128
  columns (one weight-scale block), BLOCK_K 128 (one scale group).
Shared memory hazards between warps (cp.async into a stage that another warpgroup's wgmma
read) are ordered by the barriers that Triton's membar pass inserts.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# cp.async into shared memory: async_copy_global_to_shared in Triton 3.6, async_load from 3.8
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _copy(smem, ptr, rows64, row_ok, row_len, kb, K_DIM, ld: gl.constexpr):
    """cp.async of [rows, 128] FP8 at K step ``kb`` (columns past K_DIM and rows off
    ``row_ok`` zero-filled) into ``smem`` (one stage)."""
    rk = kb * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, ld))
    _cp_async(smem, ptr + gl.expand_dims(rows64 * row_len, 1) + gl.expand_dims(rk, 0),
              mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(rk < K_DIM, 0))


@gluon.jit
def _mma(a_smem, b_smem, s, regs):
    """Step s's MMA issued, asynchronous, into a fresh accumulator (``regs``: registers to
    reuse, their values ignored; the caller has waited for the stage's copies)."""
    return warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), regs, use_acc=False,
                         is_async=True)


@gluon.jit
def _landed(LEFT: gl.constexpr):
    """Wait until at most LEFT commit groups of this thread are in flight, then make the
    landed tiles visible to the tensor cores."""
    async_copy.wait_group(LEFT)
    fence_async_shared()


@gluon.jit
def _quantised_store(acc_g, acc_u, p64, n_start, iq_ptr, is_ptr, stride_ip, stride_is,
                     FP8_MAX: gl.constexpr, layout: gl.constexpr):
    """The gate/up epilogue (``_fp8_gate_up_kernel``'s): SiLU(gate) * up of rows ``p64`` and
    the 128 columns from ``n_start`` quantised as one 1x128 group a row (``div_rn``, the 1e-10
    floor, the clamp), stored to ``iq`` with its scale in ``is``."""
    h = acc_g / (1.0 + gl.exp(-acc_g)) * acc_u
    amax = gl.maximum(gl.max(gl.abs(h), axis=1), 1e-10)
    sc = gl.div_rn(amax, amax * 0.0 + FP8_MAX)
    q = gl.div_rn(h, gl.expand_dims(sc, 1) + gl.zeros_like(h))
    q = gl.minimum(gl.maximum(q, -FP8_MAX), FP8_MAX)
    cols = n_start + gl.arange(0, 128, layout=gl.SliceLayout(0, layout))
    gl.store(iq_ptr + gl.expand_dims(p64 * stride_ip, 1) + gl.expand_dims(cols, 0),
             q.to(iq_ptr.dtype.element_ty))
    gl.store(is_ptr + p64 * stride_is + n_start // 128, sc)


@gluon.jit
def _slot_store(acc, p, sorted_ptr, weight_ptr, out_ptr, N_SLOTS, H, n_start, stride_os,
                WEIGHTED: gl.constexpr, layout: gl.constexpr):
    """The down epilogue (``_fp8_down_kernel``'s): rows ``p``'s sums (times their slot's
    routing weight when WEIGHTED) stored at their slots, columns ``n_start`` .. + 127 below
    H; padding positions (slot N_SLOTS) store nothing."""
    slot = gl.load(sorted_ptr + p)
    ok = slot < N_SLOTS
    if WEIGHTED:
        acc = acc * gl.expand_dims(gl.load(weight_ptr + slot, mask=ok, other=0.0), 1)
    cols = n_start + gl.arange(0, 128, layout=gl.SliceLayout(0, layout))
    safe = gl.where(ok, slot, 0).to(gl.int64)
    gl.store(out_ptr + gl.expand_dims(safe * stride_os, 1) + gl.expand_dims(cols, 0),
             acc.to(out_ptr.dtype.element_ty),
             mask=gl.expand_dims(ok, 1) & gl.expand_dims(cols < H, 0))


@gluon.jit
def _gluon_fp8_gate_up_kernel(
    aq_ptr, as_ptr, w_ptr, ws_ptr, iq_ptr, is_ptr, sorted_ptr, block_expert_ptr,
    N_SLOTS, H, I, K_TOPK, N_KB, stride_ar, stride_as, stride_wse, stride_wsn, stride_ip,
    stride_is, FP8_MAX: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """iq[p], is[p] = quantise(silu(a[row(p)] @ gate[e].T) * (a[row(p)] @ up[e].T)) for the
    padded positions p of one block and one 128-column tile of I (``_fp8_gate_up_kernel``'s
    contract, BLOCK_N = BLOCK_K = 128). ``aq`` [R, H] FP8, ``as`` [R, N_KB] float32; ``w``
    [e * 2I, H] FP8 (row stride H), ``ws`` [e, 2I/128, N_KB]; ``iq`` [P, I] FP8, ``is`` [P,
    I/128]. Grid: (blocks x I/128,)."""
    gl.static_assert(STAGES >= 2)
    gl.static_assert(BLOCK_M == 16 * num_warps)
    BN: gl.constexpr = 128
    n_tiles = I // BN
    pid_m = gl.program_id(0) // n_tiles
    n_start = gl.program_id(0) % n_tiles * BN
    e = gl.load(block_expert_ptr + pid_m)
    if e >= 0:
        ld: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                      warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BN, 32])
        dt: gl.constexpr = aq_ptr.dtype.element_ty
        a_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 128], dt)
        b_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 128], dt)
        a_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, 128], a_l)
        g_smem = gl.allocate_shared_memory(dt, [STAGES, BN, 128], b_l)
        u_smem = gl.allocate_shared_memory(dt, [STAGES, BN, 128], b_l)
        # the block's rows (gathered: slot // K) and the tile's weight rows, for the copies
        p_ld = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
        slot_ld = gl.load(sorted_ptr + p_ld)
        ok_ld = slot_ld < N_SLOTS
        row_ld = gl.where(ok_ld, slot_ld // K_TOPK, 0).to(gl.int64)
        wg = (e * 2 * I + n_start + gl.arange(0, BN, layout=gl.SliceLayout(1, ld))).to(gl.int64)
        wu = wg + I
        all_n = wg >= 0
        # the same rows in the accumulator's layout, for the scales and the stores
        p_mma = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        slot = gl.load(sorted_ptr + p_mma)
        ok = slot < N_SLOTS
        row = gl.where(ok, slot // K_TOPK, 0).to(gl.int64)
        ws_g = ws_ptr + e.to(gl.int64) * stride_wse + (n_start // 128) * stride_wsn
        ws_u = ws_g + (I // 128) * stride_wsn
        acc_g = gl.zeros([BLOCK_M, BN], gl.float32, layout=mma)
        acc_u = gl.zeros([BLOCK_M, BN], gl.float32, layout=mma)
        p = gl.zeros([BLOCK_M, BN], gl.float32, layout=mma)  # (the products' registers: their
        # values unused, use_acc=False; one set, so 3 x 64 float32 registers a thread)
        for i in gl.static_range(STAGES - 1):  # prologue: steps 0 .. STAGES - 2 in flight
            _copy(a_smem.index(i), aq_ptr, row_ld, ok_ld, stride_ar, i, H, ld)
            _copy(g_smem.index(i), w_ptr, wg, all_n, H, i, H, ld)
            _copy(u_smem.index(i), w_ptr, wu, all_n, H, i, H, ld)
            async_copy.commit_group()
        for kb in range(0, N_KB):
            s = kb % STAGES
            _landed(STAGES - 2)
            t = _mma(a_smem, g_smem, s, p)
            a_s = gl.load(as_ptr + row * stride_as + kb, mask=ok, other=0.0)
            sc_g = gl.expand_dims(a_s * gl.load(ws_g + kb), 1)
            sc_u = gl.expand_dims(a_s * gl.load(ws_u + kb), 1)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            acc_g = acc_g + p * sc_g
            t = _mma(a_smem, u_smem, s, p)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            acc_u = acc_u + p * sc_u
            # the stage of step kb - 1 (its MMAs waited for) takes step kb + STAGES - 1
            nxt = kb + STAGES - 1
            s_n = nxt % STAGES
            _copy(a_smem.index(s_n), aq_ptr, row_ld, ok_ld, stride_ar, nxt, H, ld)
            _copy(g_smem.index(s_n), w_ptr, wg, all_n, H, nxt, H, ld)
            _copy(u_smem.index(s_n), w_ptr, wu, all_n, H, nxt, H, ld)
            async_copy.commit_group()
        async_copy.wait_group(0)
        _quantised_store(acc_g, acc_u, p_mma.to(gl.int64), n_start, iq_ptr, is_ptr, stride_ip,
                         stride_is, FP8_MAX, mma)


@gluon.jit
def _gluon_fp8_down_kernel(
    iq_ptr, is_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
    N_SLOTS, H, I, N_KB, stride_ip, stride_is, stride_wse, stride_wsn, stride_os,
    WEIGHTED: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """out[slot(p), n] = (d[p] @ down[e].T)[n] (times the slot's weight when WEIGHTED) with d =
    iq * is the FP8 intermediate, for one block and one 128-column tile of H
    (``_fp8_down_kernel``'s contract, BLOCK_N = BLOCK_K = 128): ``iq`` [P, I] FP8 (row stride
    ``stride_ip``), ``is`` [P, N_KB]; ``w`` [e * H, I] FP8, ``ws`` [e, ceil(H/128), N_KB];
    ``out`` [N_SLOTS, H]. Grid: (blocks x ceil(H/128),). K steps in pairs: step k promoted
    while step k + 1's MMA runs."""
    gl.static_assert(STAGES >= 3)
    gl.static_assert(BLOCK_M == 16 * num_warps)
    BN: gl.constexpr = 128
    n_tiles = gl.cdiv(H, BN)
    pid_m = gl.program_id(0) // n_tiles
    n_start = gl.program_id(0) % n_tiles * BN
    e = gl.load(block_expert_ptr + pid_m)
    if e >= 0:
        ld: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                      warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BN, 32])
        dt: gl.constexpr = iq_ptr.dtype.element_ty
        a_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 128], dt)
        b_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 128], dt)
        a_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, 128], a_l)
        b_smem = gl.allocate_shared_memory(dt, [STAGES, BN, 128], b_l)
        p_ld = (pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))).to(
            gl.int64)
        all_m = p_ld >= 0
        n_ld = n_start + gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
        wrow = (e * H + n_ld).to(gl.int64)
        n_ok_ld = n_ld < H
        p_mma = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        p64 = p_mma.to(gl.int64)
        ws = ws_ptr + e.to(gl.int64) * stride_wse + (n_start // 128) * stride_wsn
        acc = gl.zeros([BLOCK_M, BN], gl.float32, layout=mma)
        da = gl.zeros([BLOCK_M, BN], gl.float32, layout=mma)
        db = gl.zeros([BLOCK_M, BN], gl.float32, layout=mma)
        for i in gl.static_range(STAGES - 1):
            _copy(a_smem.index(i), iq_ptr, p_ld, all_m, stride_ip, i, I, ld)
            _copy(b_smem.index(i), w_ptr, wrow, n_ok_ld, I, i, I, ld)
            async_copy.commit_group()
        for kb in range(0, N_KB - 1, 2):  # pairs; nothing in flight at the back edge
            s0 = kb % STAGES
            s1 = (kb + 1) % STAGES
            _landed(STAGES - 2)
            ta = _mma(a_smem, b_smem, s0, da)
            _landed(STAGES - 3)  # (one group more landed: step kb + 1's)
            tb = _mma(a_smem, b_smem, s1, db)
            sa = gl.expand_dims(gl.load(is_ptr + p64 * stride_is + kb) * gl.load(ws + kb), 1)
            sb = gl.expand_dims(gl.load(is_ptr + p64 * stride_is + kb + 1)
                                * gl.load(ws + kb + 1), 1)
            da = warpgroup_mma_wait(num_outstanding=1, deps=(ta, ))
            acc = acc + da * sa
            # step kb - 1's stage (retired by the last pair's wait) takes step kb + STAGES - 1
            nxt = kb + STAGES - 1
            _copy(a_smem.index(nxt % STAGES), iq_ptr, p_ld, all_m, stride_ip, nxt, I, ld)
            _copy(b_smem.index(nxt % STAGES), w_ptr, wrow, n_ok_ld, I, nxt, I, ld)
            async_copy.commit_group()
            db = warpgroup_mma_wait(num_outstanding=0, deps=(tb, ))
            acc = acc + db * sb
            _copy(a_smem.index(s0), iq_ptr, p_ld, all_m, stride_ip, kb + STAGES, I, ld)
            _copy(b_smem.index(s0), w_ptr, wrow, n_ok_ld, I, kb + STAGES, I, ld)
            async_copy.commit_group()
        if N_KB % 2 == 1:  # the last step alone
            last = N_KB - 1
            _landed(STAGES - 2)
            t = _mma(a_smem, b_smem, last % STAGES, da)
            sl = gl.expand_dims(gl.load(is_ptr + p64 * stride_is + last) * gl.load(ws + last),
                                1)
            da = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            acc = acc + da * sl
        async_copy.wait_group(0)
        _slot_store(acc, p_mma, sorted_ptr, weight_ptr, out_ptr, N_SLOTS, H, n_start, stride_os,
                    WEIGHTED, mma)
