"""dots.llm1 (dots1): DeepSeek-V3's grouped sigmoid router with its own group counts, shared
experts, a dense first layer; against transformers' own Dots1MoE."""

from __future__ import annotations

import pytest

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1  # layer 0 is dense (first_k_dense_replace=1)


def _config():
    return transformers.Dots1Config(
        **{**fp.COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
        moe_intermediate_size=12, n_routed_experts=12, n_group=4, topk_group=2,
        first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True,
        routed_scaling_factor=2.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fp.save_tiny(_config(), tmp_path_factory.mktemp("dots1"))


def test_router_from_the_config():
    from rocm_moe import RouterConfig

    assert RouterConfig.from_hf_config(_config()) == RouterConfig.deepseek_v3(
        12, 3, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def test_parity_with_the_transformers_block(checkpoint):
    fp.check_parity(checkpoint, LAYER)


def test_loader_reads_only_this_ranks_experts(checkpoint):
    fp.check_local_experts_only(checkpoint, LAYER)


def test_whole_model_single_rank(checkpoint):
    fp.check_whole_model(checkpoint, ep_layer_count=1)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert "E=12 H=32 I=12 K=3" in out
