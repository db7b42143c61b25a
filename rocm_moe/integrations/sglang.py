"""rocm_moe as SGLang's MoE dispatcher and experts step (checked against sglang==0.5.23;
``pip install 'rocm_moe[sglang]'``).

SGLang's ``--moe-a2a-backend`` is a closed list, so the adapter uses the ``sglang.srt.plugins``
entry point: with ``ROCM_MOE_SGLANG=1``, ``register()`` puts AROUND hooks (SGLang's
``HookRegistry``) on

    create_moe_dispatcher   -> RocmMoEDispatcher over a rocm_moe Dispatcher on SGLang's EP group
    FusedMoE.run_moe_core   -> rocm_moe experts on the dispatched rows (run_experts)
    FusedMoE.forward_impl   -> the layer's own all-reduce after combine is skipped

    dispatch(hidden_states, topk_output) -> RocmMoEDispatchOutput (Standard format: rows [R, H],
        StandardTopKOutput of their [R, K] float32 weights and int32 GLOBAL ids, and the frozen
        rocm_moe handle)
    run_experts(...) -> RocmMoECombineInput (the ExpertsOutput, which says whether it is weighted,
        and the same handle)
    combine(RocmMoECombineInput) -> [T, H], complete on the token's own rank

The handle travels inside the dispatch output and the combine input (nothing is kept on the
dispatcher), so combine cannot be given another batch's ids. Weighting is rocm_moe's
(``rocm_moe.weighting``): exactly once, by the experts (weight_mode "experts") or by combine
("combine"). SGLang's runner applies ``routed_scaling_factor`` itself unless the top-k step fused
it; the dispatcher does the same to the weights before they travel, so the experts' weighting
and combine's both see it (scaling only the experts' weights was lost in weight_mode "combine",
which weighs with the dispatched weights: a test caught it).

The reduction: rocm_moe's combine already sums every expert's contribution on the token's rank.
``FusedMoE.forward_impl`` would all-reduce again when ``reduce_results`` (sglang#34006 is this
bug under MORI); the forward_impl hook turns that off for layers that run a RocmMoEDispatcher.
Model files that all-reduce the MoE block's output themselves skip it only for the a2a backends
they know; with this plug-in run such models with ``--tp-size 1`` and data-parallel attention
(README).

Refused with a ValueError before any collective: quantised layers, fused shared experts,
activations other than SiLU, ``apply_router_weight_on_input`` with K > 1.
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
from rocm_moe.placement import Placement
from rocm_moe.weighting import ExpertsOutput, WeightMode, resolve_weight_mode

SGLANG_VERSION = "0.5.23"
SWITCH = "ROCM_MOE_SGLANG"
ENV_COMM, ENV_EXPERTS, ENV_WEIGHT_MODE = ("ROCM_MOE_SGLANG_COMM", "ROCM_MOE_SGLANG_EXPERTS",
                                          "ROCM_MOE_SGLANG_WEIGHT_MODE")
LAYER_MODULE = "sglang.srt.layers.moe.fused_moe_triton.layer"
_EXPORTED = ("RocmMoEDispatcher", "RocmMoEDispatchOutput", "RocmMoECombineInput")


def _require_sglang():
    return import_engine("sglang", "SGLang", SGLANG_VERSION)


def _refuse(field: str, value: object, rule: str, fix: str) -> ValueError:
    return ValueError(error_message(field, value, rule, fix))


@functools.cache
def _classes() -> SimpleNamespace:
    _require_sglang()
    from typing import NamedTuple

    from sglang.srt.layers.moe.token_dispatcher.base import (
        BaseDispatcher,
        CombineInputFormat,
        DispatchOutputFormat,
    )
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    class RocmMoEDispatchOutput(NamedTuple):
        """SGLang's Standard dispatch output plus rocm_moe's frozen handle."""

        hidden_states: torch.Tensor  # [R, H] rows this rank's experts run
        hidden_states_scale: torch.Tensor | None  # always None (unquantised)
        topk_output: StandardTopKOutput  # [R, K] float32 weights, int32 global ids
        handle: CombineHandle

        @property
        def format(self):
            return DispatchOutputFormat.STANDARD

    class RocmMoECombineInput(NamedTuple):
        """The experts' output (declaring whether it is weighted) and the dispatch's handle."""

        hidden_states: torch.Tensor  # [R, H] weighted or [R, K, H] raw
        weights_applied: bool
        handle: CombineHandle

        @property
        def format(self):
            return CombineInputFormat.STANDARD

    class RocmMoEDispatcher(BaseDispatcher):
        """SGLang's dispatcher over any rocm_moe ``Dispatcher``; ``experts`` and
        ``weight_mode`` are what ``run_experts`` runs on the dispatched rows."""

        def __init__(self, dispatcher: Dispatcher, *, experts: Experts | None = None,
                     weight_mode: WeightMode = "experts",
                     routed_scaling_factor: float | None = None,
                     apply_router_weight_on_input: bool = False):
            super().__init__()
            self.routed_scaling_factor = routed_scaling_factor
            self.apply_router_weight_on_input = apply_router_weight_on_input
            if not isinstance(dispatcher, Dispatcher):
                raise TypeError(error_message("dispatcher", type(dispatcher).__name__,
                                              "must be a rocm_moe Dispatcher",
                                              "build one with rocm_moe.backends.make_dispatcher"))
            self.dispatcher = dispatcher
            self.experts = experts or ReferenceExperts()
            self.weight_mode = resolve_weight_mode(weight_mode)

        def dispatch(self, hidden_states, topk_output):
            """Routing weights are final before they travel: scaled by
            ``routed_scaling_factor`` and, with ``apply_router_weight_on_input`` (K = 1), moved
            onto the token (the weights then read 1), so whichever stage weighs them, experts
            or combine, weighs them once."""
            x, w = hidden_states, topk_output.topk_weights.float()
            if self.apply_router_weight_on_input:
                if w.shape[1] != 1:
                    self.dispatcher.share_refusal()
                    raise _refuse("apply_router_weight_on_input", True,
                                  f"needs top_k == 1 (got {w.shape[1]}): one input cannot "
                                  "carry K weights exactly once",
                                  "route with top_k=1 or apply the weights on the output")
                x, w = (x.float() * w).to(x.dtype), torch.ones_like(w)
            if self.routed_scaling_factor not in (None, 1.0):
                w = w * float(self.routed_scaling_factor)
            d = self.dispatcher.dispatch(x, w, topk_output.topk_ids)
            router_logits = getattr(topk_output, "router_logits", None)
            topk = StandardTopKOutput(topk_weights=d.topk_weights, topk_ids=d.topk_ids,
                                      router_logits=router_logits)
            return RocmMoEDispatchOutput(hidden_states=d.x, hidden_states_scale=None,
                                         topk_output=topk, handle=d.handle)

        def combine(self, combine_input):
            if not isinstance(combine_input, RocmMoECombineInput):
                raise _refuse("combine_input", type(combine_input).__name__,
                              "must be run_experts' RocmMoECombineInput (it carries the "
                              "dispatch's handle; a runner's output has none)",
                              f"keep {SWITCH}=1's run_moe_core hook in place")
            eo = ExpertsOutput(out=combine_input.hidden_states,
                               weights_applied=combine_input.weights_applied)
            return self.dispatcher.combine(eo, combine_input.handle)

    return SimpleNamespace(RocmMoEDispatcher=RocmMoEDispatcher,
                           RocmMoEDispatchOutput=RocmMoEDispatchOutput,
                           RocmMoECombineInput=RocmMoECombineInput)


def __getattr__(name: str):
    if name in _EXPORTED:
        return getattr(_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_experts(dispatcher, dispatch_output, w13: torch.Tensor, w2: torch.Tensor):
    """The experts step: ``dispatcher.experts`` on the dispatched rows with this rank's
    ``w13`` [e, 2I, H] (gate then up) and ``w2`` [e, H, I] -> RocmMoECombineInput."""
    c = _classes()
    if not isinstance(dispatch_output, c.RocmMoEDispatchOutput):
        raise _refuse("dispatch_output", type(dispatch_output).__name__,
                      "must come from RocmMoEDispatcher.dispatch", "dispatch with it first")
    x = dispatch_output.hidden_states
    ids = dispatch_output.topk_output.topk_ids.to(torch.int32)
    w = dispatch_output.topk_output.topk_weights.float()
    eo = dispatcher.experts(x, ids, w, w13, w2, dispatcher.dispatcher.expert_map_on(x.device),
                            weight_mode=dispatcher.weight_mode)
    return c.RocmMoECombineInput(hidden_states=eo.out, weights_applied=eo.weights_applied,
                                 handle=dispatch_output.handle)


# ---- the plug-in --------------------------------------------------------------------------------
def make_sglang_dispatcher(moe_runner_config, *, routed_scaling_factor: float | None = None):
    """A RocmMoEDispatcher for a layer's ``MoeRunnerConfig`` on SGLang's MoE EP group
    (contiguous placement: SGLang gives rank d the experts [d * e, (d + 1) * e))."""
    from rocm_moe import backends

    cfg = moe_runner_config
    if cfg.num_fused_shared_experts:
        raise _refuse("num_fused_shared_experts", cfg.num_fused_shared_experts,
                      "fused shared experts are extra slots, not rocm_moe experts",
                      "disable shared-expert fusion (--disable-shared-experts-fusion)")
    if cfg.activation != "silu" or not cfg.is_gated:
        raise _refuse("activation", cfg.activation, "rocm_moe experts are SwiGLU",
                      f"unset {SWITCH} for this model")
    E, e = cfg.num_experts, cfg.num_local_experts
    if not e or E % e:
        raise _refuse("num_experts, num_local_experts", (E, e), "every EP rank must hold "
                      "E / W experts (redundant EPLB experts are not rocm_moe experts)",
                      "serve without --ep-num-redundant-experts")
    W = E // e
    experts = backends.make_experts(os.environ.get(ENV_EXPERTS, "reference"))
    mode = resolve_weight_mode(os.environ.get(ENV_WEIGHT_MODE, "experts"),
                               field=ENV_WEIGHT_MODE)
    placement = Placement.contiguous(E, W)
    if W == 1:
        disp = backends.make_dispatcher("local", placement, 0, hidden_size=cfg.hidden_size,
                                        top_k=cfg.top_k, dtype=cfg.params_dtype)
    else:
        from sglang.srt.distributed.parallel_state import get_moe_ep_group

        group = get_moe_ep_group()
        pg = group.cpu_group if cfg.params_dtype is not None and not torch.cuda.is_available() \
            else group.device_group
        disp = backends.make_dispatcher(os.environ.get(ENV_COMM, "torch"), placement,
                                        group.rank_in_group, hidden_size=cfg.hidden_size,
                                        top_k=cfg.top_k, dtype=cfg.params_dtype, group=pg)
    return _classes().RocmMoEDispatcher(
        disp, experts=experts, weight_mode=mode, routed_scaling_factor=routed_scaling_factor,
        apply_router_weight_on_input=cfg.apply_router_weight_on_input)


def _around_create_moe_dispatcher(original, moe_runner_config, quant_method, *a, **kw):
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    if not isinstance(quant_method, UnquantizedFusedMoEMethod):
        raise _refuse("quant_method", type(quant_method).__name__,
                      "rocm_moe's SGLang backend runs unquantised experts only",
                      f"serve the unquantised model or unset {SWITCH}")
    from sglang.srt.layers.moe.fused_moe_triton.layer import (
        _fuses_routed_scaling_factor_in_topk,
    )

    # SGLang's runner scales the output unless the top-k step already scaled the weights.
    fused = _fuses_routed_scaling_factor_in_topk(quant_method, moe_runner_config.runner_backend)
    return make_sglang_dispatcher(
        moe_runner_config,
        routed_scaling_factor=None if fused else moe_runner_config.routed_scaling_factor)


def _around_run_moe_core(original, layer, dispatch_output, *a, **kw):
    if not isinstance(getattr(layer, "dispatcher", None), _classes().RocmMoEDispatcher):
        return original(layer, dispatch_output, *a, **kw)
    return run_experts(layer.dispatcher, dispatch_output, layer.w13_weight, layer.w2_weight)


def _around_forward_impl(original, layer, *a, **kw):
    """rocm_moe's combine is the reduction: the layer's all-reduce after it would sum every
    rank's complete outputs again (sglang#34006), so it is off for the call."""
    if not isinstance(getattr(layer, "dispatcher", None), _classes().RocmMoEDispatcher):
        return original(layer, *a, **kw)
    saved = layer.reduce_results
    layer.reduce_results = False
    try:
        return original(layer, *a, **kw)
    finally:
        layer.reduce_results = saved


