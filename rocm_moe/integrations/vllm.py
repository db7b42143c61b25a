"""rocm_moe as vLLM's MoE backend (checked against vllm==0.33.0; ``pip install 'rocm_moe[vllm]'``).

vLLM has no registry for an outside all-to-all or experts backend (vllm#50556, #53897), so this
adapter uses the extension points that exist:

    RoutedExperts.forward_modular -> RocmMoEFusedMoEMethod.apply   (chunks of <= capacity)
        FusedMoEKernel(RocmMoEPrepareAndFinalize(dispatcher), RocmMoEExperts(experts, mode))
            prepare  = rocm_moe dispatch   (the frozen handle rides on the dispatched ids)
            apply    = rocm_moe experts    (weight_mode "experts": NoOP reduce; "combine":
                                            Delegate)
            finalize = rocm_moe combine    (the handle's own ids, never the ids vLLM hands back)

``RocmMoEFusedMoEMethod``, an ``UnquantizedFusedMoEMethod`` whose kernel is the one above, is
put in place of vLLM's by ``register()`` (the ``vllm.general_plugins`` entry point of this
package) when ``ROCM_MOE_VLLM=1`` is set. Exactly-once weighting stays rocm_moe's
(``rocm_moe.weighting``): the experts either weight (and say so through vLLM's
``TopKWeightAndReduceNoOP``) or return raw [R, K, H] rows that rocm_moe's combine weights
(``TopKWeightAndReduceDelegate``); vLLM's own reduce never runs. ``routed_scaling_factor`` is
vLLM's: its router scales the top-k weights (or its runner the output), so nothing here does.

One dispatcher per model: every MoE layer borrows the process's dispatcher from
``rocm_moe.comm.pool`` (one symmetric buffer, one MORI op), keyed by EP group, shape and
capacity. Capacity (``max_tokens_per_rank``): vLLM's own token budget, the most tokens one
forward of a rank brings to a MoE layer. In vLLM 0.33 that is ``FusedMoEConfig.max_num_tokens``
(= ``scheduler_config.max_num_batched_tokens``): the scheduler never schedules more, the
profiling run uses exactly that many, CUDA-graph sizes are capped to it and DP padding pads to
the largest of the ranks' (each within it); the modular kernel no longer chunks and there is no
DP chunk size (``VLLM_MOE_DP_CHUNK_SIZE`` is gone). ``ROCM_MOE_VLLM_MAX_TOKENS`` lowers it (less
comm memory): a larger batch then runs in chunks of at most that many tokens, every rank running
as many chunks as the rank with the most (``Dispatcher.num_chunks``: one small all-reduce per
layer in eager forwards; a captured batch must fit one chunk, so the value may not be below
vLLM's largest CUDA-graph size). At the default capacity no rank can exceed it, so no agreement
runs at all.

Defaults: ``ROCM_MOE_VLLM_COMM`` / ``ROCM_MOE_VLLM_EXPERTS`` unset pick the fastest backend that
runs here (``pool.fastest_comm`` / ``pool.fastest_experts``: MORI on ROCm with MORI, symm on the
GPUs of one host, torch otherwise; AITER, Triton, the reference), logged once.

Placement: vLLM's ``expert_map`` ([E] int32, local id or -1) is rocm_moe's ``ExpertMap``;
``vllm_placement`` rebuilds every rank's ownership the way vLLM's ``determine_expert_map`` does,
with the strategy vLLM *resolved* (``ExpertMapManager.placement_strategy``: a requested
"round_robin" falls back to "linear" without expert groups or under DP+EP all-to-all), and the
kernel checks at construction that the layer's map is this rank's (an AITER 0/1 mask taken for
the map, vllm#49758, is refused).

CUDA graphs: under capture the adapter reads nothing on the host (no value checks, no chunk
agreement, capacity-sized received rows passed as they are); eager forwards may read the
received-row count once per layer (to run the experts on the rows that arrived only).

EPLB (``--enable-eplb``, ``--eplb-config '{"num_redundant_experts": R, ...}'``): vLLM's EPLB
drives, rocm_moe computes physical experts. The layer holds P = E + R physical experts, P / W
per rank, contiguous (vLLM's linear expert map; the dispatcher's placement is the contiguous
one of P); vLLM's router maps each logical id to a physical one and counts the load in its
``expert_load_view`` before the kernel sees the ids, so prepare / finalize and the experts run
physical ids as they run expert ids without EPLB. vLLM's ``EplbState`` rearranges between
steps: its policy picks the new placement (``ROCM_MOE_VLLM_EPLB_POLICY=rocm_moe`` puts rocm_moe's
balancer in its place: ``eplb_policy``), its communicator moves the weights inside
``w13_weight`` / ``w2_weight`` and it rewrites the tables, all in place; the kernel reads the
weights at every call and the expert map (physical -> local) never changes, so nothing here goes
stale. ``EplbLink`` reads a layer's state as rocm_moe's ``ReplicatedPlacement`` and
``LoadReport`` (``rocm_layer`` builds its EPMoE with that placement).

Dual-batch overlap (``--enable-dbo``): vLLM runs a step as two micro-batch threads
(``v1/worker/ubatching.py``); prepare and finalize hand the CPU to the other micro-batch and run
their collective on vLLM's comm stream (``_comm_region``, vLLM's own DeepEP-HT hand-off;
``supports_dbo``), each micro-batch's handle on its own ids, and a buffer-holding dispatcher
(symm, MORI) is built with ``batches_in_flight=2`` (``micro_batches``).

Expert variants (``expert_variant``): SiLU SwiGLU, gpt-oss's SWIGLUOAI (alpha 1.702, limit 7.0,
w13 rows interleaved by vLLM's loader: de-interleaved in place once after loading) and MiniMax-M3's
SWIGLUOAI_UNINTERLEAVE (beta 1), each with or without biases (vLLM's own ``w13_bias`` /
``w2_bias``, read at every call); ``apply_router_weight_on_input`` (Llama 4, top-1) as vLLM's
prepare does it (the weight onto the token before dispatch).

Refused with a ValueError at construction (``RocmMoEFusedMoEMethod.__init__`` / create_weights /
process_weights_after_loading), before any collective: other activations (gelu, gelu_tanh,
situ, swiglustep, relu2, ungated), SiLU with a clamp or swiglu_alpha / beta (exaone_moe,
bailing_moe_v3), SWIGLUOAI with other parameters than the ones vLLM's kernels compute,
SWIGLUOAI_UNINTERLEAVE with beta != 1, an experts backend that does not run the variant, EPLB
with physical experts that do not split evenly over the EP ranks, fused shared experts, weights
that vLLM padded or reshaped; per batch: quantised layers and ``apply_router_weight_on_input``
with K > 1 (vLLM asserts the same). Quantised MoE layers (FP8, MXFP4 gpt-oss) are not rocm_moe's
at all: the plug-in replaces vLLM's unquantised method only, so vLLM's own quantised method and
kernel run them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace

import torch

from rocm_moe._checks import check_integer_value, env_switch, env_tokens, error_message
from rocm_moe._libs import import_engine
from rocm_moe.comm.base import CombineHandle, Dispatcher
from rocm_moe.experts.base import Experts, ExpertVariant, variant_kwargs, variant_refusal
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.integrations._gate_up import is_gate_up, uninterleave_gate_up
from rocm_moe.placement import ExpertMap, Placement
from rocm_moe.replicas import ReplicatedPlacement
from rocm_moe.weighting import ExpertsOutput, WeightMode, resolve_weight_mode

VLLM_VERSION = "0.33.0"  # the release the adapter and its signature tests are checked against
SWITCH = "ROCM_MOE_VLLM"  # "1": the plug-in replaces vLLM's unquantised MoE method
ENV_COMM, ENV_EXPERTS, ENV_WEIGHT_MODE = ("ROCM_MOE_VLLM_COMM", "ROCM_MOE_VLLM_EXPERTS",
                                          "ROCM_MOE_VLLM_WEIGHT_MODE")
ENV_MAX_TOKENS = "ROCM_MOE_VLLM_MAX_TOKENS"  # capacity below vLLM's budget: larger batches chunk
_HANDLE_ATTR = "_rocm_moe_handle"  # set on the dispatched ids tensor prepare returns
# Set there too under capture for a capacity-sized dispatch: the experts' row bound
# (Experts(num_rows=, expected_rows=): a decode step's graph costs the rows received)
_ROWS_ATTR = "_rocm_moe_rows"
_EXPORTED = ("RocmMoEPrepareAndFinalize", "RocmMoEExperts", "RocmMoEFusedMoEMethod")


def _require_vllm():
    return import_engine("vllm", "vLLM", VLLM_VERSION)


def _capturing() -> bool:
    """Whether the current stream is capturing a CUDA graph (never on a machine without CUDA:
    the CUDA runtime is only asked once it is initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


# ---- placement ----------------------------------------------------------------------------------
def vllm_placement(num_experts: int, ep_size: int, strategy: str = "linear") -> Placement:
    """Every rank's experts as vLLM's ``determine_expert_map`` assigns them: ``E // W`` each and
    the remainder one by one to the first ranks; "linear" gives rank d a contiguous range,
    "round_robin" the experts d, d + W, d + 2W, ... (a test compares it with vLLM's own).
    ``strategy``: the one vLLM resolved (``ExpertMapManager.placement_strategy``), not the one
    requested."""
    check_integer_value("num_experts", num_experts, minimum=1)
    check_integer_value("ep_size", ep_size, minimum=1)
    if ep_size < 1 or num_experts < ep_size:
        raise ValueError(error_message("num_experts, ep_size", (num_experts, ep_size),
                                       "need 1 <= ep_size <= num_experts",
                                       "take both from the vLLM config"))
    base, rem = divmod(num_experts, ep_size)
    if strategy == "linear":
        lists, start = [], 0
        for d in range(ep_size):
            n = base + (d < rem)
            lists.append(range(start, start + n))
            start += n
    elif strategy == "round_robin":
        lists = [range(d, num_experts, ep_size) for d in range(ep_size)]
    else:
        raise ValueError(error_message("expert_placement_strategy", repr(strategy),
                                       "must be 'linear' or 'round_robin' (vLLM's)",
                                       "pass the layer's expert_map_manager.placement_strategy"))
    return Placement.from_lists(lists, num_experts)


def expert_map_from_vllm(expert_map: torch.Tensor | None, rank: int,
                         num_experts: int) -> ExpertMap:
    """vLLM's ``expert_map`` ([E] int32 local id or -1; None when EP is off) as an ExpertMap;
    an AITER 0/1 ``expert_mask`` ([E + n_shared + 1]) is refused by name (vllm#49758)."""
    if expert_map is None:
        return Placement.contiguous(num_experts, 1).expert_map(0)
    if expert_map.dim() != 1 or expert_map.numel() != num_experts:
        raise ValueError(error_message(
            "expert_map.shape", list(expert_map.shape), f"must be [E={num_experts}] (vLLM's "
            "expert_map: local id or -1); an [E + n_shared + 1] tensor is AITER's 0/1 mask "
            "(vllm#49758)", "pass layer.expert_map, not layer.expert_mask"))
    return ExpertMap(expert_map.to(torch.int32), rank)


# ---- expert-parallel load balancing (EPLB) -------------------------------------------------------
def replicas_from_vllm(physical_to_logical_map: torch.Tensor, ep_size: int,
                       num_logical_experts: int) -> ReplicatedPlacement:
    """One layer's row of vLLM's ``EplbModelState.physical_to_logical_map`` ([P] logical id of
    each physical expert) as rocm_moe's ``ReplicatedPlacement``: the same convention (rank r
    holds physical experts [r P / W, (r + 1) P / W), vLLM's linear expert map under EPLB).
    Refused: -1 entries (elastic EP's unused slots), a logical expert without a replica."""
    t = physical_to_logical_map
    if isinstance(t, torch.Tensor) and t.numel() and int(t.min()) < 0:
        raise _refuse("physical_to_logical_map", t.tolist()[:16], "holds -1 (slots of an "
                      "elastic EP group not in use)", "pass the layer's row cut to the "
                      "model's num_physical_experts")
    return ReplicatedPlacement(t, ep_size, num_logical_experts)


class EplbLink:
    """The plug-in's view of vLLM's EPLB state for one layer (module docstring: EPLB).

    vLLM (0.33) keeps it in the layer's router (``EplbLayerState``: views of
    ``EplbModelState``'s ``logical_to_physical_map`` [E, S] (-1 padded),
    ``logical_replica_count`` [E] and the pass's ``expert_load_view`` [P], set after loading by
    ``EplbState.add_model`` and rewritten in place by every rearrangement). Its router maps the
    logical ids to physical ones and counts the load (``router/base_router.py``; vLLM refuses
    EPLB on platforms where it does not), so the kernel receives physical ids and needs nothing
    from here per batch. This reads the state as rocm_moe's types, on demand (host reads)."""

    def __init__(self, state, *, ep_size: int):
        self.state, self.ep_size = state, ep_size

    @classmethod
    def for_layer(cls, moe_config, layer) -> EplbLink:
        """The link of a loaded ``RoutedExperts``: its runner (vLLM registers it by layer name
        in the static forward context) holds the router's ``EplbLayerState``."""
        from vllm.config import get_current_vllm_config

        ctx = get_current_vllm_config().compilation_config.static_forward_context
        runner = ctx.get(getattr(layer, "layer_name", None))
        state = getattr(getattr(runner, "router", None), "eplb_state", None)
        par = moe_config.moe_parallel_config
        return cls(state, ep_size=par.ep_size if par.use_ep else 1)

    @property
    def ready(self) -> bool:
        """vLLM has set the tables (``EplbState.add_model``; not yet during its profile run)."""
        st = self.state
        return st is not None and st.logical_to_physical_map is not None \
            and st.logical_replica_count is not None

    def _require_ready(self) -> None:
        if not self.ready:
            raise _refuse("eplb_state", None, "vLLM has not set the layer's EPLB tables yet",
                          "call this after the model is loaded and EplbState.add_model ran")

    def placement(self) -> ReplicatedPlacement:
        """The layer's current placement."""
        self._require_ready()
        l2p = self.state.logical_to_physical_map.cpu()
        count = self.state.logical_replica_count.cpu()
        phys_to_log = torch.full((int(count.sum()),), -1, dtype=torch.int64)
        for e in range(l2p.shape[0]):
            phys_to_log[l2p[e, :int(count[e])]] = e
        return replicas_from_vllm(phys_to_log, self.ep_size, l2p.shape[0])

    def load(self):
        """This rank's (token, slot) counts of the current pass (vLLM's ``expert_load_view``)
        as rocm_moe's ``eplb.LoadReport`` (scope "rank"; vLLM sums the ranks' in its step)."""
        from rocm_moe.eplb import LoadReport

        self._require_ready()
        placement = self.placement()
        physical = self.state.expert_load_view.detach().cpu().long()
        logical = torch.zeros(placement.num_experts, dtype=torch.int64).index_add_(
            0, placement.phys_to_log, physical)
        return LoadReport(logical=logical, physical=physical,
                          per_rank=placement.rank_load(physical), steps=1, scope="rank")


ENV_EPLB_POLICY = "ROCM_MOE_VLLM_EPLB_POLICY"  # "rocm_moe": vLLM's EPLB uses rocm_moe's balancer


def eplb_policy():
    """vLLM's EPLB policy with rocm_moe's balancing algorithm (``rocm_moe.eplb_balance.
    rebalance``: DeepSeek's hierarchical rules plus swaps and spare replicas, never worse than
    them on max / mean rank load), then vLLM's own ``preserve_intragpu_slots`` (experts that
    stay on a GPU keep their slot, so fewer weights move)."""
    _require_vllm()
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    return _policy_class(DefaultEplbPolicy)


@functools.cache
def _policy_class(base):
    class RocmMoEEplbPolicy(base):
        @classmethod
        def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks,
                              old_global_expert_indices=None):
            from rocm_moe.eplb_balance import rebalance

            table = rebalance(weight, num_physical=num_replicas, num_ranks=num_ranks,
                              num_nodes=num_nodes, num_groups=num_groups)
            if old_global_expert_indices is not None:
                table = torch.from_numpy(cls.preserve_intragpu_slots(
                    table.numpy(), num_ranks, old_global_expert_indices.cpu().numpy()))
            return table

    return RocmMoEEplbPolicy


