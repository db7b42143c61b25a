"""LongCat-Flash's zero-computation experts (issue 30 item 2) against transformers' own
LongcatFlashMoE block: the router scores E_r + Z experts, a slot on one of the last Z ids adds
x * its weight on the token's rank (no dispatch), the others run the routed experts. Float32
parity at W = 1 in process and W = 2 on gloo, with tokens whose top-k is all zero experts and
tokens with none; the RouterConfig.zero_experts refusals."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch
from rocm_moe.families import family
from tests.conftest import rel_err

transformers = pytest.importorskip("transformers")

E_R, K, H, I = 8, 3, 64, 32
SCALE = 2.5


def _config(zero: int):
    return transformers.LongcatFlashConfig(
        hidden_size=H, n_routed_experts=E_R, zero_expert_num=zero, moe_topk=K,
        expert_ffn_hidden_size=I, routed_scaling_factor=SCALE, hidden_act="silu",
        num_hidden_layers=1)


def _block(zero: int):
    """A random LongcatFlashMoE whose zero experts' gate rows lie along one direction u, so
    x = 4u picks only zero experts (Z >= K) and x = -4u none. -> (block, u)."""
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    cfg = _config(zero)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    block = LongcatFlashMoE(cfg).eval()
    u = torch.nn.functional.normalize(torch.randn(H), dim=0)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0, 0.2)
        block.experts.down_proj.normal_(0, 0.2)
        w = block.router.classifier.weight
        w.normal_(0, 0.2)
        w[E_R:] = 4 * u + 0.05 * torch.randn(zero, H)
        block.router.e_score_correction_bias.copy_(0.01 * torch.randn(E_R + zero))
    return block, u


def _tokens(T: int, u: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """[T, H]: token 0 routes to zero experts only, token 1 to none, the rest at random."""
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    x[0] = 4 * u
    if T > 1:
        x[1] = -4 * u
    return x


def _layer(block, dispatcher=None) -> EPMoE:
    router = RouterConfig.from_hf_config(block.router_config)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=router, dispatcher=dispatcher,
                  dtype=torch.float32)
    with torch.no_grad():
        layer.gate.weight.copy_(block.router.classifier.weight)
        layer.e_score_correction_bias.copy_(block.router.e_score_correction_bias)
        E = block.experts.down_proj.shape[0]  # (transformers 5.17 also holds zero-expert rows
        layer.load_experts(block.experts.gate_up_proj.detach()[:E],  # in gate_up_proj)
                           block.experts.down_proj.detach())
    return layer


def _with_config(zero: int):
    block, u = _block(zero)
    block.router_config = _config(zero)
    return block, u


def test_family_reads_the_config():
    cfg = _config(3)
    fam = family(cfg.model_type)
    assert fam.name == "longcat_flash"
    assert RouterConfig.from_hf_config(cfg) == RouterConfig(
        num_experts=E_R + 3, top_k=K, norm_topk_prob=False, routed_scaling_factor=SCALE,
        choice_bias=True, zero_experts=3, float32_logits=True)
    assert fam.intermediate_size(cfg) == I
    assert fam.gate_weight(2) == "model.layers.2.mlp.router.classifier.weight"
    assert fam.router_bias_tensor(2) == "model.layers.2.mlp.router.e_score_correction_bias"
    assert fam.expert_tensors(2, 7).gate == "model.layers.2.mlp.experts.7.gate_proj.weight"


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("T", [1, 33])
def test_parity_with_the_transformers_block(zero, T):
    block, u = _with_config(zero)
    layer = _layer(block)
    x = _tokens(T, u)
    if T == 1 and zero == 2:
        x = torch.randn(1, H, generator=torch.Generator().manual_seed(5))  # a plain token
    with torch.no_grad():
        ref = block(x[None])[0]
        *_, ids_TK = block.router(x)  # (transformers 5.17: 2 outputs; 5.25: 3)
        out = layer(x)
    assert out.shape == x.shape
    assert rel_err(out, ref) <= 1e-5
    zero_slots = (ids_TK >= E_R).sum(-1)
    if zero >= K:
        assert zero_slots[0] == K  # all of token 0's slots are identity experts
    if T > 1:
        assert zero_slots[1] == 0
        assert 0 < zero_slots.sum() < T * K


def test_bf16_within_the_blocks_own_error():
    """bf16: the router's logits in float32 as the block computes them (F.linear of float32
    x and W), and the output within the bf16 block's own error against float32."""
    block, u = _with_config(3)
    x = _tokens(33, u)
    with torch.no_grad():
        ref = block(x[None])[0]
        block16 = block.to(torch.bfloat16)
        ours16 = _layer(block16).to(torch.bfloat16)
        x16 = x.bfloat16()
        logits = ours16.router_logits(x16)
        assert logits.dtype == torch.float32
        assert torch.equal(logits, torch.nn.functional.linear(
            x16.float(), block16.router.classifier.weight.float()))
        err_model = rel_err(block16(x16[None])[0], ref)
        err_ours = rel_err(ours16(x16), ref)
    assert err_ours <= max(2 * err_model, 1e-2), (err_ours, err_model)


def test_invariant_mode_keeps_parity():
    block, u = _with_config(3)
    layer = _layer(block)
    layer.invariant = True
    x = _tokens(33, u)
    with torch.no_grad():
        out = layer(x)
        assert rel_err(out, block(x[None])[0]) <= 1e-5
        assert torch.equal(layer(x[:7]), out[:7])  # the batch does not change a token's output


