"""Model families: everything rocm_moe knows about one family of transformers MoE models, in one
frozen record per family.

A family says which transformers ``config.model_type`` values it covers, where its MoE block's
tensors live in a checkpoint, how its router is configured from the transformers config, whether
it has shared experts, and which config key holds the routed experts' intermediate size. Routing
(``RouterConfig.from_hf_config``), checkpoint loading (``rocm_moe.integrations.hf``) and the CLI
read it from here; none of them branches on a model type.

    fam = family("deepseek_v3")               # or family(hf_config.model_type)
    fam.expert_tensors(3, 17)                 # ExpertTensors(gate=..., up=..., down=...)
    fam.router_kwargs(hf_config)              # RouterConfig(**...) fields
    fam.intermediate_size(hf_config)          # I of the routed experts

Two checkpoint layouts: one tensor per expert projection (``experts.{e}.gate_proj.weight``,
Qwen, DeepSeek, GLM, OLMoE, ...) or fused tensors over all experts (``fused_experts``: gpt-oss
and Llama 4 hold ``experts.gate_up_proj`` [E, H, 2I] and ``experts.down_proj`` [E, I, H], the
transformers block's own layout; gpt-oss interleaves gate and up columns and has biases;
Qwen3-VL-MoE's are read in either orientation, their shapes tell). A VL model's family reads
its MoE fields from ``config.text_config`` and its layers under its language model.
A family also says what its experts compute (``expert_variant``) and how its router scores
(after the top-k for gpt-oss and Llama 4, a gate bias for gpt-oss).

Adding a family: one ``ModelFamily(...)`` in the table below, its config in
``tests/test_families.py`` and a ``Tiny`` row in ``FAMILIES`` of ``tests/test_families_parity.py``
(parity with the transformers block in float32 and bf16, loading of this rank's experts only,
``rocm-moe run --checkpoint`` at W = 1 and 2), with the helpers of ``tests/families_parity.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rocm_moe._checks import error_message

if TYPE_CHECKING:
    from rocm_moe.experts.base import ExpertVariant

PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")  # Qwen/DeepSeek expert and shared names


@dataclass(frozen=True)
class ExpertTensors:
    """Checkpoint names of one expert MLP's three weights: gate [I, H], up [I, H], down [H, I]."""

    gate: str
    up: str
    down: str