def eplb_policy_choice(value: str | None) -> str:
    """``ROCM_MOE_VLLM_EPLB_POLICY``'s value as "rocm_moe" or "vllm" (unset or empty: "vllm"),
    else refused naming it."""
    choice = value or "vllm"
    if choice not in ("rocm_moe", "vllm"):
        raise _refuse(ENV_EPLB_POLICY, repr(choice), "must be 'rocm_moe' or 'vllm'",
                      "set rocm_moe for rocm_moe's balancer, or unset it for vLLM's")
    return choice


def install_eplb_policy() -> bool:
    """With ``ROCM_MOE_VLLM_EPLB_POLICY=rocm_moe``: vLLM's EPLB policy "default" (the only
    name its config accepts in 0.33) becomes ``eplb_policy()`` in this process; unset or
    "vllm": vLLM's own. Returns whether rocm_moe's is in place."""
    choice = eplb_policy_choice(os.environ.get(ENV_EPLB_POLICY))
    from vllm.distributed.eplb import policy

    if choice == "rocm_moe":
        policy.EPLB_POLICIES["default"] = eplb_policy()
        return True
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    policy.EPLB_POLICIES["default"] = DefaultEplbPolicy
    return False


# ---- the pieces vLLM calls ---------------------------------------------------------------------
@contextlib.contextmanager
def _comm_region(capturing: bool):
    """Where prepare's dispatch and finalize's combine run. Outside vLLM's dual-batch overlap
    (``--enable-dbo``), on the calling stream. Under it (two micro-batch threads, vLLM's
    ``v1/worker/ubatching.py``), the micro-batch hands the CPU to the other one first, so that
    one queues its compute, then runs its collective on the comm stream, and the compute stream
    waits for it on exit: ``dbo_yield_and_switch_from_compute_to_comm`` /
    ``dbo_switch_to_compute_sync``, the hand-off of vLLM's own DeepEP-HT and naive DP/EP
    prepare/finalize. Under CUDA-graph capture the collective stays on the capture stream."""
    from vllm.v1.worker.ubatching import (
        dbo_enabled,
        dbo_switch_to_compute_sync,
        dbo_yield_and_switch_from_compute_to_comm,
    )

    if capturing or not dbo_enabled():
        yield
        return
    dbo_yield_and_switch_from_compute_to_comm()
    try:
        yield
    finally:
        dbo_switch_to_compute_sync()


