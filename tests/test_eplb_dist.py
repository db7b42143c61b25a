"""EPLB (issue 29) on spawned gloo ranks, W = 2, 3, 4: outputs with replicas (R = 0, 1, E/2)
against the float64 oracle and the plain layer (invariant mode: its bits), a rebalance mid-run
(from the group's measured load with eplb_balance's algorithm, then a permutation that moves
most experts between ranks) that changes no output beyond rounding and moves the right
weights, refusals of a bad or differing table on every rank, and a rank that fails in the
weight move: named by its peers, and no rank keeps half a placement.

One launch per W runs every check (spawning ranks takes seconds); each check is its own test
through the results. The failing-rank launches use a 3 s collective timeout (a survivor waits
twice that for a rank that reports nothing). Each rank reports its end state of the move
before it waits for the others' (``eplb._Outcomes``): with peers.failure's records alone, a
healthy rank blocked in the agreement on a live peer reported only after its own timeout, and
a survivor that failed fast then named it too (seen twice at W = 3 on 2 cores at load 15)."""

from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig, dense_moe_reference
from rocm_moe import synthetic as syn
from rocm_moe.comm.base import PeerRefusal
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import RankFailed, launch
from tests.conftest import TOL, rel_err

K, H, I, SEED = 3, 16, 8, 7
CASES = ((12, 0), (11, 1), (8, 4))  # (E, R) for R = 0, 1, E/2: P = 12, divisible by W = 2, 3, 4
TOKENS = (33, 1, 0, 9)  # per rank: odd, one, none
TIMEOUT = datetime.timedelta(seconds=30)


def _layer(E: int, R: int | None, W: int, *, mode="experts", invariant=False,
           timeout=TIMEOUT) -> EPMoE:
    P = E + (R or 0)
    disp = TorchDispatcher(Placement.contiguous(P, W), hidden_size=H, top_k=K,
                           dtype=torch.float32, timeout=timeout)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=disp, weight_mode=mode, invariant=invariant,
                  num_redundant_experts=R)
    layer.reset_parameters(seed=SEED)
    return layer


def _plain(E: int, *, mode="experts", invariant=False) -> EPMoE:
    """The unreplicated layer on one rank (every expert local): the reference of every rank's
    tokens."""
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  weight_mode=mode, invariant=invariant)
    layer.reset_parameters(seed=SEED)
    return layer


def _x(rank: int) -> torch.Tensor:
    return syn.tokens(SEED, rank, TOKENS[rank], H) * 3


def _oracle(layer: EPMoE, x: torch.Tensor, forced=None) -> torch.Tensor:
    r = layer.route_tokens(x, forced_expert_ids=forced)
    return dense_moe_reference(x.double(), r.topk_weights, r.topk_ids,
                               expert_weights=lambda g: syn.expert_weights(SEED, g, H, I))[0]


def _hot(E: int, T: int) -> torch.Tensor:
    """Every token on the same K experts (0 and 1 have replicas in the initial placement
    wherever it has any)."""
    return torch.tensor([0, 1, E - 1]).repeat(T, 1)


def _weights_ok(layer: EPMoE) -> bool:
    """Every local row holds the synthetic weights of the logical expert it should."""
    E = layer.router.num_experts
    for j, g in enumerate(layer.local_experts):
        assert 0 <= g < E
        w13, w2 = syn.expert_weights(SEED, g, H, I)
        if not (torch.equal(layer.w13[j], w13.float()) and torch.equal(layer.w2[j], w2.float())):
            return False
    return True


# ---- checks run on every rank -----------------------------------------------------------------
def _check_outputs(info) -> dict:
    """rel errors against the oracle and the plain layer, per (E, R, mode, routing)."""
    W, rank = info.world_size, info.rank
    x = _x(rank)
    out = {}
    for E, R in CASES:
        for mode in ("experts", "combine"):
            layer, plain = _layer(E, R, W, mode=mode), _plain(E, mode=mode)
            for name, forced in (("router", None), ("hot", _hot(E, x.shape[0]))):
                y = layer(x, forced_expert_ids=forced)
                out[f"E{E}_R{R}_{mode}_{name}"] = (
                    rel_err(y, _oracle(plain, x, forced)),
                    rel_err(y, plain(x, forced_expert_ids=forced)))
    return out


