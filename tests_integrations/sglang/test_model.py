"""SGLang's own TopK + FusedMoE / DeepEPMoE layers, as qwen3_moe.py builds them, in a 3-layer
model with a residual between layers, served by the plug-in on one EP rank (in this process;
the multi-rank runs are in test_sglang.py's launch): the float64 oracle at batches of 1,
max_tokens_per_rank and 3.5 x max_tokens_per_rank in both weight modes, one dispatcher for
every layer, weights as loaded, the decode-graph contract (no host read under capture), the
token budget, and each layer the plug-in refuses."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.comm import pool
from rocm_moe.integrations import sglang as rs
from tests_integrations import oracle64 as o

pytest.importorskip("sglang")
from tests_integrations.sglang import model as m

SPEC = m.Spec()


def _layers(**kw):
    from sglang.srt.layers.moe.ep_moe.layer import DeepEPMoE
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return m.build(SPEC, (FusedMoE, DeepEPMoE), **kw)


@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_model_matches_float64_oracle_with_one_dispatcher(one_rank, monkeypatch, mode):
    monkeypatch.setenv(rs.ENV_WEIGHT_MODE, mode)
    layers = _layers()
    shared = pool.shared_dispatchers()
    assert len(shared) == 1
    assert shared[0].name == "local"
    assert shared[0].max_tokens_per_rank == m.CAP
    assert all(layer.moe.dispatcher.dispatcher is shared[0] for layer in layers)
    assert [type(layer.moe).__name__ for layer in layers] == ["FusedMoE", "DeepEPMoE",
                                                             "FusedMoE"]
    assert type(layers[0].moe.dispatcher.experts).__name__ == "ReferenceExperts"  # CPU default
    for T in (*m.SIZES, 0):
        x = m.tokens(SPEC, 0, T)
        y = m.forward(layers, x)
        assert y.shape == (T, SPEC.H)
        if T:  # layer 1's routed_scaling_factor 2.5 is in the oracle: applied exactly once
            assert o.rel_err(y, m.oracle(SPEC, x)) <= 1e-5, T


def test_decode_graph_path_reads_nothing_on_the_host(one_rank, monkeypatch):
    layers = _layers()
    x = m.tokens(SPEC, 0, m.CAP)
    eager = m.forward(layers, x)
    big = m.tokens(SPEC, 0, m.SIZES[-1])
    eager_big = m.forward(layers, big)
    guard = m.CaptureGuard(monkeypatch, layers)
    assert torch.equal(guard.forward(layers, x), eager)
    # One rank agrees with itself without a collective: chunks run under capture too.
    assert torch.equal(guard.forward(layers, big), eager_big)
    guard.on = True  # the guard bites: a host read in its scope raises
    with pytest.raises(m.HostRead):
        torch.ones(1).item()
    guard.on = False


def test_weights_stay_as_loaded_where_sglang_would_rewrite_them(one_rank, monkeypatch):
    """SGLang's process_weights_after_loading shuffles w13/w2 for AITER (ROCm with
    SGLANG_USE_AITER=1) and packs them for AMX (CPU); both switched on here with stand-ins that
    change the weights. rocm_moe's layers keep them as loaded; a layer that is not rocm_moe's
    (the control) is rewritten."""
    import sglang.srt.layers.quantization.unquant as uq

    monkeypatch.setattr(uq, "_use_aiter", True)
    monkeypatch.setattr(uq, "shuffle_weight", lambda w, layout: w.flip(-1), raising=False)
    monkeypatch.setattr(uq.UnquantizedFusedMoEMethod, "_aiter_ck_moe_supported",
                        lambda self, layer: True)
    monkeypatch.setattr(uq, "_is_cpu", True)
    monkeypatch.setattr(uq, "_is_cpu_amx_available", True)

    def amx(layer, names):
        for name in names:
            getattr(layer, name).data.mul_(-1)

    monkeypatch.setattr(uq, "_amx_process_weight_after_loading", amx)
    layers = _layers()  # build() runs process_weights_after_loading after loading
    for layer in layers:
        assert torch.equal(layer.moe.w13_weight, layer.loaded[0])
        assert torch.equal(layer.moe.w2_weight, layer.loaded[1])
    x = m.tokens(SPEC, 0, 5)
    assert o.rel_err(m.forward(layers, x), m.oracle(SPEC, x)) <= 1e-5
    control = layers[0].moe
    monkeypatch.setattr(control, "dispatcher", object())
    control.quant_method.process_weights_after_loading(control)
    assert not torch.equal(control.w13_weight, layers[0].loaded[0])


@pytest.mark.parametrize(("kw", "field"), [
    (dict(swiglu_limit=7.0), "swiglu_limit"),
    (dict(gemm1_clamp_limit=7.0), "gemm1_clamp_limit"),
    (dict(gemm1_alpha=1.702), "gemm1_alpha"),
    (dict(activation="gelu"), "activation"),
    (dict(is_gated=False), "activation"),
    (dict(no_combine=True), "no_combine"),
], ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_layers_it_would_not_compute_exactly_are_refused(one_rank, kw, field):
    with pytest.raises(ValueError, match=field):
        _layers(**kw)


def test_eplb_flags_accepted(one_rank):  # (the EPLB model itself: test_eplb.py)
    from sglang.srt.runtime_context import get_exec

    x = m.tokens(SPEC, 0, 5)
    with get_exec().moe.override(ep_num_redundant_experts=2, enable_eplb=True):
        layers = _layers()
    assert o.rel_err(m.forward(layers, x), m.oracle(SPEC, x)) <= 1e-5


def test_replicated_token_layout_refused(monkeypatch):
    """--moe-a2a-backend none with EP 2: SGLang hands every rank the same tokens and sums the
    ranks' outputs, so rocm_moe's complete outputs would count twice."""
    monkeypatch.setenv(rs.ENV_MAX_TOKENS, str(m.CAP))
    m.publish(2, 0, a2a="none")
    m.load_plugin()
    pool.clear()
    with pytest.raises(ValueError, match="moe-a2a-backend mori"):
        _layers()
    m.publish(1, 0)


@pytest.mark.parametrize(("env", "value"), [(rs.ENV_COMM, "nccl"), (rs.ENV_EXPERTS, "cutlass"),
                                            (rs.ENV_MAX_TOKENS, "4k")])
def test_unknown_switch_values_refused_naming_the_variable(one_rank, monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=env):
        _layers()


def _args(**kw):
    from types import SimpleNamespace

    base = dict(chunked_prefill_size=8192, max_prefill_tokens=16384, attn_dp_size=1,
                tp_size=8, attn_cp_size=1, cuda_graph_max_bs_decode=None,
                cuda_graph_max_bs_prefill=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(("kw", "cap"), [
    (dict(), 8192),  # one scheduler: its chunk
    (dict(attn_dp_size=8), 1024),  # attention DP: each rank schedules its share
    (dict(attn_dp_size=4), 2048),  # rounded up to attention TP (2)
    (dict(attn_dp_size=8, chunked_prefill_size=1001), 126),  # 126: ceil(1001 / 8)
    (dict(chunked_prefill_size=-1), 16384),  # chunking off: the prefill limit
    (dict(attn_dp_size=8, cuda_graph_max_bs_decode=2048), 2048),  # a graph bucket fits
], ids=["tp", "dp8", "dp4", "dp8-odd", "unchunked", "graph"])
def test_token_budget_follows_sglangs_own(monkeypatch, kw, cap):
    monkeypatch.delenv(rs.ENV_MAX_TOKENS, raising=False)
    assert rs.token_budget(_args(**kw))[0] == cap
    monkeypatch.setenv(rs.ENV_MAX_TOKENS, "512")
    if (kw.get("cuda_graph_max_bs_decode") or 0) > 512:  # below a graph bucket: refused
        with pytest.raises(ValueError, match=f"{rs.ENV_MAX_TOKENS}=512.*CUDA-graph bucket "
                           r"\(2048.*--cuda-graph-max-bs-decode"):
            rs.token_budget(_args(**kw))
        kw = dict(kw, disable_cuda_graph=True)  # no graphs: any value
    assert rs.token_budget(_args(**kw)) == (512, f"{rs.ENV_MAX_TOKENS}=512")
