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
would have produced; a prediction that matches names the bug (see ``BUGS``, and
``rocm_moe.faults`` to plant them). Some classes cannot show on one rank (combine given the
dispatched ids, other ranks' contributions missing, a second reduction): at W = 1 those bugs
leave the output correct, and diagnose reports the pipeline clean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from rocm_moe import faults
from rocm_moe.comm.base import weight_and_reduce
from rocm_moe.experts.reference import ReferenceExperts, dense_moe_reference
from rocm_moe.layer import EPMoE, Trace
from rocm_moe.routing import route
from rocm_moe.sanity import TOLERANCE, rel_err

BUGS = {  # name: (stage, what it looks like, fix)
    "per_sequence_routing": ("route", "every token of a sequence got the same experts",
                             "route each token: logits = hidden [T, H] @ gate.T, never pooled"),
    "int64_as_int32": ("dispatch", "received ids are [id0, 0, id1, 0, ...]: an int64 buffer "
                       "read as int32", "convert ids with .to(torch.int32), never reinterpret"),
    "capacity_overflow": ("dispatch", "tokens past the capacity arrive corrupted",
                          "raise max_num_inp_token_per_rank or split the batch (mori#356)"),
    "mask_as_map": ("experts", "the 0/1 expert_mask was used as the expert_map (local ids)",
                    "use ExpertMap for weight rows, ExpertMask only for AITER (vllm#49758)"),
    "map_as_mask": ("experts", "the expert_map (local id or -1) was passed as AITER's mask",
                    "build AITER's mask with ExpertMap.to_expert_mask (ROCm/ATOM#887)"),
    "weights_twice": ("weighting", "partials scale like w^2: weights applied twice",
                      "apply weights once: experts OR combine (ExpertsOutput.weights_applied)"),
    "weights_never": ("weighting", "partials are unweighted sums: weights never applied",
                      "weight raw outputs before MORI's combine, which only sums"),
    "dispatched_ids": ("combine", "output rows are the received rows' partials: combine was "
                       "given the dispatched ids", "pass the rank's own [T, K] ids (mori#475)"),
    "other_ranks_missing": ("combine", "only this rank's local experts are summed",
                            "combine must gather every owner's partial (vllm#37529)"),
    "second_reduction": ("combine", "output is W (or U) times the right one: reduced again "
                         "after combine", "drop the all-reduce after combine (sglang#34887)"),
    "scalar_collapse": ("combine", "each row is one number repeated: a [1, H] row read as a "
                        "scalar", "index the row (out[t] = y[0]), not its first element"),
}
STAGES = ("route", "dispatch", "experts", "weighting", "combine")


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
    """The references and bug predictions of one diagnose run on one rank."""

    def __init__(self, layer: EPMoE, x_TH, hidden_states, t: dict, expert_weights):
        self.layer, self.x, self.hidden, self.t = layer, x_TH, hidden_states, t
        self.disp = layer.dispatcher
        self.W, self.rank = self.disp.world_size, self.disp.rank
        self.emap = self.disp.expert_map_on(x_TH.device)
        self.expert_weights = expert_weights

    def _route_ref(self, hidden):
        L = self.layer
        return route(L.router_logits(hidden.reshape(-1, L.hidden_size)), L.router,
                     e_score_correction_bias=L.e_score_correction_bias)

    def _received(self):
        """The expert stage's inputs as the trace recorded them: (x, ids, weights, w13, w2)."""
        t = self.t
        return (t["dispatched_x"], t["dispatched_ids"].to(torch.int32), t["dispatched_weights"],
                self.layer.w13, self.layer.w2)

    def route(self):
        def err(r):
            a, b = self.t["topk_ids"].long().sort(1), r.topk_ids.long().sort(1)
            if not torch.equal(a.values, b.values):
                return float("inf")
            return rel_err(self.t["topk_weights"].gather(1, a.indices),
                           r.topk_weights.gather(1, b.indices))

        ref = self._route_ref(self.hidden)
        pooled = self._route_ref(faults.per_sequence_hidden(self.hidden))
        return err(ref), {"per_sequence_routing": err(pooled)}

    def dispatch(self):
        t = self.t
        mine = (self.x.cpu(), t["topk_weights"].cpu(), t["topk_ids"].cpu())
        sources = _gather(mine, self.W)
        observed = (t["dispatched_x"].cpu(), t["dispatched_ids"].cpu(),
                    t["dispatched_weights"].cpu())
        p = self.disp.placement

        def expected(transform):
            return _expected_recv([transform(*s) for s in sources], p, self.rank)

        ref = _rows_err(observed, expected(lambda x, w, i: (x, w, i)))
        return ref, {
            "int64_as_int32": _rows_err(observed, expected(
                lambda x, w, i: (x, w, faults.int64_read_as_int32(i)))),
            "capacity_overflow": _rows_err(observed, expected(
                lambda x, w, i: (faults.overflow_tokens(x), w, i))),
        }

    def experts(self):
        t = self.t
        mode = "weighted" if t["weights_applied"] else "raw"
        args = self._received()
        ref = ReferenceExperts()(*args, self.emap, mode=mode).out
        preds = {f: rel_err(t["expert_out"], faults.experts_with_map(
            *args, faults.confused_map(self.emap.map_E, f), weighted=mode == "weighted"))
            for f in ("mask_as_map", "map_as_mask")}
        return rel_err(t["expert_out"], ref), preds

    def weighting(self):
        t = self.t
        raw = ReferenceExperts()(*self._received(), self.emap, mode="raw").out
        local = self.emap.local_ids(t["dispatched_ids"]) >= 0
        w = t["dispatched_weights"]

        def once(weights):
            return weight_and_reduce(raw, weights, local)

        return rel_err(t["partials"], once(w)), {
            "weights_twice": rel_err(t["partials"], once(w * w)),
            "weights_never": rel_err(t["partials"], once(torch.ones_like(w))),
        }

    def combine(self):
        t = self.t
        ids, w = t["topk_ids"], t["topk_weights"]
        y_ref, raw_ref = dense_moe_reference(self.x, w, ids, expert_weights=self.expert_weights)
        obs = t["combined"]
        owner = self.disp.placement.owner(ids)
        local = (owner == self.rank) & (ids >= 0)
        only_local = (raw_ref * (w.double() * local)[..., None]).sum(1)
        U = torch.stack([owner[r][ids[r] >= 0].unique().numel() * torch.ones(())
                         for r in range(ids.shape[0])]) if ids.shape[0] else torch.zeros(0)
        partials = t["partials"].double()
        rows = torch.zeros_like(y_ref)
        n = min(rows.shape[0], partials.shape[0])
        rows[:n] = partials[:n]
        return rel_err(obs, y_ref), {
            "dispatched_ids": rel_err(obs, rows) if self.W > 1 else float("inf"),
            "other_ranks_missing": rel_err(obs, only_local) if self.W > 1 else float("inf"),
            "second_reduction": min(rel_err(obs, y_ref * self.W),
                                    rel_err(obs, y_ref * U.to(y_ref)[:, None]))
            if self.W > 1 else float("inf"),
            "scalar_collapse": rel_err(obs, y_ref[:, :1].expand_as(y_ref)),
        }


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
    trace = Trace(record_tensors=True)
    try:
        layer(hidden_states, trace=trace)
    finally:
        layer.validate = was_validate
    t = dict(trace.tensors, weights_applied=trace.expert_weights_applied)
    x_TH = hidden_states.reshape(-1, layer.hidden_size)
    ew = expert_weights or _default_expert_weights(layer)
    checker = _Checker(layer, x_TH, hidden_states, t, ew)
    tol = TOLERANCE[x_TH.dtype]
    results, preds = [], {}
    for stage in STAGES:
        err, preds[stage] = getattr(checker, stage)()
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
            stage, signature, fix = BUGS[bug]
            diagnosis = Diagnosis(bug, stage, signature, fix, err)
    if dump:
        _dump(dump, layer.dispatcher.rank, trace.tensors)
    return Report(rank=layer.dispatcher.rank, world_size=layer.dispatcher.world_size,
                  dtype=str(x_TH.dtype), tolerance=tol, stages=results, first_bad=first_bad,
                  diagnosis=diagnosis, candidates=candidates)


def _dump(path: str, rank: int, tensors: dict) -> str:
    from safetensors.torch import save_file

    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    out = f"{stem}.rank{rank}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out)
    return out
