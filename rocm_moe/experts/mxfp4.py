"""MXFP4 experts: weights in MXFP4 (``formats/mxfp4.py``), activations and results in the
compute dtype (weight-only quantisation, as gpt-oss runs on GPUs without FP4 matrix
instructions: H100, MI300).

The contract is ``experts/base.py``'s with MXFP4 weights:
    x_RH            [R, H] floating rows (the reference: any float dtype; Triton: bf16/fp16).
    w13             MXFP4Tensor [e, 2I, H] (gate rows then up rows), H % 32 == 0.
    w2              MXFP4Tensor [e, H, I], I % 32 == 0.
    variant, w13_bias [e, 2I], w2_bias [e, H] (x's dtype): as ``Experts.__call__``; gpt-oss's
                    checkpoints need ``ExpertVariant.gpt_oss()`` with both biases.
    num_rows / expected_rows: as ``Experts.__call__``.

What every MXFP4 backend computes: the experts of ``experts/base.py`` on the dequantised
weights (exact in float32: E2M1 x 2**k), ``MXFP4ReferenceExperts`` literally so (the reference
experts on ``w.dequantize(float32)``), the Triton kernels tile by tile (``TritonMXFP4Experts``,
kernels in ``_triton_mxfp4.py``): each weight tile dequantised to x's dtype in registers
(exact in bfloat16 for scales 2**-126..2**125), float32 accumulation, the intermediate in x's
dtype, as the bf16 Triton experts do.

Pipeline (``TritonMXFP4Experts``): the bf16 experts' (``experts/triton.py``): ``build_layout``
(one local expert per BLOCK_M block), gate/up GEMM + bias + activation, down GEMM + bias +
routing weight ("weighted", unless it went on the input), slot sum or raw [R, K, H].

Worked example (a test asserts it): H = I = 32, x = e_0, K = 1, weight 0.5, gate = up = 4 on
(0, 0), down = identity (all E2M1 values with scale 1): 0.5 * silu(4) * 4 = 7.8561 on hidden
dim 0, as with the dense weights.
"""

from __future__ import annotations

import torch

from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_tensor,
)
from rocm_moe._libs import triton_runs_on
from rocm_moe.experts.base import (
    PLAIN,
    Experts,
    ExpertVariant,
    check_routing_inputs,
)
from rocm_moe.experts.layout import build_layout
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.experts.triton import (
    _on_amd,
    _variant_args,
    persistent_grid,
    persistent_supported,
    slot_sum,
    triton_availability,
    triton_experts_availability,
)
from rocm_moe.formats.mxfp4 import MXFP4Tensor, check_mxfp4_weights
from rocm_moe.placement import ExpertMap, require_expert_map
from rocm_moe.weighting import ExpertsOutput, accumulation_dtype


def check_mxfp4_inputs(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map: ExpertMap, *,
                       validate: bool) -> None:
    """The MXFP4 experts contract's checks (see the module docstring)."""
    require_expert_map("expert_map", expert_map)
    check_tensor("x", x_RH, shape=(None, None), dtypes=FLOAT_DTYPES)
    check_mxfp4_weights(w13, w2, num_local=expert_map.num_local, hidden=x_RH.shape[1])
    check_routing_inputs(x_RH, topk_ids_RK, topk_weights_RK, expert_map,
                         weights={"w13": w13.blocks, "w2": w2.blocks}, validate=validate)


class MXFP4Experts(Experts):
    """An MXFP4 expert backend: ``w13`` / ``w2`` are MXFP4Tensors (module docstring); runs
    every ``ExpertVariant``."""

    weight_formats = ("mxfp4",)

    def variant_unsupported_reason(self, variant: ExpertVariant) -> str | None:
        return None

    def _check_inputs(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode,
                      validate: bool) -> None:
        check_mxfp4_inputs(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                           validate=validate)


class MXFP4ReferenceExperts(MXFP4Experts):
    """The reference experts on the dequantised weights (float32; float64 for float64 x)."""

    name = "reference"

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode,
                 **variant):
        acc = accumulation_dtype(x_RH.dtype)
        return ReferenceExperts()._forward(x_RH, topk_ids_RK, topk_weights_RK,
                                           w13.dequantize(acc), w2.dequantize(acc), expert_map,
                                           mode=mode, **variant)


def mxfp4_sibling(experts: Experts | None) -> MXFP4Experts | None:
    """The MXFP4 backend of a float backend's name (MXFP4 weights): reference (also for None)
    and triton; an MXFP4 backend itself; None for any other (AITER has no MXFP4 path here)."""
    if experts is None or isinstance(experts, MXFP4Experts):
        return experts or MXFP4ReferenceExperts()
    if experts.name == "reference":
        return MXFP4ReferenceExperts()
    if experts.name == "triton":
        return TritonMXFP4Experts()
    return None


MXFP4_DTYPES = (torch.bfloat16, torch.float16)


def mxfp4_block_config(num_slots: int, num_local: int, *, amd: bool = False) -> dict:
    """Launch config ``{"BLOCK_M", "gate_up": {...}, "down": {...}}`` by the mean slots per
    local expert (BLOCK_M 16 / 32 / 64 as the bf16 experts' heuristic). BLOCK_K 64 (two scale
    groups; gpt-oss's 2880 = 45 x 64), BLOCK_N 64; UNTUNED on hardware."""
    mean = num_slots / max(num_local, 1)
    block_m = 16 if mean <= 16 else 32 if mean <= 64 else 64
    k = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2 if amd else 3)
    # gfx942: the gate/up tiles from BLOCK_M 32 over 8 waves (4 left the persistent BLOCK_M 32
    # launch 276 VGPRs, one wave per SIMD; Triton 3.9)
    gu = dict(k, num_warps=8) if amd and block_m >= 32 else dict(k)
    return dict(BLOCK_M=block_m, gate_up=gu, down=dict(k))


