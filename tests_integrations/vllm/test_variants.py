"""Expert variants through the plug-in (issue 30, item 4): the layers vLLM builds for gpt-oss
(SWIGLUOAI with biases, w13 interleaved as vLLM's loader leaves it), MiniMax-M3
(SWIGLUOAI_UNINTERLEAVE, alpha / limit / beta) and Llama 4 (top-1 sigmoid router, the weight on
the input) computed exactly as vLLM's layer defines them, and a refusal for each variant rocm_moe
does not compute.

One rank, in this process: vLLM's ``RocmMoEFusedMoEMethod`` as ``UnquantizedFusedMoEMethod``
builds it (create_weights, weights loaded in vLLM's layout, process_weights_after_loading,
apply). Each output is compared with the float64 oracle of the engine's semantics on vLLM's own
tensors (``variants64``) and with vLLM's own activation ops (``SwigluOAIAndMul.forward_native``,
``SiluAndMulWithClamp.forward_native``) composed into the expert in float64: vLLM's fused
experts themselves (Triton, its CPU kernels) do not run with the CUDA wheel on a CPU. The
gpt-oss and Llama 4 layers built by ``FusedMoEFactory`` (vLLM's own gpt-oss weight loader,
Llama 4's routing function) on W = 2 and 3 gloo ranks run in ``model_cases``."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.comm import pool
from rocm_moe.experts.base import Experts
from rocm_moe.integrations import vllm as rv
from tests_integrations import oracle64 as o
from tests_integrations import variants64 as v64
from tests_integrations.vllm import test_serving as serving
from tests_integrations.vllm.test_serving import _vllm_config, method_for
from tests_integrations.vllm.test_vllm import kernel_results

vllm = pytest.importorskip("vllm")
E, K, H, I = 8, 3, 64, 32
SEED = 17
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    for env in (rv.ENV_COMM, rv.ENV_EXPERTS, rv.ENV_WEIGHT_MODE, rv.ENV_MAX_TOKENS):
        monkeypatch.delenv(env, raising=False)
    pool.clear()
    yield
    pool.clear()


def act(name: str):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    return MoEActivation.from_str(name)


def moe_config(dtype=torch.float32, *, top_k: int = K, **kw):
    """test_serving's one-rank FusedMoEConfig at this file's sizes."""
    return serving.moe_config(dtype, num_experts=E, top_k=top_k, hidden=H, inter=I, **kw)


def vllm_op(cls, *args):
    """One of vLLM's CustomOps (built inside a vLLM config, as vLLM builds them)."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(_vllm_config()):
        return cls(*args)


def loaded_layer(moe, p: dict, **attrs):
    """(method, layer) as vLLM leaves them after loading ``p`` (already in vLLM's layout)."""
    method = method_for(moe)
    layer = torch.nn.Module()
    method.create_weights(layer, E, H, I, moe.in_dtype)
    with torch.no_grad():
        layer.w13_weight.copy_(p["w13"])
        layer.w2_weight.copy_(p["w2"])
        if moe.has_bias:
            layer.w13_bias.copy_(p["b13"])
            layer.w2_bias.copy_(p["b2"])
    layer.activation, layer.apply_router_weight_on_input = moe.activation, False
    layer.global_num_experts, layer.expert_map = E, None
    for k, val in attrs.items():
        setattr(layer, k, val)
    method.process_weights_after_loading(layer)
    return method, layer


def vllm_reference(x, w, ids, p: dict, act_op, *, weights_on_input: bool = False):
    """The expert with vLLM's own activation op (``forward_native``) on vLLM's tensors, in
    float64: sum_k w * (act(x @ w13.T + b13) @ w2.T + b2)."""
    y = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            g = int(ids[t, k])
            xin = x[t].double() * float(w[t, k]) if weights_on_input else x[t].double()
            h = xin @ p["w13"][g].double().T + (p["b13"][g].double() if "b13" in p else 0)
            out = act_op.forward_native(h[None])[0] @ p["w2"][g].double().T
            out = out + (p["b2"][g].double() if "b2" in p else 0)
            y[t] += out if weights_on_input else float(w[t, k]) * out
    return y


