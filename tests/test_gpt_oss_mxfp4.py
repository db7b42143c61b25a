"""gpt-oss from an MXFP4 checkpoint: a tiny random model written in the model's own format
(safetensors, ``experts.gate_up_proj_blocks`` [E, 2I, H/32, 16] / ``_scales`` [E, 2I, H/32]
with rows alternating gate, up, ``down_proj_blocks`` / ``_scales``, bf16-free biases, and
``quantization_config.quant_method = "mxfp4"``), read by rocm_moe's loader (this rank's experts
only, kept in MXFP4), against transformers' own MXFP4 reader and block, and run through
``rocm-moe run --checkpoint`` at W = 1 and 2 on gloo."""

from __future__ import annotations

import json

import pytest
import torch

from rocm_moe import Placement, oracle
from rocm_moe.formats.mxfp4 import quantize_mxfp4
from rocm_moe.integrations import hf
from tests import families_parity as fp

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

LAYER = 1
E, K, H, I = 8, 3, 32, 64  # I != H: a transposed read shows


def _config():
    return transformers.GptOssConfig(**{**fp.COMMON, "num_experts_per_tok": K},
                                     intermediate_size=I, num_local_experts=E, swiglu_limit=0.5,
                                     layer_types=["sliding_attention", "full_attention"])


