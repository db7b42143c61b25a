"""Find the first wrong stage of an EP MoE pipeline and name the known bug class behind it.

``diagnose(layer, x)`` runs the layer once on every rank (a collective call) with every stage's
tensors recorded, once more with ``return_raw=True`` (the raw path, where the backends support
it), and compares each stage with a reference computed from THAT stage's own inputs, so a wrong
stage does not make every later stage look wrong for no reason. The references are
``rocm_moe.oracle``'s, written apart from the code they judge (float64, dense):

| stage | observed | reference |
|---|---|---|
| config | the layer's RouterConfig | the model's config (``hf_config``), where one is given |
| route | topk ids / weights | ``reference_route``: the layer's router family, from x and gate |
| dispatch | rows, ids, weights received | every rank's routed tokens, once on each rank that |
| | | reports holding one of their experts (not ``placement.owner``) |
| experts | the experts' output | ``dense_experts``: each held (row, slot), from global ids |
| weighting | [R, H] partials put on the wire | the dense slots weighted once |
| combine | [T, H] routed output | each token through its K observed experts, weighted |
| shared | the shared experts' [T, H] | ``dense_shared``: their SwiGLU and gate in float64 |
| post_combine | the layer's output | the observed combined + shared outputs, nothing else |
| output | the layer's [T, H] output | the whole layer: independent routing, shared experts |
| combine_raw | raw [T, K, H] and its output | the dense per-slot oracle, the whole layer |

The input is copied before the run and compared after it: experts that write their output into
their input rows (fused_moe's ``inplace=True``) are named at the experts stage, not blamed on the
router. Arguments (the layer, a finite input, a writable ``dump`` folder) are checked before any
work, on every rank together.

What a reference still shares with the checked path (the list of experts each rank holds, expert
weights gathered from the layers when none are given) is in each ``StageResult.shares``.

At the first stage that diverges, each known bug class of that stage predicts what the stage
would have produced; a prediction that matches names the bug (``rocm_moe.faults.FAULTS``, the
registry that also plants them). The stage tensors come from the probes of ``rocm_moe.faults``
(a typed ``StageRecord``); the layer itself records nothing. Some classes cannot show on one
rank (combine given the dispatched ids, other ranks' contributions missing, a second
reduction): at W = 1 those bugs leave the output correct, and diagnose reports the pipeline
clean.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from rocm_moe import faults
from rocm_moe._checks import check_finite, error_message
from rocm_moe.faults import FAULTS, STAGES, Fault, StageRecord
from rocm_moe.layer import EPMoE
from rocm_moe.oracle import (
    dense_experts,
    dense_shared,
    local_expert_weights,
    match_routing,
    reference_route,
    rel_err,
    weighted_sum,
)
from rocm_moe.sanity import TOLERANCE, check_layer, router_config_mismatch, tolerance


@dataclass(frozen=True)
class StageResult:
    stage: str
    rel_err: float
    ok: bool
    note: str = ""
    reference: str = ""  # what the stage is compared with
    shares: str = ""  # what that reference still shares with the checked path ('' = nothing)


@dataclass(frozen=True)
class Diagnosis:
    bug: str
    stage: str
    signature: str
    fix: str
    match_rel_err: float


@dataclass(frozen=True)
class Report:
    rank: int
    world_size: int
    dtype: str
    tolerance: float
    stages: list[StageResult]
    first_bad: str | None
    diagnosis: Diagnosis | None
    candidates: dict[str, float]  # bug -> rel err of its prediction at the first bad stage

    def to_dict(self) -> dict:
        return asdict(self)


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _fingerprint_sort(x, ids, w):
    """Rows in a canonical order (backends may deliver them in any order)."""
    g = torch.Generator().manual_seed(0)
    key = (x.double() @ torch.rand(x.shape[1], generator=g, dtype=torch.float64)
           + ids.double() @ torch.rand(ids.shape[1], generator=g, dtype=torch.float64) * 7
           + w.double() @ torch.rand(w.shape[1], generator=g, dtype=torch.float64) * 3)
    order = key.argsort()
    return x[order], ids[order], w[order]


def _rows_err(observed, expected) -> float:
    """Distance of two (x, ids, w) row sets; inf when the row counts or ids differ."""
    (ox, oi, ow), (ex, ei, ew) = (_fingerprint_sort(*observed), _fingerprint_sort(*expected))
    if ox.shape != ex.shape or not torch.equal(oi.long(), ei.long()):
        return float("inf")
    return max(rel_err(ox, ex), rel_err(ow, ew))


def _expected_recv(sources, held: tuple[int, ...]):
    """What a rank holding the experts ``held`` must receive: every source token with a slot of
    one of them, once (placement.owner is not consulted: it is what is being checked)."""
    xs, ids, ws = [], [], []
    mine = torch.tensor(held, dtype=torch.long)
    for x, w, i in sources:
        keep = torch.isin(i.long(), mine).any(1) if i.numel() else torch.zeros(0, dtype=bool)
        xs.append(x[keep])
        ids.append(i[keep].to(torch.int32))
        ws.append(w[keep])
    return torch.cat(xs), torch.cat(ids), torch.cat(ws)


class _Checker:
    """The references of one diagnose run on one rank. Each stage method compares the observed
    stage with its reference computed from that stage's own inputs, or, given a bug's
    ``inject``, with what the stage would have produced under that bug (``Fault.predict``).
    The references come from ``rocm_moe.oracle`` and call none of the code they judge."""

    def __init__(self, layer: EPMoE, x_TH, hidden_states, record: StageRecord,
                 raw_record: StageRecord | None, expert_weights, *, by_content: bool):
        self.layer, self.x, self.hidden, self.r = layer, x_TH, hidden_states, record
        self.raw_r = raw_record
        self.disp = layer.dispatcher
        self.W, self.rank = self.disp.world_size, self.disp.rank
        self.emap = self.disp.expert_map_on(x_TH.device)
        self.expert_weights = expert_weights
        self.tie = 4 * TOLERANCE[x_TH.dtype]
        self.config_mismatch: str | None = None  # set by diagnose from hf_config
        # Where the weights are: every rank reports the experts it holds (a collective), read
        # from the weights themselves where an independent source of them is given.
        mine = _held_by_content(layer, expert_weights) if by_content else layer.local_experts
        self.held = _gather(tuple(int(g) for g in mine), self.W)
        self.mine = self.held[self.rank]
        self.everything = [g for h in self.held for g in h]

    def predicted_err(self, fault: Fault) -> float:
        if not fault.one_rank and self.W == 1:
            return float("inf")
        if fault.predict is not None:
            return fault.predict(self)
        return getattr(self, fault.stage)(fault.inject)

    # ---- route ----------------------------------------------------------------------------------
    def _route_ref(self, hidden):
        L = self.layer
        return reference_route(hidden.reshape(-1, L.hidden_size), L.gate.weight, L.router,
                               L.e_score_correction_bias)

    @functools.cached_property
    def _routing(self):
        return self._route_ref(self.hidden)

    def route(self, inject=None):
        ref = self._routing if inject is None else self._route_ref(inject(self.hidden))
        return match_routing(ref, self.r.topk_ids, self.r.topk_weights, tie=self.tie)[0]

    # ---- dispatch -------------------------------------------------------------------------------
    @functools.cached_property
    def _sources(self) -> list:
        """Every rank's (x, weights, ids) as routed (a collective, once)."""
        r = self.r
        return _gather((self.x.cpu(), r.topk_weights.cpu(), r.topk_ids.cpu()), self.W)

    def dispatch(self, inject=None):
        r = self.r

        def sent(x, w, i):  # what a rank hands to dispatch (under the bug)
            if inject is not None:
                x, i, _ = inject(x, i)
            return x, w, i

        sources = [sent(*s) for s in self._sources]
        observed = (r.dispatched_x.cpu(), r.dispatched_ids.cpu(), r.dispatched_weights.cpu())
        err = _rows_err(observed, _expected_recv(sources, self.mine))
        if inject is None and not _owners_hold(self.layer, self.held):
            # The rows can still arrive right (a token with experts on every rank goes to
            # every rank), but a slot's partial would be owned by a rank without its weights.
            err = max(err, 1.0)
        return err

    # ---- experts and weighting ------------------------------------------------------------------
    @functools.cached_property
    def _received_raw(self) -> torch.Tensor:
        """[R, K, H] float64: the received rows' slots of this rank's experts, densely."""
        r = self.r
        return dense_experts(r.dispatched_x, r.dispatched_ids, self.mine, self.expert_weights)

    def _held_RK(self, ids_RK) -> torch.Tensor:
        return torch.isin(ids_RK.long().cpu(), torch.tensor(self.mine, dtype=torch.long))

    def experts(self, inject=None):
        r = self.r
        weighted = r.weights_applied
        if inject is not None:
            args = (r.dispatched_x, r.dispatched_ids.to(torch.int32), r.dispatched_weights,
                    *local_expert_weights(self.layer))
            ref = faults.experts_with_map(*args, inject(self.emap.map_E), weighted=weighted)
            return rel_err(r.expert_out, ref)
        if weighted:
            return rel_err(r.expert_out, weighted_sum(self._received_raw, r.dispatched_weights))
        held = self._held_RK(r.dispatched_ids)[:, :, None]  # other slots: never read
        return rel_err(r.expert_out.cpu().double() * held, self._received_raw)

    def weighting(self, inject=None):
        r = self.r
        w = r.dispatched_weights if inject is None else inject(r.dispatched_weights)
        return rel_err(r.partials, weighted_sum(self._received_raw, w))

    # ---- combine and the whole layer ------------------------------------------------------------
    @functools.cached_property
    def _oracle_raw(self) -> torch.Tensor:
        """[T, K, H] float64: each own token through its K observed experts, from any rank."""
        return dense_experts(self.x, self.r.topk_ids, self.everything, self.expert_weights)

    def combine(self, inject=None):
        y_ref = weighted_sum(self._oracle_raw, self.r.topk_weights)
        if inject is not None:
            y_ref = inject(y_ref, faults.CombineView(
                partials_RH=self.r.partials.cpu(), world_size=self.W,
                local_only=self._local_only))
        return rel_err(self.r.combined.cpu(), y_ref)

    def _local_only(self):
        """The oracle over this rank's experts only: what a combine without the other ranks'
        partials gives."""
        held = self._held_RK(self.r.topk_ids)[:, :, None]
        return weighted_sum(self._oracle_raw * held, self.r.topk_weights)

    def config(self, inject=None):
        """The layer's RouterConfig against the model's config (``hf_config``), field by field:
        the route reference reads the RouterConfig, so a wrong default is seen only here."""
        return 0.0 if self.config_mismatch is None else float("inf")

    def shared(self, inject=None):
        """The shared experts' output against ``oracle.dense_shared`` (the gate's sigmoid)."""
        if self.layer.shared_experts is None:
            return 0.0
        if self.r.shared is None:
            return float("inf")
        return rel_err(self.r.shared, dense_shared(self.layer.shared_experts, self.x))

    def post_combine(self, inject=None):
        """The layer's code after combine: its output must be the combined routed output plus
        the shared experts' output, nothing else (no second scaling)."""
        r = self.r
        if r.combined is None:
            return float("inf")
        y = r.combined.double().cpu()
        if r.shared is not None:
            y = y + r.shared.double().cpu()
        return rel_err(r.out.reshape(y.shape).cpu(), y)

    def output(self, inject=None):
        """The layer's output against the whole layer in float64: the independent routing (a
        near tie may pick either expert), every expert, the shared experts."""
        ref = self._routing
        ids = match_routing(ref, self.r.topk_ids, self.r.topk_weights, tie=self.tie)[1]
        raw = dense_experts(self.x, ids, self.everything, self.expert_weights)
        y = weighted_sum(raw, ref.weights_at(ids)) + dense_shared(self.layer.shared_experts,
                                                                  self.x)
        return rel_err(self.r.out.reshape(y.shape).cpu(), y)

    def combine_raw(self, inject=None):
        """The raw path: each slot's [T, K, H] output back on the owner against the dense
        per-slot oracle, and the output the owner weights from it against the whole layer."""
        rr = self.raw_r
        if rr is None:
            return 0.0
        out = rr.out
        raw_ref = dense_experts(self.x, out.topk_ids, self.everything, self.expert_weights)
        y = weighted_sum(raw_ref, out.topk_weights) + dense_shared(self.layer.shared_experts,
                                                                   self.x)
        return max(rel_err(out.raw.reshape(raw_ref.shape).cpu(), raw_ref),
                   rel_err(out.out.reshape(y.shape).cpu(), y))

    def unique_owners(self) -> torch.Tensor:
        """[T]: the number of distinct ranks holding the experts of each token's valid slots."""
        owner = {g: d for d, h in enumerate(self.held) for g in h}
        ids = self.r.topk_ids.long().cpu().tolist()
        return torch.tensor([len({owner[g] for g in row if g >= 0}) for row in ids],
                            dtype=torch.float64)


