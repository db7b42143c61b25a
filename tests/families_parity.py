"""Shared checks of the family parity tests (tests/test_families_*.py): a tiny random model of a
transformers family, saved with save_pretrained (no downloads), and its MoE block against
rocm_moe's layer built from the block and from the checkpoint (this rank's experts only)."""

from __future__ import annotations

import torch

from rocm_moe import Placement, RouterConfig, oracle
from rocm_moe.cli import main
from rocm_moe.integrations import hf

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, tie_word_embeddings=False)


def _auto(cfg):
    """The transformers auto class of a config: causal LM, or image-text-to-text (a VL model)."""
    import transformers

    if hasattr(cfg, "text_config") and hasattr(cfg, "vision_config"):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def save_tiny(cfg, directory, *, skip=("e_score_correction_bias",), std: float = 0.2):
    """A randomly initialised model of ``cfg`` (weights N(0, std), ``skip`` names left as
    initialised) saved in ``directory`` (two shards, so the index is exercised)."""
    torch.manual_seed(0)
    model = _auto(cfg).from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.normal_(0, std)
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if "e_score_correction_bias" in name:  # a bias that matters, as trained ones do
                b.copy_(0.1 * torch.randn(b.shape))
    model.save_pretrained(directory, max_shard_size="60KB")
    return directory


def load_model(directory, dtype=torch.float32):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(directory, local_files_only=True)
    # eager: the model's own expert loop (grouped_mm needs 16-byte strides, not tiny sizes)
    model = _auto(cfg).from_pretrained(directory, dtype=dtype,
                                       experts_implementation="eager").eval()
    return with_config_constants(model, cfg)


def with_config_constants(model, cfg):
    """transformers 5.17's GptOssExperts hard-codes limit 7.0 and alpha 1.702, ignoring the
    config's swiglu_limit (5.25 reads it, as vLLM does): the reference computes the config's
    constants, which the tiny checkpoints set so that the clamps bite."""
    text = text_config(cfg)
    for m in model.modules():
        if type(m).__name__ == "GptOssExperts" and hasattr(text, "swiglu_limit"):
            m.limit = float(text.swiglu_limit)
            m.alpha = float(getattr(text, "swiglu_alpha", m.alpha))
    return model


def text_config(config):
    return getattr(config, "text_config", None) or config


def block_of(model, layer: int):
    """Decoder layer ``layer``'s MoE block (of the language model in a VL model)."""
    import re

    pattern = re.compile(rf"(^|\.)layers\.{layer}\.(mlp|feed_forward)$")
    return next(m for n, m in model.named_modules() if pattern.search(n) and "vision" not in n)


def block_out(block, x):
    """The block's output for x [1, T, H] as [1, T, H] (Llama 4's block returns [T, H])."""
    y = block(x)
    return (y[0] if isinstance(y, tuple) else y).reshape(x.shape)


def num_experts(cfg) -> int:
    """The experts placed over the ranks: the routed ones (LongCat-Flash's zero-computation
    experts are not placed)."""
    return RouterConfig.from_hf_config(cfg).routed_experts


def parity(directory, layer: int, *, tokens: int = 33) -> dict:
    """rel errors of rocm_moe's layer against the model's own block: float32 (built from the
    block and from the checkpoint), bf16 (ours and the block's own, both against float32)."""
    torch.manual_seed(1)
    model = load_model(directory)
    block = block_of(model, layer)
    H = text_config(model.config).hidden_size
    x = torch.randn(1, tokens, H)
    out = {}
    with torch.no_grad():
        ref = block_out(block, x)
        E = num_experts(model.config)
        p = Placement.contiguous(E, 1)
        from_block = hf.build_layer(hf.weights_from_block(block, model.config, p, 0))
        out["f32_block"] = oracle.rel_err(from_block(x[0]), ref[0])
        from_ck = hf.build_layer(hf.load_moe_layer(directory, layer, p, 0))
        out["f32_ckpt"] = oracle.rel_err(from_ck(x[0]), ref[0])
        model16 = load_model(directory, torch.bfloat16)
        block16 = block_of(model16, layer)
        xb = x.bfloat16()
        out["bf16_model"] = oracle.rel_err(block_out(block16, xb)[0], ref[0])
        ours16 = hf.build_layer(hf.weights_from_block(block16, model16.config, p, 0))
        out["bf16_ours"] = oracle.rel_err(ours16(xb[0]), ref[0])
    return out


def check_parity(directory, layer: int, *, tokens: int = 33) -> dict:
    errs = parity(directory, layer, tokens=tokens)
    assert errs["f32_block"] <= 1e-5, errs
    assert errs["f32_ckpt"] <= 1e-5, errs
    # bf16: within the model's own bf16 error (a factor 2 and a floor for routing near-ties)
    assert errs["bf16_ours"] <= max(2 * errs["bf16_model"], 1e-2), errs
    return errs


def check_local_experts_only(directory, layer: int, world_size: int = 2) -> None:
    """Every rank reads its own experts (and the router, shared experts), never the others'."""
    ck0 = hf.Checkpoint(directory)
    E = num_experts(ck0.config())
    p = Placement.contiguous(E, world_size)
    whole = hf.load_moe_layer(directory, layer, Placement.contiguous(E, 1), 0)
    for rank in range(world_size):
        ck = hf.Checkpoint(directory)
        w = hf.load_moe_layer(directory, layer, p, rank, checkpoint=ck)
        local = list(p.local_experts(rank))
        assert torch.equal(w.w13, whole.w13[local])
        assert torch.equal(w.w2, whole.w2[local])
        if whole.w13_bias is not None:
            assert torch.equal(w.w13_bias, whole.w13_bias[local])
            assert torch.equal(w.w2_bias, whole.w2_bias[local])
        assert ck.bytes_read <= w.nbytes, (ck.bytes_read, w.nbytes)  # nothing else was read


def check_whole_model(directory, *, ep_layer_count: int) -> None:
    """replace_moe_blocks on one rank: the model's logits unchanged within float32 rounding."""
    from rocm_moe import LocalDispatcher

    model = load_model(directory)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        E = num_experts(model.config)
        n = hf.replace_moe_blocks(model, lambda: LocalDispatcher(Placement.contiguous(E, 1)))
        assert oracle.rel_err(model(ids).logits, ref) <= 1e-5
    assert n == ep_layer_count


def check_run(directory, layer: int, world_size: int, capsys) -> str:
    """``rocm-moe run --checkpoint`` at this W on gloo: PASS against the float64 oracle."""
    rc = main(["run", "--checkpoint", str(directory), "--layer", str(layer), "--tokens", "17",
               "--iters", "1", "--world-size", str(world_size), "--dtype", "float32",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out, out
    return out