def write_mxfp4_checkpoint(dense_dir, out_dir):
    """The dense checkpoint ``dense_dir`` rewritten as gpt-oss ships it: each layer's fused
    experts ([E, H, 2I] gate_up, [E, I, H] down) quantised to MXFP4 blocks and scales of the
    transposed [E, 2I, H] / [E, H, I] (MXFP4 groups run along the input dim), one
    model.safetensors, config.json with the mxfp4 quantization_config."""
    from pathlib import Path

    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    index = json.loads((dense_dir / hf.INDEX).read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors.update(safetensors.load_file(dense_dir / shard))
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q = quantize_mxfp4(t.transpose(1, 2).contiguous())
            out[name + "_blocks"] = q.blocks.unflatten(-1, (-1, 16)).contiguous()
            out[name + "_scales"] = q.scales.contiguous()
        else:
            out[name] = t.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.save_file(out, out_dir / hf.SINGLE, metadata={"format": "pt"})
    cfg = json.loads((dense_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn",
                                                             "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    dense = fp.save_tiny(_config(), tmp_path_factory.mktemp("gpt_oss_dense"))
    return write_mxfp4_checkpoint(dense, tmp_path_factory.mktemp("gpt_oss_mxfp4"))


def _transformers_model(directory):
    """transformers' own reader of the MXFP4 checkpoint, dequantised (its CPU path)."""
    cfg = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    qc = transformers.Mxfp4Config(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, config=cfg, quantization_config=qc, dtype=torch.float32,
        experts_implementation="eager").eval()
    # (some transformers releases dequantise to bf16 whatever the dtype: exact for E2M1 x 2**k,
    # and float32 keeps it)
    return fp.with_config_constants(model.float(), cfg)


def test_checkpoint_is_in_the_models_format(checkpoint):
    ck = hf.Checkpoint(checkpoint)
    prefix = f"model.layers.{LAYER}.mlp.experts."
    assert ck.tensor_shape(prefix + "gate_up_proj_blocks") == (E, 2 * I, H // 32, 16)
    assert ck.tensor_shape(prefix + "gate_up_proj_scales") == (E, 2 * I, H // 32)
    assert ck.tensor_shape(prefix + "down_proj_blocks") == (E, H, I // 32, 16)
    assert not ck.has(prefix + "gate_up_proj")


def test_loader_matches_transformers_mxfp4_reader(checkpoint):
    """Our MXFP4 experts, dequantised, are transformers' dequantised experts (its reader of
    the same file) bit for bit, and our layer computes its block's output."""
    model = _transformers_model(checkpoint)
    block = fp.block_of(model, LAYER)
    w = hf.load_moe_layer(checkpoint, LAYER, Placement.contiguous(E, 1), 0)
    assert w.mxfp4
    theirs = hf.weights_from_block(block, model.config, Placement.contiguous(E, 1), 0)
    ours13 = w.w13.dequantize(torch.float32)
    assert torch.equal(ours13, theirs.w13.float())
    assert torch.equal(w.w2.dequantize(torch.float32), theirs.w2.float())
    assert torch.equal(w.w13_bias, theirs.w13_bias)
    x = torch.randn(1, 33, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = fp.block_out(block, x)[0]
        ours = hf.build_layer(w, dtype=torch.float32)(x[0])
    assert oracle.rel_err(ours, ref) <= 1e-5


def test_loader_reads_only_this_ranks_experts(checkpoint):
    p = Placement.contiguous(E, 2)
    whole = hf.load_moe_layer(checkpoint, LAYER, Placement.contiguous(E, 1), 0)
    for rank in range(2):
        ck = hf.Checkpoint(checkpoint)
        w = hf.load_moe_layer(checkpoint, LAYER, p, rank, checkpoint=ck)
        local = list(p.local_experts(rank))
        assert torch.equal(w.w13.blocks, whole.w13.blocks[local])
        assert torch.equal(w.w2.scales, whole.w2.scales[local])
        assert torch.equal(w.w2_bias, whole.w2_bias[local])
        assert ck.bytes_read <= w.nbytes, (ck.bytes_read, w.nbytes)
        assert w.expert_bytes == whole.expert_bytes // 2  # MXFP4: 17 bytes per 32 values
    assert whole.expert_bytes == E * 3 * H * I * 17 // 32


def test_layer_holds_the_checkpoints_mxfp4(checkpoint):
    from rocm_moe.experts.mxfp4 import MXFP4ReferenceExperts

    w = hf.load_moe_layer(checkpoint, LAYER, Placement.contiguous(E, 1), 0)
    layer = hf.build_layer(w, dtype=torch.float32)
    assert layer.weight_format == "mxfp4"
    assert isinstance(layer.experts, MXFP4ReferenceExperts)
    assert layer.expert_bytes == w.expert_bytes
    assert torch.equal(layer.weights.w13.blocks, w.w13.blocks)  # as read, not requantised
    from rocm_moe.experts.aiter import AiterExperts

    with pytest.raises(ValueError, match=r"experts=aiter: has no MXFP4 path"):
        hf.build_layer(w, experts=AiterExperts(), dtype=torch.float32)


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_on_the_mxfp4_checkpoint(checkpoint, world_size, capsys):
    out = fp.check_run(checkpoint, LAYER, world_size, capsys)
    assert f"E={E} H={H} I={I} K={K}" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run: CPU hosts")
def test_run_with_the_triton_mxfp4_experts_in_the_interpreter(checkpoint, capsys):
    """--experts triton on an MXFP4 checkpoint: the Triton MXFP4 kernels (Triton's interpreter,
    float16) in the layer on 2 gloo ranks, PASS against the float64 oracle."""
    from rocm_moe.cli import main

    rc = main(["run", "--checkpoint", str(checkpoint), "--layer", str(LAYER), "--tokens", "17",
               "--iters", "1", "--world-size", "2", "--dtype", "float16", "--device", "cpu",
               "--experts", "triton"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out, out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the Triton experts)")
def test_run_on_the_mxfp4_checkpoint_with_triton_on_a_gpu(checkpoint, capsys):
    """On a GPU the default experts (Triton) keep gpt-oss's variant and compute the MXFP4
    weights (the MXFP4 kernels where the layer holds the format), bf16 against the oracle."""
    from rocm_moe.cli import main

    rc = main(["run", "--checkpoint", str(checkpoint), "--layer", str(LAYER), "--tokens", "33",
               "--iters", "1", "--world-size", "1", "--dtype", "bfloat16", "--device", "cuda"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out, out
    assert "experts=triton" in out, out
