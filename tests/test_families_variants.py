"""Expert variants (biases, gpt-oss's clamped SwiGLU, routing weight on the input) and the routers
that score after the top-k (gpt-oss, Llama 4), against the float64 oracle and by their worked
examples; backends that cannot run a variant refuse it."""

from __future__ import annotations

import math

import pytest
import torch

from rocm_moe import EPMoE, Placement, ReferenceExperts, RouterConfig, oracle
from rocm_moe.experts.base import PLAIN, Experts, ExpertVariant, activate
from rocm_moe.experts.reference import dense_moe_reference
from rocm_moe.routing import route
from rocm_moe.weighting import ExpertsOutput, weight_once

E, H, I = 8, 16, 12
OAI = ExpertVariant.gpt_oss(limit=0.6)  # a small limit, so the clamps bite on these sizes
CASES = [pytest.param(R, K, W, id=f"R{R}_K{K}_W{W}") for R, K, W in
         [(1, 1, 1), (33, 2, 2), (33, 3, 4), (5, 4, 4)]]


def _weights(seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w13, w2 = 0.4 * torch.randn(E, 2 * I, H, generator=g), 0.4 * torch.randn(E, H, I, generator=g)
    b13, b2 = 0.4 * torch.randn(E, 2 * I, generator=g), 0.4 * torch.randn(E, H, generator=g)
    return (w13, w2, b13, b2) if bias else (w13, w2)


def _routing(seed: int, R: int, K: int, skew: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(R)]).int()
    if skew and K == 1:
        ids.fill_(3)  # every token on one expert: the other experts and ranks get none
    return ids, torch.rand(R, K, generator=g) + 0.1


def test_swiglu_oai_worked_example():
    v = ExpertVariant(activation="swiglu_oai", alpha=1.0, limit=1.0)
    y = activate(torch.tensor([[2.0]]), torch.tensor([[3.0]]), v)  # gate -> 1, up -> 1
    assert y.item() == pytest.approx(2.0 / (1.0 + math.exp(-1.0)), rel=1e-6)
    assert activate(torch.tensor([[2.0]]), torch.tensor([[3.0]])).item() == pytest.approx(
        3.0 * 2.0 / (1.0 + math.exp(-2.0)), rel=1e-6)  # PLAIN: silu(gate) * up


@pytest.mark.parametrize(("R", "K", "W"), CASES)
@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
def test_biased_swiglu_oai_matches_the_oracle_on_every_rank(R, K, W, weight_mode):
    w13, w2, b13, b2 = _weights(1)
    x = torch.randn(R, H, generator=torch.Generator().manual_seed(2))
    ids, w = _routing(3, R, K, skew=True)
    p = Placement.contiguous(E, W)
    total = torch.zeros(R, H, dtype=torch.float64)
    for rank in range(W):
        local = list(p.local_experts(rank))
        out = ReferenceExperts()(x, ids, w, w13[local], w2[local], p.expert_map(rank),
                                 weight_mode=weight_mode, variant=OAI, w13_bias=b13[local],
                                 w2_bias=b2[local])
        raw = oracle.dense_experts(x, ids, local, lambda g: (w13[g], w2[g], b13[g], b2[g]),
                                   variant=OAI)
        assert out.weights_applied == (weight_mode == "experts")
        expected = oracle.weighted_sum(raw, w) if out.weights_applied else raw
        assert oracle.rel_err(out.out, expected) < 1e-6
        total += weight_once(out, w, ids, p.expert_map(rank)).double()
    y, _ = dense_moe_reference(x, w, ids, w13, w2, variant=OAI, w13_bias_E=b13, w2_bias_E=b2)
    assert oracle.rel_err(total, y) < 1e-6
    # the variant matters here: plain SwiGLU without biases gives something else
    assert oracle.rel_err(dense_moe_reference(x, w, ids, w13, w2)[0], y) > 0.1