def _held_by_content(layer: EPMoE, expert_weights) -> tuple[int, ...]:
    """The global experts whose weights this rank's w13 rows are (each claimed expert first,
    then every other); a row that is no expert's is left out."""
    w13 = local_expert_weights(layer)[0]

    def same(j: int, g: int) -> bool:
        return rel_err(w13[j], expert_weights(g)[0]) <= TOLERANCE[torch.float32]

    held = []
    for j, g in enumerate(layer.local_experts):
        if same(j, g):
            held.append(g)
        else:
            held += [h for h in range(layer.router.routed_experts) if same(j, h)][:1]
    return tuple(held)


def _default_expert_weights(layer: EPMoE):
    """Every expert's weights for the references: gathered from their holders (small layers)."""
    w13, w2 = local_expert_weights(layer)
    mine = (list(layer.local_experts), w13.cpu(), w2.cpu())
    table = {}
    for experts, w13, w2 in _gather(mine, layer.dispatcher.world_size):
        for j, g in enumerate(experts):
            table[g] = (w13[j], w2[j])
    return lambda g: table[g]


# What each stage is compared with, and what that reference still shares with the checked path.
REFERENCES = {
    "route": "oracle.reference_route: the layer's router family rewritten in float64 from the "
             "hidden states and the gate weight (no routing.route)",
    "dispatch": "the rows each rank must receive: every token once on each rank holding one of "
                "its experts, as the ranks report them (no placement.owner)",
    "experts": "oracle.dense_experts: every received (row, slot) of an expert this rank holds "
               "through its SwiGLU in float64, from the global ids (no layout, no backend)",
    "weighting": "the dense experts' slots weighted once in float64 (no weighting.weight_once)",
    "combine": "each own token through its K observed experts in float64, weighted",
    "config": "the model's transformers config (hf_config): RouterConfig.from_hf_config field "
              "by field",
    "shared": "oracle.dense_shared: the shared experts (and their gate's sigmoid) in float64",
    "post_combine": "the observed combined routed output plus the observed shared experts' "
                    "output, nothing else (the layer's code after combine)",
    "output": "the whole layer in float64: independent routing, every expert, shared experts",
    "combine_raw": "the raw path (return_raw=True): each [T, K] slot against the dense per-slot "
                   "oracle, and the output weighted from it against the whole layer",
}
_HELD = ("which experts a rank holds is layer.local_experts (Placement.experts_of_rank), the "
         "list the layer loaded its weights by (with expert_weights given, it is read from the "
         "weights themselves)")
