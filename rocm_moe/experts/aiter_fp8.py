"""FP8 block-scale experts through AITER's ``fused_moe(..., quant_type=QuantType.per_1x128)``.

NOT RUN ON MI300 HARDWARE BY THIS PROJECT: written against AITER's public source
(aiter/fused_moe.py = FM, aiter/ops/shuffle.py; notes/fp8.md says what was read) and tested on
CPUs against a fake ``fused_moe`` that enforces the contract below (tests/fakes.py).

The call (on top of ``AiterExperts``' EP conventions: global int32 ids, the 0/1 expert mask,
the appended always-masked slot, shuffled weights, no call for R = 0):
    fused_moe(x, w13.weight, w2.weight, topk_weight, topk_ids, expert_mask=mask,
              quant_type=QuantType.per_1x128, w1_scale=w13.scale_inv, w2_scale=w2.scale_inv,
              a1_scale=..., dtype=out_dtype)
- ``w1_scale`` [e, 2I/128, H/128] and ``w2_scale`` [e, H/128, I/128] float32 are rocm_moe's
  ``scale_inv`` unchanged: AITER's reference (FM ``torch_moe_stage1/2``) MULTIPLIES each
  128x128 block by it, as DeepSeek-V3's ``weight_scale_inv`` does. AITER views the weights as
  [e, N/128, 128, K/128, 128], so H must be a multiple of 128 (I is by the FP8 contract).
- The activation FP8 type is ``w1.dtype`` (FM: ``q_dtype_a = w1.dtype``), and the kernel
  tables are keyed by ``dtypes.fp8``: e4m3fnuz on gfx942 (MI300), e4m3fn on gfx950. Weights in
  the other encoding are refused with the fix (``to_format``), never passed.
- Float rows go in as they are (bf16) with ``a1_scale=None``: AITER quantises them per 1x128
  itself (as vLLM's AITER path does). FP8Rows go in as ``q`` with ``a1_scale`` = their scales
  [R, H/128] float32 row-major (AITER asserts a1_scale for FP8 input and transposes it itself
  on its 1-stage path) and ``dtype`` = the output dtype (it defaults to the input's). Where
  AITER's tuned tables pick its asm stage-1 kernel, which reads a1_scale by its pointer as
  [H/128, R] (csrc/py_itfs_cu/asm_moe_2stage.cu; FM fused_moe_2stages transposes only the
  scales it makes itself), the scales go in transposed; the choice is asked of AITER's own
  config lookup (``aiter_stage1_is_asm``), and where that cannot answer (AITER's internals
  moved) the rows go in as bf16, which is right on every path.
- Output bfloat16 only: AITER asserts fp16/bf16, and its FP8 block-scale kernel tables
  (``fused_moe_1stage_dict``, the bypass of tuned configs) list bf16 only.
- The intermediate is written in the output dtype and requantised per 1x128 by AITER between
  its two stages (FM ``fused_moe_2stages``), so results differ from ``FP8ReferenceExperts``
  (float32 intermediate) by the bf16 rounding of h: tested within 2e-2 relative.

Modes as ``AiterExperts``: "weighted" natively; "raw" as K calls of one slot with weight 1.
"""

from __future__ import annotations

import logging

import torch

from rocm_moe._checks import error_message
from rocm_moe.experts.aiter import AiterExperts, aiter_availability
from rocm_moe.experts.fp8 import FP8Experts, check_fp8_weights
from rocm_moe.quant import BLOCK, BlockFP8Weight, FP8Rows, fp8_dtype, native_fp8_dtype
from rocm_moe.weighting import ExpertsOutput

AITER_FP8_OUT_DTYPES = (torch.bfloat16,)
log = logging.getLogger(__name__)


def aiter_stage1_is_asm(*, M: int, H: int, I: int, e: int, topk: int, shuffled: bool,
                        out_dtype: torch.dtype) -> bool | None:
    """Whether AITER's fused_moe runs its asm stage-1 kernel for a per_1x128 call with FP8 rows
    (M rows, topk slots including the appended masked one, e local experts): AITER's own
    lookup (``get_2stage_cfgs``, as FM ``fused_moe_`` calls it, e4048607). None where it cannot
    be asked (AITER absent, or its internals changed)."""
    try:
        from aiter import ActivationType, QuantType, dtypes
        from aiter.fused_moe import asm_stage1, get_2stage_cfgs, get_padded_M

        meta = get_2stage_cfgs(get_padded_M(M), H, I, e, topk, out_dtype, dtypes.fp8,
                               dtypes.fp8, QuantType.per_1x128, True, ActivationType.Silu,
                               False, 0, 0, shuffled, is_ep=True)
        return getattr(meta.stage1, "func", meta.stage1) is asm_stage1
    except Exception as exc:  # an import or signature AITER no longer has: do not guess
        log.debug("AITER's stage-1 choice unknown (%s): FP8 rows go in as bf16", exc)
        return None