def _check_invariant_bits(info) -> dict:
    """Invariant mode: the bits of the plain one-rank layer, whichever replica served."""
    W, rank = info.world_size, info.rank
    x = _x(rank)
    out = {}
    for E, R in CASES:
        layer, plain = _layer(E, R, W, invariant=True), _plain(E, invariant=True)
        for name, forced in (("router", None), ("hot", _hot(E, x.shape[0]))):
            out[f"E{E}_R{R}_{name}"] = bool(torch.equal(layer(x, forced_expert_ids=forced),
                                                        plain(x, forced_expert_ids=forced)))
    return out


def _check_rebalance_mid_run(info) -> dict:
    """Forward, rebalance from the group's load (``layer.rebalance()``: eplb_balance's
    algorithm on every rank), forward, rebalance to a permutation of that table that moves most
    experts to another rank, forward: the outputs agree (bits in invariant mode), every rank
    holds the same new placement and the right weights."""
    W, rank = info.world_size, info.rank
    E, R = 8, 4
    x = _x(rank)
    out = {}
    for invariant in (False, True):
        layer = _layer(E, R, W, invariant=invariant)
        y0 = layer(x, forced_expert_ids=_hot(E, x.shape[0]))
        y1 = layer(x)
        load = layer.expert_load(scope="group")
        out[f"inv{invariant}_load_total"] = int(load.logical.sum())
        out[f"inv{invariant}_rank_total"] = int(load.per_rank.sum())
        out[f"inv{invariant}_steps"] = load.steps
        perm = torch.randperm(E + R, generator=torch.Generator().manual_seed(2))
        for step, per_round in enumerate((1, 5)):
            if step == 0:
                res = layer.rebalance(experts_per_round=per_round)  # from the measured load
                table = layer.replicas.phys_to_log
            else:
                table = table[perm].roll((E + R) // W)  # most experts change rank
                res = layer.rebalance(table, experts_per_round=per_round)
            after = layer.expert_load(scope="rank")
            everyone: list = [None] * W
            torch.distributed.all_gather_object(everyone, layer.replicas.phys_to_log.tolist())
            out[f"inv{invariant}_step{step}"] = dict(
                same_everywhere=all(e == table.tolist() for e in everyone),
                weights_ok=_weights_ok(layer), moved=res.moved,
                err0=rel_err(layer(x, forced_expert_ids=_hot(E, x.shape[0])), y0),
                err1=rel_err(layer(x), y1),
                bits=bool(torch.equal(layer(x), y1)),
                physical_restarted=int(after.physical.sum()) == 0,
                logical_kept=int(after.logical.sum()) == (2 + 3 * step) * x.shape[0] * K)
    return out


def _check_refusals(info) -> dict:
    """A bad table on the last rank: it raises its own error, the others PeerRefusal; tables
    that differ: every rank raises; the placement stays and the group stays in step."""
    W, rank = info.world_size, info.rank
    E, R = 8, 4
    layer = _layer(E, R, W)
    x = _x(rank)
    y = layer(x)
    before = layer.replicas
    seen = {}
    good = torch.arange(E + R) % E
    for case, table in (("bad_on_last", torch.arange(E + R) % (E - 1) if rank == W - 1
                         else good),
                        ("differ", good.flip(0) if rank == 0 else good),
                        ("num_nodes_on_last", None), ("experts_per_round_on_last", good)):
        kw = {"num_nodes_on_last": dict(num_nodes=W + 1), "experts_per_round_on_last": dict(
            experts_per_round=0)}.get(case, {}) if rank == W - 1 else {}
        try:
            layer.rebalance(table, **kw)
            seen[case] = None
        except (ValueError, TypeError) as exc:
            seen[case] = (type(exc).__name__, isinstance(exc, PeerRefusal), str(exc))
    seen["placement_kept"] = layer.replicas is before
    seen["still_in_step"] = bool(torch.equal(layer(x), y))
    return seen


def _check_fp8_move(info) -> dict:
    """An FP8 layer: its FP8 weights and block scales travel (as bytes) in the move."""
    from rocm_moe.layer_fp8 import FP8EPMoE

    W, rank = info.world_size, info.rank
    E, R, Hq = 8, 4, 128
    disp = TorchDispatcher(Placement.contiguous(E + R, W), hidden_size=Hq, top_k=K,
                           dtype=torch.float32, timeout=TIMEOUT)
    kw = dict(hidden_size=Hq, intermediate_size=128, router=RouterConfig.qwen3_moe(E, K))
    layer = FP8EPMoE(dispatcher=disp, num_redundant_experts=R, **kw)
    plain = FP8EPMoE(**kw)
    x = syn.tokens(SEED, rank, 5, Hq)
    err0 = rel_err(layer(x), plain(x))
    table = layer.replicas.phys_to_log.roll((E + R) // W)
    res = layer.rebalance(table)
    same_bytes = all(
        torch.equal(layer.w13_fp8[j].view(torch.uint8), plain.w13_fp8[g].view(torch.uint8))
        and torch.equal(layer.w2_fp8[j].view(torch.uint8), plain.w2_fp8[g].view(torch.uint8))
        and torch.equal(layer.w13_scale_inv[j], plain.w13_scale_inv[g])
        and torch.equal(layer.w2_scale_inv[j], plain.w2_scale_inv[g])
        for j, g in enumerate(layer.local_experts))
    return dict(err0=err0, err1=rel_err(layer(x), plain(x)), same_bytes=same_bytes,
                moved=res.moved)


CHECKS = {n[len("_check_"):]: f for n, f in dict(globals()).items() if n.startswith("_check_")}


def _worker(info) -> dict:
    import traceback

    out = {}
    for name, fn in CHECKS.items():
        try:
            out[name] = {"ok": True, "value": fn(info)}
        except Exception:
            out[name] = {"ok": False, "value": traceback.format_exc()}
    return out


@functools.cache
def _results(W: int) -> list[dict]:
    return launch(W, _worker, backend="gloo", timeout_s=60)


WS = [2, 3, 4]


def _values(W: int, check: str) -> list:
    res = _results(W)
    for r, rank in enumerate(res):
        assert rank[check]["ok"], f"rank {r}:\n{rank[check]['value']}"
    return [rank[check]["value"] for rank in res]


@pytest.mark.parametrize("W", WS)
def test_outputs_match_oracle_and_plain_layer(W):
    for rank, errs in enumerate(_values(W, "outputs")):
        assert len(errs) == len(CASES) * 4
        for case, (vs_oracle, vs_plain) in errs.items():
            assert vs_oracle < TOL[torch.float32], (rank, case, vs_oracle)
            assert vs_plain < TOL[torch.float32], (rank, case, vs_plain)


@pytest.mark.parametrize("W", WS)
def test_invariant_bits_do_not_depend_on_the_replica(W):
    for rank, bits in enumerate(_values(W, "invariant_bits")):
        assert len(bits) == 2 * len(CASES)
        assert all(bits.values()), (rank, bits)


@pytest.mark.parametrize("W", WS)
def test_rebalance_mid_run_changes_no_output(W):
    values = _values(W, "rebalance_mid_run")
    total = sum(TOKENS[:W]) * K
    for rank, v in enumerate(values):
        for inv in (False, True):
            assert v[f"inv{inv}_load_total"] == 2 * total  # two forwards of the whole group
            assert v[f"inv{inv}_rank_total"] == 2 * total
            assert v[f"inv{inv}_steps"] == 2
            for step in (0, 1):
                s = v[f"inv{inv}_step{step}"]
                assert s["same_everywhere"], (rank, inv, step)
                assert s["weights_ok"], (rank, inv, step)
                assert s["err0"] < TOL[torch.float32], (rank, inv, step, s)
                assert s["err1"] < TOL[torch.float32], (rank, inv, step, s)
                assert s["physical_restarted"], (rank, inv, step, s)
                assert s["logical_kept"], (rank, inv, step, s)
                if inv:
                    assert s["bits"], (rank, step)
        assert v["invFalse_step1"]["moved"] > 0  # the permutation moved experts across ranks


@pytest.mark.parametrize("W", WS)
def test_bad_or_differing_tables_are_refused_on_every_rank(W):
    for rank, seen in enumerate(_values(W, "refusals")):
        kind, peer, msg = seen["bad_on_last"]
        if rank == W - 1:
            assert (kind, peer) == ("ValueError", False)
            assert "have no replica" in msg
        else:
            assert peer, msg
            assert f"rank(s) [{W - 1}] refused" in msg
        kind, peer, msg = seen["num_nodes_on_last"]  # (checked after the load all-reduce: the
        if rank == W - 1:                              # peers waited in the table exchange)
            assert (kind, peer) == ("ValueError", False)
            assert f"num_nodes={W + 1}: must divide the EP size {W}" in msg
        else:
            assert peer, msg
            assert f"rank(s) [{W - 1}] refused" in msg
        kind, peer, msg = seen["experts_per_round_on_last"]  # (was raised on that rank alone:
        if rank == W - 1:                                      # its peers timed out)
            assert (kind, peer) == ("ValueError", False)
            assert "experts_per_round=0: must be >= 1" in msg
        else:
            assert peer, msg
            assert f"rank(s) [{W - 1}] refused" in msg
        kind, peer, msg = seen["differ"]
        assert (kind, peer) == ("ValueError", False)
        assert "phys_to_log by rank" in msg
        assert "Fix:" in msg
        assert seen["placement_kept"]
        assert seen["still_in_step"]


@pytest.mark.parametrize("W", WS)
def test_fp8_weights_and_scales_move(W):
    for rank, v in enumerate(_values(W, "fp8_move")):
        assert v["same_bytes"], (rank, v)
        assert v["moved"] > 0
        assert v["err0"] < TOL[torch.float32], (rank, v)  # the same FP8 experts, summed
        assert v["err1"] < TOL[torch.float32], (rank, v)  # in another order at most


# ---- a rank failing in the weight move ----------------------------------------------------------
def _fail_worker(info, how: str, out: str) -> int:
    """The last rank fails in the second round of the move (after a first expert moved)."""
    from rocm_moe import eplb

    W, rank = info.world_size, info.rank
    failing = W - 1
    E, R = 8, 4
    layer = _layer(E, R, W, timeout=datetime.timedelta(seconds=3))
    x = _x(rank)
    layer(x)
    w13 = layer.w13.detach().clone()
    before = layer.replicas
    table = (torch.arange(E + R) % E).roll(E + R // 2)  # every expert moves
    if rank == failing:
        rounds = [0]
        original = eplb._round_ops

        def failing_round(*args):
            rounds[0] += 1
            if rounds[0] == 2:
                if how == "exit":
                    _write(out, rank, dict(exited=True, placement_kept=layer.replicas is before,
                                           weights_kept=bool(torch.equal(layer.w13, w13))))
                    os._exit(3)
                raise RuntimeError("staging copy failed (injected)")
            return original(*args)

        eplb._round_ops = failing_round
    torch.distributed.barrier()
    seen = {}
    try:
        layer.rebalance(table, experts_per_round=1)
        seen["error"] = None
    except Exception as exc:
        seen["error"] = dict(type=type(exc).__name__, msg=str(exc),
                             stage=getattr(exc, "stage", None),
                             culprits=list(getattr(exc, "culprits", ())))
    seen["placement_kept"] = layer.replicas is before
    seen["weights_kept"] = bool(torch.equal(layer.w13, w13))
    try:
        layer(x)
        seen["next_forward"] = None
    except Exception as exc:
        seen["next_forward"] = type(exc).__name__
    _write(out, rank, seen)
    if seen["error"] is not None and rank == failing:
        raise RuntimeError("staging copy failed (injected)")
    return rank


def _write(out: str, rank: int, seen: dict) -> None:
    Path(out, f"{rank}.json").write_text(json.dumps(seen))


@pytest.mark.parametrize(("W", "how"), [
    (2, "raise"), (2, "exit"),
    # a second survivor, which must name the same rank
    pytest.param(3, "exit", marks=pytest.mark.slow)])
def test_rank_failing_in_the_move_is_named_and_no_rank_swaps(W, how, tmp_path):
    err = None
    try:
        launch(W, _fail_worker, how, str(tmp_path), backend="gloo", timeout_s=30, grace_s=25)
    except (RankFailed, ValueError) as exc:
        err = exc
    seen = {int(p.stem): json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    f = W - 1
    assert isinstance(err, RankFailed), err
    assert err.rank == f, err
    assert sorted(seen) == list(range(W)), seen
    for r in range(W):
        assert seen[r]["placement_kept"], (r, seen[r])
        assert seen[r]["weights_kept"], (r, seen[r])
    if how == "raise":
        assert seen[f]["error"]["type"] == "RuntimeError"
        assert "staging copy failed" in seen[f]["error"]["msg"]
    for r in range(f):
        e = seen[r]["error"]
        assert e["type"] == "PeerFailure", e
        assert e["culprits"] == [f], e
        assert e["stage"].startswith("rebalance"), e
        assert f"rank {f}" in e["msg"], e
        assert "Fix:" in e["msg"]
        assert seen[r]["next_forward"] == "PeerFailure"  # the group is marked broken