@pytest.mark.parametrize(("R", "K", "W"), CASES)
def test_weights_on_input_are_applied_exactly_once(R, K, W):
    w13, w2 = _weights(4, bias=False)
    x = torch.randn(R, H, generator=torch.Generator().manual_seed(5))
    ids, w = _routing(6, R, K)
    v = ExpertVariant.llama4()
    p = Placement.contiguous(E, W)
    total = torch.zeros(R, H, dtype=torch.float64)
    for rank in range(W):
        local = list(p.local_experts(rank))
        out = ReferenceExperts()(x, ids, w, w13[local], w2[local], p.expert_map(rank),
                                 weight_mode="experts", variant=v)
        assert out.weights_applied  # so weight_once / combine only sum it
        assert weight_once(out, w, ids, p.expert_map(rank)) is out.out
        total += out.out.double()
        raw = ReferenceExperts()(x, ids, w, w13[local], w2[local], p.expert_map(rank),
                                 weight_mode="combine", variant=v)
        assert raw.weighted_inputs
        assert not raw.weights_applied
        # weight_once sums the raw slots without weighting them again
        assert oracle.rel_err(weight_once(raw, w, ids, p.expert_map(rank)), out.out) < 1e-6
    raw = oracle.dense_experts(x, ids, range(E), lambda g: (w13[g], w2[g]), variant=v,
                               weights_RK=w)
    assert oracle.rel_err(total, oracle.summed(raw)) < 1e-6
    twice = oracle.weighted_sum(raw, w)  # the weight on the input and again on the output
    assert oracle.rel_err(total, twice) > 0.05
    y, _ = dense_moe_reference(x, w, ids, w13, w2, variant=v)
    assert oracle.rel_err(y, oracle.summed(raw)) < 1e-12


def test_variant_fields_are_checked():
    with pytest.raises(ValueError, match=r"activation='gelu'.*must be one of"):
        ExpertVariant(activation="gelu")
    with pytest.raises(ValueError, match=r"alpha/limit.*swiglu_oai"):
        ExpertVariant(limit=7.0)
    with pytest.raises(ValueError, match=r"limit=-1.0: must be a finite number > 0"):
        ExpertVariant(activation="swiglu_oai", limit=-1.0)
    with pytest.raises(TypeError, match=r"bias=1: must be a bool"):
        ExpertVariant(bias=1)
    w13, w2, b13, b2 = _weights(7)
    x, (ids, w) = torch.randn(3, H), _routing(8, 3, 2)
    emap = Placement.contiguous(E, 1).expert_map(0)
    call = ReferenceExperts()
    with pytest.raises(TypeError, match=r"w13_bias=None: must be a torch.Tensor"):
        call(x, ids, w, w13, w2, emap, weight_mode="experts", variant=OAI)
    with pytest.raises(ValueError, match=r"w2_bias.shape=\[8, 15\]: must be \[8, 16\]"):
        call(x, ids, w, w13, w2, emap, weight_mode="experts", variant=OAI, w13_bias=b13,
             w2_bias=b2[:, :15])
    with pytest.raises(ValueError, match=r"w13_bias=a tensor: variant.bias is False"):
        call(x, ids, w, w13, w2, emap, weight_mode="experts", w13_bias=b13)
    with pytest.raises(TypeError, match=r"variant=str: must be an ExpertVariant"):
        call(x, ids, w, w13, w2, emap, weight_mode="experts", variant="swiglu_oai")


class _PlainOnly(Experts):
    """A backend that runs only plain SwiGLU (what the AITER experts declare)."""

    name = "plain-only"

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode):
        return ReferenceExperts()._forward(x_RH, topk_ids_RK, topk_weights_RK, w13, w2,
                                           expert_map, mode=mode)


