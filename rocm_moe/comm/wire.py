"""Wire formats: how a dispatched row travels, a parameter of every dispatcher (``fp8_dtype``).

    fp8_dtype=None          the rows in the compute dtype (``dtype``), as they are
    fp8_dtype="e4m3fn" ...  FP8 rows: each token quantised once on its owner per 1x128 group
                            (``quant.quantize_rows_on_owner``: one Triton launch on GPUs), the
                            receiver's ``DispatchResult.x`` a ``quant.FP8Rows`` that the FP8
                            experts consume as it is (no dequantise pass); combine returns the
                            compute dtype (bf16 partials keep their precision)

One dispatcher class per transport (local, torch, symm, mori) carries both: the wire format is
a value, not a subclass (``comm/torch_fp8.py`` etc. keep deprecated aliases one release).

The packed FP8 payload of the torch and symm transports, ``fp8_row_bytes(H)`` bytes a row:

    [ceil(H/128) float32 scales | H FP8 bytes | pad to 4 bytes]

(scales first, so they stay 4-byte aligned for any H); MORI takes the FP8 values and scales as
two tensors of its own. Bytes per row, H = 7168, K = 8 (with the ids and weights): bfloat16
14400, FP8 7456 (1.93x fewer).

Worked example (a test asserts it): ``fp8_row_bytes(7168)`` is 4 * 56 + 7168 = 7392, and
``fp8_row_bytes(130)`` is 4 * 2 + 130 = 138, padded to 140.
"""

from __future__ import annotations

import torch

from rocm_moe._checks import error_message
from rocm_moe.quant import (
    BLOCK,
    FP8_NAMES,
    FP8Rows,
    fp8_dtype,
    quantize_rows_on_owner,
    quantize_rows_triton,
)

SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # rows quantised to FP8 rows


def wire_fp8_dtype(value: object) -> torch.dtype | None:
    """A dispatcher's ``fp8_dtype``: None (rows in the compute dtype) or an FP8 encoding
    ("e4m3fn", "e4m3fnuz" or the torch dtype), checked."""
    if value is None:
        return None
    try:
        return fp8_dtype(value)
    except ValueError as exc:
        raise ValueError(error_message(
            "fp8_dtype", repr(value), f"must be one of {list(FP8_NAMES)} (FP8 rows on the "
            "wire) or None (rows in the compute dtype)",
            "pass fp8_dtype='e4m3fn' (NVIDIA), 'e4m3fnuz' (MI300) or None")) from exc


def check_wire_source(dtype: object, fp8: torch.dtype | None) -> None:
    """FP8 rows are quantised from float rows of ``SOURCE_DTYPES`` (and combine returns them;
    None: a dispatcher that takes any dtype)."""
    if fp8 is not None and dtype is not None and dtype not in SOURCE_DTYPES:
        raise TypeError(error_message(
            "dtype", dtype, f"must be one of {list(SOURCE_DTYPES)} (the rows quantised to FP8 "
            "and the partials combine returns)", "pass torch.bfloat16"))


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


def quantize_to_wire(x_TH: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """``pack_fp8(quantize_rows(x))`` in one Triton launch (GPUs): the row quantiser writes
    each row's scales and FP8 values straight into its payload (pad bytes zeroed), instead of
    quantising, zero-filling and copying twice. [T, fp8_row_bytes(H)] uint8, the same bytes."""
    T, H = x_TH.shape
    G = -(-H // BLOCK)
    payload = torch.empty(T, fp8_row_bytes(H), dtype=torch.uint8, device=x_TH.device)
    payload[:, 4 * G + H:].zero_()
    quantize_rows_triton(x_TH, fp8, q=payload[:, 4 * G:4 * G + H].view(fp8),
                         scale=payload[:, :4 * G].view(torch.float32))
    return payload


def to_wire(x_TH: torch.Tensor, fp8: torch.dtype | None) -> torch.Tensor:
    """[T, H] rows -> the [T, P] payload of the torch and symm transports: the rows themselves,
    or packed FP8 rows (one launch on GPUs)."""
    if fp8 is None:
        return x_TH
    if x_TH.is_cuda:
        return quantize_to_wire(x_TH, fp8)
    return pack_fp8(quantize_rows_on_owner(x_TH, fp8))


def from_wire(payload_RP: torch.Tensor, hidden: int, fp8: torch.dtype | None,
              source_dtype: torch.dtype):
    """Received [R, P] payloads -> ``DispatchResult.x``: the rows, or FP8Rows views."""
    if fp8 is None:
        return payload_RP
    return unpack_fp8(payload_RP, hidden, fp8, source_dtype)


def wire_format(hidden: int, dtype: torch.dtype, fp8: torch.dtype | None
                ) -> tuple[int, torch.dtype]:
    """(P, dtype) of the [T, P] payload a row travels as."""
    return (hidden, dtype) if fp8 is None else (fp8_row_bytes(hidden), torch.uint8)
