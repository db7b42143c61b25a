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
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rocm_moe._checks import error_message


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device
    backend: str  # "gloo" or "nccl" (RCCL on ROCm)


def default_backend(world_size: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size \
        else "gloo"


def _init(rank: int, world_size: int, backend: str, timeout_s: float) -> WorkerInfo:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size,
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, backend, timeout_s, threads, out_dir, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    info = _init(rank, world_size, backend, timeout_s)
    try:
        try:
            result = {"result": worker(info, *args)}
        except (ValueError, TypeError) as exc:  # a user error: hand it to the parent as is
            result = {"error": type(exc).__name__, "message": str(exc)}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


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
    ValueError / TypeError (a user error) is raised here as the same error; any other exception
    makes this raise with the worker's traceback.
    """
    if world_size < 1:
        raise ValueError(error_message("world_size", world_size, "must be >= 1",
                                       "pass the number of EP ranks"))
    backend = backend or default_backend(world_size)
    if threads_per_rank is None and backend == "gloo":
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, _free_port(), backend, timeout_s,
                                         threads_per_rank, out_dir, worker, args),
                           nprocs=world_size, start_method="spawn", join=True)
        results = [json.loads(Path(out_dir, f"{r}.json").read_text())
                   for r in range(world_size)]
    for res in results:
        if "error" in res:
            raise {"ValueError": ValueError, "TypeError": TypeError}[res["error"]](res["message"])
    return [res["result"] for res in results]