def test_a_backend_without_the_variant_refuses_it_before_any_collective():
    assert _PlainOnly().variant_unsupported_reason(PLAIN) is None
    assert "plain SwiGLU" in _PlainOnly().variant_unsupported_reason(OAI)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.gpt_oss(E, 2),
                  experts=_PlainOnly(), expert_variant=OAI)
    with pytest.raises(ValueError, match=r"experts=plain-only cannot run it: .*plain SwiGLU"):
        layer(torch.randn(3, H))
    w13, w2, b13, b2 = _weights(9)
    x, (ids, w) = torch.randn(3, H), _routing(10, 3, 2)
    with pytest.raises(ValueError, match=r"experts=plain-only, variant=.*unsupported"):
        _PlainOnly()(x, ids, w, w13, w2, Placement.contiguous(E, 1).expert_map(0),
                     weight_mode="experts", variant=OAI, w13_bias=b13, w2_bias=b2)
    # the invariant reference experts run plain SwiGLU only
    assert ReferenceExperts().as_invariant().variant_unsupported_reason(OAI) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_layer_matches_the_oracle(dtype):
    torch.manual_seed(11)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.gpt_oss(E, 3),
                  expert_variant=OAI, dtype=dtype)
    with torch.no_grad():
        for p in (layer.gate.bias, layer.w13_bias, layer.w2_bias):
            p.copy_(0.5 * torch.randn(p.shape))
    x = torch.randn(33, H, dtype=dtype)
    out = layer(x, return_raw=True)
    ref = oracle.reference_route(x, layer.gate.weight, layer.router, gate_bias_E=layer.gate.bias)
    err, _ = oracle.match_routing(ref, out.topk_ids, out.topk_weights,
                                    tie=1e-6 if dtype == torch.float32 else 1e-2)
    assert err < (1e-6 if dtype == torch.float32 else 1e-2)
    y, raw = dense_moe_reference(x, out.topk_weights, out.topk_ids, layer.w13, layer.w2,
                                 variant=OAI, w13_bias_E=layer.w13_bias, w2_bias_E=layer.w2_bias)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert oracle.rel_err(out.out, y) < tol
    assert oracle.rel_err(out.raw, raw) < tol
    # the gate's bias is part of the logits: without it the routing differs
    plain = oracle.reference_route(x, layer.gate.weight, layer.router)
    assert not torch.equal(plain.topk_ids, ref.topk_ids)


def test_weighted_inputs_flag_is_checked():
    with pytest.raises(ValueError, match=r"weighted_inputs=True: describes raw"):
        ExpertsOutput(out=torch.ones(2, 3), weights_applied=True, weighted_inputs=True)
    with pytest.raises(TypeError, match=r"weighted_inputs=1: must be a bool"):
        ExpertsOutput(out=torch.ones(2, 1, 3), weights_applied=False, weighted_inputs=1)
    raw = torch.tensor([[[2.0], [3.0]]])
    w, ids = torch.tensor([[0.5, 0.25]]), torch.tensor([[0, 1]], dtype=torch.int32)
    plain = ExpertsOutput(out=raw, weights_applied=False)
    assert weight_once(plain, w, ids, None).item() == 1.75
    assert weight_once(ExpertsOutput(out=raw, weights_applied=False, weighted_inputs=True), w,
                       ids, None).item() == 5.0


def test_llama4_layer_weights_the_input_once_in_every_mode():
    """weight_mode experts and combine, and return_raw (the owner's sum): the same, once
    weighted (W=2 in tests/test_families_parity.py's llama4 runs)."""
    torch.manual_seed(12)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.llama4(E, 2),
                  expert_variant=ExpertVariant.llama4())
    x = torch.randn(17, H)
    r = layer.route_tokens(x)
    ref = oracle.reference_route(x, layer.gate.weight, layer.router)
    assert torch.equal(ref.topk_ids.int(), r.topk_ids)
    assert oracle.rel_err(r.topk_weights, ref.topk_weights) < 1e-6
    raw = oracle.dense_experts(x, r.topk_ids, range(E), lambda g: (layer.w13[g], layer.w2[g]),
                               variant=layer.expert_variant, weights_RK=r.topk_weights)
    for weight_mode in ("experts", "combine"):
        layer.weight_mode = weight_mode
        assert oracle.rel_err(layer(x), oracle.summed(raw)) < 1e-6, weight_mode
    out = layer(x, return_raw=True)  # raw slots: expert(w x), summed once on the owner
    assert oracle.rel_err(out.raw, raw) < 1e-6
    assert oracle.rel_err(out.out, oracle.summed(raw)) < 1e-6
    y, raw_ref = dense_moe_reference(x, out.topk_weights, out.topk_ids, layer.w13, layer.w2,
                                     variant=layer.expert_variant)
    assert oracle.rel_err(out.raw, raw_ref) < 1e-6
    assert oracle.rel_err(out.out, y) < 1e-6
    layer.invariant = True  # the invariant reference experts run plain SwiGLU only
    with pytest.raises(ValueError, match=r"plain SwiGLU"):
        layer(x)


