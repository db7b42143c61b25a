"""SGLang's own DeepSeek MoE block (``models/deepseek_v2.py: DeepseekV2MoE``: its gate with the
correction bias, grouped sigmoid TopK, a shared expert and ``routed_scaling_factor`` 2.5) served
by the plug-in on one EP rank: the routed experts scaled exactly once, whoever does it.

In sglang 0.5.23 the block scales the routed output itself under an all-to-all backend
(``forward_deepep``) and, off CUDA, without one (``forward_normal``); SGLang's runner scales it
only on CUDA without one. The plug-in scaled the weights too until review found it: 2.5 ** 2
on DeepSeek-V3's routed experts. A block that never scales (Ling's) gets the factor from the
layer, once. The oracle: the block's own TopK weights and ids, the experts in
float64, times 2.5, plus the shared expert."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rocm_moe.comm import pool
from rocm_moe.integrations import sglang as rs
from tests_integrations import oracle64 as o

pytest.importorskip("sglang")
from tests_integrations.sglang import model as m

E, H, I, K, FACTOR = 8, 64, 32, 2, 2.5
SPEC = m.Spec(E=E, H=H, I=I, K=K, layers=1)


def _block():
    """A DeepseekV2MoE of E routed experts (2 groups, 1 kept), one shared expert, weights from
    the seeds (routed experts through the layer's weight loader)."""
    from sglang.srt.models.deepseek_v2 import DeepseekV2MoE
    from transformers import PretrainedConfig

    cfg = PretrainedConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                           num_experts_per_tok=K, n_shared_experts=1,
                           routed_scaling_factor=FACTOR, n_group=2, topk_group=1,
                           norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
                           hidden_act="silu")
    blk = DeepseekV2MoE(cfg, layer_id=0)
    g = torch.Generator().manual_seed(5)
    moe, se = blk.experts, blk.shared_experts
    with torch.no_grad():
        blk.gate.weight.copy_(torch.randn(E, H, generator=g) / H ** 0.5)
        blk.gate.e_score_correction_bias.copy_(0.1 * torch.randn(E, generator=g))
        se.gate_up_proj.weight.copy_(torch.randn(2 * I, H, generator=g) / H ** 0.5)
        se.down_proj.weight.copy_(torch.randn(H, I, generator=g) / I ** 0.5)
    m.load_experts(moe, SPEC, 0)
    moe.quant_method.process_weights_after_loading(moe)
    return blk


def _oracle(blk, x: torch.Tensor) -> torch.Tensor:
    """FACTOR x the routed experts (float64, at the block's own TopK weights and ids) + the
    shared expert."""
    with torch.no_grad():
        tk = blk.topk(x, blk.gate(x, forward_batch=None))
        se = blk.shared_experts
        h = x.double() @ se.gate_up_proj.weight.double().T
        shared = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ se.down_proj.weight.double().T
    routed = o.oracle(SPEC.seed * 100, x, tk.topk_weights, tk.topk_ids, H, I, torch.float32)
    return FACTOR * routed + shared


@pytest.fixture(params=["mori", "none"])
def deepseek_rank(request, monkeypatch):
    """One EP rank with the plug-in, ``--moe-a2a-backend`` mori (forward_deepep) or none
    (forward_normal)."""
    for env in (rs.ENV_COMM, rs.ENV_EXPERTS, rs.ENV_WEIGHT_MODE):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(rs.ENV_MAX_TOKENS, str(m.CAP))
    m.publish(1, 0, **({"moe_a2a_backend": "mori"} if request.param == "mori" else {}))
    m.load_plugin()
    pool.clear()
    yield request.param
    pool.clear()


@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_deepseek_block_scales_the_routed_experts_once(deepseek_rank, monkeypatch, mode):
    monkeypatch.setenv(rs.ENV_WEIGHT_MODE, mode)
    blk = _block()
    assert type(blk.experts.dispatcher) is rs.RocmMoEDispatcher
    assert blk._enable_a2a_moe == (deepseek_rank == "mori")
    assert blk.experts.dispatcher.routed_scaling_factor is None  # the block scales (CPU, mori)
    for T in (1, 5, m.CAP * 2):  # (2 x the capacity: chunks)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            y = blk.forward(x, None)
        assert o.rel_err(y, _oracle(blk, x)) <= 1e-5, (deepseek_rank, T)


def test_who_scales_follows_sglang(deepseek_rank, monkeypatch):
    """The layer (SGLang's runner; rocm_moe's dispatcher) scales unless the top-k step fused the
    factor; the self-scaling blocks scale themselves under an all-to-all backend or off CUDA,
    and only there turn the dispatcher's scaling off."""
    import sglang.srt.utils as su
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig

    cfg = MoeRunnerConfig(num_experts=E, num_local_experts=E, hidden_size=H,
                          intermediate_size_per_partition=I, top_k=K,
                          params_dtype=torch.float32, routed_scaling_factor=FACTOR)
    assert rs.routing_scale(cfg, SimpleNamespace()) == FACTOR  # (an unquantised method)
    fused = SimpleNamespace(fuse_routed_scaling_factor_in_topk=True)
    assert rs.routing_scale(cfg, fused) is None  # the top-k step scaled the weights
    assert rs.block_scales_routed_output()  # CPU (forward_normal scales), or mori
    monkeypatch.setattr(su, "is_cuda", lambda: True)
    assert rs.block_scales_routed_output() == (deepseek_rank == "mori")


def test_a_block_that_does_not_scale_gets_the_factor_once(deepseek_rank):
    """Ling's block (``models/bailing_moe.py``) gives the factor to its FusedMoE and never
    scales the routed output itself: the dispatcher applies it (independent review: a version
    that left every factor to the block returned Ling's routed experts unscaled)."""
    from sglang.srt.models.bailing_moe import BailingMoESparseMoeBlock
    from transformers import PretrainedConfig

    cfg = PretrainedConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                           num_experts_per_tok=K, num_shared_experts=None, norm_topk_prob=True,
                           routed_scaling_factor=FACTOR, hidden_act="silu")
    blk = BailingMoESparseMoeBlock(0, cfg)
    moe = blk.experts
    assert moe.dispatcher.routed_scaling_factor == FACTOR
    with torch.no_grad():
        blk.gate.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(5))
                              / H ** 0.5)
    m.load_experts(moe, SPEC, 0)
    moe.quant_method.process_weights_after_loading(moe)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tk = blk.topk(x, blk.gate(x))
        y = blk._forward_router_experts(x, None)  # (the block's routed part, no shared expert)
    routed = o.oracle(SPEC.seed * 100, x, tk.topk_weights, tk.topk_ids, H, I, torch.float32)
    assert o.rel_err(y, FACTOR * routed) <= 1e-5