HOOKS = {
    f"{LAYER_MODULE}.create_moe_dispatcher": _around_create_moe_dispatcher,
    f"{LAYER_MODULE}.FusedMoE.run_moe_core": _around_run_moe_core,
    f"{LAYER_MODULE}.FusedMoE.forward_impl": _around_forward_impl,
}


def register() -> bool:
    """The ``sglang.srt.plugins`` entry point: with ``ROCM_MOE_SGLANG=1`` the hooks of
    ``HOOKS`` are registered (SGLang's loader applies them); returns whether it is active."""
    if os.environ.get(SWITCH, "0") not in ("1", "true", "True"):
        return False
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook in HOOKS.items():
        if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
            HookRegistry.register(target, hook, HookType.AROUND)
    return True


def rocm_layer(sglang_layer, *, router, gate_weight: torch.Tensor | None = None):
    """An ``EPMoE`` sharing an SGLang FusedMoE's expert weights (no copy) and its
    RocmMoEDispatcher's dispatcher and experts, for ``rocm_moe.diagnose`` and ``sanity``."""
    from rocm_moe.layer import EPMoE

    rd = getattr(sglang_layer, "dispatcher", None)
    if not isinstance(getattr(rd, "dispatcher", None), Dispatcher):
        raise ValueError(error_message(
            "sglang_layer.dispatcher", type(rd).__name__, "is not rocm_moe's",
            f"set {SWITCH}=1 before SGLang builds the model"))
    w13, w2 = sglang_layer.w13_weight, sglang_layer.w2_weight
    layer = EPMoE(hidden_size=w13.shape[2], intermediate_size=w2.shape[2], router=router,
                  dispatcher=rd.dispatcher, experts=rd.experts, weight_mode=rd.weight_mode,
                  dtype=w13.dtype, device=w13.device)
    layer.w13, layer.w2 = w13, w2
    if gate_weight is not None:
        with torch.no_grad():
            layer.gate.weight.copy_(gate_weight)
    return layer
