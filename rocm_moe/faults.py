"""Fault injection: plant one known MoE integration bug in an EPMoE, to see its signature.

``plant(layer, "weights_twice")`` (or ``rocm-moe diagnose --inject weights_twice``) makes the
layer misbehave the way real pipelines did; ``plant(layer, None)`` restores it, ``planted(layer)``
names the bug planted (None: none, the default).
``FAULTS`` is the one registry of the bug classes: where each acts, what it emulates, what it
looks like, its fix, how to plant it (``inject``) and how ``rocm_moe.diagnose`` predicts it:

| fault | stage | emulates |
|---|---|---|
| per_sequence_routing | route | experts chosen from the sequence mean, not per token (seed 004) |
| int64_as_int32 | dispatch | an int64 id buffer read as int32, per row or flat (aiter#5255) |
| capacity_overflow | dispatch | tokens past max_num_inp_token_per_rank overwritten (mori#356) |
| mask_as_map | experts | AITER's 0/1 expert_mask used as vLLM's expert_map (vllm#49758) |
| map_as_mask | experts | vLLM's expert_map (local id / -1) passed as AITER's mask (ATOM#887) |
| weights_twice | weighting | experts weighted, combine weighted again (output ~ w^2) |
| weights_never | weighting | raw expert outputs summed unweighted (output ~ sum of outputs) |
| dispatched_ids | combine | combine given the dispatched ids, not the rank's own (mori#475) |
| other_ranks_missing | combine | only this rank's local experts summed (vllm#37529) |
| second_reduction | combine | an all-reduce after combine on replicated tokens (sglang#34887) |
| scalar_collapse | combine | a [1, H] row read as a scalar (seed 004) |

The layer itself carries no fault code: ``plant`` wraps its stages from outside, the dispatcher
and the experts in probes (``ProbedDispatcher``, ``ProbedExperts``; everything else passes
through) and, for a route bug, its ``route_tokens``. The same probes tap each stage's tensors
into a ``StageRecord`` (``recording``), which is what diagnose reads.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from rocm_moe._checks import error_message
from rocm_moe.experts.base import swiglu_expert
from rocm_moe.weighting import ExpertsOutput, accumulation_dtype, resolve_weight_mode, weight_once

# The stages diagnose judges, in pipeline order. "output" is the layer's final [T, H] (shared
# experts included); "combine_raw" is the raw path (``return_raw=True``), run separately.
STAGES = ("config", "route", "dispatch", "experts", "weighting", "combine", "shared",
          "post_combine", "output", "combine_raw")


# ---- what the bugs do ---------------------------------------------------------------------------
def per_sequence_hidden(hidden_states: torch.Tensor) -> torch.Tensor:
    """[B, S, H] -> every token replaced by its sequence's mean (routing input only)."""
    if hidden_states.dim() != 3:
        return hidden_states
    return hidden_states.mean(dim=1, keepdim=True).expand_as(hidden_states)


