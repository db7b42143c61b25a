"""The experts contract: every expert backend computes the same thing on the same inputs.

Inputs (on one rank, after dispatch):
    x_RH            [R, H] received rows, floating (bf16/fp16/fp32/fp64).
    topk_ids_RK     [R, K] int32 GLOBAL expert ids of each row (-1 = empty slot).
    topk_weights_RK [R, K] float32 routing weights of each row.
    w13             [e, 2I, H] local experts' gate (rows 0..I-1) then up (rows I..2I-1) weights.
    w2              [e, H, I] local experts' down weights.
    expert_map      ExpertMap of this rank: selects the local slots; other slots are skipped.

    num_rows        optional [1] int32 device tensor: only rows r < num_rows[0] hold slots
                    (the rest have every id -1, e.g. a capacity-sized receive buffer, whose row
                    count stays on the device). A backend with ``bounded_rows`` then sizes its
                    work by the rows received, not R, and leaves weighted output rows past the
                    count unwritten (their values are unspecified; raw outputs stay zero there);
                    others compute every row. ``expected_rows``: a host-side estimate of that
                    count (no sync) to pick launch configurations by.

``weight_mode`` (who applies the routing weights, ``rocm_moe.weighting``):
    "experts":  out [R, H] = sum over local slots k of w[r, k] * expert_k(x[r]); the backend
                applied the weights (``weights_applied=True``), as AITER's fused_moe does.
    "combine":  out [R, K, H] = expert_k(x[r]) unweighted for local slots, exact zeros
                elsewhere; ``weights_applied=False``, so the combine stage must apply them.

Backends implement two hooks in terms of the output's form, ``mode``: "weighted" (weight_mode
"experts") or "raw" (weight_mode "combine"): ``supports(mode=...)`` and ``_forward(..., mode)``.
The public call's old ``mode=`` keyword still works and warns (DeprecationWarning).

expert(x) = (silu(x @ gate.T) * (x @ up.T)) @ down.T, accumulated in float32 (float64 for
float64 inputs) and returned in x's dtype.

Expert variants (``ExpertVariant``, passed with every call as ``variant=``; default ``PLAIN``,
the SwiGLU above): biases on both projections (``w13_bias`` [e, 2I], ``w2_bias`` [e, H] come
with the call), the activation (``"silu"``, or gpt-oss's ``"swiglu_oai"``: gate clamped to
<= limit, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate); its checkpoints'
interleaved gate/up columns are de-interleaved by the loader, so w13 stays gate rows then up
rows), and ``weights_on_input`` (Llama 4: slot k computes expert(w[r, k] * x[r]) and is not
weighted again: the weighted form sums the slots, the raw form says
``ExpertsOutput.weighted_inputs=True`` so that ``weighting.weight_once`` only sums it). A
backend states what it runs with ``variant_unsupported_reason``; the base class runs only
``PLAIN``.

    expert(x) = act(x @ w13.T + w13_bias) @ w2.T + w2_bias,  act(h) = act(gate, up)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_id_range,
    check_same_device,
    check_tensor,
    check_unique_rows,
    check_weights,
    error_message,
)
from rocm_moe.placement import ExpertMap, require_expert_map
from rocm_moe.weighting import (  # noqa: F401 (accumulation_dtype: its former home)
    ExpertsOutput,
    WeightMode,
    accumulation_dtype,
    resolve_weight_mode,
)

ExpertsMode = Literal["weighted", "raw"]  # the hooks' output form (see the module docstring)


ACTIVATIONS = ("silu", "swiglu_oai")  # ExpertVariant.activation values


@dataclass(frozen=True, kw_only=True)
class ExpertVariant:
    """What every expert of a layer computes beyond plain SwiGLU (see the module docstring).

    ``activation``: "silu" (silu(gate) * up) or "swiglu_oai" (gpt-oss); ``alpha`` and
    ``limit``: swiglu_oai's sigmoid slope and clamp (``limit=None``: no clamp); ``bias``: both
    projections have a bias; ``weights_on_input``: the routing weight scales the expert's input
    (Llama 4's ``apply_router_weight_on_input``), not its output.

    Worked example (a test asserts it): swiglu_oai with alpha=1, limit=1 on gate=2, up=3 gives
    (1 + 1) * 1 * sigmoid(1) = 1.4621...
    """

    activation: str = "silu"
    alpha: float = 1.0
    limit: float | None = None
    bias: bool = False
    weights_on_input: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, value: object, rule: str, fix: str) -> ValueError:
            return ValueError(error_message(f"ExpertVariant.{field}", repr(value), rule, fix))

        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, f"must be one of {list(ACTIVATIONS)}",
                      "pick one (a model with another activation runs with its own experts)")
        for field in ("bias", "weights_on_input"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(error_message(f"ExpertVariant.{field}", repr(getattr(self, field)),
                                              "must be a bool", "pass True or False"))
        for field in ("alpha", "limit"):
            v = getattr(self, field)
            if v is None and field == "limit":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise bad(field, v, "must be a finite number > 0",
                          "take it from the model config (gpt-oss: swiglu_alpha, swiglu_limit)")
        if self.activation == "silu" and (self.alpha != 1.0 or self.limit is not None):
            raise bad("alpha/limit", (self.alpha, self.limit), "belong to "
                      "activation='swiglu_oai' (silu has neither)",
                      "drop them or set activation='swiglu_oai'")

    @classmethod
    def gpt_oss(cls, alpha: float = 1.702, limit: float | None = 7.0) -> ExpertVariant:
        """gpt-oss's experts: clamped SwiGLU with alpha and limit, biases on both projections."""
        return cls(activation="swiglu_oai", alpha=alpha, limit=limit, bias=True)

    @classmethod
    def llama4(cls) -> ExpertVariant:
        """Llama 4's routed experts: SwiGLU of the routing-weighted input."""
        return cls(weights_on_input=True)


PLAIN = ExpertVariant()  # today's SwiGLU without biases, weighted on the output


def activate(gate: torch.Tensor, up: torch.Tensor, variant: ExpertVariant = PLAIN
             ) -> torch.Tensor:
    """The gated activation of ``variant`` on [N, I] gate and up projections."""
    if variant.activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if variant.limit is not None:
        gate = gate.clamp(max=variant.limit)
        up = up.clamp(min=-variant.limit, max=variant.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * variant.alpha))


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               variant: ExpertVariant = PLAIN, w13_bias: torch.Tensor | None = None,
               w2_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One expert of ``variant`` on rows x [N, H]: w13 [2I, H] (gate then up), w2 [H, I],
    biases [2I] and [H] (or None) -> [N, H]."""
    if variant == PLAIN and w13_bias is None and w2_bias is None:
        return swiglu_expert(x, w13, w2)
    h = x @ w13.T if w13_bias is None else x @ w13.T + w13_bias
    gate, up = h.chunk(2, dim=-1)
    y = activate(gate, up, variant) @ w2.T
    return y if w2_bias is None else y + w2_bias


def check_variant(variant: object, w13_bias: object, w2_bias: object, x_RH: torch.Tensor,
                  w13: torch.Tensor, *, mode: str) -> ExpertVariant:
    """The call's variant and biases: an ExpertVariant (None: PLAIN), biases given exactly when
    ``variant.bias`` ([e, 2I] and [e, H] in x's dtype)."""
    variant = PLAIN if variant is None else variant
    if not isinstance(variant, ExpertVariant):
        raise TypeError(error_message("variant", type(variant).__name__,
                                      "must be an ExpertVariant or None",
                                      "pass ExpertVariant(...) or ExpertVariant.gpt_oss()"))
    e, two_i, H = w13.shape
    for name, b, shape in (("w13_bias", w13_bias, (e, two_i)), ("w2_bias", w2_bias, (e, H))):
        if variant.bias:
            check_tensor(name, b, shape=shape, dtypes=(x_RH.dtype,),
                         fix=f"{name} is {list(shape)} in x's dtype ({x_RH.dtype})")
            check_same_device({"x": x_RH, name: b})
        elif b is not None:
            raise ValueError(error_message(name, "a tensor", "variant.bias is False",
                                           "drop the biases or pass a variant with bias=True"))
    del mode  # (every form runs every variant: raw slots of weighted inputs say so)
    return variant


def expert_biases(variant: ExpertVariant, num_local: int, hidden_size: int,
                  intermediate_size: int, *, dtype, device) -> tuple:
    """A layer's (w13_bias [e, 2I], w2_bias [e, H]) parameters, zeros, for a variant with
    biases; (None, None) otherwise."""
    if not variant.bias:
        return None, None
    kw = dict(dtype=dtype, device=device)
    return (torch.nn.Parameter(torch.zeros(num_local, 2 * intermediate_size, **kw)),
            torch.nn.Parameter(torch.zeros(num_local, hidden_size, **kw)))


def variant_kwargs(variant: ExpertVariant, w13_bias, w2_bias) -> dict:
    """The experts call's variant keywords: none for PLAIN (every backend takes that call)."""
    if variant == PLAIN:
        return {}
    return dict(variant=variant, w13_bias=w13_bias, w2_bias=w2_bias)


def variant_refusal(experts: Experts, variant: ExpertVariant, weight_mode: str) -> str | None:
    """Why ``experts`` cannot run ``variant`` in ``weight_mode`` ("experts" or "combine"),
    or None: checked by the layer before any collective."""
    del weight_mode  # (both weight modes run every variant the backend runs)
    return experts.variant_unsupported_reason(variant)


def output_form(weight_mode: WeightMode) -> ExpertsMode:
    """The experts' output form for a weight mode: "weighted" [R, H] or "raw" [R, K, H]."""
    return "weighted" if weight_mode == "experts" else "raw"


def check_expert_inputs(
    x_RH: torch.Tensor,
    topk_ids_RK: torch.Tensor,
    topk_weights_RK: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_map: ExpertMap,
    *,
    mode: str,
    validate: bool = True,
) -> None:
    """Shape, dtype and value checks of the experts contract (see the module docstring)."""
    require_expert_map("expert_map", expert_map)
    if mode not in ("weighted", "raw"):
        raise ValueError(error_message("mode", repr(mode), "must be 'weighted' or 'raw' (the "
                                       "output form)", "pass weight_mode='experts' or 'combine'"))
    check_tensor("x", x_RH, shape=(None, None), dtypes=FLOAT_DTYPES)
    H = x_RH.shape[1]
    e = expert_map.num_local
    check_tensor("w13", w13, shape=(e, None, H), dtypes=(x_RH.dtype,),
                 fix=f"w13 is [e={e}, 2I, H={H}] in x's dtype ({x_RH.dtype})")
    if w13.shape[1] % 2:
        raise ValueError(error_message("w13.shape[1]", w13.shape[1], "must be 2I (gate then up)",
                                       "stack gate and up along dim 1"))
    check_tensor("w2", w2, shape=(e, H, w13.shape[1] // 2), dtypes=(x_RH.dtype,),
                 fix=f"w2 is [e={e}, H={H}, I={w13.shape[1] // 2}] in x's dtype")
    check_routing_inputs(x_RH, topk_ids_RK, topk_weights_RK, expert_map,
                         weights={"w13": w13, "w2": w2}, validate=validate)


def check_routing_inputs(x_RH: torch.Tensor, topk_ids_RK: torch.Tensor,
                         topk_weights_RK: torch.Tensor, expert_map: ExpertMap, *,
                         weights: dict[str, torch.Tensor], validate: bool) -> None:
    """The routing half of every experts contract (dense, FP8, MXFP4): [R, K] int32 ids and
    [R, K] float32 weights for x's R rows, all on the device of x and of ``weights`` (name ->
    the weights' storage tensor); with ``validate``, ids in range or -1, no id twice in a row,
    finite weights."""
    R = x_RH.shape[0]
    check_tensor("topk_ids", topk_ids_RK, shape=(R, None), dtypes=(torch.int32,),
                 fix="pass int32 global ids (topk_ids.to(torch.int32) after a range check)")
    K = topk_ids_RK.shape[1]
    check_tensor("topk_weights", topk_weights_RK, shape=(R, K), dtypes=(torch.float32,),
                 fix="pass float32 weights (topk_weights.float())")
    check_same_device({"x": x_RH, "topk_ids": topk_ids_RK, "topk_weights": topk_weights_RK,
                       **weights})
    if validate:
        check_id_range("topk_ids", topk_ids_RK, expert_map.num_experts, allow_minus_one=True)
        check_unique_rows("topk_ids", topk_ids_RK)  # a repeat would drop one slot's output
        check_weights("topk_weights", topk_weights_RK)


def check_row_bound(num_rows: object, expected_rows: object, topk_ids_RK: torch.Tensor, *,
                    validate: bool) -> None:
    """``num_rows``: None or a [1] int32 tensor on the ids' device; with ``validate`` (one host
    read) its value lies in [0, R] and every row past it is empty (all ids -1).
    ``expected_rows``: None or an int in [0, R]."""
    R = topk_ids_RK.shape[0]
    if expected_rows is not None and (isinstance(expected_rows, bool)
                                      or not isinstance(expected_rows, int)
                                      or not 0 <= expected_rows <= R):
        raise ValueError(error_message(
            "expected_rows", repr(expected_rows), f"must be None or an int in [0, R={R}]",
            "pass the host's estimate of the rows received, or None"))
    if num_rows is None:
        return
    check_tensor("num_rows", num_rows, shape=(1,), dtypes=(torch.int32,),
                 fix="pass the dispatch's [1] int32 device row count (DispatchResult.num_valid)")
    check_same_device({"topk_ids": topk_ids_RK, "num_rows": num_rows})
    if validate:
        n = int(num_rows[0])
        if not 0 <= n <= R:
            raise ValueError(error_message("num_rows[0]", n, f"must lie in [0, R={R}]",
                                           "pass the number of rows received"))
        if bool((topk_ids_RK[n:] != -1).any()):
            raise ValueError(error_message(
                "topk_ids[num_rows:]", f"rows past num_rows={n} hold expert ids",
                "rows past num_rows must be empty (every id -1)",
                "pass the row count the dispatch left, or num_rows=None"))


class Experts(ABC):
    """An expert backend. Stateless: weights and the expert map come with every call."""

    name: ClassVar[str]
    bounded_rows: ClassVar[bool] = False  # _forward takes num_rows / expected_rows
    weight_formats: ClassVar[tuple[str, ...]] = ("dense",)  # the formats it computes (formats/)

    @classmethod
    def availability(cls) -> str | None:
        """None if this backend can run in this process, else why not (a missing library or
        device); ``supports`` then judges each call (mode, dtype, device)."""
        return None

    def supports(
        self, *, mode: ExpertsMode, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        """None if this backend can run the call, else the reason it cannot."""
        return None

    def for_weight_format(self, name: str) -> Experts | None:
        """This backend's kernel for expert weights of format ``name`` (``rocm_moe.formats``):
        itself where it computes them (``weight_formats``), the backend of the same name for
        that format ("block_fp8": reference, triton, aiter; "mxfp4": reference, triton), else
        None (the layer refuses by name)."""
        if name in self.weight_formats:
            return self
        if name == "block_fp8":
            from rocm_moe.experts.fp8 import fp8_sibling

            return fp8_sibling(self)
        if name == "mxfp4":
            from rocm_moe.experts.mxfp4 import mxfp4_sibling

            return mxfp4_sibling(self)
        return None

    def variant_unsupported_reason(self, variant: ExpertVariant) -> str | None:
        """None if this backend computes ``variant`` (biases, activation, weights on the input),
        else why not. The base class runs only ``PLAIN``; a backend that runs more says so."""
        if variant == PLAIN:
            return None
        return (f"the {self.name} experts run only plain SwiGLU (silu, no biases, weights on the"
                f" output), not {variant}; use experts='reference'")

    def invariant_unsupported_reason(self) -> str | None:
        """None if ``as_invariant`` gives a batch-invariant variant of this backend (each
        slot's output the same bits whatever the batch, its size and the slot's position in
        it; ``rocm_moe.invariant``), else why not."""
        return f"the {self.name} experts have no batch-invariant variant"

    def as_invariant(self) -> Experts:
        """This backend with fixed reduction orders and launch configurations (for
        ``EPMoE(invariant=True)``); raises ValueError with the reason where it has none."""
        raise ValueError(error_message(
            "experts", self.name, "cannot run invariant=True: "
            + (self.invariant_unsupported_reason() or "no invariant variant"),
            "use experts='reference' or 'triton', or invariant=False"))

    def __call__(
        self,
        x_RH: torch.Tensor,
        topk_ids_RK: torch.Tensor,
        topk_weights_RK: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        expert_map: ExpertMap,
        *,
        weight_mode: WeightMode | None = None,
        validate: bool = True,
        mode: ExpertsMode | None = None,
        num_rows: torch.Tensor | None = None,
        expected_rows: int | None = None,
        variant: ExpertVariant | None = None,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
    ) -> ExpertsOutput:
        """ExpertsOutput of the local slots of ``x_RH``'s rows (see the module docstring);
        ``mode``: deprecated spelling of ``weight_mode`` ("weighted" or "raw"); ``variant``
        (default PLAIN) with its biases ``w13_bias`` [e, 2I] and ``w2_bias`` [e, H]."""
        mode = output_form(resolve_weight_mode(weight_mode, mode))
        self._check_inputs(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, mode=mode,
                           validate=validate)
        check_row_bound(num_rows, expected_rows, topk_ids_RK, validate=validate)
        variant = check_variant(variant, w13_bias, w2_bias, x_RH, w13, mode=mode)
        reason = self.supports(mode=mode, dtype=x_RH.dtype, device=x_RH.device)
        if reason is not None:
            raise ValueError(error_message(f"experts={self.name}, mode", repr(mode),
                                           f"unsupported: {reason}", "pick another backend"))
        if (reason := self.variant_unsupported_reason(variant)) is not None:
            raise ValueError(error_message(f"experts={self.name}, variant", variant,
                                           f"unsupported: {reason}", "pick another backend"))
        rows = dict(num_rows=num_rows, expected_rows=expected_rows) if self.bounded_rows else {}
        rows.update(variant_kwargs(variant, w13_bias, w2_bias))
        out = self._forward(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, mode=mode,
                            **rows)
        R, K = topk_ids_RK.shape
        want = (R, x_RH.shape[1]) if out.weights_applied else (R, K, x_RH.shape[1])
        assert tuple(out.out.shape) == want, (self.name, tuple(out.out.shape), want)
        assert out.weights_applied == (mode == "weighted"), (self.name, mode)
        assert out.weights_applied or out.weighted_inputs == variant.weights_on_input, self.name
        return out

    def _check_inputs(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode,
                      validate: bool) -> None:
        """The contract's input checks for this backend's weights (dense: ``check_expert_inputs``;
        a quantised format's backend checks its own weight objects)."""
        check_expert_inputs(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, mode=mode,
                            validate=validate)

    @abstractmethod
    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode):
        ...


def swiglu_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on rows x [N, H]: w13 [2I, H] (gate then up), w2 [H, I] -> [N, H]."""
    gate, up = (x @ w13.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w2.T
