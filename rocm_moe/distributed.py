"""Starting EP ranks: spawn W local processes, or join the group torchrun describes.

``launch(W, worker, *args)`` spawns W processes, initialises a process group in each (NCCL with
one GPU per rank when enough GPUs are present, gloo on CPUs otherwise), calls
``worker(info, *args)`` and returns the workers' return values (JSON-serialisable) in rank
order. Under torchrun, ``init_from_env()`` joins the group its environment describes (multi-node
works the same way).

Failures: the ranks rendezvous through a FileStore in the launch's own temporary folder. When a
rank fails, the others get ``GRACE_S`` seconds to report (their own error, or a
``comm.peers.PeerFailure`` naming the failed rank), then every rank still alive is killed and
reaped; the parent raises the root cause (a user error with its "Fix:", else the first rank
that raised, else the first that exited). The same cleanup (kill, reap, remove the folder)
runs when the parent is interrupted (SIGINT, SIGTERM); on Linux a rank also dies with its
parent (PR_SET_PDEATHSIG), and the folders of launches whose parent died are removed by the
next launch.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rocm_moe._checks import check_integer_value, error_message
from rocm_moe.comm import peers
from rocm_moe.comm.base import PeerRefusal

GRACE_S = 15.0  # after a rank fails, how long the others get to report before they are killed
_PREFIX = "rocm_moe-launch-"  # temporary folders: rocm_moe-launch-<parent pid>-<random>


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device
    backend: str  # "gloo" or "nccl" (RCCL on ROCm)


def default_backend(world_size: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size \
        else "gloo"


def _init(rank: int, world_size: int, backend: str, timeout_s: float,
          store: dist.Store | None = None) -> WorkerInfo:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    return WorkerInfo(rank, world_size, device, backend)


RENDEZVOUS_TIMEOUT_S = 120.0  # joining torchrun's group; ROCM_MOE_RENDEZVOUS_TIMEOUT_S overrides
TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


class RendezvousTimeout(TimeoutError):
    """The ranks torchrun's environment describes did not all meet at MASTER_ADDR:MASTER_PORT
    within the rendezvous timeout (a stale environment, or a peer that never started)."""


def _env_int(name: str, *, minimum: int, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = None
    if value is None or value < minimum:
        raise ValueError(error_message(
            name, repr(raw), f"must be an integer >= {minimum} (torchrun's environment)",
            f"launch with torchrun, or unset {', '.join(TORCHRUN_VARS)} left over from an "
            "earlier job"))
    return value


def torchrun_env() -> tuple[int, int]:
    """(rank, world size) of torchrun's environment, checked for consistency before any
    rendezvous: integers, 0 <= RANK < WORLD_SIZE, LOCAL_RANK < LOCAL_WORLD_SIZE, a MASTER_PORT
    in [1, 65535] and a MASTER_ADDR. A ValueError naming the variable otherwise."""
    fix = (f"launch with torchrun, or unset {', '.join(TORCHRUN_VARS)} left over from an "
           "earlier job")
    world = _env_int("WORLD_SIZE", minimum=1)
    rank = _env_int("RANK", minimum=0)
    if rank >= world:
        raise ValueError(error_message("RANK", rank, f"must be < WORLD_SIZE={world}", fix))
    local_world = _env_int("LOCAL_WORLD_SIZE", minimum=1, default=world)
    local = _env_int("LOCAL_RANK", minimum=0, default=0)
    if local >= local_world or local_world > world:
        raise ValueError(error_message(
            "LOCAL_RANK", local, f"must be < LOCAL_WORLD_SIZE={local_world} <= "
            f"WORLD_SIZE={world}", fix))
    port = _env_int("MASTER_PORT", minimum=1)
    if port > 65535:
        raise ValueError(error_message("MASTER_PORT", port, "must be <= 65535", fix))
    if not os.environ.get("MASTER_ADDR", "").strip():
        raise ValueError(error_message("MASTER_ADDR", repr(os.environ.get("MASTER_ADDR")),
                                       "must name the host of rank 0", fix))
    return rank, world


def _seconds(field: str, value: object) -> float:
    """A finite number of seconds > 0 (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(error_message(field, repr(value), "must be a finite number of "
                                       "seconds > 0", "pass e.g. 60"))
    return float(value)


def _rendezvous_timeout(given: float | None) -> float:
    if given is not None:
        return _seconds("rendezvous_timeout_s", given)
    raw = os.environ.get("ROCM_MOE_RENDEZVOUS_TIMEOUT_S", str(RENDEZVOUS_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(error_message("ROCM_MOE_RENDEZVOUS_TIMEOUT_S", repr(raw),
                                       "must be a finite number of seconds > 0",
                                       "unset it (120 s) or pass e.g. 300"))
    return value


def _env_store(rank: int, world_size: int, wait_s: float, timeout_s: float) -> dist.Store:
    """The store torch's env:// rendezvous makes (rank 0 or torchrun's agent serves it), met
    within ``wait_s`` seconds, its later operations given ``timeout_s``."""
    from torch.distributed.rendezvous import _create_c10d_store

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    start = time.monotonic()
    try:
        store = _create_c10d_store(addr, port, rank, world_size,
                                   datetime.timedelta(seconds=wait_s))
    except (RuntimeError, OSError) as exc:  # DistStoreError / DistNetworkError
        env = " ".join(f"{v}={os.environ.get(v)}" for v in TORCHRUN_VARS)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousTimeout(
            f"rank {rank} of {world_size} could not meet the other ranks at {addr}:{port} within "
            f"{time.monotonic() - start:.0f} s (rendezvous timeout {wait_s:g} s; {env}): "
            f"{first}. Fix: start every rank with torchrun (rank 0 serves "
            "MASTER_ADDR:MASTER_PORT), or unset these variables left over from an earlier job; "
            "ROCM_MOE_RENDEZVOUS_TIMEOUT_S sets the wait") from exc
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store


def init_from_env(timeout_s: float = 300, backend: str | None = None,
                  rendezvous_timeout_s: float | None = None) -> WorkerInfo:
    """Join the group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_*).
    ``backend``: default NCCL where this host has a GPU for each of its ranks
    (LOCAL_WORLD_SIZE), else gloo: CPU ranks, e.g. 2 ranks on a host with one GPU.

    The environment is checked first (``torchrun_env``: RANK=3 WORLD_SIZE=2 is refused at
    once). Meeting the other ranks at MASTER_ADDR:MASTER_PORT takes at most
    ``rendezvous_timeout_s`` (default ``ROCM_MOE_RENDEZVOUS_TIMEOUT_S`` or 120 s), then raises
    ``RendezvousTimeout`` naming the variables; ``timeout_s`` is the collectives' timeout."""
    _seconds("timeout_s", timeout_s)
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(error_message("backend", repr(backend), "must be 'gloo' or 'nccl'",
                                       "pass gloo for CPU ranks, nccl for a GPU per rank, or "
                                       "None (the default for this host)"))
    rank, world_size = torchrun_env()
    wait_s = _rendezvous_timeout(rendezvous_timeout_s)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = backend or default_backend(local)
    store = _env_store(rank, world_size, wait_s, timeout_s)
    return _init(rank, world_size, backend, timeout_s, store)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


class RankFailed(RuntimeError):
    """A spawned rank raised (not a user error) or exited without a result. ``rank``: the rank
    reported as the cause; the message holds its error (and traceback) and every rank's end."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this rank when the launching process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # no libc prctl: the parent's own cleanup still reaps the ranks
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _write(out_dir: str, rank: int, record: dict) -> None:
    tmp = Path(out_dir, f"{rank}.json.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(Path(out_dir, f"{rank}.json"))  # the parent never reads half a record


STDERR_TAIL = 20  # lines of a failed rank's stderr in the launcher's report


def _stderr_to_file(path: Path) -> None:
    """This rank's fd 2 (Python's and native code's stderr, and faulthandler's traceback at a
    SIGSEGV) into ``path``, which the launcher relays to its own stderr and quotes the end of
    when this rank dies: the bytes are in the file even when the rank is killed by a signal."""
    import faulthandler

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()


class _Relay:
    """Copies what the ranks write to their stderr files onto the launcher's stderr."""

    def __init__(self, out_dir: str, world_size: int):
        self.paths = [Path(out_dir, f"{r}.stderr") for r in range(world_size)]
        self.offsets = [0] * world_size

    def pump(self) -> None:
        for r, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[r])
                    data = f.read()
            except OSError:
                continue
            if data:
                self.offsets[r] += len(data)
                sys.stderr.write(data.decode(errors="replace"))
                sys.stderr.flush()

    def tails(self) -> dict[int, str]:
        """The last ``STDERR_TAIL`` lines each rank wrote to its stderr."""
        out = {}
        for r, path in enumerate(self.paths):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if lines:
                out[r] = "\n".join(lines[-STDERR_TAIL:])
        return out


def _entry(rank, world_size, backend, timeout_s, threads, out_dir, parent_pid, worker, args):
    _die_with_parent(parent_pid)
    _stderr_to_file(Path(out_dir, f"{rank}.stderr"))
    if threads:
        torch.set_num_threads(threads)
    # Rendezvous through a file of this launch's own folder: no port is guessed, so two
    # launches (or anything else on the machine) cannot race for one.
    store = dist.FileStore(str(Path(out_dir, "store")), world_size)
    info = _init(rank, world_size, backend, timeout_s, store)
    try:
        # Start together: a rank that fails at once (a user error) and tears its group down
        # while a peer is still connecting its gloo mesh made that peer's init fail ("Gloo
        # connectFullMesh failed ... Connection closed by peer"), hiding its own error.
        dist.barrier()
        try:
            result = {"result": worker(info, *args)}
        except (ValueError, TypeError) as exc:  # a user error: hand it to the parent as is
            result = {"error": type(exc).__name__, "message": str(exc),
                      "peer": isinstance(exc, PeerRefusal)}
            if not isinstance(exc, PeerRefusal):  # the peers waiting for it will name it
                peers.post(stage="its worker", kind="refused", error=peers.short(exc))
        except BaseException as exc:  # the parent prefers another rank's user error, if any
            peers.post(stage="its worker", kind="raised", error=peers.short(exc))
            _write(out_dir, rank, {"crash": peers.short(exc, 2000),
                                   "peer_failure": isinstance(exc, peers.PeerFailure),
                                   "traceback": traceback.format_exc()})
            raise
        _write(out_dir, rank, result)
        if "result" in result:
            # Leave together, then without tearing anything down: every rank's result is
            # written and no collective is in flight, and the teardown itself (destroy, then
            # the interpreter's C++ destructors) aborted finished ranks under load (gloo's
            # "terminate called without an active exception", issue 34: a passing run
            # reported as a failure). The OS releases the rest.
            dist.barrier()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    finally:
        dist.destroy_process_group()


def _first_user_error(records: dict[int, dict]) -> Exception | None:
    """The lowest rank's own user error (not a PeerRefusal, which only echoes one), as a
    ValueError / TypeError naming the rank; None if no rank had one."""
    errors = [(res.get("peer", False), r, res) for r, res in records.items() if "error" in res]
    if not errors:
        return None
    _, r, res = min(errors, key=lambda e: e[:2])
    kind = {"ValueError": ValueError, "TypeError": TypeError}[res["error"]]
    return kind(f"rank {r}: {res['message']}")


def _end(rank: int, records: dict[int, dict], exitcodes: dict[int, int | None],
         killed: set[int]) -> str:
    """How rank ``rank`` ended, in a few words."""
    rec, code = records.get(rank, {}), exitcodes.get(rank)
    if "crash" in rec:
        return f"raised {rec['crash'][:300]}"
    if "error" in rec:
        return f"refused: {rec['message'][:200]}"
    if "result" in rec:
        if code:  # its result is written, then its process ended badly
            return f"finished, then {_exit_words(code)} while exiting"
        return "finished"
    if rank in killed:
        return "killed by the launcher (still running after the others failed)"
    if code is not None and code < 0:
        return f"{_exit_words(code)} before reporting"
    return f"exited with code {code} before reporting (os._exit, a native crash)"


def _exit_words(code: int) -> str:
    """A process exit code in words: ``-6`` -> "killed by signal SIGABRT"."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}"


def _rank_failure(records: dict[int, dict], exitcodes: dict[int, int | None],
                  killed: set[int], tails: dict[int, str] | None = None) -> RankFailed:
    """The root cause first: a rank that raised on its own, else one that raised because a
    peer failed (its PeerFailure names that peer), else one that exited without a report."""
    crashed = sorted((rec.get("peer_failure", False), r) for r, rec in records.items()
                     if "crash" in rec)
    silent = [r for r in sorted(exitcodes) if r not in records and r not in killed]
    if crashed and not (crashed[0][0] and silent):
        cause = crashed[0][1]
        detail = "\n" + records[cause]["traceback"]
    else:
        bad = [r for r in sorted(exitcodes) if exitcodes[r]]  # (a finished rank dying at exit)
        cause = silent[0] if silent else (bad[0] if bad else min(exitcodes))
        tail = (tails or {}).get(cause)
        detail = (f"\nrank {cause}'s last stderr lines:\n" + tail) if tail else \
            f"\nrank {cause} wrote nothing to stderr"
    ends = "\n".join(f"  rank {r}: {_end(r, records, exitcodes, killed)}"
                      for r in sorted(exitcodes))
    return RankFailed(f"rank {cause} failed: {_end(cause, records, exitcodes, killed)}\n"
                      f"every rank:\n{ends}{detail}", cause)


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, _frame):
    raise _Signalled(signum)


def _sweep_stale_folders() -> None:
    """Remove the temporary folders of launches whose parent no longer exists (one killed by
    SIGKILL cannot remove its own)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        try:
            pid = int(folder.name[len(_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def _reap(procs: list, killed: set[int]) -> None:
    """SIGTERM every rank still alive, SIGKILL those alive 3 s later, and wait for all."""
    for r, p in enumerate(procs):
        if p.is_alive():
            killed.add(r)
            p.terminate()
    deadline = time.monotonic() + 3
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


def _wait(procs: list, grace_s: float, relay: _Relay) -> None:
    """Until every rank has exited, or ``grace_s`` after the first one failed, relaying the
    ranks' stderr meanwhile."""
    from multiprocessing.connection import wait

    pending = {p.sentinel: p for p in procs}
    failed_at = None
    while pending:
        relay.pump()
        left = None if failed_at is None else failed_at + grace_s - time.monotonic()
        if left is not None and left <= 0:
            return
        for s in wait(list(pending), timeout=0.2 if left is None else min(left, 0.2)):
            p = pending.pop(s)
            p.join()
            if p.exitcode != 0 and failed_at is None:
                failed_at = time.monotonic()


def _check_launch(world_size: int, worker: Callable, args: tuple, backend: str) -> None:
    """What a spawned rank needs, checked before any process starts: a known backend, a GPU
    per rank for NCCL, and a worker and arguments that pickle (spawn sends them)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(error_message("backend", repr(backend), "must be 'gloo' or 'nccl'",
                                       "pass gloo for CPU ranks, nccl for a GPU per rank"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "nccl" and gpus < world_size:
        raise ValueError(error_message(
            "backend", "'nccl'", f"needs a GPU per rank: {world_size} ranks, {gpus} GPU(s) here",
            "pass backend='gloo' (CPU ranks), or fewer ranks"))
    import pickle

    for field, value in (("worker", worker), ("args", args)):
        try:
            pickle.dumps(value)
        except Exception as exc:  # PicklingError, AttributeError (lambdas, local functions)
            raise TypeError(error_message(
                field, repr(value)[:120], f"must pickle, spawned ranks receive it ({exc})",
                "use a module-level function and picklable arguments (no lambda, no local "
                "function)")) from exc


THREADS_ENV = "ROCM_MOE_THREADS_PER_RANK"


def _default_threads(world_size: int) -> int:
    """Intra-op threads of a gloo rank: ``$ROCM_MOE_THREADS_PER_RANK``, else the CPUs divided
    among the ranks (at least 1)."""
    raw = os.environ.get(THREADS_ENV)
    if raw is None:
        return max(1, (os.cpu_count() or 1) // world_size)
    if not (raw.strip().isascii() and raw.strip().isdigit()) or int(raw) < 1:
        raise ValueError(error_message(
            THREADS_ENV, repr(raw), "must be an integer >= 1 (intra-op threads per CPU rank)",
            f"unset it, or set e.g. {THREADS_ENV}=1"))
    return int(raw)


def launch(
    world_size: int,
    worker: Callable,
    *args,
    backend: str | None = None,
    timeout_s: float = 120,
    threads_per_rank: int | None = None,
    grace_s: float = GRACE_S,
) -> list:
    """Run ``worker(info, *args)`` on ``world_size`` spawned ranks; their results in rank order.

    ``worker`` must be a module-level function (it is pickled into the children). On gloo each
    rank runs ``threads_per_rank`` intra-op threads: by default ``$ROCM_MOE_THREADS_PER_RANK``
    where set (an integer >= 1; a test suite on a small shared machine sets 1), else the CPUs
    divided among the ranks. A worker's
    ValueError / TypeError (a user error) is raised here as the same error, prefixed with its
    rank: the lowest rank's own error, even where other ranks then failed in a collective or
    raised ``PeerRefusal``. Any other failure raises ``RankFailed`` naming the rank that caused
    it, how every rank ended and the cause's traceback. ``timeout_s``: the process group's
    collective timeout; ``grace_s``: how long the other ranks may still run after one failed.
    The ranks and the temporary folder never outlive this call, nor a SIGINT / SIGTERM of it.
    """
    check_integer_value("world_size", world_size, minimum=1, fix="pass the number of EP ranks")
    if not callable(worker):
        raise TypeError(error_message("worker", repr(worker)[:80], "must be callable "
                                      "(worker(info, *args) runs on every rank)",
                                      "pass a module-level function"))
    if threads_per_rank is not None:
        check_integer_value("threads_per_rank", threads_per_rank, minimum=1,
                            fix="pass the intra-op threads of each rank, or None")
    for field, value in (("timeout_s", timeout_s), ("grace_s", grace_s)):
        _seconds(field, value)
    backend = backend or default_backend(world_size)
    _check_launch(world_size, worker, args, backend)
    if threads_per_rank is None and backend == "gloo":
        threads_per_rank = _default_threads(world_size)
    _sweep_stale_folders()
    out_dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    ctx = mp.get_context("spawn")
    procs, killed = [], set()
    relay, tails = _Relay(out_dir, world_size), {}
    in_main = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    old = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGINT, signal.SIGTERM)} \
        if in_main else {}
    try:
        for r in range(world_size):
            procs.append(ctx.Process(target=_entry, name=f"rocm_moe-rank{r}", args=(
                r, world_size, backend, timeout_s, threads_per_rank, out_dir, os.getpid(),
                worker, args)))
            procs[-1].start()
        _wait(procs, grace_s, relay)
        _reap(procs, killed)
        relay.pump()
        tails = relay.tails()
        records = {r: json.loads(Path(out_dir, f"{r}.json").read_text())
                   for r in range(world_size) if Path(out_dir, f"{r}.json").exists()}
    except _Signalled as sig:
        _reap(procs, killed)
        shutil.rmtree(out_dir, ignore_errors=True)
        for s, handler in old.items():
            signal.signal(s, handler)
        old = {}
        if sig.signum == signal.SIGINT:
            raise KeyboardInterrupt from None
        os.kill(os.getpid(), sig.signum)  # the default action now, or the caller's handler
        raise SystemExit(128 + sig.signum) from None
    finally:
        _reap(procs, killed)
        shutil.rmtree(out_dir, ignore_errors=True)
        for s, handler in old.items():
            signal.signal(s, handler)
    user_error = _first_user_error(records)
    if user_error is not None:
        raise user_error
    exitcodes = {r: p.exitcode for r, p in enumerate(procs)}
    if any(c != 0 for c in exitcodes.values()) or len(records) < world_size:
        raise _rank_failure(records, exitcodes, killed, tails)
    return [records[r]["result"] for r in range(world_size)]