def int64_read_as_int32(topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """The first K int32 words of an int64 [T, K] buffer: [id0, 0, id1, 0, ...] (little end)."""
    K = topk_ids_TK.shape[1]
    return topk_ids_TK.long().contiguous().view(torch.int32)[:, :K].contiguous()


def int64_read_flat_as_int32(topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """The first T*K int32 words of an int64 [T, K] buffer read as one flat array, reshaped to
    [T, K]: row t holds words t*K .. t*K+K-1, so later rows read other tokens' ids."""
    T, K = topk_ids_TK.shape
    flat = topk_ids_TK.long().contiguous().view(torch.int32).flatten()
    return flat[:T * K].reshape(T, K).contiguous()


def _int64_either_read(check) -> float:
    """int64_as_int32: the per-row read or the flat read, whichever matches better."""
    return min(check.dispatch(lambda x, ids: (x, int64_read_as_int32(ids), False)),
               check.dispatch(lambda x, ids: (x, int64_read_flat_as_int32(ids), False)))


def capacity(num_tokens: int) -> int:
    """The capacity the capacity_overflow fault assumes: half the batch (at least 1)."""
    return max(1, num_tokens // 2)


def overflow_tokens(x_TH: torch.Tensor) -> torch.Tensor:
    """Rows past the capacity overwritten (here with zeros), as a silent overflow leaves them."""
    x = x_TH.clone()
    x[capacity(x.shape[0]):] = 0
    return x


def mask_read_as_map(map_E: torch.Tensor) -> torch.Tensor:
    """The [E] local ids a pipeline uses that reads the 0/1 mask as local ids: every expert maps
    to local 0 or 1 (-1 = skipped)."""
    e = int((map_E >= 0).sum())
    return (map_E >= 0).long().clamp(max=max(e - 1, 0))


def map_read_as_mask(map_E: torch.Tensor) -> torch.Tensor:
    """The [E] local ids a pipeline uses that reads the id map as a mask: entries != 0 count as
    local, and the local id is AITER's prefix sum over that mask (local expert 0 is dropped,
    remote ones are computed)."""
    e = int((map_E >= 0).sum())
    owned = map_E != 0
    local = torch.cumsum(owned.long(), 0) - 1
    return torch.where(owned, local.clamp(max=max(e - 1, 0)), torch.full_like(local, -1))


def experts_with_map(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, map_E, *, weighted: bool):
    """The reference SwiGLU experts under an arbitrary (possibly wrong) [E] local-id map."""
    acc = accumulation_dtype(x_RH.dtype)
    R, K = topk_ids_RK.shape
    local = torch.where(topk_ids_RK >= 0, map_E.to(x_RH.device)[topk_ids_RK.long().clamp(min=0)],
                        torch.full_like(topk_ids_RK, -1, dtype=torch.long))
    raw = x_RH.new_zeros(R, K, x_RH.shape[1], dtype=acc)
    for j in local.unique().tolist():
        if j < 0:
            continue
        r, k = torch.where(local == j)
        raw[r, k] = swiglu_expert(x_RH[r].to(acc), w13[j].to(acc), w2[j].to(acc))
    raw = ExpertsOutput(out=raw.to(x_RH.dtype), weights_applied=False)
    if not weighted:
        return raw.out
    # The slots this map computes, weighted once (the ids of the others read as empty).
    computed_RK = torch.where(local >= 0, topk_ids_RK, torch.full_like(topk_ids_RK, -1))
    return weight_once(raw, topk_weights_RK, computed_RK, None)


def rows_as_tokens(rows_RH: torch.Tensor, like_TH: torch.Tensor) -> torch.Tensor:
    """Received rows' partials read as the own tokens' outputs: row t for token t, 0 past R."""
    out = torch.zeros_like(like_TH)
    n = min(out.shape[0], rows_RH.shape[0])
    out[:n] = rows_RH[:n]
    return out


@dataclass(frozen=True, kw_only=True, eq=False)
class CombineView:
    """What a combine-stage bug can put in place of the right [T, H] output."""

    partials_RH: torch.Tensor  # the received rows' partials, weighted once
    world_size: int
    local_only: Callable[[], torch.Tensor]  # [T, H]: only this rank's experts, own tokens


# ---- the registry -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Fault:
    """One known bug class.

    ``stage``: where it acts, which is the first stage diagnose finds wrong. ``inject``: the
    stage's transform, by stage: route ``hidden [B, S, H] -> hidden the router sees``;
    dispatch ``(x [T, H], ids [T, K]) -> (x, ids, validate_ok)``; experts ``map_E [E] -> the
    local ids used``; weighting ``weights [R, K] -> the weights applied``; combine
    ``(y [T, H], CombineView) -> y``. ``predict(check) -> rel err`` of the bug's prediction
    against the observed stage, ``check`` being diagnose's stage checker; None: the stage's
    reference recomputed through ``inject``. ``one_rank``: False where the bug cannot show with
    one rank (the output stays correct at W = 1).
    """

    name: str
    stage: str
    emulates: str
    signature: str
    fix: str
    inject: Callable
    predict: Callable[[Any], float] | None = None
    one_rank: bool = True


def _unique_owner_scaled(check) -> float:
    """second_reduction: W times the output (all-reduce over the group) or U times it (over
    the U owner ranks of each token), whichever matches better."""
    return min(check.combine(lambda y, v: y * v.world_size),
               check.combine(lambda y, v: y * check.unique_owners()[:, None].to(y)))


FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault(name="per_sequence_routing", stage="route", inject=per_sequence_hidden,
          emulates="experts chosen from the sequence mean, not per token (seed 004)",
          signature="every token of a sequence got the same experts",
          fix="route each token: logits = hidden [T, H] @ gate.T, never pooled"),
    Fault(name="int64_as_int32", stage="dispatch",
          inject=lambda x, ids: (x, int64_read_as_int32(ids), False), predict=_int64_either_read,
          emulates="an int64 id buffer read as int32 (aiter#5255, MORI's binding)",
          signature="received ids are [id0, 0, id1, 0, ...]: an int64 buffer read as int32 "
          "(per row or as one flat buffer)",
          fix="convert ids with .to(torch.int32), never reinterpret"),
    Fault(name="capacity_overflow", stage="dispatch",
          inject=lambda x, ids: (overflow_tokens(x), ids, True),
          emulates="tokens past max_num_inp_token_per_rank overwritten (mori#356)",
          signature="tokens past the capacity arrive corrupted",
          fix="raise max_num_inp_token_per_rank or split the batch (mori#356)"),
    Fault(name="mask_as_map", stage="experts", inject=mask_read_as_map,
          emulates="AITER's 0/1 expert_mask used as vLLM's expert_map (vllm#49758)",
          signature="the 0/1 expert_mask was used as the expert_map (local ids)",
          fix="use ExpertMap for weight rows, ExpertMask only for AITER (vllm#49758)"),
    Fault(name="map_as_mask", stage="experts", inject=map_read_as_mask,
          emulates="vLLM's expert_map (local id / -1) passed as AITER's mask (ATOM#887)",
          signature="the expert_map (local id or -1) was passed as AITER's mask",
          fix="build AITER's mask with ExpertMap.to_expert_mask (ROCm/ATOM#887)"),
    Fault(name="weights_twice", stage="weighting", inject=lambda w: w * w,
          emulates="experts weighted, combine weighted again (output ~ w^2)",
          signature="partials scale like w^2: weights applied twice",
          fix="apply weights once: experts OR combine (ExpertsOutput.weights_applied)"),
    Fault(name="weights_never", stage="weighting", inject=torch.ones_like,
          emulates="raw expert outputs summed unweighted (output ~ sum of outputs)",
          signature="partials are unweighted sums: weights never applied",
          fix="weight raw outputs before MORI's combine, which only sums"),
    Fault(name="dispatched_ids", stage="combine", one_rank=False,
          inject=lambda y, v: rows_as_tokens(v.partials_RH, y),
          emulates="combine given the dispatched ids, not the rank's own (mori#475)",
          signature="output rows are the received rows' partials: combine was given the "
          "dispatched ids", fix="pass the rank's own [T, K] ids (mori#475)"),
    Fault(name="other_ranks_missing", stage="combine", one_rank=False,
          inject=lambda y, v: v.local_only(),
          emulates="only this rank's local experts summed (vllm#37529)",
          signature="only this rank's local experts are summed",
          fix="combine must gather every owner's partial (vllm#37529)"),
    Fault(name="second_reduction", stage="combine", one_rank=False,
          inject=lambda y, v: y * v.world_size, predict=_unique_owner_scaled,
          emulates="an all-reduce after combine on replicated tokens (sglang#34887)",
          signature="output is W (or U) times the right one: reduced again after combine",
          fix="drop the all-reduce after combine (sglang#34887)"),
    Fault(name="scalar_collapse", stage="combine",
          inject=lambda y, v: y[:, :1].expand_as(y).contiguous(),
          emulates="a [1, H] row read as a scalar (seed 004)",
          signature="each row is one number repeated: a [1, H] row read as a scalar",
          fix="index the row (out[t] = y[0]), not its first element"),
]}


def check_fault(fault: str | None) -> None:
    if fault is not None and fault not in FAULTS:
        raise ValueError(error_message("fault", repr(fault), f"known faults are {list(FAULTS)}",
                                       "pick one, or None for a correct pipeline"))


# ---- the trace record and the probes ------------------------------------------------------------
@dataclass(kw_only=True, eq=False)
class StageRecord:
    """Every stage's tensors of one forward on one rank, as the probes saw them (None until
    the stage ran)."""

    topk_ids: torch.Tensor | None = None  # [T, K]: the router's, before dispatch
    topk_weights: torch.Tensor | None = None  # [T, K] float32
    dispatched_x: torch.Tensor | None = None  # [R, H]: rows received
    dispatched_ids: torch.Tensor | None = None  # [R, K] int32, global
    dispatched_weights: torch.Tensor | None = None  # [R, K] float32
    expert_out: torch.Tensor | None = None  # [R, H] weighted or [R, K, H] raw
    weights_applied: bool | None = None  # the experts' declaration for expert_out
    partials: torch.Tensor | None = None  # [R, H]: put on the wire, weighted once
    combined: torch.Tensor | None = None  # [T, H]: routed output, before shared experts
    shared: torch.Tensor | None = None  # [T, H]: the shared experts' output (layers with them)
    out: torch.Tensor | None = None  # [T, H]: the layer's output (set by its caller)
    experts_wrote_input: bool | None = None  # the experts changed their input rows in place

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: v for f in fields(self)
                if isinstance(v := getattr(self, f.name), torch.Tensor)}


