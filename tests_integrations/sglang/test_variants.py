"""Expert variants through the plug-in (issue 30, item 4): SGLang's own gpt-oss MoE layer
(``FusedMoE(activation="silu", gemm1_alpha=1.702, gemm1_clamp_limit=7.0, with_bias=True,
use_weight_loader_fused=True)`` as ``models/gpt_oss.py`` builds it, the checkpoint's fused
tensors loaded through the layer's own fused weight loader, w13 interleaved as SGLang leaves it)
and Llama 4's (``TopK(custom_routing_function=Llama4MoE.custom_routing_function)`` + FusedMoE
with ``apply_router_weight_on_input=True``), computed as SGLang's layer defines them, and a
refusal for each variant rocm_moe does not compute.

One rank in this process (the W = 2, 3 gpt-oss layer runs in test_sglang.py's launch,
``model.gpt_oss_scenario``). Each output is compared with the float64 oracle of the engine's
semantics (``variants64``) and with SGLang's own activation function
(``swiglu_gpt_oss_sigmoid_alpha``, the torch function its Triton runner calls) composed into the
expert in float64; SGLang's fused Triton kernels do not run on a CPU."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.integrations import sglang as rs
from tests_integrations import oracle64 as o
from tests_integrations import variants64 as v64

pytest.importorskip("sglang")
from tests_integrations.sglang import model as m
from tests_integrations.sglang.test_sglang import results

E, K, H, I = 8, 2, 64, 32
SEED = 23


def sglang_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """SGLang's own gpt-oss activation (interleaved rows), its Python body (the function is
    wrapped in torch.compile)."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe as fm

    fn = fm.swiglu_gpt_oss_sigmoid_alpha
    return getattr(fn, "_torchdynamo_orig_callable", fn)(h, alpha, limit)


@pytest.mark.parametrize("mode", ["experts", "combine"])
@pytest.mark.parametrize("T", [1, 33])
def test_gpt_oss_layer_matches_sglangs_semantics(one_rank, monkeypatch, mode, T):
    monkeypatch.setenv(rs.ENV_WEIGHT_MODE, mode)
    p = v64.expert_params(SEED, E, H, I, torch.float32)
    layer = m.build_gpt_oss(p, E=E, K=K)
    assert layer.moe.dispatcher.variant == rs.ExpertVariant.gpt_oss(alpha=1.702, limit=7.0)
    loaded = layer.loaded  # as SGLang's loader left them: interleaved rows
    assert torch.equal(loaded["w13"], v64.interleave(p["w13"]))
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    y, w, ids = m.forward_one(layer, x)
    ref = v64.oracle(x, w, ids, p)  # gate rows then up rows: the checkpoint's experts
    engine = torch.zeros_like(ref)  # SGLang's activation on SGLang's loaded tensors
    for t in range(T):
        for k in range(K):
            g = int(ids[t, k])
            a = x[t].double() @ loaded["w13"][g].double().T + loaded["b13"][g].double()
            e_out = sglang_swiglu(a[None], 1.702, 7.0)[0] @ loaded["w2"][g].double().T
            engine[t] += float(w[t, k]) * (e_out + loaded["b2"][g].double())
    assert o.rel_err(engine, ref) <= 1e-12
    assert o.rel_err(y, ref) <= 1e-5, (mode, T)
    # de-interleaved in place: the same storage now holds gate rows then up rows
    assert torch.equal(layer.moe.w13_weight, p["w13"])
    assert torch.equal(layer.moe.w13_weight_bias, p["b13"])


def test_gpt_oss_split_layout_is_read_as_is(one_rank):
    """``gate_up_interleaved=False`` (SGLang's ``swiglu_no_interleaved_with_alpha_and_limit``):
    nothing is permuted."""
    p = v64.expert_params(SEED, E, H, I, torch.float32)
    layer = m.build_gpt_oss(p, E=E, K=K, gate_up_interleaved=False)
    assert torch.equal(layer.moe.w13_weight, p["w13"])
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(9))
    y, w, ids = m.forward_one(layer, x)
    assert o.rel_err(y, v64.oracle(x, w, ids, p)) <= 1e-5


