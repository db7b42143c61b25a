"""rocm_moe as vLLM's MoE backend (checked against vllm==0.33.0; ``pip install 'rocm_moe[vllm]'``).

vLLM has no registry for an outside all-to-all or experts backend (vllm#50556, #53897), so this
adapter uses the extension points that exist:

    FusedMoEKernel(RocmMoEPrepareAndFinalize(dispatcher), RocmMoEExperts(experts, weight_mode))
        prepare  = rocm_moe dispatch   (the frozen handle rides on the dispatched ids tensor)
        apply    = rocm_moe experts    (weight_mode "experts": NoOP reduce; "combine": Delegate)
        finalize = rocm_moe combine    (the handle's own ids, never the ids vLLM hands back)

and ``RocmMoEFusedMoEMethod``, an ``UnquantizedFusedMoEMethod`` whose kernel is the one above,
put in place of vLLM's by ``register()`` (the ``vllm.general_plugins`` entry point of this
package) when ``ROCM_MOE_VLLM=1`` is set. Exactly-once weighting stays rocm_moe's
(``rocm_moe.weighting``): the experts either weight (and say so through vLLM's
``TopKWeightAndReduceNoOP``) or return raw [R, K, H] rows that rocm_moe's combine weights
(``TopKWeightAndReduceDelegate``); vLLM's own reduce never runs. ``routed_scaling_factor`` is
vLLM's: its router or runner applies it, so nothing here does.

Placement: vLLM's ``expert_map`` ([E] int32, local id or -1) is rocm_moe's ``ExpertMap``;
``vllm_placement`` rebuilds every rank's ownership the way vLLM's ``determine_expert_map`` does
("linear", with the remainder on the first ranks, or "round_robin"), and the prepare step checks
that the map vLLM passes is this rank's (an AITER 0/1 mask taken for the map, vllm#49758, is
refused).

Refused with a ValueError before any collective: quantised layers (the experts take unquantised
bf16/fp16/fp32 weights), ``apply_router_weight_on_input`` with K > 1 (the weights would reach the
output twice or through the activation), activations other than SiLU, biased experts, and fused
shared experts (AITER's extra expert slots are not rocm_moe experts).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

from rocm_moe._checks import error_message
from rocm_moe._libs import import_engine
from rocm_moe.comm.base import CombineHandle, Dispatcher
from rocm_moe.experts.base import Experts
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.placement import ExpertMap, Placement
from rocm_moe.weighting import ExpertsOutput, WeightMode, resolve_weight_mode

VLLM_VERSION = "0.33.0"  # the release the adapter and its signature tests are checked against
SWITCH = "ROCM_MOE_VLLM"  # "1": the plug-in replaces vLLM's unquantised MoE method
ENV_COMM, ENV_EXPERTS, ENV_WEIGHT_MODE = ("ROCM_MOE_VLLM_COMM", "ROCM_MOE_VLLM_EXPERTS",
                                          "ROCM_MOE_VLLM_WEIGHT_MODE")
_HANDLE_ATTR = "_rocm_moe_handle"  # set on the dispatched ids tensor prepare returns
_EXPORTED = ("RocmMoEPrepareAndFinalize", "RocmMoEExperts", "RocmMoEFusedMoEMethod")


def _require_vllm():
    return import_engine("vllm", "vLLM", VLLM_VERSION)


# ---- placement ----------------------------------------------------------------------------------
def vllm_placement(num_experts: int, ep_size: int, strategy: str = "linear") -> Placement:
    """Every rank's experts as vLLM's ``determine_expert_map`` assigns them: ``E // W`` each and
    the remainder one by one to the first ranks; "linear" gives rank d a contiguous range,
    "round_robin" the experts d, d + W, d + 2W, ... (a test compares it with vLLM's own)."""
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
                                       "pass parallel_config.expert_placement_strategy"))
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


# ---- the pieces vLLM calls ---------------------------------------------------------------------
def _refuse(field: str, value: object, rule: str, fix: str) -> ValueError:
    return ValueError(error_message(field, value, rule, fix))


