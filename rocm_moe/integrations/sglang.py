"""rocm_moe as SGLang's MoE dispatcher and experts step (checked against sglang==0.5.23;
``pip install 'rocm_moe[sglang]'``).

SGLang's ``--moe-a2a-backend`` is a closed list, so the adapter uses the ``sglang.srt.plugins``
entry point: with ``ROCM_MOE_SGLANG=1``, ``register()`` puts AROUND hooks (SGLang's
``HookRegistry``) on

    create_moe_dispatcher   -> RocmMoEDispatcher over a rocm_moe Dispatcher on SGLang's EP group
    FusedMoE.run_moe_core   -> rocm_moe experts on the dispatched rows (run_experts)
    FusedMoE.forward_impl   -> batches past the dispatcher's capacity run in chunks; the
                               layer's own all-reduce after combine is skipped
    DeepEPMoE.forward_impl / run_moe_core -> the same (SGLang builds DeepEPMoE under
                               --moe-a2a-backend mori on Qwen3/DeepSeek-V2-style models)
    UnquantizedFusedMoEMethod.process_weights_after_loading -> skipped for rocm_moe's layers:
                               w13/w2 stay as loaded (no AITER shuffle, AMX packing, gate/up
                               interleave, TRT-LLM block layout)

    dispatch(hidden_states, topk_output) -> RocmMoEDispatchOutput (Standard format: rows [R, H],
        StandardTopKOutput of their [R, K] float32 weights and int32 GLOBAL ids, and the frozen
        rocm_moe handle)
    run_experts(...) -> RocmMoECombineInput (the ExpertsOutput, which says whether it is weighted,
        and the same handle)
    combine(RocmMoECombineInput) -> [T, H], complete on the token's own rank

The handle travels inside the dispatch output and the combine input (nothing is kept on the
dispatcher), so combine cannot be given another batch's ids. Weighting is rocm_moe's
(``rocm_moe.weighting``): exactly once, by the experts (weight_mode "experts") or by combine
("combine"). ``routed_scaling_factor`` is applied once, where sglang 0.5.23 applies it: by the
MoE layer (SGLang's runner; here the dispatcher scales the weights before they travel, so the
experts' weighting and combine's both see it) unless the top-k step fused it
(``routing_scale``), except in the blocks that scale their routed output themselves:
DeepSeek-V2/V3 (Kimi K2 runs the same class), GLM-4.5 and GLM-4.5-Lite, under an all-to-all
backend or off CUDA (``SELF_SCALING_BLOCKS``: a hook on their constructor turns the
dispatcher's scaling off for their layers).

The reduction: rocm_moe's combine already sums every expert's contribution on the token's rank.
``FusedMoE.forward_impl`` would all-reduce again when ``reduce_results`` (sglang#34006 is this
bug under MORI); the forward_impl hook turns that off for layers that run a RocmMoEDispatcher.
Model files and SGLang's layer boundaries skip their own sum of the MoE output, and keep each
rank's own tokens, only under an all-to-all backend they know: serve with ``--moe-a2a-backend
mori`` (rocm_moe's hook replaces MORI's dispatcher; notes/serving-sglang.md). Under ``none``
with EP > 1 SGLang replicates the tokens and sums the ranks' outputs: refused at build.

One dispatcher per model: every layer's RocmMoEDispatcher holds the process's shared rocm_moe
Dispatcher (``rocm_moe.comm.pool.shared_dispatcher``), sized by SGLang's own per-rank token
budget (``token_budget``). A batch larger than it runs in chunks of at most that many tokens, as
many on every rank as the rank with the most needs (``Dispatcher.num_chunks``); under CUDA-graph
capture (a decode bucket within the budget) no collective and no host read runs.

Backends: ``ROCM_MOE_SGLANG_COMM`` / ``ROCM_MOE_SGLANG_EXPERTS`` when set, else the fastest that
runs here (``pool.fastest_comm`` / ``pool.fastest_experts``, logged once).

EPLB and redundant experts (``--enable-eplb``, ``--ep-num-redundant-experts R``): SGLang's EPLB
drives, rocm_moe computes physical experts. The layer holds P = E + R physical experts, P / W per
rank, contiguous (``ExpertLocationMetadata``: physical p on rank p // (P / W)), so the
dispatcher's placement is the contiguous one of P; SGLang's TopK maps each logical id to a
physical one (``topk_ids_logical_to_physical``: "static" prefers a replica on the token's own
rank) before dispatch. Its expert distribution recorder, under ``--moe-a2a-backend mori``, reads
the dispatcher's per-local-expert counts: rocm_moe's dispatcher reports them in MORI's place
(``record_expert_distribution``). Its EPLB manager moves the weights inside ``w13_weight`` /
``w2_weight`` and rewrites the metadata, in place, between steps; the experts read the weights at
every call and the physical -> local map never changes. ``replicas_from_sglang`` gives a layer's
placement as rocm_moe's ``ReplicatedPlacement``.

Two-batch overlap (``--enable-two-batch-overlap``): SGLang's TBO operations call the layer
dispatcher's staged ``dispatch_a`` / ``dispatch_b`` / ``combine_a`` / ``combine_b`` per sub-batch
(``tbo_subbatch_index``); ``RocmMoEDispatcher`` runs the collective in the _a half and hands the
result over in the _b half, each sub-batch's handle in its own dispatch output, and a
buffer-holding dispatcher (symm, MORI) is built with ``batches_in_flight=2`` when SGLang's
``tbo_enabled`` flag is on. A TBO sub-batch runs as one chunk: one larger than the capacity is
refused by the dispatcher with the reason (raise ``ROCM_MOE_SGLANG_MAX_TOKENS``).

Expert variants (``expert_variant``): SiLU SwiGLU and gpt-oss's clamped SwiGLU (``gemm1_alpha``,
``gemm1_clamp_limit``; w13 rows interleaved by SGLang's loader, de-interleaved in place once after
loading), each with or without biases (``with_bias``: SGLang's ``w13_weight_bias`` /
``w2_weight_bias``, read at every call); ``apply_router_weight_on_input`` (Llama 4, top-1): the
weight onto the token before dispatch.

Refused with a ValueError at construction, before any collective: quantised layers, fused shared
experts, activations other than SiLU-gated, a SiLU clamp without gemm1_alpha
(``gemm1_clamp_limit`` alone, ``swiglu_limit``), ``gemm1_beta`` other than 1, an experts backend
that does not run the layer's variant, ``no_combine``, physical
experts that do not split evenly over the EP ranks, the MoE layout in which SGLang replicates
every token on every EP rank (``--moe-a2a-backend none`` with EP > 1: SGLang then sums the
ranks' outputs, which would count rocm_moe's complete outputs W times),
``apply_router_weight_on_input`` with K > 1 (at dispatch).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

from rocm_moe._checks import env_switch, env_tokens, error_message
from rocm_moe._libs import import_engine
from rocm_moe.comm.base import CombineHandle, Dispatcher
from rocm_moe.experts.base import PLAIN, Experts, ExpertVariant, variant_kwargs, variant_refusal
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.integrations._gate_up import is_gate_up, uninterleave_gate_up
from rocm_moe.placement import Placement
from rocm_moe.replicas import ReplicatedPlacement
from rocm_moe.weighting import ExpertsOutput, WeightMode, resolve_weight_mode

SGLANG_VERSION = "0.5.23"
SWITCH = "ROCM_MOE_SGLANG"
ENV_COMM, ENV_EXPERTS, ENV_WEIGHT_MODE = ("ROCM_MOE_SGLANG_COMM", "ROCM_MOE_SGLANG_EXPERTS",
                                          "ROCM_MOE_SGLANG_WEIGHT_MODE")
ENV_MAX_TOKENS = "ROCM_MOE_SGLANG_MAX_TOKENS"
DEFAULT_MAX_TOKENS = 4096  # SGLang's SGLANG_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK default
LAYER_MODULE = "sglang.srt.layers.moe.fused_moe_triton.layer"
EP_LAYER_MODULE = "sglang.srt.layers.moe.ep_moe.layer"
UNQUANT_MODULE = "sglang.srt.layers.quantization.unquant"
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
        # a capacity-sized dispatch (symm, MORI): the experts' row bound (Experts(num_rows=,
        # expected_rows=)), so their cost follows the rows received; empty otherwise
        row_bound: dict | None = None

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
                     apply_router_weight_on_input: bool = False,
                     variant: ExpertVariant = PLAIN, interleaved_gate_up: bool = False):
            super().__init__()
            self.routed_scaling_factor = routed_scaling_factor
            self.apply_router_weight_on_input = apply_router_weight_on_input
            # what the layer's experts compute (``expert_variant``) and whether SGLang loads
            # its w13 interleaved (de-interleaved once after loading, then marked)
            self.variant, self.interleaved_gate_up = variant, interleaved_gate_up
            if not isinstance(dispatcher, Dispatcher):
                raise TypeError(error_message("dispatcher", type(dispatcher).__name__,
                                              "must be a rocm_moe Dispatcher",
                                              "build one with rocm_moe.backends.make_dispatcher"))
            self.dispatcher = dispatcher
            self.experts = experts or ReferenceExperts()
            self.weight_mode = resolve_weight_mode(weight_mode)
            reason = variant_refusal(self.experts, variant, self.weight_mode)
            if reason is not None:
                raise _refuse(ENV_EXPERTS, self.experts.name, f"cannot run this layer's "
                              f"experts ({variant}): {reason}",
                              f"set {ENV_EXPERTS}=reference (or a backend that runs it)")

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
            d = self.dispatcher.dispatch(x, w, topk_output.topk_ids, validate=not capturing())
            record_expert_distribution(self.dispatcher, d)
            router_logits = getattr(topk_output, "router_logits", None)
            topk = StandardTopKOutput(topk_weights=d.topk_weights, topk_ids=d.topk_ids,
                                      router_logits=router_logits)
            bound = d.row_bound(x.shape[0], self.dispatcher.world_size) or None
            return RocmMoEDispatchOutput(hidden_states=d.x, hidden_states_scale=None,
                                         topk_output=topk, handle=d.handle, row_bound=bound)

        def set_quant_config(self, quant_config: dict) -> None:
            """SGLang's unquantised method calls this under ``--moe-a2a-backend mori`` to pick
            MORI's wire dtypes; rocm_moe's rows travel in the layer's dtype."""
            self.quant_config = quant_config

        def combine(self, combine_input):
            if not isinstance(combine_input, RocmMoECombineInput):
                raise _refuse("combine_input", type(combine_input).__name__,
                              "must be run_experts' RocmMoECombineInput (it carries the "
                              "dispatch's handle; a runner's output has none)",
                              f"keep {SWITCH}=1's run_moe_core hook in place")
            eo = ExpertsOutput(out=combine_input.hidden_states,
                               weights_applied=combine_input.weights_applied)
            return self.dispatcher.combine(eo, combine_input.handle)

        # ---- two-batch overlap (--enable-two-batch-overlap) -------------------------------
        # SGLang's TBO runs a layer as staged operations (``batch_overlap/operations.py``,
        # e.g. Qwen3MoeSparseMoeBlock.op_dispatch_a / op_dispatch_b / op_experts /
        # op_combine_a / op_combine_b), with a yield to the other sub-batch between the _a and
        # _b halves, and names the sub-batch (``tbo_subbatch_index``). The collective runs in
        # the _a half (the other sub-batch's operations queue after it, as after MORI's and
        # DeepEP's send); the _b half hands its result over. Each sub-batch's dispatch carries
        # its own handle, so two sub-batches may be in flight (a buffer-holding dispatcher has
        # batches_in_flight=2 under TBO: ``make_sglang_dispatcher``).
        def dispatch_a(self, hidden_states, topk_output, tbo_subbatch_index=None):
            self._stage_put("dispatch_a", tbo_subbatch_index,
                            self.dispatch(hidden_states, topk_output))

        def dispatch_b(self, tbo_subbatch_index=None):
            return self._stage_take("dispatch_a", "dispatch_b", tbo_subbatch_index)

        def combine_a(self, combine_input, tbo_subbatch_index=None):
            self._stage_put("combine_a", tbo_subbatch_index, self.combine(combine_input))

        def combine_b(self, tbo_subbatch_index=None):
            return self._stage_take("combine_a", "combine_b", tbo_subbatch_index)

        def _stage_put(self, stage: str, index, value) -> None:
            staged = self.__dict__.setdefault("_staged", {})
            if (stage, index) in staged:
                raise _refuse(f"{stage}(tbo_subbatch_index={index})", "called twice",
                              f"each {stage} of a sub-batch is followed by its _b half",
                              "call the _b half first (SGLang's operations do)")
            staged[(stage, index)] = value

        def _stage_take(self, stage: str, half: str, index):
            staged = self.__dict__.setdefault("_staged", {})
            if (stage, index) not in staged:
                raise _refuse(f"{half}(tbo_subbatch_index={index})", "without its _a half",
                              f"{stage} of the same sub-batch must run first",
                              "run SGLang's staged operations in order")
            return staged.pop((stage, index))

    return SimpleNamespace(RocmMoEDispatcher=RocmMoEDispatcher,
                           RocmMoEDispatchOutput=RocmMoEDispatchOutput,
                           RocmMoECombineInput=RocmMoECombineInput)


