"""Triton kernel behind ``invariant.linear_acc`` on GPUs (imported only where triton is
installed). Nothing vendor-specific."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N"])
def linear_kernel(x_ptr, w_ptr, out_ptr, N, M, D, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n, m] = sum over d of x[n, d] * w[m, d] in float32: x [N, D], w [M, D], out [N, M],
    all contiguous. One program per [BLOCK_N, BLOCK_M] tile walks d in BLOCK_D chunks in order
    (no split-K); the launcher fixes every block size, so a row's bits never depend on N or on
    the rows that share its tile (``N`` is not specialised on either). ``IEEE``: float32
    inputs multiplied in full precision (no TF32). Example: x = [[1, 2]], w = [[3, 4]] ->
    [[11]]."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        a = tl.load(x_ptr + rn[:, None].to(tl.int64) * D + rd[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rm[None, :].to(tl.int64) * D + rd[:, None],
                    mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        if IEEE:  # noqa: SIM108 (a constexpr branch: one dot is compiled)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * M + rm[None, :], acc,
             mask=n_ok[:, None] & m_ok[None, :])


@triton.jit(do_not_specialize=["T"])
def softmax_kernel(x_ptr, out_ptr, T, E, BLOCK_E: tl.constexpr):
    """out[t] = softmax(x[t]) over E float32 values, one program per row: exp(x - max) over
    their sum, the sum a block reduction whose order depends on BLOCK_E and the warps only
    (the launcher fixes both), so a row's bits never depend on T. x, out [T, E] contiguous.
    Example: x = [[0, log(3)]] -> [[0.25, 0.75]]."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    logits = tl.load(x_ptr + t * E + e, mask=ok, other=-float("inf"))
    p = tl.where(ok, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
    tl.store(out_ptr + t * E + e, p / tl.sum(p, axis=0), mask=ok)