def _check_unquantized(quant_config) -> None:
    if quant_config is not None and getattr(quant_config, "quant_dtype", None) is not None:
        raise _refuse("quant_config.quant_dtype", quant_config.quant_dtype,
                      "rocm_moe's vLLM backend runs unquantised experts only",
                      f"serve the unquantised model or unset {SWITCH}")


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
        micro-batches may interleave."""

        def __init__(self, dispatcher: Dispatcher):
            super().__init__()
            if not isinstance(dispatcher, Dispatcher):
                raise TypeError(error_message("dispatcher", type(dispatcher).__name__,
                                              "must be a rocm_moe Dispatcher",
                                              "build one with rocm_moe.backends.make_dispatcher"))
            self.dispatcher = dispatcher

        @property
        def activation_format(self):
            return mk.FusedMoEActivationFormat.Standard

        def topk_indices_dtype(self):
            return torch.int32

        def max_num_tokens_per_rank(self):
            return self.dispatcher.max_tokens_per_rank

        def num_dispatchers(self) -> int:
            return self.dispatcher.world_size

        def output_is_reduced(self) -> bool:
            # Over an EP group combine returns each token's complete output on its own rank.
            # One rank (no EP) with tensor-parallel experts holds a TP-partial sum, which
            # vLLM's runner must still all-reduce.
            return self.dispatcher.world_size > 1

        def prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map,
                    apply_router_weight_on_input, quant_config, defer_input_quant):
            disp = self.dispatcher
            try:
                _check_unquantized(quant_config)
                if num_experts != disp.placement.num_experts:
                    raise _refuse("num_experts", num_experts,
                                  f"must equal the dispatcher's E={disp.placement.num_experts}",
                                  "build the dispatcher from the layer's global_num_experts")
                if expert_map is not None:
                    mine = disp.expert_map.map_E
                    given = expert_map_from_vllm(expert_map, disp.rank, num_experts).map_E
                    if not torch.equal(given.cpu(), mine):
                        raise _refuse("expert_map", given.tolist()[:16],
                                      f"must be rank {disp.rank}'s map of the dispatcher's "
                                      "placement", "build the dispatcher with "
                                      "vllm_placement(E, ep_size, strategy)")
                if apply_router_weight_on_input:
                    if topk_ids.shape[1] != 1:
                        raise _refuse("apply_router_weight_on_input", True,
                                      f"needs top_k == 1 (got {topk_ids.shape[1]}): with K > 1 "
                                      "one input cannot carry K weights exactly once",
                                      "route with top_k=1 or apply the weights on the output")
                    # The weight moves onto the token; the experts then weigh it by 1.
                    a1 = (a1.float() * topk_weights.float()).to(a1.dtype)
                    topk_weights = torch.ones_like(topk_weights, dtype=torch.float32)
            except (ValueError, TypeError):
                disp.share_refusal()
                raise
            d = disp.dispatch(a1, topk_weights.float(), topk_ids)
            ids = d.topk_ids
            setattr(ids, _HANDLE_ATTR, d.handle)
            return d.x, None, None, ids, d.topk_weights

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
            if R == 0:  # vLLM skips the experts and hands back an empty [0, H]
                y = y.new_zeros((0, H) if weighted else (0, K, H))
            elif not weighted:
                y = y.reshape(R, K, H)
            out = self.dispatcher.combine(ExpertsOutput(out=y, weights_applied=weighted),
                                          handle)
            output.copy_(out)

    class RocmMoEExperts(mk.FusedMoEExpertsModular):
        """vLLM's experts step over any rocm_moe ``Experts`` on the dispatched rows.

        weight_mode "experts": the backend weights its local slots ([R, H]) and the finalize
        step is told so (``TopKWeightAndReduceNoOP``); "combine": raw [R, K, H] rows with
        ``TopKWeightAndReduceDelegate``, weighted once by rocm_moe's combine."""

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
            self.rank = moe_config.moe_parallel_config.ep_rank
            self._map: tuple[torch.Tensor | None, ExpertMap] | None = None

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
            return activation == MoEActivation.SILU

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

        def _expert_map(self, expert_map, num_experts: int) -> ExpertMap:
            if self._map is None or self._map[0] is not expert_map:
                self._map = (expert_map, expert_map_from_vllm(expert_map, self.rank,
                                                               num_experts))
            return self._map[1]

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                  global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
                  expert_tokens_meta, apply_router_weight_on_input):
            if activation != MoEActivation.SILU:
                raise _refuse("activation", activation, "rocm_moe experts are SwiGLU (SiLU "
                              "gate times up)", f"unset {SWITCH} for this model")
            emap = self._expert_map(expert_map, global_num_experts)
            eo = self.experts(hidden_states, topk_ids.to(torch.int32), topk_weights.float(),
                              w1, w2, emap.to(hidden_states.device),
                              weight_mode=self.weight_mode)
            output.copy_(eo.out.reshape(output.shape))
            return None

    class RocmMoEFusedMoEMethod(UnquantizedFusedMoEMethod):
        """vLLM's unquantised MoE method with rocm_moe's kernel (what ``register()`` installs).

        The weights stay vLLM's ``w13_weight`` [e, 2I, H] (gate then up) and ``w2_weight``
        [e, H, I], untouched (no backend shuffle). The dispatcher joins vLLM's EP group; the
        backends come from ``ROCM_MOE_VLLM_COMM`` (default "torch"), ``ROCM_MOE_VLLM_EXPERTS``
        (default "reference") and ``ROCM_MOE_VLLM_WEIGHT_MODE`` (default "experts"). vLLM's
        kernel oracle is not consulted (on a CPU-only machine its CPU backend does not even
        import with vllm 0.33.0's CUDA wheel): the backend is "OOT", so no weight is padded or
        shuffled for another kernel."""

        def __init__(self, moe):
            FusedMoEMethodBase.__init__(self, moe)  # CustomOp's set-up, no backend selection
            self.unquantized_backend = UnquantizedMoeBackend.OOT
            self.experts_cls = RocmMoEExperts
            self.supports_pre_processed_weights = True

        def create_weights(self, layer, num_experts, hidden_size,
                           intermediate_size_per_partition, params_dtype, **extra):
            if self.moe.has_bias:
                raise _refuse("has_bias", True, "rocm_moe experts have no biases",
                              f"unset {SWITCH} for this model")
            if getattr(layer, "num_fused_shared_experts", 0):
                raise _refuse("num_fused_shared_experts", layer.num_fused_shared_experts,
                              "fused shared experts are AITER's extra slots, not rocm_moe "
                              "experts", "run the shared experts as a separate MLP")
            super().create_weights(layer, num_experts, hidden_size,
                                   intermediate_size_per_partition, params_dtype, **extra)

        def process_weights_after_loading(self, layer) -> None:
            self._init_moe_kernel(layer)

        def _init_moe_kernel(self, layer) -> None:
            self.moe_quant_config = self.get_fused_moe_quant_config(layer)
            self.moe_kernel = build_kernel(self.moe, dispatcher=make_vllm_dispatcher(self.moe),
                                           quant_config=self.moe_quant_config,
                                           **backends_from_env())

    return SimpleNamespace(RocmMoEPrepareAndFinalize=RocmMoEPrepareAndFinalize,
                           RocmMoEExperts=RocmMoEExperts,
                           RocmMoEFusedMoEMethod=RocmMoEFusedMoEMethod,
                           UnquantizedFusedMoEMethod=UnquantizedFusedMoEMethod)