def _delegate(wrapper, name: str):
    """``name`` looked up on ``wrapper.inner`` (not before ``inner`` is set, as during a copy)."""
    if name == "inner" or name.startswith("__"):
        raise AttributeError(name)
    return getattr(wrapper.inner, name)


class _Probe:
    """A stage's backend with the planted fault's transform and the taps; everything else
    (placement, rank, supports, ...) passes through to ``inner``."""

    def __init__(self, inner, fault: Fault | None, record: StageRecord | None):
        self.inner, self.fault, self.record = inner, fault, record

    def __getattr__(self, name: str):
        return _delegate(self, name)

    def _at(self, stage: str) -> bool:
        return self.fault is not None and self.fault.stage == stage

    def _tap(self, **tensors) -> None:
        if self.record is not None:
            for name, t in tensors.items():
                setattr(self.record, name, t.detach().clone() if torch.is_tensor(t) else t)


@dataclass(frozen=True, kw_only=True, eq=False)
class _ProbeHandle:
    """The backend's handle plus the own tokens (a combine bug may use them)."""

    inner: Any
    x_TH: torch.Tensor

    def __getattr__(self, name: str):
        return _delegate(self, name)


class ProbedDispatcher(_Probe):
    """Dispatch-stage bugs alter the inputs; combine-stage bugs the output."""

    def __init__(self, inner, fault, record, *, layer):
        super().__init__(inner, fault, record)
        self.layer = layer

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, *, validate: bool = True):
        self._tap(topk_ids=topk_ids_TK, topk_weights=topk_weights_TK)
        if self._at("dispatch"):
            x_TH, topk_ids_TK, ok = self.fault.inject(x_TH, topk_ids_TK)
            validate = validate and ok
        d = self.inner.dispatch(x_TH, topk_weights_TK, topk_ids_TK, validate=validate)
        self._tap(dispatched_x=d.x, dispatched_ids=d.topk_ids, dispatched_weights=d.topk_weights)
        return replace(d, handle=_ProbeHandle(inner=d.handle, x_TH=x_TH))

    def combine(self, expert_output, handle):
        h = handle.inner
        y_TH = self.inner.combine(expert_output, h)
        if self._at("combine"):
            emap = self.inner.expert_map_on(y_TH.device)
            view = CombineView(
                partials_RH=weight_once(expert_output, h.recv_topk_weights, h.recv_topk_ids,
                                        emap),
                world_size=self.inner.world_size,
                local_only=lambda: _inner(self.layer.experts)(
                    handle.x_TH, h.topk_ids, h.topk_weights, self.layer.w13, self.layer.w2, emap,
                    weight_mode="experts", validate=False).out)
            y_TH = self.fault.inject(y_TH, view)
        self._tap(combined=y_TH)
        return y_TH

    def combine_raw(self, expert_output, handle):
        """The raw path (return_raw, invariant mode): the owner weights the slots it gets back
        itself, which the tap records as this stage's combined [T, H] output."""
        h = handle.inner
        raw_TKH = self.inner.combine_raw(expert_output, h)
        if self.record is not None:
            self._tap(combined=weight_once(ExpertsOutput(out=raw_TKH, weights_applied=False),
                                           h.topk_weights, h.topk_ids, None))
        return raw_TKH


