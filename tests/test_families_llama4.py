"""Llama 4's text MoE (llama4_text): top-k of the logits with a sigmoid weight, the weight on the
expert's input (applied once), fused [E, H, 2I] experts, a shared expert; against transformers'
own Llama4TextMoe."""

from __future__ import annotations

import pytest

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1


def _config(top_k: int = 1):
    return transformers.Llama4TextConfig(
        **{**fp.COMMON, "num_experts_per_tok": top_k}, intermediate_size=12,
        intermediate_size_mlp=48, num_local_experts=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fp.save_tiny(_config(), tmp_path_factory.mktemp("llama4"))


def test_family_reads_the_config():
    from rocm_moe import RouterConfig
    from rocm_moe.experts.base import ExpertVariant
    from rocm_moe.families import family

    cfg = _config(2)
    assert RouterConfig.from_hf_config(cfg) == RouterConfig.llama4(8, 2)
    fam = family(cfg.model_type)
    assert fam.expert_variant(cfg) == ExpertVariant.llama4()
    assert fam.gate_weight(3) == "model.layers.3.feed_forward.router.weight"
    assert fam.shared_expert_tensors(3).gate == \
        "model.layers.3.feed_forward.shared_expert.gate_proj.weight"


def test_parity_with_the_transformers_block(checkpoint):
    fp.check_parity(checkpoint, LAYER)


def test_parity_top2(tmp_path):
    # K=2: transformers' dense formula (every expert on every token, -inf scores -> 0 input)
    fp.check_parity(fp.save_tiny(_config(2), tmp_path / "k2"), LAYER)


def test_loader_reads_only_this_ranks_experts(checkpoint):
    fp.check_local_experts_only(checkpoint, LAYER)


def test_whole_model_single_rank(checkpoint):
    fp.check_whole_model(checkpoint, ep_layer_count=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert "E=8 H=32 I=12 K=1" in out


# ---- the released checkpoints' form: the VL model (llama4), its text MoE under language_model
VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              image_size=8, patch_size=4, vision_output_dim=16, projector_input_dim=16,
              projector_output_dim=32, pixel_shuffle_ratio=0.5)


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    cfg = transformers.Llama4Config(text_config=_config().to_dict(), vision_config=VISION)
    return fp.save_tiny(cfg, tmp_path_factory.mktemp("llama4_vl"))


def test_vl_checkpoint_parity_and_local_loading(vl_checkpoint):
    from rocm_moe.families import family

    assert family("llama4").fused_expert_tensors(1).gate_up == \
        "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
    fp.check_parity(vl_checkpoint, LAYER)
    fp.check_local_experts_only(vl_checkpoint, LAYER)


def test_vl_checkpoint_run_two_ranks(vl_checkpoint, capsys):
    out = fp.check_run(vl_checkpoint, LAYER, 2, capsys)
    assert "E=8 H=32 I=12 K=1" in out
