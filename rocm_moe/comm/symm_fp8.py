"""Deprecated (kept one release): FP8 rows over torch symmetric memory are
``SymmDispatcher(..., fp8_dtype="e4m3fn")`` now (``comm.wire``; the symm kernels move the
packed ``[scales | FP8 | pad]`` payload as 32-bit words, the receiver's ``quant.FP8Rows`` are
views of the receive section, and the dispatch stays CUDA-graph capturable). e4m3fnuz is
refused on NVIDIA (its Triton has no e4m3fnuz type), before any collective.
"""

from __future__ import annotations

import warnings

import torch

from rocm_moe._checks import error_message
from rocm_moe.comm.symm import SymmDispatcher
from rocm_moe.comm.wire import SOURCE_DTYPES, check_wire_source


def check_fp8_wire(dtype: object, fp8_dtype: torch.dtype, *, hip: bool) -> None:
    """Refuse what the FP8 symm dispatch cannot carry (``hip``: a ROCm build of torch)."""
    check_wire_source(dtype, fp8_dtype)
    if fp8_dtype == torch.float8_e4m3fnuz and not hip:
        raise ValueError(error_message(
            "fp8_dtype", "e4m3fnuz", "NVIDIA Triton has no e4m3fnuz type (fp8e4b8 is AMD-only), "
            "so the rows cannot be quantised to it here", "pass fp8_dtype='e4m3fn'"))


__all__ = ["SOURCE_DTYPES", "SymmFP8Dispatcher", "check_fp8_wire"]


class SymmFP8Dispatcher(SymmDispatcher):
    """Deprecated alias: ``SymmDispatcher`` with ``fp8_dtype`` (default "e4m3fn")."""

    name = "symm-fp8"

    def __init__(self, *args, fp8_dtype: str | torch.dtype = "e4m3fn", **kw):
        warnings.warn("SymmFP8Dispatcher is deprecated: use SymmDispatcher(..., fp8_dtype=...)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, fp8_dtype=fp8_dtype, **kw)