_GATHERED = ("expert weights gathered from the layers themselves: pass expert_weights for an "
             "independent source")
_NO_RAW = "raw path skipped: "
_OWN_WEIGHTS = ("route", "output")


def _shares(stage: str, gathered: bool, has_shared: bool, config_checked: bool = False) -> str:
    """What the reference of ``stage`` still shares with the checked path ('' for nothing)."""
    parts = []
    if stage in ("route", "output", "combine_raw"):
        parts.append("the gate weight and bias are the layer's own" + (
            "; its RouterConfig was checked against hf_config (stage config)" if config_checked
            else "; so is its RouterConfig (pass hf_config to check it against the model's)"))
    if stage in ("dispatch", "experts", "weighting") and gathered:
        parts.append(_HELD)
    if stage == "combine":
        parts.append("the routing observed at route (judged there)")
    if stage in ("experts", "weighting", "combine", "output", "combine_raw") and gathered:
        parts.append(_GATHERED)
    if stage in ("shared", "output", "combine_raw") and has_shared:
        parts.append("the shared experts' parameters are the layer's own")
    if stage == "post_combine":
        parts.append("the combined and shared outputs observed (judged at combine and shared)")
    return "; ".join(parts)


def _owners_hold(layer: EPMoE, held: list[list[int]]) -> bool:
    """Whether the placement's owner of every expert is the rank that holds its weights."""
    owner_E = layer.dispatcher.placement.owner_E.tolist()
    return all(owner_E[g] == r for r, experts in enumerate(held) for g in experts)


