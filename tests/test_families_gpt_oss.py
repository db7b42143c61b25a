"""gpt-oss (dense bf16/float32 checkpoints; MXFP4 ones: tests/test_gpt_oss_mxfp4.py): biased
experts with the clamped SwiGLU, interleaved gate/up columns in fused tensors, a biased router
scored by a softmax after the top-k; against transformers' own GptOssMLP."""

from __future__ import annotations

import pytest
import torch

from tests import families_parity as fp

transformers = pytest.importorskip("transformers")

LAYER = 1


def _config():
    # I=12 != H/2 (a transposed read shows), limit 0.5 so the clamps bite at these scales
    return transformers.GptOssConfig(**{**fp.COMMON, "num_experts_per_tok": 3},
                                     intermediate_size=12, num_local_experts=8, swiglu_limit=0.5,
                                     layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fp.save_tiny(_config(), tmp_path_factory.mktemp("gpt_oss"))


def test_family_reads_the_config():
    from rocm_moe import RouterConfig
    from rocm_moe.experts.base import ExpertVariant
    from rocm_moe.families import family

    cfg = _config()
    fam = family("gpt_oss")
    assert RouterConfig.from_hf_config(cfg) == RouterConfig.gpt_oss(8, 3)
    assert fam.expert_variant(cfg) == ExpertVariant.gpt_oss(alpha=1.702, limit=0.5)
    assert fam.gate_weight(4) == "model.layers.4.mlp.router.weight"
    assert fam.gate_bias_tensor(4) == "model.layers.4.mlp.router.bias"
    names = fam.fused_expert_tensors(4)
    assert (names.gate_up, names.down_bias) == ("model.layers.4.mlp.experts.gate_up_proj",
                                                "model.layers.4.mlp.experts.down_proj_bias")
    with pytest.raises(ValueError, match=r"family=gpt_oss: holds its experts in fused tensors"):
        fam.expert_tensors(4, 0)


def test_parity_with_the_transformers_block(checkpoint):
    errs = fp.check_parity(checkpoint, LAYER)
    print(errs)


def test_interleaved_columns_are_gate_then_up():
    from rocm_moe.integrations.hf import fused_to_local

    gate_up = torch.arange(8.0).reshape(1, 8).repeat(3, 1)  # H=3, columns g0 u0 g1 u1 ...
    w13, w2, b13 = fused_to_local(gate_up, torch.zeros(4, 3), interleaved=True,
                                  gate_up_bias=torch.arange(8.0))
    assert w13[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert b13.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert w2.shape == (3, 4)


def test_loader_reads_only_this_ranks_experts(checkpoint):
    fp.check_local_experts_only(checkpoint, LAYER)


def test_whole_model_single_rank(checkpoint):
    fp.check_whole_model(checkpoint, ep_layer_count=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert "E=8 H=32 I=12 K=3" in out


def test_experts_implementation_matches_eager(checkpoint):
    """transformers' experts implementation "rocm_moe" on gpt-oss's transposed, interleaved,
    biased experts: the model's logits as with its own experts."""
    from rocm_moe import oracle
    from rocm_moe.integrations import hf

    hf.register()
    model = fp.load_model(checkpoint)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_experts_implementation("rocm_moe")
        ours = model(ids).logits
        assert oracle.rel_err(ours, ref) <= 1e-5
        assert oracle.rel_err(model(ids).logits, ref) <= 1e-5  # (the cached weights)
    experts = fp.block_of(model, LAYER).experts
    experts.has_post_expert_norm = True  # what rocm_moe's experts do not compute
    experts._rocm_moe_map = None
    with pytest.raises(ValueError, match=r"GptOssExperts.has_post_expert_norm=True"), \
            torch.no_grad():
        model(ids)


def test_default_experts_keep_triton_for_gpt_oss(checkpoint, monkeypatch):
    """rocm-moe run on a GPU picks the Triton experts by default; they run gpt-oss's biased,
    clamped SwiGLU, so a gpt-oss checkpoint keeps them. A default that could not run the
    variant would fall back to the reference, with the reason; an explicit --experts stays as
    given."""
    from rocm_moe import backends
    from rocm_moe.cli.spec import LayerSpec
    from rocm_moe.distributed import WorkerInfo
    from rocm_moe.experts.triton import TritonExperts

    monkeypatch.setattr(backends, "default_experts",
                        lambda device, dtype=None: ("triton", "default on GPUs"))
    info = WorkerInfo(0, 1, torch.device("cpu"), "gloo")
    shape = dict(num_experts=8, hidden_size=32, intermediate_size=12, top_k=3)
    spec = LayerSpec(checkpoint=str(checkpoint), **shape).on_rank(info)
    assert (spec.experts, spec.experts_why) == ("triton", "default on GPUs")
    monkeypatch.setattr(TritonExperts, "variant_unsupported_reason",
                        lambda self, v: f"no {v.activation} here")
    spec = LayerSpec(checkpoint=str(checkpoint), **shape).on_rank(info)
    assert spec.experts == "reference"
    assert "triton cannot run them (no swiglu_oai here)" in spec.experts_why
    given = LayerSpec(checkpoint=str(checkpoint), experts="triton", **shape).on_rank(info)
    assert given.experts == "triton"


def test_experts_implementation_computes_the_modules_own_constants(checkpoint):
    """A GptOssExperts whose alpha / limit differ from its config's (transformers 5.17
    hard-codes 1.702 / 7.0 and ignores swiglu_limit): rocm_moe's implementation computes what
    the module computes, not what the config says."""
    from rocm_moe import oracle
    from rocm_moe.integrations import hf

    hf.register()
    model = fp.load_model(checkpoint)
    for m in model.modules():
        if type(m).__name__ == "GptOssExperts":
            m.limit, m.alpha = 0.3, 1.5
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_experts_implementation("rocm_moe")
        assert oracle.rel_err(model(ids).logits, ref) <= 1e-5
