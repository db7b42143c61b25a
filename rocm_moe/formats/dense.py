"""Dense expert weights: float tensors in the compute dtype (bfloat16, float16, float32, float64).

    w13     [e, 2I, H]  gate rows then up rows
    w2      [e, H, I]

The format every experts backend computes by default (``Experts.weight_formats``); its
"quantiser" is a checked cast, its checkpoint reader takes each expert's gate / up / down
projections as stored (no scales), and a float8 tensor without scales is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rocm_moe._checks import FLOAT_DTYPES, check_finite, check_tensor, error_message
from rocm_moe.formats.base import CheckpointReader, WeightFormat, check_expert_shapes


def _dtype_option(dtype: object) -> torch.dtype | None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(error_message("format_options['dtype']", repr(dtype),
                                      f"must be None or one of {list(FLOAT_DTYPES)}",
                                      "pass torch.bfloat16 (or leave it out: the input's)"))
    return dtype


class DenseWeights(WeightFormat):
    """Float expert weights ``w13`` [e, 2I, H] / ``w2`` [e, H, I] of one floating dtype."""

    name = "dense"
    tensor_names = ("w13", "w2")
    trainable = True

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        check_expert_shapes(w13, w2, fix="pass float [e, 2I, H] and [e, H, I] tensors")
        check_tensor("w13", w13, dtypes=FLOAT_DTYPES,
                     fix="pass float weights (quantised ones belong to their own format)")
        check_tensor("w2", w2, dtypes=(w13.dtype,), fix=f"pass w2 in w13's dtype {w13.dtype}")
        if w13.device != w2.device:
            raise ValueError(error_message("w2.device", w2.device,
                                           f"must be w13's device {w13.device}",
                                           "move both to one device"))
        self.w13, self.w2 = w13, w2

    @classmethod
    def check_options(cls, *, dtype: torch.dtype | None = None) -> dict:
        """``dtype``: the weights' float dtype (None: as given)."""
        return {} if dtype is None else {"dtype": _dtype_option(dtype)}

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor, *,
                 dtype: torch.dtype | None = None) -> DenseWeights:
        """The float weights themselves, cast to ``dtype`` if given (on purpose: the caller
        named it); integer or float8 tensors are refused, never cast."""
        for field, w in (("w13", w13), ("w2", w2)):
            check_tensor(field, w, dtypes=FLOAT_DTYPES,
                         fix=f"pass float weights (convert on purpose with {field}.float())")
        dtype = _dtype_option(dtype)
        if dtype is not None:
            w13, w2 = w13.to(dtype), w2.to(dtype)
        return cls(w13, w2)

    @classmethod
    def footprint(cls, num_local: int, hidden_size: int, intermediate_size: int, *,
                  dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of ``num_local`` float experts: 3 * H * I values each."""
        _dtype_option(dtype)
        return num_local * 3 * hidden_size * intermediate_size * dtype.itemsize

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], **options: Any) -> DenseWeights:
        return cls(tensors["w13"], tensors["w2"])

    @classmethod
    def in_checkpoint(cls, ck: CheckpointReader, expert: Any) -> bool:
        """An expert stored as float gate / up / down projections without block scales."""
        return ck.has(expert.gate) and not ck.has(expert.gate + "_scale_inv")

    @classmethod
    def from_checkpoint(cls, ck: CheckpointReader, experts: Sequence[Any], *, hidden_size: int,
                        intermediate_size: int, dtype: torch.dtype | None = None
                        ) -> DenseWeights:
        """Each expert's gate [I, H], up [I, H], down [H, I] (``experts``: their names),
        stacked to [e, 2I, H] / [e, H, I]; float8 tensors without scales are refused."""
        H, I = hidden_size, intermediate_size
        w13, w2 = [], []
        for names in experts:
            parts = [ck.tensor(names.gate, (I, H)), ck.tensor(names.up, (I, H)),
                     ck.tensor(names.down, (H, I))]
            for n, t in zip((names.gate, names.up, names.down), parts, strict=True):
                if t.dtype not in FLOAT_DTYPES:
                    raise ValueError(error_message(
                        f"{n}.dtype", t.dtype, "a dense expert is float (a float8 weight needs "
                        f"its block scales {n}_scale_inv beside it)",
                        "read it with the block_fp8 format, or download the checkpoint again"))
            w13.append(torch.cat(parts[:2]))
            w2.append(parts[2])
        if not w13:
            return cls.empty(0, H, I, dtype=dtype or torch.float32)
        return cls.quantize(torch.stack(w13), torch.stack(w2), dtype=dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w13": self.w13, "w2": self.w2}

    @property
    def dtype(self) -> torch.dtype:
        return self.w13.dtype

    def dequantize(self, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13.to(dtype), self.w2.to(dtype)

    def check_values(self, field: str = "weights") -> None:
        for name, w in (("w13", self.w13), ("w2", self.w2)):
            check_finite(f"{field}.{name}", w, "load the experts' weights again")
