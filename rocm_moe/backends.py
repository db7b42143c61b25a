"""Backends by name, and whether each can run here (with the reason when not): each backend
class answers that itself (``availability()``); this module only maps names to classes.

Optional backends are imported only when asked for, so a missing library never breaks import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rocm_moe._checks import error_message
from rocm_moe.placement import Placement

if TYPE_CHECKING:  # (types only: this registry imports a backend only when one is asked for)
    from rocm_moe.comm.base import Dispatcher
    from rocm_moe.experts.base import Experts


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str  # "comm" or "experts"
    module: str  # where it lives
    factory: str  # class name in that module

    def load(self) -> type[Dispatcher] | type[Experts]:
        """The backend's class (importing its module never imports its optional library)."""
        return getattr(importlib.import_module(self.module), self.factory)

    def availability(self) -> str | None:
        """None if usable here, else why not: the class's own ``availability()``."""
        return self.load().availability()


BACKENDS: dict[str, Backend] = {
    b.kind + ":" + b.name: b
    for b in [
        Backend("local", "comm", "rocm_moe.comm.local", "LocalDispatcher"),
        Backend("torch", "comm", "rocm_moe.comm.torch", "TorchDispatcher"),
        Backend("mori", "comm", "rocm_moe.comm.mori", "MoriDispatcher"),
        Backend("symm", "comm", "rocm_moe.comm.symm", "SymmDispatcher"),
        Backend("reference", "experts", "rocm_moe.experts.reference", "ReferenceExperts"),
        Backend("aiter", "experts", "rocm_moe.experts.aiter", "AiterExperts"),
        Backend("triton", "experts", "rocm_moe.experts.triton", "TritonExperts"),
    ]
}


def names(kind: str) -> list[str]:
    return [b.name for b in BACKENDS.values() if b.kind == kind]


def require(kind: str, name: str) -> None:
    """Raise the clear ValueError of an unknown or unusable backend."""
    _get(kind, name)


def _get(kind: str, name: str) -> Backend:
    key = f"{kind}:{name}"
    if key not in BACKENDS:
        raise ValueError(error_message(f"{kind} backend", repr(name),
                                       f"known {kind} backends are {names(kind)}",
                                       "pick one of them (rocm-moe info lists what runs here)"))
    backend = BACKENDS[key]
    reason = backend.availability()
    if reason is not None:
        raise ValueError(error_message(f"{kind} backend", repr(name), f"unavailable: {reason}",
                                       "install it or pick another backend"))
    return backend


def make_experts(name: str) -> Experts:
    return _get("experts", name).load()()


def make_dispatcher(name: str, placement: Placement, rank: int, **kw) -> Dispatcher:
    """A dispatcher for ``rank``: multi-rank backends take it from their process group (checked
    here), the local one is rank 0 of a one-rank placement."""
    dispatcher = _get("comm", name).load()(placement, **kw)
    if dispatcher.rank != rank:
        raise ValueError(error_message("rank", rank, f"the process group says {dispatcher.rank}",
                                       "pass the EP group's rank"))
    return dispatcher


def default_experts(device: torch.device, *, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(name, reason): the experts backend of a rank that runs on ``device`` when none is asked
    for. The Triton experts on a GPU, where Triton runs (and computes ``dtype``, if given: bf16
    and fp16 only); the reference elsewhere. Decided from the rank's own device, never from
    whether this host has a GPU: a rank spawned on the CPUs of a GPU host gets the reference.

    Example: ``default_experts(torch.device("cpu"))`` -> ``("reference", "default on CPU
    ranks")``; on ``cuda:0`` with Triton -> ``("triton", "default on GPUs")``.
    """
    if device.type != "cuda":
        return "reference", f"default on {device.type.upper()} ranks"
    triton_experts = BACKENDS["experts:triton"].load()
    reason = triton_experts.availability()
    if reason is None and dtype is not None:
        reason = triton_experts().supports(mode="weighted", dtype=dtype, device=device)
    if reason is not None:
        return "reference", f"triton cannot run: {reason}"
    return "triton", "default on GPUs"


def default_comm(world_size: int, device: torch.device, multi_host: bool) -> tuple[str, str]:
    """(name, reason): the comm backend of ``world_size`` ranks on ``device`` when none is asked
    for. One rank: local (nothing moves). GPU ranks of one host: symm (device-initiated, no
    host read: CUDA-graph capturable). Across hosts (``multi_host``), and on CPU ranks: torch.

    Example: ``default_comm(2, torch.device("cpu"), False)`` -> ``("torch", "default on CPU
    ranks")``; ``default_comm(1, any device, False)`` -> ``("local", "one rank")``.
    """
    if world_size < 1:
        raise ValueError(error_message("world_size", world_size, "must be >= 1",
                                       "pass the number of EP ranks"))
    if world_size == 1:
        return "local", "one rank"
    if device.type != "cuda":
        return "torch", f"default on {device.type.upper()} ranks"
    if multi_host:
        return "torch", "ranks on several hosts: symm reaches the GPUs of one host only"
    if (reason := BACKENDS["comm:symm"].availability()) is not None:
        return "torch", f"symm cannot run: {reason}"
    return "symm", "default on the GPUs of one host: CUDA-graph capturable"


def device_description() -> str:
    if torch.cuda.is_available():
        kind = "ROCm/HIP " + torch.version.hip if torch.version.hip else "CUDA " + str(
            torch.version.cuda)
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()} ({kind})"
    return "CPU only"
