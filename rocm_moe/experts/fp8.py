"""FP8 experts: block-scaled FP8 weights (``quant.BlockFP8Weight``) and FP8 activations
quantised per token group of 128, the w8a8 block format DeepSeek-V3 ships and vLLM/SGLang run.

The contract is ``experts/base.py``'s with FP8 operands:
    x_RH            [R, H] floating rows (quantised here, dynamically, per 1x128 group) or
                    ``quant.FP8Rows`` already quantised (an FP8 dispatch: no dequantise pass).
    w13             BlockFP8Weight [e, 2I, H] (gate rows then up rows), scale_inv [e, 2I/128,
                    ceil(H/128)]; I % 128 == 0, so the up rows start on a block boundary.
    w2              BlockFP8Weight [e, H, I], scale_inv [e, ceil(H/128), I/128].
Both weights in one FP8 encoding (e4m3fn, or e4m3fnuz on MI300); FP8Rows in the same one.

What every FP8 backend computes (the reference below, in float32; the Triton kernels tile by
tile with float32 accumulators):
    a    = quantize_rows(x)                                    per 1x128 group, float32 scales
    h    = silu(a @ gate.T) * (a @ up.T)                        float32, dequantised operands
    d    = quantize_rows(h)                                     the down GEMM's FP8 input
    out  = d @ down.T   (times the routing weight in "experts" weight mode)
returned in ``out_dtype`` (default: x's dtype; for FP8Rows the dtype they were quantised from,
``source_dtype``, else bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_tensor,
    error_message,
)
from rocm_moe.experts.base import Experts, check_routing_inputs, check_row_bound, output_form
from rocm_moe.experts.layout import build_layout
from rocm_moe.formats.block_fp8 import check_fp8_weights  # (its former home was here)
from rocm_moe.placement import ExpertMap, require_expert_map
from rocm_moe.quant import BlockFP8Weight, FP8Rows, quantize_rows, quantize_weight_blocks
from rocm_moe.weighting import ExpertsOutput, WeightMode, resolve_weight_mode, weight_once


@dataclass(frozen=True, eq=False)
class FP8ExpertWeights:
    """One rank's experts in FP8: ``w13`` [e, 2I, H] and ``w2`` [e, H, I] block-scaled."""

    w13: BlockFP8Weight
    w2: BlockFP8Weight

    def __post_init__(self):
        check_fp8_weights(self.w13, self.w2)

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13.dequantize(dtype), self.w2.dequantize(dtype)

    def to_format(self, dtype) -> FP8ExpertWeights:
        return FP8ExpertWeights(self.w13.to_format(dtype), self.w2.to_format(dtype))


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, *, dtype="e4m3fn") -> FP8ExpertWeights:
    """Float expert weights [e, 2I, H] and [e, H, I] -> FP8 with 128x128 block scales. Gate and
    up are quantised as separate matrices (as a checkpoint stores them); with I % 128 == 0
    that is the same as quantising the stack."""
    return FP8ExpertWeights(quantize_weight_blocks(w13, dtype=dtype),
                            quantize_weight_blocks(w2, dtype=dtype))


def check_fp8_inputs(x, topk_ids_RK, topk_weights_RK, w13, w2, expert_map: ExpertMap, *,
                     validate: bool) -> None:
    """The FP8 experts contract's checks (see the module docstring)."""
    require_expert_map("expert_map", expert_map)
    check_fp8_weights(w13, w2, num_local=expert_map.num_local)
    if isinstance(x, FP8Rows):
        if x.dtype != w13.dtype:
            raise ValueError(error_message("x.dtype", x.dtype, f"must be the weights' {w13.dtype}",
                                           "quantise the rows in the weights' encoding"))
        data = x.q
    else:
        check_tensor("x", x, shape=(None, None), dtypes=FLOAT_DTYPES)
        data = x
    H = data.shape[1]
    if H != w13.shape[2]:
        raise ValueError(error_message("x.shape[1]", H, f"must be H={w13.shape[2]} (the weights')",
                                       "pass rows of the layer's hidden size"))
    check_routing_inputs(data, topk_ids_RK, topk_weights_RK, expert_map,
                         weights={"w13": w13.weight, "w2": w2.weight}, validate=validate)


