"""Bugs written into the real code path (monkeypatched functions, not the fault hook): diagnose
names the first wrong stage (and the class where one exists) at W = 1 and 2 and never reports
clean while the output is wrong; sanity catches the routing and shared-expert bugs; the
references are not the functions they check."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import pytest
import torch

from rocm_moe import EPMoE, RouterConfig, oracle, routing
from rocm_moe import synthetic as syn
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.diagnose import diagnose
from rocm_moe.distributed import launch
from rocm_moe.experts import reference as reference_experts
from rocm_moe.faults import STAGES, int64_read_as_int32, int64_read_flat_as_int32
from rocm_moe.layer import SharedExperts
from rocm_moe.placement import Placement
from rocm_moe.sanity import TOLERANCE, rel_err, run_sanity

E, K, H, I, IS = 16, 4, 32, 16, 24


# ---- the bugs ---------------------------------------------------------------------------------
def _softmax_wrong_dim(mp):
    mp.setattr(routing, "_scores", lambda logits, config: logits.float().softmax(dim=0))


def _norm_ignored(mp):
    real = routing._finish_weights
    mp.setattr(routing, "_finish_weights",
               lambda w, config: real(w, replace(config, norm_topk_prob=False)))


def _bias_in_weights(mp):
    from rocm_moe import layer as layer_module

    real = routing.route

    def leaky(logits, config, *, e_score_correction_bias=None, **kw):
        out = real(logits, config, e_score_correction_bias=e_score_correction_bias, **kw)
        logits = logits.reshape(-1, logits.shape[-1])  # the layer may pass [B, S, E]
        s = logits.float().sigmoid() + e_score_correction_bias.float()
        w = s.gather(1, out.topk_ids.long())
        w = w / w.sum(-1, keepdim=True) * config.routed_scaling_factor
        return replace(out, topk_weights=w.contiguous())

    mp.setattr(layer_module, "route", leaky)


def _layout_off_by_one(mp):
    real = reference_experts.build_layout

    def short(*args, **kw):
        layout = real(*args, **kw)
        return replace(layout, tokens_per_expert=(layout.tokens_per_expert - 1).clamp(min=0))

    mp.setattr(reference_experts, "build_layout", short)


def _owners_elsewhere(mp):
    """Owners computed as the reverse of where the weights live (a different placement rule)."""
    real = Placement.owner_E.func
    mp.setattr(Placement, "owner_E", property(lambda self: self.world_size - 1 - real(self)))


def _ids_read(read):
    def plant(mp):
        from rocm_moe.comm.base import Dispatcher

        real = Dispatcher.check_dispatch_inputs

        def reads(self, x, w, ids, *, validate=True):
            real(self, x, w, ids, validate=validate)
            return read(ids.long())

        mp.setattr(Dispatcher, "check_dispatch_inputs", reads)
    return plant


def _shared_twice(mp):
    real = SharedExperts.forward
    mp.setattr(SharedExperts, "forward", lambda self, x: 2 * real(self, x))


def _combine_raw_slots_swapped(mp):
    for cls in (LocalDispatcher, TorchDispatcher):
        real = cls._combine_raw
        mp.setattr(cls, "_combine_raw", lambda self, raw, h, real=real: real(self, raw, h)
                   .roll(1, dims=1))


@dataclass(frozen=True)
class Bug:
    plant: object
    stage: str | None  # the first wrong stage diagnose must name (None: no symptom)
    fault: str | None = None  # the bug class it must name, where one exists
    router: str = "qwen3"
    shared: bool = False
    stage_w1: str | None = "same"  # at W = 1, where it differs


BUGS = {
    "softmax_wrong_dim": Bug(_softmax_wrong_dim, "route"),
    "norm_topk_prob_ignored": Bug(_norm_ignored, "route"),
    "bias_in_weights": Bug(_bias_in_weights, "route", router="deepseek_v3"),
    "layout_off_by_one": Bug(_layout_off_by_one, "experts"),
    "owners_elsewhere": Bug(_owners_elsewhere, "dispatch", stage_w1=None),
    "int64_read_per_row": Bug(_ids_read(int64_read_as_int32), "dispatch", "int64_as_int32"),
    "int64_read_flat": Bug(_ids_read(int64_read_flat_as_int32), "dispatch", "int64_as_int32"),
    "shared_twice": Bug(_shared_twice, "shared", shared=True),
    "combine_raw_slots": Bug(_combine_raw_slots_swapped, "combine_raw"),
}


def _router(name: str) -> RouterConfig:
    if name == "deepseek_v3":
        return RouterConfig.deepseek_v3(E, K, n_group=4, topk_group=2)
    return RouterConfig.qwen3_moe(E, K)


def _layer(bug: Bug, world_size: int, weight_mode: str) -> EPMoE:
    disp = None
    if world_size > 1:
        disp = TorchDispatcher(Placement.contiguous(E, world_size), hidden_size=H, top_k=K,
                               dtype=torch.float32)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=_router(bug.router),
                  dispatcher=disp, weight_mode=weight_mode,
                  shared_intermediate_size=IS if bug.shared else None)
    layer.reset_parameters(seed=5)
    if layer.e_score_correction_bias is not None:
        g = torch.Generator().manual_seed(11)
        layer.e_score_correction_bias.copy_(0.1 * torch.randn(E, generator=g))
    return layer


def _verdicts(world_size: int, rank: int, seed: int) -> dict:
    """Every bug in both weight modes: (first_bad, bug named, output wrong?)."""
    out = {}
    x = syn.tokens(seed, rank, 18, H).reshape(2, 9, H)
    for name, bug in BUGS.items():
        for mode in ("experts", "combine"):
            layer = _layer(bug, world_size, mode)
            clean = layer(x)  # the same code without the bug: the truth
            with pytest.MonkeyPatch.context() as mp:
                bug.plant(mp)
                layer = _layer(bug, world_size, mode)  # built under the bug (placement too)
                wrong = rel_err(layer(x), clean) > TOLERANCE[torch.float32]
                report = diagnose(layer, x)
            out[f"{name}/{mode}"] = (report.first_bad,
                                     report.diagnosis.bug if report.diagnosis else None, wrong)
    return out


def _check(verdicts: dict, world_size: int) -> None:
    for key, (first_bad, named, wrong) in verdicts.items():
        bug = BUGS[key.split("/")[0]]
        stage = bug.stage if world_size > 1 or bug.stage_w1 == "same" else bug.stage_w1
        assert first_bad == stage, (key, world_size, first_bad, named)
        if bug.fault and stage is not None:
            assert named == bug.fault, (key, world_size, named)
        assert not (wrong and first_bad is None), (key, world_size, "clean but wrong")


def test_planted_bugs_one_rank():
    _check(_verdicts(1, 0, int(torch.randint(0, 10**6, (1,)))), 1)


def _worker(info, seed):
    """Both two-rank checks of this file on one launch (spawning costs more than either)."""
    return dict(verdicts=_verdicts(info.world_size, info.rank, seed),
                other_rank=_weights_of_the_other_rank(info))


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    seed = int(torch.randint(0, 10**6, (1,)))
    return launch(2, _worker, seed, backend="gloo", timeout_s=300)


def test_planted_bugs_two_ranks(two_ranks):
    for res in two_ranks:
        _check(res["verdicts"], 2)


# ---- sanity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["softmax_wrong_dim", "norm_topk_prob_ignored",
                                  "bias_in_weights", "shared_twice"])
def test_sanity_catches(name, monkeypatch):
    bug = BUGS[name]
    assert all(r.passed for r in run_sanity(_layer(bug, 1, "experts")))
    bug.plant(monkeypatch)
    rows = {r.check: r for r in run_sanity(_layer(bug, 1, "experts"))}
    check = "shared_experts" if bug.shared else "routing"
    assert not rows[check].passed, rows[check]


def test_sanity_bias_leak_shows_with_a_zero_bias_layer(monkeypatch):
    """sanity tries sigmoid routers with a random bias too: a bias leaking into the weights is
    invisible with the zero bias of a fresh layer."""
    _bias_in_weights(monkeypatch)
    layer = _layer(BUGS["bias_in_weights"], 1, "experts")
    layer.e_score_correction_bias.zero_()
    rows = {r.check: r for r in run_sanity(layer)}
    assert not rows["routing"].passed


# ---- the references are not the checked code ----------------------------------------------------
def _boom(*args, **kw):
    raise AssertionError("a reference called the code it checks")


@contextlib.contextmanager
def _checked_code_broken():
    """Every function the references stand in for raises while open."""
    from rocm_moe import weighting
    from rocm_moe.experts import base, layout

    with pytest.MonkeyPatch.context() as mp:
        for module, name in [(routing, "route"), (routing, "_scores"), (routing, "_choose"),
                         (routing, "_finish_weights"), (layout, "build_layout"),
                             (reference_experts, "build_layout"), (base, "swiglu_expert"),
                             (weighting, "weight_once"), (weighting, "_weighted_sum")]:
            mp.setattr(module, name, _boom)
        mp.setattr(Placement, "owner", _boom)
        mp.setattr(Placement, "owner_E", property(_boom))
        yield


@pytest.mark.parametrize("router", ["qwen3", "mixtral", "deepseek_v3"])
def test_references_do_not_call_the_checked_code(router):
    cfg = {"qwen3": RouterConfig.qwen3_moe(E, K, norm_topk_prob=False),
           "mixtral": RouterConfig.mixtral(E, K), "deepseek_v3": _router("deepseek_v3")}[router]
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=cfg, shared_intermediate_size=IS,
                  shared_expert_gate=True)
    layer.reset_parameters(seed=5)
    bias = layer.e_score_correction_bias
    if bias is not None:
        bias.copy_(0.1 * torch.randn(E, generator=torch.Generator().manual_seed(3)))
    x = syn.tokens(1, 0, 9, H)
    expected = routing.route(x @ layer.gate.weight.T, cfg, e_score_correction_bias=bias)
    with _checked_code_broken():
        ref = oracle.reference_route(x, layer.gate.weight, cfg, bias)
        raw = oracle.dense_experts(x, ref.topk_ids, range(E),
                                   lambda g: syn.expert_weights(5, g, H, I))
        y = oracle.weighted_sum(raw, ref.topk_weights) + oracle.dense_shared(
            layer.shared_experts, x)
    # ...and they agree with it where it is right.
    assert torch.equal(ref.topk_ids.int(), expected.topk_ids)
    assert rel_err(ref.topk_weights, expected.topk_weights) < 1e-6
    assert rel_err(layer(x), y) < 1e-5


def test_a_mutant_of_the_checked_code_leaves_the_references_unchanged(monkeypatch):
    """Mutation test: a reference that were the checked function would follow the mutant."""
    layer = _layer(BUGS["bias_in_weights"], 1, "experts")
    x = syn.tokens(2, 0, 9, H)
    before = oracle.reference_route(x, layer.gate.weight, layer.router,
                                    layer.e_score_correction_bias)
    raw_before = oracle.dense_experts(x, before.topk_ids, range(E),
                                      lambda g: syn.expert_weights(5, g, H, I))
    _softmax_wrong_dim(monkeypatch)
    _norm_ignored(monkeypatch)
    _layout_off_by_one(monkeypatch)
    from rocm_moe.experts import base

    monkeypatch.setattr(base, "swiglu_expert", lambda x, w13, w2: 0 * x)
    after = oracle.reference_route(x, layer.gate.weight, layer.router,
                                   layer.e_score_correction_bias)
    assert torch.equal(before.topk_ids, after.topk_ids)
    assert torch.equal(before.topk_weights, after.topk_weights)
    assert torch.equal(raw_before, oracle.dense_experts(x, after.topk_ids, range(E),
                                                        lambda g: syn.expert_weights(5, g, H, I)))


def test_oracle_worked_example():
    gate = torch.tensor([[0.0, 0.0], [0.0, 0.0], [float(torch.log(torch.tensor(2.0))), 0.0]])
    ref = oracle.reference_route(torch.tensor([[1.0, 0.0]]), gate,
                                 RouterConfig.qwen3_moe(3, 1, norm_topk_prob=False))
    assert ref.topk_ids.tolist() == [[2]]
    assert ref.topk_weights.item() == pytest.approx(0.5)


def _weights_of_the_other_rank(info):
    """Each rank loaded the other rank's experts: the placement's owners are not where the
    weights are. With the weights' source given, diagnose reads the held experts from the
    weights themselves and never reports clean; without it, it trusts the placement."""
    layer = _layer(BUGS["owners_elsewhere"], info.world_size, "experts")
    other = Placement.contiguous(E, info.world_size).local_experts(1 - info.rank)
    with torch.no_grad():
        for j, g in enumerate(other):
            w13, w2 = syn.expert_weights(5, g, H, I)
            layer.w13[j].copy_(w13)
            layer.w2[j].copy_(w2)
    x = syn.tokens(4, info.rank, 18, H).reshape(2, 9, H)
    given = diagnose(layer, x, expert_weights=lambda g: syn.expert_weights(5, g, H, I))
    gathered = diagnose(layer, x)
    return given.first_bad, gathered.first_bad, [s.shares for s in gathered.stages]


def test_weights_not_where_the_placement_says(two_ranks):
    for given, gathered, shares in (res["other_rank"] for res in two_ranks):
        # Tokens with experts on both ranks reach both either way: the rows received may be
        # right, and the slots computed with the wrong expert's weights show at experts.
        assert given in ("dispatch", "experts")
        # The gathered weights follow the placement's list: the output is still judged right
        # by the layer's own account, and the report says what that reference shares.
        assert gathered is None or gathered == "dispatch"
        assert "layer.local_experts" in shares[STAGES.index("dispatch")]
