"""Find the first wrong stage of an EP MoE pipeline and name the known bug class behind it.

``diagnose(layer, x)`` runs the layer once on every rank (a collective call) with every stage's
tensors recorded, and compares each stage with a reference computed from THAT stage's own
inputs, so a wrong stage does not make every later stage look wrong for no reason:

| stage | observed | reference |
|---|---|---|
| route | topk ids / weights | ``route`` on the layer's own logits, per token |
| dispatch | rows, ids, weights received | every rank's routed tokens, sent once per unique owner |
| experts | the experts' output | reference experts on the received rows (same mode) |
| weighting | [R, H] partials put on the wire | reference outputs weighted once over local slots |
| combine | [T, H] routed output | float64 oracle: each token through its K experts, weighted |

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
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from rocm_moe import faults
from rocm_moe.experts.reference import ReferenceExperts, dense_moe_reference
from rocm_moe.faults import FAULTS, STAGES, Fault, StageRecord
from rocm_moe.layer import EPMoE
from rocm_moe.routing import route
from rocm_moe.sanity import TOLERANCE, rel_err
from rocm_moe.weighting import ExpertsOutput, weight_once


@dataclass(frozen=True)
class StageResult:
    stage: str
    rel_err: float
    ok: bool
    note: str = ""


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


def _expected_recv(sources, placement, rank: int):
    xs, ids, ws = [], [], []
    for x, w, i in sources:
        keep = (placement.owner(i) == rank).any(1) if i.numel() else torch.zeros(0, dtype=bool)
        xs.append(x[keep])
        ids.append(i[keep].to(torch.int32))
        ws.append(w[keep])
    return torch.cat(xs), torch.cat(ids), torch.cat(ws)


class _Checker:
    """The references of one diagnose run on one rank. Each stage method compares the observed
    stage with its reference computed from that stage's own inputs, or, given a bug's
    ``inject``, with what the stage would have produced under that bug (``Fault.predict``)."""

    def __init__(self, layer: EPMoE, x_TH, hidden_states, record: StageRecord, expert_weights):
        self.layer, self.x, self.hidden, self.r = layer, x_TH, hidden_states, record
        self.disp = layer.dispatcher
        self.W, self.rank = self.disp.world_size, self.disp.rank
        self.emap = self.disp.expert_map_on(x_TH.device)
        self.expert_weights = expert_weights

    def predicted_err(self, fault: Fault) -> float:
        if not fault.one_rank and self.W == 1:
            return float("inf")
        if fault.predict is not None:
            return fault.predict(self)
        return getattr(self, fault.stage)(fault.inject)

    def _received(self):
        """The expert stage's inputs as the probes recorded them: (x, ids, weights, w13, w2)."""
        r = self.r
        return (r.dispatched_x, r.dispatched_ids.to(torch.int32), r.dispatched_weights,
                self.layer.w13, self.layer.w2)

    def route(self, inject=None):
        r, L = self.r, self.layer
        hidden = self.hidden if inject is None else inject(self.hidden)
        ref = route(L.router_logits(hidden.reshape(-1, L.hidden_size)), L.router,
                    e_score_correction_bias=L.e_score_correction_bias)
        a, b = r.topk_ids.long().sort(1), ref.topk_ids.long().sort(1)
        if not torch.equal(a.values, b.values):
            return float("inf")
        return rel_err(r.topk_weights.gather(1, a.indices), ref.topk_weights.gather(1, b.indices))

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
        return _rows_err(observed, _expected_recv(sources, self.disp.placement, self.rank))

    def experts(self, inject=None):
        weighted = self.r.weights_applied
        args = self._received()
        if inject is None:
            # validate=False: the recorded rows may be corrupt on purpose (a planted fault
            # repeats ids); the reference runs on them as they are.
            ref = ReferenceExperts()(*args, self.emap, validate=False,
                                     weight_mode="experts" if weighted else "combine").out
        else:
            ref = faults.experts_with_map(*args, inject(self.emap.map_E), weighted=weighted)
        return rel_err(self.r.expert_out, ref)

    def weighting(self, inject=None):
        r = self.r
        raw = ReferenceExperts()(*self._received(), self.emap, weight_mode="combine",
                                 validate=False)
        w = r.dispatched_weights if inject is None else inject(r.dispatched_weights)
        return rel_err(r.partials, weight_once(raw, w, r.dispatched_ids, self.emap))

    def combine(self, inject=None):
        y_ref = self._oracle[0]
        if inject is not None:
            y_ref = inject(y_ref, faults.CombineView(
                partials_RH=self.r.partials, world_size=self.W, local_only=self._local_only))
        return rel_err(self.r.combined, y_ref)

    @functools.cached_property
    def _oracle(self):
        """(y [T, H], raw [T, K, H]) in float64: each token through its K experts."""
        return dense_moe_reference(self.x, self.r.topk_weights, self.r.topk_ids,
                                   expert_weights=self.expert_weights)

    def _local_only(self):
        """The oracle over this rank's experts only: what a combine without the other ranks'
        partials gives."""
        raw = ExpertsOutput(out=self._oracle[1], weights_applied=False)
        return weight_once(raw, self.r.topk_weights, self.r.topk_ids, self.emap)

    def unique_owners(self) -> torch.Tensor:
        """[T]: the number of distinct owner ranks of each token's valid slots."""
        ids = self.r.topk_ids
        owner = self.disp.placement.owner(ids)
        return torch.stack([owner[t][ids[t] >= 0].unique().numel() * torch.ones(())
                            for t in range(ids.shape[0])]) if ids.shape[0] else torch.zeros(0)


