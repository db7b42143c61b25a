"""Rank-side case of the SGLang EPLB test (test_eplb.py): the small model of ``model.py`` with
redundant experts, built from SGLang's classes on gloo ranks under SGLang's own EPLB pieces:

    ExpertLocationMetadata._init_raw   the placement tables ("static" dispatch: a replica on the
                                       token's own rank first), set as the process's metadata
    FusedMoE(num_experts=E + R)        weights loaded by logical id into every replica (SGLang's
                                       weight_loader reads the metadata)
    TopK                               maps logical ids to physical ones before dispatch
    moriep's recorder hooks            the counts rocm_moe's dispatcher hands SGLang's expert
                                       distribution recorder (a stub recorder stands in for the
                                       one SGLang's EPLB manager reads: its gatherer keeps what
                                       it is given)
    update_expert_weights_single_layer SGLang's weight move (P2P over the gloo world)
    ExpertLocationMetadata.update      the tables rewritten in place

The new placement is rocm_moe's balancer on the recorded load. Outputs are checked against the
float64 oracle of the unreplicated model before and after the move."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from rocm_moe.eplb_balance import rank_loads, rebalance
from tests_integrations import oracle64 as o
from tests_integrations.sglang import model as m

SPEC = m.Spec(layers=2, scale=(None, 2.5))
HOT = 4  # the logical expert the skewed tokens prefer


class StubRecorder:
    """SGLang's recorder interface as moriep's hooks use it: ``recording`` and
    ``on_deepep_dispatch_low_latency(local counts)``, kept per call."""

    recording = True

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def on_deepep_dispatch_low_latency(self, local_physical_count_of_layer):
        self.calls.append(local_physical_count_of_layer.clone())


def metadata(p2l_LP: torch.Tensor, W: int, rank: int):
    from sglang.srt.eplb import expert_location as el

    l2all = el._compute_logical_to_all_physical_map(p2l_LP, SPEC.E, W, rank)
    return el.ExpertLocationMetadata._init_raw(ep_size=W, physical_to_logical_map=p2l_LP,
                                               logical_to_all_physical_map=l2all,
                                               moe_ep_rank=rank)


def build(P: int):
    """model.build with P physical experts, weights loaded by logical id (SGLang puts each into
    all its replicas)."""
    from sglang.srt.layers.moe.ep_moe.layer import get_moe_impl_class
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.moe.utils import RoutingMethodType

    cls = get_moe_impl_class(None)
    layers = []
    for n in range(SPEC.layers):
        topk = TopK(top_k=SPEC.K, renormalize=True, use_grouped_topk=False, layer_id=n)
        moe = cls(num_experts=P, top_k=SPEC.K, layer_id=n, hidden_size=SPEC.H,
                  intermediate_size=SPEC.I, params_dtype=torch.float32,
                  routing_method_type=RoutingMethodType.Renormalize,
                  routed_scaling_factor=SPEC.scale[n])
        topk.bind_runner_backend(moe.runner_backend, routing_method_type=moe.routing_method_type)
        m.load_experts(moe, SPEC, n)
        moe.quant_method.process_weights_after_loading(moe)
        gate = m.gate(SPEC, n).clone()
        gate[HOT] += 3.0 / SPEC.H ** 0.5  # skew the load towards one expert
        layers.append(dict(gate=gate, topk=topk, moe=moe))
    return layers


def forward(layers, x):
    from types import SimpleNamespace

    return m.forward([SimpleNamespace(**layer) for layer in layers], x)


def oracle(layers, x):
    """model.oracle with the skewed gates."""
    saved = m.gate
    m.gate = lambda spec, n: layers[n]["gate"]
    try:
        return m.oracle(SPEC, x)
    finally:
        m.gate = saved


def run(info, R: int) -> dict:
    import sglang.srt.layers.moe.token_dispatcher.moriep as moriep
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata
    from sglang.srt.eplb.expert_location_updater import (
        create_temp_buffers,
        update_expert_weights_single_layer,
    )

    from rocm_moe.comm import pool
    from rocm_moe.integrations import sglang as rs
    from rocm_moe.replicas import ReplicatedPlacement

    W, r = info.world_size, info.rank
    P = SPEC.E + R
    m.publish(W, r, ep_num_redundant_experts=R, enable_eplb=True,
              ep_dispatch_algorithm="static")
    m.load_plugin()
    initial = ReplicatedPlacement.initial(SPEC.E, R, W).phys_to_log
    p2l = initial[None].repeat(SPEC.layers, 1)
    meta = metadata(p2l.clone(), W, r)
    set_global_expert_location_metadata(meta, allow_overwrite=True)
    pool.clear()
    os.environ["ROCM_MOE_SGLANG_COMM"] = "torch"
    os.environ["ROCM_MOE_SGLANG_MAX_TOKENS"] = "64"
    layers = build(P)
    recorder = StubRecorder()
    moriep.get_global_expert_distribution_recorder = lambda: recorder
    out = dict(P=layers[0]["moe"].dispatcher.dispatcher.placement.num_experts,
               placement=rs.replicas_from_sglang(0).phys_to_log.tolist())
    T = 20 + 7 * r
    x = m.tokens(SPEC, r, T)
    out["err_before"] = o.rel_err(forward(layers, x), oracle(layers, x))
    # the recorder got one [P / W] count per layer; gather the ranks' into [L, P]
    local = torch.stack(recorder.calls).long()  # [L, e]
    out["calls"] = len(recorder.calls)
    everyone = [torch.zeros_like(local) for _ in range(W)]
    dist.all_gather(everyone, local)
    physical = torch.cat(everyone, dim=1)  # rank r's block is physical [r e, (r + 1) e)
    total = torch.tensor([T])
    dist.all_reduce(total)
    out["counted"] = physical.sum(1).tolist()
    out["expected"] = [int(total) * SPEC.K] * SPEC.layers
    logical = torch.zeros(SPEC.layers, SPEC.E, dtype=torch.int64).scatter_add_(1, p2l, physical)
    new = rebalance(logical, num_physical=P, num_ranks=W)
    out["heaviest"] = [rank_loads(logical, p2l, W).max(1).values.tolist(),
                       rank_loads(logical, new, W).max(1).values.tolist()]
    out["moved"] = int((new != p2l).sum())
    for n, layer in enumerate(layers):
        weights = [layer["moe"].w13_weight.data, layer["moe"].w2_weight.data]
        update_expert_weights_single_layer(
            routed_experts_weights=weights, temp_buffers=create_temp_buffers(weights),
            old_physical_to_logical_map=p2l[n].tolist(),
            new_physical_to_logical_map=new[n].tolist(), num_local_physical_experts=P // W,
            num_gpu_per_node=W, rank=r, world_size=W)
    meta.update(metadata(new.clone(), W, r), update_layer_ids=list(range(SPEC.layers)))
    out["placement_after"] = rs.replicas_from_sglang(0).phys_to_log.tolist()
    out["new"] = new[0].tolist()
    x = m.tokens(SPEC, r, T + 3)
    out["err_after"] = o.rel_err(forward(layers, x), oracle(layers, x))
    pool.clear()
    return out
