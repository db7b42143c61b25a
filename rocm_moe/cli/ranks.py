"""Where a command's ranks run: in this process (W = 1), spawned on this host (``--world-size``),
or joined from torchrun's environment (any number of nodes), and on which device: a GPU per
rank where the host has one for each (NCCL), else its CPUs (gloo); ``--device cpu`` asks for
CPU ranks on a GPU host. Each rank then picks its default backends from its own device
(``spec.LayerSpec.on_rank``). Progress (ranks starting and ready) goes to stderr."""

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
    torchrun_env,
    under_torchrun,
)


def world_size(requested: int | None) -> int:
    """torchrun's world size, else ``requested``, else one rank per GPU, else 2 on a CPU."""
    if under_torchrun():
        return torchrun_env()[1]  # an inconsistent environment refused before any rendezvous
    if requested is not None:
        if requested < 1:
            raise ValueError(error_message("--world-size", requested, "must be >= 1",
                                           "pass the number of EP ranks, or leave it out"))
        return requested
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


PROCESS_BYTES = 400 * 2**20  # a CPU rank's own footprint before its layer: python, torch, gloo


def available_memory() -> int | None:
    """Bytes this host can still give (Linux's MemAvailable); None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_estimate(*, world_size: int, num_experts: int, hidden_size: int,
                    intermediate_size: int, top_k: int, tokens: int, itemsize: int,
                    shared_intermediate_size: int | None = None) -> int:
    """Bytes W ranks on this host's CPU need, roughly: per rank its process, its E / W experts,
    the gate, the shared experts, and the activations of ``tokens`` tokens (received rows
    R <= T * min(W, K), raw [R, K, H] outputs, the float64 checks of [T, K, H])."""
    W, E, H, I, K, T = world_size, num_experts, hidden_size, intermediate_size, top_k, tokens
    weights = (-(-E // W) * 3 * I * H + E * H + 3 * (shared_intermediate_size or 0) * H)
    R = T * min(W, K)
    activations = 2 * (T * H + R * (H + 2 * K) + R * K * H + T * K * H)
    return W * (PROCESS_BYTES + (weights + activations) * itemsize + 3 * T * K * H * 8)


def check_host_memory(world_size: int, device_name: str, tokens: int, *, num_experts: int,
                      hidden_size: int, intermediate_size: int, top_k: int, dtype: torch.dtype,
                      shared_intermediate_size: int | None = None,
                      available: int | None = None) -> None:
    """Refuse, before any rank starts, W CPU ranks on this host that would not fit in its
    available memory (``available``: bytes, default MemAvailable). GPUs and torchrun: no check
    (the ranks' memory is not this host's, or not only)."""
    on_cpu = spawn_backend(world_size, device_name) == "gloo" if world_size > 1 \
        else device(device_name).type == "cpu"
    if under_torchrun() or not on_cpu:
        return
    available = available if available is not None else available_memory()
    need = memory_estimate(world_size=world_size, num_experts=num_experts,
                           hidden_size=hidden_size, intermediate_size=intermediate_size,
                           top_k=top_k, tokens=tokens, itemsize=dtype.itemsize,
                           shared_intermediate_size=shared_intermediate_size)
    if available is not None and need > available:
        raise ValueError(error_message(
            "--world-size", world_size, f"{world_size} CPU ranks of this shape need about "
            f"{need / 2**30:.1f} GiB on this host ({PROCESS_BYTES // 2**20} MiB per process "
            f"plus its experts and activations), {available / 2**30:.1f} GiB is available",
            "lower --world-size or --tokens, or the shape (--num-experts, --hidden, "
            "--intermediate), or spread the ranks over hosts with torchrun"))


def device(name: str) -> torch.device:
    """``--device`` of one rank in this process: auto (cuda if present, else cpu) or a torch
    device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def spawn_backend(world_size: int, device_name: str = "auto") -> str:
    """The process group of several ranks (spawned, or under torchrun where ``world_size`` is
    this host's share): gloo on CPUs with ``--device cpu``, NCCL with ``--device cuda``, and for
    auto NCCL where this host has a GPU for every rank, else gloo (``default_backend``)."""
    if device_name == "auto":
        return default_backend(world_size)
    return "gloo" if torch.device(device_name).type == "cpu" else "nccl"


def multi_host() -> bool:
    """Whether the ranks span hosts: under torchrun, when this host runs fewer of them
    (LOCAL_WORLD_SIZE) than the group holds; spawned ranks and one rank share this host."""
    if not under_torchrun():
        return False
    world = int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world


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
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        info = init_from_env(backend=spawn_backend(local, device_name))
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
    backend = spawn_backend(world_size, device_name)
    progress(f"starting {world_size} ranks ({backend})")
    results = launch(world_size, worker, job, backend=backend)
    progress(f"{world_size} ranks done")
    return results