# ---- routers that score after the top-k ---------------------------------------------------------
def test_softmax_after_topk_worked_example():
    # logits [1, 3, 2, 0], K=2: experts 1 and 2, softmax over (3, 2): e / (e + 1), 1 / (e + 1)
    r = route(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), RouterConfig.gpt_oss(4, 2))
    assert r.topk_ids.tolist() == [[1, 2]]
    e = math.e
    assert r.topk_weights[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-6)


def test_sigmoid_after_topk_worked_example():
    # Llama 4: top-1 of the logits, weight sigmoid(logit), no normalisation
    r = route(torch.tensor([[0.5, -1.0, 2.0]]), RouterConfig.llama4(3, 1))
    assert r.topk_ids.tolist() == [[2]]
    assert r.topk_weights.item() == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)
    # ...chosen on the logits, so experts whose sigmoid rounds to 1.0 in float32 are no tie
    r = route(torch.tensor([[30.0, 40.0, 20.0]]), RouterConfig.llama4(3, 1))
    assert r.topk_ids.tolist() == [[1]]


@pytest.mark.parametrize("cfg", [RouterConfig.gpt_oss(E, 3), RouterConfig.llama4(E, 1),
                                 RouterConfig.llama4(E, 2)], ids=["gpt_oss", "llama4",
                                                                  "sigmoid_k2"])
def test_after_topk_routers_match_the_oracle_and_replay(cfg):
    g = torch.Generator().manual_seed(13)
    x, gate = torch.randn(33, H, generator=g), torch.randn(E, H, generator=g)
    r = route(x @ gate.T, cfg)
    ref = oracle.reference_route(x, gate, cfg)
    assert torch.equal(r.topk_ids, ref.topk_ids.int())
    assert oracle.rel_err(r.topk_weights, ref.topk_weights) < 1e-6
    replay = route(x @ gate.T, cfg, forced_expert_ids=r.topk_ids)
    assert torch.equal(replay.topk_weights, r.topk_weights)
    inv = route(x @ gate.T, cfg, invariant=True)
    assert torch.equal(inv.topk_ids, r.topk_ids)
    assert oracle.rel_err(inv.topk_weights, r.topk_weights) < 1e-6


def test_after_topk_router_refusals():
    with pytest.raises(ValueError, match=r"n_group=2: score_after_topk routers are not grouped"):
        RouterConfig(num_experts=8, top_k=2, scoring="sigmoid", n_group=2,
                     score_after_topk=True)
    with pytest.raises(ValueError, match=r"norm_topk_prob=False: a softmax over the top-k"):
        RouterConfig(num_experts=8, top_k=2, norm_topk_prob=False, score_after_topk=True)
    with pytest.raises(TypeError, match=r"gate_bias=1: must be a bool"):
        RouterConfig(num_experts=8, top_k=2, gate_bias=1)


def test_softmax_router_with_a_choice_bias():
    """ERNIE 4.5: the bias shifts the choice only; without choice_bias a softmax router refuses
    a bias; the fused router does not implement it (route(fused=True) runs the torch path)."""
    from rocm_moe._routing_triton import fused_route_unsupported

    cfg = RouterConfig(num_experts=E, top_k=3, choice_bias=True)
    g = torch.Generator().manual_seed(15)
    x, gate, bias = torch.randn(33, H, generator=g), torch.randn(E, H, generator=g), \
        0.3 * torch.randn(E, generator=g)
    r = route(x @ gate.T, cfg, e_score_correction_bias=bias)
    ref = oracle.reference_route(x, gate, cfg, bias)
    assert torch.equal(r.topk_ids, ref.topk_ids.int())
    assert oracle.rel_err(r.topk_weights, ref.topk_weights) < 1e-6
    assert not torch.equal(r.topk_ids, route(x @ gate.T, cfg).topk_ids)  # the bias chose
    p = torch.softmax((x @ gate.T).double(), -1)
    w = p.gather(1, r.topk_ids.long())
    assert oracle.rel_err(r.topk_weights, w / w.sum(1, keepdim=True)) < 1e-6  # not biased
    with pytest.raises(ValueError, match=r"only sigmoid routers \(and softmax ones"):
        route(x @ gate.T, RouterConfig(num_experts=E, top_k=3), e_score_correction_bias=bias)
    assert "choice bias" in fused_route_unsupported(x @ gate.T, cfg)


