"""Inputs an audit of the public surface (2026-12-08) found accepted silently, or failing deep
inside torch with an AttributeError / IndexError; each is now refused naming the field, the
value, the rule and a fix. (Dispatchers, the layer, experts, placement, the environment and the
CLI have theirs beside their other bad-input tests.)"""

from types import SimpleNamespace

import pytest
import torch

from rocm_moe import EPMoE, ExpertsOutput, RouterConfig, dense_moe_reference, route
from rocm_moe.families import family
from rocm_moe.weighting import weight_once

E, K, H, I = 4, 2, 8, 4


def _qwen3_config(**over):
    cfg = dict(model_type="qwen3_moe", num_experts=E, num_experts_per_tok=K,
               norm_topk_prob=True, hidden_size=H, moe_intermediate_size=I)
    return SimpleNamespace(**{**cfg, **over})


def test_route_needs_a_router_config_and_ids_for_raw_weights():
    logits = torch.randn(3, E)
    with pytest.raises(TypeError, match=r"config=dict: must be a RouterConfig"):
        route(logits, {"num_experts": E, "top_k": K})
    with pytest.raises(ValueError, match=r"forced_weights='raw': says how to weight "
                       r"forced_expert_ids, and none are given"):
        route(logits, RouterConfig.qwen3_moe(E, K), forced_weights="raw")


@pytest.mark.parametrize(("over", "exc", "match"), [
    (dict(num_experts_per_tok=None), TypeError, r"config.num_experts_per_tok=None: must be int"),
    (dict(norm_topk_prob="false"), TypeError, r"config.norm_topk_prob='false': must be bool"),
    (dict(num_experts=8.0), TypeError, r"config.num_experts=8.0: must be int"),
])
def test_hf_config_values_are_not_coerced(over, exc, match):
    """norm_topk_prob="false" became True through bool(); a missing or None key was an
    AttributeError / TypeError from deep inside."""
    with pytest.raises(exc, match=match):
        RouterConfig.from_hf_config(_qwen3_config(**over))


def test_hf_config_missing_key_named():
    cfg = _qwen3_config()
    del cfg.num_experts_per_tok
    with pytest.raises(ValueError, match=r"config.num_experts_per_tok=missing: the qwen3_moe "):
        family("qwen3_moe").router_kwargs(cfg)
    ds = SimpleNamespace(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, n_group=1, topk_group=1, routed_scaling_factor=None)
    with pytest.raises(TypeError, match=r"config.routed_scaling_factor=None: must be int or "
                       "float"):
        RouterConfig.from_hf_config(ds)


def test_weight_once_checks_ids_and_weights():
    raw = ExpertsOutput(out=torch.randn(3, K, H), weights_applied=False)
    w, ids = torch.rand(3, K), torch.tensor([[0, 1], [2, 3], [1, -1]])
    with pytest.raises(TypeError, match=r"topk_ids.dtype=torch.float32"):
        weight_once(raw, w, ids.float(), None)
    with pytest.raises(TypeError, match=r"topk_weights.dtype=torch.float16"):
        weight_once(raw, w.half(), ids, None)
    assert weight_once(raw, w, ids, None).shape == (3, H)


def test_reset_parameters_seed_is_an_int():
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K))
    for seed, exc in ((1.5, TypeError), ("a", TypeError), (-1, ValueError)):
        with pytest.raises(exc, match=f"seed={seed!r}" if exc is TypeError else "seed=-1"):
            layer.reset_parameters(seed)


def test_dense_moe_reference_checks_its_inputs():
    x, w = torch.randn(2, H), torch.rand(2, K)
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    for ids, exc, match in ((torch.tensor([[0, 9], [1, 2]]), ValueError, r"topk_ids.*9"),
                            (torch.tensor([[0, -3], [1, 2]]), ValueError, r"topk_ids.*-3"),
                            (torch.tensor([[0.0, 1.7], [1, 2]]), TypeError, "topk_ids.dtype")):
        with pytest.raises(exc, match=match):
            dense_moe_reference(x, w, ids, w13, w2)
    with pytest.raises(ValueError, match=r"topk_weights.shape=\[2, 1\]"):
        dense_moe_reference(x, w[:, :1], torch.tensor([[0, 1], [1, 2]]), w13, w2)
    y, raw = dense_moe_reference(x, w, torch.tensor([[0, -1], [1, 2]]), w13, w2)
    assert y.shape == (2, H)
    assert raw.shape == (2, K, H)
