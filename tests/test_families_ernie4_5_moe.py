"""ERNIE 4.5 MoE (ernie4_5_moe): a softmax router whose bias (moe_statics, [1, E] on disk)
shifts the choice but never the weights, shared experts, a dense first layer; against
transformers' own Ernie4_5_MoeSparseMoeBlock."""

from __future__ import annotations

import pytest

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1  # layer 0 is dense (moe_layer_start_index=1)


def _config(**kw):
    return transformers.Ernie4_5_MoeConfig(
        **{**fp.COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
        moe_intermediate_size=12, moe_num_experts=12, moe_num_shared_experts=1,
        moe_layer_start_index=1, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fp.save_tiny(_config(), tmp_path_factory.mktemp("ernie4_5_moe"))


def test_router_and_bias(checkpoint):
    from rocm_moe import Placement, RouterConfig
    from rocm_moe.integrations import hf

    assert RouterConfig.from_hf_config(_config()) == RouterConfig(
        num_experts=12, top_k=3, choice_bias=True)
    w = hf.load_moe_layer(checkpoint, LAYER, Placement.contiguous(12, 1), 0)
    assert w.e_score_correction_bias.shape == (12,)
    assert w.e_score_correction_bias.abs().sum() > 0  # the [1, E] tensor was read


def test_use_bias_is_refused(tmp_path):
    from rocm_moe import LocalDispatcher, Placement
    from rocm_moe.integrations import hf

    directory = fp.save_tiny(_config(use_bias=True), tmp_path / "biased")
    with pytest.raises(ValueError, match=r"config.use_bias=True: .* only with use_bias off"):
        hf.load_moe_layer(directory, LAYER, Placement.contiguous(12, 1), 0)
    model = fp.load_model(directory)
    with pytest.raises(ValueError, match=r"config.use_bias=True"):
        hf.replace_moe_blocks(model, lambda: LocalDispatcher(Placement.contiguous(12, 1)))


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
