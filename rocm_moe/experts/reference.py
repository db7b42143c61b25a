"""Pure-torch reference experts and the dense float64 oracle every backend is judged against.

``ReferenceExperts`` implements the experts contract (``experts/base.py``) with one small GEMM
pair per local expert, driven by the expert -> row tables of ``layout.build_layout``; it never
loops over tokens; its weighted mode weights the raw outputs with ``weighting.weight_once``.
``dense_moe_reference`` is an independent oracle: it sends every token through each of its K
experts straight from the global ids, in float64 (it weights them on its own, on purpose).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rocm_moe import invariant as inv
from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_id_range,
    check_integer,
    check_tensor,
    error_message,
)
from rocm_moe.experts.base import PLAIN, Experts, ExpertVariant, expert_mlp, swiglu_expert
from rocm_moe.experts.layout import build_layout
from rocm_moe.weighting import (
    ExpertsOutput,
    accumulation_dtype,
    weight_inputs,
    weight_once,
)


class ReferenceExperts(Experts):
    """Readable, exact, slow: the expert stage every fast backend is compared with.

    ``invariant=True``: each slot's output through ``invariant.swiglu`` (fixed-order GEMMs,
    intermediate rounded to x's dtype), the same bits whichever rows share its expert.

    Runs every ``ExpertVariant`` (biases, swiglu_oai, weights on the input), not invariantly."""

    name = "reference"

    def __init__(self, *, invariant: bool = False):
        check_bool("invariant", invariant)
        self.invariant = invariant

    def invariant_unsupported_reason(self) -> str | None:
        return None

    def as_invariant(self) -> ReferenceExperts:
        return ReferenceExperts(invariant=True)

    def variant_unsupported_reason(self, variant: ExpertVariant) -> str | None:
        if self.invariant and variant != PLAIN:
            return "the invariant reference experts run only plain SwiGLU"
        return None

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode,
                 variant: ExpertVariant = PLAIN, w13_bias=None, w2_bias=None):
        layout = build_layout(topk_ids_RK, expert_map, validate=False)
        acc = accumulation_dtype(x_RH.dtype)
        R, K = topk_ids_RK.shape
        raw_RKH = x_RH.new_zeros(R, K, x_RH.shape[1], dtype=acc)
        for j, n in enumerate(layout.tokens_per_expert.tolist()):
            if n == 0:
                continue
            rows = layout.expert_token_table[j, :n].long()
            slots = layout.expert_slot_table[j, :n].long()
            if self.invariant:  # fixed-order GEMMs: a row's bits do not depend on n
                y = inv.swiglu(x_RH[rows], w13[j], w2[j]).to(acc)
            elif variant == PLAIN:
                y = swiglu_expert(x_RH[rows].to(acc), w13[j].to(acc), w2[j].to(acc))
            else:
                x = x_RH[rows]
                if variant.weights_on_input:  # in x's dtype, as the model scales its input
                    x = weight_inputs(x, topk_weights_RK[rows, slots])
                y = expert_mlp(x.to(acc), w13[j].to(acc), w2[j].to(acc), variant,
                               None if w13_bias is None else w13_bias[j].to(acc),
                               None if w2_bias is None else w2_bias[j].to(acc))
            raw_RKH[rows, slots] = y
        raw = ExpertsOutput(out=raw_RKH, weights_applied=False,
                            weighted_inputs=variant.weights_on_input)
        if mode == "weighted":  # weighted once by the weighting module, still in acc's dtype
            y_RH = weight_once(raw, topk_weights_RK, topk_ids_RK, expert_map)
            return ExpertsOutput(out=y_RH.to(x_RH.dtype), weights_applied=True)
        return ExpertsOutput(out=raw_RKH.to(x_RH.dtype), weights_applied=False,
                             weighted_inputs=variant.weights_on_input)


def dense_moe_reference(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w13_E: torch.Tensor | None = None,
    w2_E: torch.Tensor | None = None,
    *,
    expert_weights: Callable[[int], tuple[torch.Tensor, ...]] | None = None,
    variant: ExpertVariant = PLAIN,
    w13_bias_E: torch.Tensor | None = None,
    w2_bias_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 oracle over ALL experts: returns (y [T, H], raw [T, K, H]) in float64.

    y[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t]); slots with id -1 contribute nothing.
    Expert weights come from ``w13_E`` [E, 2I, H] and ``w2_E`` [E, H, I] holding every global
    expert (biases ``w13_bias_E`` [E, 2I], ``w2_bias_E`` [E, H] for a ``variant`` with bias),
    or from ``expert_weights(g) -> (w13 [2I, H], w2 [H, I])``, with ``(w13_bias [2I], w2_bias
    [H])`` appended for a variant with bias (nothing materialised). With
    ``variant.weights_on_input``, raw[t, k] = expert(w[t, k] * x[t]) and y[t] = sum_k raw[t, k].
    """
    check_tensor("x", x_TH, shape=(None, None), dtypes=FLOAT_DTYPES)
    check_tensor("topk_ids", topk_ids_TK, shape=(x_TH.shape[0], None))
    check_integer("topk_ids", topk_ids_TK)
    check_tensor("topk_weights", topk_weights_TK, shape=tuple(topk_ids_TK.shape),
                 dtypes=FLOAT_DTYPES, fix="pass one weight per slot, [T, K] like topk_ids")
    if expert_weights is None:
        if not isinstance(w13_E, torch.Tensor) or not isinstance(w2_E, torch.Tensor):
            raise TypeError(error_message("w13_E / w2_E", (type(w13_E).__name__,
                                                           type(w2_E).__name__),
                                          "must be the [E, 2I, H] / [E, H, I] weights of every "
                                          "global expert", "pass both, or expert_weights="))
        check_id_range("topk_ids", topk_ids_TK, w13_E.shape[0], allow_minus_one=True)

        def expert_weights(g: int):
            if variant.bias:
                return w13_E[g], w2_E[g], w13_bias_E[g], w2_bias_E[g]
            return w13_E[g], w2_E[g]

    else:
        check_id_range("topk_ids", topk_ids_TK, 2**31 - 1, allow_minus_one=True)
    T, K = topk_ids_TK.shape
    x = x_TH.double()
    w_TK = topk_weights_TK.double().to(x.device)
    raw = x.new_zeros(T, K, x.shape[1])
    ids = topk_ids_TK.long()
    for g in ids.unique().tolist():
        if g < 0:
            continue
        t, k = torch.where(ids == g)
        w = [p.to(x.device).double() for p in expert_weights(g)]
        xin = x[t] * w_TK[t, k, None] if variant.weights_on_input else x[t]
        if variant == PLAIN:
            raw[t, k] = swiglu_expert(xin, *w)
        else:
            raw[t, k] = expert_mlp(xin, *w[:2], variant, *w[2:])
    y = raw.sum(dim=1) if variant.weights_on_input else (raw * w_TK.unsqueeze(-1)).sum(dim=1)
    return y, raw