def test_fused_router_refuses_after_topk_scoring():
    from rocm_moe._routing_triton import fused_route_unsupported
    from tests.conftest import DEVICE

    logits = torch.randn(4, E)
    # (on a GPU host CPU logits are unsupported for their device; the Triton device's are not)
    assert fused_route_unsupported(logits.to(DEVICE), RouterConfig.qwen3_moe(E, 2)) is None
    assert "score_after_topk" in fused_route_unsupported(logits, RouterConfig.gpt_oss(E, 2))
    assert "score_after_topk" in fused_route_unsupported(logits, RouterConfig.llama4(E, 1))
    # route(fused=True) documents the fallback: the torch path runs for these configs
    r = route(logits, RouterConfig.gpt_oss(E, 2), fused=True)
    assert torch.equal(r.topk_ids, route(logits, RouterConfig.gpt_oss(E, 2)).topk_ids)


def test_kimi_k2_router_is_deepseek_v3_with_one_group_of_384():
    cfg = RouterConfig.kimi_k2()
    assert (cfg.num_experts, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.scoring) == (
        384, 8, 1, 1, "sigmoid")
    g = torch.Generator().manual_seed(14)
    x, gate, bias = torch.randn(9, H, generator=g), torch.randn(384, H, generator=g), \
        0.1 * torch.randn(384, generator=g)
    r = route(x @ gate.T, cfg, e_score_correction_bias=bias)
    ref = oracle.reference_route(x, gate, cfg, bias)
    assert torch.equal(r.topk_ids.sort(1).values, ref.topk_ids.int().sort(1).values)
    assert oracle.rel_err(r.topk_weights.gather(1, r.topk_ids.long().argsort(1)),
                          ref.topk_weights.gather(1, ref.topk_ids.argsort(1))) < 1e-6


def test_weight_once_returns_weighted_outputs_unchanged():
    out = ExpertsOutput(out=torch.ones(2, 3), weights_applied=True)
    assert weight_once(out, torch.full((2, 2), 7.0), torch.zeros(2, 2, dtype=torch.int32),
                       None) is out.out


# ---- the AITER experts refuse what they do not run (the Triton experts run every variant:
# tests/experts/test_triton_variants.py) ---
@pytest.mark.parametrize("variant", [OAI, ExpertVariant.llama4(), ExpertVariant(bias=True)],
                         ids=["swiglu_oai", "weights_on_input", "bias"])
def test_aiter_experts_refuse_variants(variant):
    from rocm_moe.experts.aiter import AiterExperts

    backend = AiterExperts()
    assert backend.variant_unsupported_reason(PLAIN) is None
    reason = backend.variant_unsupported_reason(variant)
    assert reason is not None
    assert "plain SwiGLU" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the Triton experts)")
@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
def test_triton_gpt_oss_layer_matches_the_oracle_on_a_gpu(weight_mode):
    from rocm_moe.experts.triton import TritonExperts

    torch.manual_seed(12)
    layer = EPMoE(hidden_size=64, intermediate_size=32, router=RouterConfig.gpt_oss(E, 2),
                  experts=TritonExperts(), expert_variant=OAI, dtype=torch.bfloat16,
                  device="cuda", weight_mode=weight_mode)
    with torch.no_grad():
        for p in (layer.w13, layer.w2, layer.w13_bias, layer.w2_bias):
            p.copy_(0.3 * torch.randn(p.shape))
    x = torch.randn(33, 64, dtype=torch.bfloat16, device="cuda")
    out = layer(x, return_raw=True)
    w13, w2 = layer.w13.detach(), layer.w2.detach()
    b13, b2 = layer.w13_bias.detach(), layer.w2_bias.detach()
    y, _ = dense_moe_reference(x, out.topk_weights, out.topk_ids, w13, w2, variant=OAI,
                               w13_bias_E=b13, w2_bias_E=b2)
    assert oracle.rel_err(out.out, y) < 2e-2
