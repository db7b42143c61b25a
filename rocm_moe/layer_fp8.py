"""Deprecated (kept one release): an FP8 layer is ``EPMoE(weight_format="block_fp8",
format_options={"fp8_dtype": ...})`` now; the weight format is one axis of the one layer
(``rocm_moe.formats``), not a subclass.

``FP8EPMoE`` stays as a thin alias: the routed experts as buffers ``w13_fp8`` [e, 2I, H] /
``w13_scale_inv`` [e, 2I/128, ceil(H/128)] and ``w2_fp8`` [e, H, I] / ``w2_scale_inv``
[e, ceil(H/128), I/128] (``formats.block_fp8``), ``w13`` / ``w2`` empty [0, ...] parameters
that carry the compute dtype, and an ``experts.fp8.FP8Experts`` backend (default: the
reference). Memory per rank: ``expert_bytes``, about half of bfloat16's.
"""

from __future__ import annotations

import warnings

from rocm_moe._checks import describe, error_message
from rocm_moe.experts.fp8 import FP8Experts, FP8ReferenceExperts
from rocm_moe.formats.block_fp8 import FP8_TOLERANCE  # noqa: F401 (its former home)
from rocm_moe.layer import EPMoE


class FP8EPMoE(EPMoE):
    """Deprecated alias of ``EPMoE(weight_format="block_fp8")``. ``fp8_dtype``: "e4m3fn"
    (default; NVIDIA, checkpoints) or "e4m3fnuz" (MI300); ``experts``: an FP8Experts backend
    (default: the reference). Other arguments are EPMoE's."""

    def __init__(self, *, experts: FP8Experts | None = None, fp8_dtype: str = "e4m3fn", **kw):
        warnings.warn("FP8EPMoE is deprecated: use EPMoE(weight_format='block_fp8', "
                      "format_options={'fp8_dtype': ...})", DeprecationWarning, stacklevel=2)
        experts = experts or FP8ReferenceExperts()
        if not isinstance(experts, FP8Experts):
            raise TypeError(error_message(
                "experts", describe(experts), "must be an FP8 experts backend",
                "pass rocm_moe.experts.fp8.FP8ReferenceExperts() or "
                "rocm_moe.experts.triton_fp8.TritonFP8Experts()"))
        super().__init__(experts=experts, weight_format="block_fp8",
                         format_options={"fp8_dtype": fp8_dtype}, **kw)
