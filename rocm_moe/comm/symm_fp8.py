"""FP8 dispatch over torch symmetric memory: ``SymmDispatcher`` whose rows travel in FP8.

The torch-fp8 backend's format (``comm.torch_fp8``) on the symm backend's transport. Each token
is quantised once on its owner, per 1x128 group (``quantize_rows_triton``: one launch), and its
row payload becomes the [T, P] uint8

    [ceil(H/128) float32 scales | H FP8 bytes | pad to 4 bytes]      P = fp8_row_bytes(H)

which ``SymmDispatcher``'s kernels move unchanged (they move 32-bit words of any payload): the
packed row in the receive section is ``[payload | K int32 ids | K float32 weights | pad to 16
bytes]``. The receiver's ``DispatchResult.x`` is ``quant.FP8Rows`` whose ``q`` [W * cap, H] and
``scale`` [W * cap, ceil(H/128)] are views of the symmetric receive section, built once (zero
copy; the next dispatch overwrites them, as with the symm backend). ``experts.fp8.FP8Experts``
read them in place (no dequantise pass) and return outputs in the rows' source dtype; combine
and combine_raw are ``SymmDispatcher``'s in that dtype (bfloat16 partials back).

Everything stays on the device (the symm dispatch's three kernels plus one quantise launch that
writes the payload in place, ``torch_fp8.quantize_to_wire``): dispatch is CUDA-graph
capturable, as the symm backend's is.

Bytes per row, H = 7168, K = 8: bfloat16 14400, FP8 7456 (1.93x fewer; the receive section
shrinks by the same ratio).

The encoding is e4m3fn (NVIDIA, checkpoints) or e4m3fnuz (MI300's experts); the experts'
weights must use the same one. NVIDIA Triton has no e4m3fnuz type, so that pair is refused at
construction, before any collective.
"""

from __future__ import annotations

import torch

from rocm_moe._checks import error_message
from rocm_moe.comm.symm import SymmDispatcher
from rocm_moe.comm.torch_fp8 import FP8Wire, fp8_row_bytes, unpack_fp8
from rocm_moe.quant import FP8Rows

SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_fp8_wire(dtype: object, fp8_dtype: torch.dtype, *, hip: bool) -> None:
    """Refuse what the FP8 symm dispatch cannot carry (``hip``: a ROCm build of torch)."""
    if dtype not in SOURCE_DTYPES:
        raise TypeError(error_message(
            "dtype", dtype, f"must be one of {list(SOURCE_DTYPES)} (the rows quantised to FP8 "
            "and the partials combine returns)", "pass torch.bfloat16"))
    if fp8_dtype == torch.float8_e4m3fnuz and not hip:
        raise ValueError(error_message(
            "fp8_dtype", "e4m3fnuz", "NVIDIA Triton has no e4m3fnuz type (fp8e4b8 is AMD-only), "
            "so the rows cannot be quantised to it here", "pass fp8_dtype='e4m3fn'"))


class SymmFP8Dispatcher(FP8Wire, SymmDispatcher):
    """``SymmDispatcher`` with rows in FP8 on the wire (see the module docstring).
    ``fp8_dtype``: see ``FP8Wire`` (e4m3fnuz on ROCm only). Other arguments are
    ``SymmDispatcher``'s; ``dtype`` is the rows' dtype before quantisation (and the dtype
    combine returns)."""

    name = "symm-fp8"

    def _check_wire(self, kw: dict) -> None:
        check_fp8_wire(kw.get("dtype"), self.fp8_dtype, hip=torch.version.hip is not None)

    def _wire_format(self) -> tuple[int, torch.dtype]:
        return fp8_row_bytes(self.hidden_size), torch.uint8

    def _from_wire(self, payload_RP: torch.Tensor) -> FP8Rows:
        return unpack_fp8(payload_RP, self.hidden_size, self.fp8_dtype, self.dtype)