def _dbo_record_stream(*tensors) -> None:
    """Under DBO, mark CUDA tensors made on one of vLLM's two streams as used by the current
    one, so the caching allocator does not hand their memory to the other micro-batch while
    this stream still reads them (what vLLM's DeepEP-HT prepare/finalize does). Nothing
    outside DBO or on a CPU."""
    from vllm.v1.worker.ubatching import dbo_enabled

    if not dbo_enabled():
        return
    stream = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            stream = stream or torch.cuda.current_stream()
            t.record_stream(stream)


def micro_batches(vllm_config=None) -> int:
    """How many micro-batches of one step vLLM runs at once (``--enable-dbo``: 2, its
    ``ParallelConfig.num_ubatches``; else 1), from the current vLLM config."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
    par = getattr(vllm_config, "parallel_config", None)
    if par is None or not par.use_ubatching:
        return 1
    return int(par.num_ubatches)


def _refuse(field: str, value: object, rule: str, fix: str) -> ValueError:
    return ValueError(error_message(field, value, rule, fix))


def _check_unquantized(quant_config) -> None:
    if quant_config is not None and getattr(quant_config, "quant_dtype", None) is not None:
        raise _refuse("quant_config.quant_dtype", quant_config.quant_dtype,
                      "rocm_moe's vLLM backend runs unquantised experts only",
                      f"serve the unquantised model or unset {SWITCH}")


# vLLM's gpt-oss defaults: what torch.ops._C.swigluoai_and_mul computes when vLLM's generic
# activation step (fused_moe/activation.py apply_moe_activation) calls it without arguments,
# and what its gpt-oss Triton experts fall back to (gpt_oss_triton_kernels_moe.py)
SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT = 1.702, 7.0


def _swiglu_params(moe_config, quant_config=None) -> dict:
    """The layer's SwiGLU parameters as vLLM resolves them (``ApplyMoEActivationConfig.
    from_configs``: the quant config's gemm1_* first, then the FusedMoEConfig's swiglu_*),
    None where unset."""
    out = {}
    for field, qfield in (("limit", "gemm1_clamp_limit"), ("alpha", "gemm1_alpha"),
                          ("beta", "gemm1_beta")):
        value = getattr(quant_config, qfield, None) if quant_config is not None else None
        out[field] = value if value is not None else getattr(moe_config, f"swiglu_{field}",
                                                             None)
    return out


def expert_variant(moe_config, quant_config=None) -> ExpertVariant:
    """What every routed expert of a vLLM MoE layer computes, as rocm_moe's ``ExpertVariant``;
    a ValueError naming the field where rocm_moe would compute something else.

    vLLM (0.33) -> rocm_moe:
      SILU, no swiglu_* set                      -> "silu" (plain SwiGLU)
      SWIGLUOAI (gpt-oss; w13 rows interleaved:  -> "swiglu_oai", alpha 1.702, limit 7.0 (the
        gate0, up0, gate1, ...)                     values vLLM's kernels compute; w13 is
                                                    de-interleaved once after loading)
      SWIGLUOAI_UNINTERLEAVE (MiniMax-M3) with   -> "swiglu_oai", that alpha and limit
        swiglu_beta = 1 (the ``up + 1``)
      has_bias (w13_bias [e, 2I], w2_bias [e, H]) -> bias=True (vLLM adds b2 before the
                                                    routing weight, as rocm_moe does)
    ``apply_router_weight_on_input`` (Llama 4, K = 1) is not part of the variant: the weight
    moves onto the token in prepare, as vLLM's own prepare does (``a1 * w.to(a1.dtype)``).
    Refused: every other activation (gelu, gelu_tanh: Gemma 4; situ: Kimi; swiglustep, relu2,
    ungated), SILU with a clamp (exaone_moe, bailing_moe_v3: silu(min(gate, limit)) *
    clamp(up), no ``+ 1``), SILU with swiglu_alpha / beta or situ betas, SWIGLUOAI with
    parameters other than vLLM's fixed ones, SWIGLUOAI_UNINTERLEAVE with beta != 1."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    unset = f"unset {SWITCH} for this model"
    act = moe_config.activation
    p = _swiglu_params(moe_config, quant_config)
    bias = bool(moe_config.has_bias)
    for field in ("activation_situ_beta", "activation_situ_linear_beta"):
        if getattr(moe_config, field, None) is not None:
            raise _refuse(field, getattr(moe_config, field), "SituGLU (Kimi's sit activation) "
                          "is not an activation rocm_moe's experts compute", unset)
    if act == MoEActivation.SILU:
        for field in ("limit", "alpha", "beta"):
            if p[field] is not None:
                raise _refuse(f"swiglu_{field}", p[field], "with activation silu vLLM "
                              "computes silu(min(gate, limit)) * clamp(up, -limit, limit) "
                              "(exaone_moe, bailing_moe_v3); rocm_moe's clamped SwiGLU is "
                              "gpt-oss's (up + 1) form, so it would compute another model",
                              unset)
        return ExpertVariant(bias=bias)
    if act == MoEActivation.SWIGLUOAI:
        fixed = dict(limit=SWIGLUOAI_LIMIT, alpha=SWIGLUOAI_ALPHA, beta=1.0)
        for field, want in fixed.items():
            if p[field] is not None and float(p[field]) != want:
                raise _refuse(f"swiglu_{field}", p[field], f"vLLM's swigluoai kernels "
                              f"compute {field}={want} whatever the config says "
                              "(apply_moe_activation calls swigluoai_and_mul without it), so "
                              "rocm_moe computes that too and refuses another value",
                              f"use activation 'swigluoai_uninterleave' with that {field}, "
                              f"or {unset}")
        return ExpertVariant.gpt_oss(alpha=SWIGLUOAI_ALPHA, limit=SWIGLUOAI_LIMIT) \
            if bias else ExpertVariant(activation="swiglu_oai", alpha=SWIGLUOAI_ALPHA,
                                       limit=SWIGLUOAI_LIMIT)
    if act == MoEActivation.SWIGLUOAI_UNINTERLEAVE:
        beta = 0.0 if p["beta"] is None else float(p["beta"])
        if beta != 1.0:
            raise _refuse("swiglu_beta", p["beta"], "rocm_moe's swiglu_oai computes "
                          "(up + 1) * glu: beta must be 1 (vLLM's default is 0)", unset)
        if p["limit"] is None:
            raise _refuse("swiglu_limit", None, "vLLM requires a clamp limit for "
                          "swigluoai_uninterleave", "set swiglu_limit from the model config")
        alpha = 1.0 if p["alpha"] is None else float(p["alpha"])
        return ExpertVariant(activation="swiglu_oai", alpha=alpha, limit=float(p["limit"]),
                             bias=bias)
    raise _refuse("activation", getattr(act, "value", act), "rocm_moe experts compute silu "
                  "(SwiGLU) and swigluoai / swigluoai_uninterleave (gpt-oss's clamped SwiGLU) "
                  "only", unset)


