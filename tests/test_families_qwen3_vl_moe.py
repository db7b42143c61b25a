"""Qwen3-VL-MoE's language model (qwen3_vl_moe): Qwen's always-normalised softmax router, fused
expert tensors under model.language_model (either orientation on disk), the MoE fields in
config.text_config; against transformers' own Qwen3VLMoeTextSparseMoeBlock."""

from __future__ import annotations

import pytest
import torch

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1
TEXT = dict(**{**fp.COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
            moe_intermediate_size=12, num_experts=12,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [1, 1, 2]})
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
              patch_size=2, temporal_patch_size=1, spatial_merge_size=1,
              deepstack_visual_indexes=[])


def _config():
    return transformers.Qwen3VLMoeConfig(text_config=TEXT, vision_config=VISION)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fp.save_tiny(_config(), tmp_path_factory.mktemp("qwen3_vl_moe"))


def test_router_from_the_vl_config_and_its_text_config():
    from rocm_moe import RouterConfig

    cfg = _config()
    assert RouterConfig.from_hf_config(cfg) == RouterConfig.qwen3_moe(12, 3)
    assert RouterConfig.from_hf_config(cfg.text_config) == RouterConfig.qwen3_moe(12, 3)


def test_parity_with_the_transformers_block(checkpoint):
    fp.check_parity(checkpoint, LAYER)


def test_hidden_first_checkpoint_reads_the_same(checkpoint, tmp_path):
    """Qwen's own release stores gate_up_proj [E, H, 2I] and down_proj [E, I, H]."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rocm_moe import Placement
    from rocm_moe.integrations import hf

    copy = tmp_path / "hidden_first"
    shutil.copytree(checkpoint, copy)
    for path in copy.glob("*.safetensors"):
        tensors = load_file(path)
        for name in list(tensors):
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    p = Placement.contiguous(12, 2)
    for rank in (0, 1):
        a = hf.load_moe_layer(checkpoint, LAYER, p, rank)
        b = hf.load_moe_layer(copy, LAYER, p, rank)
        assert torch.equal(a.w13, b.w13)
        assert torch.equal(a.w2, b.w2)


def test_loader_reads_only_this_ranks_experts(checkpoint):
    fp.check_local_experts_only(checkpoint, LAYER)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert "E=12 H=32 I=12 K=3" in out


def test_whole_model_single_rank(checkpoint):
    fp.check_whole_model(checkpoint, ep_layer_count=2)