@dataclass(frozen=True, kw_only=True)
class FusedExpertTensors:
    """Checkpoint names of a fused family's expert tensors: gate_up [E, H, 2I], down [E, I, H]
    and, where the family has them, their biases [E, 2I] and [E, H]."""

    gate_up: str
    down: str
    gate_up_bias: str | None = None
    down_bias: str | None = None


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """One family of transformers MoE models (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]  # transformers config.model_type values it covers
    block: str  # the MoE block's name in a decoder layer: model.layers.{n}.{block}
    expert_names: tuple[str, str, str] = PROJ_NAMES  # an expert's (gate, up, down) names
    shared_experts: str | None = None  # the shared experts' name in the block, if any
    shared_expert_gate: str | None = None  # the shared output's sigmoid gate (Qwen2-MoE)
    router_bias: str | None = None  # the router's choice bias in the block (DeepSeek-V3)
    choice_bias: bool = False  # a softmax router with a choice bias (ERNIE 4.5)
    intermediate_size_key: str  # config key of the routed experts' intermediate size I
    num_experts_key: str  # config key of the routed expert count E
    scoring: str = "softmax"  # the router's scoring, RouterConfig.scoring
    norm_topk_prob_key: str | None = "norm_topk_prob"  # None: ``norm_topk_prob`` below
    norm_topk_prob: bool = True  # the family's fixed choice where its config has no key
    grouped_router: bool = False  # n_group, topk_group, routed_scaling_factor from the config
    router: str = "gate"  # the router linear's path in the block (gpt-oss, Llama 4: "router";
    #                       LongCat-Flash: "router.classifier")
    gate_bias: bool = False  # the router linear has a bias, part of the logits (gpt-oss)
    score_after_topk: bool = False  # top-k of the logits, then scored (gpt-oss, Llama 4)
    fused_experts: bool = False  # experts.gate_up_proj [E, H, 2I], experts.down_proj [E, I, H]
    interleaved_gate_up: bool = False  # gate_up_proj's columns alternate gate, up (gpt-oss)
    activation: str = "silu"  # ExpertVariant.activation of the routed experts
    expert_bias: bool = False  # the routed experts' projections have biases (gpt-oss)
    weights_on_input: bool = False  # the routing weight scales the expert's input (Llama 4)
    unsupported_flags: tuple[str, ...] = ()  # config flags whose models rocm_moe cannot run
    fused_hidden_first: bool = True  # a fused family's block holds [E, H, 2I] / [E, I, H]
    block_returns_tuple: bool = False  # the block returns (hidden_states, router scores)
    layers_prefix: str = "model.layers"  # the decoder layers (a VL model: its language model)
    text_config: bool = False  # the MoE fields live in config.text_config (a VL model)
    # config key of the zero-computation (identity) expert count, RouterConfig.zero_experts:
    # the router scores num_experts_key + this many experts (LongCat-Flash)
    zero_experts_key: str | None = None
    scaled_router: bool = False  # routed_scaling_factor from the config (ungrouped routers)
    float32_gate: bool = False  # the router's gate GEMM is float32 (LongCat-Flash)

    def text(self, config):
        """The config holding the MoE fields: ``config.text_config`` for a VL model's config,
        else ``config`` itself (its text config passes through too)."""
        return getattr(config, "text_config", None) or config if self.text_config else config

    def hidden_size(self, config) -> int:
        """H from a transformers config of this family."""
        return self.text(config).hidden_size

    def check_config(self, config, *, where: str) -> None:
        """A ValueError naming the first of ``unsupported_flags`` set in ``config`` (ERNIE 4.5's
        use_bias gives its shared experts biases, which rocm_moe's shared experts lack)."""
        for flag in self.unsupported_flags:
            if getattr(config, flag, False):
                raise ValueError(error_message(
                    f"config.{flag}", repr(getattr(config, flag)), f"{where}: rocm_moe runs "
                    f"{self.name} models only with {flag} off", "run this model's MoE blocks "
                    "with its own implementation"))

    def block_prefix(self, layer: int) -> str:
        """``model.layers.{layer}.{block}``, the prefix of every tensor of that MoE block."""
        return f"{self.layers_prefix}.{layer}.{self.block}"

    def gate_weight(self, layer: int) -> str:
        """The router's [E, H] weight."""
        return f"{self.block_prefix(layer)}.{self.router}.weight"

    def gate_bias_tensor(self, layer: int) -> str | None:
        """The router linear's [E] bias (part of the logits), or None."""
        return f"{self.block_prefix(layer)}.{self.router}.bias" if self.gate_bias else None

    def router_bias_tensor(self, layer: int) -> str | None:
        """The router's [E] choice bias, or None for families without one."""
        if self.router_bias is None:
            return None
        return f"{self.block_prefix(layer)}.{self.router_bias}"

    def expert_tensors(self, layer: int, expert: int) -> ExpertTensors:
        """Routed expert ``expert``'s three weights in layer ``layer`` (per-expert layout)."""
        if self.fused_experts:
            raise ValueError(error_message(
                "family", self.name, "holds its experts in fused tensors, not one per expert",
                "use fused_expert_tensors(layer)"))
        prefix = f"{self.block_prefix(layer)}.experts.{expert}"
        return ExpertTensors(*(f"{prefix}.{n}.weight" for n in self.expert_names))

    def fused_expert_tensors(self, layer: int) -> FusedExpertTensors:
        """A fused family's expert tensors in layer ``layer`` (every expert in each)."""
        p = f"{self.block_prefix(layer)}.experts"
        return FusedExpertTensors(
            gate_up=f"{p}.gate_up_proj", down=f"{p}.down_proj",
            gate_up_bias=f"{p}.gate_up_proj_bias" if self.expert_bias else None,
            down_bias=f"{p}.down_proj_bias" if self.expert_bias else None)

    def expert_variant(self, config) -> ExpertVariant:
        """What this family's routed experts compute (gpt-oss: alpha and limit from config)."""
        from rocm_moe.experts.base import ExpertVariant

        kw = {}
        if self.activation == "swiglu_oai":
            # transformers before swiglu_alpha became a config field (5.17 has none) hard-code
            # alpha = 1.702 in GptOssExperts: the same default here
            kw = dict(alpha=float(getattr(config, "swiglu_alpha", 1.702)),
                      limit=float(config.swiglu_limit))
        return ExpertVariant(activation=self.activation, bias=self.expert_bias,
                             weights_on_input=self.weights_on_input, **kw)

    def shared_expert_tensors(self, layer: int) -> ExpertTensors | None:
        """The shared experts' three weights (gate_proj, up_proj, down_proj), or None."""
        if self.shared_experts is None:
            return None
        prefix = f"{self.block_prefix(layer)}.{self.shared_experts}"
        return ExpertTensors(*(f"{prefix}.{n}.weight" for n in PROJ_NAMES))

    def shared_expert_gate_weight(self, layer: int) -> str | None:
        """The shared output's [1, H] sigmoid gate, or None for families without one."""
        if self.shared_expert_gate is None:
            return None
        return f"{self.block_prefix(layer)}.{self.shared_expert_gate}.weight"

    def _key(self, config, key: str, kind: type | tuple[type, ...] = int):
        """``config.<key>``, present and of ``kind`` (a bool is not an int here), else an error
        naming the key: a missing key was an AttributeError, "false" became True by bool()."""
        if not hasattr(config, key):
            raise ValueError(error_message(f"config.{key}", "missing", f"the {self.name} "
                                           "family reads it", "pass the model's own config"))
        value = getattr(config, key)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(
                k.__name__ for k in kind)
            raise TypeError(error_message(f"config.{key}", repr(value), f"must be {names}",
                                          "pass the model's own config"))
        return value

    def router_kwargs(self, config) -> dict:
        """``RouterConfig`` fields read from a transformers config of this family."""
        config = self.text(config)
        kw = dict(num_experts=self._key(config, self.num_experts_key),
                  top_k=self._key(config, "num_experts_per_tok"), scoring=self.scoring,
                  norm_topk_prob=self.norm_topk_prob if self.norm_topk_prob_key is None
                  else self._key(config, self.norm_topk_prob_key, bool),
                  score_after_topk=self.score_after_topk, gate_bias=self.gate_bias,
                  choice_bias=self.choice_bias)
        if self.grouped_router:
            kw.update(n_group=self._key(config, "n_group"),
                      topk_group=self._key(config, "topk_group"))
        if self.grouped_router or self.scaled_router:
            kw.update(routed_scaling_factor=float(self._key(config, "routed_scaling_factor",
                                                            (int, float))))
        if self.float32_gate:
            kw.update(float32_logits=True)
        if self.zero_experts_key is not None:
            zero = self.zero_experts(config)
            kw.update(num_experts=kw["num_experts"] + zero, zero_experts=zero)
        return kw

    def zero_experts(self, config) -> int:
        """The zero-computation experts of a (text) transformers config (0 without them)."""
        if self.zero_experts_key is None:
            return 0
        return getattr(config, self.zero_experts_key) or 0

    def intermediate_size(self, config) -> int:
        """The routed experts' intermediate size I from a transformers config."""
        return getattr(self.text(config), self.intermediate_size_key)


_FAMILIES: list[ModelFamily] = [
    ModelFamily(name="qwen3_moe", model_types=("qwen3_moe",), block="mlp",
                intermediate_size_key="moe_intermediate_size", num_experts_key="num_experts"),
    ModelFamily(name="qwen2_moe", model_types=("qwen2_moe",), block="mlp",
                shared_experts="shared_expert", shared_expert_gate="shared_expert_gate",
                intermediate_size_key="moe_intermediate_size", num_experts_key="num_experts"),
    ModelFamily(name="mixtral", model_types=("mixtral",), block="block_sparse_moe",
                expert_names=("w1", "w3", "w2"), intermediate_size_key="intermediate_size",
                num_experts_key="num_local_experts", norm_topk_prob_key=None),
    # Kimi K2 is a DeepSeek-V3 model (384 experts, one group); its config.json says "kimi_k2"
    ModelFamily(name="deepseek_v3", model_types=("deepseek_v3", "kimi_k2"), block="mlp",
                shared_experts="shared_experts", router_bias="gate.e_score_correction_bias",
                intermediate_size_key="moe_intermediate_size",
                num_experts_key="n_routed_experts", scoring="sigmoid", grouped_router=True),
    # GLM-4.5 and dots.llm1: DeepSeek-V3's grouped sigmoid router with their own group counts
    ModelFamily(name="glm4_moe", model_types=("glm4_moe",), block="mlp",
                shared_experts="shared_experts", router_bias="gate.e_score_correction_bias",
                intermediate_size_key="moe_intermediate_size",
                num_experts_key="n_routed_experts", scoring="sigmoid", grouped_router=True),
    ModelFamily(name="dots1", model_types=("dots1",), block="mlp",
                shared_experts="shared_experts", router_bias="gate.e_score_correction_bias",
                intermediate_size_key="moe_intermediate_size",
                num_experts_key="n_routed_experts", scoring="sigmoid", grouped_router=True),
    # OLMoE and Qwen3-Next: Qwen's softmax router (Qwen3-Next: a gated shared expert)
    ModelFamily(name="olmoe", model_types=("olmoe",), block="mlp",
                intermediate_size_key="intermediate_size", num_experts_key="num_experts"),
    ModelFamily(name="qwen3_next", model_types=("qwen3_next",), block="mlp",
                shared_experts="shared_expert", shared_expert_gate="shared_expert_gate",
                intermediate_size_key="moe_intermediate_size", num_experts_key="num_experts"),
    # Llama 4's text MoE: sigmoid of the top-k logit, weight on the input, a shared expert
    ModelFamily(name="llama4", model_types=("llama4_text",), block="feed_forward",
                router="router", scoring="sigmoid", score_after_topk=True, fused_experts=True,
                weights_on_input=True, shared_experts="shared_expert", block_returns_tuple=True,
                intermediate_size_key="intermediate_size", num_experts_key="num_local_experts",
                norm_topk_prob_key=None, norm_topk_prob=False),
    # ERNIE 4.5 MoE: softmax router whose bias (moe_statics) shifts the choice; shared experts
    ModelFamily(name="ernie4_5_moe", model_types=("ernie4_5_moe",), block="mlp",
                shared_experts="shared_experts",
                router_bias="moe_statics.e_score_correction_bias", choice_bias=True,
                unsupported_flags=("use_bias",),
                intermediate_size_key="moe_intermediate_size", num_experts_key="moe_num_experts",
                norm_topk_prob_key=None),
    # Qwen3-VL-MoE's language model: Qwen's router (always normalised), fused experts on disk
    # ([E, 2I, H] as transformers 5 saves them, [E, H, 2I] in Qwen's release: either is read)
    ModelFamily(name="qwen3_vl_moe", model_types=("qwen3_vl_moe", "qwen3_vl_moe_text"),
                block="mlp", fused_experts=True, fused_hidden_first=False,
                layers_prefix="model.language_model.layers", text_config=True,
                intermediate_size_key="moe_intermediate_size", num_experts_key="num_experts",
                norm_topk_prob_key=None),
    # LongCat-Flash: softmax router over n_routed_experts + zero_expert_num (its last ids are
    # identity experts, RouterConfig.zero_experts) of float32 logits, a choice bias, no
    # normalisation, a scale; one tensor per expert on disk (experts.{e}.gate_proj, ... of the
    # E_r routed experts only; the block holds them fused [E_r, 2I, H] / [E_r, H, I]), the gate
    # nested in the router (router.classifier)
    ModelFamily(name="longcat_flash", model_types=("longcat_flash",), block="mlp",
                router="router.classifier", router_bias="router.e_score_correction_bias",
                choice_bias=True, scaled_router=True, zero_experts_key="zero_expert_num",
                float32_gate=True, unsupported_flags=("router_bias",),
                intermediate_size_key="expert_ffn_hidden_size",
                num_experts_key="n_routed_experts", norm_topk_prob_key=None,
                norm_topk_prob=False),
    ModelFamily(name="gpt_oss", model_types=("gpt_oss",), block="mlp", router="router",
                gate_bias=True, score_after_topk=True, fused_experts=True,
                interleaved_gate_up=True, activation="swiglu_oai", expert_bias=True,
                block_returns_tuple=True,
                intermediate_size_key="intermediate_size", num_experts_key="num_local_experts",
                norm_topk_prob_key=None),
]
# Llama 4's released checkpoints are its VL model: the same text MoE under language_model
_FAMILIES.append(replace(next(f for f in _FAMILIES if f.name == "llama4"), name="llama4_vl",
                         model_types=("llama4",), layers_prefix="language_model.model.layers",
                         text_config=True))
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in _FAMILIES}