def interleaved_gate_up(moe_config) -> bool:
    """Whether vLLM loads this layer's w13 rows interleaved (gate0, up0, gate1, ...): its
    SWIGLUOAI activation (gpt-oss checkpoints; ``GptOssRoutedExperts`` transposes each
    expert's [H, 2I] block and keeps the column order)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    return moe_config.activation == MoEActivation.SWIGLUOAI


def check_layer_config(moe_config) -> ExpertVariant:
    """Refuse, with the reason, a vLLM MoE layer that rocm_moe would not compute exactly
    (``expert_variant``: activation, clamp, parameters); with EPLB the physical experts split
    evenly over the EP ranks. Runs when vLLM builds the layer's method, before any weight or
    collective. Returns the layer's ExpertVariant."""
    variant = expert_variant(moe_config)
    par = moe_config.moe_parallel_config
    if par.dp_size > 1 and not par.use_ep:
        raise _refuse("--data-parallel-size", par.dp_size, "without --enable-expert-parallel "
                      "vLLM splits each expert's intermediate dimension over the DP x TP ranks "
                      "and expects every DP rank's tokens gathered to all of them; rocm_moe's "
                      "dispatcher would run each rank's own tokens through its slice only (a "
                      "partial sum, silently)", "add --enable-expert-parallel, or unset "
                      f"{SWITCH} for this model")
    if par.enable_eplb and par.use_ep and moe_config.num_experts % par.ep_size:
        raise _refuse("num_experts", moe_config.num_experts, f"with EPLB the physical experts "
                      f"(logical + redundant) must split evenly over ep_size={par.ep_size}",
                      "pick --eplb-config num_redundant_experts so that E + R is a multiple "
                      "of the EP size")
    return variant


def chunk_count(dispatcher: Dispatcher, num_tokens: int, budget: int) -> int:
    """How many chunks of at most ``dispatcher.max_tokens_per_rank`` tokens every rank runs for
    a forward of ``num_tokens`` tokens here; ``budget``: the most tokens any rank's forward can
    bring (vLLM's ``max_num_batched_tokens``).

    No agreement (nothing read, nothing sent) where no rank can exceed the capacity (one rank,
    or a capacity of at least the budget: a batch over it is then refused by the dispatcher on
    every rank) and under CUDA-graph capture (a captured batch must fit one chunk); otherwise
    ``Dispatcher.num_chunks`` (the group's MAX, one small all-reduce)."""
    cap = dispatcher.max_tokens_per_rank
    if cap is None or dispatcher.world_size == 1:  # no capacity, or nobody to agree with
        return dispatcher.num_chunks(num_tokens)  # (a host computation: no collective)
    if budget <= cap:
        return 1
    if _capturing():
        if num_tokens > cap:
            raise _refuse("num_tokens", num_tokens, f"a captured batch must fit one chunk of "
                          f"max_tokens_per_rank={cap} (ranks cannot agree on a chunk count "
                          "inside a CUDA graph)", f"raise {ENV_MAX_TOKENS} to at least vLLM's "
                          "largest CUDA-graph size (--max-cudagraph-capture-size)")
        return 1
    return dispatcher.num_chunks(num_tokens)


