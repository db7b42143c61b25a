"""The families of issue 30 against transformers' own MoE blocks: one table of tiny random
checkpoints (FAMILIES), one test per check parametrised over it (parity in float32 and bf16 from
the block and from the checkpoint, this rank's experts only, the whole model on one rank,
``rocm-moe run --checkpoint`` at W = 1 and 2), then what only one family has, under its name.
The checks themselves are in tests/families_parity.py; Kimi K2 (a config.json transformers
cannot read) and gpt-oss (biased, clamped experts) have their own files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from rocm_moe import RouterConfig
from tests import families_parity as fp

transformers = pytest.importorskip("transformers")


def _dots1(**kw):
    return transformers.Dots1Config(
        **{**fp.COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
        moe_intermediate_size=12, n_routed_experts=12, n_group=4, topk_group=2,
        first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, **kw)


def _glm4_moe(**kw):
    return transformers.Glm4MoeConfig(
        **{**fp.COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
        moe_intermediate_size=12, n_routed_experts=12, n_group=3, topk_group=2,
        first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True,
        routed_scaling_factor=1.5, **kw)


def _ernie4_5_moe(**kw):
    return transformers.Ernie4_5_MoeConfig(
        **{**fp.COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
        moe_intermediate_size=12, moe_num_experts=12, moe_num_shared_experts=1,
        moe_layer_start_index=1, **kw)


def _olmoe(**kw):
    return transformers.OlmoeConfig(**{**fp.COMMON, "num_experts_per_tok": 3},
                                    intermediate_size=12, num_experts=16, norm_topk_prob=False,
                                    **kw)


def _qwen3_next(**kw):
    # 32 experts, K=4 ("many experts"); one linear-attention and one full-attention layer
    return transformers.Qwen3NextConfig(
        **{**fp.COMMON, "num_experts_per_tok": 4}, intermediate_size=48,
        moe_intermediate_size=12, num_experts=32, shared_expert_intermediate_size=20,
        norm_topk_prob=True, layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, **kw)


def _llama4(top_k: int = 1, **kw):
    return transformers.Llama4TextConfig(
        **{**fp.COMMON, "num_experts_per_tok": top_k}, intermediate_size=12,
        intermediate_size_mlp=48, num_local_experts=8, **kw)


def _longcat_flash(**kw):
    # 8 routed + 2 zero-computation experts, K=3; each decoder layer: two MLA attentions, two
    # dense MLPs (mlps) and the MoE block (mlp), on num_layers (not num_hidden_layers)
    common = {k: v for k, v in fp.COMMON.items()
              if k not in ("num_hidden_layers", "num_experts_per_tok", "num_key_value_heads")}
    return transformers.LongcatFlashConfig(
        **common, num_layers=2, moe_topk=3, n_routed_experts=8, zero_expert_num=2,
        expert_ffn_hidden_size=12, ffn_hidden_size=48, routed_scaling_factor=2.5,
        kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=4, v_head_dim=8,
        **kw)


QWEN3_VL_TEXT = dict(**{**fp.COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
                     moe_intermediate_size=12, num_experts=12,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "mrope_section": [1, 1, 2]})
QWEN3_VL_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                       out_hidden_size=32, patch_size=2, temporal_patch_size=1,
                       spatial_merge_size=1, deepstack_visual_indexes=[])


def _qwen3_vl_moe():
    return transformers.Qwen3VLMoeConfig(text_config=QWEN3_VL_TEXT,
                                         vision_config=QWEN3_VL_VISION)


@dataclass(frozen=True)
class Tiny:
    """A family's tiny checkpoint and what the checks expect of it."""

    config: Callable  # the tiny transformers config
    layer: int  # the MoE layer checked (layer 0 is dense where the family has one)
    shape: str  # E, H, I, K as `rocm-moe run` prints them
    moe_layers: int  # MoE blocks replace_moe_blocks finds in the model
    router: Callable[[], RouterConfig] | None = None  # what from_hf_config must give


