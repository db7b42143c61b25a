"""Issue 31 probe: can a block-scaled FP8 GEMM keep the tensor cores busy on Hopper when each
128-wide K step's product is promoted (rescaled) into the float32 sum outside the MMA?

In Triton (``experts/_triton_fp8.py``) every K step's ``tl.dot`` is waited for at once
(``warp_group_dot_wait {pendings = 0}``): the rescale drains the wgmma pipeline, and the best
FP8 stages run at 455-575 TFLOP/s against ``torch._scaled_mm``'s 1416 on an H100
(bench/results/tune_experts_fp8_variants_h100.txt). Gluon (Triton 3.6+) exposes the async
wgmma and its wait: here K steps go in pairs, each MMA into a fresh accumulator; step k's
product is waited for with step k + 1's MMA still in flight (``warpgroup_mma_wait(1)``) and
promoted while it runs, then step k + 1's (OVERLAP: half the promotions hidden), against
waiting for every step (OVERLAP off: what Triton does). Pairs, not a rolling one-step lag:
ptxas serialises every wgmma of a loop that carries one in flight across its back edge
(warning C7514; the SASS check of ``--compile`` reports it).

The kernel: C[M, N] (bf16) = sum_kb (A[:, kb] @ B[:, kb].T) * sa[:, kb] * sb[n // 128, kb]
(A [M, K] FP8 with 1x128 row scales sa [M, K/128], B [N, K] FP8 with 128x128 block scales
sb [N/128, K/128]: the experts' layout), BLOCK_K = 128, BLOCK_N = 128, operands copied into
NVMMA shared memory by cp.async (pointer loads, as the gathered rows of the experts' gate/up
GEMM must be: Hopper's TMA has no row gather), STAGES deep, 8 warps (BLOCK_M 128).

Usage:
  python3 bench/gluon_fp8_probe.py --compile      (any machine: the sm_90 build, registers,
      whether ptxas serialised the wgmmas)
  python3 bench/gluon_fp8_probe.py [--sizes 4096 8192]   (an sm_90 GPU: checks each variant
      against a float32 reference, then times OVERLAP on / off and torch._scaled_mm's rate)
Not used by the package: a measurement for the next kernel, nothing else imports it.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_K = 128
# cp.async into shared memory: async_copy_global_to_shared in Triton 3.6, async_load from 3.8
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _load_stage(a_ptr, b_ptr, a_smem, b_smem, s, kb, off_m, off_n, M, N, K,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BK: gl.constexpr,
                num_warps: gl.constexpr):
    """cp.async of K step ``kb``'s A [BLOCK_M, BK] and B [BLOCK_N, BK] tiles into stage s."""
    ld: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
    rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    rk = kb * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, ld))
    k_ok = gl.expand_dims(rk < K, 0)
    _cp_async(
        a_smem.index(s), a_ptr + gl.expand_dims(rm.to(gl.int64) * K, 1) + gl.expand_dims(rk, 0),
        mask=gl.expand_dims(rm < M, 1) & k_ok)
    _cp_async(
        b_smem.index(s), b_ptr + gl.expand_dims(rn.to(gl.int64) * K, 1) + gl.expand_dims(rk, 0),
        mask=gl.expand_dims(rn < N, 1) & k_ok)
    async_copy.commit_group()


@gluon.jit
def _promote(acc, p, as_ptr, bs_ptr, rows, kb, off_n, M, NKB: gl.constexpr,
             BLOCK_N: gl.constexpr):
    """acc + p * (row scales of step kb) x (the weight block's scale of step kb)."""
    a_s = gl.load(as_ptr + rows.to(gl.int64) * NKB + kb, mask=rows < M, other=0.0)
    w_s = gl.load(bs_ptr + (off_n // BLOCK_N) * NKB + kb)
    return acc + p * gl.expand_dims(a_s * w_s, 1)


@gluon.jit
def _issue(a_smem, b_smem, s, regs, LANDED: gl.constexpr):
    """Step s's MMA issued, asynchronous, into a fresh accumulator (``regs``: registers to
    reuse, their values ignored) once its cp.async tiles have landed (at most LANDED groups
    left in flight) and are visible to the tensor cores."""
    async_copy.wait_group(LANDED)
    fence_async_shared()
    return warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), regs, use_acc=False,
                         is_async=True)


