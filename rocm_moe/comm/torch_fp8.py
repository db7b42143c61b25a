"""FP8 dispatch over torch.distributed: ``TorchDispatcher`` whose rows travel in FP8.

Each token is quantised once on its owner, per 1x128 group (``quant.quantize_rows``; one
Triton launch on GPUs), and the packed row becomes

    [ceil(H/128) float32 scales | H FP8 bytes | pad to 4 bytes | K int32 ids | K float32
    weights | pad to 16 bytes]

(scales first, so they stay 4-byte aligned for any H). The receiver gets ``DispatchResult.x``
as ``quant.FP8Rows`` whose ``q`` and ``scale`` are zero-copy views into the receive buffer;
``experts.fp8.FP8Experts`` consume them as they are (no dequantise pass), and return outputs in
the rows' source dtype. Combine and combine_raw are ``TorchDispatcher``'s, in that dtype
(bfloat16 rows back: the partial sums keep their precision).

Bytes per row, H = 7168, K = 8: bfloat16 14400, FP8 7456 (1.93x fewer); the ratio tends to
2 / (1 + 4/128) = 1.94 for large H.

The dispatch is ``TorchDispatcher``'s with two hooks: ``_to_wire`` (quantise and pack, one
launch on GPUs; ``FP8Wire``, shared with the symm backend's FP8 dispatch) and ``_from_wire``
(the FP8Rows views).
"""

from __future__ import annotations

import torch

from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.quant import (
    BLOCK,
    FP8Rows,
    quantize_rows_on_owner,
    quantize_rows_triton,
)
from rocm_moe.quant import fp8_dtype as _fp8


def fp8_row_bytes(hidden: int) -> int:
    """Bytes of one row's FP8 payload: float32 scales, then FP8 values, padded to 4 bytes."""
    return -(-(4 * -(-hidden // BLOCK) + hidden) // 4) * 4


def pack_fp8(x: FP8Rows) -> torch.Tensor:
    """[T, fp8_row_bytes(H)] uint8: each row's scales (as bytes) then its FP8 values."""
    T, H = x.q.shape
    G = x.scale.shape[1]
    out = torch.zeros(T, fp8_row_bytes(H), dtype=torch.uint8, device=x.q.device)
    out[:, :4 * G] = x.scale.contiguous().view(torch.uint8)
    out[:, 4 * G:4 * G + H] = x.q.view(torch.uint8)
    return out


def unpack_fp8(payload: torch.Tensor, hidden: int, dtype: torch.dtype,
               source_dtype: torch.dtype) -> FP8Rows:
    """Zero-copy FP8Rows views of [R, fp8_row_bytes(H)] uint8 rows (any row stride)."""
    G = -(-hidden // BLOCK)
    scale = payload[:, :4 * G].view(torch.float32)
    q = payload[:, 4 * G:4 * G + hidden].view(dtype)
    return FP8Rows(q, scale, source_dtype)


quantize_on_owner = quantize_rows_on_owner  # (its former name; quant.py holds it now)


def quantize_to_wire(x_TH: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``pack_fp8(quantize_rows(x))`` in one Triton launch (GPUs): the row quantiser writes
    each row's scales and FP8 values straight into its [P] payload (pad bytes zeroed), instead
    of quantising, zero-filling and copying twice. [T, fp8_row_bytes(H)] uint8, the same bytes."""
    T, H = x_TH.shape
    G = -(-H // BLOCK)
    payload = torch.empty(T, fp8_row_bytes(H), dtype=torch.uint8, device=x_TH.device)
    payload[:, 4 * G + H:].zero_()
    quantize_rows_triton(x_TH, fp8_dtype, q=payload[:, 4 * G:4 * G + H].view(fp8_dtype),
                         scale=payload[:, :4 * G].view(torch.float32))
    return payload


class FP8Wire:
    """What a dispatcher whose rows travel in FP8 adds to its transport (a mixin, before the
    dispatcher class in the bases): ``fp8_dtype`` ("e4m3fn" default, or "e4m3fnuz", MI300's
    experts; the experts' weights must be in the same encoding), the owner-side quantiser and
    the packed payload ``[scales | FP8 | pad]`` of ``fp8_row_bytes(H)`` bytes a row."""

    def __init__(self, *args, fp8_dtype: str | torch.dtype = "e4m3fn", **kw):
        self.fp8_dtype = _fp8(fp8_dtype)
        self._check_wire(kw)
        super().__init__(*args, **kw)

    def _check_wire(self, kw: dict) -> None:
        """Refuse what this transport cannot carry, before the dispatcher is built."""

    def config(self) -> dict:
        return {**super().config(), "fp8_dtype": str(self.fp8_dtype)}

    def quantize(self, x_TH: torch.Tensor) -> FP8Rows:
        return quantize_on_owner(x_TH, self.fp8_dtype)

    def _to_wire(self, x_TH: torch.Tensor) -> torch.Tensor:
        if x_TH.is_cuda:
            return quantize_to_wire(x_TH, self.fp8_dtype)
        return pack_fp8(self.quantize(x_TH))


class TorchFP8Dispatcher(FP8Wire, TorchDispatcher):
    """``TorchDispatcher`` with rows in FP8 on the wire (see the module docstring).
    ``fp8_dtype``: see ``FP8Wire``. Other arguments are ``TorchDispatcher``'s."""

    name = "torch-fp8"

    def _from_wire(self, payload_RP: torch.Tensor, x_TH: torch.Tensor) -> FP8Rows:
        return unpack_fp8(payload_RP, x_TH.shape[1], self.fp8_dtype, x_TH.dtype)
