"""The weight-format protocol: one rank's routed experts held in one format.

A format is one axis of the layer (``EPMoE(weight_format=...)``), not a copy of it. Every
format holds the same two projections of the e local experts (shape legend: e local experts,
H hidden, I intermediate):

    w13     [e, 2I, H]  gate rows (0..I-1) then up rows (I..2I-1)
    w2      [e, H, I]   down

each in its own encoding (``formats.dense``: a float tensor; ``formats.block_fp8``: FP8 with
one float32 scale per 128x128 block; ``formats.mxfp4``: 4-bit E2M1 with one E8M0 scale per 32
values). A format class answers, for its layer and its experts backends:

    quantize(w13, w2, **options)      float weights -> this format (its quantiser)
    from_checkpoint(ck, experts, ...) this rank's experts read from a checkpoint (its reader)
    in_checkpoint(ck, expert)         whether a checkpoint holds an expert in this format
    footprint(e, H, I, ...)           bytes of e experts, before any is built
    nbytes                            bytes of the weights held (every tensor, scales included)
    dequantize(dtype)                 (w13, w2) as float tensors: the reference's weights
    supports(experts)                 None if the experts backend computes this format, else
                                      the reason (backends list ``weight_formats``)
    expert_args()                     (w13, w2) as the experts backend takes them
    tensors() / from_tensors(...)     the named tensors a layer registers (and rebuilds from)

Worked example (a test asserts it): ``DenseWeights.quantize(torch.ones(2, 4, 3),
torch.ones(2, 3, 2)).nbytes`` is 4 * (24 + 12) = 144 bytes (float32), and its ``supports`` of
the reference experts is None.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch

from rocm_moe._checks import describe, error_message


class CheckpointReader(Protocol):
    """What a format's checkpoint hook reads through (``integrations.hf.Checkpoint``):
    ``has(name)`` and ``tensor(name, shape)`` (``shape``: None per free dimension; the reader
    checks the tensor against it and refuses non-finite or non-floating values)."""

    def has(self, name: str) -> bool: ...

    def tensor(self, name: str, shape: tuple | None = None) -> torch.Tensor: ...


class WeightFormat(ABC):
    """One rank's routed experts in one format (see the module docstring).

    Subclasses set ``name`` (what backends list in ``weight_formats`` and the layer's
    ``weight_format`` names), ``tensor_names`` (the tensors a layer registers, in the order of
    ``tensors()``) and ``trainable`` (dense float weights are parameters; quantised ones are
    buffers a dtype cast must not touch). An instance holds ``w13`` [e, 2I, H] and ``w2``
    [e, H, I]: tensors, or the format's weight objects (with a ``shape``), as its experts
    backends take them."""

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]
    trainable: ClassVar[bool] = False
    w13: Any
    w2: Any

    # ---- the format's hooks (class level: no weights yet) ---------------------------------
    @classmethod
    @abstractmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor, **options: Any) -> WeightFormat:
        """Float weights [e, 2I, H] / [e, H, I] -> this format (``options``: the format's,
        e.g. block_fp8's ``fp8_dtype``)."""

    @classmethod
    def check_options(cls, **options: Any) -> dict:
        """The format's options, checked and normalised (TypeError/ValueError naming the one
        that is wrong); the base class takes none."""
        if options:
            raise TypeError(error_message(
                "format_options", sorted(options), f"the {cls.name} format takes no options",
                "leave format_options out"))
        return {}

    @classmethod
    def in_checkpoint(cls, ck: CheckpointReader, expert: Any) -> bool:
        """The checkpoint holds ``expert`` (its tensor names, ``families.ExpertTensors``) in
        this format."""
        return False

    @classmethod
    def from_checkpoint(cls, ck: CheckpointReader, experts: Sequence[Any], *, hidden_size: int,
                        intermediate_size: int, **options: Any) -> WeightFormat:
        """This rank's experts (``experts``: each one's tensor names, in local order) read from
        a checkpoint, kept in this format (never dequantised)."""
        raise ValueError(error_message(
            "weight_format", cls.name, "has no checkpoint reader",
            "load the weights as float tensors and quantise them (quantize)"))

    @classmethod
    @abstractmethod
    def footprint(cls, num_local: int, hidden_size: int, intermediate_size: int,
                  **options: Any) -> int:
        """Bytes of ``num_local`` experts of [2I, H] and [H, I] in this format."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], **options: Any) -> WeightFormat:
        """The weights from the named tensors ``tensors()`` gave (a layer's registered ones)."""

    @classmethod
    def empty(cls, num_local: int, hidden_size: int, intermediate_size: int, *,
              dtype: torch.dtype, device: torch.device | str | None = None,
              **options: Any) -> WeightFormat:
        """Zero experts in this format (``dtype``: the compute dtype they are quantised from)."""
        kw = dict(dtype=dtype, device=device)
        return cls.quantize(torch.zeros(num_local, 2 * intermediate_size, hidden_size, **kw),
                            torch.zeros(num_local, hidden_size, intermediate_size, **kw),
                            **options)

    # ---- the weights held -----------------------------------------------------------------
    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors that hold the weights (keys: ``tensor_names``)."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [e, 2I, H], w2 [e, H, I]) in ``dtype`` (float64 default: the exact values)."""

    def expert_args(self) -> tuple:
        """(w13, w2) as this format's experts backends take them."""
        return self.w13, self.w2

    def shape(self) -> tuple[int, int, int]:
        """(e, H, I) of the weights held."""
        e, two_i, H = self.w13.shape
        return e, H, two_i // 2

    def options(self) -> dict:
        """The options ``quantize`` needs to write more weights like these."""
        return {}

    @property
    def num_local(self) -> int:
        return self.shape()[0]

    @property
    def hidden_size(self) -> int:
        return self.shape()[1]

    @property
    def intermediate_size(self) -> int:
        return self.shape()[2]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (weights and scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def select(self, idx) -> WeightFormat:
        """The experts ``idx`` (an int list or index tensor along dim 0), in this format."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        return type(self).from_tensors({n: t[idx] for n, t in self.tensors().items()},
                                       **self.options())

    def to(self, device: torch.device | str) -> WeightFormat:
        return type(self).from_tensors({n: t.to(device) for n, t in self.tensors().items()},
                                       **self.options())

    def check_values(self, field: str = "weights") -> None:
        """Value checks where weights enter (a load, a checkpoint): one host read; the base
        class has none."""
        del field

    def supports(self, experts: object) -> str | None:
        """None if ``experts`` (an experts backend) computes this format, else why not: a
        backend lists the formats it computes in ``weight_formats`` (default ``("dense",)``)
        and may refuse one case with ``weight_format_unsupported_reason(weights)``."""
        if not callable(experts):
            return f"{describe(experts)} is not an experts backend"
        computes = tuple(getattr(experts, "weight_formats", ("dense",)))
        name = getattr(experts, "name", type(experts).__name__)
        if self.name not in computes:
            return (f"the {name} experts ({type(experts).__name__}) compute {list(computes)} "
                    f"weights, not {self.name}")
        hook = getattr(experts, "weight_format_unsupported_reason", None)
        return hook(self) if hook is not None else None

    def __repr__(self) -> str:
        e, H, I = self.shape()
        return f"{type(self).__name__}(e={e}, H={H}, I={I}, nbytes={self.nbytes})"


# name -> "module:Class"; loaded on first use, so a format module that is absent (or being
# written) never breaks the others
FORMATS: dict[str, str] = {
    "dense": "rocm_moe.formats.dense:DenseWeights",
    "block_fp8": "rocm_moe.formats.block_fp8:BlockFP8Weights",
    "mxfp4": "rocm_moe.formats.mxfp4:MXFP4Weights",
}


def format_class(weight_format: str | type[WeightFormat]) -> type[WeightFormat]:
    """A format's class by name (``FORMATS``) or the class itself, checked."""
    if isinstance(weight_format, type) and issubclass(weight_format, WeightFormat):
        return weight_format
    if not isinstance(weight_format, str) or weight_format not in FORMATS:
        raise ValueError(error_message(
            "weight_format", repr(weight_format), f"must be one of {list(FORMATS)} or a "
            "rocm_moe.formats.WeightFormat subclass", "pass weight_format='dense' or 'block_fp8'"))
    module, cls = FORMATS[weight_format].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(error_message(
            "weight_format", repr(weight_format), f"is not available in this build ({exc})",
            "update rocm_moe, or pick another format")) from exc


def check_expert_shapes(w13: object, w2: object, *, fix: str) -> tuple[int, int, int]:
    """(e, H, I) of float-shaped w13 [e, 2I, H] / w2 [e, H, I] (any tensor-like with
    ``shape``), else ValueError/TypeError naming the one that is wrong."""
    for field, w in (("w13", w13), ("w2", w2)):
        if not hasattr(w, "shape"):
            raise TypeError(error_message(field, describe(w), "must be a tensor of the "
                                          "experts' weights", fix))
        if len(w.shape) != 3:
            raise ValueError(error_message(f"{field}.shape", list(w.shape),
                                           "must be 3-D [e, N, K]",
                                           "stack the experts along dim 0"))
    e, two_i, H = w13.shape
    if two_i % 2:
        raise ValueError(error_message("w13.shape[1]", two_i, "must be 2I (gate then up rows)",
                                       "stack gate and up along dim 1"))
    if tuple(w2.shape) != (e, H, two_i // 2):
        raise ValueError(error_message("w2.shape", list(w2.shape),
                                       f"must be [e={e}, H={H}, I={two_i // 2}] (w13's)",
                                       "pass the down weights of the same experts"))
    return e, H, two_i // 2


def check_format_options(cls: type[WeightFormat], options: object) -> dict:
    """``format_options`` of a layer for format ``cls``: a dict of the options its
    ``check_options`` takes (an unknown one is named with the ones it knows), checked."""
    import inspect

    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(error_message("format_options", describe(options),
                                      "must be a dict or None", "pass e.g. {'fp8_dtype': "
                                      "'e4m3fnuz'} for block_fp8, or leave it out"))
    known = [n for n, p in inspect.signature(cls.check_options).parameters.items()
             if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown and known:
        raise TypeError(error_message(
            "format_options", unknown, f"the {cls.name} format takes {known}",
            "drop the others"))
    return cls.check_options(**options)
