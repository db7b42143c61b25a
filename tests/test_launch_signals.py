"""The CLI's ranks never outlive it: a SIGTERM or SIGINT of ``rocm-moe run --world-size 2``
kills and reaps both ranks and removes the launch's temporary folder; after a SIGKILL (which no
process can catch) the ranks die with their parent (PR_SET_PDEATHSIG) and the next launch
removes the folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rocm_moe.distributed import _PREFIX, _sweep_stale_folders

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ENDLESS = ["run", "--world-size", "2", "--num-experts", "8", "--hidden", "16",
           "--intermediate", "8", "--top-k", "2", "--tokens", "4", "--iters", "100000000",
           "--dtype", "float32"]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _folders(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{_PREFIX}{pid}-*"))


def _start(tmp_path) -> tuple[subprocess.Popen, list[int]]:
    """``rocm-moe run`` iterating forever, once both ranks are ready; (parent, rank pids)."""
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "rocm_moe.cli", *ENDLESS],
                                stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.monotonic() + 120
    while err.read_text().count(" ready (") < 2:
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.2)
    ranks = [p for p in _children(proc.pid) if _is_rank(p)]
    assert len(ranks) == 2, (ranks, err.read_text())
    assert len(_folders(proc.pid)) == 1
    return proc, ranks


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_rank(pid: int) -> bool:
    """A spawned rank (not multiprocessing's resource tracker)."""
    return "multiprocessing" in _cmdline(pid) and "resource_tracker" not in _cmdline(pid)


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signalled_cli_kills_and_reaps_its_ranks_and_removes_its_folder(tmp_path, signum):
    proc, ranks = _start(tmp_path)
    proc.send_signal(signum)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert _gone(ranks, 5), [p for p in ranks if _alive(p)]
    assert _folders(proc.pid) == []


@pytest.mark.slow
def test_killed_cli_takes_its_ranks_along(tmp_path):
    proc, ranks = _start(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    assert _gone(ranks, 10), [p for p in ranks if _alive(p)]
    assert len(_folders(proc.pid)) == 1  # nobody could remove it: the next launch does
    _sweep_stale_folders()
    assert _folders(proc.pid) == []


def _die_by(info, signum):
    """Rank 1 writes a line to its stderr, then dies by ``signum`` without a report."""
    if info.rank == 1:
        print(f"rank 1 about to die by {signal.Signals(signum).name}", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signum)
    time.sleep(30)  # rank 0 waits; the launcher kills it after the grace period
    return "unreachable"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT],
                         ids=["SIGKILL", "SIGSEGV", "SIGABRT"])
def test_rank_killed_by_a_signal_is_reported_with_its_last_stderr_lines(signum):
    """A rank dying by a signal was reported by exit code only ("no message reached the
    parent"); now by rank, signal name and the last lines it wrote to stderr."""
    from rocm_moe.distributed import RankFailed, launch

    with pytest.raises(RankFailed) as err:
        launch(2, _die_by, int(signum), backend="gloo", timeout_s=30, grace_s=2)
    msg = str(err.value)
    name = signal.Signals(signum).name
    assert err.value.rank == 1
    assert msg.startswith(f"rank 1 failed: killed by signal {name} before reporting"), msg
    assert f"rank 1's last stderr lines:\nrank 1 about to die by {name}" in msg, msg
    if signum == signal.SIGSEGV:  # faulthandler's traceback of the dying rank
        assert "Fatal Python error: Segmentation fault" in msg, msg
    if signum == signal.SIGABRT:  # (issue 34: a rank 0 died so under load, with no message)
        assert "Fatal Python error: Aborted" in msg, msg


def test_a_finished_rank_dying_at_exit_is_named_not_rank_0():
    """Both ranks wrote their results, then rank 1's process aborted while exiting (gloo's
    teardown under load, issue 34): the failure names rank 1 and says it finished first
    (it named rank 0 as 'failed: finished')."""
    from rocm_moe.distributed import _rank_failure

    records = {0: {"result": 1}, 1: {"result": 1}}
    err = _rank_failure(records, {0: 0, 1: -6}, set(), {1: "terminate called without an "
                                                           "active exception"})
    assert err.rank == 1
    assert "rank 1 failed: finished, then killed by signal SIGABRT while exiting" in str(err)
    assert "rank 0: finished\n" in str(err)
    assert "terminate called" in str(err)


def test_finished_ranks_leave_without_teardown(tmp_path):
    """A successful launch's ranks exit 0 straight after their last barrier (no teardown to
    abort in), and the results come back."""
    from rocm_moe.distributed import launch

    assert launch(2, _rank_sum, backend="gloo", timeout_s=60) == [1, 1]


def _rank_sum(info):
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return int(t.item()) - 1
