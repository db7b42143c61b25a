"""Triton kernel behind ``weighting.weight_once`` on GPUs (imported only where triton is installed).

One pass over the raw per-slot outputs, reading only the local slots' rows: the torch version
makes K passes over [R, H] in float32 (for the Qwen3-30B-A3B shape at 4096 tokens per rank on
4 ranks, the combine weight mode spent most of its extra time there). Nothing vendor-specific.
"""

import triton
import triton.language as tl


@triton.jit
def weighted_slot_sum_kernel(raw_ptr, stride_r, stride_k, w_ptr, local_ptr, out_ptr, H,
                             K_TOPK: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r] = sum over k = 0..K-1 (in order) of w[r, k] * raw[r, k] where local[r, k] != 0,
    accumulated in float32, cast once to out's dtype. raw [R, K, H] with strides (stride_r,
    stride_k, 1); w [R, K] float32; local [R, K] int8; out [R, H] contiguous. Non-local slots
    are never read. Example: K = 2, local = [[1, 0]], w = [[0.5, 9]], raw = [[[2], [nan]]] ->
    out = [[1]]."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K_TOPK):
        end = tl.where(tl.load(local_ptr + r * K_TOPK + k) != 0, H, 0)  # non-local: no columns
        wk = tl.load(w_ptr + r * K_TOPK + k)
        v = tl.load(raw_ptr + r * stride_r + k * stride_k + h, mask=h < end, other=0.0)
        acc += v.to(tl.float32) * wk
    tl.store(out_ptr + r * H + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)