@functools.cache
def _classes() -> SimpleNamespace:
    """The vLLM subclasses, built on first use so importing this module never needs vLLM."""
    _require_vllm()
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceContiguous,
        TopKWeightAndReduceDelegate,
        TopKWeightAndReduceNoOP,
    )
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    class RocmMoEPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
        """vLLM's prepare/finalize over any rocm_moe ``Dispatcher``.

        ``prepare`` dispatches and returns the dispatched rows, ids and weights; the dispatch's
        frozen handle is attached to the returned ids tensor, which vLLM hands back to
        ``finalize``. ``finalize`` combines with the handle's own ids (never the ids it is
        given, vllm#52639) and writes [T, H] into vLLM's output; ids that did not come from
        this prepare are refused. No state is kept on ``self`` between the two calls, so
        micro-batches may interleave (on dispatchers that allow it).

        Capacity-sized results (symm, MORI: R = W * capacity rows, the rows past
        ``num_valid`` empty): in eager mode the rows that arrived are read once and only they
        reach the experts (finalize pads the output back); under capture all R rows do (empty
        slots are skipped by every experts backend), without a host read."""

        def __init__(self, dispatcher: Dispatcher):
            super().__init__()
            if not isinstance(dispatcher, Dispatcher):
                raise TypeError(error_message("dispatcher", type(dispatcher).__name__,
                                              "must be a rocm_moe Dispatcher",
                                              "build one with rocm_moe.backends.make_dispatcher"))
            self.dispatcher = dispatcher
            self._checked_maps: dict[int, torch.Tensor] = {}  # expert_map tensors known good

        @property
        def activation_format(self):
            return mk.FusedMoEActivationFormat.Standard

        def topk_indices_dtype(self):
            return torch.int32

        def max_num_tokens_per_rank(self):
            return self.dispatcher.max_tokens_per_rank

        def num_dispatchers(self) -> int:
            return self.dispatcher.world_size

        def supports_dbo(self) -> bool:
            # prepare / finalize hand their collective to vLLM's comm stream themselves
            # (_comm_region); the handle rides on each micro-batch's ids, nothing on self.
            # supports_async stays False: it would also switch vLLM to kernel-internal
            # shared-expert overlap.
            return True

        def output_is_reduced(self) -> bool:
            # Over an EP group combine returns each token's complete output on its own rank.
            # One rank (no EP) with tensor-parallel experts holds a TP-partial sum, which
            # vLLM's runner must still all-reduce.
            return self.dispatcher.world_size > 1

        def check_expert_map(self, expert_map: torch.Tensor | None, num_experts: int) -> None:
            """vLLM's map must be this rank's map of the dispatcher's placement (host reads:
            at kernel construction, and in eager mode for a map not seen before)."""
            if expert_map is None or id(expert_map) in self._checked_maps:
                return
            disp = self.dispatcher
            given = expert_map_from_vllm(expert_map, disp.rank, num_experts).map_E
            if not torch.equal(given.cpu(), disp.expert_map.map_E):
                raise _refuse("expert_map", given.tolist()[:16],
                              f"must be rank {disp.rank}'s map of the dispatcher's placement",
                              "build the dispatcher with vllm_placement(E, ep_size, the "
                              "strategy vLLM resolved)")
            self._checked_maps[id(expert_map)] = expert_map  # kept alive: the id stays its own

        def prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map,
                    apply_router_weight_on_input, quant_config, defer_input_quant):
            disp = self.dispatcher
            capturing = _capturing()
            try:
                _check_unquantized(quant_config)
                if num_experts != disp.placement.num_experts:
                    raise _refuse("num_experts", num_experts,
                                  f"must equal the dispatcher's E={disp.placement.num_experts}",
                                  "build the dispatcher from the layer's global_num_experts")
                if expert_map is not None and id(expert_map) not in self._checked_maps:
                    if capturing:
                        raise _refuse("expert_map", "a tensor not seen before",
                                      "cannot be checked inside a CUDA graph (host read)",
                                      "run one eager forward first, or keep the layer's map")
                    self.check_expert_map(expert_map, num_experts)
                if apply_router_weight_on_input:
                    if topk_ids.shape[1] != 1:
                        raise _refuse("apply_router_weight_on_input", True,
                                      f"needs top_k == 1 (got {topk_ids.shape[1]}): with K > 1 "
                                      "one input cannot carry K weights exactly once",
                                      "route with top_k=1 or apply the weights on the output")
                    # The weight moves onto the token as vLLM's own prepare moves it
                    # (no_dp_ep.py: a1 * w.to(a1.dtype)); the experts then weigh it by 1.
                    a1 = a1 * topk_weights.to(a1.dtype)
                    topk_weights = torch.ones_like(topk_weights, dtype=torch.float32)
            except (ValueError, TypeError):
                disp.share_refusal()
                raise
            topk_weights = topk_weights.float()
            with _comm_region(capturing):
                _dbo_record_stream(a1, topk_weights, topk_ids)  # read on the comm stream
                d = disp.dispatch(a1, topk_weights, topk_ids, validate=not capturing)
            x, ids, w = d.x, d.topk_ids, d.topk_weights
            _dbo_record_stream(x, ids, w, d.num_valid)  # read on the compute stream
            if d.num_valid is not None and not capturing:
                n = int(d.num_valid.reshape(-1)[0])  # eager: run the rows that arrived only
                x, ids, w = x[:n], ids[:n], w[:n]
            ids = ids.view(ids.shape)  # a fresh tensor object to carry this batch's handle
            setattr(ids, _HANDLE_ATTR, d.handle)
            if d.num_valid is not None and capturing:  # all R rows go on: bound them
                setattr(ids, _ROWS_ATTR, d.row_bound(a1.shape[0], disp.world_size))
            return x, None, None, ids, w

        def finalize(self, output, fused_expert_output, topk_weights, topk_ids,
                     apply_router_weight_on_input, weight_and_reduce_impl) -> None:
            handle = getattr(topk_ids, _HANDLE_ATTR, None)
            if not isinstance(handle, CombineHandle):
                raise _refuse("topk_ids", type(topk_ids).__name__, "finalize must be given "
                              "the dispatched ids its own prepare returned (vllm#52639)",
                              "pass prepare's ids through unchanged")
            if isinstance(weight_and_reduce_impl, TopKWeightAndReduceNoOP):
                weighted = True
            elif isinstance(weight_and_reduce_impl, TopKWeightAndReduceDelegate
                            | TopKWeightAndReduceContiguous):
                weighted = False  # raw [R, K, H]: rocm_moe's combine weights it once
            else:
                raise _refuse("weight_and_reduce_impl", type(weight_and_reduce_impl).__name__,
                              "must be NoOP (experts weighted) or Delegate / Contiguous (raw "
                              "[R, K, H] rows)", "use RocmMoEExperts")
            R, K = handle.recv_topk_ids.shape
            H = output.shape[-1]
            y = fused_expert_output
            if y.shape[0] == 0:  # vLLM skips the experts and hands back an empty [0, H]
                y = y.new_zeros((0, H) if weighted else (0, K, H))
            elif not weighted:
                y = y.reshape(-1, K, H)
            if y.shape[0] < R:  # eager capacity-sized batch: the rows past num_valid are empty
                y = torch.cat([y, y.new_zeros((R - y.shape[0], *y.shape[1:]))])
            with _comm_region(_capturing()):
                _dbo_record_stream(y)  # the experts' output, read on the comm stream
                out = self.dispatcher.combine(ExpertsOutput(out=y, weights_applied=weighted),
                                              handle)
            _dbo_record_stream(out)  # read on the compute stream
            output.copy_(out)

    class RocmMoEExperts(mk.FusedMoEExpertsModular):
        """vLLM's experts step over any rocm_moe ``Experts`` on the dispatched rows.

        weight_mode "experts": the backend weights its local slots ([R, H]) and the finalize
        step is told so (``TopKWeightAndReduceNoOP``); "combine": raw [R, K, H] rows with
        ``TopKWeightAndReduceDelegate``, weighted once by rocm_moe's combine.

        The layer's expert variant (``expert_variant``: activation, clamp, biases) is read from
        vLLM's configs once; the biases are vLLM's own ``w13_bias`` / ``w2_bias`` Parameters
        that its quant config holds (``quant_config.w1_bias`` / ``w2_bias``), read at every
        call. A SWIGLUOAI layer's w13 must have been de-interleaved (``uninterleave_gate_up``,
        which ``RocmMoEFusedMoEMethod.process_weights_after_loading`` runs)."""

        def __init__(self, moe_config, quant_config, *, experts: Experts | None = None,
                     weight_mode: WeightMode = "experts"):
            super().__init__(moe_config, quant_config)
            _check_unquantized(quant_config)
            self.experts = experts or ReferenceExperts()
            if not isinstance(self.experts, Experts):
                raise TypeError(error_message("experts", type(self.experts).__name__,
                                              "must be a rocm_moe Experts",
                                              "use rocm_moe.backends.make_experts(name)"))
            self.weight_mode = resolve_weight_mode(weight_mode)
            self.variant = expert_variant(moe_config, quant_config)
            self.interleaved = interleaved_gate_up(moe_config)
            reason = variant_refusal(self.experts, self.variant, self.weight_mode)
            if reason is not None:
                raise _refuse(ENV_EXPERTS, self.experts.name, f"cannot run this layer's "
                              f"experts ({self.variant}): {reason}",
                              f"set {ENV_EXPERTS}=reference (or a backend that runs it)")
            self.rank = moe_config.moe_parallel_config.ep_rank
            # (vLLM's map tensor, device) -> ExpertMap there: built once (host reads), outside
            # any captured forward.
            self._maps: dict[tuple[int, torch.device], tuple[object, ExpertMap]] = {}

        @staticmethod
        def activation_format():
            return mk.FusedMoEActivationFormat.Standard

        @staticmethod
        def _supports_current_device() -> bool:
            return True

        @staticmethod
        def _supports_no_act_and_mul() -> bool:
            return False

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            return weight_key is None and activation_key is None

        @staticmethod
        def _supports_activation(activation) -> bool:
            return activation in (MoEActivation.SILU, MoEActivation.SWIGLUOAI,
                                  MoEActivation.SWIGLUOAI_UNINTERLEAVE)

        @staticmethod
        def _supports_parallel_config(moe_parallel_config) -> bool:
            return True

        def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts,
                             expert_tokens_meta, activation):
            out = (M, K) if self.weight_mode == "experts" else (M, topk, K)
            return (0,), (0,), out

        def finalize_weight_and_reduce_impl(self):
            return TopKWeightAndReduceNoOP() if self.weight_mode == "experts" \
                else TopKWeightAndReduceDelegate()

        def expert_map_on(self, expert_map, num_experts: int,
                          device: torch.device) -> ExpertMap:
            key = (id(expert_map), _device(device))
            if key not in self._maps:
                emap = expert_map_from_vllm(expert_map, self.rank, num_experts).to(key[1])
                emap.num_local  # noqa: B018 (computed now: a host read)
                self._maps[key] = (expert_map, emap)  # the map kept alive with its id
            return self._maps[key][1]

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                  global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
                  expert_tokens_meta, apply_router_weight_on_input):
            if activation != self.moe_config.activation:
                raise _refuse("activation", getattr(activation, "value", activation),
                              "must be the layer's own (the experts were built for "
                              f"{self.moe_config.activation.value})",
                              "pass layer.activation")
            if self.interleaved and not is_gate_up(w1):
                raise _refuse("w1", "vLLM's interleaved gate/up rows (SWIGLUOAI)",
                              "rocm_moe's experts read w13 as gate rows then up rows",
                              "load through RocmMoEFusedMoEMethod (its "
                              "process_weights_after_loading de-interleaves them) or call "
                              "uninterleave_gate_up(w13, w13_bias) once")
            capturing = _capturing()
            key = (id(expert_map), hidden_states.device)
            if capturing and key not in self._maps:
                raise _refuse("expert_map", "a tensor not seen before", "cannot be converted "
                              "inside a CUDA graph (host read)", "run one eager forward first")
            emap = self.expert_map_on(expert_map, global_num_experts, hidden_states.device)
            q = self.quant_config
            variant = variant_kwargs(self.variant, q.w1_bias, q.w2_bias)
            eo = self.experts(hidden_states, topk_ids.to(torch.int32), topk_weights.float(),
                              w1, w2, emap, weight_mode=self.weight_mode,
                              validate=not capturing, **getattr(topk_ids, _ROWS_ATTR, {}),
                              **variant)
            output.copy_(eo.out.reshape(output.shape))
            return None

    class RocmMoEFusedMoEMethod(UnquantizedFusedMoEMethod):
        """vLLM's unquantised MoE method with rocm_moe's kernel (what ``register()`` installs).

        The weights stay vLLM's ``w13_weight`` [e, 2I, H] (gate then up) and ``w2_weight``
        [e, H, I], as loaded: no size is rounded up, nothing is padded, shuffled or packed for
        another kernel (checked after loading). The dispatcher is the model's shared one (see
        the module docstring); the backends come from ``ROCM_MOE_VLLM_COMM``,
        ``ROCM_MOE_VLLM_EXPERTS`` (default: the fastest that runs here) and
        ``ROCM_MOE_VLLM_WEIGHT_MODE`` (default "experts"). vLLM's kernel oracle is not
        consulted (on a CPU-only machine its CPU backend does not even import with vllm
        0.33.0's CUDA wheel): the backend is "OOT". ``apply`` runs a batch larger than the
        dispatcher's capacity in chunks."""

        def __init__(self, moe):
            check_layer_config(moe)
            FusedMoEMethodBase.__init__(self, moe)  # CustomOp's set-up, no backend selection
            self.unquantized_backend = UnquantizedMoeBackend.OOT
            self.experts_cls = RocmMoEExperts
            self.supports_pre_processed_weights = True
            self.eplb: EplbLink | None = None  # set after loading when EPLB is on
            self.micro_batches = micro_batches()  # read while vLLM's config is current

        @property
        def supports_eplb(self) -> bool:
            return True  # physical ids over the contiguous placement of P (module docstring)

        def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype,
                                moe_parallel_config):
            return hidden_size, intermediate_size_per_partition  # rocm_moe pads nothing

        def create_weights(self, layer, num_experts, hidden_size,
                           intermediate_size_per_partition, params_dtype, **extra):
            check_layer_config(self.moe)
            manager = getattr(layer, "expert_map_manager", None)
            shared = getattr(manager, "num_fused_shared_experts", 0) or \
                getattr(layer, "num_fused_shared_experts", 0)
            if shared:
                raise _refuse("num_fused_shared_experts", shared,
                              "fused shared experts are AITER's extra slots, not rocm_moe "
                              "experts", "run the shared experts as a separate MLP "
                              "(VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=0)")
            super().create_weights(layer, num_experts, hidden_size,
                                   intermediate_size_per_partition, params_dtype, **extra)

        def process_weights_after_loading(self, layer) -> None:
            """Every call follows a load of checkpoint-layout weights (vLLM's contract, its
            own kernels re-shuffle on each): a SWIGLUOAI layer's w13 / w13_bias are
            de-interleaved in place, unless vLLM loaded already processed weights."""
            from vllm.model_executor.utils import is_weights_pre_processed

            check_loaded_weights(self.moe, layer)
            if interleaved_gate_up(self.moe):
                uninterleave_gate_up(layer.w13_weight, getattr(layer, "w13_bias", None),
                                     permute=not is_weights_pre_processed())
            self._init_moe_kernel(layer)
            if self.moe.moe_parallel_config.enable_eplb:
                self.eplb = EplbLink.for_layer(self.moe, layer)

        def _init_moe_kernel(self, layer) -> None:
            self.moe_quant_config = self.get_fused_moe_quant_config(layer)
            manager = getattr(layer, "expert_map_manager", None)
            strategy = getattr(manager, "placement_strategy", None) or "linear"
            self.moe_kernel = build_kernel(
                self.moe, dispatcher=make_vllm_dispatcher(
                    self.moe, strategy=strategy, micro_batches=self.micro_batches),
                quant_config=self.moe_quant_config, **backends_from_env(self.moe.device))
            ready_kernel(self.moe_kernel, getattr(layer, "expert_map", None),
                         self.moe.num_experts, self.moe.device)

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts,
                  shared_experts_input):
            return self._forward_chunked(layer, x, topk_weights, topk_ids, shared_experts,
                                         shared_experts_input)

        def forward_native(self, layer, x, topk_weights, topk_ids, shared_experts,
                           shared_experts_input):
            return self._forward_chunked(layer, x, topk_weights, topk_ids, shared_experts,
                                         shared_experts_input)

        forward_cuda = forward_native

        def _forward_chunked(self, layer, x, topk_weights, topk_ids, shared_experts,
                             shared_experts_input):
            """vLLM's kernel on chunks of at most the dispatcher's capacity (one chunk, the
            whole batch, in the common case); every rank runs the same number of chunks, a
            rank past its tokens with empty ones."""
            kernel = self.moe_kernel
            assert kernel is not None, "process_weights_after_loading builds the kernel"

            def run(lo: int, hi: int):
                return kernel.apply(
                    hidden_states=x[lo:hi], w1=layer.w13_weight, w2=layer.w2_weight,
                    topk_weights=topk_weights[lo:hi], topk_ids=topk_ids[lo:hi],
                    activation=layer.activation,
                    apply_router_weight_on_input=layer.apply_router_weight_on_input,
                    global_num_experts=layer.global_num_experts, expert_map=layer.expert_map,
                    shared_experts=shared_experts, shared_experts_input=shared_experts_input)

            disp = kernel.prepare_finalize.dispatcher
            T = x.shape[0]
            n = chunk_count(disp, T, self.moe.max_num_tokens)
            if n == 1:
                return run(0, T)
            cap = disp.max_tokens_per_rank
            out = None
            for c in range(n):
                lo, hi = min(c * cap, T), min((c + 1) * cap, T)
                y = run(lo, hi)
                if out is None:
                    out = y.new_empty((T, *y.shape[1:]))
                out[lo:hi] = y
            return out

    return SimpleNamespace(RocmMoEPrepareAndFinalize=RocmMoEPrepareAndFinalize,
                           RocmMoEExperts=RocmMoEExperts,
                           RocmMoEFusedMoEMethod=RocmMoEFusedMoEMethod,
                           UnquantizedFusedMoEMethod=UnquantizedFusedMoEMethod)


