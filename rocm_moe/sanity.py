"""The single-token single-expert sanity suite: does a pipeline compute each expert exactly?

For a layer (any comm/experts backend mix, either weight mode) it checks, against each expert's
MLP computed independently in float64 from the layer's own weights:

- ``single_expert``: one token routed to expert g alone with weight 1 gives expert_g(x);
- ``half_weight``: weight 0.5 gives exactly half (weights applied once, not twice or never);
- ``raw_unweighted``: return_raw gives expert_g(x) unweighted, and the output beside it is
  still weighted once;
- ``topk_sum``: K distinct experts with random weights give sum_k w_k expert_k(x);
- ``raw_slots``: return_raw with two slots of one rank's experts in one row (in the reverse
  of their local order): each slot's raw output is its own expert's, the output weighted once;
- ``modes_agree``: weight_mode "experts" and "combine" give the same output;
- ``comm_identity``: combine(dispatch(x)) with identity experts is x * U, U the number of
  unique destination ranks of each token (MORI's own round-trip test);
- ``routing``: the layer's router (its family: softmax top-k with or without normalisation,
  DeepSeek-V3's grouped sigmoid) against ``oracle.reference_route``, written apart from
  ``routing.py``; a sigmoid router is tried with its own correction bias and with a random one
  (the bias must choose, never weigh);
- ``shared_experts`` (layers with shared experts): a token routed nowhere gives exactly the
  shared experts' output, computed by ``oracle.dense_shared``.

The shared experts' output is taken out of every routed check with the same independent oracle.
Every expert reference is ``oracle.swiglu64`` (not the package's ``swiglu_expert``), and the one
input every check reuses must come back unchanged (``input_unchanged``: a layer writing its
experts' output into its input fails it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rocm_moe._checks import describe, error_message
from rocm_moe.layer import EPMoE
from rocm_moe.oracle import (
    dense_shared,
    local_expert_weights,
    match_routing,
    reference_route,
    swiglu64,
)
from rocm_moe.weighting import ExpertsOutput

# Relative error allowed against a float64 oracle, by compute dtype.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class SanityRow:
    check: str
    weight_mode: str
    cases: int
    max_rel_err: float
    tolerance: float
    skipped: str | None = None  # why the check cannot run on these backends
    note: str = ""  # what failed, where the error alone does not say

    @property
    def passed(self) -> bool:
        return self.skipped is not None or self.max_rel_err <= self.tolerance


def tolerance(layer: EPMoE) -> float:
    """Relative error allowed for ``layer`` against a float64 oracle of its (dequantised)
    weights: by compute dtype, and for an FP8 layer twice ``formats.block_fp8.FP8_TOLERANCE`` (its
    activations are quantised too, and one token's error is not averaged over a batch: up to
    6% measured at H = 128; a weight applied twice or never, or gate and up swapped, are off by
    50% and more)."""
    tol = TOLERANCE[layer.w13.dtype]
    if getattr(layer.experts, "fp8", False):
        from rocm_moe.formats.block_fp8 import FP8_TOLERANCE

        tol = max(tol, 2 * FP8_TOLERANCE)
    return tol


def check_layer(field: str, layer: object) -> EPMoE:
    """``layer`` is an EPMoE (any weight format) that the references here model: a TypeError
    naming what was given otherwise, a ValueError for a layer whose experts or routing they do not
    compute yet (an expert variant or a gate bias: they would report a false FAIL; replicated
    experts: the stages see physical ids)."""
    if not isinstance(layer, EPMoE):
        raise TypeError(error_message(field, describe(layer), "must be a rocm_moe.EPMoE",
                                      "pass the MoE layer (an EPMoE)"))
    from rocm_moe.experts.base import PLAIN

    unmodelled = [what for what, on in (
        (f"expert_variant={layer.expert_variant}", layer.expert_variant != PLAIN),
        ("router.gate_bias=True", getattr(layer.router, "gate_bias", False)),
        ("num_redundant_experts (EPLB replicas)", getattr(layer, "_replicas", None) is not None),
    ) if on]
    if unmodelled:
        raise ValueError(error_message(
            field, ", ".join(unmodelled), "diagnose and sanity's references compute plain "
            "SwiGLU experts, routers without a gate bias and one replica per expert",
            "check this layer with rocm-moe run's float64 oracle (it takes the variant), or "
            "a plain layer of the same shape"))
    return layer


def router_config_mismatch(router, hf_config) -> str | None:
    """The fields where ``router`` (a RouterConfig) differs from the one the model's
    transformers config describes (``RouterConfig.from_hf_config``), or None where they agree.
    The routing references read the layer's RouterConfig; only this check sees a wrong default
    there (DeepSeek-V3's routed_scaling_factor left at 1.0)."""
    from dataclasses import fields

    from rocm_moe.routing import RouterConfig

    try:
        want = RouterConfig.from_hf_config(hf_config)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(error_message(
            "hf_config", type(hf_config).__name__, f"does not describe a known MoE router "
            f"({exc})", "pass the model's transformers config (model.config)")) from exc
    diff = [f"{f.name}: layer {getattr(router, f.name)!r}, model {getattr(want, f.name)!r}"
            for f in fields(want) if getattr(router, f.name) != getattr(want, f.name)]
    return "RouterConfig differs from the model's config: " + "; ".join(diff) if diff else None


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    return (a - e).norm().item() / denom if denom else (a - e).norm().item()


def _experts_to_try(experts: object, E: int) -> list[int]:
    """``run_sanity``'s ``experts``: None (all E), or a non-empty list of distinct ids in
    [0, E) (an empty list passed with no case run; 99 failed as "not in list")."""
    if experts is None:
        return list(range(E))
    ok = isinstance(experts, (list, tuple)) and experts and all(
        isinstance(g, int) and not isinstance(g, bool) and 0 <= g < E for g in experts)
    if not ok or len(set(experts)) != len(experts):
        raise ValueError(error_message("experts", repr(experts), f"must be None or a non-empty "
                                       f"list of distinct expert ids in [0, {E})",
                                       "pass e.g. [0, 3], or None for every expert"))
    return list(experts)


def run_sanity(
    layer: EPMoE,
    *,
    seed: int = 0,
    experts: list[int] | None = None,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    hf_config=None,
) -> list[SanityRow]:
    """Run the suite on ``layer`` (its backends, its weights, its device) in both weight modes.

    Every rank of an EP group calls this with the same arguments (each forward is collective).
    ``experts``: the global experts tried one by one (default: all E). ``expert_weights(g)``
    returns expert g's (w13 [2I, H], w2 [H, I]) for the float64 reference; by default they are
    read from the layer, which holds every expert only on a single rank. The layer's
    weight_mode is restored afterwards. ``hf_config``: the model's transformers config; the
    layer's RouterConfig is checked against it first (row ``router_config``), since the routing
    reference reads that RouterConfig (skipped without it).
    """
    check_layer("layer", layer)
    mismatch = router_config_mismatch(layer.router, hf_config) if hf_config is not None \
        else None
    dev, dtype = layer.w13.device, layer.w13.dtype
    gen = torch.Generator().manual_seed(seed)
    H = layer.hidden_size
    local = list(layer.local_experts)
    tried = _experts_to_try(experts, layer.router.routed_experts)
    tol = tolerance(layer)
    if expert_weights is None:
        if len(local) != layer.router.routed_experts:
            raise ValueError(error_message(
                "expert_weights", None, "with expert parallelism the reference weights of other "
                "ranks' experts must be given", "pass expert_weights=lambda g: (w13_g, w2_g)"))
        w13_local, w2_local = local_expert_weights(layer)

        def expert_weights(g: int):
            j = local.index(g)
            return w13_local[j], w2_local[j]

    def mlp(g: int, x: torch.Tensor) -> torch.Tensor:
        """Expert g in float64 by oracle.swiglu64, written apart from the package's experts."""
        return swiglu64(x, *expert_weights(g))

    x = torch.randn(1, H, generator=gen).to(dtype).to(dev)
    # The dense shared experts are added to every output; take them out of it.
    shared = dense_shared(layer.shared_experts, x).to(dev) if layer.shared_experts is not None \
        else 0.0
    K = layer.router.top_k
    E = layer.router.routed_experts
    ids_K = torch.randperm(E, generator=gen)[:K]  # any experts: other ranks' ones too
    w_K = torch.rand(K, generator=gen) + 0.1
    pair_K = _two_local_slots(layer, gen)  # two slots of one rank's experts in one row
    saved_mode, rows, outs = layer.weight_mode, [], {}
    raw_reason = layer.dispatcher.raw_unsupported_reason()
    pair_reason = raw_reason or ("needs top_k >= 2 and a rank holding two experts"
                                 if pair_K is None else None)
    x0, changed = x.clone(), []  # every check reuses x: it must come back unchanged

    def forward(*args, **kwargs):
        y = layer.forward_routed(x, *args, **kwargs)
        if not torch.equal(x, x0):  # the layer wrote into its input: restore it, report it
            changed.append(len(changed))
            x.copy_(x0)
        return y
    try:
        for mode in ("experts", "combine"):
            layer.weight_mode = mode
            errs: dict[str, list[float]] = {"single_expert": [], "half_weight": [],
                                            "raw_unweighted": []}
            K_layer = layer.router.top_k
            for g in tried:
                # One expert per token: slot 0, the other K-1 slots empty (-1, weight 0).
                ids = torch.full((1, K_layer), -1, dtype=torch.int32, device=dev)
                ids[0, 0] = g
                ref = mlp(g, x)
                one_w = torch.zeros(1, K_layer, device=dev)
                one_w[0, 0] = 1.0
                one = forward(one_w, ids)
                errs["single_expert"].append(rel_err(one - shared, ref))
                half_w = one_w * 0.5
                # Through the weight mode's own path (return_raw would force raw experts).
                half = forward(half_w, ids)
                errs["half_weight"].append(rel_err(half - shared, 0.5 * ref))
                if raw_reason is None:
                    raw = forward(half_w, ids, return_raw=True)
                    errs["raw_unweighted"].append(max(rel_err(raw.raw[:, 0], ref),
                                                      rel_err(raw.out - shared, 0.5 * ref)))
            y = forward(w_K[None].to(dev), ids_K[None].int().to(dev))
            y = y - shared
            ref = sum(w * mlp(int(g), x) for w, g in zip(w_K.tolist(), ids_K.tolist(),
                                                          strict=True))
            outs[mode] = y
            for check, e in errs.items():
                skip = raw_reason if check == "raw_unweighted" else None
                rows.append(SanityRow(check, mode, len(e), max(e, default=0.0), tol, skip))
            rows.append(SanityRow("topk_sum", mode, 1, rel_err(y, ref), tol))
            pair_err = 0.0
            if pair_reason is None:
                raw = forward(w_K[None].to(dev), pair_K[None].int().to(dev), return_raw=True)
                refs = [mlp(int(g), x) for g in pair_K.tolist()]
                pair_err = max([rel_err(raw.raw[:, k], r) for k, r in enumerate(refs)]
                               + [rel_err(raw.out - shared, sum(
                                   w * r for w, r in zip(w_K.tolist(), refs, strict=True)))])
            rows.append(SanityRow("raw_slots", mode, 1, pair_err, tol, pair_reason))
    finally:
        layer.weight_mode = saved_mode
    rows.insert(0, SanityRow("router_config", "-", 1, float("inf") if mismatch else 0.0, 0.0,
                             None if hf_config is not None else "no hf_config given: the "
                             "routing reference reads the layer's own RouterConfig",
                             mismatch or ""))
    rows.append(SanityRow("input_unchanged", "both", len(changed) or 1,
                          float("inf") if changed else 0.0, tol, None,
                          f"{len(changed)} forwards wrote into their input hidden states"
                          if changed else ""))
    rows.append(SanityRow("modes_agree", "both", 1, rel_err(outs["experts"], outs["combine"]),
                          tol))
    rows.append(SanityRow("comm_identity", "-", 1, comm_identity_error(layer, seed), tol))
    # Routing weights are float32 whatever the layer's dtype (the router's contract).
    rows.append(SanityRow("routing", layer.router.scoring, 32, routing_error(layer, seed),
                          max(tol, TOLERANCE[torch.float32])))
    if layer.shared_experts is not None:
        rows.append(SanityRow("shared_experts", "-", 4, shared_error(layer, seed), tol))
    return rows


def _two_local_slots(layer: EPMoE, gen: torch.Generator) -> torch.Tensor | None:
    """[K] global ids whose first two slots are two experts of one rank, in the reverse of
    their local order (a raw-path bug in slot order then shows), the other slots random
    experts; None where K < 2 or no rank holds two experts."""
    K, p = layer.router.top_k, layer.dispatcher.placement
    holders = [r for r in range(p.world_size) if len(p.local_experts(r)) >= 2]
    if K < 2 or not holders:
        return None
    held = p.local_experts(holders[0])
    pair = [held[1], held[0]]
    rest = [g for g in torch.randperm(p.num_experts, generator=gen).tolist() if g not in pair]
    return torch.tensor(pair + rest[:K - 2])


@torch.no_grad()
def routing_error(layer: EPMoE, seed: int, num_tokens: int = 32) -> float:
    """The layer's routing of random tokens against the independent router of its family
    (inf where the experts differ beyond a rounding tie). Local: no collective."""
    dev, dtype, H = layer.w13.device, layer.w13.dtype, layer.hidden_size
    gen = torch.Generator().manual_seed(seed * 17 + 5)
    x = torch.randn(num_tokens, H, generator=gen).to(dtype).to(dev)
    tie = 4 * TOLERANCE[dtype]
    bias = layer.e_score_correction_bias
    biases = [None] if bias is None else [bias.clone(), 0.1 * torch.randn(bias.shape,
                                                                         generator=gen)]
    errs = []
    try:
        for b in biases:
            if b is not None:
                bias.copy_(b)
            got = layer.route_tokens(x)
            ref = reference_route(x, layer.gate.weight, layer.router, b)
            errs.append(match_routing(ref, got.topk_ids, got.topk_weights, tie=tie)[0])
    finally:
        if bias is not None:
            bias.copy_(biases[0])
    return max(errs)


@torch.no_grad()
def shared_error(layer: EPMoE, seed: int, num_tokens: int = 4) -> float:
    """Tokens routed nowhere (every slot -1) must come out as the shared experts' output alone
    (collective: every rank runs the forward)."""
    dev, dtype, K = layer.w13.device, layer.w13.dtype, layer.router.top_k
    gen = torch.Generator().manual_seed(seed * 13 + 7)
    x = torch.randn(num_tokens, layer.hidden_size, generator=gen).to(dtype).to(dev)
    ids = torch.full((num_tokens, K), -1, dtype=torch.int32, device=dev)
    y = layer.forward_routed(x, torch.zeros(num_tokens, K, device=dev), ids)
    return rel_err(y, dense_shared(layer.shared_experts, x).to(dev))


def comm_identity_error(layer: EPMoE, seed: int, num_tokens: int = 16) -> float:
    """combine(dispatch(x)) with identity experts must be x * U (U = unique destination ranks
    of each token): MORI's own round-trip test, run on the layer's comm backend."""
    disp = layer.dispatcher
    dev, dtype = layer.w13.device, layer.w13.dtype
    E, K = layer.router.routed_experts, layer.router.top_k
    T = min(num_tokens, disp.max_tokens_per_rank or num_tokens)
    gen = torch.Generator().manual_seed(seed * 31 + disp.rank)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    x = torch.randn(T, layer.hidden_size, generator=gen).to(dtype)
    res = disp.dispatch(x.to(dev), torch.rand(T, K, generator=gen).to(dev), ids.to(dev))
    y = disp.combine(ExpertsOutput(out=res.x.contiguous(), weights_applied=True), res.handle)
    U = torch.tensor([disp.placement.owner(row).unique().numel() for row in ids])
    return rel_err(y.cpu(), x.double() * U[:, None])