def test_forward_routed_splits_the_zero_slots():
    """The caller's ids in [0, E_r + Z): zero-expert slots add x * weight, -1 slots nothing."""
    block, u = _with_config(2)
    layer = _layer(block)
    x = _tokens(5, u)
    with torch.no_grad():
        w_TK, ids_TK = block.router(x)[-2:]  # (transformers 5.17: 2 outputs; 5.25: 3)
        ref = block(x[None])[0]
        out = layer.forward_routed(x, w_TK.float(), ids_TK.int())
        assert rel_err(out, ref) <= 1e-5
        # token 2's slots all on zero expert E_r (weights 0.5, 0.25, 0.25): out = x
        ids_TK = ids_TK.int().clone()
        ids_TK[2] = torch.tensor([E_R, E_R + 1, -1])
        w_TK = w_TK.float().clone()
        w_TK[2] = torch.tensor([0.75, 0.25, 0.0])
        out2 = layer.forward_routed(x, w_TK, ids_TK)
        assert torch.allclose(out2[2], x[2], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="topk_ids"):
            layer.forward_routed(x, w_TK, torch.full_like(ids_TK, E_R + 2))


def test_eplb_is_refused():
    block, _ = _with_config(2)
    layer = _layer(block)
    with pytest.raises(ValueError, match="zero-computation experts"):
        EPMoE(hidden_size=H, intermediate_size=I, router=layer.router,
              num_redundant_experts=2, dtype=torch.float32)


def test_placement_counts_the_routed_experts_only():
    router = RouterConfig(num_experts=E_R + 2, top_k=K, zero_experts=2)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=router)
    assert layer.gate.weight.shape == (E_R + 2, H)
    assert layer.w13.shape[0] == E_R
    with pytest.raises(ValueError, match=r"dispatcher\.placement\.num_experts"):
        EPMoE(hidden_size=H, intermediate_size=I, router=router,
              dispatcher=LocalDispatcher(Placement.contiguous(E_R + 2, 1)))


def test_weights_from_block_reads_the_nested_gate_and_bias():
    """hf.weights_from_block: the gate [E_r + Z, H] from router.classifier, the choice bias
    beside it, this rank's routed experts only (placed over E_r); the layer built from them
    matches the block. (The checkpoint loader: tests/test_families_parity.py's FAMILIES row.)"""
    from rocm_moe.integrations import hf

    block, u = _with_config(2)
    cfg = block.router_config
    for rank in (0, 1):
        w = hf.weights_from_block(block, cfg, Placement.contiguous(E_R, 2), rank)
        assert torch.equal(w.gate, block.router.classifier.weight)
        assert torch.equal(w.e_score_correction_bias, block.router.e_score_correction_bias)
        local = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(w.w13, block.experts.gate_up_proj[local])
        assert torch.equal(w.w2, block.experts.down_proj[local])
    layer = hf.build_layer(hf.weights_from_block(block, cfg, Placement.contiguous(E_R, 1), 0))
    x = _tokens(33, u)
    with torch.no_grad():
        assert rel_err(layer(x), block(x[None])[0]) <= 1e-5
    with pytest.raises(ValueError, match=r"placement\.num_experts=10.*E=8"):
        hf.weights_from_block(block, cfg, Placement.contiguous(E_R + 2, 1), 0)
    # transformers 5.17 holds gate_up_proj [E_r + Z, 2I, H] (rows for the zero experts, unused)
    # beside down_proj [E_r, H, I]: the routed rows are read; any other count is refused
    routed = block.experts.gate_up_proj.detach()[:E_R].clone()
    for extra, ok in ((2, True), (1, False), (3, False)):
        rows = torch.cat([routed, torch.randn(extra, *routed.shape[1:])])
        block.experts.gate_up_proj = torch.nn.Parameter(rows)
        if ok:
            w = hf.weights_from_block(block, cfg, Placement.contiguous(E_R, 1), 0)
            assert torch.equal(w.w13, routed)
        else:
            with pytest.raises(ValueError, match=rf"experts\.gate_up_proj\.shape\[0\]="
                               rf"{E_R + extra}: must be down_proj's expert count E=8 or "
                               rf"E \+ zero_expert_num = 10"):
                hf.weights_from_block(block, cfg, Placement.contiguous(E_R, 1), 0)


@pytest.mark.parametrize(("zero", "rule"), [(-1, "must lie in"), (10, "must lie in"),
                                            (12, "must lie in"), (1.0, "must be an int")])
def test_bad_zero_experts_are_refused(zero, rule):
    err = ValueError if isinstance(zero, int) else TypeError
    with pytest.raises(err, match=f"RouterConfig.zero_experts={zero}.*{rule}"):
        RouterConfig(num_experts=10, top_k=2, zero_experts=zero)


def _two_rank_worker(info) -> list[float]:
    """Through EPMoE over a TorchDispatcher, the rel errs against the block of two forwards:
    rank 0 with the all-zero and no-zero tokens and 15 more, rank 1 with 16; then rank 0 with
    7 tokens and rank 1 with only the all-zero token (it dispatches nothing)."""
    block, u = _with_config(3)
    p = Placement.contiguous(E_R, info.world_size)
    disp = TorchDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32)
    layer = _layer(block, disp)
    x = _tokens(33, u)
    shares = [(x[:17], x[17:]), (x[2:9], x[:1])]
    with torch.no_grad():
        return [rel_err(layer(mine[info.rank]), block(mine[info.rank][None])[0])
                for mine in shares]


def test_parity_two_ranks_gloo():
    errs = launch(2, _two_rank_worker, backend="gloo", timeout_s=120)
    assert max(max(e) for e in errs) <= 1e-5, errs
