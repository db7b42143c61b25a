"""The launcher's failure reports: the first rank's own error, never a peer's echo of it."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist

from rocm_moe import Placement
from rocm_moe.comm.torch import DEFAULT_TIMEOUT, TorchDispatcher
from rocm_moe.distributed import launch

E, H, K = 8, 8, 2


def _fail_on_rank_zero(info):
    """Rank 0 refuses before the collective the others then wait in (the checkpoint case)."""
    if info.rank == 0:
        raise ValueError("checkpoint=/x: is broken. Fix: download it again.")
    dist.all_reduce(torch.ones(1))  # rank 0 never joins: gloo fails with a bare peer error
    return "unreachable"


def test_first_ranks_real_error_is_reported():
    with pytest.raises(ValueError, match=r"^rank 0: checkpoint=/x: is broken. Fix: download"):
        launch(2, _fail_on_rank_zero, timeout_s=30)


def _timeouts(info):
    disp = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                           dtype=torch.float32)
    again = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                            dtype=torch.float32)
    return dict(own_group=disp.group is not dist.group.WORLD, shared=disp.group is again.group,
                threads=torch.get_num_threads())


def test_dispatchers_get_a_finite_default_timeout(monkeypatch):
    """(The same ranks report their intra-op threads: ROCM_MOE_THREADS_PER_RANK when set.)"""
    assert DEFAULT_TIMEOUT.total_seconds() == 300
    monkeypatch.setenv("ROCM_MOE_THREADS_PER_RANK", "3")
    for res in launch(2, _timeouts, timeout_s=30):
        assert res == dict(own_group=True, shared=True, threads=3)


@pytest.mark.parametrize("value", ["0", "two", "", "-1"])
def test_launch_refuses_a_bad_threads_per_rank_variable_before_spawning(monkeypatch, value):
    monkeypatch.setenv("ROCM_MOE_THREADS_PER_RANK", value)
    with pytest.raises(ValueError, match=r"^ROCM_MOE_THREADS_PER_RANK=.*integer >= 1.*Fix: unset"):
        launch(2, _refuse_everywhere)


def _refuse_everywhere(info):
    raise ValueError(f"rank {info.rank}'s input is bad. Fix: another input.")


def test_every_rank_refusing_at_once_reports_rank_zero():
    """Ranks that fail at once tore the group down while rank 0 was still connecting (its init
    failed with gloo's "connectFullMesh failed", about one launch in three at W = 3), so rank
    1's error was reported; the ranks now start together."""
    with pytest.raises(ValueError, match=r"^rank 0: rank 0's input is bad"):
        launch(3, _refuse_everywhere, timeout_s=30)


def test_launch_refuses_a_worker_that_does_not_pickle_before_spawning():
    """A lambda crashed inside multiprocessing's spawn (a pickling traceback); now a TypeError
    naming the field before any process starts."""
    with pytest.raises(TypeError, match=r"^worker=.*must pickle.*Fix: use a module-level"):
        launch(2, lambda info: info.rank)


def test_launch_refuses_nccl_on_a_host_without_a_gpu_per_rank(monkeypatch):
    """backend='nccl' on a CPU-only host died natively in the ranks; now a ValueError first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^backend='nccl': needs a GPU per rank.*Fix: pass"):
        launch(2, _refuse_everywhere, backend="nccl")
    with pytest.raises(ValueError, match=r"^backend='mpi': must be 'gloo' or 'nccl'"):
        launch(2, _refuse_everywhere, backend="mpi")


def test_torch_dispatcher_timeout_must_be_a_timedelta():
    """TorchDispatcher(timeout=4) crashed in dist.new_group; now a TypeError saying what to
    pass."""
    with pytest.raises(TypeError, match=r"^timeout=4: must be a datetime.timedelta.*Fix: pass "
                       r"datetime.timedelta"):
        TorchDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K, dtype=torch.float32,
                        timeout=4)


def _torchrun_env(monkeypatch, **env):
    for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


@pytest.mark.parametrize(("env", "match"), [
    (dict(RANK=3, WORLD_SIZE=2), r"^RANK=3: must be < WORLD_SIZE=2"),
    (dict(RANK=-1, WORLD_SIZE=2), r"^RANK='-1': must be an integer >= 0"),
    (dict(RANK=0, WORLD_SIZE="two"), r"^WORLD_SIZE='two': must be an integer >= 1"),
    (dict(RANK=0, WORLD_SIZE=2, LOCAL_RANK=2, LOCAL_WORLD_SIZE=2), r"^LOCAL_RANK=2: must be <"),
    (dict(RANK=0, WORLD_SIZE=2, MASTER_PORT=70000), r"^MASTER_PORT=70000: must be <= 65535"),
    (dict(RANK=0, WORLD_SIZE=2, MASTER_ADDR=""), r"^MASTER_ADDR='': must name the host"),
], ids=["rank_ge_world", "negative_rank", "world_not_int", "local_rank", "port", "no_addr"])
def test_inconsistent_torchrun_environment_is_refused_at_once(monkeypatch, env, match):
    """RANK=3 WORLD_SIZE=2 waited in the rendezvous for minutes; now refused before it."""
    from rocm_moe.distributed import init_from_env

    _torchrun_env(monkeypatch, **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500, **env})
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=match):
        init_from_env(rendezvous_timeout_s=30)
    assert time.monotonic() - t0 < 5


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", [0, 1], ids=["rank0_nobody_joins", "rank1_nobody_serves"])
def test_rendezvous_nobody_serves_times_out_naming_the_variables(monkeypatch, rank):
    """A MASTER_ADDR:MASTER_PORT nobody serves (or no peer joining rank 0) waited > 7 minutes
    silently; now RendezvousTimeout after the rendezvous timeout, naming the variables."""
    from rocm_moe.distributed import RendezvousTimeout, init_from_env

    port = _unused_port()
    _torchrun_env(monkeypatch, RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port, LOCAL_RANK=rank)
    t0 = time.monotonic()
    with pytest.raises(RendezvousTimeout) as err:
        init_from_env(backend="gloo", rendezvous_timeout_s=2)
    assert time.monotonic() - t0 < 20
    msg = str(err.value)
    for var in ("MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", f"RANK={rank}", "WORLD_SIZE=2",
                "LOCAL_RANK"):
        assert var in msg, msg
    assert "Fix:" in msg
    assert not dist.is_initialized()
