"""Batch- and EP-size-invariant arithmetic: the fixed-order building blocks of invariant mode.

``EPMoE(invariant=True)`` computes every number a token's output depends on with operations
whose order of reduction and whose code path for an element depend only on that token's data
and the layer's configuration, never on the batch size, the token's position in the batch, the
other tokens or the EP world size (notes/invariance.md states every order). The pieces:

- ``linear_acc``: x [N, D] @ w [M, D].T, accumulated in float32 (float64 for float64 inputs)
  with a fixed reduction order per output element. On CPUs one multiply and one add per
  column d = 0, 1, ..., D-1 in turn (elementwise ops round each element alone, whatever the
  batch); BLAS picks kernels by M, and a row's bits then depend on how many rows came with it.
  On GPUs one Triton kernel with one fixed tile configuration (no split-K, BLOCK_D fixed), so
  every row goes through the same sequence of tile products whatever N is.
- ``pointwise``: a transcendental elementwise function (exp, sigmoid, SiLU) whose CPU kernel
  takes the same vectorised path for every element: ATen computes the last
  ``numel % (2 * vector width)`` elements of each thread's chunk with the scalar function,
  which may differ from the vector one in the last bit (SiLU does on x86), so the element's
  bits would depend on where it sits. Here the CPU call always sees a multiple of 64
  elements, at most ``POINTWISE_CHUNK`` at a time (below ATen's parallel grain: one thread).
  GPU kernels run the same code on every element: called as is.
- ``tree_sum``: the sum over the last dim by a fixed pairwise tree (padded with zeros to a
  power of two): elementwise adds only; a library reduction may split a row across threads
  differently for different row counts (CUDA's reduction does).
- ``softmax``: exp(l - max) / sum, the sum by ``tree_sum`` (CPUs) or, on GPUs, by one Triton
  program per row (a block reduction whose shape depends on E only).
- ``stable_topk``: top-k indices by a stable descending sort: ties go to the lower index.

Invariance is across batches, positions and EP sizes on one kind of device with one software
stack; a CPU and a GPU (or two GPU models, or two Triton versions) give different bits.

Worked example (a test asserts it): ``tree_sum([[1., 2., 3.]])`` is ``(1 + 3) + (2 + 0)`` =
``[6.]``; ``stable_topk([[1., 3., 3.]], 2)`` is ``[[1, 2]]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rocm_moe._libs import library_version
from rocm_moe.weighting import accumulation_dtype

POINTWISE_CHUNK = 16384  # elements per CPU call: a multiple of 64, under ATen's grain (32768)
_VEC = 64  # CPU calls see a multiple of this many elements (2 x the widest vector, bf16 AVX512)
# The GPU linear kernel's one configuration (rows, output columns, reduction chunk; warps).
LINEAR_CONFIG = dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64, num_warps=4, num_stages=3)


def pointwise(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` for an elementwise ``fn``, with every element of a CPU tensor on the same code
    path (see the module docstring). Example: ``pointwise(torch.sigmoid, x)``."""
    if t.device.type != "cpu" or t.numel() == 0:
        return fn(t)
    flat = t.reshape(-1)
    n = flat.numel()
    chunk = POINTWISE_CHUNK if n > POINTWISE_CHUNK else -(-n // _VEC) * _VEC
    buf = flat.new_zeros(-(-n // chunk) * chunk)
    buf[:n] = flat
    out = torch.cat([fn(c) for c in buf.split(chunk)])
    return out[:n].view(t.shape)


def tree_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in a fixed pairwise order: pad with zeros to a power of two, then
    add the upper half to the lower half until one column is left. [..., M] -> [...]."""
    m = t.shape[-1]
    width = 1 << max(m - 1, 0).bit_length()
    if width != m:
        t = torch.nn.functional.pad(t, (0, width - m))
    while width > 1:
        width //= 2
        t = t[..., :width] + t[..., width:]
    return t[..., 0]


def stable_topk(t: torch.Tensor, k: int) -> torch.Tensor:
    """[..., M] -> [..., k] int64 indices of the k largest values, largest first; equal values
    in index order."""
    return t.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of [T, E] float32 logits: exp(l - max) over its sum. On GPUs
    one Triton program per row (one launch; the sum a block reduction of a fixed shape), else
    ``pointwise`` exp and ``tree_sum``."""
    if logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2 \
            and library_version("triton"):
        return _softmax_triton(logits)
    e = pointwise(torch.exp, logits - logits.amax(dim=-1, keepdim=True))
    return e / tree_sum(e).unsqueeze(-1)


def _softmax_triton(logits_TE: torch.Tensor) -> torch.Tensor:
    import triton

    from rocm_moe._invariant_triton import softmax_kernel

    T, E = logits_TE.shape
    x = logits_TE.contiguous()
    out = torch.empty_like(x)
    if T:
        softmax_kernel[(T,)](x, out, T, E, BLOCK_E=triton.next_power_of_2(E), num_warps=4)
    return out


def linear_acc(x_ND: torch.Tensor, w_MD: torch.Tensor) -> torch.Tensor:
    """x [N, D] @ w [M, D].T -> [N, M] in ``accumulation_dtype(x.dtype)`` with a fixed reduction
    order per element (see the module docstring). ``w`` is cast to x's dtype first."""
    acc = accumulation_dtype(x_ND.dtype)
    w_MD = w_MD.to(x_ND.dtype)
    N, D = x_ND.shape
    M = w_MD.shape[0]
    if x_ND.is_cuda and acc == torch.float32 and library_version("triton"):
        return _linear_triton(x_ND, w_MD)
    out = x_ND.new_zeros(N, M, dtype=acc)
    xa, wa = x_ND.to(acc), w_MD.to(acc)
    for d in range(D):  # one exactly rounded multiply and add per element and column
        out += xa[:, d, None] * wa[None, :, d]
    return out


def _linear_triton(x_ND: torch.Tensor, w_MD: torch.Tensor) -> torch.Tensor:
    from rocm_moe._invariant_triton import linear_kernel

    N, D = x_ND.shape
    M = w_MD.shape[0]
    x, w = x_ND.contiguous(), w_MD.contiguous()
    out = torch.empty(N, M, dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    c = LINEAR_CONFIG
    linear_kernel[(_cdiv(N, c["BLOCK_N"]), _cdiv(M, c["BLOCK_M"]))](
        x, w, out, N, M, D, IEEE=x.dtype == torch.float32, BLOCK_N=c["BLOCK_N"],
        BLOCK_M=c["BLOCK_M"], BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"],
        num_stages=c["num_stages"])
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def swiglu(x_NH: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on rows x [N, H] with fixed reduction orders: w13 [2I, H] (gate then
    up), w2 [H, I] -> [N, H] in x's dtype. Gate/up accumulate in float32, SiLU(gate) * up is
    rounded to x's dtype (as the Triton experts store it), the down GEMM accumulates in float32
    and rounds once."""
    gu = linear_acc(x_NH, w13)
    gate, up = gu.chunk(2, dim=-1)
    h = (pointwise(torch.nn.functional.silu, gate) * up).to(x_NH.dtype)
    return linear_acc(h, w2).to(x_NH.dtype)
