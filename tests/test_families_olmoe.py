"""OLMoE: Qwen's softmax router without normalisation of the top-k, no shared experts; against
transformers' own OlmoeSparseMoeBlock."""

from __future__ import annotations

import pytest

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1


def _config():
    return transformers.OlmoeConfig(**{**fp.COMMON, "num_experts_per_tok": 3},
                                    intermediate_size=12, num_experts=16, norm_topk_prob=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fp.save_tiny(_config(), tmp_path_factory.mktemp("olmoe"))


def test_parity_with_the_transformers_block(checkpoint):
    fp.check_parity(checkpoint, LAYER)


def test_loader_reads_only_this_ranks_experts(checkpoint):
    fp.check_local_experts_only(checkpoint, LAYER)


def test_whole_model_single_rank(checkpoint):
    fp.check_whole_model(checkpoint, ep_layer_count=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert "E=16 H=32 I=12 K=3" in out