class AiterFP8Experts(FP8Experts):
    """Args as ``AiterExperts`` (``mask_sentinel``, ``fused_moe``, ``shuffle_weight``,
    ``shuffle``), plus ``fp8_dtype``: the encoding AITER's ``dtypes.fp8`` is on the target
    (default: AITER's own when it is imported, else the device's, ``quant.native_fp8_dtype``)
    and ``quant_type``: the value passed as ``quant_type`` (default
    ``aiter.QuantType.per_1x128``; tests pass the fake's); ``stage1_probe``: the function that
    tells whether AITER takes its asm stage-1 path for a call (default
    ``aiter_stage1_is_asm``; tests pass the fake's)."""

    name = "aiter"

    @classmethod
    def availability(cls) -> str | None:
        return aiter_availability()

    def __init__(self, *, mask_sentinel: bool = True, fused_moe=None, shuffle_weight=None,
                 shuffle: bool = True, fp8_dtype=None, quant_type=None, stage1_probe=None):
        self._aiter = AiterExperts(mask_sentinel=mask_sentinel, fused_moe=fused_moe,
                                   shuffle_weight=shuffle_weight, shuffle=shuffle)
        self._fp8_dtype = None if fp8_dtype is None else _fp8(fp8_dtype)
        self._quant_type = quant_type
        self._stage1_probe = stage1_probe or aiter_stage1_is_asm

    @property
    def mask_sentinel(self) -> bool:
        return self._aiter.mask_sentinel

    def mask_for(self, expert_map, device):
        return self._aiter.mask_for(expert_map, device)

    def invariant_unsupported_reason(self) -> str | None:
        return self._aiter.invariant_unsupported_reason()

    def supports(self, *, mode, dtype, device) -> str | None:
        if self._aiter._fused_moe is None and (reason := aiter_availability()) is not None:
            return reason
        if dtype not in AITER_FP8_OUT_DTYPES:
            return (f"AITER's FP8 block-scale fused_moe outputs {AITER_FP8_OUT_DTYPES}, "
                    f"not {dtype}")
        return None

    def target_fp8_dtype(self, device: torch.device) -> torch.dtype:
        """The FP8 encoding AITER's kernels read on ``device`` (module docstring)."""
        if self._fp8_dtype is None:
            if self._aiter._fused_moe is None:
                from aiter import dtypes

                self._fp8_dtype = dtypes.fp8
            else:
                return native_fp8_dtype(device)
        return self._fp8_dtype

    def format_unsupported(self, dtype, device) -> str | None:
        want = self.target_fp8_dtype(device)
        if dtype != want:
            return (f"AITER's FP8 kernels read {want} here (dtypes.fp8; e4m3fnuz on gfx942), "
                    f"{dtype} bits would be misread")
        return None

    def _qtype(self):
        if self._quant_type is None:
            from aiter import QuantType

            self._quant_type = QuantType.per_1x128
        return self._quant_type

    def quantize(self, x_RH: torch.Tensor, dtype: torch.dtype):
        """Float rows stay float: AITER quantises them per 1x128 itself."""
        return x_RH

    def __call__(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, **kw):
        if self._aiter._fused_moe is None and (reason := aiter_availability()) is not None:
            raise ValueError(error_message("experts", self.name, f"unavailable: {reason}",
                                           "install AITER or pick experts='reference'"))
        check_fp8_weights(w13, w2)
        if w13.shape[2] % BLOCK:
            raise ValueError(error_message(
                "w13.shape[2] (H)", w13.shape[2], f"must be a multiple of {BLOCK} for AITER's "
                f"FP8 block-scale path (it views weights as {BLOCK}x{BLOCK} blocks)",
                "pad H or use experts='reference' / 'triton'"))
        if (reason := self.format_unsupported(w13.dtype, w13.device)) is not None:
            want = self.target_fp8_dtype(w13.device)
            name = "e4m3fnuz" if want == torch.float8_e4m3fnuz else "e4m3fn"
            raise ValueError(error_message(
                "experts=aiter, weights", w13.dtype, f"unsupported: {reason}",
                f"convert them (exact, scales adjusted): w.to_format('{name}')"))
        return super().__call__(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, **kw)

    def _forward(self, rows, topk_ids_RK, topk_weights_RK, w13: BlockFP8Weight,
                 w2: BlockFP8Weight, expert_map, *, mode, out_dtype):
        R, K = topk_ids_RK.shape
        H = w13.shape[2]
        if R == 0:  # AITER has no guard for M = 0
            shape = (0, H) if mode == "weighted" else (0, K, H)
            return ExpertsOutput(out=torch.zeros(shape, dtype=out_dtype, device=w13.device),
                                 weights_applied=mode == "weighted")
        a = self._aiter
        ids = a._global_ids(topk_ids_RK, expert_map.num_experts).to(torch.int32)
        w1q, w2q = a.shuffled_pair(w13.weight, w2.weight)
        if isinstance(rows, FP8Rows):
            asm = self._stage1_probe(
                M=R, H=H, I=w2.shape[2], e=w13.shape[0], topk=K + 1, out_dtype=out_dtype,
                shuffled=bool(getattr(w1q, "is_shuffled", False)))
            if asm is None:  # the path is unknown: bf16 rows are right on every one
                x, a1_scale = rows.dequantize(out_dtype).contiguous(), None
            elif asm:  # the asm kernel reads [H/128, R] by its pointer
                x, a1_scale = rows.q.contiguous(), rows.scale.t().contiguous()
            else:
                x, a1_scale = rows.q.contiguous(), rows.scale.contiguous()
        else:
            x, a1_scale = rows.to(out_dtype).contiguous(), None
        extra = dict(quant_type=self._qtype(), w1_scale=w13.scale_inv.contiguous(),
                     w2_scale=w2.scale_inv.contiguous(), a1_scale=a1_scale, dtype=out_dtype)
        if mode == "weighted":
            out = a._call(x, w1q, w2q, topk_weights_RK.float().contiguous(), ids.contiguous(),
                          expert_map, **extra)
            return ExpertsOutput(out=out, weights_applied=True)
        ones = torch.ones(R, 1, dtype=torch.float32, device=x.device)
        raw = [a._call(x, w1q, w2q, ones, ids[:, k:k + 1].contiguous(), expert_map, **extra)
               for k in range(K)]
        return ExpertsOutput(out=torch.stack(raw, dim=1), weights_applied=False)


def _fp8(name) -> torch.dtype:
    return fp8_dtype(name)
