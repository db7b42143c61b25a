"""Rank-side cases of the EPLB tests (test_eplb.py): the plug-in under vLLM's EPLB, with vLLM's
own layer classes, EPLB tables, weight rearrangement and policy interface on gloo ranks.

vLLM 0.33 refuses ``enable_eplb`` on a CPU platform when it validates its ParallelConfig, and its
router maps logical ids to physical ones (and counts the load) with a Triton kernel that only
exists on GPU platforms (elsewhere the mapping is the identity). So here the config's EPLB fields
are set after validation, and the router's ``eplb_map_to_physical_and_record`` is replaced by a
torch function with the published kernel's semantics (``vllm_router_map``): replica
``(t * 2654435769 mod 2^32) mod count`` of token t, its load counted while recording is on and
t < the unpadded token count. Everything else is vLLM's: FusedMoEFactory's layers with
``enable_eplb`` and redundant experts, ``EplbLayerState.set_layer_state`` with tables built as
``EplbState.add_model`` builds them, ``rearrange_expert_weights_inplace`` over a ``torch_gloo``
``EplbCommunicator``, and the policy call ``EplbState.rearrange`` makes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rocm_moe.comm import pool
from rocm_moe.eplb_balance import rank_loads, rebalance
from rocm_moe.integrations import vllm as rv
from tests_integrations import oracle64 as o
from tests_integrations.vllm import model_cases as mc

E, K, H, I = mc.E, mc.K, mc.H, mc.I
LAYERS = 2
SEED = 17
HOT = 5  # logical expert most tokens pick (a skewed load to rebalance)


def vllm_router_map(topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count,
                    record_enabled, num_unpadded_tokens=None):
    """vLLM's GPU router mapping, in torch (see the module docstring)."""
    T, k = topk_ids.shape
    g = topk_ids.long().clamp(min=0)
    t = torch.arange(T)[:, None].expand(T, k)
    replica = ((t * 2654435769) & 0xFFFFFFFF) % logical_replica_count[g].clamp(min=1)
    phys = logical_to_physical_map[g, replica]
    phys = torch.where(topk_ids >= 0, phys, -1)
    keep = (phys >= 0) & bool(record_enabled)
    if num_unpadded_tokens is not None:
        keep &= t < int(num_unpadded_tokens)
    expert_load_view.index_add_(0, phys[keep].long(),
                                torch.ones(int(keep.sum()), dtype=expert_load_view.dtype))
    return phys.to(topk_ids.dtype)


def tables(phys_to_log_LP: torch.Tensor, slots: int, num_logical: int = E):
    """(logical_to_physical [L, E, slots] -1 padded, replica count [L, E]) as
    ``EplbState.add_model`` / ``compute_logical_maps`` lay them out."""
    L, P = phys_to_log_LP.shape
    l2p = torch.full((L, num_logical, slots), -1, dtype=torch.int64)
    count = torch.zeros(L, num_logical, dtype=torch.int64)
    for layer in range(L):
        for p in range(P):
            e = int(phys_to_log_LP[layer, p])
            l2p[layer, e, count[layer, e]] = p
            count[layer, e] += 1
    return l2p, count


def init(info, R: int):
    """vLLM's parallel state with EPLB on (the EPLB group included) on this launch's ranks."""
    import os

    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    cfg = mc.vllm_config(info.world_size)
    cfg.parallel_config.enable_eplb = True  # after validation: vLLM refuses it on a CPU
    cfg.parallel_config.eplb_config.num_redundant_experts = R
    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(info.world_size, info.rank, local_rank=info.rank,
                                        backend="gloo")
        ps.initialize_model_parallel(tensor_model_parallel_size=info.world_size)
    os.environ[rv.SWITCH] = "1"
    os.environ[rv.ENV_EPLB_POLICY] = "rocm_moe"
    assert rv.register()
    return cfg


