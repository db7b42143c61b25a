"""MXFP4 expert weights: 4-bit E2M1 values, two per byte, with one E8M0 scale per 32 values
along the input (reduction) dim, the OCP microscaling format gpt-oss's checkpoints ship.

    w13_blocks [e, 2I, H/2] uint8    w13_scales [e, 2I, H/32] uint8    (gate rows then up rows)
    w2_blocks  [e, H, I/2]  uint8    w2_scales  [e, H, I/32]  uint8
    value[j, n, k] = e2m1(nibble k of row n) * 2 ** (scales[j, n, k // 32] - 127)

Nibble order (transformers' reader, ``integrations/mxfp4.py``): byte k // 2 holds value k in
its low nibble when k is even, in its high nibble when k is odd. An E2M1 code is sign (bit 3),
exponent (bits 2-1, bias 1) and mantissa (bit 0): ``E2M1_VALUES`` lists the 16 values
(0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives). An E8M0 scale is a biased power of two;
255 is NaN and refused. H and I are multiples of 32 (whole scale groups).

gpt-oss's checkpoint holds every expert of a layer in one tensor per projection
(``experts.gate_up_proj_blocks`` [E, 2I, H/32, 16] with ``_scales`` [E, 2I, H/32], rows
alternating gate, up; ``experts.down_proj_blocks`` [E, H, I/32, 16] with ``_scales``); the
reader takes this rank's rows only and puts the gate rows before the up rows (a row permutation:
scales travel with their rows, nothing is requantised).

Computed by the MXFP4 experts (``experts/mxfp4.py``: the reference on the dequantised weights,
the Triton kernels of ``experts/_triton_mxfp4.py`` that dequantise tiles in registers).

Worked example (a test asserts it): ``pack_e2m1(torch.tensor([[1, 15]]))`` is ``[[0xF1]]``
(code 1 = 0.5 low, code 15 = -6 high), and with scale 128 the row dequantises to [1.0, -12.0].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rocm_moe._checks import describe, error_message
from rocm_moe.formats.base import CheckpointReader, WeightFormat, check_expert_shapes

GROUP = 32  # values per E8M0 scale
SCALE_BIAS = 127  # E8M0: value 2 ** (s - 127); s = 255 is NaN
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [..., K] (integers 0..15, K even) -> bytes [..., K/2] uint8: value 2j in the
    low nibble of byte j, value 2j + 1 in its high nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(blocks: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] uint8 -> E2M1 codes [..., K] uint8 (``pack_e2m1``'s inverse)."""
    lo, hi = blocks & 0x0F, blocks >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def e2m1_values(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of E2M1 codes (any shape) in ``dtype``."""
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)[codes.long()]


def _round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Codes 0..7 of |values| ``a`` (float, already scaled into [0, 6]) rounded to the nearest
    E2M1 magnitude, ties to the even code (an even mantissa)."""
    mags = torch.tensor(E2M1_VALUES[:8], dtype=a.dtype, device=a.device)
    mids = (mags[1:] + mags[:-1]) / 2
    c = torch.searchsorted(mids, a.contiguous(), right=True)
    tie = (c > 0) & (a == mids[(c - 1).clamp(min=0)]) & (c % 2 == 1)
    return torch.where(tie, c - 1, c)


@dataclass(frozen=True, eq=False)
class MXFP4Tensor:
    """A [..., N, K] matrix (stack) in MXFP4: ``blocks`` [..., N, K/2] uint8 and ``scales``
    [..., N, K/32] uint8 (the module docstring's layout)."""

    blocks: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        for field, t in (("blocks", self.blocks), ("scales", self.scales)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() < 2:
                raise TypeError(error_message(
                    f"MXFP4Tensor.{field}", describe(t), "must be a uint8 tensor of >= 2 dims",
                    "quantise float weights with quantize_mxfp4, or read a checkpoint's "
                    "*_blocks / *_scales"))
        b, s = self.blocks.shape, self.scales.shape
        if b[:-1] != s[:-1] or b[-1] * 2 != s[-1] * GROUP:
            raise ValueError(error_message(
                "MXFP4Tensor.scales.shape", list(s), f"must be [..., N, K/{GROUP}] for blocks "
                f"{list(b)} ([..., N, K/2]): one scale per {GROUP} values",
                "pass the scales of these blocks"))
        if self.blocks.device != self.scales.device:
            raise ValueError(error_message("MXFP4Tensor.scales.device", self.scales.device,
                                           f"must be the blocks' {self.blocks.device}",
                                           "move both to one device"))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the matrix it holds, [..., N, K]."""
        return (*self.blocks.shape[:-1], self.blocks.shape[-1] * 2)

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        """0.5 byte per value plus 1 per 32 values."""
        return self.blocks.numel() + self.scales.numel()

    def __getitem__(self, idx) -> MXFP4Tensor:
        """Experts ``idx`` along dim 0 (an int, a slice or an index tensor)."""
        return MXFP4Tensor(self.blocks[idx], self.scales[idx])

    def to(self, device) -> MXFP4Tensor:
        return MXFP4Tensor(self.blocks.to(device), self.scales.to(device))

    def contiguous(self) -> MXFP4Tensor:
        return MXFP4Tensor(self.blocks.contiguous(), self.scales.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The [..., N, K] values in ``dtype`` (float64 default: exact; float32 and bfloat16
        hold every value whose scale lies in 2**-126..2**125, float16 far fewer)."""
        v = e2m1_values(unpack_e2m1(self.blocks), torch.float64)
        scale = torch.exp2(self.scales.to(torch.float64) - SCALE_BIAS)
        v = v.unflatten(-1, (-1, GROUP)) * scale[..., None]
        return v.flatten(-2).to(dtype)

    def check_values(self, field: str) -> None:
        """No NaN scale (E8M0 255); one host read."""
        if self.scales.numel() and bool((self.scales == 255).any()):
            raise ValueError(error_message(
                f"{field}.scales", "holds 255", "E8M0 scale 255 is NaN: no weight",
                "quantise the weights again, or download the checkpoint again"))


def quantize_mxfp4(w: torch.Tensor) -> MXFP4Tensor:
    """Float [..., N, K] (K % 32 == 0) -> MXFP4, the OCP MX rule: per group of 32 along K the
    scale is 2 ** (floor(log2(amax)) - 2) (E2M1's largest exponent), each value / scale rounded
    to the nearest E2M1 value (ties to even), clamped to +-6. An all-zero group gets the
    smallest scale (code 0)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 2:
        raise TypeError(error_message("w", describe(w), "must be a float tensor [..., N, K]",
                                      "pass the float weights to quantise"))
    if w.shape[-1] % GROUP:
        raise ValueError(error_message(
            "w.shape[-1]", w.shape[-1], f"must be a multiple of {GROUP} (whole MXFP4 groups "
            "along the input dim)", "pad the input dim, or keep these weights dense"))
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(error_message("w", "non-finite values", "must be finite",
                                       "quantise finite weights"))
    g = w.double().unflatten(-1, (-1, GROUP))
    amax = g.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-300))) - 2,
                      torch.full_like(amax, -SCALE_BIAS))
    exp = exp.clamp(-SCALE_BIAS, 254 - SCALE_BIAS)
    y = g / torch.exp2(exp)[..., None]
    codes = _round_e2m1(y.abs().clamp(max=E2M1_MAX))
    codes = torch.where(y < 0, codes + 8, codes).flatten(-2)
    return MXFP4Tensor(pack_e2m1(codes), (exp + SCALE_BIAS).to(torch.uint8))


def deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows (dim -2 for blocks / scales, dim -1 for a [.., 2I] bias) alternating gate, up ->
    gate rows then up rows (gpt-oss's fused gate_up)."""
    return torch.cat([t[..., 0::2, :], t[..., 1::2, :]], dim=-2)


def check_mxfp4_weights(w13: object, w2: object, *, num_local: int | None = None,
                        hidden: int | None = None) -> tuple[int, int, int]:
    """w13 / w2 are MXFP4Tensors of [e, 2I, H] / [e, H, I] on one device (H and I multiples
    of 32 by construction); returns (e, H, I)."""
    for field, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, MXFP4Tensor):
            raise TypeError(error_message(
                field, describe(w), "must be a formats.mxfp4.MXFP4Tensor for MXFP4 experts",
                "quantise it: quantize_mxfp4(w), or load an MXFP4 checkpoint"))
    e, H, I = check_expert_shapes(w13, w2, fix="pass MXFP4Tensors of [e, 2I, H] and [e, H, I]")
    if num_local is not None and e != num_local:
        raise ValueError(error_message("w13.shape[0]", e, f"must be e={num_local} local experts",
                                       "load this rank's experts"))
    if hidden is not None and H != hidden:
        raise ValueError(error_message("w13.shape[2]", H, f"must be H={hidden}",
                                       "pass the weights of this hidden size"))
    if w13.device != w2.device:
        raise ValueError(error_message("w2.device", w2.device, f"must be w13's {w13.device}",
                                       "move both to one device"))
    return e, H, I


@dataclass(frozen=True)
class FusedExpert:
    """Where one expert lives in a fused checkpoint (gpt-oss): the layer's tensor names
    (``families.FusedExpertTensors``; ``gate_up`` / ``down`` are the prefixes of their
    ``_blocks`` / ``_scales``), the expert's row in them and the layer's expert count E."""

    names: Any
    index: int
    num_experts: int


class MXFP4Weights(WeightFormat):
    """``w13`` / ``w2``: MXFP4Tensor of [e, 2I, H] / [e, H, I] (the module docstring)."""

    name = "mxfp4"
    tensor_names = ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales")

    def __init__(self, w13: MXFP4Tensor, w2: MXFP4Tensor):
        check_mxfp4_weights(w13, w2)
        self.w13, self.w2 = w13, w2

    @classmethod
    def quantize(cls, w13, w2, **options: Any) -> MXFP4Weights:
        """Float [e, 2I, H] / [e, H, I] -> MXFP4 (``quantize_mxfp4``); MXFP4Tensors pass."""
        cls.check_options(**options)
        _, H, I = check_expert_shapes(w13, w2, fix="pass [e, 2I, H] and [e, H, I] weights")
        for field, n in (("hidden_size H", H), ("intermediate_size I", I)):
            if n % GROUP:
                raise ValueError(error_message(
                    field, n, f"must be a multiple of {GROUP} for MXFP4 experts (one E8M0 scale "
                    f"per {GROUP} values along each projection's input dim)",
                    "keep this layer's experts dense (weight_format='dense')"))
        return cls(*(w if isinstance(w, MXFP4Tensor) else quantize_mxfp4(w) for w in (w13, w2)))

    @classmethod
    def footprint(cls, num_local: int, hidden_size: int, intermediate_size: int,
                  **options: Any) -> int:
        """0.5 byte per weight plus 1 per 32 (3 H I values per expert)."""
        values = 3 * hidden_size * intermediate_size
        return num_local * (values // 2 + values // GROUP)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], **options: Any
                     ) -> MXFP4Weights:
        return cls(MXFP4Tensor(tensors["w13_blocks"], tensors["w13_scales"]),
                   MXFP4Tensor(tensors["w2_blocks"], tensors["w2_scales"]))

    @classmethod
    def in_checkpoint(cls, ck: CheckpointReader, expert: Any) -> bool:
        """A fused checkpoint (``expert``: a ``FusedExpert`` or the layer's
        ``FusedExpertTensors``) holds ``gate_up_proj_blocks`` and its scales."""
        names = getattr(expert, "names", expert)
        gate_up = getattr(names, "gate_up", None)
        return gate_up is not None and ck.has(gate_up + "_blocks") and \
            ck.has(gate_up + "_scales")

    @classmethod
    def from_checkpoint(cls, ck: CheckpointReader, experts: Sequence[FusedExpert], *,
                        hidden_size: int, intermediate_size: int, interleaved: bool = True,
                        **options: Any) -> MXFP4Weights:
        """This rank's experts (``FusedExpert`` each, in local order) from a fused MXFP4
        checkpoint, kept in MXFP4: only their rows are read (``ck.tensor_row``), gate/up rows
        de-interleaved where ``interleaved`` (gpt-oss), every scale checked (no NaN)."""
        cls.check_options(**options)
        H, I = hidden_size, intermediate_size
        for field, n in (("hidden_size", H), ("intermediate_size", I)):
            if n % GROUP:
                raise ValueError(error_message(
                    field, n, f"an MXFP4 checkpoint's experts need a multiple of {GROUP}",
                    "check config.json (gpt-oss: 2880)"))
        w13, w2 = [], []
        for ex in experts:
            E, gu, dn = ex.num_experts, ex.names.gate_up, ex.names.down
            b13 = read_packed_row(ck, gu + "_blocks", ex.index, (E, 2 * I, H // GROUP, 16))
            s13 = read_packed_row(ck, gu + "_scales", ex.index, (E, 2 * I, H // GROUP))
            b13 = b13.flatten(-2)
            if interleaved:
                b13, s13 = deinterleave_rows(b13), deinterleave_rows(s13)
            w13.append(MXFP4Tensor(b13, s13))
            w2.append(MXFP4Tensor(
                read_packed_row(ck, dn + "_blocks", ex.index, (E, H, I // GROUP, 16)).flatten(-2),
                read_packed_row(ck, dn + "_scales", ex.index, (E, H, I // GROUP))))
        if not w13:
            return cls.empty(0, H, I, dtype=torch.float32)
        weights = cls(*(MXFP4Tensor(torch.stack([w.blocks for w in ws]),
                                    torch.stack([w.scales for w in ws])) for ws in (w13, w2)))
        weights.check_values("checkpoint experts")
        return weights

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w13_blocks": self.w13.blocks, "w13_scales": self.w13.scales,
                "w2_blocks": self.w2.blocks, "w2_scales": self.w2.scales}

    def dequantize(self, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13.dequantize(dtype), self.w2.dequantize(dtype)

    def check_values(self, field: str = "weights") -> None:
        self.w13.check_values(f"{field}.w13")
        self.w2.check_values(f"{field}.w2")


def read_packed_row(ck: CheckpointReader, name: str, index: int, shape: tuple) -> torch.Tensor:
    """Row ``index`` of the uint8 tensor ``name`` of ``shape`` ([E, ...]), through the
    checkpoint's ``tensor_row`` (``packed=True``: uint8 allowed) where it has one, else the
    whole tensor's row."""
    if hasattr(ck, "tensor_row"):
        t = ck.tensor_row(name, index, shape, packed=True)
    else:
        t = ck.tensor(name, shape)[index]
    if t.dtype != torch.uint8:
        raise ValueError(error_message(
            f"{name}.dtype", t.dtype, "an MXFP4 checkpoint holds uint8 blocks and scales",
            "download the checkpoint again"))
    return t
