"""FP8 formats: 128x128 block-scaled weights (DeepSeek-V3's checkpoint format) and activations
quantised per token group of 128 (dynamic, float32 scales).

Formats (``torch.float8_e4m3fn`` on NVIDIA and in checkpoints, ``torch.float8_e4m3fnuz`` on
MI300, whose matrix cores take only the fnuz encoding):

    BlockFP8Weight  weight    [..., N, K] float8   (N output rows, K input columns)
                    scale_inv [..., ceil(N/128), ceil(K/128)] float32
                    value[n, k] = weight[n, k] * scale_inv[n // 128, k // 128]
    FP8Rows         q         [R, H] float8
                    scale     [R, ceil(H/128)] float32
                    value[r, h] = q[r, h] * scale[r, h // 128]

``scale_inv`` is the checkpoint's name (DeepSeek-V3 stores ``<proj>.weight_scale_inv`` beside
``<proj>.weight``): despite the name it MULTIPLIES the FP8 value back (vLLM and SGLang read it
the same way).

e4m3fn <-> e4m3fnuz (``convert_fp8``): the same 8 bits mean half the value in e4m3fnuz (its
exponent bias is 8, e4m3fn's 7), so a weight converts by reinterpreting its bits and doubling
its scale; the one e4m3fn code with no fnuz meaning, -0 (0x80, NaN in fnuz), becomes +0. The
dequantised values are then bit-identical (tested). The way back halves the scale; fnuz's
+-240 (0x7F / 0xFF) would be +-480, past e4m3fn's 448, and is refused (requantise instead).

Worked example (the test asserts it): ``quantize_rows(torch.tensor([[448.0, -1.0]]))`` gives
scale [[1.0]] and q [[448, -1]] in e4m3fn; the fnuz conversion of that gives q [[224, -0.5]]
with scale [[2.0]].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rocm_moe._checks import check_finite, describe, error_message, value_checks_allowed

BLOCK = 128  # weight block (rows and columns) and activation group of every FP8 tensor here
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
FP8_NAMES = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
_EPS = 1e-10  # smallest amax a group is scaled by (an all-zero group gets a tiny scale, q = 0)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype: 448 (e4m3fn), 240 (e4m3fnuz)."""
    return float(torch.finfo(dtype).max)


def fp8_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"e4m3fn"`` / ``"e4m3fnuz"`` (or the dtype itself) -> the torch FP8 dtype."""
    if isinstance(name, torch.dtype) and name in FP8_DTYPES:
        return name
    if isinstance(name, str) and name in FP8_NAMES:
        return FP8_NAMES[name]
    raise ValueError(error_message("fp8_dtype", repr(name), f"must be one of {list(FP8_NAMES)}",
                                   "pass 'e4m3fn' (NVIDIA, checkpoints) or 'e4m3fnuz' (MI300)"))


def native_fp8_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The FP8 encoding the device's matrix cores take: e4m3fnuz on MI300 (gfx94x, a ROCm torch
    on a gfx94x device), e4m3fn elsewhere (NVIDIA sm_89+, gfx950, CPUs)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.version.hip is not None:
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
        if arch.startswith("gfx94"):
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def _check_fp8(field: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(error_message(field, describe(t), "must be a torch.Tensor",
                                      "pass the FP8 tensor"))
    if t.dtype not in FP8_DTYPES:
        raise TypeError(error_message(f"{field}.dtype", t.dtype, f"must be one of {FP8_DTYPES}",
                                      "quantise it (quantize_weight_blocks / quantize_rows)"))


def _check_scales(field: str, scale: object, want: tuple[int, ...], data: torch.Tensor) -> None:
    if not isinstance(scale, torch.Tensor):
        raise TypeError(error_message(field, describe(scale), "must be a float32 torch.Tensor",
                                      "pass the scales the quantiser returned"))
    if scale.dtype != torch.float32:
        raise TypeError(error_message(f"{field}.dtype", scale.dtype, "must be torch.float32",
                                      f"pass {field}.float()"))
    if tuple(scale.shape) != want:
        raise ValueError(error_message(
            f"{field}.shape", list(scale.shape), f"must be {list(want)} (one scale per "
            f"{BLOCK}-wide block of the data's {list(data.shape)})",
            "pass the scales that belong to this tensor"))
    if scale.device != data.device:
        raise ValueError(error_message(f"{field}.device", scale.device,
                                       f"must be the data's device {data.device}",
                                       "move both to one device"))


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _expand(scale: torch.Tensor, n: int, k: int | None) -> torch.Tensor:
    """Block scales repeated to the data's trailing shape [n, k] (k None: 1-D groups)."""
    if k is None:
        return scale.repeat_interleave(BLOCK, dim=-1)[..., :n]
    s = scale.repeat_interleave(BLOCK, dim=-2)[..., :n, :]
    return s.repeat_interleave(BLOCK, dim=-1)[..., :k]


