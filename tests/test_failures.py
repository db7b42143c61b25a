"""Fault injection on spawned ranks (gloo): a rank that raises before dispatch, raises between
dispatch and combine, catches its experts' error and carries on, stalls, or exits. Every other
rank must raise an error naming the failing rank and the stage (``PeerFailure``), never gloo's
bare "Connection closed by peer", a hang or NaN rows; ``launch`` must name the failing rank.

Timeouts are short (the dispatcher's 3 s, the launch's 30 s), so no case can hang CI. Each rank
writes what it saw to a file (a launch that fails returns no results). W = 2 runs every case;
W = 3 (a second survivor, which must name the same rank) is marked slow.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch

from rocm_moe import EPMoE, LocalDispatcher, Placement, RouterConfig
from rocm_moe import synthetic as syn
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import RankFailed, launch

E, K, H, I, T = 12, 2, 16, 8, 9  # E divisible by W = 2 and 3
TIMEOUT = datetime.timedelta(seconds=3)


class _Faulty:
    """The layer's experts, with a fault on one rank: raise, stall or exit when called."""

    def __init__(self, inner, fault: str | None):
        self.inner, self.fault = inner, fault

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if self.fault == "raise":
            raise RuntimeError("experts boom (injected)")
        if self.fault == "stall":
            time.sleep(8)  # alive, but past the peers' 3 s timeout
        if self.fault == "exit":
            os._exit(3)
        return self.inner(*args, **kwargs)


def _layer(W: int, rank: int, fault: str | None, device=None) -> EPMoE:
    disp = TorchDispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                           dtype=torch.float32, timeout=TIMEOUT, max_tokens_per_rank=T)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=disp, device=device)
    layer.reset_parameters()
    layer.experts = _Faulty(layer.experts, fault)
    return layer


def _seen(call) -> dict:
    """What ``call()`` did: its result's finiteness, or its error."""
    try:
        y = call()
    except Exception as exc:
        return dict(type=type(exc).__name__, msg=str(exc), stage=getattr(exc, "stage", None),
                    culprits=list(getattr(exc, "culprits", ())))
    return dict(type=None, finite=bool(torch.isfinite(y).all()))


def _worker(info, case: str, out: str):
    W, rank = info.world_size, info.rank
    failing = W - 1
    mine = rank == failing
    fault = {"raise_in_experts": "raise", "carry_on": "raise", "stall": "stall",
             "exit": "exit"}.get(case) if mine else None
    layer = _layer(W, rank, None, info.device)
    x = syn.tokens(0, rank, T, H).float().to(info.device)
    layer(x)  # a healthy batch first, then all ranks start the faulty one together: a loaded
    torch.distributed.barrier()  # machine must not make a healthy rank look stalled
    layer.experts.fault = fault
    seen = {}
    if case == "raise_before_dispatch" and mine:
        raise RuntimeError("boom before dispatch (injected)")
    if case == "refusals":  # bad input on the failing rank only; the group stays in step
        seen["forced"] = _seen(lambda: layer(x, forced_expert_ids=torch.full(
            (T, K), E if mine else 0, device=x.device) + torch.arange(K, device=x.device)))
        nan = x.clone()
        nan[3, 5] = float("nan")
        seen["nan"] = _seen(lambda: layer(nan if mine else x))
        layer.experts.fault = "raise"  # on every rank: they all leave the batch, still in step
        seen["all_raise"] = _seen(lambda: layer(x))
        layer.experts.fault = None
        x = torch.cat([x, x]) if mine else x  # over max_tokens_per_rank on this rank only: chunks
    if case == "carry_on" and mine:
        seen["first"] = _seen(lambda: layer(x))
        layer.experts.fault = None  # "recovered": the rank goes on with the next batch
        seen["second"] = _seen(lambda: layer(x))
    else:
        seen["first"] = _seen(lambda: layer(x))
    if case == "refusals":
        seen["next"] = _seen(lambda: layer(x[:T]))  # the group is still in step
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    if case == "raise_in_experts" and mine:
        raise RuntimeError("experts boom (injected)")
    return rank


