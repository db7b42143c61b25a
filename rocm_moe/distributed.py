"""Starting EP ranks: spawn W local processes, or join the group torchrun describes.

``launch(W, worker, *args)`` spawns W processes, initialises a process group in each (NCCL with
one GPU per rank when enough GPUs are present, gloo on CPUs otherwise), calls
``worker(info, *args)`` and returns the workers' return values (JSON-serialisable) in rank
order. Under torchrun, ``init_from_env()`` joins the group its environment describes (multi-node
works the same way).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from rocm_moe._checks import error_message
from rocm_moe.comm.base import PeerRefusal


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


def init_from_env(timeout_s: float = 300) -> WorkerInfo:
    """Join the group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_*)."""
    world_size = int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return _init(int(os.environ["RANK"]), world_size, backend, timeout_s)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _entry(rank, world_size, backend, timeout_s, threads, out_dir, worker, args):
    if threads:
        torch.set_num_threads(threads)
    # Rendezvous through a file of this launch's own folder: no port is guessed, so two
    # launches (or anything else on the machine) cannot race for one.
    store = dist.FileStore(str(Path(out_dir, "store")), world_size)
    info = _init(rank, world_size, backend, timeout_s, store)
    try:
        try:
            result = {"result": worker(info, *args)}
        except (ValueError, TypeError) as exc:  # a user error: hand it to the parent as is
            result = {"error": type(exc).__name__, "message": str(exc),
                      "peer": isinstance(exc, PeerRefusal)}
        except Exception as exc:  # the parent prefers another rank's user error, if any
            Path(out_dir, f"{rank}.json").write_text(json.dumps(
                {"crash": f"{type(exc).__name__}: {exc}"}))
            raise
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
        if "result" in result:
            # Leave together: a rank that tears its groups down while a peer's last
            # collective is still in flight can abort either process (gloo's
            # "terminate called without an active exception", seen once in CI).
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _first_user_error(out_dir: str, world_size: int) -> Exception | None:
    """The lowest rank's own user error (not a PeerRefusal, which only echoes one), as a
    ValueError / TypeError naming the rank; None if no rank had one."""
    errors = []
    for r in range(world_size):
        path = Path(out_dir, f"{r}.json")
        res = json.loads(path.read_text()) if path.exists() else {}
        if "error" in res:
            errors.append((res.get("peer", False), r, res))
    if not errors:
        return None
    _, r, res = min(errors, key=lambda e: e[:2])
    kind = {"ValueError": ValueError, "TypeError": TypeError}[res["error"]]
    return kind(f"rank {r}: {res['message']}")


def launch(
    world_size: int,
    worker: Callable,
    *args,
    backend: str | None = None,
    timeout_s: float = 120,
    threads_per_rank: int | None = None,
) -> list:
    """Run ``worker(info, *args)`` on ``world_size`` spawned ranks; their results in rank order.

    ``worker`` must be a module-level function (it is pickled into the children). A worker's
    ValueError / TypeError (a user error) is raised here as the same error, prefixed with its
    rank: the lowest rank's own error, even where other ranks then failed in a collective or
    raised ``PeerRefusal``; any other exception makes this raise with the worker's traceback.
    """
    if world_size < 1:
        raise ValueError(error_message("world_size", world_size, "must be >= 1",
                                       "pass the number of EP ranks"))
    backend = backend or default_backend(world_size)
    if threads_per_rank is None and backend == "gloo":
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world_size, backend, timeout_s,
                                             threads_per_rank, out_dir, worker, args),
                               nprocs=world_size, start_method="spawn", join=True)
        except ProcessException as exc:
            # A rank that failed on a user error left the others to fail in a collective:
            # report the first rank's real error, not a peer's "Connection closed by peer".
            user_error = _first_user_error(out_dir, world_size)
            if user_error is not None:
                raise user_error from exc
            raise
        user_error = _first_user_error(out_dir, world_size)
        if user_error is not None:
            raise user_error
        return [json.loads(Path(out_dir, f"{r}.json").read_text())["result"]
                for r in range(world_size)]