def _default_expert_weights(layer: EPMoE):
    """Every expert's weights for the oracle: gathered from their owners (small layers)."""
    mine = (list(layer.local_experts), layer.w13.detach().cpu(), layer.w2.detach().cpu())
    table = {}
    for experts, w13, w2 in _gather(mine, layer.dispatcher.world_size):
        for j, g in enumerate(experts):
            table[g] = (w13[j], w2[j])
    return lambda g: table[g]


@torch.no_grad()
def diagnose(layer: EPMoE, hidden_states: torch.Tensor, *, expert_weights=None,
             dump: str | None = None) -> Report:
    """Run ``layer`` on ``hidden_states`` ([T, H] or [B, S, H]) and judge every stage.

    Every rank of the layer's group must call this (the pipeline and the references gather).
    ``expert_weights(g) -> (w13 [2I, H], w2 [H, I])`` gives the oracle every expert (default:
    gathered from the ranks). ``dump`` writes the stage tensors to ``dump`` (one safetensors
    file per rank: ``name.rank{r}.safetensors``) for offline comparison.
    """
    was_validate = layer.validate
    layer.validate = False  # diagnose looks at what a non-validating framework would do
    try:
        with faults.recording(layer) as record:
            record.out = layer(hidden_states)
    finally:
        layer.validate = was_validate
    x_TH = hidden_states.reshape(-1, layer.hidden_size)
    ew = expert_weights or _default_expert_weights(layer)
    checker = _Checker(layer, x_TH, hidden_states, record, ew)
    tol = TOLERANCE[x_TH.dtype]
    results, preds = [], {}
    for stage in STAGES:
        err = getattr(checker, stage)()
        preds[stage] = {f.name: checker.predicted_err(f) for f in FAULTS.values()
                        if f.stage == stage}
        results.append(StageResult(stage, err, err <= tol))
    # A bug belongs to the pipeline, not to one rank: decide together. The first wrong stage is
    # the earliest that diverges on any rank; each candidate is judged by its worst error over
    # the ranks where that stage diverges (one rank alone can be ambiguous).
    everyone = _gather(([r.ok for r in results], preds), layer.dispatcher.world_size)
    bad = [i for i in range(len(STAGES)) if not all(oks[i] for oks, _ in everyone)]
    first_bad = STAGES[bad[0]] if bad else None
    candidates, diagnosis = {}, None
    if first_bad is not None:
        i = STAGES.index(first_bad)
        judged = [p[first_bad] for oks, p in everyone if not oks[i]]
        candidates = {bug: max(p[bug] for p in judged) for bug in judged[0]}
        bug, err = min(candidates.items(), key=lambda kv: kv[1], default=(None, float("inf")))
        if bug is not None and err <= max(5 * tol, 1e-4):
            f = FAULTS[bug]
            diagnosis = Diagnosis(bug, f.stage, f.signature, f.fix, err)
    if dump:
        _dump(dump, layer.dispatcher.rank, record.tensors())
    return Report(rank=layer.dispatcher.rank, world_size=layer.dispatcher.world_size,
                  dtype=str(x_TH.dtype), tolerance=tol, stages=results, first_bad=first_bad,
                  diagnosis=diagnosis, candidates=candidates)


def _dump(path: str, rank: int, tensors: dict) -> str:
    from safetensors.torch import save_file

    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    out = f"{stem}.rank{rank}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out)
    return out
