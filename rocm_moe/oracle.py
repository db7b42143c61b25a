"""Independent float64 references of every stage, for ``diagnose`` and ``sanity``.

Nothing here calls the code it judges: no ``routing.route``, no ``build_layout``, no expert
backend, no ``weighting.weight_once``, no ``Placement.owner``. Each function is written again,
densely and in float64, from the definitions (a test patches the checked functions to raise and
runs these, and compares ``reference_route`` with the families' published rules):

- ``reference_route``: the router of each family from hidden states and the gate weight:
  softmax top-k (Qwen2/3-MoE with or without ``norm_topk_prob``, Mixtral always normalised),
  DeepSeek-V3's grouped sigmoid (the correction bias chooses, never weighs; then
  ``routed_scaling_factor``), and scoring after the top-k of the logits (gpt-oss: softmax over
  the K chosen; Llama 4: sigmoid of each), with the gate's own bias in the logits (gpt-oss).
- ``dense_experts``: every (row, slot) whose expert a rank holds through that expert's SwiGLU
  (or the expert variant's MLP: biases, gpt-oss's clamped SwiGLU, the routing weight on the
  input), straight from the global ids (no layout, no local ids).
- ``dense_shared``: the shared experts (optionally gated) of a layer.

Worked example (a test asserts it): gate rows [[0, 0], [0, 0], [ln 2, 0]] and a token [1, 0]
give logits [0, 0, ln 2]; softmax top-1 without normalisation chooses expert 2 with weight 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True, eq=False)
class ReferenceRouting:
    """The independent router's result for T tokens, in float64.

    ``choice_TE``: the scores that pick the experts (bias included, groups not kept = -inf);
    ``scores_TE``: the scores the weights are taken from; ``topk_ids`` [T, K] int64 by
    decreasing choice; ``topk_weights`` [T, K] float64; ``gap_T``: each token's margin between
    its K-th and (K+1)-th choice (and between its last kept and first dropped group), where a
    different but equally right top-k can come from rounding.
    """

    choice_TE: torch.Tensor
    scores_TE: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    gap_T: torch.Tensor
    scoring: str
    norm_topk_prob: bool
    routed_scaling_factor: float

    def weights_at(self, ids_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] float64: the weights this router gives the experts ``ids_TK`` (any order)."""
        return _weights_at(self.scores_TE, ids_TK, scoring=self.scoring,
                           norm_topk_prob=self.norm_topk_prob,
                           routed_scaling_factor=self.routed_scaling_factor)