def test_llama4_weight_on_input_top1(one_rank):
    from sglang.srt.models.llama4 import Llama4MoE

    spec = m.Spec(E=E, K=1, layers=1, scale=(None,))
    layers = m.build(spec, topk_kw=dict(renormalize=False,
                                        custom_routing_function=Llama4MoE.custom_routing_function),
                     apply_router_weight_on_input=True)
    x = m.tokens(spec, 0, 33)
    logits = x @ layers[0].gate.T
    y = m.forward(layers, x) - x
    w = torch.sigmoid(logits.max(-1, keepdim=True).values.float())
    ids = logits.argmax(-1, keepdim=True).to(torch.int32)
    ref = o.oracle(spec.seed * 100, x * w, torch.ones_like(w), ids, H, spec.I, torch.float32)
    assert o.rel_err(y, ref) <= 1e-5


REFUSED = [
    ("gelu", dict(activation="gelu"), "activation=gelu"),
    ("ungated", dict(is_gated=False), "activation=ungated"),
    ("silu_clamp", dict(gemm1_clamp_limit=7.0), "gemm1_clamp_limit=7.0: without gemm1_alpha"),
    ("alpha_no_limit", dict(gemm1_alpha=1.702), "gemm1_clamp_limit=None: SGLang requires"),
    ("beta", dict(gemm1_alpha=1.702, gemm1_clamp_limit=7.0, gemm1_beta=0.5),
     "gemm1_beta=0.5"),
    ("deepseek_v4", dict(swiglu_limit=10.0), "swiglu_limit=10.0: SGLang clamps"),
]


@pytest.mark.parametrize(("kw", "match"), [(k, mt) for _, k, mt in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_variants_it_would_not_compute_are_refused(one_rank, kw, match):
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig

    cfg = MoeRunnerConfig(num_experts=E, num_local_experts=E, hidden_size=H,
                          intermediate_size_per_partition=I, top_k=K,
                          params_dtype=torch.float32, num_fused_shared_experts=0, **kw)
    with pytest.raises(ValueError, match=match):
        rs.make_sglang_dispatcher(cfg)


def test_interleaved_weights_not_processed_are_refused(one_rank):
    from rocm_moe.comm.local import LocalDispatcher
    from rocm_moe.placement import Placement

    disp = rs.RocmMoEDispatcher(
        LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                        dtype=torch.float32),
        variant=rs.ExpertVariant.gpt_oss(alpha=1.702, limit=7.0), interleaved_gate_up=True)
    p = v64.expert_params(SEED, E, H, I, torch.float32)
    w13 = v64.interleave(p["w13"])
    x, w, ids = o.tokens(SEED, 0, 5, E, H, K, torch.float32)
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    d = disp.dispatch(x, StandardTopKOutput(topk_weights=w, topk_ids=ids, router_logits=None))
    with pytest.raises(ValueError, match="interleaved gate/up rows"):
        rs.run_experts(disp, d, w13, p["w2"], v64.interleave(p["b13"]), p["b2"])
    b13 = v64.interleave(p["b13"])
    rs.uninterleave_gate_up(w13, b13)
    y = disp.combine(rs.run_experts(disp, d, w13, p["w2"], b13, p["b2"]))
    assert o.rel_err(y, v64.oracle(x, w, ids, p)) <= 1e-5


def test_uninterleave_worked_example():
    t = torch.tensor([[10.0, 20.0, 11.0, 21.0]])  # g0, u0, g1, u1
    rs.uninterleave_gate_up(t)
    assert t.tolist() == [[10.0, 11.0, 20.0, 21.0]]
    assert rs.is_gate_up(t)


@pytest.mark.parametrize("W", [2, 3])
def test_gpt_oss_layer_on_ep_ranks(W):
    for r, res in enumerate(results(W)):
        g = res["model"]["gpt_oss"]
        assert g["variant"] == "gpt_oss", g
        assert max(g["err"]) <= 1e-5, (r, g)


def test_experts_backend_without_the_variant_is_refused():
    from rocm_moe.comm.local import LocalDispatcher
    from rocm_moe.experts.base import Experts
    from rocm_moe.placement import Placement

    class PlainOnly(Experts):  # the base class runs only PLAIN
        name = "plain-only"

        def _forward(self, *a, **kw):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"ROCM_MOE_SGLANG_EXPERTS=plain-only"):
        rs.RocmMoEDispatcher(
            LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                            dtype=torch.float32), experts=PlainOnly(),
            variant=rs.ExpertVariant.gpt_oss(alpha=1.702, limit=7.0))
