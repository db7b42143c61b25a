"""The plug-in under vLLM's EPLB (issue 29): vLLM's layers with redundant experts, its tables,
its weight rearrangement and its policy interface with rocm_moe's balancer, on 2 and 3 gloo
ranks (eplb_cases.py says what is vLLM's and what stands in for its GPU-only router kernel);
then the one-process pieces: the policy switch, the tables as rocm_moe's ReplicatedPlacement,
the published rules against vLLM's DefaultEplbPolicy."""

from __future__ import annotations

import functools

import pytest
import torch

from rocm_moe.distributed import launch
from rocm_moe.eplb_balance import deepseek_rules, imbalance, rebalance
from rocm_moe.integrations import vllm as rv
from tests_integrations.vllm import eplb_cases as ec

vllm = pytest.importorskip("vllm")
REDUNDANT = {2: 2, 3: 1}  # P = 10 over 2 ranks, 9 over 3


def _worker(info, R: int) -> dict:
    return ec.run(info, R)


@functools.cache
def eplb_results(W: int) -> list[dict]:
    return launch(W, _worker, REDUNDANT[W], timeout_s=600)


@pytest.mark.parametrize("W", [2, 3])
def test_eplb_model_matches_oracle_before_and_after_vllms_rearrangement(W):
    R = REDUNDANT[W]
    P = ec.E + R
    res = eplb_results(W)
    initial = list(range(ec.E)) + [i % ec.E for i in range(R)]
    for r, out in enumerate(res):
        assert out["supports"] is True
        assert out["P"] == P  # the dispatcher runs the P physical experts
        assert out["local"] == list(range(r * P // W, (r + 1) * P // W))
        assert out["linked"] is True
        assert out["placement"] == initial  # EplbLink reads vLLM's tables
        assert out["err_before"] <= 1e-5, (r, out)
        assert out["err_after"] <= 1e-5, (r, out)
        assert out["load_total"] == out["load_expected"]  # every (token, slot) counted once
        assert out["policy_is_ours"] is True
        assert out["moved"] > 0  # the skewed load moved experts
        assert out["placement_after"] == out["new"]
    first = res[0]
    assert all(out["new"] == first["new"] for out in res)  # every rank, one placement
    before, after = first["imbalance"]
    assert max(after) < max(before), first["imbalance"]  # the heaviest rank got lighter
    assert sum(out["report_rank_total"] for out in res) == first["load_total"][0]
    print(f"W={W} R={R}: heaviest rank load {before} -> {after}, "
          f"{first['moved']} physical slots changed, errors {first['err_before']:.1e} / "
          f"{first['err_after']:.1e}")


# ---- one process ----------------------------------------------------------------------------
def test_eplb_policy_switch(monkeypatch):
    from vllm.distributed.eplb import policy
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    saved = policy.EPLB_POLICIES["default"]
    try:
        monkeypatch.setenv(rv.ENV_EPLB_POLICY, "rocm_moe")
        assert rv.install_eplb_policy() is True
        assert policy.EPLB_POLICIES["default"] is rv.eplb_policy()
        monkeypatch.delenv(rv.ENV_EPLB_POLICY)
        assert rv.install_eplb_policy() is False
        assert policy.EPLB_POLICIES["default"] is DefaultEplbPolicy
        monkeypatch.setenv(rv.ENV_EPLB_POLICY, "fastest")
        with pytest.raises(ValueError, match="ROCM_MOE_VLLM_EPLB_POLICY='fastest'"):
            rv.install_eplb_policy()
    finally:
        policy.EPLB_POLICIES["default"] = saved


def test_eplb_policy_is_rocm_moes_balancer_and_keeps_slots():
    """As EplbState.rearrange calls it: [L, E] load, old map; the result places the same
    experts on each rank as rocm_moe's rebalance, an expert that stays on a GPU keeps its
    slot (vLLM's preserve_intragpu_slots), and max / mean is never above vLLM's own."""
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    g = torch.Generator().manual_seed(0)
    load = (torch.rand(3, 64, generator=g) ** 4 * 1000).round()
    P, W = 72, 8
    old = torch.tensor([list(range(64)) + list(range(8))] * 3)
    new = rv.eplb_policy().rebalance_experts(load, P, 4, 2, W, old)
    ours = rebalance(load, num_physical=P, num_ranks=W, num_nodes=2, num_groups=4)
    for layer in range(3):
        for r in range(W):
            got, want = new[layer, r * 9:(r + 1) * 9], ours[layer, r * 9:(r + 1) * 9]
            assert sorted(got.tolist()) == sorted(want.tolist())
            kept = [s for s in range(9) if int(old[layer, r * 9 + s]) in want.tolist()]
            assert all(int(got[s]) == int(old[layer, r * 9 + s]) for s in kept)
    theirs = DefaultEplbPolicy.rebalance_experts(load, P, 4, 2, W)
    assert bool((imbalance(load, new, W) <= imbalance(load, theirs, W) * (1 + 1e-6)).all())


@pytest.mark.parametrize(("E", "P", "W", "N", "G"),
                         [(256, 288, 8, 1, 8), (64, 64, 4, 1, 1), (64, 72, 8, 2, 4),
                          (60, 72, 6, 3, 6), (33, 36, 4, 1, 1)])
def test_deepseek_rules_are_vllms_default_policy(E, P, W, N, G):
    """rocm_moe's deepseek_rules (written from the published description) against vLLM's
    implementation of the same rules: the same max / mean on random loads (vLLM computes in
    float32, so near-ties may place experts differently at equal load), and on distinct
    integer loads (exact in float32, no ties) the same table."""
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    g = torch.Generator().manual_seed(E + P)
    load = torch.rand(4, E, generator=g, dtype=torch.float64) ** 4 * 1000
    ours = deepseek_rules(load, num_physical=P, num_ranks=W, num_nodes=N, num_groups=G)
    theirs = DefaultEplbPolicy.rebalance_experts(load, P, G, N, W)
    torch.testing.assert_close(imbalance(load, ours, W), imbalance(load, theirs, W),
                               rtol=1e-5, atol=0)
    if E % W == 0:  # (P = E must split over the ranks)
        distinct = torch.stack([torch.randperm(E, generator=g) * 64 + 1 for _ in range(4)])
        ours = deepseek_rules(distinct, num_physical=E, num_ranks=W, num_nodes=N, num_groups=G)
        assert torch.equal(ours, DefaultEplbPolicy.rebalance_experts(distinct, E, G, N, W))


def test_eplb_with_uneven_physical_experts_refused_at_construction():
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    def config(P: int):
        par = FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=3, ep_size=3, tp_rank=0,
                                     pcp_rank=0, dp_rank=0, ep_rank=0, sp_size=1, use_ep=True,
                                     all2all_backend="allgather_reducescatter",
                                     enable_eplb=True)
        return FusedMoEConfig(num_experts=P, experts_per_token=2, hidden_dim=16,
                              intermediate_size=8, num_local_experts=P // 3,
                              num_logical_experts=8, activation=MoEActivation.SILU,
                              device="cpu", routing_method=RoutingMethodType.Renormalize,
                              moe_parallel_config=par, in_dtype=torch.float32)

    from vllm.config import VllmConfig

    with set_current_vllm_config(VllmConfig()):
        with pytest.raises(ValueError, match="num_experts=10: with EPLB"):
            rv.RocmMoEFusedMoEMethod(config(10))
        assert rv.RocmMoEFusedMoEMethod(config(9)).supports_eplb is True


def test_replicas_from_vllm():
    placement = rv.replicas_from_vllm(torch.tensor([0, 1, 2, 3, 0, 1]), 2, 4)
    assert placement.logical_experts(1) == (3, 0, 1)
    assert placement.replica_count.tolist() == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="elastic"):
        rv.replicas_from_vllm(torch.tensor([0, 1, 2, 3, -1, -1]), 2, 4)
    with pytest.raises(ValueError, match=r"logical expert\(s\) \[3\] have no replica"):
        rv.replicas_from_vllm(torch.tensor([0, 1, 2, 0]), 2, 4)


def test_eplb_link_reads_vllms_layer_state():
    from vllm.distributed.eplb.eplb_state import EplbLayerState

    p2l = torch.tensor([[0, 1, 2, 3, 0, 1]])
    l2p, count = ec.tables(p2l, 3, 4)
    st = EplbLayerState()
    view = torch.tensor([[5, 1, 1, 1, 3, 2]], dtype=torch.int32)
    st.set_layer_state(0, view, l2p, count)
    link = rv.EplbLink(st, ep_size=2)
    assert link.ready
    assert link.placement().phys_to_log.tolist() == [0, 1, 2, 3, 0, 1]
    report = link.load()
    assert report.logical.tolist() == [8, 3, 1, 1]
    assert report.per_rank.tolist() == [7, 6]
    with pytest.raises(ValueError, match="has not set the layer's EPLB tables"):
        rv.EplbLink(EplbLayerState(), ep_size=2).placement()