def _weights_at(scores_TE, ids_TK, *, scoring: str, norm_topk_prob: bool,
                routed_scaling_factor: float) -> torch.Tensor:
    """The scores of the chosen experts (never the bias), normalised if asked, then scaled
    (after-top-k scorings: ``scores_TE`` holds the logits, scored at the chosen ids)."""
    w = torch.gather(scores_TE, 1, ids_TK.long().cpu())
    if scoring == "after_topk_softmax":
        e = torch.exp(w - w.max(dim=1, keepdim=True).values)
        return e / e.sum(dim=1, keepdim=True) * routed_scaling_factor
    if scoring == "after_topk_sigmoid":
        w, scoring = 1.0 / (1.0 + torch.exp(-w)), "sigmoid"
    if norm_topk_prob:
        w = w / (w.sum(1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    return w * routed_scaling_factor


def _top(values_TN: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the n largest entries of each row (descending) and the row's gap after them."""
    order = torch.argsort(values_TN, dim=1, descending=True)
    ranked = torch.gather(values_TN, 1, order)
    if n < values_TN.shape[1]:
        gap = ranked[:, n - 1] - ranked[:, n]
    else:
        gap = torch.full_like(ranked[:, 0], math.inf)
    return order[:, :n], gap


def _route_after_topk(logits: torch.Tensor, config, bias_E) -> ReferenceRouting:
    """Choose the top-k logits (plus the choice bias, if any), then score only those: softmax
    over the K chosen (gpt-oss) or the sigmoid of each (Llama 4), then the scaling factor."""
    choice = logits + (0.0 if bias_E is None else bias_E.detach().double().cpu()[None])
    ids, gap = _top(choice, config.top_k)
    chosen = torch.gather(logits, 1, ids)
    if config.scoring == "softmax":
        e = torch.exp(chosen - chosen.max(dim=1, keepdim=True).values)
        w = e / e.sum(dim=1, keepdim=True)
    else:
        w = 1.0 / (1.0 + torch.exp(-chosen))
        if config.norm_topk_prob:
            w = w / (w.sum(1, keepdim=True) + 1e-20)
    f = float(config.routed_scaling_factor)
    return ReferenceRouting(choice_TE=choice, scores_TE=logits, topk_ids=ids,
                            topk_weights=w * f, gap_T=gap, scoring="after_topk_" + config.scoring,
                            norm_topk_prob=config.norm_topk_prob, routed_scaling_factor=f)


def reference_route(x_TH: torch.Tensor, gate_EH: torch.Tensor, config,
                    bias_E: torch.Tensor | None = None,
                    gate_bias_E: torch.Tensor | None = None) -> ReferenceRouting:
    """Route [T, H] tokens with the [E, H] gate the way ``config``'s family defines it.

    ``config`` is read for its fields only (scoring, top_k, norm_topk_prob, n_group,
    topk_group, routed_scaling_factor, score_after_topk). Logits are x @ gate.T (+
    ``gate_bias_E``, the gate's own bias) in float64.
    """
    x, gate = x_TH.detach().double().cpu(), gate_EH.detach().double().cpu()
    logits = x @ gate.T
    if gate_bias_E is not None:
        logits = logits + gate_bias_E.detach().double().cpu()[None]
    K, E = config.top_k, gate.shape[0]
    if getattr(config, "score_after_topk", False):
        return _route_after_topk(logits, config, bias_E)
    if config.scoring == "softmax":  # (ERNIE 4.5: a bias shifts the choice, never the weights)
        shifted = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        scores = shifted / shifted.sum(dim=1, keepdim=True)
        choice = scores + (0.0 if bias_E is None else bias_E.detach().double().cpu()[None])
    else:
        scores = 1.0 / (1.0 + torch.exp(-logits))
        choice = scores + (0.0 if bias_E is None else bias_E.detach().double().cpu()[None])
    group_gap = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    if config.n_group > 1:
        G = config.n_group
        per_group = choice.reshape(-1, G, E // G)
        best2 = torch.sort(per_group, dim=2, descending=True).values[:, :, :2].sum(2)
        kept, group_gap = _top(best2, config.topk_group)
        keep = torch.zeros_like(best2, dtype=torch.bool)
        keep[torch.arange(x.shape[0])[:, None], kept] = True
        choice = torch.where(keep[:, :, None].expand_as(per_group), per_group,
                             torch.full_like(per_group, -math.inf)).reshape(-1, E)
    ids, gap = _top(choice, K)
    kw = dict(scoring=config.scoring, norm_topk_prob=config.norm_topk_prob,
              routed_scaling_factor=float(config.routed_scaling_factor))
    return ReferenceRouting(choice_TE=choice, scores_TE=scores, topk_ids=ids,
                            topk_weights=_weights_at(scores, ids, **kw),
                            gap_T=torch.minimum(gap, group_gap), **kw)


def match_routing(ref: ReferenceRouting, ids_TK: torch.Tensor, weights_TK: torch.Tensor, *,
                  tie: float) -> tuple[float, torch.Tensor]:
    """(rel err, accepted ids [T, K]) of an observed routing against the reference.

    A token may have other experts than the reference only where the reference's choice is a
    near tie (``gap_T`` below ``tie`` times the row's largest choice score) and every observed
    expert scores within that margin of the reference's K-th; otherwise the error is inf. The
    weights are compared with the reference's weights at the observed ids.
    """
    ids = ids_TK.detach().long().cpu()
    if ids.shape != ref.topk_ids.shape or (ids.numel() and (ids.min() < 0
                                                           or ids.max() >= ref.choice_TE.shape[1])):
        return math.inf, ref.topk_ids
    same = (ids.sort(1).values == ref.topk_ids.sort(1).values).all(1)
    if not bool(same.all()):
        scale = ref.choice_TE.abs().masked_fill(ref.choice_TE.isinf(), 0).amax(1)
        margin = tie * scale
        kth = torch.gather(ref.choice_TE, 1, ref.topk_ids[:, -1:]).squeeze(1)
        near = (ref.gap_T <= margin) & (torch.gather(ref.choice_TE, 1, ids).amin(1)
                                        >= kth - margin)
        if not bool((same | near).all()) or bool((ids.sort(1).values.diff(dim=1) == 0).any()):
            return math.inf, ref.topk_ids
    return rel_err(weights_TK, ref.weights_at(ids)), ids


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 on the host (||a - e|| where e is zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    return (a - e).norm().item() / denom if denom else (a - e).norm().item()


def swiglu64(x_NH: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert in float64: gate = first I rows of w13, up = the next I; silu(g) * u @ w2.T."""
    x, w13, w2 = x_NH.double(), w13.double().to(x_NH.device), w2.double().to(x_NH.device)
    inter = w13.shape[0] // 2
    g = x @ w13[:inter].T
    u = x @ w13[inter:].T
    return (g * torch.sigmoid(g) * u) @ w2.T


def expert64(x_NH: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, variant=None,
             w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None
             ) -> torch.Tensor:
    """One expert of ``variant`` in float64 (read for its fields: activation, alpha, limit;
    None: plain SwiGLU): h = x @ w13.T + b13, gate = h[:, :I], up = h[:, I:]; silu: silu(gate)
    * up; swiglu_oai: gate <= limit, -limit <= up <= limit, (up + 1) * gate * sigmoid(alpha *
    gate); then @ w2.T + b2."""
    if variant is None or (variant.activation == "silu" and w13_bias is None):
        y = swiglu64(x_NH, w13, w2)
        return y if w2_bias is None else y + w2_bias.double().to(y.device)
    x, w13, w2 = x_NH.double(), w13.double().to(x_NH.device), w2.double().to(x_NH.device)
    h = x @ w13.T + (0.0 if w13_bias is None else w13_bias.double().to(x.device))
    inter = w13.shape[0] // 2
    g, u = h[:, :inter], h[:, inter:]
    if variant.activation == "silu":
        a = g / (1.0 + torch.exp(-g)) * u
    else:
        assert variant.activation == "swiglu_oai", variant.activation
        if variant.limit is not None:
            g = torch.minimum(g, torch.full_like(g, variant.limit))
            u = torch.maximum(torch.minimum(u, torch.full_like(u, variant.limit)),
                              torch.full_like(u, -variant.limit))
        a = (u + 1.0) * g / (1.0 + torch.exp(-variant.alpha * g))
    return a @ w2.T + (0.0 if w2_bias is None else w2_bias.double().to(x.device))


def dense_experts(x_RH: torch.Tensor, ids_RK: torch.Tensor, held: Iterable[int],
                  expert_weights: Callable[[int], tuple[torch.Tensor, ...]], *,
                  variant=None, weights_RK: torch.Tensor | None = None) -> torch.Tensor:
    """[R, K, H] float64: slot (r, k) through expert ids[r, k] where its expert is in ``held``
    (the experts whose weights this rank holds), zeros elsewhere (other ranks' and empty).

    ``variant`` (an ExpertVariant, read for its fields) runs ``expert64``; ``expert_weights(g)``
    then returns (w13, w2, w13_bias, w2_bias) where it has biases. With its
    ``weights_on_input``, slot (r, k) is expert(weights[r, k] * x[r]) (``weights_RK`` needed)
    and is summed with weight 1 (``summed``)."""
    on_input = variant is not None and variant.weights_on_input
    if on_input and weights_RK is None:
        raise ValueError("weights_RK is needed for a variant with weights_on_input")
    w_RK = None if weights_RK is None else weights_RK.detach().double().cpu()
    x = x_RH.detach().double().cpu()
    ids = ids_RK.detach().long().cpu()
    R, K = ids.shape
    out = torch.zeros(R, K, x.shape[1], dtype=torch.float64)
    cache: dict[int, tuple] = {}
    held_set = set(int(g) for g in held)
    for r in range(R):
        for k in range(K):
            g = int(ids[r, k])
            if g < 0 or g not in held_set:
                continue
            if g not in cache:
                cache[g] = tuple(w.detach().double().cpu() for w in expert_weights(g))
            xr = x[r:r + 1] * w_RK[r, k] if on_input else x[r:r + 1]
            out[r, k] = (swiglu64(xr, *cache[g]) if variant is None
                         else expert64(xr, *cache[g][:2], variant, *cache[g][2:]))[0]
    return out


def summed(raw_RKH: torch.Tensor) -> torch.Tensor:
    """[R, H] float64: sum over k of raw[r, k] (slots whose inputs carried the weights)."""
    return raw_RKH.double().sum(1)


def local_expert_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's routed experts as float tensors (w13 [e, 2I, H], w2 [e, H, I]): the layer's
    own, or a quantised format's (block-FP8, MXFP4) dequantised exactly in float64
    (``formats.WeightFormat.dequantize``; the layer's ``w13`` / ``w2`` are empty then)."""
    if getattr(layer, "weight_format", "dense") != "dense":
        return layer.weights.dequantize(torch.float64)
    w13, w2 = layer.expert_weights()
    return w13.detach(), w2.detach()


def weighted_sum(raw_RKH: torch.Tensor, weights_RK: torch.Tensor) -> torch.Tensor:
    """[R, H] float64: sum over k of w[r, k] * raw[r, k] (zero slots contribute nothing)."""
    return (raw_RKH.double() * weights_RK.detach().double().cpu()[:, :, None]).sum(1)


def dense_shared(shared, x_TH: torch.Tensor) -> torch.Tensor:
    """[T, H] float64 of a layer's ``SharedExperts`` (its parameters, our formula); zeros for
    a layer without them (``shared`` None)."""
    x = x_TH.detach().double().cpu()
    if shared is None:
        return torch.zeros_like(x)
    y = swiglu64(x, shared.w13.detach().cpu(), shared.w2.detach().cpu())
    if shared.gate is not None:
        y = y / (1.0 + torch.exp(-(x @ shared.gate.weight.detach().double().cpu().T)))
    return y
