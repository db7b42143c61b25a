"""Qwen3-Next: many experts with Qwen's softmax router and a shared expert behind a sigmoid
gate, beside linear-attention layers; against transformers' own Qwen3NextSparseMoeBlock."""

from __future__ import annotations

import pytest

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1


def _config():
    # 32 experts, K=4 ("many experts"); one linear-attention and one full-attention layer
    return transformers.Qwen3NextConfig(
        **{**fp.COMMON, "num_experts_per_tok": 4}, intermediate_size=48,
        moe_intermediate_size=12, num_experts=32, shared_expert_intermediate_size=20,
        norm_topk_prob=True, layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fp.save_tiny(_config(), tmp_path_factory.mktemp("qwen3_next"))


def test_parity_with_the_transformers_block(checkpoint):
    fp.check_parity(checkpoint, LAYER)


def test_loader_reads_only_this_ranks_experts(checkpoint):
    fp.check_local_experts_only(checkpoint, LAYER)


def test_whole_model_single_rank(checkpoint):
    fp.check_whole_model(checkpoint, ep_layer_count=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert "E=32 H=32 I=12 K=4" in out