@gluon.jit
def fp8_block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                          NKB: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                          num_warps: gl.constexpr):
    BK: gl.constexpr = 128
    gl.static_assert(BLOCK_N == 128)  # (one weight-scale block a tile)
    gl.static_assert(STAGES >= 3)
    gl.static_assert(NKB >= 1)
    off_m = gl.program_id(0) * BLOCK_M
    off_n = gl.program_id(1) * BLOCK_N
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 32])
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BK], gl.float8e4nv)
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BK], gl.float8e4nv)
    a_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BK], a_layout)
    b_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, BK], b_layout)
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    da = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)  # products' registers (their
    db = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)  # values unused: use_acc=False)
    for i in gl.static_range(STAGES - 1):  # prologue: steps 0 .. STAGES - 2 in flight
        _load_stage(a_ptr, b_ptr, a_smem, b_smem, i, i, off_m, off_n, M, N, K,
                    BLOCK_M, BLOCK_N, BK, num_warps)
    if OVERLAP:
        # steps in pairs, nothing in flight at the loop's back edge (ptxas serialises every
        # wgmma of a loop that carries one in flight across it: warning C7514): issue kb and
        # kb + 1, promote kb while kb + 1 runs, then promote kb + 1
        for kb in range(0, NKB - 1, 2):
            s0 = kb % STAGES
            s1 = (kb + 1) % STAGES
            ta = _issue(a_smem, b_smem, s0, da, STAGES - 2)
            tb = _issue(a_smem, b_smem, s1, db, STAGES - 3)  # (one group more landed)
            pa = warpgroup_mma_wait(num_outstanding=1, deps=(ta, ))
            acc = _promote(acc, pa, as_ptr, bs_ptr, rows, kb, off_n, M, NKB, BLOCK_N)
            # step kb - 1's stage (retired by the last pair's wait) takes step kb + STAGES - 1
            _load_stage(a_ptr, b_ptr, a_smem, b_smem, (kb + STAGES - 1) % STAGES,
                        kb + STAGES - 1, off_m, off_n, M, N, K, BLOCK_M, BLOCK_N, BK, num_warps)
            pb = warpgroup_mma_wait(num_outstanding=0, deps=(tb, ))
            acc = _promote(acc, pb, as_ptr, bs_ptr, rows, kb + 1, off_n, M, NKB, BLOCK_N)
            _load_stage(a_ptr, b_ptr, a_smem, b_smem, s0, kb + STAGES, off_m, off_n, M, N, K,
                        BLOCK_M, BLOCK_N, BK, num_warps)
            da = pa
            db = pb
        if NKB % 2 == 1:  # the last step alone
            t = _issue(a_smem, b_smem, (NKB - 1) % STAGES, da, STAGES - 2)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            acc = _promote(acc, p, as_ptr, bs_ptr, rows, NKB - 1, off_n, M, NKB, BLOCK_N)
    else:  # drained: every step's MMA waited for at once, then promoted (as Triton's tl.dot)
        for kb in range(0, NKB):
            t = _issue(a_smem, b_smem, kb % STAGES, da, STAGES - 2)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            acc = _promote(acc, p, as_ptr, bs_ptr, rows, kb, off_n, M, NKB, BLOCK_N)
            _load_stage(a_ptr, b_ptr, a_smem, b_smem, (kb + STAGES - 1) % STAGES,
                        kb + STAGES - 1, off_m, off_n, M, N, K, BLOCK_M, BLOCK_N, BK, num_warps)
            da = p
    async_copy.wait_group(0)
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * N, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, acc.to(gl.bfloat16),
             mask=gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0))


CONFIGS = {"overlap": dict(STAGES=4, OVERLAP=True), "drain": dict(STAGES=4, OVERLAP=False)}


def run(a, sa, b, sb, cfg: dict) -> torch.Tensor:
    """C = the block-scaled product (bf16). a [M, K], b [N, K] float8_e4m3fn contiguous; sa
    [M, K/128], sb [N/128, K/128] float32 contiguous; K and N multiples of 128."""
    M, K = a.shape
    N = b.shape[0]
    fp8 = torch.float8_e4m3fn
    if not (a.dtype == b.dtype == fp8 and a.is_contiguous() and b.is_contiguous()):
        raise TypeError(f"a, b: {a.dtype}, {b.dtype}: must be contiguous {fp8}")
    if K % BLOCK_K or N % 128 or K < BLOCK_K or b.shape[1] != K:
        raise ValueError(f"(M, N, K) = {(M, N, K)}: K and N must be multiples of 128")
    want = {"sa": (M, K // BLOCK_K), "sb": (N // 128, K // BLOCK_K)}
    for name, t in (("sa", sa), ("sb", sb)):
        if tuple(t.shape) != want[name] or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name}: {tuple(t.shape)} {t.dtype}: must be {want[name]} float32, "
                             "contiguous")
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    grid = (triton.cdiv(M, 128), triton.cdiv(N, 128))
    fp8_block_gemm_kernel[grid](a, sa, b, sb, c, M, N, K, NKB=K // BLOCK_K, BLOCK_M=128,
                                BLOCK_N=128, num_warps=8, **cfg)
    return c