def gpt_oss_vllm_layout(p: dict) -> dict:
    """The checkpoint's experts as vLLM's gpt-oss loader leaves them in the unquantised
    parameters (gpt_oss.py ``_load_weights_other``: gate_up_proj [E, H, 2I] permuted to
    [E, 2I, H], interleaved rows kept; biases as they are)."""
    ck = v64.gpt_oss_checkpoint(p)
    return dict(w13=ck["gate_up_proj"].permute(0, 2, 1).contiguous(),
                b13=ck["gate_up_proj_bias"], w2=ck["down_proj"].permute(0, 2, 1).contiguous(),
                b2=ck["down_proj_bias"])


# ---- gpt-oss: SWIGLUOAI, biases, interleaved w13 ------------------------------------------------
GPT_OSS = [(mode, dt, T) for mode in ("experts", "combine") for dt in ("float32", "bfloat16")
           for T in (1, 33)]


@pytest.mark.parametrize(("mode", "dt", "T"), GPT_OSS,
                         ids=[f"{m}-{d}-T{t}" for m, d, t in GPT_OSS])
def test_gpt_oss_layer_matches_vllms_semantics(mode, dt, T, monkeypatch):
    from vllm.model_executor.layers.activation import SwigluOAIAndMul

    monkeypatch.setenv(rv.ENV_WEIGHT_MODE, mode)
    dtype = getattr(torch, dt)
    vl = gpt_oss_vllm_layout(v64.expert_params(SEED, E, H, I, dtype))
    method, layer = loaded_layer(moe_config(dtype, activation=act("swigluoai"), has_bias=True),
                                 vl)
    assert method.moe_kernel.fused_experts.variant == \
        rv.ExpertVariant.gpt_oss(alpha=1.702, limit=7.0)
    x, w, ids = o.tokens(SEED, 0, T, E, H, K, dtype)
    y = method.apply(layer, x, w, ids, None, None)
    ref = v64.oracle(x, w, ids, vl, interleaved=True)
    engine = vllm_reference(x, w, ids, vl, vllm_op(SwigluOAIAndMul, 1.702, 7.0))
    assert o.rel_err(engine, ref) <= 1e-12  # the oracle is vLLM's op, composed
    assert o.rel_err(y, ref) <= TOL[dtype], (mode, dt, T)
    # the clamp matters at these sizes: the unclamped layer is another model
    assert o.rel_err(v64.oracle(x, w, ids, vl, interleaved=True, limit=None), ref) > 1e-3
    # w13 / w13_bias de-interleaved in place (same storage), w2 / w2_bias untouched
    assert torch.equal(layer.w13_weight[:, :I], vl["w13"][:, 0::2])
    assert torch.equal(layer.w13_bias[:, I:], vl["b13"][:, 1::2])
    assert torch.equal(layer.w2_bias, vl["b2"])


def test_gpt_oss_all_tokens_on_one_expert_and_zero_token_experts():
    vl = gpt_oss_vllm_layout(v64.expert_params(SEED, E, H, I, torch.float32))
    method, layer = loaded_layer(moe_config(activation=act("swigluoai"), has_bias=True), vl)
    x, w, _ = o.tokens(SEED, 0, 33, E, H, K, torch.float32)
    ids = torch.full((33, K), -1, dtype=torch.int32)
    ids[:, 0] = 5  # every token on expert 5 once; the other experts get none
    y = method.apply(layer, x, w, ids, None, None)
    assert o.rel_err(y, v64.oracle(x, w, ids, vl, interleaved=True)) <= 1e-5


def test_weights_loaded_already_processed_are_not_permuted_again():
    """vLLM's pre-processed load (``is_weights_pre_processed``: an IPC cache of runtime-format
    weights) hands over w13 already de-interleaved: marked, not permuted."""
    from vllm.model_executor import utils as vu

    p = v64.expert_params(SEED, E, H, I, torch.float32)
    token = vu._weights_pre_processed.set(True)
    try:
        method, layer = loaded_layer(moe_config(activation=act("swigluoai"), has_bias=True), p)
    finally:
        vu._weights_pre_processed.reset(token)
    assert torch.equal(layer.w13_weight, p["w13"])
    x, w, ids = o.tokens(SEED, 0, 9, E, H, K, torch.float32)
    y = method.apply(layer, x, w, ids, None, None)
    assert o.rel_err(y, v64.oracle(x, w, ids, p, interleaved=False)) <= 1e-5


