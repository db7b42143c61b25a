"""Triton kernels of the FP8 row quantiser (``quant.quantize_rows_triton``; imported only with
triton): shared by the FP8 experts (``experts/_triton_fp8.py``) and the FP8 dispatchers, which
quantise each row on its owner, so neither reaches into the other's package.

``ROUND``: values are rounded to the FP8 grid (round to nearest even) in float32 before the
cast, for Triton's interpreter (3.9), whose float32 -> FP8 cast drops the carry of a mantissa
that rounds up into the next binade (124.3 -> 64 instead of 128); on GPUs the cast itself
rounds (RNE, saturating).
"""

import triton
import triton.language as tl


@triton.jit
def _to_fp8(x, dtype, ROUND: tl.constexpr, MIN_EXP: tl.constexpr):
    """x (float32, already clamped to the FP8 range) cast to FP8 ``dtype``; ``ROUND``: rounded
    to the grid first (MIN_EXP: the smallest normal exponent, -6 e4m3fn, -7 e4m3fnuz)."""
    if ROUND:
        a = tl.abs(x)
        ex = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), MIN_EXP)
        quantum = tl.exp2(ex - 3.0)  # 3 mantissa bits
        y = a / quantum
        r = tl.floor(y + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)  # ties to even
        x = tl.where(x < 0, -r * quantum, r * quantum)
    return x.to(dtype)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, N_GROUPS,
                       FP8_MAX: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr,
                       ROUND: tl.constexpr, MIN_EXP: tl.constexpr):
    """q[r, g*128:(g+1)*128] = x / s, s[r, g] = max(amax, 1e-10) / FP8_MAX (``N_GROUPS``: the
    scale row stride): one program per row and GPB groups (a [GPB, 128] tile; one program per
    group left 230k programs of 128 elements at 4096 x 7168); ``quant.quantize_rows``'s
    arithmetic."""
    r = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1) * GPB + tl.arange(0, GPB)
    offs = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = offs < H
    x = tl.load(x_ptr + r * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10)
    s = tl.div_rn(amax, amax * 0.0 + FP8_MAX)  # IEEE division, as torch's (CUDA's / is not)
    q = tl.clamp(tl.div_rn(x, s[:, None] + tl.zeros_like(x)), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + r * stride_q + offs, _to_fp8(q, q_ptr.dtype.element_ty, ROUND, MIN_EXP),
             mask=m)
    tl.store(s_ptr + r * N_GROUPS + grp, s, mask=grp * GROUP < H)
