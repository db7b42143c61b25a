"""Router: per-token top-k expert selection for softmax (Mixtral, Qwen3-MoE) and sigmoid grouped
(DeepSeek-V3) routers, with router replay.

Shapes follow the package legend (see ``rocm_moe.__init__``): T tokens, E global experts, K top-k.

Conventions, matching transformers 5 exactly (tests compare against its router modules):

- softmax:  p = softmax(logits in float32); ids = top-k of p; w = p[ids];
            if norm_topk_prob: w /= sum(w).  Then w *= routed_scaling_factor (1.0 by default).
- sigmoid:  s = sigmoid(logits in float32); choice = s + e_score_correction_bias;
            with n_group > 1 keep the topk_group groups with the largest sum of their top-2
            choice scores, then ids = top-k of choice inside them; w = s[ids] (no bias);
            if norm_topk_prob: w /= sum(w) + 1e-20; w *= routed_scaling_factor.
- score_after_topk (gpt-oss with softmax, Llama 4 with sigmoid): ids = top-k of the logits
            (+ e_score_correction_bias, which shifts the choice only); softmax: w = softmax of
            the K chosen logits (they sum to 1: norm_topk_prob must be True); sigmoid: w =
            sigmoid(chosen logits), normalised if norm_topk_prob. Then the scaling factor.
- choice_bias (ERNIE 4.5): a softmax router whose e_score_correction_bias shifts the choice
            (choice = p + bias; w = p[ids]), as sigmoid routers' always may.
- gate_bias (gpt-oss's router.bias): the gate linear has a bias, part of the logits (the
            layer adds it); the router itself sees only the logits.

Router replay (``forced_expert_ids``): the caller fixes the ids, e.g. to replay the experts chosen
at rollout time (the R3 contract of RL trainers). The ids are validated (integer dtype, shape
[T, K], range [0, E), no duplicate in a row) after being moved to the logits' device, before
anything else runs. The weights are re-derived from the live logits at the forced ids with the
same scoring, normalisation and scaling as the unforced path (``forced_weights="derived"``), so a
replay of the router's own choice reproduces its weights bit for bit. ``forced_weights="raw"``
returns the gathered scores (softmax probability or sigmoid score) with no normalisation and no
scaling factor.

Gate GEMM and router together (``gate_route``, ``EPMoE(fused_gate=...)``): on GPUs the gate
GEMM can run in Triton with the router, two launches (``rocm_moe._gate_triton``): the weight
read as stored (bf16 for DeepSeek-V3, Kimi K2, GLM-4.5, whose gate GEMM transformers runs in
float32), split over H and experts, products formed exactly in float32, the split-K partials
summed in a fixed order inside the router's launch. Its logits differ from torch's float32 GEMM
only in the order of the float32 additions. Chosen by ``fused_gate`` ("off", "float32", "all";
``FUSED_GATE_DEFAULT``); the torch path stays for CPUs, autograd, invariant mode and replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from rocm_moe import invariant as inv
from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_finite,
    check_id_range,
    check_integer,
    check_tensor,
    check_unique_rows,
    error_message,
    value_checks_allowed,
)
from rocm_moe._libs import library_version, triton_runs_on
from rocm_moe.families import family

Scoring = Literal["softmax", "sigmoid"]
FusedGate = Literal["off", "float32", "all"]

# Where the gate GEMM runs in Triton with the router (``gate_route``; EPMoE(fused_gate=None)):
# "off" (torch's GEMM, then the router), "float32" (routers whose gate GEMM is float32:
# DeepSeek-V3, Kimi K2, GLM-4.5), "all" (also bf16/fp16 gates: Qwen3, Mixtral). Set from the
# GPU measurement of bench/router.py (bench/gpu_router_gate.sh).
# Measured on one H100 (bench/results/router_gate_h100.txt, 1-128 tokens): gate + router 5.3-6.4
# us against 7.6-8.1 (Qwen3, "all") and 7.6-10.7 against 11.4-31.8 (DeepSeek-V3, "float32").
# The default stays "off": the Triton gate's plan (tiles, splits) follows T, so a row's logits
# may differ in their last bits between batch sizes, and the layer's micro-batch and chunk
# bit-identity guarantees were checked on GPUs with the torch GEMM only.
FUSED_GATE_MODES: tuple[str, ...] = ("off", "float32", "all")
FUSED_GATE_DEFAULT: FusedGate = "off"
# The Triton gate runs for at most this many tokens (decode steps: the sizes measured above);
# larger batches take torch's GEMM, whose cost there is small beside the experts', and whose
# K-sum is not one sequential float32 accumulation over all of H (the kernel's plan at large T).
FUSED_GATE_MAX_TOKENS = 128


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """What a router computes. Use the family constructors for known models."""

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_after_topk: bool = False  # top-k of the logits first, then score only those
    gate_bias: bool = False  # the gate linear has a bias (logits = x @ W.T + b)
    choice_bias: bool = False  # a softmax router takes e_score_correction_bias (ERNIE 4.5)
    # LongCat-Flash: the last zero_experts of the num_experts ids are zero-computation
    # (identity) experts; EPMoE adds x * their weight on the token's rank, without dispatch
    zero_experts: int = 0
    float32_logits: bool = False  # the gate GEMM in float32 whatever x's dtype (LongCat-Flash)

    def __post_init__(self) -> None:
        def bad(field: str, value: object, rule: str, fix: str) -> ValueError:
            return ValueError(error_message(f"RouterConfig.{field}", value, rule, fix))

        for field in ("num_experts", "top_k", "n_group", "topk_group", "zero_experts"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(error_message(
                    f"RouterConfig.{field}", repr(value), "must be an int",
                    f"pass an int, e.g. {field}=int(config.{field})"))
        for field in ("norm_topk_prob", "score_after_topk", "gate_bias", "choice_bias",
                      "float32_logits"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(error_message(f"RouterConfig.{field}", repr(getattr(self, field)),
                                              "must be a bool", "pass True or False"))
        if self.score_after_topk and self.n_group > 1:
            raise bad("n_group", self.n_group, "score_after_topk routers are not grouped",
                      "set n_group=1 or score_after_topk=False")
        if self.score_after_topk and self.scoring == "softmax" and not self.norm_topk_prob:
            raise bad("norm_topk_prob", False, "a softmax over the top-k logits always sums to 1 "
                      "(score_after_topk with softmax scoring)",
                      "pass norm_topk_prob=True, or score_after_topk=False for an unnormalised "
                      "softmax over all experts")
        if self.num_experts < 1:
            raise bad("num_experts", self.num_experts, "must be >= 1", "pass the expert count")
        if not 1 <= self.top_k <= self.num_experts:
            raise bad(
                "top_k", self.top_k, f"must lie in [1, num_experts={self.num_experts}]",
                "pass num_experts_per_tok from the model config",
            )
        if not 0 <= self.zero_experts < self.num_experts:
            raise bad("zero_experts", self.zero_experts,
                      f"must lie in [0, num_experts={self.num_experts}) (the last zero_experts "
                      "ids are identity experts; at least one routed expert must remain)",
                      "pass the model config's zero_expert_num, and num_experts = routed + zero")
        f = self.routed_scaling_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) \
                or f <= 0:
            raise bad("routed_scaling_factor", f, "must be a finite number > 0",
                      "use the model config's routed_scaling_factor (1.0 when it has none)")
        if self.scoring not in ("softmax", "sigmoid"):
            raise bad("scoring", self.scoring, "must be 'softmax' or 'sigmoid'", "pick one")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise bad(
                "n_group", self.n_group, f"must be >= 1 and divide num_experts={self.num_experts}",
                "use the model config's n_group",
            )
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise bad(
                "n_group", self.n_group, "groups are scored by their top-2, so each needs >= 2 "
                "experts", "use fewer groups",
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise bad(
                "topk_group", self.topk_group, f"must lie in [1, n_group={self.n_group}]",
                "use the model config's topk_group",
            )
        if self.n_group > 1 and self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise bad(
                "topk_group", self.topk_group, "the kept groups must hold at least top_k experts",
                "raise topk_group or lower top_k",
            )
        if self.n_group > 1 and self.scoring != "sigmoid":
            raise bad("n_group", self.n_group, "grouped top-k is defined for sigmoid scoring",
                      "set scoring='sigmoid' or n_group=1")

    @classmethod
    def qwen3_moe(cls, num_experts: int = 128, top_k: int = 8, norm_topk_prob: bool = True):
        return cls(num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob)

    @classmethod
    def mixtral(cls, num_experts: int = 8, top_k: int = 2):
        return cls(num_experts=num_experts, top_k=top_k, norm_topk_prob=True)

    @classmethod
    def deepseek_v3(
        cls,
        num_experts: int = 256,
        top_k: int = 8,
        n_group: int = 8,
        topk_group: int = 4,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 2.5,
    ):
        return cls(
            num_experts=num_experts, top_k=top_k, scoring="sigmoid", n_group=n_group,
            topk_group=topk_group, norm_topk_prob=norm_topk_prob,
            routed_scaling_factor=routed_scaling_factor,
        )

    @classmethod
    def gpt_oss(cls, num_experts: int = 128, top_k: int = 4):
        """gpt-oss: top-k of the biased gate logits, then a softmax over the K chosen."""
        return cls(num_experts=num_experts, top_k=top_k, score_after_topk=True, gate_bias=True)

    @classmethod
    def llama4(cls, num_experts: int = 16, top_k: int = 1):
        """Llama 4: top-k of the logits, weight = sigmoid of each (not normalised)."""
        return cls(num_experts=num_experts, top_k=top_k, scoring="sigmoid",
                   norm_topk_prob=False, score_after_topk=True)

    @classmethod
    def kimi_k2(cls, num_experts: int = 384, top_k: int = 8,
                routed_scaling_factor: float = 2.827):
        """Kimi K2: DeepSeek-V3's sigmoid router with 384 experts in one group."""
        return cls.deepseek_v3(num_experts, top_k, n_group=1, topk_group=1,
                               routed_scaling_factor=routed_scaling_factor)

    @classmethod
    def from_hf_config(cls, config) -> RouterConfig:
        """From a transformers config of a known family (``rocm_moe.families``: Qwen2/3-MoE,
        Mixtral, DeepSeek-V3)."""
        fam = family(getattr(config, "model_type", ""),
                     fix="build RouterConfig(...) by hand for other models")
        return cls(**fam.router_kwargs(config))

    @property
    def routed_experts(self) -> int:
        """E_r: the experts that compute (``num_experts - zero_experts``), ids [0, E_r)."""
        return self.num_experts - self.zero_experts

    @property
    def logits_in_float32(self) -> bool:
        """DeepSeek-V3 and LongCat-Flash (``float32_logits``) compute their gate matmul in
        float32; other softmax routers and Llama 4's (sigmoid after the top-k) in the model
        dtype."""
        return self.float32_logits or (self.scoring == "sigmoid" and not self.score_after_topk)