class TritonMXFP4Experts(MXFP4Experts):
    """The Triton MXFP4 experts (module docstring). ``config``: a fixed
    ``mxfp4_block_config``-form launch config (tuning)."""

    name = "triton"
    bounded_rows = True

    @classmethod
    def availability(cls) -> str | None:
        return triton_experts_availability()

    def __init__(self, *, config: dict | None = None):
        self.config = config

    def supports(self, *, mode, dtype, device) -> str | None:
        if (reason := triton_availability()) is not None:
            return reason
        if not triton_runs_on(device):
            return "Triton kernels need a CUDA/ROCm device (or TRITON_INTERPRET=1 for tests)"
        if dtype not in MXFP4_DTYPES:
            return f"the Triton MXFP4 experts compute in {MXFP4_DTYPES}, not {dtype}"
        return None

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13: MXFP4Tensor, w2: MXFP4Tensor,
                 expert_map, *, mode, num_rows=None, expected_rows=None,
                 variant: ExpertVariant = PLAIN, w13_bias=None, w2_bias=None):
        R, K = topk_ids_RK.shape
        H, I = x_RH.shape[1], w2.shape[2]
        N, dev = R * K, x_RH.device
        rows = R if num_rows is None or expected_rows is None else expected_rows
        cfg = self.config or mxfp4_block_config(rows * K, expert_map.num_local,
                                                amd=_on_amd(dev))
        layout = build_layout(topk_ids_RK, expert_map, block_size=cfg["BLOCK_M"], tables=False,
                              validate=False)
        P = layout.sorted_slot_ids.numel()
        x = x_RH if x_RH.stride(1) == 1 else x_RH.contiguous()
        w13, w2 = w13.contiguous(), w2.contiguous()
        inter = torch.empty(P, I, dtype=x.dtype, device=dev)
        weighted = mode == "weighted"
        out_slots = (torch.empty if weighted else torch.zeros)(N, H, dtype=x.dtype, device=dev)
        persistent = num_rows is not None and persistent_supported(amd=_on_amd(dev))
        if N and P:
            launch_mxfp4(x, w13, w2, inter, out_slots, layout, cfg, variant=variant,
                         w13_bias=w13_bias, w2_bias=w2_bias,
                         weights_N=topk_weights_RK.contiguous().view(-1), persistent=persistent,
                         weighted=weighted)
        if weighted:
            out = torch.empty(R, H, dtype=x.dtype, device=dev)
            slot_sum(out_slots, layout.local_ids, out, num_rows)
            return ExpertsOutput(out=out, weights_applied=True)
        return ExpertsOutput(out=out_slots.view(R, K, H), weights_applied=False,
                             weighted_inputs=variant.weights_on_input)


def launch_mxfp4(x, w13: MXFP4Tensor, w2: MXFP4Tensor, inter, out_slots, layout, cfg: dict, *,
                 variant: ExpertVariant, w13_bias, w2_bias, weights_N, persistent: bool,
                 weighted: bool) -> None:
    """The two MXFP4 GEMMs over the layout's blocks: inter [P, I] (x's dtype) = act(x @ w13.T
    + w13_bias), then out_slots [R * K, H] = inter @ w2.T + w2_bias (times the slot's weight
    when ``weighted`` and the weights are not on the input)."""
    from rocm_moe.experts._triton_mxfp4 import _mxfp4_down_kernel, _mxfp4_gate_up_kernel

    H, I, B = x.shape[1], inter.shape[1], layout.block_size
    n_blocks = layout.block_expert_ids.numel()
    gu, dn = cfg["gate_up"], cfg["down"]
    for kc in (gu, dn):
        assert kc["BLOCK_K"] % 64 == 0, cfg  # whole scale groups, a power-of-two count
    wb13, ws13 = w13.blocks.view(-1, H // 2), w13.scales.view(-1, H // 32)
    grid = persistent_grid(n_blocks * -(-I // gu["BLOCK_N"]), persistent, x.device)
    _mxfp4_gate_up_kernel[grid](
        x, wb13, ws13, inter, layout.sorted_slot_ids, layout.block_expert_ids,
        layout.num_padded, x if w13_bias is None else w13_bias.contiguous(), weights_N,
        layout.sentinel, H, I, layout.top_k, x.stride(0), wb13.stride(0), ws13.stride(0),
        inter.stride(0), EVEN_K=H % gu["BLOCK_K"] == 0, PERSISTENT=persistent,
        **_variant_args(variant), BLOCK_M=B, BLOCK_N=gu["BLOCK_N"], BLOCK_K=gu["BLOCK_K"],
        num_warps=gu["num_warps"], num_stages=gu["num_stages"])
    wb2, ws2 = w2.blocks.view(-1, I // 2), w2.scales.view(-1, I // 32)
    grid = persistent_grid(n_blocks * -(-H // dn["BLOCK_N"]), persistent, x.device)
    _mxfp4_down_kernel[grid](
        inter, wb2, ws2, out_slots, layout.sorted_slot_ids, layout.block_expert_ids,
        weights_N, layout.num_padded, out_slots if w2_bias is None else w2_bias.contiguous(),
        layout.sentinel, H, I, inter.stride(0), wb2.stride(0), ws2.stride(0),
        out_slots.stride(0), WEIGHTED=weighted and not variant.weights_on_input,
        EVEN_K=I % dn["BLOCK_K"] == 0, PERSISTENT=persistent, BIAS=w2_bias is not None,
        BLOCK_M=B, BLOCK_N=dn["BLOCK_N"], BLOCK_K=dn["BLOCK_K"], num_warps=dn["num_warps"],
        num_stages=dn["num_stages"])