def _run(W: int, case: str, tmp_path, backend="gloo") -> tuple[Exception | None, dict]:
    err = None
    try:
        launch(W, _worker, case, str(tmp_path), backend=backend, timeout_s=30, grace_s=8)
    except (RankFailed, ValueError) as exc:
        err = exc
    seen = {int(p.stem): json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    return err, seen


def _names(seen: dict, failing: int, stage: str, phrase: str) -> None:
    assert seen["type"] == "PeerFailure", seen
    assert seen["culprits"] == [failing], seen
    assert seen["stage"] == stage, seen
    assert phrase in seen["msg"], seen["msg"]
    assert "Fix:" in seen["msg"]


WS = [2, pytest.param(3, marks=pytest.mark.slow)]


@pytest.mark.parametrize("W", WS)
def test_rank_raising_before_dispatch_is_named(W, tmp_path):
    err, seen = _run(W, "raise_before_dispatch", tmp_path)
    f = W - 1
    assert isinstance(err, RankFailed), err
    assert err.rank == f, err
    assert "boom before dispatch" in str(err)
    for r in range(f):
        # The first collective of a forward on a dispatcher with a capacity is the chunk-count
        # agreement (EPMoE runs batches above max_tokens_per_rank in chunks).
        _names(seen[r]["first"], f, "dispatch (chunk count exchange)",
               f"rank {f} raised in its worker (RuntimeError: boom before dispatch")


@pytest.mark.parametrize("W", WS)
def test_rank_raising_between_dispatch_and_combine_is_named(W, tmp_path):
    err, seen = _run(W, "raise_in_experts", tmp_path)
    f = W - 1
    assert isinstance(err, RankFailed), err
    assert err.rank == f, err
    for r in range(f):
        _names(seen[r]["first"], f, "combine", f"rank {f} left experts of batch")
        assert "experts boom" in seen[r]["first"]["msg"]


@pytest.mark.parametrize("W", WS)
def test_rank_carrying_on_after_its_experts_raised(W, tmp_path):
    """The peers do not return NaN rows: they fail naming the rank; the rank's next batch is
    refused before any collective (it would pair with its peers' combine)."""
    err, seen = _run(W, "carry_on", tmp_path)
    f = W - 1
    assert err is None, err
    assert seen[f]["first"]["type"] == "RuntimeError"
    assert seen[f]["second"]["type"] == "PeerFailure"
    assert "the EP group is unusable on this rank" in seen[f]["second"]["msg"]
    assert "do not catch the error and carry on" in seen[f]["second"]["msg"]
    for r in range(f):
        _names(seen[r]["first"], f, "combine", f"rank {f} left experts of batch")


@pytest.mark.parametrize("W", WS)
def test_stalled_rank_is_named_after_the_timeout(W, tmp_path):
    t0 = time.monotonic()
    err, seen = _run(W, "stall", tmp_path)
    f = W - 1
    assert err is None, err
    assert time.monotonic() - t0 < 60
    for r in range(f):
        _names(seen[r]["first"], f, "combine", f"rank(s) [{f}] left no record within 3 s")
        assert "Timed out" in seen[r]["first"]["msg"]
    late = seen[f]["first"]
    assert late["type"] == "PeerFailure", late
    assert "this rank is likely the late one" in late["msg"]


@pytest.mark.parametrize("W", WS)
def test_rank_exiting_mid_forward_is_named(W, tmp_path):
    err, seen = _run(W, "exit", tmp_path)
    f = W - 1
    assert isinstance(err, RankFailed), err
    assert err.rank == f, err
    assert f"rank {f} failed: exited with code 3 before reporting" in str(err)
    for r in range(f):
        _names(seen[r]["first"], f, "combine", f"rank(s) [{f}] left no record")


@pytest.mark.parametrize("W", WS)
def test_bad_input_on_one_rank_is_refused_on_every_rank(W, tmp_path):
    """Forced ids >= E or a NaN token on the last rank only: it raises its own error, every
    other rank PeerRefusal naming it, and the next batch runs. A batch over capacity on the last
    rank only runs in chunks (the others join with empty ones). Experts raising on every rank
    (all leave the batch): the group stays usable too."""
    err, seen = _run(W, "refusals", tmp_path)
    f = W - 1
    assert err is None, err
    own = {"forced": "forced_expert_ids=contains 13", "nan": "hidden_states=contains nan"}
    for r in range(W):
        for key, match in own.items():
            got = seen[r][key]
            if r == f:
                assert got["type"] in ("ValueError", "TypeError"), got
                assert match in got["msg"], got
                assert "Fix:" in got["msg"]
            else:
                assert got["type"] == "PeerRefusal", got
                assert f"rank(s) [{f}] of the EP group refused" in got["msg"], got
        assert seen[r]["first"] == dict(type=None, finite=True), seen[r]  # 2 chunks of 9
        assert seen[r]["all_raise"]["type"] == "RuntimeError", seen[r]
        assert seen[r]["next"] == dict(type=None, finite=True), seen[r]


def test_one_rank_experts_error_propagates_and_the_layer_goes_on():
    """W = 1: no peers, nothing to name; the error is the experts' own and the next batch
    runs."""
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=LocalDispatcher(Placement.contiguous(E, 1)))
    layer.experts = _Faulty(layer.experts, "raise")
    x = syn.tokens(0, 0, T, H).float()
    with pytest.raises(RuntimeError, match="experts boom"):
        layer(x)
    layer.experts.fault = None
    assert torch.isfinite(layer(x)).all()


_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_GPUS < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("case", ["raise_before_dispatch", "raise_in_experts", "carry_on",
                                  "stall", "exit"])
def test_nccl_failing_rank_is_named_and_no_rank_returns_garbage(case, tmp_path):
    """NCCL: the same faults. NCCL's collectives are asynchronous: a survivor's failure
    surfaces at its next synchronisation or through NCCL's watchdog after the 3 s timeout
    (by default it tears the process down), so the survivor raises (PeerFailure where the
    failure surfaces inside a dispatcher's collective) or is torn down; none returns rows, and
    the launcher names rank 1."""
    err, seen = _run(2, case, tmp_path, backend="nccl")
    if case in ("raise_before_dispatch", "raise_in_experts", "exit"):
        assert isinstance(err, RankFailed), err
        assert err.rank == 1, err
    if 0 in seen:
        assert seen[0]["first"]["type"] is not None, seen[0]  # raised, never returned rows
        if seen[0]["first"]["type"] == "PeerFailure":
            assert seen[0]["first"]["culprits"] == [1], seen[0]