@dataclass(frozen=True, eq=False)
class BlockFP8Weight:
    """A weight in FP8 with one float32 scale per 128x128 block (see the module docstring).

    ``weight`` [..., N, K] float8 (leading dims: experts); ``scale_inv`` [..., ceil(N/128),
    ceil(K/128)] float32. Indexing (``w[j]``, ``w[idx]``) selects along the leading dims."""

    weight: torch.Tensor
    scale_inv: torch.Tensor

    def __post_init__(self):
        _check_fp8("weight", self.weight)
        if self.weight.dim() < 2:
            raise ValueError(error_message("weight.shape", list(self.weight.shape),
                                           "must be [..., N, K] (at least 2-D)",
                                           "pass the projection's weight matrix"))
        *lead, N, K = self.weight.shape
        _check_scales("scale_inv", self.scale_inv, (*lead, _blocks(N), _blocks(K)), self.weight)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + 4 * self.scale_inv.numel()

    def __getitem__(self, idx) -> BlockFP8Weight:
        if isinstance(idx, tuple):
            raise TypeError(error_message("index", repr(idx), "selects leading (expert) dims "
                                          "only", "index with one int, slice or index tensor"))
        return BlockFP8Weight(self.weight[idx], self.scale_inv[idx])

    def to(self, device) -> BlockFP8Weight:
        return BlockFP8Weight(self.weight.to(device), self.scale_inv.to(device))

    def contiguous(self) -> BlockFP8Weight:
        return BlockFP8Weight(self.weight.contiguous(), self.scale_inv.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The weight's values [..., N, K] in ``dtype`` (float64 default: exact)."""
        _check_out_dtype(dtype)
        N, K = self.weight.shape[-2:]
        w = self.weight.to(torch.float64) * _expand(self.scale_inv.double(), N, K)
        return w.to(dtype)

    def to_format(self, dtype: str | torch.dtype) -> BlockFP8Weight:
        """The same values in the other FP8 encoding (``convert_fp8``); itself if it is in it."""
        q, s = convert_fp8(self.weight, self.scale_inv, fp8_dtype(dtype))
        return BlockFP8Weight(q, s)


def check_block_values(field: str, w: BlockFP8Weight) -> None:
    """A weight's values are usable: every block scale finite and > 0 (a zero scale zeroes its
    block, a negative one flips its sign, NaN / inf spread), no FP8 NaN code in the weight.
    A value check (one host read): where weights enter (load_experts, a checkpoint), never per
    forward; skipped under CUDA graph capture."""
    s = w.scale_inv
    if s.numel() and value_checks_allowed(s):
        bad = ~(torch.isfinite(s) & (s > 0))
        if bool(bad.any()):
            where = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(error_message(
                f"{field}.scale_inv", f"contains {s[bad][0].item()} at {where}",
                "block scales must be finite and > 0 (value = weight * scale_inv)",
                "load the checkpoint's weight_scale_inv again, or requantise the float weight "
                "with quantize_weight_blocks"))
    q = w.weight
    if q.numel() and value_checks_allowed(q):
        nan = torch.isnan(q.float())
        if bool(nan.any()):
            where = [int(i) for i in nan.nonzero()[0]]
            raise ValueError(error_message(
                f"{field}.weight", f"contains NaN at {where}", "FP8 weights must be finite",
                "requantise from finite float weights (quantize_weight_blocks)"))


@dataclass(frozen=True, eq=False)
class FP8Rows:
    """Rows in FP8 with one float32 scale per row and group of 128 columns (see the module
    docstring): ``q`` [R, H] float8, ``scale`` [R, ceil(H/128)] float32."""

    q: torch.Tensor
    scale: torch.Tensor
    source_dtype: torch.dtype | None = None  # the rows' dtype before quantisation, if known

    def __post_init__(self):
        _check_fp8("q", self.q)
        if self.q.dim() != 2:
            raise ValueError(error_message("q.shape", list(self.q.shape), "must be [R, H]",
                                           "flatten the tokens first"))
        R, H = self.q.shape
        _check_scales("scale", self.scale, (R, _blocks(H)), self.q)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scale.numel()

    def __getitem__(self, rows) -> FP8Rows:
        return FP8Rows(self.q[rows], self.scale[rows], self.source_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The rows' values [R, H] in ``dtype`` (float64 default: exact)."""
        _check_out_dtype(dtype)
        H = self.q.shape[1]
        return (self.q.to(torch.float64) * _expand(self.scale.double(), H, None)).to(dtype)

    def to_format(self, dtype: str | torch.dtype) -> FP8Rows:
        q, s = convert_fp8(self.q, self.scale, fp8_dtype(dtype))
        return FP8Rows(q, s, self.source_dtype)


def _check_out_dtype(dtype: object) -> None:
    """A dequantised dtype: floating, not FP8 (an integer one wraps: 448 becomes -64 in int8)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype in FP8_DTYPES:
        raise TypeError(error_message("dtype", repr(dtype), "must be a float16/bfloat16/"
                                      "float32/float64 torch.dtype", "pass e.g. torch.float32"))


def _check_float(field: str, t: object) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in FP8_DTYPES:
        raise TypeError(error_message(field, describe(t), "must be a float16/bfloat16/float32/"
                                      "float64 tensor", "pass the unquantised values"))


def _scale_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # divided by a tensor, not a Python number: CUDA torch multiplies by the reciprocal of a
    # scalar divisor (1 ulp off IEEE division at times), CPU torch and the Triton quantisers
    # divide; a tensor divisor gives IEEE division everywhere, so every device agrees bit for bit
    a = amax.float().clamp(min=_EPS)
    return a / torch.full_like(a, fp8_max(dtype))


def quantize_weight_blocks(w: torch.Tensor, *, dtype: str | torch.dtype = "e4m3fn"
                           ) -> BlockFP8Weight:
    """``w`` [..., N, K] -> BlockFP8Weight: per 128x128 block, scale_inv = amax / fp8 max and
    weight = round(w / scale_inv) (round to nearest, saturating), as DeepSeek-V3 was saved."""
    _check_float("w", w)
    dt = fp8_dtype(dtype)
    check_finite("w", w, "quantise finite weights: an inf gives an inf scale and NaN values")
    if w.dim() < 2:
        raise ValueError(error_message("w.shape", list(w.shape), "must be [..., N, K]",
                                       "pass a weight matrix (or a stack of them)"))
    *lead, N, K = w.shape
    nb, kb = _blocks(N), _blocks(K)
    wf = w.float() if w.dtype != torch.float64 else w
    padded = wf.new_zeros(*lead, nb * BLOCK, kb * BLOCK)
    padded[..., :N, :K] = wf
    blocks = padded.reshape(*lead, nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = _scale_of(amax, dt)
    q = wf / _expand(scale.to(wf.dtype), N, K)
    m = fp8_max(dt)
    return BlockFP8Weight(q.clamp(-m, m).to(dt), scale)


def quantize_rows(x: torch.Tensor, *, dtype: str | torch.dtype = "e4m3fn") -> FP8Rows:
    """``x`` [R, H] -> FP8Rows, dynamically: per row and group of 128 columns, scale = amax /
    fp8 max (float32), q = round(x / scale) (vLLM's per_token_group_quant_fp8 arithmetic)."""
    _check_float("x", x)
    dt = fp8_dtype(dtype)
    if x.dim() != 2:
        raise ValueError(error_message("x.shape", list(x.shape), "must be [R, H]",
                                       "flatten the tokens first"))
    R, H = x.shape
    g = _blocks(H)
    xf = x.float() if x.dtype != torch.float64 else x
    padded = xf.new_zeros(R, g * BLOCK)
    padded[:, :H] = xf
    scale = _scale_of(padded.reshape(R, g, BLOCK).abs().amax(dim=-1), dt)
    m = fp8_max(dt)
    q = (xf / _expand(scale.to(xf.dtype), H, None)).clamp(-m, m).to(dt)
    return FP8Rows(q, scale, x.dtype)


def convert_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) re-encoded in FP8 ``dtype`` with the same dequantised values (see the module
    docstring): e4m3fn -> e4m3fnuz doubles the scale, e4m3fnuz -> e4m3fn halves it."""
    _check_fp8("q", q)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 \
            or scale.dim() != q.dim():
        raise TypeError(error_message("scale", describe(scale), f"must be a float32 tensor of "
                                      f"q's {q.dim()} dims (one scale per 128-wide group or "
                                      "128x128 block)", "pass the scales that came with q"))
    dtype = fp8_dtype(dtype)
    if q.dtype == dtype:
        return q, scale
    bits = q.view(torch.uint8)
    if q.dtype == torch.float8_e4m3fn:
        if bool(((bits & 0x7F) == 0x7F).any()):
            raise ValueError(error_message("q", "contains NaN (0x7F/0xFF)", "an FP8 weight or "
                                           "row must be finite", "requantise from finite values"))
        bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)  # -0 is NaN in fnuz
        return bits.view(torch.float8_e4m3fnuz), scale * 2.0
    if bool((bits == 0x80).any()):
        raise ValueError(error_message("q", "contains NaN (0x80)", "an FP8 weight or row must be "
                                       "finite", "requantise from finite values"))
    if bool(((bits & 0x7F) == 0x7F).any()):
        raise ValueError(error_message(
            "q", "contains +-240 (0x7F/0xFF)", "is +-480 in e4m3fn, past its largest value 448",
            "requantise: quantize_weight_blocks(w.dequantize(), dtype='e4m3fn')"))
    return bits.view(torch.float8_e4m3fn), scale * 0.5


def quantize_rows_triton(x: torch.Tensor, dtype: torch.dtype, *, q: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None) -> FP8Rows:
    """``quant.quantize_rows`` in one Triton launch (one program per row and 8 groups of 128).
    ``q`` [R, H] ``dtype`` / ``scale`` [R, ceil(H/128)] float32: where to write (any row
    stride, unit column stride: e.g. views into packed rows, ``comm.symm_fp8``); new tensors
    by default."""
    from rocm_moe._quant_triton import _quant_rows_kernel

    R, H = x.shape
    groups = -(-H // BLOCK)
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(R, H, dtype=dtype, device=x.device) if q is None else q
    s = torch.empty(R, groups, dtype=torch.float32, device=x.device) if scale is None else scale
    assert (tuple(q.shape), q.dtype, q.stride(1)) == ((R, H), dtype, 1), (q.shape, q.dtype)
    assert (tuple(s.shape), s.dtype, s.stride(1)) == ((R, groups), torch.float32, 1), s.shape
    if R:  # (the kernel's N_GROUPS is the scale row stride)
        gpb = min(8, 1 << (groups - 1).bit_length())  # groups per program, a power of two
        _quant_rows_kernel[(R, -(-groups // gpb))](
            x, q, s, H, x.stride(0), q.stride(0), s.stride(0), FP8_MAX=fp8_max(dtype),
            GROUP=BLOCK, GPB=gpb, **fp8_rounding(dtype))
    return FP8Rows(q, s, x.dtype)


def fp8_rounding(dtype: torch.dtype) -> dict:
    """ROUND (the interpreter's cast needs the grid rounding first) and MIN_EXP of ``dtype``."""
    return dict(ROUND=os.environ.get("TRITON_INTERPRET", "0") == "1",
                MIN_EXP=-7 if dtype == torch.float8_e4m3fnuz else -6)


def quantize_rows_on_owner(x_TH: torch.Tensor, dtype: torch.dtype) -> FP8Rows:
    """Rows per 1x128 group before they leave their owner: one Triton launch on GPUs
    (``quantize_rows_triton``), torch elsewhere (the same arithmetic, bit for bit). Every FP8
    dispatch quantises with it."""
    if x_TH.is_cuda:
        return quantize_rows_triton(x_TH, dtype)
    return quantize_rows(x_TH, dtype=dtype)