def build(cfg, R: int):
    """LAYERS EPLB layers, each rank's physical experts loaded with their logical weights under
    vLLM's initial placement; the EPLB tables set as EplbState.add_model sets them."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    initial = torch.tensor(EplbState.build_initial_global_physical_to_logical_map(E, R))
    p2l = initial[None].repeat(LAYERS, 1)
    l2p, count = tables(p2l, R + 1)
    load = torch.zeros(LAYERS, E + R, dtype=torch.int32)
    runners = []
    with set_current_vllm_config(cfg):
        for i in range(LAYERS):
            runners.append(FusedMoEFactory(
                num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                params_dtype=torch.float32, prefix=f"eplb.layers.{i}.mlp.experts",
                renormalize=True, enable_eplb=True, num_redundant_experts=R))
        for i, runner in enumerate(runners):
            re = runner.routed_experts
            load_weights(re, i, p2l[i])
            re.quant_method.process_weights_after_loading(re)
            runner.set_eplb_state(i, load, l2p, count)
            st = runner.router.eplb_state
            st.should_record_tensor = torch.tensor(True)
            st.num_unpadded_tokens_tensors = [torch.tensor(0, dtype=torch.int32)]
    return runners, dict(p2l=p2l, l2p=l2p, count=count, load=load)


def local_physical(re) -> list[int]:
    """This rank's physical experts in local order (from vLLM's expert map [P])."""
    emap = re.expert_map
    return sorted((p for p in range(emap.numel()) if int(emap[p]) >= 0),
                  key=lambda p: int(emap[p]))


def load_weights(re, layer: int, p2l_P: torch.Tensor) -> None:
    phys = local_physical(re)
    w13, w2 = o.local_weights(SEED + layer, tuple(int(p2l_P[p]) for p in phys), H, I,
                              torch.float32)
    with torch.no_grad():
        re.w13_weight.copy_(w13)
        re.w2_weight.copy_(w2)


def tokens(rank: int, step: int, T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED * 1000 + step * 10 + rank)
    return torch.randn(T, H, generator=g)


def gate(layer: int) -> torch.Tensor:
    """A gate that favours logical expert HOT (so the load is skewed)."""
    g = torch.Generator().manual_seed(SEED * 100 + layer)
    w = torch.randn(E, H, generator=g)
    w[HOT] += 0.5 * torch.ones(H) / H**0.5
    return w


def step(cfg, runners, state, x: torch.Tensor) -> float:
    """One forward of the residual stack; the worst relative error of a layer against the
    float64 oracle at the LOGICAL ids of the physical ids the router picked."""
    from vllm.forward_context import set_forward_context

    worst, h = 0.0, x
    with set_forward_context({}, cfg):
        for i, runner in enumerate(runners):
            st = runner.router.eplb_state
            st.num_unpadded_tokens_tensors[0].fill_(h.shape[0])
            logits = h @ gate(i).T
            y = runner.forward(h, logits)
            st.should_record_tensor.fill_(False)  # the oracle's own routing is not load
            w, phys = runner.router.select_experts(hidden_states=h, router_logits=logits)
            st.should_record_tensor.fill_(True)
            logical = state["p2l"][i][phys.long()]
            if h.shape[0]:
                ref = o.oracle(SEED + i, h, w.float(), logical, H, I, torch.float32)
                worst = max(worst, o.rel_err(y, ref))
            h = h + y
    return worst


def rearrange(info, runners, state, new_p2l: torch.Tensor) -> None:
    """What EplbState.rearrange does after its policy: vLLM's weight move over its gloo
    communicator, then the tables rewritten in place."""
    from vllm.distributed.eplb.eplb_communicator import create_eplb_communicator
    from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace
    from vllm.distributed.parallel_state import get_eplb_group

    weights = [[r.routed_experts.w13_weight.data, r.routed_experts.w2_weight.data]
               for r in runners]
    buffer = [torch.empty_like(w) for w in weights[0]]
    comm = create_eplb_communicator(get_eplb_group(), "torch_gloo", weights, buffer)
    rearrange_expert_weights_inplace(state["p2l"], new_p2l, weights, buffer,
                                     get_eplb_group().cpu_group, comm)
    l2p, count = tables(new_p2l, state["l2p"].shape[-1])
    state["p2l"].copy_(new_p2l)
    state["l2p"].copy_(l2p)
    state["count"].copy_(count)


def eplb_case(info, R: int) -> dict:
    """R redundant experts: forwards match the oracle; the load vLLM's view counted; rocm_moe's
    policy (as vLLM's EplbState calls it) rebalances; vLLM moves the weights; forwards still
    match the oracle and the load is even-er."""
    cfg = init(info, R)
    pool.clear()
    with mc.env(ROCM_MOE_VLLM_COMM="torch", ROCM_MOE_VLLM_MAX_TOKENS=None):
        runners, state = build(cfg, R)
    P, W = E + R, info.world_size
    method = runners[0].routed_experts.quant_method
    disp = method.moe_kernel.prepare_finalize.dispatcher
    out = dict(supports=method.supports_eplb, P=disp.placement.num_experts,
               local=local_physical(runners[0].routed_experts), linked=method.eplb.ready,
               placement=method.eplb.placement().phys_to_log.tolist())
    T = 24 + 9 * info.rank  # uneven batches
    out["err_before"] = step(cfg, runners, state, tokens(info.rank, 0, T))
    load = state["load"].clone().long()
    dist.all_reduce(load, group=disp.group)
    out["load_total"] = load.sum(1).tolist()
    out["load_expected"] = [int(dist_sum(T, disp.group)) * K] * LAYERS
    report = method.eplb.load()
    out["report_rank_total"] = int(report.logical.sum())
    logical = torch.zeros(LAYERS, E, dtype=torch.int64).scatter_add_(1, state["p2l"], load)
    policy = rv.eplb_policy()
    new = policy.rebalance_experts(logical, P, 1, 1, W, state["p2l"].clone())
    out["policy_is_ours"] = [sorted(r) for r in new.reshape(LAYERS * W, -1).tolist()] == \
        [sorted(r) for r in rebalance(logical, num_physical=P, num_ranks=W)
         .reshape(LAYERS * W, -1).tolist()]
    out["imbalance"] = [rank_loads(logical, state["p2l"], W).max(1).values.tolist(),
                        rank_loads(logical, new, W).max(1).values.tolist()]
    out["moved"] = int((new != state["p2l"]).sum())
    rearrange(info, runners, state, new)
    out["placement_after"] = method.eplb.placement().phys_to_log.tolist()
    out["new"] = new[0].tolist()
    out["err_after"] = max(step(cfg, runners, state, tokens(info.rank, s, T + s))
                           for s in (1, 2))
    pool.clear()
    return out


def dist_sum(n: int, group) -> int:
    t = torch.tensor([n])
    dist.all_reduce(t, group=group)
    return int(t)


def run(info, R: int) -> dict:
    """The EPLB case on this rank with vLLM's router mapping in torch (module docstring)."""
    import vllm.model_executor.layers.fused_moe.router.base_router as br

    br.eplb_map_to_physical_and_record = vllm_router_map
    # vLLM's torch communicator waits for the accelerator's current stream after its P2P ops;
    # gloo's ops on CPU tensors have finished by then and there is no accelerator here.
    torch.accelerator.current_stream = lambda *a, **k: _NoStream()
    return eplb_case(info, R)


class _NoStream:
    def synchronize(self) -> None:
        return None
