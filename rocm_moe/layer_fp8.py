"""An EPMoE whose routed experts are held in FP8 with 128x128 block scales.

``FP8EPMoE`` is ``layer.EPMoE`` with the routed experts' weights as buffers ``w13_fp8`` [e, 2I,
H] / ``w13_scale_inv`` [e, 2I/128, ceil(H/128)] and ``w2_fp8`` [e, H, I] / ``w2_scale_inv``
[e, ceil(H/128), I/128] (``quant.BlockFP8Weight``'s layout, DeepSeek-V3's checkpoint format);
``w13`` / ``w2`` stay as empty [0, ...] parameters that only carry the compute dtype. Router,
shared experts, dispatch and combine are the EPMoE's, in the compute dtype; the experts backend
is an ``experts.fp8.FP8Experts`` (reference or Triton), which quantises the received rows per
1x128 group (or takes FP8Rows from an FP8 dispatch).

Memory per rank: ``expert_bytes`` (the FP8 weights and their scales): about half of bfloat16's
(1 byte per weight + 4 bytes per 16384).
"""

from __future__ import annotations

import torch
from torch import nn

from rocm_moe._checks import describe, error_message
from rocm_moe.experts.fp8 import FP8Experts, FP8ReferenceExperts, check_fp8_weights
from rocm_moe.layer import EPMoE
from rocm_moe.quant import BlockFP8Weight, check_block_values, quantize_weight_blocks
from rocm_moe.quant import fp8_dtype as _fp8_name

# Relative error allowed against the float64 oracle of the DEQUANTISED model: the FP8
# activations (rows and intermediate, per 1x128 group, 3 mantissa bits) cost ~2-4% (notes/fp8.md).
FP8_TOLERANCE = 6e-2


class FP8EPMoE(EPMoE):
    """EPMoE with FP8 routed experts. ``fp8_dtype``: "e4m3fn" (default; NVIDIA, checkpoints)
    or "e4m3fnuz" (MI300); ``experts``: an FP8Experts backend (default: the reference). Other
    arguments are EPMoE's; synthetic weights are EPMoE's, quantised."""

    def __init__(self, *, experts: FP8Experts | None = None, fp8_dtype: str = "e4m3fn", **kw):
        experts = experts or FP8ReferenceExperts()
        if not isinstance(experts, FP8Experts):
            raise TypeError(error_message(
                "experts", describe(experts), "must be an FP8 experts backend",
                "pass rocm_moe.experts.fp8.FP8ReferenceExperts() or "
                "rocm_moe.experts.triton_fp8.TritonFP8Experts()"))
        self._fp8 = _fp8_name(fp8_dtype)
        super().__init__(experts=experts, **kw)  # its reset_parameters quantises (below)

    @property
    def fp8_dtype(self) -> torch.dtype:
        return self.w13_fp8.dtype

    @property
    def expert_bytes(self) -> int:
        """Bytes of this rank's routed experts (FP8 weights and float32 block scales)."""
        return sum(t.numel() * t.element_size() for t in (
            self.w13_fp8, self.w13_scale_inv, self.w2_fp8, self.w2_scale_inv))

    def expert_weights(self) -> tuple[BlockFP8Weight, BlockFP8Weight]:
        return (BlockFP8Weight(self.w13_fp8, self.w13_scale_inv),
                BlockFP8Weight(self.w2_fp8, self.w2_scale_inv))

    _FP8_BUFFERS = ("w13_fp8", "w13_scale_inv", "w2_fp8", "w2_scale_inv")

    def _apply(self, fn, recurse=True):
        """``.to(device)`` / ``.cuda()`` move the FP8 experts; a dtype cast (``.to(bf16)``,
        ``.half()``) leaves them as they are (torch counts float8 as floating and would cast
        them, and their float32 scales, too)."""
        held = {n: self._buffers.pop(n) for n in self._FP8_BUFFERS if n in self._buffers}
        try:
            out = super()._apply(fn, recurse)
        finally:
            if held:
                device = fn(torch.empty(0, device=next(iter(held.values())).device)).device
                for n, t in held.items():
                    self._buffers[n] = t.to(device)
        return out

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """EPMoE's synthetic weights, the routed experts quantised to FP8."""
        e, I, H = len(self.local_experts), self.intermediate_size, self.hidden_size
        kw = dict(dtype=self.w13.dtype, device=self.w13.device)
        if self.w13.shape[0] != e:  # float weights were dropped after the last quantisation
            self.w13 = nn.Parameter(torch.empty(e, 2 * I, H, **kw))
            self.w2 = nn.Parameter(torch.empty(e, H, I, **kw))
        super().reset_parameters(seed)
        self.load_experts(self.w13.detach(), self.w2.detach())

    @torch.no_grad()
    def load_experts(self, w13, w2) -> None:
        """Routed experts from BlockFP8Weights (global [E, ...] or local [e, ...], converted to
        this layer's FP8 encoding) or from float tensors (quantised per 128x128 block)."""
        E, e = self.router.num_experts, len(self.local_experts)
        H, I = self.hidden_size, self.intermediate_size
        dt = getattr(self, "w13_fp8", None)
        dt = self._fp8 if dt is None else dt.dtype
        out = []
        for name, src, shape in (("w13", w13, (2 * I, H)), ("w2", w2, (H, I))):
            if not isinstance(src, BlockFP8Weight):
                if not isinstance(src, torch.Tensor) or tuple(src.shape[1:]) != shape:
                    raise ValueError(error_message(
                        name, describe(src), f"must be [E or e, {shape[0]}, {shape[1]}]",
                        "pass the experts' weights (BlockFP8Weight or float)"))
                src = quantize_weight_blocks(src, dtype=dt)
            if src.shape[0] == E and e != E:
                src = src[torch.tensor(self.local_experts, device=src.device)]
            elif src.shape[0] != e:
                raise ValueError(error_message(
                    f"{name}.shape[0]", src.shape[0], f"must be E={E} (global) or e={e} (local)",
                    "pass all experts or this rank's experts in local order"))
            check_block_values(name, src)  # (before to_format: it refuses NaN less clearly)
            out.append(src.to_format(dt).to(self.gate.weight.device).contiguous())
        check_fp8_weights(*out, num_local=e, hidden=H)
        for name, w in zip(("w13", "w2"), out, strict=True):
            self.register_buffer(f"{name}_fp8", w.weight)
            self.register_buffer(f"{name}_scale_inv", w.scale_inv)
        kw = dict(dtype=self.w13.dtype, device=self.w13.device)
        self.w13 = nn.Parameter(torch.empty(0, 2 * I, H, **kw))  # dtype carriers only
        self.w2 = nn.Parameter(torch.empty(0, H, I, **kw))
