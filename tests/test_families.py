"""The family table against transformers configs: router, sizes and tensor names per family."""

from __future__ import annotations

import pytest

from rocm_moe.families import FAMILIES, ExpertTensors, family
from rocm_moe.routing import RouterConfig

transformers = pytest.importorskip("transformers")


def _config(name: str):
    """A transformers config of family ``name`` with non-default router settings, so a field
    read from the wrong key (or not read) shows."""
    common = dict(hidden_size=32, num_experts_per_tok=3, num_hidden_layers=2)
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, num_experts=12, moe_intermediate_size=16,
                                           intermediate_size=48, norm_topk_prob=False)
    if name == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, num_experts=12, moe_intermediate_size=16,
                                           intermediate_size=48, norm_topk_prob=True)
    if name == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=12, intermediate_size=16)
    if name in ("glm4_moe", "dots1"):
        cls = transformers.Glm4MoeConfig if name == "glm4_moe" else transformers.Dots1Config
        return cls(**common, n_routed_experts=12, moe_intermediate_size=16, intermediate_size=48,
                   n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5)
    if name == "olmoe":
        return transformers.OlmoeConfig(**common, num_experts=12, intermediate_size=16,
                                        norm_topk_prob=True)
    if name == "qwen3_next":
        return transformers.Qwen3NextConfig(**common, num_experts=12, moe_intermediate_size=16,
                                            intermediate_size=48, norm_topk_prob=False)
    if name == "ernie4_5_moe":
        return transformers.Ernie4_5_MoeConfig(**common, moe_num_experts=12,
                                               moe_intermediate_size=16, intermediate_size=48)
    if name == "qwen3_vl_moe":
        return transformers.Qwen3VLMoeConfig(text_config=dict(
            **common, num_experts=12, moe_intermediate_size=16, intermediate_size=48))
    if name == "llama4_vl":
        return transformers.Llama4Config(text_config=dict(
            **common, num_local_experts=12, intermediate_size=16))
    if name == "llama4":
        return transformers.Llama4TextConfig(**common, num_local_experts=12, intermediate_size=16)
    if name == "gpt_oss":
        return transformers.GptOssConfig(**common, num_local_experts=12, intermediate_size=16)
    if name == "longcat_flash":  # 12 routed + 4 zero-computation experts
        return transformers.LongcatFlashConfig(
            hidden_size=32, moe_topk=3, num_hidden_layers=2, n_routed_experts=12,
            zero_expert_num=4, expert_ffn_hidden_size=16, routed_scaling_factor=1.5)
    assert name == "deepseek_v3"
    return transformers.DeepseekV3Config(**common, n_routed_experts=12, moe_intermediate_size=16,
                                         intermediate_size=48, n_group=4, topk_group=2,
                                         norm_topk_prob=False, routed_scaling_factor=1.5)


# What each family's router must be, written with the RouterConfig family constructors.
EXPECTED_ROUTER = {
    "qwen3_moe": RouterConfig.qwen3_moe(12, 3, norm_topk_prob=False),
    "qwen2_moe": RouterConfig.qwen3_moe(12, 3, norm_topk_prob=True),
    "mixtral": RouterConfig.mixtral(12, 3),
    "deepseek_v3": RouterConfig.deepseek_v3(12, 3, n_group=4, topk_group=2,
                                            norm_topk_prob=False, routed_scaling_factor=1.5),
    "gpt_oss": RouterConfig.gpt_oss(12, 3),
    "longcat_flash": RouterConfig(num_experts=16, top_k=3, norm_topk_prob=False,
                                  routed_scaling_factor=1.5, choice_bias=True, zero_experts=4,
                                  float32_logits=True),
    "llama4": RouterConfig.llama4(12, 3),
    "llama4_vl": RouterConfig.llama4(12, 3),
    "qwen3_vl_moe": RouterConfig.qwen3_moe(12, 3),
    "ernie4_5_moe": RouterConfig(num_experts=12, top_k=3, choice_bias=True),
    "glm4_moe": RouterConfig.deepseek_v3(12, 3, n_group=4, topk_group=2, norm_topk_prob=False,
                                         routed_scaling_factor=1.5),
    "dots1": RouterConfig.deepseek_v3(12, 3, n_group=4, topk_group=2, norm_topk_prob=False,
                                      routed_scaling_factor=1.5),
    "olmoe": RouterConfig.qwen3_moe(12, 3, norm_topk_prob=True),
    "qwen3_next": RouterConfig.qwen3_moe(12, 3, norm_topk_prob=False),
}


