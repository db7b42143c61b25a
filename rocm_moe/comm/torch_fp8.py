"""Deprecated (kept one release): FP8 rows over torch.distributed are
``TorchDispatcher(..., fp8_dtype="e4m3fn")`` now; the wire format is a parameter of the one
dispatcher of each transport (``comm.wire``: the packed row ``[scales | FP8 | pad]``, the
owner-side quantiser, the zero-copy ``quant.FP8Rows`` views on the receiver).

Bytes per row, H = 7168, K = 8: bfloat16 14400, FP8 7456 (1.93x fewer).
"""

from __future__ import annotations

import warnings

import torch

from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.comm.wire import (  # noqa: F401 (their former home)
    fp8_row_bytes,
    pack_fp8,
    quantize_to_wire,
    unpack_fp8,
)
from rocm_moe.quant import quantize_rows_on_owner

quantize_on_owner = quantize_rows_on_owner  # (its former name)


class TorchFP8Dispatcher(TorchDispatcher):
    """Deprecated alias: ``TorchDispatcher`` with ``fp8_dtype`` (default "e4m3fn")."""

    name = "torch-fp8"

    def __init__(self, *args, fp8_dtype: str | torch.dtype = "e4m3fn", **kw):
        warnings.warn("TorchFP8Dispatcher is deprecated: use TorchDispatcher(..., fp8_dtype=...)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, fp8_dtype=fp8_dtype, **kw)