class ProbedExperts(_Probe):
    """Experts-stage bugs compute under a wrong local-id map; weighting bugs re-weight the
    experts' output before it leaves the rank."""

    def __call__(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *,
                 weight_mode=None, validate: bool = True, mode=None, **extra) -> ExpertsOutput:
        """``extra``: the layer's other experts keywords (an expert variant and its biases, a
        capacity-sized batch's row bound), passed on to the experts unchanged."""
        weight_mode = resolve_weight_mode(weight_mode, mode)
        args = (x_RH, topk_ids_RK, topk_weights_RK, w13, w2)
        before = x_RH.detach().clone() if self.record is not None and torch.is_tensor(x_RH) \
            else None
        variant = {k: v for k, v in extra.items() if k not in ("num_rows", "expected_rows")}
        if self._at("experts") and variant:
            raise ValueError(error_message(
                "fault", self.fault.name, "an experts-stage fault computes plain SwiGLU "
                f"experts; this layer's experts take {sorted(variant)}",
                "plant it in a layer without an expert variant"))
        if self._at("experts"):
            weighted = weight_mode == "experts"
            eo = ExpertsOutput(out=experts_with_map(
                *args, self.fault.inject(expert_map.map_E), weighted=weighted),
                weights_applied=weighted)
        else:
            eo = self.inner(*args, expert_map, weight_mode=weight_mode, validate=validate,
                            **extra)
        if before is not None:  # (fused_moe's inplace=True writes the output over its input)
            self._tap(experts_wrote_input=not torch.equal(before, x_RH))
        self._tap(expert_out=eo.out, weights_applied=eo.weights_applied)
        if self._at("weighting"):
            raw = self.inner(*args, expert_map, weight_mode="combine", validate=False, **extra)
            eo = ExpertsOutput(out=weight_once(raw, self.fault.inject(topk_weights_RK),
                                               topk_ids_RK, expert_map), weights_applied=True)
        self._tap(partials=weight_once(eo, topk_weights_RK, topk_ids_RK, expert_map))
        return eo


