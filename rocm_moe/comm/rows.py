"""Row movement for the torch comm backend: packing send rows and summing returned partials.

``pos_TW`` [T, W] int64 is the row of the send buffer that carries token t to rank d (dest-major
order, so a rank's rows are contiguous and in token order), or -1 where token t does not go to
rank d. It derives from ``csum_WT`` [W, T], the inclusive prefix count of the tokens sent to each
rank: pos[t, d] = (rows of ranks < d) + csum[d, t] - 1 where token t goes to d. Combine's
returned partials come back in the same order, so the same map locates them.

- ``pack_rows``: send[pos[t, d]] = [x[t] | ids[t] | weights[t] | pad] as 32-bit words, for
  every d with pos >= 0, and pos itself. The Triton kernel computes pos from csum, reads each x
  row once and writes it to each of its destinations (the minimum traffic), in one launch; the
  torch version computes pos, packs [T, row] then scatters.
- ``gather_sum``: out[t] = sum over d = 0..W-1 (in that order) of back[pos[t, d]], accumulated
  in float32 and cast once: deterministic, no atomics.

``impl=None`` picks Triton for CUDA/ROCm tensors when triton is importable, torch otherwise;
tests force ``impl="triton"`` on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from rocm_moe._libs import library_version
from rocm_moe.weighting import accumulation_dtype

WORD = 4  # bytes; packed rows are made of 32-bit words
ALIGN_WORDS = 4  # rows are padded to 16 bytes


def row_words(hidden: int, dtype: torch.dtype, top_k: int) -> int:
    """Words of one packed row: x, K int32 ids, K float32 weights, padded to 16 bytes."""
    xb = hidden * dtype.itemsize
    assert xb % WORD == 0, "H * itemsize must be a multiple of 4 bytes"
    n = xb // WORD + 2 * top_k
    return -(-n // ALIGN_WORDS) * ALIGN_WORDS


def unpack(recv_words: torch.Tensor, hidden: int, dtype: torch.dtype, top_k: int):
    """Zero-copy (x [R, H], ids [R, K] int32, weights [R, K] float32) views of packed rows."""
    xw = hidden * dtype.itemsize // WORD
    x = recv_words[:, :xw].view(dtype)
    ids = recv_words[:, xw:xw + top_k]
    w = recv_words[:, xw + top_k:xw + 2 * top_k].view(torch.float32)
    return x, ids, w


def _choose(impl: str | None, t: torch.Tensor) -> str:
    if impl is not None:
        return impl
    return "triton" if t.device.type == "cuda" and library_version("triton") else "torch"


def _meta_words(ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    return torch.cat([ids_TK.to(torch.int32), w_TK.float().view(torch.int32)], dim=1)


def positions(csum_WT: torch.Tensor) -> torch.Tensor:
    """[W, T] inclusive per-destination prefix counts -> pos [T, W] (dest-major send rows)."""
    W, T = csum_WT.shape
    if T == 0:
        return csum_WT.new_empty(0, W)
    counts = csum_WT[:, -1]
    sent = torch.diff(csum_WT, dim=1, prepend=csum_WT.new_zeros(W, 1)) > 0
    pos = (counts.cumsum(0) - counts)[:, None] + csum_WT - 1
    return torch.where(sent, pos, torch.full_like(pos, -1)).T.contiguous()


def pack_rows(x_TH, ids_TK, w_TK, csum_WT, num_rows: int, *, impl: str | None = None):
    """Pack every (token, destination) row; returns (send [num_rows, row_words] int32, pos
    [T, W] int64). ``csum_WT`` [W, T] int64 is the inclusive prefix count of the tokens sent to
    each rank; rows no (t, d) maps to are left unwritten."""
    T, H = x_TH.shape
    K, W = ids_TK.shape[1], csum_WT.shape[0]
    rw = row_words(H, x_TH.dtype, K)
    send = torch.empty(num_rows, rw, dtype=torch.int32, device=x_TH.device)
    if T == 0 or num_rows == 0:
        return send, positions(csum_WT)
    x_words = x_TH.contiguous().view(torch.int32)
    meta = _meta_words(ids_TK, w_TK)
    if _choose(impl, x_TH) == "triton":
        from rocm_moe.comm._rows_triton import pack_rows_kernel

        pos = torch.empty(T, W, dtype=torch.int64, device=x_TH.device)
        BLOCK = 512
        pack_rows_kernel[(T, -(-rw // BLOCK))](
            x_words, meta, csum_WT.contiguous(), pos, send, T, x_words.shape[1], 2 * K, rw, W,
            BLOCK=BLOCK)
        return send, pos
    pos = positions(csum_WT)
    packed = torch.zeros(T, rw, dtype=torch.int32, device=x_TH.device)
    packed[:, :x_words.shape[1]] = x_words
    packed[:, x_words.shape[1]:x_words.shape[1] + 2 * K] = meta
    for d in range(W):
        valid = pos[:, d] >= 0
        send[pos[valid, d]] = packed[valid]
    return send, pos


def gather_sum(back_SH: torch.Tensor, pos_TW: torch.Tensor, *, impl: str | None = None):
    """[T, H] in back's dtype: per token, the sum of its returned rows in rank order."""
    T, W = pos_TW.shape
    H = back_SH.shape[1]
    if _choose(impl, back_SH) == "triton" and T > 0 and back_SH.dtype != torch.float64:
        from rocm_moe.comm._rows_triton import gather_sum_kernel

        out = torch.empty(T, H, dtype=back_SH.dtype, device=back_SH.device)
        BLOCK = 1024
        gather_sum_kernel[(T, -(-H // BLOCK))](back_SH.contiguous(), pos_TW.contiguous(), out,
                                               H, W, BLOCK=BLOCK)
        return out
    acc = accumulation_dtype(back_SH.dtype)
    out = torch.zeros(T, H, dtype=acc, device=back_SH.device)
    for d in range(W):  # fixed order: rank 0, 1, ...
        valid = pos_TW[:, d] >= 0
        out[valid] += back_SH[pos_TW[valid, d]].to(acc)
    return out.to(back_SH.dtype)