def test_interleaved_weights_that_were_not_processed_are_refused():
    """The kernel on its own (no process_weights_after_loading) with vLLM's interleaved w13:
    refused by name, not computed on the wrong rows."""
    from vllm.model_executor.layers.fused_moe.config import biased_moe_quant_config

    vl = gpt_oss_vllm_layout(v64.expert_params(SEED, E, H, I, torch.float32))
    from rocm_moe.comm.local import LocalDispatcher
    from rocm_moe.placement import Placement

    disp = LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32)
    q = biased_moe_quant_config(vl["b13"], vl["b2"])
    kernel = rv.build_kernel(moe_config(activation=act("swigluoai"), has_bias=True),
                             dispatcher=disp, quant_config=q)
    x, w, ids = o.tokens(SEED, 0, 5, E, H, K, torch.float32)
    args = dict(hidden_states=x, w1=vl["w13"], w2=vl["w2"], topk_weights=w, topk_ids=ids,
                activation=act("swigluoai"), global_num_experts=E, expert_map=None,
                apply_router_weight_on_input=False)
    with pytest.raises(ValueError, match="interleaved gate/up rows"):
        kernel.apply(**args)
    disp._uncombined = None  # the batch the refusal abandoned after its dispatch
    rv.uninterleave_gate_up(args["w1"], vl["b13"])
    y = kernel.apply(**args)
    assert o.rel_err(y, v64.oracle(x, w, ids, gpt_oss_vllm_layout(
        v64.expert_params(SEED, E, H, I, torch.float32)), interleaved=True)) <= 1e-5


# ---- MiniMax-M3: SWIGLUOAI_UNINTERLEAVE with alpha, limit, beta = 1 -----------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_swigluoai_uninterleave_matches_vllms_op(bias):
    from vllm.model_executor.layers.activation import SiluAndMulWithClamp

    p = v64.expert_params(SEED, E, H, I, torch.float32, bias=bias)
    moe = moe_config(activation=act("swigluoai_uninterleave"), swiglu_limit=7.0,
                     swiglu_alpha=1.702, swiglu_beta=1.0, has_bias=bias)
    method, layer = loaded_layer(moe, p, swiglu_limit=7.0, swiglu_alpha=1.702,
                                 swiglu_beta=1.0)
    x, w, ids = o.tokens(SEED, 0, 33, E, H, K, torch.float32)
    y = method.apply(layer, x, w, ids, None, None)
    ref = v64.oracle(x, w, ids, p, interleaved=False)
    engine = vllm_reference(x, w, ids, p, vllm_op(SiluAndMulWithClamp, 7.0, 1.702, 1.0))
    assert o.rel_err(engine, ref) <= 1e-12
    assert o.rel_err(y, ref) <= 1e-5


def test_silu_with_biases_matches_the_oracle():
    p = v64.expert_params(SEED, E, H, I, torch.float32)
    method, layer = loaded_layer(moe_config(has_bias=True), p)
    x, w, ids = o.tokens(SEED, 0, 33, E, H, K, torch.float32)
    y = method.apply(layer, x, w, ids, None, None)
    assert o.rel_err(y, v64.oracle(x, w, ids, p, act="silu")) <= 1e-5