def _inner(component):
    return component.inner if isinstance(component, _Probe) else component


def _route_with(layer, fault: Fault, hidden_states, *, forced_expert_ids=None):
    return type(layer).route_tokens(layer, fault.inject(hidden_states),
                                    forced_expert_ids=forced_expert_ids)


def _probe_shared(layer, record: StageRecord | None) -> None:
    """Tap the shared experts' output into ``record`` (None: remove the tap)."""
    shared = getattr(layer, "shared_experts", None)
    if shared is None:
        return
    for name in ("forward", "forward_invariant"):
        shared.__dict__.pop(name, None)
        if record is not None:
            method = getattr(shared, name)

            def tapped(x_TH, *args, _method=method):
                # (the invariant path runs the shared SwiGLU on the layer's experts: on the
                # bare backend, so the routed experts' taps are not overwritten)
                y = _method(x_TH, *(_inner(a) for a in args))
                record.shared = y.detach().clone()
                return y
            setattr(shared, name, tapped)


def _instrument(layer, fault: Fault | None, record: StageRecord | None) -> None:
    """Put ``layer``'s stages behind probes for ``fault`` and ``record`` (none: bare)."""
    layer.dispatcher, layer.experts = _inner(layer.dispatcher), _inner(layer.experts)
    layer.__dict__.pop("route_tokens", None)
    _probe_shared(layer, record)
    if fault is None and record is None:
        return
    layer.dispatcher = ProbedDispatcher(layer.dispatcher, fault, record, layer=layer)
    layer.experts = ProbedExperts(layer.experts, fault, record)
    if fault is not None and fault.stage == "route":
        layer.route_tokens = functools.partial(_route_with, layer, fault)


def planted(layer) -> str | None:
    """The name of the bug planted in ``layer``, or None."""
    probe = layer.dispatcher
    return probe.fault.name if isinstance(probe, _Probe) and probe.fault else None


def plant(layer, fault: str | None) -> None:
    """Plant the bug ``fault`` (a FAULTS key) in ``layer``; None removes it."""
    check_fault(fault)
    record = layer.dispatcher.record if isinstance(layer.dispatcher, _Probe) else None
    _instrument(layer, FAULTS[fault] if fault else None, record)


@contextlib.contextmanager
def recording(layer) -> Iterator[StageRecord]:
    """Tap ``layer``'s stage tensors (planted bug included) into a StageRecord while open."""
    fault = FAULTS.get(planted(layer) or "")
    record = StageRecord()
    _instrument(layer, fault, record)
    try:
        yield record
    finally:
        _instrument(layer, fault, None)