class FP8Experts(Experts):
    """An FP8 expert backend: ``w13`` / ``w2`` are BlockFP8Weights, ``x_RH`` floating or
    FP8Rows (module docstring). ``out_dtype``: the output's dtype (default: x's; bfloat16 for
    FP8Rows)."""

    fp8 = True
    weight_formats = ("block_fp8",)

    def weight_format_unsupported_reason(self, weights) -> str | None:
        """None if this backend runs ``weights`` (block-FP8) in their encoding on their
        device, else why not (``formats.WeightFormat.supports`` asks)."""
        return self.format_unsupported(weights.fp8_dtype, weights.device)

    def invariant_unsupported_reason(self) -> str | None:
        return (f"the FP8 {self.name} experts have no batch-invariant variant (their row "
                "quantisation and GEMMs run in batch-dependent tiles)")

    def as_invariant(self) -> Experts:
        raise ValueError(error_message(
            "invariant", True, f"an FP8 layer cannot run it: {self.invariant_unsupported_reason()}",
            "run the FP8 layer with invariant=False, or dequantise the checkpoint to bfloat16 "
            "and build an EPMoE with invariant=True"))

    def quantize(self, x_RH: torch.Tensor, dtype: torch.dtype) -> FP8Rows:
        """Rows per 1x128 group (``quant.quantize_rows``; backends may run it as a kernel)."""
        return quantize_rows(x_RH, dtype=dtype)

    def quantizes_rows(self, R: int, K: int, num_rows: torch.Tensor | None,
                       expected_rows: int | None) -> bool:
        """Whether ``_forward`` takes this call's float rows [R, H] unquantised and quantises
        them in its own kernels, bit for bit as ``quantize`` (no launch before it); False
        here: the rows are quantised first."""
        return False

    def format_unsupported(self, dtype: torch.dtype, device: torch.device) -> str | None:
        """None if this backend runs FP8 ``dtype`` on ``device``, else why not."""
        return None

    def __call__(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *,
                 weight_mode: WeightMode | None = None, validate: bool = True, mode=None,
                 out_dtype: torch.dtype | None = None, num_rows: torch.Tensor | None = None,
                 expected_rows: int | None = None) -> ExpertsOutput:
        """``num_rows`` / ``expected_rows``: as ``Experts.__call__`` (rows past a device count
        are empty; backends with ``bounded_rows`` size their work by it)."""
        mode = output_form(resolve_weight_mode(weight_mode, mode))
        check_fp8_inputs(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                         validate=validate)
        check_row_bound(num_rows, expected_rows, topk_ids_RK, validate=validate)
        fp8_in = isinstance(x_RH, FP8Rows)
        if out_dtype is None:  # FP8 rows: the dtype they were quantised from, else bfloat16
            out_dtype = (x_RH.source_dtype or torch.bfloat16) if fp8_in else x_RH.dtype
        if out_dtype not in FLOAT_DTYPES:
            raise TypeError(error_message("out_dtype", out_dtype, f"must be one of "
                                          f"{FLOAT_DTYPES}", "pass torch.bfloat16"))
        reason = self.supports(mode=mode, dtype=out_dtype, device=w13.device)
        if reason is not None:
            raise ValueError(error_message(f"experts={self.name}, mode", repr(mode),
                                           f"unsupported: {reason}", "pick another backend"))
        if (reason := self.format_unsupported(w13.dtype, w13.device)) is not None:
            raise ValueError(error_message(f"experts={self.name}, weights", w13.dtype,
                                           f"unsupported: {reason}",
                                           "convert them: w.to_format('e4m3fn')"))
        # float rows stay float where the backend's kernels quantise them as they load
        inside = not fp8_in and self.quantizes_rows(*topk_ids_RK.shape, num_rows, expected_rows)
        rows = x_RH if fp8_in or inside else self.quantize(x_RH, w13.dtype)
        bound = dict(num_rows=num_rows, expected_rows=expected_rows) if self.bounded_rows \
            else {}
        out = self._forward(rows, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, mode=mode,
                            out_dtype=out_dtype, **bound)
        R, K = topk_ids_RK.shape
        H = w13.shape[2]
        want = (R, H) if out.weights_applied else (R, K, H)
        assert tuple(out.out.shape) == want, (self.name, tuple(out.out.shape), want)
        assert out.weights_applied == (mode == "weighted"), (self.name, mode)
        assert out.out.dtype == out_dtype, (self.name, out.out.dtype, out_dtype)
        return out