FAMILIES = {
    # DeepSeek-V3's grouped sigmoid router with its own group counts, shared experts, a dense
    # first layer (Dots1MoE, Glm4MoeMoE)
    "dots1": Tiny(_dots1, 1, "E=12 H=32 I=12 K=3", 1, lambda: RouterConfig.deepseek_v3(
        12, 3, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    "glm4_moe": Tiny(_glm4_moe, 1, "E=12 H=32 I=12 K=3", 1, lambda: RouterConfig.deepseek_v3(
        12, 3, n_group=3, topk_group=2, routed_scaling_factor=1.5)),
    # a softmax router whose bias (moe_statics, [1, E] on disk) shifts the choice but never the
    # weights, shared experts, a dense first layer (Ernie4_5_MoeSparseMoeBlock)
    "ernie4_5_moe": Tiny(_ernie4_5_moe, 1, "E=12 H=32 I=12 K=3", 1, lambda: RouterConfig(
        num_experts=12, top_k=3, choice_bias=True)),
    # Qwen's softmax router without normalisation of the top-k, no shared experts
    # (OlmoeSparseMoeBlock)
    "olmoe": Tiny(_olmoe, 1, "E=16 H=32 I=12 K=3", 2),
    # many experts, Qwen's softmax router, a shared expert behind a sigmoid gate, beside
    # linear-attention layers (Qwen3NextSparseMoeBlock)
    "qwen3_next": Tiny(_qwen3_next, 1, "E=32 H=32 I=12 K=4", 2),
    # top-k of the logits with a sigmoid weight, the weight on the expert's input (applied
    # once), fused [E, H, 2I] experts, a shared expert (Llama4TextMoe)
    "llama4_text": Tiny(_llama4, 1, "E=8 H=32 I=12 K=1", 2),
    # Qwen's always-normalised softmax router, fused expert tensors under model.language_model
    # (either orientation on disk), the MoE fields in config.text_config
    # (Qwen3VLMoeTextSparseMoeBlock)
    "qwen3_vl_moe": Tiny(_qwen3_vl_moe, 1, "E=12 H=32 I=12 K=3", 2,
                         lambda: RouterConfig.qwen3_moe(12, 3)),
    # a float32 softmax router over 8 routed + 2 zero-computation (identity) experts with a
    # choice bias, no normalisation, a scale; E counts the routed experts, the only ones placed
    # and read (LongcatFlashMoE)
    "longcat_flash": Tiny(_longcat_flash, 1, "E=8 H=32 I=12 K=3", 2, lambda: RouterConfig(
        num_experts=10, top_k=3, norm_topk_prob=False, routed_scaling_factor=2.5,
        choice_bias=True, zero_experts=2, float32_logits=True)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(name)``: the family's tiny checkpoint, saved once per module."""
    saved = {}

    def get(name: str):
        if name not in saved:
            saved[name] = fp.save_tiny(FAMILIES[name].config(), tmp_path_factory.mktemp(name))
        return saved[name]

    return get


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.router is not None])
def test_router_from_the_config(name):
    assert RouterConfig.from_hf_config(FAMILIES[name].config()) == FAMILIES[name].router()


@pytest.mark.parametrize("name", FAMILIES)
def test_parity_with_the_transformers_block(name, checkpoint):
    fp.check_parity(checkpoint(name), FAMILIES[name].layer)


@pytest.mark.parametrize("name", FAMILIES)
def test_loader_reads_only_this_ranks_experts(name, checkpoint):
    fp.check_local_experts_only(checkpoint(name), FAMILIES[name].layer)


@pytest.mark.parametrize("name", FAMILIES)
def test_whole_model_single_rank(name, checkpoint):
    fp.check_whole_model(checkpoint(name), ep_layer_count=FAMILIES[name].moe_layers)


@pytest.mark.parametrize("world_size", [1, 2], ids=["W1", "W2"])
@pytest.mark.parametrize("name", FAMILIES)
def test_run_on_the_checkpoint(name, world_size, checkpoint, capsys):
    out = fp.check_run(checkpoint(name), FAMILIES[name].layer, world_size, capsys)
    assert FAMILIES[name].shape in out


# ---- ernie4_5_moe ------------------------------------------------------------------------------
def test_ernie_router_bias_is_read(checkpoint):
    from rocm_moe import Placement
    from rocm_moe.integrations import hf

    w = hf.load_moe_layer(checkpoint("ernie4_5_moe"), 1, Placement.contiguous(12, 1), 0)
    assert w.e_score_correction_bias.shape == (12,)
    assert w.e_score_correction_bias.abs().sum() > 0  # the [1, E] tensor was read


def test_ernie_use_bias_is_refused(tmp_path):
    from rocm_moe import LocalDispatcher, Placement
    from rocm_moe.integrations import hf

    directory = fp.save_tiny(_ernie4_5_moe(use_bias=True), tmp_path / "biased")
    with pytest.raises(ValueError, match=r"config.use_bias=True: .* only with use_bias off"):
        hf.load_moe_layer(directory, 1, Placement.contiguous(12, 1), 0)
    model = fp.load_model(directory)
    with pytest.raises(ValueError, match=r"config.use_bias=True"):
        hf.replace_moe_blocks(model, lambda: LocalDispatcher(Placement.contiguous(12, 1)))


# ---- llama4 ------------------------------------------------------------------------------------
def test_llama4_family_reads_the_config():
    from rocm_moe.experts.base import ExpertVariant
    from rocm_moe.families import family

    cfg = _llama4(2)
    assert RouterConfig.from_hf_config(cfg) == RouterConfig.llama4(8, 2)
    fam = family(cfg.model_type)
    assert fam.expert_variant(cfg) == ExpertVariant.llama4()
    assert fam.gate_weight(3) == "model.layers.3.feed_forward.router.weight"
    assert fam.shared_expert_tensors(3).gate == \
        "model.layers.3.feed_forward.shared_expert.gate_proj.weight"


def test_llama4_parity_top2(tmp_path):
    # K=2: transformers' dense formula (every expert on every token, -inf scores -> 0 input)
    fp.check_parity(fp.save_tiny(_llama4(2), tmp_path / "k2"), 1)


# the released checkpoints' form: the VL model (llama4), its text MoE under language_model
LLAMA4_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, image_size=8, patch_size=4, vision_output_dim=16,
                     projector_input_dim=16, projector_output_dim=32, pixel_shuffle_ratio=0.5)


@pytest.fixture(scope="module")
def llama4_vl_checkpoint(tmp_path_factory):
    cfg = transformers.Llama4Config(text_config=_llama4().to_dict(), vision_config=LLAMA4_VISION)
    return fp.save_tiny(cfg, tmp_path_factory.mktemp("llama4_vl"))


def test_llama4_vl_checkpoint_parity_and_local_loading(llama4_vl_checkpoint):
    from rocm_moe.families import family

    assert family("llama4").fused_expert_tensors(1).gate_up == \
        "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
    fp.check_parity(llama4_vl_checkpoint, 1)
    fp.check_local_experts_only(llama4_vl_checkpoint, 1)


def test_llama4_vl_checkpoint_run_two_ranks(llama4_vl_checkpoint, capsys):
    out = fp.check_run(llama4_vl_checkpoint, 1, 2, capsys)
    assert "E=8 H=32 I=12 K=1" in out


# ---- qwen3_vl_moe ------------------------------------------------------------------------------
def test_qwen3_vl_router_from_its_text_config():
    cfg = _qwen3_vl_moe()
    assert RouterConfig.from_hf_config(cfg.text_config) == RouterConfig.qwen3_moe(12, 3)


def test_qwen3_vl_hidden_first_checkpoint_reads_the_same(checkpoint, tmp_path):
    """Qwen's own release stores gate_up_proj [E, H, 2I] and down_proj [E, I, H]."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rocm_moe import Placement
    from rocm_moe.integrations import hf

    copy = tmp_path / "hidden_first"
    shutil.copytree(checkpoint("qwen3_vl_moe"), copy)
    for path in copy.glob("*.safetensors"):
        tensors = load_file(path)
        for name in list(tensors):
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    p = Placement.contiguous(12, 2)
    for rank in (0, 1):
        a = hf.load_moe_layer(checkpoint("qwen3_vl_moe"), 1, p, rank)
        b = hf.load_moe_layer(copy, 1, p, rank)
        assert torch.equal(a.w13, b.w13)
        assert torch.equal(a.w2, b.w2)


# ---- longcat_flash -----------------------------------------------------------------------------
def test_longcat_checkpoint_layer_and_the_runs_tokens(checkpoint):
    """The loader reads the gate over all 10 ids and the choice bias, the experts of the 8 routed
    ones; the tokens `rocm-moe run` feeds each rank (W = 2) route some slots to zero experts and
    some to routed ones, so test_run_on_the_checkpoint checks both against the oracle."""
    from rocm_moe import Placement, synthetic
    from rocm_moe.integrations import hf

    directory = checkpoint("longcat_flash")
    ck = hf.Checkpoint(directory)
    w = hf.load_moe_layer(directory, 1, Placement.contiguous(8, 2), 1, checkpoint=ck)
    assert w.gate.shape == (10, 32)
    assert w.w13.shape == (4, 24, 32)
    assert torch.equal(w.e_score_correction_bias, ck.tensor(
        "model.layers.1.mlp.router.e_score_correction_bias"))
    assert w.e_score_correction_bias.abs().sum() > 0
    layer = hf.build_layer(hf.load_moe_layer(directory, 1, Placement.contiguous(8, 1), 0))
    for rank in (0, 1):
        ids = layer.route_tokens(synthetic.tokens(0, rank, 17, 32)).topk_ids
        assert 0 < int((ids >= 8).sum()) < ids.numel(), ids