# config.json model types transformers has no class for, read with another family's config
# class (Kimi K2's checkpoints say "kimi_k2" and ship DeepSeek-V3's code as remote code).
CONFIG_ALIASES = {"kimi_k2": "deepseek_v3"}


# transformers' names of the activation rocm_moe's SwiGLU experts compute (silu(gate) * up).
SILU_NAMES = ("silu", "swish")


def check_activation(config, *, where: str) -> None:
    """The model's experts are SwiGLU: ``config.hidden_act`` (default "silu") names SiLU, else
    a ValueError (a GELU model would otherwise run as SwiGLU and give wrong outputs)."""
    act = getattr(config, "hidden_act", "silu")
    if act not in SILU_NAMES:
        raise ValueError(error_message(
            "config.hidden_act", repr(act), f"rocm_moe experts are SwiGLU (silu(gate) * up); "
            f"{where} needs hidden_act in {list(SILU_NAMES)}",
            "run this model's experts with its own implementation"))


def family(model_type: str, *, fix: str = "build the layer by hand for other models"
           ) -> ModelFamily:
    """The family covering transformers ``config.model_type`` ``model_type``; a ValueError
    naming the supported ones (and ``fix``) otherwise."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    supported = [t for fam in FAMILIES.values() for t in fam.model_types]
    raise ValueError(error_message("config.model_type", repr(model_type),
                                   f"supported MoE families are {supported}", fix))