def __getattr__(name: str):
    if name in _EXPORTED:
        return getattr(_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def record_expert_distribution(dispatcher: Dispatcher, d) -> None:
    """Under ``--moe-a2a-backend mori`` SGLang's expert distribution recorder (what its EPLB
    manager rebalances from) counts the (row, slot) pairs each rank's local physical experts
    receive, from MORI's dispatcher; rocm_moe's dispatcher runs in MORI's place, so it hands
    the recorder the same [e] counts, when and as MORI's would (the rule of SGLang's
    ``_should_record_expert_distribution``, its ``_record_local_expert_count``). Device ops only:
    a scatter-add over the received ids (also under CUDA-graph capture)."""
    try:
        from sglang.srt.layers.moe.token_dispatcher import moriep
    except ImportError:  # (the pinned SGLang has it; a build without MORI's module records
        return  # nothing from the dispatcher, as SGLang itself would)
    # moriep._should_record_expert_distribution's rule, with a capture test that does not
    # initialise CUDA on a machine without a GPU (SGLang's asks torch.get_device_module())
    recorder = moriep.get_global_expert_distribution_recorder()
    if not recorder.recording and not (
            capturing() and not isinstance(recorder, moriep._ExpertDistributionRecorderNoop)):
        return
    emap = dispatcher.expert_map_on(d.x.device)
    local = emap.local_ids(d.topk_ids).reshape(-1) + 1  # 0: not local or empty
    counts = torch.zeros(emap.num_local + 1, dtype=torch.int64, device=local.device)
    counts.scatter_add_(0, local, torch.ones_like(local))
    moriep._record_local_expert_count(counts[1:])


def replicas_from_sglang(layer_id: int, metadata=None) -> ReplicatedPlacement:
    """Layer ``layer_id``'s placement in SGLang's ``ExpertLocationMetadata`` (default: the
    process's, ``get_global_expert_location_metadata()``) as rocm_moe's
    ``ReplicatedPlacement``: ``physical_to_logical_map[layer_id]`` [P], rank r holding
    physical experts [r P / W, (r + 1) P / W) in both. SGLang rewrites the metadata in place at
    each rebalance: call again after one."""
    if metadata is None:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        metadata = get_global_expert_location_metadata()
        if metadata is None:
            raise _refuse("expert_location_metadata", None, "SGLang has not set it",
                          "call this inside a server, after the model runner initialised it")
    return ReplicatedPlacement(metadata.physical_to_logical_map_cpu[layer_id],
                               metadata.ep_size, metadata.num_logical_experts)


def capturing() -> bool:
    """Whether the current stream is being captured into a CUDA graph (SGLang's decode graphs):
    then the adapter runs no input check that reads the device on the host."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def run_experts(dispatcher, dispatch_output, w13: torch.Tensor, w2: torch.Tensor,
                w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None):
    """The experts step: ``dispatcher.experts`` on the dispatched rows with this rank's
    ``w13`` [e, 2I, H] (gate then up) and ``w2`` [e, H, I] (and, for a biased layer, SGLang's
    ``w13_weight_bias`` [e, 2I] / ``w2_weight_bias`` [e, H]) -> RocmMoECombineInput."""
    c = _classes()
    if not isinstance(dispatch_output, c.RocmMoEDispatchOutput):
        raise _refuse("dispatch_output", type(dispatch_output).__name__,
                      "must come from RocmMoEDispatcher.dispatch", "dispatch with it first")
    if dispatcher.interleaved_gate_up and not is_gate_up(w13):
        raise _refuse("w13", "SGLang's interleaved gate/up rows (gate_up_interleaved)",
                      "rocm_moe's experts read w13 as gate rows then up rows",
                      f"load with {SWITCH}=1 (its process_weights_after_loading hook "
                      "de-interleaves them) or call uninterleave_gate_up(w13, w13_bias) once")
    x = dispatch_output.hidden_states
    ids = dispatch_output.topk_output.topk_ids.to(torch.int32)
    w = dispatch_output.topk_output.topk_weights.float()
    eo = dispatcher.experts(x, ids, w, w13, w2, dispatcher.dispatcher.expert_map_on(x.device),
                            weight_mode=dispatcher.weight_mode, validate=not capturing(),
                            **(dispatch_output.row_bound or {}),
                            **variant_kwargs(dispatcher.variant, w13_bias, w2_bias))
    return c.RocmMoECombineInput(hidden_states=eo.out, weights_applied=eo.weights_applied,
                                 handle=dispatch_output.handle)


# ---- the plug-in --------------------------------------------------------------------------------
def _server_args():
    """SGLang's resolved server arguments, or None outside a published SGLang context."""
    try:
        from sglang.srt.arg_groups.model_override_base import resolved_view
        from sglang.srt.runtime_context import get_server_args

        return resolved_view(get_server_args())
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return None


def token_budget(server_args=None) -> tuple[int, str]:
    """(max_tokens_per_rank, how it was chosen): the most tokens one EP rank hands one MoE layer
    in one forward, from SGLang's own budget.

    ``ROCM_MOE_SGLANG_MAX_TOKENS`` wins. Else the prefill budget (``--chunked-prefill-size``, or
    ``--max-prefill-tokens`` with chunking off), divided over the attention-DP ranks as SGLang's
    MegaMoE check divides it (each DP rank schedules its own chunk; rounded up to a multiple of
    the attention-TP size), and at least the largest CUDA-graph bucket
    (``--cuda-graph-max-bs-decode`` / ``-prefill``), so a captured batch never needs chunks.
    SGLang's own MORI dispatcher takes ``SGLANG_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK``
    (4096) and checks that the whole chunked prefill size fits it; rocm_moe chunks a larger
    batch instead, so a smaller budget only costs more chunks. Outside a server: 4096."""
    cap = env_tokens(ENV_MAX_TOKENS, f"unset it to take SGLang's budget, or set e.g. "
                     f"{ENV_MAX_TOKENS}=4096")
    cfg = server_args if server_args is not None else _server_args()
    graphs = [] if cfg is None or getattr(cfg, "disable_cuda_graph", False) else [
        b for b in (getattr(cfg, "cuda_graph_max_bs_decode", None),
                    getattr(cfg, "cuda_graph_max_bs_prefill", None)) if b]
    if cap is not None:
        if graphs and cap < max(graphs):
            raise _refuse(ENV_MAX_TOKENS, cap, f"must be at least SGLang's largest CUDA-graph "
                          f"bucket ({max(graphs)}: a captured batch runs as one chunk)",
                          f"raise {ENV_MAX_TOKENS}, lower --cuda-graph-max-bs-decode / "
                          "--cuda-graph-max-bs-prefill, or unset it (SGLang's budget)")
        return cap, f"{ENV_MAX_TOKENS}={cap}"
    if cfg is None:
        return DEFAULT_MAX_TOKENS, "no SGLang server arguments published: MORI's default"
    chunk = getattr(cfg, "chunked_prefill_size", None)
    prefill = chunk if chunk is not None and chunk > 0 else cfg.max_prefill_tokens
    why = (f"chunked_prefill_size={chunk}" if chunk is not None and chunk > 0
           else f"max_prefill_tokens={prefill}")
    dp = getattr(cfg, "attn_dp_size", 1) or 1
    if dp > 1:
        align = max(cfg.tp_size // dp // (getattr(cfg, "attn_cp_size", 1) or 1), 1)
        per_rank = -(-prefill // dp)
        prefill = -(-per_rank // align) * align
        why += f" over attn_dp_size={dp}"
    if graphs and max(graphs) > prefill:
        return max(graphs), f"the largest CUDA-graph bucket ({max(graphs)})"
    return prefill, why


def _backend_choice(kind: str, env: str, default) -> str:
    """The backend named by ``env``, checked against the known names, else ``default()``."""
    from rocm_moe import backends

    name = os.environ.get(env) or None  # (empty: unset, as the vLLM plug-in reads it)
    if name is None:
        return default()[0]
    if name not in backends.names(kind):
        raise _refuse(env, name, f"known {kind} backends are {backends.names(kind)}",
                      f"set {env} to one of them, or unset it for the fastest that runs here")
    return name


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def expert_variant(moe_runner_config, *, with_bias: bool = False) -> ExpertVariant:
    """What every routed expert of an SGLang MoE layer computes, as rocm_moe's
    ``ExpertVariant`` (the rules of SGLang's Triton runner, ``moe_runner/triton_utils/
    fused_moe.py``); a ValueError naming the field where rocm_moe would compute another model.

      activation "silu", gated, no gemm1_* / swiglu_limit  -> plain SwiGLU
      "silu" with gemm1_alpha and gemm1_clamp_limit (gpt-oss: 1.702, 7.0; gemm1_beta None
        or 1)                                              -> "swiglu_oai" with them
        (``swiglu_gpt_oss_sigmoid_alpha`` on interleaved rows when ``gate_up_interleaved``,
        its default; ``swiglu_no_interleaved_with_alpha_and_limit`` otherwise)
      ``with_bias`` (w13_weight_bias, w2_weight_bias)      -> bias=True (b2 before the
                                                              routing weight, as SGLang's)
    Refused: other activations or ungated experts; gemm1_clamp_limit without gemm1_alpha
    (``_swiglu_silu_clamp_mul``: min(silu(gate), limit) * clamp(up)); swiglu_limit (DeepSeek
    V4's clamp before silu_and_mul); gemm1_beta other than 1."""
    cfg = moe_runner_config
    unset = f"unset {SWITCH} for this model"
    if cfg.activation != "silu" or not cfg.is_gated:
        raise _refuse("activation", cfg.activation if cfg.is_gated else "ungated",
                      "rocm_moe experts compute gated silu (SwiGLU), plain or with gpt-oss's "
                      "gemm1_alpha / gemm1_clamp_limit", unset)
    if getattr(cfg, "swiglu_limit", None) is not None:
        raise _refuse("swiglu_limit", cfg.swiglu_limit, "SGLang clamps before silu_and_mul "
                      "(DeepSeek V4); rocm_moe's clamped SwiGLU is gpt-oss's (up + 1) form, "
                      "so it would compute another model", unset)
    alpha, limit = cfg.gemm1_alpha, cfg.gemm1_clamp_limit
    beta = getattr(cfg, "gemm1_beta", None)
    if alpha is None:
        for field, value in (("gemm1_clamp_limit", limit), ("gemm1_beta", beta)):
            if value is not None:
                raise _refuse(field, value, "without gemm1_alpha SGLang computes "
                              "min(silu(gate), limit) * clamp(up, -limit, limit), not "
                              "gpt-oss's (up + 1) form that rocm_moe computes", unset)
        return ExpertVariant(bias=bool(with_bias))
    if limit is None:
        raise _refuse("gemm1_clamp_limit", None, "SGLang requires it with gemm1_alpha",
                      "set it from the model config (gpt-oss: swiglu_limit)")
    if beta is not None and float(beta) != 1.0:
        raise _refuse("gemm1_beta", beta, "rocm_moe's swiglu_oai computes (up + 1) * glu: "
                      "beta must be 1", unset)
    return ExpertVariant(activation="swiglu_oai", alpha=float(alpha), limit=float(limit),
                         bias=bool(with_bias))


def interleaved_gate_up(moe_runner_config) -> bool:
    """Whether SGLang's kernels read this layer's w13 rows interleaved (gate0, up0, ...): its
    gpt-oss activation (gemm1_alpha set) with ``gate_up_interleaved`` (the default; its loader
    keeps the checkpoint's column order)."""
    cfg = moe_runner_config
    return cfg.gemm1_alpha is not None and bool(getattr(cfg, "gate_up_interleaved", True))


def _with_bias(moe_runner_config, quant_method=None) -> bool:
    return bool(getattr(getattr(moe_runner_config, "layer", None), "with_bias", False)
                or getattr(quant_method, "with_bias", False))


def check_layer(moe_runner_config) -> None:
    """Refuse (ValueError with the reason) a layer rocm_moe would not compute exactly."""
    cfg = moe_runner_config
    if cfg.num_fused_shared_experts:
        raise _refuse("num_fused_shared_experts", cfg.num_fused_shared_experts,
                      "fused shared experts are extra slots, not rocm_moe experts",
                      "disable shared-expert fusion (--disable-shared-experts-fusion)")
    expert_variant(cfg, with_bias=_with_bias(cfg))
    if cfg.no_combine:
        raise _refuse("no_combine", True, "rocm_moe's combine sums the K outputs",
                      f"unset {SWITCH} or build the layer with no_combine=False")
    E, e = cfg.num_experts, cfg.num_local_experts
    if not e or E % e:
        raise _refuse("num_experts, num_local_experts", (E, e), "every EP rank must hold "
                      "the same number of (physical) experts: (E + redundant) / W",
                      "pick --ep-num-redundant-experts so that E + R is a multiple of the EP "
                      "size")
    _check_engine_flags(W=E // e)


def _check_engine_flags(W: int) -> None:
    """The token layout SGLang gives the MoE (published flags)."""
    try:
        from sglang.srt.runtime_context import get_exec

        get_exec().moe  # noqa: B018 (published server arguments, else not in a server)
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return  # no published server arguments (a layer built outside a server)
    from sglang.srt.layers.moe.utils import (
        get_moe_a2a_backend,
        is_moe_input_scattered_across_dp_ranks,
    )

    if W > 1 and not is_moe_input_scattered_across_dp_ranks():
        raise _refuse("--moe-a2a-backend", get_moe_a2a_backend().value,
                      "with it SGLang gives every EP rank the same (gathered) tokens and sums "
                      "the ranks' MoE outputs afterwards; rocm_moe's combine already returns "
                      "each token's complete output, so it would be counted W times",
                      "serve with --moe-a2a-backend mori (rocm_moe replaces MORI's dispatcher; "
                      "SGLang then keeps each rank's own tokens) and --attn-dp-size = --tp-size")


def _tbo_enabled() -> bool:
    """SGLang's ``--enable-two-batch-overlap`` (its published MoE flags; False outside a
    server)."""
    try:
        from sglang.srt.layers.moe.utils import is_tbo_enabled

        return bool(is_tbo_enabled())
    except (ImportError, AttributeError, RuntimeError, ValueError, AssertionError):
        return False


def make_sglang_dispatcher(moe_runner_config, *, routed_scaling_factor: float | None = None,
                           with_bias: bool = False):
    """A RocmMoEDispatcher for a layer's ``MoeRunnerConfig`` on SGLang's MoE EP group
    (contiguous placement: SGLang gives rank d the experts [d * e, (d + 1) * e)), holding the
    process's shared rocm_moe Dispatcher (one for every layer of the model)."""
    _require_sglang()  # the package's ImportError, not a bare ModuleNotFoundError further down
    from rocm_moe import backends
    from rocm_moe.comm import pool

    cfg = moe_runner_config
    check_layer(cfg)
    E, e = cfg.num_experts, cfg.num_local_experts
    W, device = E // e, _device()
    experts = backends.make_experts(_backend_choice(
        "experts", ENV_EXPERTS, lambda: pool.fastest_experts(device, engine="sglang")))
    mode = resolve_weight_mode(os.environ.get(ENV_WEIGHT_MODE) or "experts",
                               field=ENV_WEIGHT_MODE)
    cap, why = token_budget()
    placement = Placement.contiguous(E, W)
    kw = dict(hidden_size=cfg.hidden_size, top_k=cfg.top_k, dtype=cfg.params_dtype,
              max_tokens_per_rank=cap)
    lanes = 2 if _tbo_enabled() else 1
    if W == 1:  # one EP rank: nothing moves, whatever ROCM_MOE_SGLANG_COMM names
        if _backend_choice("comm", ENV_COMM, lambda: ("local", "")) != "local":
            pool._log_once("sglang-comm-w1", f"{ENV_COMM}={os.environ[ENV_COMM]}: one EP rank "
                           "moves nothing, so the local backend runs")
        disp = pool.shared_dispatcher("local", placement, **kw)
    else:
        from sglang.srt.distributed.parallel_state import get_moe_ep_group

        group = get_moe_ep_group()
        name = _backend_choice("comm", ENV_COMM, lambda: pool.fastest_comm(
            W, device, group.cpu_group, engine="sglang"))
        pg = group.device_group if device.type == "cuda" else group.cpu_group
        if lanes > 1 and backends.BACKENDS[f"comm:{name}"].load().holds_batch:
            kw["batches_in_flight"] = lanes  # one lane per TBO sub-batch (symm, MORI)
        if name == "mori":
            kw["capacity_sized"] = True  # no host read in a captured dispatch (as vLLM's)
        disp = pool.shared_dispatcher(name, placement, group=pg, rank=group.rank_in_group, **kw)
    pool._log_once("sglang-budget", f"sglang dispatcher capacity {cap} tokens per rank ({why})")
    return _classes().RocmMoEDispatcher(
        disp, experts=experts, weight_mode=mode, routed_scaling_factor=routed_scaling_factor,
        apply_router_weight_on_input=cfg.apply_router_weight_on_input,
        variant=expert_variant(cfg, with_bias=with_bias or _with_bias(cfg)),
        interleaved_gate_up=interleaved_gate_up(cfg))


def _around_create_moe_dispatcher(original, moe_runner_config, quant_method, *a, **kw):
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    if not isinstance(quant_method, UnquantizedFusedMoEMethod):
        raise _refuse("quant_method", type(quant_method).__name__,
                      "rocm_moe's SGLang backend runs unquantised experts only",
                      f"serve the unquantised model or unset {SWITCH}")
    return make_sglang_dispatcher(
        moe_runner_config, routed_scaling_factor=routing_scale(moe_runner_config, quant_method),
        with_bias=_with_bias(moe_runner_config, quant_method))


def routing_scale(moe_runner_config, quant_method) -> float | None:
    """The ``routed_scaling_factor`` the dispatcher applies to the weights: the one SGLang's
    runner applies to the layer's output (``moe_runner_config.routed_scaling_factor``), unless
    the top-k step fused it into the weights (``_fuses_routed_scaling_factor_in_topk``); None
    when there is nothing to apply. The blocks that scale their routed output themselves turn
    it off for their layers (``_around_self_scaling_block_init``)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import (
        _fuses_routed_scaling_factor_in_topk,
    )

    if _fuses_routed_scaling_factor_in_topk(quant_method, moe_runner_config.runner_backend):
        return None
    return moe_runner_config.routed_scaling_factor


def block_scales_routed_output() -> bool:
    """Whether a block of ``SELF_SCALING_BLOCKS`` scales its routed output itself (sglang
    0.5.23), or its top-k step folded the factor in: under an all-to-all backend
    (``forward_deepep`` -> ``_scale_routed_and_add_shared``, unless the top-k step fused it), and
    off CUDA (``forward_normal``: ``if not _is_cuda ...: final_hidden_states *= ...``, or AITER's
    top-k folded it). Only on CUDA without one does SGLang's runner scale their output."""
    from sglang.srt.utils import is_cuda

    return _a2a_backend_in_use() or not is_cuda()


def _around_self_scaling_block_init(original, block, *args, **kwargs):
    """After the block is built: its layer's dispatcher (rocm_moe's) applies no
    routed_scaling_factor where the block scales the routed output itself. Scaling in both
    gave DeepSeek-V3 2.5 ** 2 on its routed experts (tests_integrations/sglang/
    test_deepseek.py builds SGLang's own DeepseekV2MoE, and Ling's block, which does not
    scale)."""
    original(block, *args, **kwargs)
    rd = getattr(getattr(block, "experts", None), "dispatcher", None)
    if isinstance(rd, _classes().RocmMoEDispatcher) and block_scales_routed_output():
        rd.routed_scaling_factor = None


def _a2a_backend_in_use() -> bool:
    """Whether SGLang runs an all-to-all MoE backend (``--moe-a2a-backend`` other than none;
    False outside a server, with no published arguments)."""
    try:
        from sglang.srt.layers.moe.utils import get_moe_a2a_backend

        return not get_moe_a2a_backend().is_none()
    except (ImportError, AttributeError, RuntimeError, ValueError, AssertionError):
        return False


def _ours(layer) -> bool:
    return isinstance(getattr(layer, "dispatcher", None), _classes().RocmMoEDispatcher)


def _layer_weights(layer) -> tuple:
    return (layer.w13_weight, layer.w2_weight, getattr(layer, "w13_weight_bias", None),
            getattr(layer, "w2_weight_bias", None))


def _around_run_moe_core(original, layer, dispatch_output, *a, **kw):
    if not _ours(layer):
        return original(layer, dispatch_output, *a, **kw)
    return run_experts(layer.dispatcher, dispatch_output, *_layer_weights(layer))


def _slice_topk(topk_output, rows: slice):
    return topk_output._replace(
        topk_weights=topk_output.topk_weights[rows], topk_ids=topk_output.topk_ids[rows],
        router_logits=None if topk_output.router_logits is None
        else topk_output.router_logits[rows])


def forward_chunked(run, layer, hidden_states, topk_output, **kw):
    """``run(hidden_states, topk_output)`` in chunks of at most the shared dispatcher's
    ``max_tokens_per_rank`` rows, as many on every rank as the rank that needs the most (the
    others run empty chunks). One chunk (a batch within the budget) is ``run`` itself: under
    CUDA-graph capture that path reads nothing on the host. Row order is kept, so the result
    is the one-batch result row for row."""
    from sglang.srt.layers.moe.topk import TopKOutputChecker

    disp = layer.dispatcher.dispatcher
    T = hidden_states.shape[0]
    n = disp.num_chunks(T)
    if n == 1:
        return run(hidden_states, topk_output, **kw)
    if not TopKOutputChecker.format_is_standard(topk_output) or kw.get("pre_quant_input"):
        raise _refuse("topk_output", type(topk_output).__name__, "a batch of more than "
                      f"max_tokens_per_rank={disp.max_tokens_per_rank} tokens is split, which "
                      "needs the Standard top-k output and no pre-quantised input",
                      f"lower the prefill chunk or raise {ENV_MAX_TOKENS}")
    cap = disp.max_tokens_per_rank
    out = [run(hidden_states[i * cap:(i + 1) * cap],
               _slice_topk(topk_output, slice(i * cap, (i + 1) * cap)), **kw)
           for i in range(n)]
    return torch.cat(out)


def _around_forward_impl(original, layer, hidden_states, topk_output, *a, **kw):
    """Chunks past the dispatcher's capacity; rocm_moe's combine is the reduction: the layer's
    all-reduce after it would sum every rank's complete outputs again (sglang#34006), so it is
    off for the call."""
    if not _ours(layer):
        return original(layer, hidden_states, topk_output, *a, **kw)
    saved = layer.reduce_results
    layer.reduce_results = False
    try:
        return forward_chunked(lambda h, t, **k: original(layer, h, t, *a, **k), layer,
                               hidden_states, topk_output, **kw)
    finally:
        layer.reduce_results = saved


def _around_deepep_forward_impl(original, layer, hidden_states, topk_output, *a, **kw):
    """SGLang's DeepEPMoE (built under --moe-a2a-backend mori/deepep) bypasses FusedMoE's
    forward_impl unless its deprecate_flag is set; rocm_moe's layers take FusedMoE's path."""
    if not _ours(layer):
        return original(layer, hidden_states, topk_output, *a, **kw)
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return FusedMoE.forward_impl(layer, hidden_states, topk_output, *a, **kw)


def _around_deepep_run_moe_core(original, layer, dispatch_output, *a, **kw):
    if not _ours(layer):
        return original(layer, dispatch_output, *a, **kw)
    return run_experts(layer.dispatcher, dispatch_output, *_layer_weights(layer))


def _around_process_weights_after_loading(original, method, layer, *a, **kw):
    """SGLang rewrites w13/w2 in place after loading for its own kernels (AITER's shuffle with
    SGLANG_USE_AITER=1 on ROCm, AMX packing on CPUs, the gate/up interleave of its CUDA Triton
    epilogue, FlashInfer TRT-LLM's block layout). rocm_moe's experts read the weights as loaded
    ([e, 2I, H] gate then up, [e, H, I]), so none of it runs for rocm_moe's layers; a gpt-oss
    layer's interleaved w13 / w13_weight_bias (``interleaved_gate_up``) are de-interleaved in
    place instead (every call follows a load of checkpoint-layout weights)."""
    if not _ours(layer):
        return original(method, layer, *a, **kw)
    if layer.dispatcher.interleaved_gate_up:
        uninterleave_gate_up(layer.w13_weight, getattr(layer, "w13_weight_bias", None))
    return None


# The MoE blocks of sglang 0.5.23 that scale their routed output by routed_scaling_factor
# themselves (under an all-to-all backend, and off CUDA); the others leave it to the layer.
SELF_SCALING_BLOCKS = ("sglang.srt.models.deepseek_v2.DeepseekV2MoE",
                       "sglang.srt.models.glm4_moe.Glm4MoeSparseMoeBlock",
                       "sglang.srt.models.glm4_moe_lite.Glm4MoeLiteSparseMoeBlock")

HOOKS = {
    f"{LAYER_MODULE}.create_moe_dispatcher": _around_create_moe_dispatcher,
    f"{LAYER_MODULE}.FusedMoE.run_moe_core": _around_run_moe_core,
    f"{LAYER_MODULE}.FusedMoE.forward_impl": _around_forward_impl,
    f"{EP_LAYER_MODULE}.DeepEPMoE.forward_impl": _around_deepep_forward_impl,
    f"{EP_LAYER_MODULE}.DeepEPMoE.run_moe_core": _around_deepep_run_moe_core,
    f"{UNQUANT_MODULE}.UnquantizedFusedMoEMethod.process_weights_after_loading":
        _around_process_weights_after_loading,
    **{f"{block}.__init__": _around_self_scaling_block_init for block in SELF_SCALING_BLOCKS},
}


def register() -> bool:
    """The ``sglang.srt.plugins`` entry point: with ``ROCM_MOE_SGLANG=1`` the hooks of
    ``HOOKS`` are registered (SGLang's loader applies them); returns whether it is active."""
    if not env_switch(SWITCH):
        return False
    _require_sglang()  # the package's ImportError, not a bare ModuleNotFoundError
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
                  dtype=w13.dtype, device=w13.device, expert_variant=rd.variant)
    layer.w13, layer.w2 = w13, w2
    if rd.variant.bias:
        layer.w13_bias, layer.w2_bias = (sglang_layer.w13_weight_bias,
                                         sglang_layer.w2_weight_bias)
    if gate_weight is not None:
        with torch.no_grad():
            layer.gate.weight.copy_(gate_weight)
    return layer
