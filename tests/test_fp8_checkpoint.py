"""A tiny DeepSeek-V3-shaped checkpoint saved in FP8 the way DeepSeek-V3 is (every expert and
shared-expert projection as float8_e4m3fn ``weight`` + float32 ``weight_scale_inv`` per
128x128 block, ``quantization_config`` in config.json): loaded per rank, run end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rocm_moe import Placement  # noqa: E402
from rocm_moe.cli import main  # noqa: E402
from rocm_moe.experts.fp8 import fp8_dense_reference  # noqa: E402
from rocm_moe.integrations import hf  # noqa: E402
from rocm_moe.quant import BlockFP8Weight, quantize_weight_blocks  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

H, I, E, K = 192, 128, 8, 2  # H: one full and one partial 128-group; I: one block
QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [128, 128]}


def _is_fp8(name: str) -> bool:
    return ".mlp.experts." in name or ".mlp.shared_experts." in name


def save_fp8_deepseek_v3(directory, *, fp8: bool = True) -> None:
    """A random tiny DeepSeek-V3 (layer 0 dense, layer 1 MoE), its expert projections saved in
    FP8 with block scales, sharded so each expert's tensors are read on their own (``fp8``
    False: the float checkpoint as transformers saves it)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(vocab_size=96, hidden_size=H, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                           num_experts_per_tok=K, tie_word_embeddings=False,
                           intermediate_size=256, moe_intermediate_size=I, n_routed_experts=E,
                           n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                           v_head_dim=8, n_shared_experts=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(directory)  # config.json and the float tensors, replaced below
    if not fp8:
        return
    tensors = {}
    for name, t in load_file(directory / "model.safetensors").items():
        if _is_fp8(name) and name.endswith(".weight"):
            b = quantize_weight_blocks(t, dtype="e4m3fn")
            tensors[name], tensors[name + "_scale_inv"] = b.weight, b.scale_inv
        else:
            tensors[name] = t.contiguous()
    (directory / "model.safetensors").unlink()
    shards, weight_map = {}, {}
    for name, t in tensors.items():  # one shard per expert, one for the rest
        key = name.split(".mlp.experts.")[1].split(".")[0] if ".mlp.experts." in name else "rest"
        shards.setdefault(key, {})[name] = t
    for key, group in shards.items():
        file = f"model-{key}.safetensors"
        save_file(group, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    (directory / hf.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("deepseek_v3_fp8")
    save_fp8_deepseek_v3(d)
    return d


def _stored(ck: hf.Checkpoint, name: str) -> BlockFP8Weight:
    return BlockFP8Weight(ck.tensor(name), ck.tensor(name + "_scale_inv"))


def test_loader_reads_this_ranks_fp8_experts_only(fp8_checkpoint):
    p = Placement.contiguous(E, 2)
    ck = hf.Checkpoint(fp8_checkpoint)
    w = hf.load_moe_layer(fp8_checkpoint, 1, p, 1, checkpoint=ck)
    assert w.fp8
    assert isinstance(w.w13, BlockFP8Weight)
    assert w.w13.weight.dtype == torch.float8_e4m3fn
    assert w.w13.shape == (E // 2, 2 * I, H)
    assert w.w13.scale_inv.shape == (E // 2, 2, 2)
    assert w.w2.shape == (E // 2, H, I)
    per_expert = 3 * I * H + 4 * (2 * 2 + 2)  # FP8 bytes + float32 scales
    assert w.expert_bytes == (E // 2) * per_expert  # half of bfloat16's 2 * 3 * I * H
    names = {n for n in ck.weight_map if ".mlp.experts." in n}
    read_experts = {int(n.split(".mlp.experts.")[1].split(".")[0]) for n in names}
    assert read_experts == set(range(E))  # stored, but only rank 1's were read:
    assert ck.bytes_read < w.nbytes + 4 * E * H + 3 * 2**14  # (gate, bias, shared: small)
    fam_expert = "model.layers.1.mlp.experts.{}.{}.weight"
    for j, g in enumerate(p.local_experts(1)):
        gate = _stored(ck, fam_expert.format(g, "gate_proj")).dequantize()
        down = _stored(ck, fam_expert.format(g, "down_proj")).dequantize()
        assert torch.equal(w.w13[j].dequantize()[:I], gate)
        assert torch.equal(w.w2[j].dequantize(), down)
    # shared experts run dense: dequantised to float32 (its rounding only)
    shared = _stored(ck, "model.layers.1.mlp.shared_experts.up_proj.weight").dequantize()
    assert torch.allclose(w.shared_w13[I:].double(), shared, rtol=2**-23, atol=0)


def test_fnuz_layer_holds_the_same_model(fp8_checkpoint):
    w = hf.load_moe_layer(fp8_checkpoint, 1, Placement.contiguous(E, 1), 0)
    layer = hf.build_layer(w, dtype=torch.float32)
    from rocm_moe.layer_fp8 import FP8EPMoE

    fnuz = FP8EPMoE(hidden_size=H, intermediate_size=I, router=w.router,
                    fp8_dtype="e4m3fnuz", shared_intermediate_size=I, dtype=torch.float32)
    fnuz.load_experts(w.w13, w.w2)
    assert fnuz.fp8_dtype == torch.float8_e4m3fnuz
    a, b = layer.expert_weights(), fnuz.expert_weights()
    assert torch.equal(a[0].dequantize(), b[0].dequantize())
    assert torch.equal(a[1].dequantize(), b[1].dequantize())


def test_layer_matches_the_dequantised_model(fp8_checkpoint):
    w = hf.load_moe_layer(fp8_checkpoint, 1, Placement.contiguous(E, 1), 0)
    layer = hf.build_layer(w, dtype=torch.float32)
    x = torch.randn(33, H)
    out = layer(x, return_raw=True)
    shared = layer.shared_experts.reference(x)
    y_q = fp8_dense_reference(x, out.topk_weights, out.topk_ids, w.w13, w.w2) + shared
    y_model = fp8_dense_reference(x, out.topk_weights, out.topk_ids, w.w13, w.w2,
                                  quantize_activations=False) + shared
    assert rel_err(out.out, y_q) < 1e-5
    assert rel_err(out.out, y_model) < 6e-2


def test_run_on_an_fp8_checkpoint_and_with_fp8_dispatch(fp8_checkpoint, tmp_path, capsys):
    """run on an FP8 checkpoint at W = 2 passes against the float64 oracle; --fp8-dispatch
    quantises each row once on its owner and moves it in FP8 (torch-fp8) instead of moving
    float rows that the experts quantise: the same arithmetic, so the same outputs, to the bit
    (the same errors against the float64 oracle on every rank)."""
    runs = {}
    for flag in ([], ["--fp8-dispatch"]):
        js = tmp_path / f"run{len(flag)}.json"
        rc = main(["run", "--checkpoint", str(fp8_checkpoint), "--layer", "1", "--tokens", "33",
                   "--iters", "1", "--world-size", "2", "--dtype", "float32", "--json", str(js),
                   *flag])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert f"E={E} H={H} I={I} K={K}" in out
        assert "FP8 float8_e4m3fn, 128x128 block scales" in out
        assert "PASS" in out
        assert ("comm=torch-fp8" in out) == bool(flag), out
        runs[bool(flag)] = json.loads(js.read_text())
    assert runs[True]["config"]["fp8_dispatch"]
    assert not runs[False]["config"]["fp8_dispatch"]
    errs = {k: [r["rel_err"] for r in v["ranks"]] for k, v in runs.items()}
    assert errs[True] == errs[False], errs
    assert all(0 < e < 6e-2 for r in errs[True] for e in r.values()), errs


def test_fp8_dispatch_refusals(fp8_checkpoint, tmp_path_factory, capsys):
    float_ck = tmp_path_factory.mktemp("deepseek_v3_float")
    save_fp8_deepseek_v3(float_ck, fp8=False)
    base = ["run", "--tokens", "5", "--iters", "1", "--dtype", "float32", "--fp8-dispatch"]
    cases = [([], "--fp8-dispatch.*without --checkpoint.*Fix: pass --checkpoint"),
             (["--checkpoint", str(fp8_checkpoint), "--world-size", "1"],
              "--comm.*local.*has no FP8 dispatch.*Fix: pass --comm torch"),
             (["--checkpoint", str(float_ck), "--world-size", "2"],
              "its experts are not FP8.*Fix: drop --fp8-dispatch")]
    for extra, match in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err


def test_fp8_checkpoint_refuses_other_experts_backends(fp8_checkpoint):
    from rocm_moe.experts.base import Experts

    class Other(Experts):
        name = "other"

        def _forward(self, *a, **k):
            raise AssertionError

    w = hf.load_moe_layer(fp8_checkpoint, 1, Placement.contiguous(E, 1), 0)
    with pytest.raises(ValueError, match=r"experts=other: has no FP8 block-scale path"):
        hf.build_layer(w, experts=Other(), dtype=torch.float32)


def test_fp8_checkpoint_maps_aiter_to_its_fp8_backend(fp8_checkpoint):
    from rocm_moe.experts.aiter import AiterExperts
    from rocm_moe.experts.aiter_fp8 import AiterFP8Experts

    w = hf.load_moe_layer(fp8_checkpoint, 1, Placement.contiguous(E, 1), 0)
    layer = hf.build_layer(w, experts=AiterExperts(mask_sentinel=False), dtype=torch.bfloat16)
    assert isinstance(layer.experts, AiterFP8Experts)
    assert layer.experts.mask_sentinel is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Triton FP8 experts)")
def test_run_on_an_fp8_checkpoint_with_triton_experts_on_gpus(fp8_checkpoint, capsys):
    W = min(2, torch.cuda.device_count())
    rc = main(["run", "--checkpoint", str(fp8_checkpoint), "--layer", "1", "--tokens", "65",
               "--iters", "2", "--world-size", str(W), "--experts", "triton",
               "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out


def test_casting_an_fp8_layer_keeps_its_fp8_experts():
    from rocm_moe import RouterConfig
    from rocm_moe.layer_fp8 import FP8EPMoE

    layer = FP8EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(4, 2),
                     dtype=torch.float32)
    before = [t.clone() for t in (layer.w13_fp8, layer.w13_scale_inv)]
    layer.to(torch.bfloat16)
    assert layer.gate.weight.dtype == torch.bfloat16
    assert layer.w13.dtype == torch.bfloat16
    assert layer.w13_fp8.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.w13_scale_inv, before[1])  # float32, not rounded to bf16
    assert layer.expert_bytes == 4 * (3 * H * I + 4 * (2 * 2 + 2))
    layer.to("cpu")
    assert torch.equal(layer.w13_fp8.view(torch.uint8), before[0].view(torch.uint8))
