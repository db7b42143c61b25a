"""FP8 dispatch through MORI's FP8 token types: ``MoriDispatcher(..., fp8_dtype=...)``, whose
rows travel in FP8 (``MoriFP8Dispatcher``, the class it was, is kept one release as an alias).

NOT RUN ON MI300 HARDWARE BY THIS PROJECT: written against MORI's public source (ROCm/mori
624002c8) and tested on CPUs through the fake ``mori`` (tests/fakes.py), which enforces what
is read below.

Each token is quantised once on its owner, per 1x128 group (``quant.quantize_rows``; one
Triton launch on GPUs, as ``comm.torch_fp8``), and handed to MORI as it takes FP8 rows:
    op.dispatch(q [T, H] float8, weights [T, K] float32, scales [T, H/128] float32, ids)
with the op's config carrying ``scale_dim = H / 128`` and ``scale_type_size = 4`` (and
``data_type`` the FP8 type; ``max_token_type_size`` stays the combine dtype's, see below).
The receiver gets ``DispatchResult.x`` as ``quant.FP8Rows`` whose ``q`` and ``scale`` are
views of MORI's persistent receive buffers (valid until this batch's combine, as the bf16 rows
of ``MoriDispatcher`` are); ``experts.fp8.FP8Experts`` (reference, Triton, AITER) consume them
without a dequantise pass and return the rows' source dtype. Combine is ``MoriDispatcher``'s,
in that dtype (bf16): MORI's combine only sums, and the partial sums keep their precision.

What MORI does, as read (DC = python/mori/ops/dispatch_combine.py):
- types: the kernel is picked by the input's dtype (DC ``_DTYPE_SUFFIX``: float8_e4m3fn ->
  ``fp8_ocp``, float8_e4m3fnuz -> ``fp8_fnuz``; float16 has no entry, a KeyError). A build
  compiles only its GPU's FP8 encoding (include/mori/utils/data_types.hpp enables fp8_fnuz or
  fp8_ocp from HIP's ``HIP_FP8_TYPE_*``; MORI's tests run e4m3fnuz only on gfx94x and e4m3fn
  only on gfx95x, tests/python/utils.py ``data_type_supported``): the other encoding fails at
  ``hipModuleGetFunction``. So the default here is the device's (``quant.native_fp8_dtype``:
  e4m3fnuz on MI300, which is also AITER's ``dtypes.fp8`` there; e4m3fn on MI350).
- scales: ``dispatch`` passes the scales pointer only when ``config.scale_dim > 0`` (DC
  ``has_scales``; given scales are dropped silently otherwise). The kernels copy
  ``scale_dim * scale_type_size`` raw bytes per token at that stride (src/ops/dispatch_combine/
  intranode.hpp ~193, internode_v1.cpp ~89, low_latency_async.cpp ~109) into a symmetric
  output buffer, returned as a [W * T, scale_dim] view in the scales' dtype (DC ~1286). So
  the scales must be a contiguous [T, scale_dim] tensor whose element size is
  ``scale_type_size``: float32 [T, H/128] with 4, as MORI's tests pass (tests/python/ops/
  dispatch_combine_test_utils.py: ``torch.rand(T, scale_dim, float32)``, scale_type_size 4).
  Scales follow their row: received row i's scales are row i of that view.
- one op, two dtypes: MORI's cross-dtype tests dispatch FP8 and combine bf16 through one op
  (test_dispatch_combine_intranode.py ``test_dispatch_combine_cross_dtype``; also InterNodeV1,
  AsyncLL), with ``max_token_type_size`` wide enough for the wider of the two: the combine's.
- heap: scales add an input and an output buffer of W * T * scale_dim * scale_type_size bytes
  (dispatch_combine.cpp ~362) and scale bytes to every staging slot (``heap_bytes`` counts
  them). The token buffers keep the bf16 width (combine shares them), so FP8 dispatch moves
  fewer bytes but does not shrink MORI's heap.

Bytes per dispatched row, H = 7168, K = 8 (token + scales + ids + weights + source id, MORI's
``XferBytesPerToken``): bf16 14404, FP8 7460 (1.93x fewer).

H must be a multiple of 128 (refused before anything runs): every scale then covers a whole
group, which AITER's per_1x128 path requires of the same rows.
"""

from __future__ import annotations

import warnings

import torch

from rocm_moe.comm.mori import MoriDispatcher
from rocm_moe.quant import BLOCK, native_fp8_dtype, quantize_rows_on_owner

quantize_on_owner = quantize_rows_on_owner  # (its former home was comm.torch_fp8)


def mori_row_bytes(hidden: int, top_k: int, *, fp8: bool, dtype=torch.bfloat16) -> int:
    """Bytes MORI moves per dispatched row (its ``XferBytesPerToken``: token, K int32 ids, K
    float32 weights, the int32 source id, and in FP8 H/128 float32 scales).

    >>> mori_row_bytes(7168, 8, fp8=False), mori_row_bytes(7168, 8, fp8=True)
    (14404, 7460)
    """
    token = hidden if fp8 else hidden * dtype.itemsize
    return token + 8 * top_k + 4 + (4 * (hidden // BLOCK) if fp8 else 0)


def default_fp8_dtype() -> torch.dtype:
    """The encoding this machine's MORI build has kernels for (module docstring)."""
    return native_fp8_dtype("cuda" if torch.cuda.is_available() else "cpu")


class MoriFP8Dispatcher(MoriDispatcher):
    """Deprecated alias: ``MoriDispatcher(..., fp8_dtype=...)``, ``fp8_dtype`` None meaning
    the device's encoding (``default_fp8_dtype``). Everything is refused before any
    collective or MORI call, as ``MoriDispatcher`` does."""

    name = "mori-fp8"

    def __init__(self, placement, *, fp8_dtype: str | torch.dtype | None = None, **kw):
        warnings.warn("MoriFP8Dispatcher is deprecated: use MoriDispatcher(..., fp8_dtype=...)",
                      DeprecationWarning, stacklevel=2)
        fp8 = default_fp8_dtype() if fp8_dtype is None else fp8_dtype
        super().__init__(placement, fp8_dtype=fp8, **kw)
