"""Kimi K2: a DeepSeek-V3 model with 384 routed experts in one group, whose config.json says
"kimi_k2" (transformers has no class of that name: read as DeepSeek-V3's); against transformers'
own DeepseekV3MoE."""

from __future__ import annotations

import json

import pytest

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1  # layer 0 is dense (first_k_dense_replace=1)


def _config():
    return transformers.DeepseekV3Config(
        **{**fp.COMMON, "num_key_value_heads": 4, "num_experts_per_tok": 8},
        intermediate_size=48, moe_intermediate_size=8, n_routed_experts=384, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1,
        routed_scaling_factor=2.827)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = fp.save_tiny(_config(), tmp_path_factory.mktemp("kimi_k2"))
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["model_type"] = "kimi_k2"  # as Kimi K2's own config.json
    path.write_text(json.dumps(data))
    return directory


def test_config_json_of_kimi_k2_reads_as_deepseek_v3(checkpoint):
    from rocm_moe import RouterConfig
    from rocm_moe.integrations import hf

    with pytest.raises(ValueError, match="kimi_k2"):  # transformers itself does not know it
        transformers.AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    cfg = hf.Checkpoint(checkpoint).config()
    assert RouterConfig.from_hf_config(cfg) == RouterConfig.kimi_k2(384, 8)


def test_parity_with_the_transformers_block(checkpoint, tmp_path):
    # transformers loads the model from a copy whose config.json says deepseek_v3
    import shutil

    copy = tmp_path / "as_deepseek_v3"
    shutil.copytree(checkpoint, copy)
    data = json.loads((copy / "config.json").read_text())
    data["model_type"] = "deepseek_v3"
    (copy / "config.json").write_text(json.dumps(data))
    fp.check_parity(copy, LAYER, tokens=9)  # (transformers' block loops over the experts hit)
    # ...and the kimi_k2 checkpoint itself gives the same layer
    from rocm_moe import Placement
    from rocm_moe.integrations import hf

    p = Placement.contiguous(384, 1)
    a, b = hf.load_moe_layer(copy, LAYER, p, 0), hf.load_moe_layer(checkpoint, LAYER, p, 0)
    assert a.router == b.router
    assert (a.w13 == b.w13).all()


def test_loader_reads_only_this_ranks_experts(checkpoint):
    fp.check_local_experts_only(checkpoint, LAYER, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert "E=384 H=32 I=8 K=8" in out