def _raw_unsupported(layer: EPMoE, x_TH) -> str | None:
    reason = layer.dispatcher.raw_unsupported_reason()
    if reason is None:
        reason = layer.experts.supports(mode="raw", dtype=x_TH.dtype, device=x_TH.device)
    return reason


def _run_recorded(layer: EPMoE, hidden_states, **kw) -> StageRecord:
    was_validate = layer.validate
    layer.validate = False  # diagnose looks at what a non-validating framework would do
    try:
        with faults.recording(layer) as record:
            record.out = layer(hidden_states, **kw)
    finally:
        layer.validate = was_validate
    return record


@torch.no_grad()
def diagnose(layer: EPMoE, hidden_states: torch.Tensor, *, expert_weights=None,
             dump: str | None = None, hf_config=None) -> Report:
    """Run ``layer`` on ``hidden_states`` ([T, H] or [B, S, H]) and judge every stage.

    Every rank of the layer's group must call this (the pipeline and the references gather).
    The layer runs twice: as configured, and with ``return_raw=True`` (the raw path) where its
    backends support it, each time on a copy of ``hidden_states`` (which are never changed; the
    references read a copy taken before the run, so a stage writing into its input is named).
    ``expert_weights(g) -> (w13 [2I, H], w2 [H, I])`` gives the references every expert
    (default: gathered from the ranks, which the report notes). ``dump`` writes the stage
    tensors to ``dump`` (one safetensors file per rank: ``name.rank{r}.safetensors``; its folder
    is checked before the run). ``hf_config``: the model's transformers config, against which
    the layer's RouterConfig is checked (stage "config"; without it, skipped with a note).
    """
    check_layer("layer", layer)
    layer._agree_invariant()  # (every rank, before a refusal below is shared)
    with layer._refusals_shared():  # a refusal here reaches the peers, which raise too
        tokens = layer._flatten(hidden_states).shape[0]
        cap = layer.dispatcher.max_tokens_per_rank
        if cap is not None and tokens > cap:  # (its taps follow one dispatch)
            raise ValueError(error_message(
                "hidden_states", f"{tokens} tokens", "diagnose judges one dispatch: at most "
                f"the dispatcher's max_tokens_per_rank={cap} tokens per rank (the layer runs "
                "larger batches in chunks of that size)", f"pass at most {cap} tokens"))
        check_finite("hidden_states", hidden_states, "diagnose judges the MoE layer: find the "
                     "earlier layer that produced the non-finite value")
        out_path = _dump_path(dump, layer.dispatcher.rank) if dump is not None else None
        mismatch = router_config_mismatch(layer.router, hf_config) \
            if hf_config is not None else None
    hidden = hidden_states.detach().clone()  # the references' input, taken before any run
    x_TH = hidden.reshape(-1, layer.hidden_size)
    tol = tolerance(layer)
    work = hidden.clone()
    record = _run_recorded(layer, work)
    input_changed = not torch.equal(work, hidden)
    ew = expert_weights or _default_expert_weights(layer)
    checker = _Checker(layer, x_TH, hidden, record, None, ew,
                       by_content=expert_weights is not None)
    checker.config_mismatch = mismatch
    no_raw, raw_error = _raw_unsupported(layer, x_TH), None
    # Where dispatch is wrong on some rank, the raw path's exchange need not match between
    # the ranks (a collective could hang): it is judged only after a right dispatch.
    if no_raw is None and not all(_gather(checker.dispatch() <= tol, checker.W)):
        no_raw = "dispatch is wrong, so the raw path's exchange would not match"
    if no_raw is None:
        try:  # a bug may make the raw path refuse (every rank alike: the checks precede comm)
            checker.raw_r = _run_recorded(layer, hidden.clone(), return_raw=True)
        except (ValueError, TypeError) as exc:
            raw_error = f"the raw path raised {type(exc).__name__}: {exc}"
    results, preds = [], {}
    for stage in STAGES:
        err = getattr(checker, stage)()
        preds[stage] = {f.name: checker.predicted_err(f) for f in FAULTS.values()
                        if f.stage == stage}
        note = _stage_note(stage, layer, hf_config, mismatch)
        if stage == "combine_raw" and (no_raw or raw_error):
            err, note = (0.0, _NO_RAW + no_raw) if no_raw else (float("inf"), raw_error)
        if stage == "experts" and record.experts_wrote_input:
            err, note = float("inf"), _IN_PLACE
        if stage == "output" and input_changed and not record.experts_wrote_input:
            err, note = float("inf"), "the layer changed its input hidden_states in place"
        # Routing weights are float32 whatever the layer's dtype (the router's contract), and
        # the route and output references weigh with their own float64 weights.
        stage_tol = max(tol, TOLERANCE[torch.float32]) if stage in _OWN_WEIGHTS else tol
        results.append(StageResult(stage, err, err <= stage_tol, note, REFERENCES[stage],
                                   _shares(stage, expert_weights is None,
                                           layer.shared_experts is not None,
                                           hf_config is not None)))
    # A bug belongs to the pipeline, not to one rank: decide together. The first wrong stage is
    # the earliest that diverges on any rank; each candidate is judged by its worst error over
    # the ranks where that stage diverges (one rank alone can be ambiguous).
    everyone = _gather(([r.ok for r in results], preds, bool(record.experts_wrote_input)),
                       layer.dispatcher.world_size)
    bad = [i for i in range(len(STAGES)) if not all(oks[i] for oks, _, _ in everyone)]
    first_bad = STAGES[bad[0]] if bad else None
    candidates, diagnosis = {}, None
    if first_bad == "experts" and any(wrote for _, _, wrote in everyone):
        diagnosis = IN_PLACE_DIAGNOSIS
    elif first_bad == "config":
        diagnosis = Diagnosis("router_config", "config", mismatch or "", "build the RouterConfig "
                              "with RouterConfig.from_hf_config(model config)", float("inf"))
    elif first_bad is not None:
        i = STAGES.index(first_bad)
        judged = [p[first_bad] for oks, p, _ in everyone if not oks[i]]
        candidates = {bug: max(p[bug] for p in judged) for bug in judged[0]}
        bug, err = min(candidates.items(), key=lambda kv: kv[1], default=(None, float("inf")))
        if bug is not None and err <= max(5 * tol, 1e-4):
            f = FAULTS[bug]
            diagnosis = Diagnosis(bug, f.stage, f.signature, f.fix, err)
    if out_path is not None:
        _dump(out_path, record.tensors())
    return Report(rank=layer.dispatcher.rank, world_size=layer.dispatcher.world_size,
                  dtype=str(x_TH.dtype), tolerance=tol, stages=results, first_bad=first_bad,
                  diagnosis=diagnosis, candidates=candidates)