def __getattr__(name: str):
    if name in _EXPORTED:
        return getattr(_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- building and registering -------------------------------------------------------------------
def backends_from_env() -> dict:
    """The experts backend and weight mode the environment asks for."""
    from rocm_moe import backends

    return dict(experts=backends.make_experts(os.environ.get(ENV_EXPERTS, "reference")),
                weight_mode=resolve_weight_mode(os.environ.get(ENV_WEIGHT_MODE, "experts"),
                                                field=ENV_WEIGHT_MODE))


def make_vllm_dispatcher(moe_config) -> Dispatcher:
    """A rocm_moe dispatcher over vLLM's EP group for a layer's ``FusedMoEConfig``."""
    from rocm_moe import backends

    par = moe_config.moe_parallel_config
    name = os.environ.get(ENV_COMM, "torch")
    if not par.use_ep or par.ep_size == 1:
        placement = Placement.contiguous(moe_config.num_experts, 1)
        return backends.make_dispatcher("local", placement, 0)
    from vllm.config import get_current_vllm_config
    from vllm.distributed.parallel_state import get_ep_group

    strategy = get_current_vllm_config().parallel_config.expert_placement_strategy
    placement = vllm_placement(moe_config.num_experts, par.ep_size, strategy)
    group = get_ep_group()  # gloo's CPU group beside the device group on a CPU run
    pg = group.cpu_group if str(moe_config.device) == "cpu" else group.device_group
    return backends.make_dispatcher(name, placement, par.ep_rank,
                                    hidden_size=moe_config.hidden_dim,
                                    top_k=moe_config.experts_per_token,
                                    dtype=moe_config.in_dtype, group=pg)


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
    if os.environ.get(SWITCH, "0") not in ("1", "true", "True"):
        return False
    from vllm.model_executor.custom_op import op_registry_oot

    c = _classes()
    if op_registry_oot.get("UnquantizedFusedMoEMethod") is not c.RocmMoEFusedMoEMethod:
        op_registry_oot.pop("UnquantizedFusedMoEMethod", None)
        c.UnquantizedFusedMoEMethod.register_oot(c.RocmMoEFusedMoEMethod)
    return True


def rocm_layer(vllm_layer, *, router, gate_weight: torch.Tensor | None = None,
               dispatcher: Dispatcher | None = None):
    """An ``EPMoE`` that shares a vLLM MoE layer's expert weights (``w13_weight``, ``w2_weight``,
    no copy) and its kernel's dispatcher and experts, so ``rocm_moe.diagnose`` and
    ``rocm_moe.sanity`` run on what vLLM runs. ``router``: the model's RouterConfig (vLLM keeps
    the gate outside the layer: pass its ``gate_weight`` [E, H])."""
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
    layer = EPMoE(hidden_size=w13.shape[2], intermediate_size=w2.shape[2], router=router,
                  dispatcher=dispatcher, experts=fx.experts, weight_mode=fx.weight_mode,
                  dtype=w13.dtype, device=w13.device)
    layer.w13, layer.w2 = w13, w2  # the same Parameters: no copy
    if gate_weight is not None:
        with torch.no_grad():
            layer.gate.weight.copy_(gate_weight)
    return layer