def _wgmma_sass(cubin: bytes) -> dict:
    """The wgmma waits of a cubin's SASS (nvdisasm of the wheel): ptxas may serialise the
    wgmmas (warning C7514) whatever the PTX asked: then every wait is ``gsb0, 0x0``, no
    QGMMA chained without its own wait, and no MMA overlaps anything."""
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    mma = re.findall(r"[QH]GMMA\.[^;]*;", sass)
    waits = sorted(set(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass)))
    chained = sum("gsb0" not in m for m in mma)
    return dict(waits=waits, serialised=bool(mma) and chained == 0 and waits == ["0x0"])


def compile_sm90() -> int:
    """The sm_90 build of both variants (no GPU needed): registers, spills, shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = dict(a_ptr="*fp8e4nv", as_ptr="*fp32", b_ptr="*fp8e4nv", bs_ptr="*fp32",
               c_ptr="*bf16", M="i32", N="i32", K="i32")
    for name, cfg in CONFIGS.items():
        cx = dict(NKB=56, BLOCK_M=128, BLOCK_N=128, num_warps=8, **cfg)
        full = {**sig, **{k: "constexpr" for k in cx}}
        # (16-byte aligned pointers, M / N / K multiples of 16: what a launch on such inputs
        # specialises, and what cp.async's 16-byte copies need)
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}
        src = GluonASTSource(fp8_block_gemm_kernel, full, cx, attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
        from rocm_moe._compile import _cubin_usage

        regs, local = _cubin_usage(k.asm["cubin"])
        sass = _wgmma_sass(k.asm["cubin"])
        print(f"{name}: {regs} registers, {local} B local (spills), shared "
              f"{k.metadata.shared} B; SASS wgmma waits {sass['waits']}, "
              f"serialised {sass['serialised']}")
    return 0


def _inputs(M, N, K, gen, dev):
    fp8 = torch.float8_e4m3fn
    a = (torch.randn(M, K, generator=gen, device=dev) * 2).to(fp8)
    b = (torch.randn(N, K, generator=gen, device=dev) * 2).to(fp8)
    sa = torch.rand(M, K // BLOCK_K, generator=gen, device=dev) + 0.5
    sb = torch.rand(N // 128, K // BLOCK_K, generator=gen, device=dev) + 0.5
    return a, sa, b, sb


def reference(a, sa, b, sb) -> torch.Tensor:
    ad = a.float() * sa.repeat_interleave(BLOCK_K, 1)
    bd = b.float() * sb.repeat_interleave(128, 0).repeat_interleave(BLOCK_K, 1)
    return ad @ bd.T


def _us(fn, iters=50) -> float:
    g = torch.cuda.CUDAGraph()
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    times = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 100)  # us per call (10 per graph)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192])
    args = ap.parse_args()
    if args.compile:
        return compile_sm90()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    bad = 0
    # checked only: odd and even K-step counts (the pair loop's tail), M and N not equal, M not
    # a multiple of the tile
    for M, N, K in ((128, 128, 128), (200, 256, 384), (256, 384, 640), (130, 256, 1024)):
        a, sa, b, sb = _inputs(M, N, K, gen, dev)
        ref = reference(a, sa, b, sb)
        errs = {name: ((run(a, sa, b, sb, cfg).float() - ref).norm() / ref.norm()).item()
                for name, cfg in CONFIGS.items()}
        bad += sum(not e < 1e-2 for e in errs.values())
        print(f"check M={M} N={N} K={K}: rel err " +
              "  ".join(f"{k} {e:.1e}" for k, e in errs.items()), flush=True)
    for n in args.sizes:
        a, sa, b, sb = _inputs(n, n, n, gen, dev)
        ref = reference(a, sa, b, sb)
        flops = 2 * n**3
        ones = torch.ones(1, device=dev)
        mm = _us(lambda a=a, b=b, ones=ones: torch._scaled_mm(
            a, b.T, scale_a=ones, scale_b=ones, out_dtype=torch.bfloat16))
        line = [f"n={n}: torch._scaled_mm (per-tensor) {flops / mm / 1e6:7.1f} TFLOP/s"]
        for name, cfg in CONFIGS.items():
            got = run(a, sa, b, sb, cfg).float()
            err = ((got - ref).norm() / ref.norm()).item()
            bad += not err < 1e-2
            us = _us(lambda cfg=cfg, a=a, sa=sa, b=b, sb=sb: run(a, sa, b, sb, cfg))
            line.append(f"{name} {flops / us / 1e6:7.1f} TFLOP/s (rel err {err:.1e})")
        print("  ".join(line), flush=True)
    print("FAILED" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