_IN_PLACE = ("the experts wrote into their input rows (fused_moe's inplace=True style): the "
             "caller's hidden states are overwritten")
IN_PLACE_DIAGNOSIS = Diagnosis(
    "experts_in_place", "experts", _IN_PLACE,
    "write the experts' output to a new tensor (inplace=False); the layer's input is the "
    "caller's and the shared experts read it after the routed ones", 0.0)


def _stage_note(stage: str, layer: EPMoE, hf_config, mismatch: str | None) -> str:
    if stage == "config":
        if hf_config is None:
            return ("skipped: no hf_config given, so the route and output references read the "
                    "layer's own RouterConfig (a wrong default there is not seen)")
        return mismatch or ""
    if stage == "shared" and layer.shared_experts is None:
        return "skipped: the layer has no shared experts"
    return ""


def _dump_path(path: object, rank: int) -> str:
    """Where rank ``rank`` writes its dump, checked before any work: a str whose folder exists
    and is writable (the file itself is overwritten)."""
    if not isinstance(path, str) or not path:
        raise TypeError(error_message("dump", repr(path), "must be a file name (str)",
                                      "pass e.g. dump='diag' (writes diag.rank{r}.safetensors)"))
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    out = f"{stem}.rank{rank}.safetensors"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK) \
            or os.path.isdir(out):
        raise ValueError(error_message(
            "dump", repr(path), f"{out} cannot be written (its folder {folder} is missing or "
            "not writable, or the name is a folder)", "pass a path in a writable folder"))
    return out


def _dump(out: str, tensors: dict) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out)
    return out