def __getattr__(name: str):
    if name in _EXPORTED:
        return getattr(_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _device(device) -> torch.device:
    """``device`` with its index (vLLM's config says "cuda"; tensors live on "cuda:0")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def ready_kernel(kernel, expert_map: torch.Tensor | None, num_experts: int, device) -> None:
    """Everything the kernel derives from the layer's ``expert_map`` with host reads, done
    once at construction: the map checked against the dispatcher's placement, and the
    ExpertMaps of the experts step and of the dispatcher's combine built on ``device``. A
    forward captured in a CUDA graph (even the first) then reads nothing on the host."""
    device = _device(device)
    kernel.prepare_finalize.check_expert_map(expert_map, num_experts)
    kernel.fused_experts.expert_map_on(expert_map, num_experts, device)
    kernel.prepare_finalize.dispatcher.expert_map_on(device).num_local  # noqa: B018


def check_loaded_weights(moe_config, layer) -> None:
    """The weights rocm_moe's experts will read are vLLM's as loaded: w13 [e, 2I, H] (gate then
    up), w2 [e, H, I] at the checkpoint's sizes (nothing rounded up or padded), row-major
    (nothing transposed or packed). Refused otherwise, at load time."""
    e = moe_config.num_local_experts
    H, I = moe_config.hidden_dim_unpadded, moe_config.intermediate_size_per_partition_unpadded
    wants = [("w13_weight", (e, 2 * I, H)), ("w2_weight", (e, H, I))]
    if moe_config.has_bias:
        wants += [("w13_bias", (e, 2 * I)), ("w2_bias", (e, H))]
    for name, want in wants:
        w = getattr(layer, name)
        if tuple(w.shape) != want or not w.is_contiguous():
            raise _refuse(f"layer.{name}", f"shape {list(w.shape)}, strides {list(w.stride())}",
                          f"rocm_moe reads vLLM's weights as loaded: a contiguous {list(want)} "
                          "(something padded, transposed or packed them for another kernel)",
                          f"unset {SWITCH}, or load without that backend's weight processing")


# ---- building and registering -------------------------------------------------------------------
def _explicit(env: str, kind: str) -> str | None:
    """The backend named in ``env`` (None if unset), refused with the variable's name when
    unknown or unable to run here."""
    from rocm_moe import backends

    name = os.environ.get(env) or None
    if name is None:
        return None
    if name not in backends.names(kind):
        raise _refuse(env, repr(name), f"known {kind} backends are {backends.names(kind)}",
                      f"set {env} to one of them, or unset it for the fastest that runs here")
    reason = backends.BACKENDS[f"{kind}:{name}"].availability()
    if reason is not None:
        raise _refuse(env, repr(name), f"unavailable here: {reason}",
                      f"unset {env} (the fastest backend that runs here) or pick another")
    return name


def experts_name(device) -> str:
    """``ROCM_MOE_VLLM_EXPERTS`` if set, else the fastest experts backend on ``device``."""
    from rocm_moe.comm import pool

    return _explicit(ENV_EXPERTS, "experts") or \
        pool.fastest_experts(torch.device(device), engine="vllm")[0]


_COMM_DEFAULT: dict[tuple, str] = {}


def comm_name(world_size: int, device, group=None, *, mori_refusal: str | None = None) -> str:
    """``ROCM_MOE_VLLM_COMM`` if set, else the fastest comm backend for ``world_size`` ranks on
    ``device`` (collective on ``group`` the first time on GPUs: the one-host check);
    ``mori_refusal``: why MORI cannot take this layer (then never the default)."""
    from rocm_moe.comm import pool

    name = _explicit(ENV_COMM, "comm")
    if world_size == 1:
        if name not in (None, "local"):  # (said, not silently replaced)
            pool._log_once("vllm-comm-w1", f"{ENV_COMM}={name}: one EP rank moves nothing, so "
                           "the local backend runs")
        return "local"
    if name is None:
        key = (world_size, torch.device(device).type, id(group), mori_refusal)
        if key not in _COMM_DEFAULT:
            _COMM_DEFAULT[key] = pool.fastest_comm(world_size, torch.device(device), group,
                                                   engine="vllm", mori_refusal=mori_refusal)[0]
        name = _COMM_DEFAULT[key]
    return name


def _mori_refusal(num_experts: int, ep_size: int, strategy: str) -> str | None:
    """Why MORI cannot serve a layer of ``num_experts`` over ``ep_size`` ranks placed by
    ``strategy``, or None: MORI owns expert e on rank e // (E / W)."""
    if strategy != "linear":
        return (f"MORI places expert e on rank e // (E / W); vLLM's placement is {strategy!r}, "
                "not contiguous ranges")
    if num_experts % ep_size:
        return (f"MORI places expert e on rank e // (E / W): num_experts={num_experts} does "
                f"not split into {ep_size} equal ranges")
    return None


def backends_from_env(device="cpu") -> dict:
    """The experts backend and weight mode the environment asks for (experts unset: the fastest
    on ``device``)."""
    from rocm_moe import backends

    return dict(experts=backends.make_experts(experts_name(device)),
                weight_mode=resolve_weight_mode(os.environ.get(ENV_WEIGHT_MODE) or "experts",
                                                field=ENV_WEIGHT_MODE))


def max_tokens_per_rank(moe_config) -> int:
    """The dispatcher's capacity: vLLM's token budget (``moe_config.max_num_tokens``, its
    ``max_num_batched_tokens``), or ``ROCM_MOE_VLLM_MAX_TOKENS`` if set (larger batches then
    run in chunks); never below vLLM's largest CUDA-graph size (a captured batch is one
    chunk)."""
    budget = moe_config.max_num_tokens
    cap = env_tokens(ENV_MAX_TOKENS, f"unset it (capacity = vLLM's budget, {budget} tokens) "
                     "or set e.g. 4096")
    if cap is None:
        return budget
    graphs = moe_config.max_capture_size or 0
    if cap < graphs:
        raise _refuse(ENV_MAX_TOKENS, cap, f"must be >= vLLM's largest CUDA-graph "
                      f"size {graphs} (a captured batch runs as one chunk)",
                      f"unset it (capacity = vLLM's budget, {budget} tokens) or raise it")
    return cap


def make_vllm_dispatcher(moe_config, *, strategy: str = "linear",
                         micro_batches: int = 1) -> Dispatcher:
    """The model's shared rocm_moe dispatcher over vLLM's EP group for a layer's
    ``FusedMoEConfig`` (every layer of one shape gets the same object, ``comm.pool``);
    ``strategy``: the placement vLLM resolved for the layer; ``micro_batches``: vLLM's
    micro-batches in flight at once (2 under ``--enable-dbo``: a backend that holds its batch
    in buffers, symm or MORI, is built with ``batches_in_flight=2``, one lane per
    micro-batch)."""
    _require_vllm()  # the package's ImportError, not a bare ModuleNotFoundError further down
    from rocm_moe.comm import pool

    par = moe_config.moe_parallel_config
    device = torch.device(moe_config.device)
    cap = max_tokens_per_rank(moe_config)
    shape = dict(hidden_size=moe_config.hidden_dim, top_k=moe_config.experts_per_token,
                 dtype=moe_config.in_dtype, max_tokens_per_rank=cap)
    if not par.use_ep or par.ep_size == 1:
        comm_name(1, device)  # an explicit ROCM_MOE_VLLM_COMM is still checked
        return pool.shared_dispatcher("local", Placement.contiguous(moe_config.num_experts, 1),
                                      **shape)
    from vllm.distributed.parallel_state import get_ep_group

    group = get_ep_group()  # gloo's CPU group beside the device group on a CPU run
    pg = group.cpu_group if device.type == "cpu" else group.device_group
    refusal = _mori_refusal(moe_config.num_experts, par.ep_size, strategy)
    name = comm_name(par.ep_size, device, group.cpu_group, mori_refusal=refusal)
    placement = vllm_placement(moe_config.num_experts, par.ep_size, strategy)
    kw = _lanes(name, micro_batches)
    if name == "mori":  # (named by ROCM_MOE_VLLM_COMM: the default skips MORI then)
        if refusal is not None:
            raise _refuse(ENV_COMM, "mori", refusal, "serve with --expert-placement-strategy "
                          f"linear and E a multiple of the EP size, or {ENV_COMM}=symm "
                          "(one host) or torch")
        kw["capacity_sized"] = True  # no host read in a captured dispatch
    return pool.shared_dispatcher(name, placement, group=pg, rank=par.ep_rank, **shape, **kw)


def _lanes(name: str, micro_batches: int) -> dict:
    """``batches_in_flight`` for a backend that holds its batch in buffers, where micro-batches
    overlap (the others hold nothing between dispatch and combine)."""
    from rocm_moe import backends

    entry = backends.BACKENDS.get(f"comm:{name}")
    if micro_batches > 1 and entry is not None and entry.load().holds_batch:
        return dict(batches_in_flight=micro_batches)
    return {}


def build_kernel(moe_config, *, dispatcher: Dispatcher, experts: Experts | None = None,
                 weight_mode: WeightMode = "experts", quant_config=None):
    """vLLM's ``FusedMoEKernel`` over rocm_moe's dispatcher and experts."""
    c = _classes()
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG

    quant_config = quant_config or FUSED_MOE_UNQUANTIZED_CONFIG
    return mk.FusedMoEKernel(c.RocmMoEPrepareAndFinalize(dispatcher),
                             c.RocmMoEExperts(moe_config, quant_config, experts=experts,
                                              weight_mode=weight_mode))


def register() -> bool:
    """The ``vllm.general_plugins`` entry point: with ``ROCM_MOE_VLLM=1``, vLLM's unquantised MoE
    method becomes ``RocmMoEFusedMoEMethod`` in every process that loads plugins (idempotent).
    Returns whether the plug-in is active."""
    if not env_switch(SWITCH):
        return False
    _require_vllm()  # the package's ImportError, not a bare ModuleNotFoundError
    from vllm.model_executor.custom_op import op_registry_oot

    c = _classes()
    if op_registry_oot.get("UnquantizedFusedMoEMethod") is not c.RocmMoEFusedMoEMethod:
        op_registry_oot.pop("UnquantizedFusedMoEMethod", None)
        c.UnquantizedFusedMoEMethod.register_oot(c.RocmMoEFusedMoEMethod)
    install_eplb_policy()
    return True


def rocm_layer(vllm_layer, *, router, gate_weight: torch.Tensor | None = None,
               dispatcher: Dispatcher | None = None):
    """An ``EPMoE`` that shares a vLLM MoE layer's expert weights (``w13_weight``, ``w2_weight``,
    no copy) and its kernel's dispatcher and experts, so ``rocm_moe.diagnose`` and
    ``rocm_moe.sanity`` run on what vLLM runs. ``router``: the model's RouterConfig (vLLM keeps
    the gate outside the layer: pass its ``gate_weight`` [E, H]). Under EPLB the EPMoE holds
    vLLM's current replica placement (``EplbLink.placement``: a later rearrangement by vLLM is
    not seen by it; build it again)."""
    from rocm_moe.layer import EPMoE

    kernel = getattr(getattr(vllm_layer, "quant_method", None), "moe_kernel", None)
    pf = getattr(kernel, "prepare_finalize", None)
    dispatcher = dispatcher or getattr(pf, "dispatcher", None)
    if dispatcher is None:
        raise ValueError(error_message(
            "vllm_layer", type(vllm_layer).__name__, "does not run rocm_moe's kernel",
            f"set {SWITCH}=1 before vLLM builds the model, or pass dispatcher="))
    fx = kernel.fused_experts
    w13, w2 = vllm_layer.w13_weight, vllm_layer.w2_weight
    link = getattr(vllm_layer.quant_method, "eplb", None)  # EPLB: vLLM's current placement
    layer = EPMoE(hidden_size=w13.shape[2], intermediate_size=w2.shape[2], router=router,
                  dispatcher=dispatcher, experts=fx.experts, weight_mode=fx.weight_mode,
                  dtype=w13.dtype, device=w13.device, expert_variant=fx.variant,
                  replica_placement=link.placement() if link is not None and link.ready
                  else None)
    layer.w13, layer.w2 = w13, w2  # the same Parameters: no copy
    if fx.variant.bias:
        layer.w13_bias, layer.w2_bias = vllm_layer.w13_bias, vllm_layer.w2_bias
    if gate_weight is not None:
        with torch.no_grad():
            layer.gate.weight.copy_(gate_weight)
    return layer