def test_every_family_is_covered_here():
    assert set(FAMILIES) == set(EXPECTED_ROUTER)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_router_and_sizes_round_trip(name):
    cfg = _config(name)
    fam = family(cfg.model_type)
    assert fam is FAMILIES[name]
    assert cfg.model_type in fam.model_types
    assert RouterConfig(**fam.router_kwargs(cfg)) == EXPECTED_ROUTER[name]
    assert RouterConfig.from_hf_config(cfg) == EXPECTED_ROUTER[name]
    assert fam.intermediate_size(cfg) == 16


@pytest.mark.parametrize(("name", "expert", "shared", "shared_gate", "bias"), [
    ("qwen3_moe", ("mlp", "gate_proj", "up_proj", "down_proj"), None, None, None),
    ("qwen2_moe", ("mlp", "gate_proj", "up_proj", "down_proj"), "shared_expert",
     "model.layers.3.mlp.shared_expert_gate.weight", None),
    ("mixtral", ("block_sparse_moe", "w1", "w3", "w2"), None, None, None),
    ("deepseek_v3", ("mlp", "gate_proj", "up_proj", "down_proj"), "shared_experts", None,
     "model.layers.3.mlp.gate.e_score_correction_bias"),
    ("glm4_moe", ("mlp", "gate_proj", "up_proj", "down_proj"), "shared_experts", None,
     "model.layers.3.mlp.gate.e_score_correction_bias"),
    ("dots1", ("mlp", "gate_proj", "up_proj", "down_proj"), "shared_experts", None,
     "model.layers.3.mlp.gate.e_score_correction_bias"),
    ("olmoe", ("mlp", "gate_proj", "up_proj", "down_proj"), None, None, None),
    ("ernie4_5_moe", ("mlp", "gate_proj", "up_proj", "down_proj"), "shared_experts", None,
     "model.layers.3.mlp.moe_statics.e_score_correction_bias"),
    ("qwen3_next", ("mlp", "gate_proj", "up_proj", "down_proj"), "shared_expert",
     "model.layers.3.mlp.shared_expert_gate.weight", None),
])
def test_checkpoint_tensor_names(name, expert, shared, shared_gate, bias):
    """Per-expert families (the fused ones: their own test files)."""
    fam = FAMILIES[name]
    block, g, u, d = expert
    p = f"model.layers.3.{block}"
    assert fam.gate_weight(3) == f"{p}.gate.weight"
    assert fam.expert_tensors(3, 7) == ExpertTensors(
        f"{p}.experts.7.{g}.weight", f"{p}.experts.7.{u}.weight", f"{p}.experts.7.{d}.weight")
    want_shared = None if shared is None else ExpertTensors(
        *(f"{p}.{shared}.{n}_proj.weight" for n in ("gate", "up", "down")))
    assert fam.shared_expert_tensors(3) == want_shared
    assert fam.shared_expert_gate_weight(3) == shared_gate
    assert fam.router_bias_tensor(3) == bias


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"'llama'.*qwen3_moe.*mixtral.*Fix: build RouterConfig"):
        RouterConfig.from_hf_config(transformers.LlamaConfig())
    with pytest.raises(ValueError, match=r"supported MoE families.*Fix: do this"):
        family("llama", fix="do this")
