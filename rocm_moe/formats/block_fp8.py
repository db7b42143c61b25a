"""Block-FP8 expert weights: FP8 with one float32 scale per 128x128 block (DeepSeek-V3's
checkpoint format; the arithmetic and the encodings are ``rocm_moe.quant``'s).

    w13_fp8 [e, 2I, H] float8     w13_scale_inv [e, 2I/128, ceil(H/128)] float32
    w2_fp8  [e, H, I]  float8     w2_scale_inv  [e, ceil(H/128), I/128]  float32
    value[j, n, k] = w[j, n, k] * scale_inv[j, n // 128, k // 128]

I % 128 == 0, so the up rows start on a block boundary (gate and up quantised as one stack
equal the checkpoint's two matrices). Both projections in one encoding, ``fp8_dtype``:
e4m3fn (NVIDIA, checkpoints) or e4m3fnuz (MI300's matrix cores); ``to_format`` converts.

Computed by the FP8 experts backends (``weight_formats = ("block_fp8",)``: the reference,
Triton and AITER ones of ``experts/fp8.py``), which quantise the received rows per 1x128 group
(or take ``quant.FP8Rows`` from an FP8 dispatch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rocm_moe._checks import describe, error_message
from rocm_moe.formats.base import CheckpointReader, WeightFormat
from rocm_moe.quant import (
    BLOCK,
    FP8_DTYPES,
    BlockFP8Weight,
    check_block_values,
    fp8_dtype,
    quantize_weight_blocks,
)

# Relative error allowed against the float64 oracle of the DEQUANTISED model: the FP8
# activations (rows and intermediate, per 1x128 group, 3 mantissa bits) cost ~2-4% (notes/fp8.md).
FP8_TOLERANCE = 6e-2
SCALE_SUFFIX = "_scale_inv"  # <proj>.weight_scale_inv beside <proj>.weight in a checkpoint


def check_fp8_weights(w13: object, w2: object, *, num_local: int | None = None,
                      hidden: int | None = None) -> None:
    """w13 / w2 are BlockFP8Weights of [e, 2I, H] / [e, H, I] in one encoding, I % 128 == 0."""
    for field, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, BlockFP8Weight):
            raise TypeError(error_message(field, describe(w), "must be a quant.BlockFP8Weight "
                                          "for FP8 experts", "quantise it: quantize_experts(w13, "
                                          "w2), or load an FP8 checkpoint"))
        if w.weight.dim() != 3:
            raise ValueError(error_message(f"{field}.shape", list(w.shape), "must be 3-D [e, N, K]",
                                           "stack the local experts along dim 0"))
    e, two_i, H = w13.shape
    if two_i % (2 * BLOCK):
        raise ValueError(error_message(
            "w13.shape[1]", two_i, f"must be 2I with I a multiple of {BLOCK}",
            f"FP8 block scales need the up rows to start on a {BLOCK}-row block"))
    if num_local is not None and e != num_local:
        raise ValueError(error_message("w13.shape[0]", e, f"must be e={num_local} local experts",
                                       "load this rank's experts"))
    if hidden is not None and H != hidden:
        raise ValueError(error_message("w13.shape[2]", H, f"must be H={hidden}",
                                       "pass the weights of this hidden size"))
    if tuple(w2.shape) != (e, H, two_i // 2):
        raise ValueError(error_message("w2.shape", list(w2.shape),
                                       f"must be [e={e}, H={H}, I={two_i // 2}]",
                                       "pass the down weights of the same experts"))
    if w13.dtype != w2.dtype or w13.device != w2.device:
        raise ValueError(error_message(
            "w2.dtype / device", (w2.dtype, w2.device), f"must match w13's ({w13.dtype}, "
            f"{w13.device})", "convert both with to_format / to"))


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


class BlockFP8Weights(WeightFormat):
    """``w13`` / ``w2``: ``quant.BlockFP8Weight`` of [e, 2I, H] / [e, H, I] (module docstring)."""

    name = "block_fp8"
    tensor_names = ("w13_fp8", "w13_scale_inv", "w2_fp8", "w2_scale_inv")

    def __init__(self, w13: BlockFP8Weight, w2: BlockFP8Weight):
        check_fp8_weights(w13, w2)
        self.w13, self.w2 = w13, w2

    @classmethod
    def check_options(cls, *, fp8_dtype: str | torch.dtype = "e4m3fn") -> dict:
        """``fp8_dtype``: "e4m3fn" (default) or "e4m3fnuz" (MI300)."""
        return {"fp8_dtype": _encoding(fp8_dtype)}

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor, *,
                 fp8_dtype: str | torch.dtype = "e4m3fn") -> BlockFP8Weights:
        """Float [e, 2I, H] / [e, H, I] -> FP8, per 128x128 block scale_inv = amax / fp8 max
        (``quant.quantize_weight_blocks``); BlockFP8Weights of another encoding convert."""
        dt = _encoding(fp8_dtype)
        out = []
        for field, w in (("w13", w13), ("w2", w2)):
            if isinstance(w, BlockFP8Weight):
                check_block_values(field, w)  # (before to_format: it refuses NaN less clearly)
                out.append(w.to_format(dt))
            else:
                out.append(quantize_weight_blocks(w, dtype=dt))
        return cls(*out)

    @classmethod
    def footprint(cls, num_local: int, hidden_size: int, intermediate_size: int,
                  **options: Any) -> int:
        """One byte per weight plus 4 per 128x128 block."""
        H, I = hidden_size, intermediate_size
        scales = _blocks(2 * I) * _blocks(H) + _blocks(H) * _blocks(I)
        return num_local * (3 * H * I + 4 * scales)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], **options: Any
                     ) -> BlockFP8Weights:
        return cls(BlockFP8Weight(tensors["w13_fp8"], tensors["w13_scale_inv"]),
                   BlockFP8Weight(tensors["w2_fp8"], tensors["w2_scale_inv"]))

    @classmethod
    def in_checkpoint(cls, ck: CheckpointReader, expert: Any) -> bool:
        """The expert's gate has its ``weight_scale_inv`` beside it."""
        return ck.has(expert.gate + SCALE_SUFFIX)

    @classmethod
    def from_checkpoint(cls, ck: CheckpointReader, experts: Sequence[Any], *, hidden_size: int,
                        intermediate_size: int, fp8_dtype: str | torch.dtype | None = None
                        ) -> BlockFP8Weights:
        """Each expert's FP8 gate / up / down with their ``_scale_inv`` block scales, kept in
        FP8 (converted to ``fp8_dtype`` if given, else the checkpoint's encoding)."""
        H, I = hidden_size, intermediate_size
        if I % BLOCK:
            raise ValueError(error_message(
                "intermediate_size", I, f"an FP8 checkpoint's experts need I % {BLOCK} == 0 "
                f"(the up rows start on a {BLOCK}-row scale block)",
                "dequantise the checkpoint to bfloat16"))
        w13, w2 = [], []
        for names in experts:
            gate, up = read_block_fp8(ck, names.gate, (I, H)), read_block_fp8(ck, names.up, (I, H))
            w13.append(BlockFP8Weight(torch.cat([gate.weight, up.weight]),
                                      torch.cat([gate.scale_inv, up.scale_inv])))
            w2.append(read_block_fp8(ck, names.down, (H, I)))
        if not w13:
            return cls.empty(0, H, I, dtype=torch.float32, fp8_dtype=fp8_dtype or "e4m3fn")
        weights = cls(*(BlockFP8Weight(torch.stack([w.weight for w in ws]),
                                       torch.stack([w.scale_inv for w in ws]))
                        for ws in (w13, w2)))
        return weights if fp8_dtype is None else weights.to_format(fp8_dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w13_fp8": self.w13.weight, "w13_scale_inv": self.w13.scale_inv,
                "w2_fp8": self.w2.weight, "w2_scale_inv": self.w2.scale_inv}

    @property
    def fp8_dtype(self) -> torch.dtype:
        return self.w13.dtype

    def options(self) -> dict:
        return {"fp8_dtype": self.fp8_dtype}

    def to_format(self, dtype: str | torch.dtype) -> BlockFP8Weights:
        """The same values in the other FP8 encoding (``quant.convert_fp8``)."""
        return BlockFP8Weights(self.w13.to_format(dtype), self.w2.to_format(dtype))

    def dequantize(self, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13.dequantize(dtype), self.w2.dequantize(dtype)

    def check_values(self, field: str = "weights") -> None:
        """Every block scale finite and > 0, no FP8 NaN code (``quant.check_block_values``)."""
        check_block_values(f"{field}.w13", self.w13)
        check_block_values(f"{field}.w2", self.w2)


def _encoding(name: object) -> torch.dtype:
    try:
        return fp8_dtype(name)
    except ValueError as exc:
        raise ValueError(error_message(
            "format_options['fp8_dtype']", repr(name), f"must be one of {list(FP8_DTYPES)}",
            "pass 'e4m3fn' (NVIDIA, checkpoints) or 'e4m3fnuz' (MI300)")) from exc


def read_block_fp8(ck: CheckpointReader, name: str, shape: tuple) -> BlockFP8Weight:
    """``name`` (FP8 [N, K]) with its ``name_scale_inv`` [ceil(N/128), ceil(K/128)], checked:
    an FP8 dtype, a scale tensor of the right shape, every scale finite and > 0."""
    w = ck.tensor(name, shape)
    if w.dtype not in FP8_DTYPES or not ck.has(name + SCALE_SUFFIX):
        raise ValueError(error_message(
            f"{name}.dtype", w.dtype, f"a block-FP8 checkpoint holds float8 weights with a "
            f"{name + SCALE_SUFFIX} beside each", "download the checkpoint again"))
    scale = ck.tensor(name + SCALE_SUFFIX, tuple(_blocks(n) for n in w.shape))
    try:
        weight = BlockFP8Weight(w, scale.float())
    except (TypeError, ValueError) as exc:
        raise ValueError(error_message(name + SCALE_SUFFIX, list(scale.shape), str(exc),
                                       "download the checkpoint again")) from exc
    check_block_values(name, weight)  # zero / negative scales are finite, yet no weight
    return weight
