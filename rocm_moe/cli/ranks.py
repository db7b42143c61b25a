"""Where a command's ranks run: in this process (W = 1), spawned on this host (``--world-size``),
or joined from torchrun's environment (any number of nodes). Progress (ranks starting and
ready) goes to stderr."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rocm_moe._checks import error_message
from rocm_moe._console import progress
from rocm_moe.distributed import (
    WorkerInfo,
    default_backend,
    init_from_env,
    launch,
    under_torchrun,
)


def world_size(requested: int | None) -> int:
    """torchrun's world size, else ``requested``, else one rank per GPU, else 2 on a CPU."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if requested is not None:
        if requested < 1:
            raise ValueError(error_message("--world-size", requested, "must be >= 1",
                                           "pass the number of EP ranks, or leave it out"))
        return requested
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def device(name: str) -> torch.device:
    """``--device``: auto (cuda if present, else cpu) or a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class _Announced:
    """``worker`` preceded by a "rank r/W ready" progress line (picklable for spawned ranks)."""

    worker: Callable

    def __call__(self, info: WorkerInfo, job):
        progress(f"rank {info.rank}/{info.world_size} ready ({info.backend}, {info.device})")
        return self.worker(info, job)


def on_ranks(worker: Callable, job, *, world_size: int, device_name: str = "auto") -> list:
    """Run ``worker(info, job)`` on every rank and return all ranks' results, in rank order.

    ``worker`` is a module-level function and ``job`` picklable (spawned ranks receive both).
    One rank runs in this process on ``device_name``; under torchrun the results are gathered
    to rank 0 and the other ranks get ``[]`` (they print nothing)."""
    worker = _Announced(worker)
    if under_torchrun():
        info = init_from_env()
        try:
            result = worker(info, job)
            everyone = [None] * info.world_size
            torch.distributed.all_gather_object(everyone, result)
            torch.distributed.barrier()  # leave together (see distributed._entry)
            return everyone if info.rank == 0 else []
        finally:
            torch.distributed.destroy_process_group()
    if world_size == 1:
        return [worker(WorkerInfo(0, 1, device(device_name), "none"), job)]
    progress(f"starting {world_size} ranks ({default_backend(world_size)})")
    results = launch(world_size, worker, job)
    progress(f"{world_size} ranks done")
    return results