# ---- Llama 4: the weight on the input, top-1 ---------------------------------------------------
@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_router_weight_on_input_is_vllms_rounding(dt):
    """vLLM's prepare scales the input as ``a1 * w.to(a1.dtype)`` (no_dp_ep.py); the plug-in
    does the same, so in bf16 the product is rounded where vLLM rounds it."""
    dtype = getattr(torch, dt)
    p = v64.expert_params(SEED, E, H, I, dtype, bias=False)
    method, layer = loaded_layer(moe_config(dtype, top_k=1), p,
                                 apply_router_weight_on_input=True)
    x, w, ids = o.tokens(SEED, 0, 33, E, H, 1, dtype)
    y = method.apply(layer, x, w, ids, None, None)
    xin = x * w.to(dtype)  # vLLM's own product, then the experts at weight 1
    ref = v64.oracle(xin, torch.ones_like(w), ids, p, act="silu")
    assert o.rel_err(y, ref) <= TOL[dtype]
    if dtype == torch.float32:
        assert o.rel_err(y, v64.oracle(x, w, ids, p, act="silu", weights_on_input=True)) \
            <= 1e-5


# ---- refusals -----------------------------------------------------------------------------------
REFUSED = [
    ("gelu", dict(activation="gelu"), "activation=gelu"),
    ("gelu_tanh", dict(activation="gelu_tanh"), "activation=gelu_tanh"),
    ("situ", dict(activation="situ", activation_situ_beta=0.5), "activation_situ_beta"),
    ("swiglustep", dict(activation="swiglustep"), "activation=swiglustep"),
    ("relu2", dict(activation="relu2_no_mul"), "activation=relu2_no_mul"),
    ("silu_limit", dict(swiglu_limit=7.0), "swiglu_limit=7.0: with activation silu"),
    ("silu_alpha", dict(swiglu_alpha=1.702), "swiglu_alpha=1.702"),
    ("silu_beta", dict(swiglu_beta=1.0), "swiglu_beta=1.0"),
    ("oai_limit", dict(activation="swigluoai", swiglu_limit=10.0), "swiglu_limit=10.0: vLLM's"),
    ("oai_alpha", dict(activation="swigluoai", swiglu_alpha=1.0), "swiglu_alpha=1.0: vLLM's"),
    ("uninterleave_beta0", dict(activation="swigluoai_uninterleave", swiglu_limit=7.0),
     "swiglu_beta=None: rocm_moe's swiglu_oai computes"),
    ("uninterleave_nolimit", dict(activation="swigluoai_uninterleave", swiglu_beta=1.0),
     "swiglu_limit=None: vLLM requires"),
]


@pytest.mark.parametrize(("kw", "match"), [(k, m) for _, k, m in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_variants_it_would_not_compute_are_refused_at_construction(kw, match):
    kw = dict(kw)
    name = kw.pop("activation", "silu")
    if act(name).is_gated:
        cfg = moe_config(activation=act(name), **kw)
    else:  # vLLM builds ungated configs on CUDA / ROCm only: set it after construction
        cfg = moe_config(**kw)
        cfg.activation = act(name)
    with pytest.raises(ValueError, match=match):
        method_for(cfg)


def test_experts_backend_without_the_variant_is_refused():
    class PlainOnly(Experts):  # the base class runs only PLAIN
        name = "plain-only"

        def _forward(self, *a, **kw):
            raise AssertionError("not reached")

    from rocm_moe.comm.local import LocalDispatcher
    from rocm_moe.placement import Placement

    disp = LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32)
    with pytest.raises(ValueError, match=r"ROCM_MOE_VLLM_EXPERTS='plain-only'|"
                       r"ROCM_MOE_VLLM_EXPERTS=plain-only"):
        rv.build_kernel(moe_config(activation=act("swigluoai"), has_bias=True),
                        dispatcher=disp, experts=PlainOnly())


# ---- W = 2, 3 through FusedMoEFactory (model_cases, in test_vllm.py's launch) -------------------
@pytest.mark.parametrize("W", [2, 3])
def test_gpt_oss_and_llama4_layers_vllm_builds_on_ep_ranks(W):
    for r, res in enumerate(kernel_results(W)):
        v = res["model"]["variants"]
        assert v["gpt_oss"]["activation"] == "swigluoai", v
        assert v["gpt_oss"]["variant"] == "gpt_oss", v
        assert max(v["gpt_oss"]["err"]) <= 1e-5, (r, v)
        assert max(v["gpt_oss"]["engine_err"]) <= 1e-12, (r, v)
        assert max(v["llama4"]["err"]) <= 1e-5, (r, v)
        assert v["llama4"]["top_k"] == 1, v
