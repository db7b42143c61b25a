"""A model's worth of MoE layers: N ``EPMoE`` blocks with a residual between them, every one
borrowing one dispatcher (``rocm_moe.comm.pool``), as the MoE part of a decoder runs.

    h = x;  for each layer: h = h + layer(rms_norm(h))

Capturing the whole stack in one CUDA graph per token bucket is ``GraphedEPMoE(stack, ...)``:
every layer's dispatch, experts and combine in one replay, over one set of comm buffers (the
buffers do not grow with N; ``rocm-moe bench model`` measures the per-layer time of the N-layer
graph against one layer alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rocm_moe._checks import check_integer_value, error_message
from rocm_moe.comm.base import Dispatcher
from rocm_moe.experts.base import Experts
from rocm_moe.layer import EPMoE
from rocm_moe.routing import RouterConfig
from rocm_moe.weighting import WeightMode


class MoEStack(nn.Module):
    """N MoE layers with a pre-norm residual between them (an RMSNorm without weight before each
    layer, as a decoder has: without it the SwiGLU experts square the residual's scale at every
    layer and bf16 overflows within a few layers); ``hidden_size`` and the dispatcher are the
    layers' (they must all share one dispatcher, the point of the stack)."""

    EPS = 1e-6

    def __init__(self, layers: list[EPMoE]):
        super().__init__()
        try:
            layers = list(layers)  # a tuple, a generator, an nn.ModuleList
        except TypeError:
            layers = [layers]
        if not layers or not all(isinstance(la, EPMoE) for la in layers):
            raise TypeError(error_message("layers", [type(la).__name__ for la in layers or []],
                                          "must be a non-empty list of EPMoE",
                                          "build them with MoEStack.build"))
        first = layers[0]
        for i, la in enumerate(layers):
            if any(la is other for other in layers[:i]):
                raise ValueError(error_message(
                    f"layers[{i}]", "the same EPMoE as an earlier entry", "each layer of a "
                    "stack holds its own weights", "build a new EPMoE per layer"))
            if la.dispatcher is not first.dispatcher:
                raise ValueError(error_message(
                    f"layers[{i}].dispatcher", la.dispatcher.name, "every layer of a stack "
                    "borrows layer 0's dispatcher (one comm buffer per model)",
                    "build the layers with one pool.shared_dispatcher"))
            for field in ("hidden_size", "dtype"):
                a, b = getattr(la, field, None), getattr(first, field, None)
                if field == "dtype":
                    a, b = la.gate.weight.dtype, first.gate.weight.dtype
                if a != b:
                    raise ValueError(error_message(
                        f"layers[{i}].{field}", a, f"must be layer 0's {b} (the residual "
                        "stream runs through every layer)", "build the layers from one config"))
        self.layers = nn.ModuleList(layers)
        self.hidden_size = first.hidden_size

    @property
    def dispatcher(self) -> Dispatcher:
        return self.layers[0].dispatcher

    @classmethod
    def build(cls, num_layers: int, *, hidden_size: int, intermediate_size: int,
              router: RouterConfig, dispatcher: Dispatcher, experts: Experts | None = None,
              weight_mode: WeightMode = "experts", dtype: torch.dtype = torch.bfloat16,
              device=None, seed: int = 0, validate: bool = True) -> MoEStack:
        """``num_layers`` layers on one dispatcher; layer j holds synthetic weights of seed
        ``seed + j`` (``EPMoE.reset_parameters``)."""
        check_integer_value("num_layers", num_layers, minimum=1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(error_message("seed", repr(seed), "must be an int",
                                          "pass an int seed"))
        layers = []
        for j in range(num_layers):
            la = EPMoE(hidden_size=hidden_size, intermediate_size=intermediate_size,
                       router=router, dispatcher=dispatcher, experts=experts,
                       weight_mode=weight_mode, dtype=dtype, device=device, validate=validate)
            la.reset_parameters(seed=seed + j)
            layers.append(la)
        return cls(layers)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """The pre-norm every layer reads: RMSNorm over H, no weight."""
        return F.rms_norm(h, (self.hidden_size,), eps=self.EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] or [B, S, H] -> the same shape. The input is checked here, before the first
        norm (which crashed on a wrong H or an integer input, and turned an inf into a NaN that
        layer 0 then reported), with the refusal shared with the peers as a layer shares it."""
        first = self.layers[0]
        first._agree_invariant()  # (layer 0's first collective, as in its own forward)
        with first._refusals_shared():
            first._flatten(x)
        h = x
        for layer in self.layers:
            h = h + layer(self.norm(h))
        return h
