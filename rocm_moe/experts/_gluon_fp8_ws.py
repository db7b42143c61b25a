"""Warp-specialised Gluon kernels of the grouped block-FP8 experts on Hopper (issue 31: the
"next version" of notes/fp8.md's Gluon section; launched by ``TritonFP8Experts`` when its
config says ``"gluon": "ws"``, NVIDIA sm_90 only).

The same layout, buffers and arithmetic as ``_gluon_fp8.py`` (each 128-wide K step's FP8
product, from a fresh tensor-core accumulator, times (row scale) x (weight block scale) added
to a float32 sum; SiLU(gate) * up quantised per 1x128 group in the gate/up epilogue; the slot's
routing weight in the down epilogue), with DeepGEMM's structure instead of one program doing
everything in lockstep:
- a **producer** warp (a worker partition, few registers) only issues TMA copies into a ring
  of STAGES shared-memory stages, each guarded by a ``ready`` mbarrier (the copies' bytes) and
  an ``empty`` one (both consumers done with it);
- two **consumer** warpgroups (the default partition and a worker), each with its own 64 of
  the block's 128 rows, wait for a stage, run the step's MMA(s), release the stage and promote
  the product into their float32 sums. They share nothing but the ring, so while one promotes
  the other's MMA keeps the tensor cores busy (the lockstep of one 8-warp program left them
  idle during every promotion).
TMA cannot gather rows, so gate/up reads its rows already in block order: ``ws_gemms`` gathers
the FP8 rows (and their scales, zero for padding) into [P, H] before the launch, one
index_select each; the down GEMM's rows are the intermediate, in block order already.
Tiles: 128 rows (two 64-row halves) x 128 columns (one weight-scale block) x 128 (one scale
group). Out-of-range TMA boxes (H's tail, a weight tile past the last expert) are zero-filled
and still count their whole box in the expected bytes.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from rocm_moe.experts._gluon_fp8 import _quantised_store, _slot_store  # (the epilogues)

# TMA global -> shared: async_copy_global_to_shared in Triton 3.6, async_load from 3.8
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

HALF_ROWS = gl.constexpr(64)  # a consumer warpgroup's rows (the wgmma's M)
TILE = gl.constexpr(128)  # the block's rows, the tile's columns and the K step: a scale block
PRODUCER_REGS = gl.constexpr(40)  # registers a thread of the producer warp keeps (setmaxnreg)
CONSUMER_REGS = gl.constexpr(232)  # and of the worker consumer warpgroup


@gluon.jit
def _wait_stage(bars, kb, STAGES: gl.constexpr, FILLING: gl.constexpr):
    """Wait for step ``kb``'s stage: its copies landed (``FILLING`` False, ``bars`` the ready
    barriers) or, for the producer (``FILLING`` True, ``bars`` the empty ones), its last use
    released (the first round passes: a fresh mbarrier's previous phase counts as done).
    Returns the stage's index."""
    phase = (kb // STAGES) & 1
    if FILLING:
        phase = phase ^ 1
    mbarrier.wait(bars.index(kb % STAGES), phase)
    return kb % STAGES


@gluon.jit
def _load_rows(a_desc, a_smem, bar, row0, k, s):
    """TMA of the block's two 64-row halves from ``row0`` at column ``k`` into stage ``s``."""
    _tma_load(a_desc, [row0, k], bar, a_smem.index(2 * s))
    _tma_load(a_desc, [row0 + HALF_ROWS, k], bar, a_smem.index(2 * s + 1))


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """The ring's barriers: ``ready`` (count 1: the producer's expect, then the stage's TMA
    bytes) and ``empty`` (count 2: one arrive from each consumer), a pair per stage."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    return ready, empty


@gluon.jit
def _used_tiles(num_padded_ptr, n_cols):
    """The tiles of the layout's used blocks (a prefix of its blocks: ``num_padded`` rows),
    so a capacity-sized batch's unused blocks take no program and no loop step."""
    return gl.load(num_padded_ptr) // TILE * n_cols


@gluon.jit
def _tile(tile, block_expert_ptr, n_cols):
    """Tile ``tile`` of the grid's order (a block's column tiles in a row): its block, first
    column and expert (-1: an unused block, skipped by every partition alike)."""
    pid_m = tile // n_cols
    return pid_m, tile % n_cols * TILE, gl.load(block_expert_ptr + pid_m)


@gluon.jit
def _gate_up_producer(a_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, block_expert_ptr,
                      num_padded_ptr, I, N_KB, STAGES: gl.constexpr):
    """Each K step of each of this program's tiles: both row halves of the block and the
    tile's gate and up weight rows. The ring runs on across tiles (``step``), so the next
    tile's stages fill while the consumers run the last one's epilogue."""
    n_cols = I // TILE
    step = 0
    for tile in range(gl.program_id(0), _used_tiles(num_padded_ptr, n_cols),
                      gl.num_programs(0)):
        pid_m, n_start, e = _tile(tile, block_expert_ptr, n_cols)
        if e >= 0:
            gate_row = e * 2 * I + n_start
            for kb in range(N_KB):
                s = _wait_stage(empty, step + kb, STAGES, True)
                bar = ready.index(s)
                mbarrier.expect(bar, 2 * HALF_ROWS * TILE + 2 * TILE * TILE)  # (FP8: a byte
                k = kb * TILE  # an element)
                _load_rows(a_desc, a_smem, bar, pid_m * TILE, k, s)
                _tma_load(w_desc, [gate_row, k], bar, g_smem.index(s))
                _tma_load(w_desc, [gate_row + I, k], bar, u_smem.index(s))
            step += N_KB


@gluon.jit
def _gate_up_consumer(a_smem, g_smem, u_smem, ready, empty, as_ptr, ws_ptr, iq_ptr, is_ptr,
                      block_expert_ptr, num_padded_ptr, I, N_KB, stride_as, stride_wse, stride_wsn,
                      stride_ip, stride_is, FP8_MAX: gl.constexpr, STAGES: gl.constexpr,
                      HALF: gl.constexpr):
    """Per tile, rows p0 + 64 HALF .. + 63 of its block: their gate and up sums over K, then
    the epilogue of ``_gluon_fp8_gate_up_kernel`` (quantised SiLU(gate) * up and its 1x128
    group scale)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, 128, 32])
    n_cols = I // TILE
    step = 0
    for tile in range(gl.program_id(0), _used_tiles(num_padded_ptr, n_cols),
                      gl.num_programs(0)):
        pid_m, n_start, e = _tile(tile, block_expert_ptr, n_cols)
        if e >= 0:
            ws_g = ws_ptr + e.to(gl.int64) * stride_wse + (n_start // TILE) * stride_wsn
            ws_u = ws_g + n_cols * stride_wsn
            p = pid_m * TILE + HALF * HALF_ROWS + gl.arange(0, HALF_ROWS,
                                                            layout=gl.SliceLayout(1, mma))
            p64 = p.to(gl.int64)
            acc_g = gl.zeros([HALF_ROWS, TILE], gl.float32, layout=mma)
            acc_u = gl.zeros([HALF_ROWS, TILE], gl.float32, layout=mma)
            prod = gl.zeros([HALF_ROWS, TILE], gl.float32, layout=mma)  # (registers reused:
            # use_acc False; three [64, 128] float32 sets, 192 registers a thread)
            for kb in range(N_KB):
                s = _wait_stage(ready, step + kb, STAGES, False)
                a = a_smem.index(2 * s + HALF)
                t = warpgroup_mma(a, g_smem.index(s).permute((1, 0)), prod, use_acc=False,
                                  is_async=True)
                a_s = gl.load(as_ptr + p64 * stride_as + kb)  # (padding rows: scale 0)
                sc_g = gl.expand_dims(a_s * gl.load(ws_g + kb), 1)
                sc_u = gl.expand_dims(a_s * gl.load(ws_u + kb), 1)
                prod = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
                acc_g = acc_g + prod * sc_g
                # (an empty wait through acc_g: the gate promotion is done before the up MMA
                # is issued; otherwise LLVM sinks it below that MMA's wait, the two products
                # are live at once, 256 registers, and ptxas spills about 20 values an
                # iteration at 232)
                acc_g = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g, ))
                t = warpgroup_mma(a, u_smem.index(s).permute((1, 0)), prod, use_acc=False,
                                  is_async=True)
                prod = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
                mbarrier.arrive(empty.index(s), count=1)  # (both MMAs of the stage done)
                acc_u = acc_u + prod * sc_u
            step += N_KB
            _quantised_store(acc_g, acc_u, p64, n_start, iq_ptr, is_ptr, stride_ip, stride_is,
                             FP8_MAX, mma)


@gluon.jit
def _ws_fp8_gate_up_kernel(
    a_desc, w_desc, as_ptr, ws_ptr, iq_ptr, is_ptr, block_expert_ptr, num_padded_ptr, I, N_KB,
    stride_as, stride_wse, stride_wsn, stride_ip, stride_is, FP8_MAX: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """iq[p], is[p] = quantise(silu(a[p] @ gate[e].T) * (a[p] @ up[e].T)) for the 128 padded
    positions p of a block and a 128-column tile of I, for each tile of the used blocks (the
    first ``num_padded`` / 128; x I/128 tiles) this program takes (tile = program id, + the
    grid's size, ...: one a program when the grid has them all, persistent when it has one
    program a SM). ``a_desc``: the
    block-ordered FP8 rows [P, H] in [64, 128] boxes; ``as`` [P, N_KB] float32 (0 on
    padding); ``w_desc``: the weights [e * 2I, H] in [128, 128] boxes, ``ws`` [e, 2I/128,
    N_KB]; ``iq`` [P, I] FP8, ``is`` [P, I/128]. num_warps 4 (one consumer warpgroup; the
    kernel runs 12 warps: Triton pads the one-warp producer to a warpgroup, and the default
    partition's registers are what is left, 504 - CONSUMER_REGS - PRODUCER_REGS = 232)."""
    gl.static_assert(num_warps == 4)
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, HALF_ROWS, TILE],
                                       a_desc.layout)
    g_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, TILE, TILE], w_desc.layout)
    u_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, TILE, TILE], w_desc.layout)
    ready, empty = _ring_barriers(STAGES)
    gl.warp_specialize([
        (_gate_up_consumer, (a_smem, g_smem, u_smem, ready, empty, as_ptr, ws_ptr, iq_ptr,
                             is_ptr, block_expert_ptr, num_padded_ptr, I, N_KB, stride_as,
                             stride_wse,
                             stride_wsn, stride_ip, stride_is, FP8_MAX, STAGES, 0)),
        (_gate_up_consumer, (a_smem, g_smem, u_smem, ready, empty, as_ptr, ws_ptr, iq_ptr,
                             is_ptr, block_expert_ptr, num_padded_ptr, I, N_KB, stride_as,
                             stride_wse,
                             stride_wsn, stride_ip, stride_is, FP8_MAX, STAGES, 1)),
        (_gate_up_producer, (a_desc, w_desc, a_smem, g_smem, u_smem, ready, empty,
                             block_expert_ptr, num_padded_ptr, I, N_KB, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@gluon.jit
def _down_producer(a_desc, w_desc, a_smem, b_smem, ready, empty, block_expert_ptr,
                   num_padded_ptr, H, N_KB, STAGES: gl.constexpr):
    """Each K step of each of this program's tiles: both row halves of the block's
    intermediate and the tile's weight rows (the ring runs on across tiles)."""
    n_cols = gl.cdiv(H, TILE)
    step = 0
    for tile in range(gl.program_id(0), _used_tiles(num_padded_ptr, n_cols),
                      gl.num_programs(0)):
        pid_m, n_start, e = _tile(tile, block_expert_ptr, n_cols)
        if e >= 0:
            for kb in range(N_KB):
                s = _wait_stage(empty, step + kb, STAGES, True)
                bar = ready.index(s)
                mbarrier.expect(bar, 2 * HALF_ROWS * TILE + TILE * TILE)
                k = kb * TILE
                _load_rows(a_desc, a_smem, bar, pid_m * TILE, k, s)
                _tma_load(w_desc, [e * H + n_start, k], bar, b_smem.index(s))
            step += N_KB


@gluon.jit
def _down_consumer(a_smem, b_smem, ready, empty, is_ptr, ws_ptr, out_ptr, sorted_ptr,
                   weight_ptr, block_expert_ptr, num_padded_ptr, N_SLOTS, H, N_KB, stride_is,
                   stride_wse, stride_wsn, stride_os, WEIGHTED: gl.constexpr,
                   STAGES: gl.constexpr, HALF: gl.constexpr):
    """Per tile, rows p0 + 64 HALF .. + 63 of its block: their sums over I, then
    ``_gluon_fp8_down_kernel``'s epilogue (the slot's weight when WEIGHTED; the row stored at
    its slot)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, 128, 32])
    n_cols = gl.cdiv(H, TILE)
    step = 0
    for tile in range(gl.program_id(0), _used_tiles(num_padded_ptr, n_cols),
                      gl.num_programs(0)):
        pid_m, n_start, e = _tile(tile, block_expert_ptr, n_cols)
        if e >= 0:
            ws = ws_ptr + e.to(gl.int64) * stride_wse + (n_start // TILE) * stride_wsn
            p = pid_m * TILE + HALF * HALF_ROWS + gl.arange(0, HALF_ROWS,
                                                            layout=gl.SliceLayout(1, mma))
            p64 = p.to(gl.int64)
            acc = gl.zeros([HALF_ROWS, TILE], gl.float32, layout=mma)
            prod = gl.zeros([HALF_ROWS, TILE], gl.float32, layout=mma)
            for kb in range(N_KB):
                s = _wait_stage(ready, step + kb, STAGES, False)
                t = warpgroup_mma(a_smem.index(2 * s + HALF), b_smem.index(s).permute((1, 0)),
                                  prod, use_acc=False, is_async=True)
                sc = gl.expand_dims(gl.load(is_ptr + p64 * stride_is + kb) * gl.load(ws + kb),
                                    1)
                prod = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
                mbarrier.arrive(empty.index(s), count=1)
                acc = acc + prod * sc
            step += N_KB
            _slot_store(acc, p, sorted_ptr, weight_ptr, out_ptr, N_SLOTS, H, n_start,
                        stride_os, WEIGHTED, mma)


@gluon.jit
def _ws_fp8_down_kernel(
    a_desc, w_desc, is_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, weight_ptr,
    num_padded_ptr, N_SLOTS, H, N_KB, stride_is, stride_wse, stride_wsn, stride_os,
    WEIGHTED: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """out[slot(p), n] = (d[p] @ down[e].T)[n] (times the slot's weight when WEIGHTED), d = iq *
    is the FP8 intermediate, for a block and a 128-column tile of H, for each tile of the used
    blocks (x ceil(H/128)) this program takes (as the gate/up kernel).
    ``a_desc``: ``iq`` [P, I] in [64, 128] boxes, ``is`` [P, N_KB]; ``w_desc``: the weights [e
    * H, I] in [128, 128] boxes (a tile past H reads the next expert's rows: its columns are
    not stored), ``ws`` [e, ceil(H/128), N_KB]; ``out`` [N_SLOTS, H]. num_warps 4."""
    gl.static_assert(num_warps == 4)
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, HALF_ROWS, TILE],
                                       a_desc.layout)
    b_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, TILE, TILE], w_desc.layout)
    ready, empty = _ring_barriers(STAGES)
    gl.warp_specialize([
        (_down_consumer, (a_smem, b_smem, ready, empty, is_ptr, ws_ptr, out_ptr, sorted_ptr,
                          weight_ptr, block_expert_ptr, num_padded_ptr, N_SLOTS, H, N_KB, stride_is,
                          stride_wse, stride_wsn, stride_os, WEIGHTED, STAGES, 0)),
        (_down_consumer, (a_smem, b_smem, ready, empty, is_ptr, ws_ptr, out_ptr, sorted_ptr,
                          weight_ptr, block_expert_ptr, num_padded_ptr, N_SLOTS, H, N_KB, stride_is,
                          stride_wse, stride_wsn, stride_os, WEIGHTED, STAGES, 1)),
        (_down_producer, (a_desc, w_desc, a_smem, b_smem, ready, empty, block_expert_ptr,
                          num_padded_ptr, H, N_KB, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
