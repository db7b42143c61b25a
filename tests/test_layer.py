"""EPMoE on one rank against the float64 oracle and against transformers' own MoE blocks."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, Experts, ExpertsOutput, RouterConfig, dense_moe_reference, route
from rocm_moe.experts.base import swiglu_expert
from tests.conftest import TOL, rel_err

H, I = 32, 16
ROUTERS = {
    "qwen3_E16_K4": RouterConfig.qwen3_moe(16, 4),
    "mixtral_E8_K2": RouterConfig.mixtral(8, 2),
    "dsv3_E32_K4": RouterConfig.deepseek_v3(32, 4, n_group=4, topk_group=2),
}


def _layer(router, dtype, **kw):
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=router, dtype=dtype, **kw)
    layer.reset_parameters(seed=int(torch.randint(0, 2**31 - 1, (1,))))
    if layer.e_score_correction_bias is not None:
        layer.e_score_correction_bias.copy_(torch.rand(router.num_experts) * 0.1)
    return layer


def _oracle(layer, x, forced=None):
    """Route exactly as the layer does, then the float64 dense oracle (+ shared experts)."""
    x_TH = x.reshape(-1, H)
    logits = (torch.nn.functional.linear(x_TH.float(), layer.gate.weight.float())
              if layer.router.logits_in_float32 else layer.gate(x_TH))
    r = route(logits, layer.router, e_score_correction_bias=layer.e_score_correction_bias,
              forced_expert_ids=forced)
    y, raw = dense_moe_reference(x_TH, r.topk_weights, r.topk_ids, layer.w13, layer.w2)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts.reference(x_TH)
    return y, raw, r


GRID = [pytest.param(name, T, mode, dt, id=f"{name}_T{T}_{mode}_{str(dt)[6:]}")
        for name in ROUTERS for T in (1, 33, 511) for mode in ("experts", "combine")
        for dt in (torch.float64, torch.bfloat16)]


@pytest.mark.parametrize(("name", "T", "mode", "dtype"), GRID)
def test_layer_matches_float64_oracle(name, T, mode, dtype):
    layer = _layer(ROUTERS[name], dtype, weight_mode=mode)
    x = torch.randn(T, H).to(dtype)
    y_ref, raw_ref, r = _oracle(layer, x)
    y = layer(x)
    assert y.shape == (T, H)
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    out = layer(x, return_raw=True)
    assert out.weighted_by == "combine"
    assert out.raw.shape == (T, r.topk_ids.shape[1], H)
    assert rel_err(out.raw, raw_ref) < TOL[dtype]  # raw outputs are unweighted
    assert rel_err(out.out, y_ref) < TOL[dtype]
    assert torch.equal(out.topk_ids, r.topk_ids)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_weight_modes_agree(dtype):
    a = _layer(ROUTERS["qwen3_E16_K4"], dtype, weight_mode="experts")
    b = _layer(ROUTERS["qwen3_E16_K4"], dtype, weight_mode="combine")
    b.load_state_dict(a.state_dict())
    x = torch.randn(33, H).to(dtype)
    ya, yb = a(x), b(x)
    assert rel_err(ya, yb) < (1e-14 if dtype == torch.float64 else 1e-2)
    assert a(x, return_raw=True).weighted_by == "combine"


@pytest.mark.parametrize("gated", [False, True], ids=["dsv3_shared", "qwen2_gated_shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_shared_experts_and_bsh_input(gated, dtype):
    router = ROUTERS["dsv3_E32_K4"] if not gated else ROUTERS["qwen3_E16_K4"]
    layer = _layer(router, dtype, shared_intermediate_size=24, shared_expert_gate=gated)
    x = torch.randn(3, 11, H).to(dtype)
    y_ref, raw_ref, _ = _oracle(layer, x)
    y = layer(x)
    assert y.shape == (3, 11, H)
    assert rel_err(y.reshape(-1, H), y_ref) < TOL[dtype]
    out = layer(x, return_raw=True)
    assert out.raw.shape == (3, 11, 4, H)
    assert rel_err(out.raw.reshape(-1, 4, H), raw_ref) < TOL[dtype]


def test_all_tokens_on_one_expert_and_zero_token_experts():
    layer = _layer(ROUTERS["qwen3_E16_K4"], torch.float64, weight_mode="combine")
    x = torch.randn(33, H, dtype=torch.float64)
    forced = torch.tensor([[3, 7, 8, 15]] * 33)  # 12 of 16 experts get no token
    y_ref, _, _r = _oracle(layer, x, forced)
    assert rel_err(layer(x, forced_expert_ids=forced), y_ref) < 1e-12
    forced1 = torch.tensor([[5]] * 33)
    layer1 = _layer(RouterConfig.qwen3_moe(16, 1), torch.float64)
    y = layer1(x, forced_expert_ids=forced1)  # K=1, normalised: weight 1, exactly expert 5
    expert5 = swiglu_expert(x, layer1.w13[5], layer1.w2[5])
    assert rel_err(y, expert5) < 1e-12


def test_forward_routed_single_token_single_expert():
    layer = _layer(ROUTERS["mixtral_E8_K2"], torch.float64)
    x = torch.randn(1, H, dtype=torch.float64)
    ids = torch.tensor([[6, 1]])
    w = torch.tensor([[0.5, 0.0]])
    out = layer.forward_routed(x, w, ids, return_raw=True)
    e6 = swiglu_expert(x, layer.w13[6], layer.w2[6])
    assert rel_err(out.out, 0.5 * e6) < 1e-12
    assert rel_err(out.raw[:, 0], e6) < 1e-12


class _DoubleWeighting(Experts):
    """A broken backend: weights its outputs but claims they are raw."""

    name = "broken"

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode):
        return ExpertsOutput(out=x_RH, weights_applied=True)


def test_backend_that_breaks_the_weighting_contract_is_caught():
    layer = _layer(ROUTERS["mixtral_E8_K2"], torch.float32, experts=_DoubleWeighting(),
                   weight_mode="combine")
    with pytest.raises(AssertionError, match="broken"):
        layer(torch.randn(2, H))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda m: m(torch.randn(4, H + 1)), ValueError, r"hidden_states.shape.*H=32"),
        (lambda m: m(torch.randn(4, H, dtype=torch.float64)), TypeError, "layer's dtype"),
        (lambda m: m(torch.randn(2, 2, 2, H)), ValueError, r"hidden_states.shape"),
        (lambda m: m(torch.randn(4, H), forced_expert_ids=torch.tensor([[0, 0]] * 4)),
         ValueError, "at most once"),
        (lambda m: m(torch.randn(4, H), forced_expert_ids=torch.tensor([[0, 99]] * 4)),
         ValueError, "contains 99"),
        (lambda m: m.forward_routed(torch.randn(4, H), torch.rand(4, 2).double(),
                                    torch.zeros(4, 2, dtype=torch.int32)), TypeError,
         "topk_weights.dtype"),
        (lambda m: m.forward_routed(torch.randn(4, H), -torch.rand(4, 2),
                                    torch.tensor([[0, 1]] * 4)), ValueError, ">= 0"),
        (lambda m: m.load_experts(torch.randn(5, 2 * I, H), torch.randn(5, H, I)), ValueError,
         r"E=8 \(global\) or e=8"),
        (lambda m: m(torch.randn(4, H, device="meta")), ValueError,
         r"hidden_states.device=meta: holds no data"),
    ],
    ids=["H", "dtype", "4d", "dup_forced", "range_forced", "weights_dtype", "neg_weights",
         "load_shape", "meta"],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_layer(ROUTERS["mixtral_E8_K2"], torch.float32))


def test_bad_construction():
    with pytest.raises(ValueError, match="weight_mode='both'"):
        EPMoE(hidden_size=H, intermediate_size=I, router=ROUTERS["mixtral_E8_K2"],
              weight_mode="both")
    with pytest.raises(TypeError, match="RouterConfig"):
        EPMoE(hidden_size=H, intermediate_size=I, router={"num_experts": 8})


# ---- whole blocks against transformers' own modules --------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf_block(family, seed):
    torch.manual_seed(seed)
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m
        cfg = m.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=16,
                               num_experts_per_tok=4, norm_topk_prob=True)
        return cfg, m.Qwen3MoeSparseMoeBlock(cfg)
    if family == "qwen2_moe":
        from transformers.models.qwen2_moe import modeling_qwen2_moe as m
        cfg = m.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=16,
                               num_experts_per_tok=4, shared_expert_intermediate_size=24)
        return cfg, m.Qwen2MoeSparseMoeBlock(cfg)
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    cfg = m.DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=32,
                             num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1)
    return cfg, m.DeepseekV3MoE(cfg)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_block_matches_transformers(family):
    cfg, block = _hf_block(family, int(torch.randint(0, 2**31 - 1, (1,))))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        if hasattr(block.gate, "e_score_correction_bias"):
            block.gate.e_score_correction_bias.copy_(torch.rand(32) * 0.1)
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.from_hf_config(cfg),
                  shared_intermediate_size=shared.down_proj.in_features if shared else None,
                  shared_expert_gate=family == "qwen2_moe")
    with torch.no_grad():
        layer.gate.weight.copy_(block.gate.weight)
        if layer.e_score_correction_bias is not None:
            layer.e_score_correction_bias.copy_(block.gate.e_score_correction_bias)
        layer.load_experts(block.experts.gate_up_proj, block.experts.down_proj)
        if shared is not None:
            layer.shared_experts.w13.copy_(torch.cat([shared.gate_proj.weight,
                                                      shared.up_proj.weight]))
            layer.shared_experts.w2.copy_(shared.down_proj.weight)
        if family == "qwen2_moe":
            layer.shared_experts.gate.weight.copy_(block.shared_expert_gate.weight)
    x = torch.randn(2, 17, H)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=1e-4)


def test_non_finite_values_name_the_real_field():
    layer = _layer(ROUTERS["dsv3_E32_K4"], torch.float32)
    x = torch.randn(4, H)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^hidden_states=contains nan at \[1, 3\]"):
        layer(x)  # the token's NaN, not a router problem
    with pytest.raises(ValueError, match=r"^hidden_states=contains nan"):
        layer(x.view(2, 2, H))
    good = torch.randn(4, H)
    # x[:, 0] > 0: the inf gate weight below then gives +inf logits (-inf is a legal mask;
    # with x[:, 0] < 0 on all 4 tokens, 1 in 16 unseeded draws, nothing was refused)
    good[:, 0] = good[:, 0].abs() + 0.1
    with torch.no_grad():
        layer.e_score_correction_bias[5] = float("nan")
    with pytest.raises(ValueError, match=r"^e_score_correction_bias=contains nan at \[5\]"):
        layer(good)
    with torch.no_grad():
        layer.e_score_correction_bias.zero_()
        layer.gate.weight[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^router_logits=contains .*check the gate weights"):
        layer(good)
    layer.validate = False  # the hot path: no host reads, the NaN propagates
    assert layer(good).shape == (4, H)


def test_non_finite_expert_weights_refused_on_load():
    layer = _layer(ROUTERS["mixtral_E8_K2"], torch.float32)
    w13 = torch.randn(8, 2 * I, H)
    w13[6, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^w13=contains nan at \[6, 1, 2\]"):
        layer.load_experts(w13, torch.randn(8, H, I))


def test_bsh_input_with_bsk_forced_ids():
    layer = _layer(ROUTERS["qwen3_E16_K4"], torch.float32)
    x = torch.randn(2, 3, H)
    forced = torch.stack([torch.randperm(16)[:4] for _ in range(6)])
    flat = layer(x, forced_expert_ids=forced)
    bsk = layer(x, forced_expert_ids=forced.view(2, 3, 4))
    assert bsk.shape == (2, 3, H)
    torch.testing.assert_close(bsk, flat, rtol=0, atol=0)
    y, _, _ = _oracle(layer, x, forced)
    assert rel_err(bsk.reshape(-1, H), y) < TOL[torch.float32]
    with pytest.raises(ValueError, match=r"forced_expert_ids.shape=\[3, 2, 4\]: must be "
                       r"\[2, 3, 4\] .* or \[6, 4\]"):
        layer(x, forced_expert_ids=forced.view(3, 2, 4))


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(hidden_size=-4), ValueError, r"^hidden_size=-4: must be >= 1"),
        (dict(hidden_size="32"), TypeError, r"^hidden_size='32': must be an int"),
        (dict(intermediate_size=0), ValueError, r"^intermediate_size=0: must be >= 1"),
        (dict(dtype=torch.int32), TypeError, r"^dtype=torch.int32: must be one of"),
        (dict(dtype="float32"), TypeError, r"^dtype=float32: must be one of"),
        (dict(experts="triton"), TypeError,
         r"^experts='triton': must be an instance of Experts or None"),
        (dict(dispatcher="local"), TypeError,
         r"^dispatcher='local': must be an instance of Dispatcher"),
        (dict(expert_variant="swiglu_oai"), TypeError,
         r"^expert_variant='swiglu_oai': must be an instance of ExpertVariant"),
        (dict(device="cdua"), ValueError, r"^device='cdua': is not a torch device"),
        (dict(shared_expert_gate=True), ValueError,
         r"^shared_expert_gate=True: gates the shared experts, and the layer has none"),
        (dict(shared_intermediate_size=8, shared_expert_gate="no"), TypeError,
         r"^shared_expert_gate='no': must be a bool"),
        (dict(load_window=10), ValueError, r"load_window.*only mean something with EPLB"),
    ],
    ids=["H_negative", "H_str", "I_zero", "dtype_int", "dtype_str", "experts_name",
         "dispatcher_name", "variant_name", "device_typo", "gate_without_shared", "gate_str",
         "load_window_without_eplb"],
)
def test_bad_sizes_and_dtype(kw, exc, match):
    args = dict(hidden_size=H, intermediate_size=I, router=ROUTERS["mixtral_E8_K2"]) | kw
    with pytest.raises(exc, match=match):
        EPMoE(**args)


def test_float32_gate_weight_is_cast_once_and_follows_updates():
    """A float32 router (DeepSeek-V3) casts its bf16 gate weight once, not every call; an
    in-place weight update (load_state_dict, copy_) or a new Parameter is picked up at once."""
    from rocm_moe import EPMoE, RouterConfig

    torch.manual_seed(0)
    layer = EPMoE(hidden_size=16, intermediate_size=8, dtype=torch.bfloat16,
                  router=RouterConfig.deepseek_v3(8, 2, n_group=1, topk_group=1))
    x = torch.randn(5, 16, dtype=torch.bfloat16)

    def want():
        return x.float() @ layer.gate.weight.float().T

    with torch.no_grad():
        first = layer.router_logits(x)
        assert torch.equal(first, want())
        assert layer._gate_weight_f32() is layer._gate_weight_f32()  # cached
        layer.gate.weight.mul_(-1.0)  # in place: a new version
        assert torch.equal(layer.router_logits(x), want())
        assert torch.equal(layer.router_logits(x), -first)
        layer.load_state_dict({**layer.state_dict(),
                               "gate.weight": torch.randn(8, 16, dtype=torch.bfloat16)})
        assert torch.equal(layer.router_logits(x), want())
        layer.gate.weight = torch.nn.Parameter(torch.randn(8, 16, dtype=torch.bfloat16))
        assert torch.equal(layer.router_logits(x), want())


def test_reset_parameters_draws_on_a_device():
    """``draws_on``: the experts' and shared experts' draws made by that device's generator
    (benchmarks that only time); on the CPU the same bits as the default draws, any seed;
    not a torch.device: a TypeError naming the field and the fix."""
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTERS["dsv3_E32_K4"],
                  shared_intermediate_size=24, dtype=torch.float32)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    layer.reset_parameters(seed)
    want = [t.clone() for t in (layer.w13, layer.w2, layer.shared_experts.w13,
                                layer.shared_experts.w2)]
    layer.reset_parameters(seed + 1, draws_on=torch.device("cpu"))
    assert not torch.equal(layer.w13, want[0])
    layer.reset_parameters(seed, draws_on=torch.device("cpu"))
    got = (layer.w13, layer.w2, layer.shared_experts.w13, layer.shared_experts.w2)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(TypeError, match=r"draws_on='cuda'.*must be a torch\.device or None"
                       r".*Fix: "):
        layer.reset_parameters(seed, draws_on="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA generator")
def test_gpu_reset_parameters_draws_on_the_gpu():
    """On a GPU the draws come from its generator: the same per (seed, expert) call after
    call, N(0, 1/fan_in) like the CPU's."""
    dev = torch.device("cuda")
    layer = EPMoE(hidden_size=64, intermediate_size=256, router=ROUTERS["qwen3_E16_K4"],
                  dtype=torch.float32, device=dev)
    layer.reset_parameters(7, draws_on=dev)
    first = layer.w13.clone()
    layer.reset_parameters(7, draws_on=dev)
    assert torch.equal(layer.w13, first)
    assert abs(first.std().item() * 64**0.5 - 1) < 0.05
    assert abs(layer.w2.std().item() * 256**0.5 - 1) < 0.05