def fp8_sibling(experts: Experts) -> FP8Experts | None:
    """The FP8 backend of a float backend's name (block-FP8 weights): reference, triton, aiter
    (with the float one's AITER settings); None for any other."""
    if isinstance(experts, FP8Experts):
        return experts
    if experts.name == "reference":
        return FP8ReferenceExperts()
    if experts.name == "triton":
        from rocm_moe.experts.triton_fp8 import TritonFP8Experts

        # the float backend's path choice (experts/triton_small.py) carries over
        return TritonFP8Experts(path=getattr(experts, "path", "auto"),
                                small_max_slots=getattr(experts, "small_max_slots", None))
    if experts.name == "aiter":
        from rocm_moe.experts.aiter_fp8 import AiterFP8Experts

        return AiterFP8Experts(mask_sentinel=experts.mask_sentinel,
                               fused_moe=experts._fused_moe,
                               shuffle_weight=experts._shuffle_weight, shuffle=experts.shuffle)
    return None


class FP8ReferenceExperts(FP8Experts):
    """Readable FP8 experts in torch: dequantised operands, float32 GEMMs (float64 when the
    output is float64), the intermediate requantised per 1x128 group like the kernels do."""

    name = "reference"

    def _forward(self, rows: FP8Rows, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *,
                 mode, out_dtype):
        acc = torch.float64 if out_dtype == torch.float64 else torch.float32
        layout = build_layout(topk_ids_RK, expert_map, validate=False)
        R, K = topk_ids_RK.shape
        H = w13.shape[2]
        raw_RKH = torch.zeros(R, K, H, dtype=acc, device=rows.device)
        for j, n in enumerate(layout.tokens_per_expert.tolist()):
            if n == 0:
                continue
            idx = layout.expert_token_table[j, :n].long()
            a = rows[idx].dequantize(acc)
            gate, up = (a @ w13[j].dequantize(acc).T).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
            d = quantize_rows(h, dtype=rows.dtype).dequantize(acc)
            raw_RKH[idx, layout.expert_slot_table[j, :n].long()] = d @ w2[j].dequantize(acc).T
        raw = ExpertsOutput(out=raw_RKH, weights_applied=False)
        if mode == "weighted":
            y_RH = weight_once(raw, topk_weights_RK, topk_ids_RK, expert_map)
            return ExpertsOutput(out=y_RH.to(out_dtype), weights_applied=True)
        return ExpertsOutput(out=raw_RKH.to(out_dtype), weights_applied=False)


def fp8_dense_reference(x_TH: torch.Tensor, topk_weights_TK: torch.Tensor,
                        topk_ids_TK: torch.Tensor, w13_E: BlockFP8Weight, w2_E: BlockFP8Weight,
                        *, quantize_activations: bool = True) -> torch.Tensor:
    """Float64 oracle over all E experts of an FP8 model: y [T, H] float64. With
    ``quantize_activations`` the activations are quantised exactly as the FP8 experts do
    (the GEMMs then in float64); without, it is the dequantised model in float64."""
    x = x_TH.double()
    if quantize_activations:
        x = quantize_rows(x_TH, dtype=w13_E.dtype).dequantize()
    y = x.new_zeros(x.shape)
    ids = topk_ids_TK.long()
    for g in ids.unique().tolist():
        if g < 0:
            continue
        t, k = torch.where(ids == g)
        gate, up = (x[t] @ w13_E[g].dequantize().T).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        if quantize_activations:
            h = quantize_rows(h, dtype=w13_E.dtype).dequantize()
        y.index_add_(0, t, (h @ w2_E[g].dequantize().T) * topk_weights_TK[t, k].double()[:, None])
    return y