@dataclass(frozen=True, kw_only=True)
class RoutingResult:
    """Per-token routing. ``topk_weights`` [T, K] float32, ``topk_ids`` [T, K] int32 (global)."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


def _scores(logits_TE: torch.Tensor, config: RouterConfig, invariant: bool = False):
    logits = logits_TE.float()
    if invariant:
        return inv.softmax(logits) if config.scoring == "softmax" \
            else inv.pointwise(torch.sigmoid, logits)
    return logits.softmax(dim=-1) if config.scoring == "softmax" else logits.sigmoid()


def _finish_weights(w_TK: torch.Tensor, config: RouterConfig, invariant: bool = False):
    if config.norm_topk_prob:
        eps = 1e-20 if config.scoring == "sigmoid" else 0.0
        total = inv.tree_sum(w_TK).unsqueeze(-1) if invariant else w_TK.sum(-1, keepdim=True)
        w_TK = w_TK / (total + eps)
    if config.routed_scaling_factor != 1.0:
        w_TK = w_TK * config.routed_scaling_factor
    return w_TK


def _topk(t: torch.Tensor, k: int, invariant: bool) -> torch.Tensor:
    """Indices of the k largest along the last dim (invariant: ties to the lower index)."""
    return inv.stable_topk(t, k) if invariant else t.topk(k, dim=-1).indices


def _choose(scores_TE: torch.Tensor, config: RouterConfig, bias_E: torch.Tensor | None,
            invariant: bool = False):
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    if config.n_group > 1:
        T, E, G = choice_TE.shape[0], config.num_experts, config.n_group
        top2 = choice_TE.view(T, G, E // G).topk(2, dim=-1).values  # values: ties do not matter
        group_scores_TG = top2[..., 0] + top2[..., 1] if invariant else top2.sum(dim=-1)
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, _topk(group_scores_TG, config.topk_group, invariant), True)
        keep_TE = keep_TG.repeat_interleave(E // G, dim=1)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    return _topk(choice_TE, config.top_k, invariant)


def _check_forced(forced: object, logits_TE: torch.Tensor, lead: tuple, config: RouterConfig):
    check_tensor("forced_expert_ids", forced)
    check_integer("forced_expert_ids", forced)
    forced = forced.to(logits_TE.device)
    want = (*lead, config.top_k)
    flat = (math.prod(lead), config.top_k)  # [T, K] replays [B, S, E] logits too
    if tuple(forced.shape) not in (want, flat):
        raise ValueError(error_message(
            "forced_expert_ids.shape", list(forced.shape),
            f"must be {list(want)} (the logits' leading dims, then top_k={config.top_k})"
            + (f" or {list(flat)}" if flat != want else ""),
            "pass one row of K expert ids per token",
        ))
    forced_TK = forced.reshape(-1, config.top_k)
    check_id_range("forced_expert_ids", forced_TK, config.num_experts, allow_minus_one=False)
    check_unique_rows("forced_expert_ids", forced_TK)
    return forced_TK.long()


def _check_logits(logits_TE: torch.Tensor, top_k: int) -> None:
    """NaN and +inf refused; -inf masks an expert (a legitimate way to exclude it), so long as
    every token keeps at least ``top_k`` finite logits."""
    fix = "check the gate weights and, if the logits come from your model, its hidden states"
    check_finite("router_logits", logits_TE.masked_fill(logits_TE == float("-inf"), 0), fix)
    if logits_TE.numel() and value_checks_allowed(logits_TE):
        few = torch.isfinite(logits_TE).sum(-1) < top_k
        if bool(few.any()):
            t = int(few.nonzero()[0, 0])
            raise ValueError(error_message(
                f"router_logits[{t}]", f"{int(torch.isfinite(logits_TE[t]).sum())} finite",
                f"a token needs at least top_k={top_k} experts not masked with -inf", fix))


def route(
    router_logits: torch.Tensor,
    config: RouterConfig,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    forced_expert_ids: torch.Tensor | None = None,
    forced_weights: Literal["derived", "raw"] = "derived",
    validate: bool = True,
    invariant: bool = False,
    fused: bool = False,
) -> RoutingResult:
    """Route every token independently.

    Args:
        router_logits: [T, E] or [B, S, E] floating gate logits (one row per token, never pooled).
        config: the router's family and parameters.
        e_score_correction_bias: [E] floating, sigmoid routers only; shifts the choice, never
            the weights. ``None`` means zeros.
        forced_expert_ids: router replay; [T, K] or [B, S, K], any integer dtype, any device.
        forced_weights: "derived" (default) normalises and scales the gathered scores exactly as
            the unforced path; "raw" returns the gathered scores unchanged.
        validate: refuse NaN / infinite logits or bias (one host read each; skipped under CUDA
            graph capture). ``False`` on the hot path: a NaN logit then gives NaN weights.
        invariant: fixed-order arithmetic (``rocm_moe.invariant``): softmax's sum and the
            top-k normalisation by a fixed pairwise tree, ties of the top-k to the lower expert
            id, so a token's ids and weights are the same bits in any batch.
        fused: on GPUs, the router after the gate GEMM in one Triton launch
            (``rocm_moe._routing_triton.fused_route``; 10-15 us instead of 22-66 us on an H100,
            bench/results/router_h100.txt): the torch path's bits on CUDA where the scores do
            not tie (each stage measured equal on an H100, bench/results/router_bits_h100.txt),
            ties to the lower id. ``EPMoE`` passes True by default. Ignored (the torch path
            runs) on CPUs, with ``invariant``, router replay, E > 1024, K > 32 or
            ``score_after_topk`` (gpt-oss, Llama 4), which it does not implement.

    Returns:
        RoutingResult with [T, K] float32 weights and [T, K] int32 global ids, T = B * S for
        [B, S, E] input. Unforced ids are ordered by decreasing choice score.

    Example: logits [[0, 0, log(2)]] with softmax, K=1 and no normalisation gives ids [[2]] and
    weights [[0.5]].
    """
    if not isinstance(config, RouterConfig):
        raise TypeError(error_message("config", type(config).__name__, "must be a RouterConfig",
                                      "build one, e.g. RouterConfig.qwen3_moe(E, K) or "
                                      "RouterConfig.from_hf_config(cfg)"))
    check_tensor("router_logits", router_logits, dtypes=FLOAT_DTYPES)
    if router_logits.dim() not in (2, 3) or router_logits.shape[-1] != config.num_experts:
        raise ValueError(error_message(
            "router_logits.shape", list(router_logits.shape),
            f"must be [T, E] or [B, S, E] with E = num_experts = {config.num_experts}",
            "compute logits per token (hidden [T, H] @ gate.T), never pooled over a sequence",
        ))
    if forced_weights not in ("derived", "raw"):
        raise ValueError(error_message("forced_weights", repr(forced_weights),
                                       "must be 'derived' or 'raw'", "pick one"))
    if forced_weights == "raw" and forced_expert_ids is None:
        raise ValueError(error_message(
            "forced_weights", "'raw'", "says how to weight forced_expert_ids, and none are "
            "given (it would be ignored)", "pass forced_expert_ids too, or leave it 'derived'"))
    for field, flag in (("fused", fused), ("invariant", invariant), ("validate", validate)):
        if not isinstance(flag, bool):  # fused="no" is truthy: it took the Triton router
            raise TypeError(error_message(field, repr(flag), "must be a bool",
                                          "pass True or False"))
    lead = tuple(router_logits.shape[:-1])
    forced_TK = None
    if forced_expert_ids is not None:
        forced_TK = _check_forced(forced_expert_ids, router_logits, lead, config)
    if e_score_correction_bias is not None:
        if config.scoring != "sigmoid" and not config.choice_bias:
            raise ValueError(error_message(
                "e_score_correction_bias", "a tensor", "only sigmoid routers (and softmax ones "
                "with choice_bias=True) take a bias", "drop it or set scoring='sigmoid'"))
        check_tensor("e_score_correction_bias", e_score_correction_bias,
                     shape=(config.num_experts,), dtypes=FLOAT_DTYPES)
        e_score_correction_bias = e_score_correction_bias.to(router_logits.device)
        if validate:  # a NaN bias sends every token to its expert with finite outputs
            check_finite("e_score_correction_bias", e_score_correction_bias,
                         "load the router's bias from the checkpoint again")
    if validate:
        _check_logits(router_logits.reshape(-1, config.num_experts), config.top_k)

    logits_TE = router_logits.reshape(-1, config.num_experts)
    if fused and forced_TK is None and not invariant and _fused_runs(logits_TE, config):
        from rocm_moe._routing_triton import fused_route

        bias_E = None if e_score_correction_bias is None else e_score_correction_bias.contiguous()
        return fused_route(logits_TE=logits_TE, config=config, bias_E=bias_E)
    return _route_torch(logits_TE, config, e_score_correction_bias, forced_TK=forced_TK,
                        forced_weights=forced_weights, invariant=invariant)


def _fused_runs(logits_TE: torch.Tensor, config: RouterConfig) -> bool:
    """The one-launch Triton router (``rocm_moe._routing_triton``) takes these logits: GPU
    tensors with triton installed, within its limits. Elsewhere (CPUs, the invariant mode,
    router replay) the torch path runs."""
    if not logits_TE.is_cuda or library_version("triton") is None:
        return False
    from rocm_moe._routing_triton import fused_route_unsupported

    return fused_route_unsupported(logits_TE, config) is None


def _route_after_topk(logits_TE: torch.Tensor, config: RouterConfig,
                      bias_E: torch.Tensor | None, forced_TK: torch.Tensor | None,
                      forced_weights: str, invariant: bool) -> RoutingResult:
    """``score_after_topk``: ids = top-k of the logits (+ bias), then only those are scored."""
    choice_TE = logits_TE if bias_E is None else logits_TE.float() + bias_E.float()
    ids_TK = forced_TK if forced_TK is not None else _topk(choice_TE, config.top_k, invariant)
    chosen_TK = logits_TE.gather(1, ids_TK).float()
    if forced_TK is not None and forced_weights == "raw":
        w_TK = chosen_TK.sigmoid() if config.scoring == "sigmoid" else chosen_TK.softmax(-1)
    elif config.scoring == "softmax":  # (sums to 1: no normalisation after it)
        w_TK = inv.softmax(chosen_TK) if invariant else chosen_TK.softmax(dim=-1)
        if config.routed_scaling_factor != 1.0:
            w_TK = w_TK * config.routed_scaling_factor
    else:
        w_TK = inv.pointwise(torch.sigmoid, chosen_TK) if invariant else chosen_TK.sigmoid()
        w_TK = _finish_weights(w_TK, config, **({"invariant": True} if invariant else {}))
    return RoutingResult(topk_weights=w_TK.float().contiguous(),
                         topk_ids=ids_TK.to(torch.int32).contiguous())


def _route_torch(
    logits_TE: torch.Tensor,
    config: RouterConfig,
    bias_E: torch.Tensor | None,
    *,
    forced_TK: torch.Tensor | None = None,
    forced_weights: Literal["derived", "raw"] = "derived",
    invariant: bool = False,
) -> RoutingResult:
    """The router in torch operations on [T, E] logits (inputs already checked by ``route``).
    On CUDA ``fused_route`` computes its bits in one launch (``route(fused=True)``)."""
    if config.score_after_topk:
        return _route_after_topk(logits_TE, config, bias_E, forced_TK, forced_weights, invariant)
    inv_kw = {"invariant": True} if invariant else {}  # (the default path's calls unchanged)
    scores_TE = _scores(logits_TE, config, **inv_kw)
    ids_TK = forced_TK if forced_TK is not None else _choose(scores_TE, config, bias_E, **inv_kw)
    weights_TK = scores_TE.gather(1, ids_TK)
    if forced_TK is None or forced_weights == "derived":
        weights_TK = _finish_weights(weights_TK, config, **inv_kw)
    return RoutingResult(topk_weights=weights_TK.float().contiguous(),
                         topk_ids=ids_TK.to(torch.int32).contiguous())


def check_fused_gate(value: object) -> FusedGate:
    """``fused_gate`` of ``EPMoE`` / ``gate_route_unsupported``: None -> FUSED_GATE_DEFAULT,
    else one of FUSED_GATE_MODES (TypeError / ValueError otherwise)."""
    if value is None:
        return FUSED_GATE_DEFAULT
    if not isinstance(value, str):  # fused_gate=True: which routers? say it
        raise TypeError(error_message(
            "fused_gate", repr(value), f"must be one of {FUSED_GATE_MODES} or None",
            "pass 'float32' (DeepSeek-V3-style float32 gates), 'all', 'off', or None (the "
            f"default, {FUSED_GATE_DEFAULT!r})"))
    if value not in FUSED_GATE_MODES:
        raise ValueError(error_message("fused_gate", repr(value),
                                       f"must be one of {FUSED_GATE_MODES} or None", "pick one"))
    return value  # type: ignore[return-value]


def gate_route_unsupported(hidden_TH: torch.Tensor, gate_weight_EH: torch.Tensor,
                           config: RouterConfig, *, mode: FusedGate = "all",
                           gate_bias_E: torch.Tensor | None = None) -> str | None:
    """Why ``gate_route`` (Triton gate GEMM + router) cannot or should not run here under
    ``mode`` (``check_fused_gate``'s value), or None. The torch path (gate GEMM, ``route``)
    runs instead: on CPUs, in autograd, with a gate bias, float64, and for routers the Triton
    router does not implement (``_routing_triton.config_unsupported``)."""
    mode = check_fused_gate(mode)  # (a value assigned to EPMoE.fused_gate after __init__)
    if mode == "off":
        return "fused_gate='off'"
    if mode == "float32" and not config.logits_in_float32:
        return "fused_gate='float32' and this router's gate GEMM is in the model dtype"
    if hidden_TH.dim() == 2 and hidden_TH.shape[0] > FUSED_GATE_MAX_TOKENS:
        return (f"{hidden_TH.shape[0]} tokens > FUSED_GATE_MAX_TOKENS = {FUSED_GATE_MAX_TOKENS} "
                "(the Triton gate serves decode-sized batches; torch's GEMM runs larger ones)")
    if not _on_gpu(hidden_TH) or library_version("triton") is None:
        return f"hidden states on {hidden_TH.device} (Triton's gate GEMM runs on GPUs)"
    return _gate_unsupported(hidden_TH, gate_weight_EH, config, gate_bias_E)


def _gate_unsupported(hidden_TH: torch.Tensor, gate_weight_EH: torch.Tensor,
                      config: RouterConfig, gate_bias_E: torch.Tensor | None) -> str | None:
    """What ``gate_route`` cannot compute on any device, or None."""
    if torch.is_grad_enabled() and (hidden_TH.requires_grad or gate_weight_EH.requires_grad):
        return "autograd records the gate (the Triton gate GEMM has no backward)"
    if gate_bias_E is not None:
        return "the gate has a bias (gpt-oss)"
    for name, t in (("hidden_states", hidden_TH), ("gate weight", gate_weight_EH)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"{name} dtype {t.dtype} (float16, bfloat16 or float32 only)"
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) or t.device != hidden_TH.device:
            return f"{name} must be a 2-D tensor on {hidden_TH.device} with unit stride along H"
    from rocm_moe._routing_triton import config_unsupported

    return config_unsupported(config)


def _on_gpu(t: torch.Tensor) -> bool:
    """The automatic choice takes the Triton gate on GPU tensors only (tests patch this to run
    it under the interpreter)."""
    return t.is_cuda


def gate_route(
    hidden_TH: torch.Tensor,
    gate_weight_EH: torch.Tensor,
    config: RouterConfig,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    validate: bool = True,
) -> RoutingResult:
    """Gate GEMM and router in two Triton launches (``rocm_moe._gate_triton``): the weight
    read as stored (bf16 for DeepSeek-V3), split over H and experts so that every SM streams
    it, the products formed in float32 (exact for bf16 / fp16 operands, IEEE float32 for
    float32 ones), the split-K partials summed in a fixed order inside the router's launch.

    The logits are those of ``F.linear(x.float(), W.float())`` for float32-gate routers
    (``config.logits_in_float32``) up to the order of the float32 additions (relative error
    ~1e-7 of sum |x w|), else of ``F.linear(x, W)`` rounded once to x's dtype; routed as
    ``route(fused=True)`` routes them. Deterministic, capturable (no host read with
    ``validate=False``), not batch-invariant. Runs on GPUs (and under TRITON_INTERPRET=1);
    ``gate_route_unsupported`` says where it cannot (``EPMoE(fused_gate=...)`` then takes the
    torch path).

    Args:
        hidden_TH: [T, H] float16 / bfloat16 / float32 tokens.
        gate_weight_EH: [E, H] float16 / bfloat16 / float32 gate weight (no bias).
        config: the ``RouterConfig``.
        e_score_correction_bias: [E] floating (sigmoid routers), or None.
        validate: check the logits (NaN, +inf: one host read, skipped under capture) after
            they are computed, as ``route`` checks them.

    Example (a test asserts it): x [[1, 2]], W [[3, 4], [5, 6]], softmax, K = 1, no
    normalisation -> ids [[1]], weights [[sigmoid(17 - 11)]] = [[0.99753]].
    """
    check_tensor("hidden_states", hidden_TH, dtypes=FLOAT_DTYPES)
    check_tensor("gate_weight", gate_weight_EH, shape=(config.num_experts, None),
                 dtypes=FLOAT_DTYPES)
    if hidden_TH.dim() != 2 or hidden_TH.shape[1] != gate_weight_EH.shape[1]:
        raise ValueError(error_message(
            "hidden_states.shape", list(hidden_TH.shape),
            f"must be [T, H] with H = gate_weight.shape[1] = {gate_weight_EH.shape[1]}",
            "flatten [B, S, H] to [B * S, H]"))
    if not isinstance(validate, bool):
        raise TypeError(error_message("validate", repr(validate), "must be a bool",
                                      "pass True or False"))
    if e_score_correction_bias is not None:
        if config.scoring != "sigmoid":
            raise ValueError(error_message(
                "e_score_correction_bias", "a tensor", "only sigmoid routers take a bias here",
                "drop it, or route a softmax router with choice_bias through route()"))
        check_tensor("e_score_correction_bias", e_score_correction_bias,
                     shape=(config.num_experts,), dtypes=FLOAT_DTYPES)
        e_score_correction_bias = e_score_correction_bias.to(hidden_TH.device).contiguous()
        if validate:
            check_finite("e_score_correction_bias", e_score_correction_bias,
                         "load the router's bias from the checkpoint again")
    why = None if triton_runs_on(hidden_TH.device) else \
        f"hidden states on {hidden_TH.device}: Triton runs on CUDA/ROCm devices"
    why = why or _gate_unsupported(hidden_TH, gate_weight_EH, config, None)
    if why is not None:
        raise ValueError(error_message("gate_route", why, "is outside the Triton gate",
                                       "compute the logits with the gate and call route()"))
    from rocm_moe._gate_triton import gate_route as _gate_route

    routing, logits_TE = _gate_route(x_TH=hidden_TH, weight_EH=gate_weight_EH, config=config,
                                     bias_E=e_score_correction_bias)
    if validate:
        _check_logits(logits_TE, config.top_k)
    return routing
