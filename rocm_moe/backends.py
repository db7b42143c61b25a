"""Backends by name, and whether each can run here (with the reason when not).

Optional backends are imported only when asked for, so a missing library never breaks import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rocm_moe._checks import error_message
from rocm_moe._libs import rocm_library_missing
from rocm_moe.comm.base import Dispatcher
from rocm_moe.experts.base import Experts
from rocm_moe.placement import Placement


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str  # "comm" or "experts"
    module: str  # where it lives
    factory: str  # class name in that module
    availability: Callable[[], str | None]  # None = usable here, else why not


def _always() -> str | None:
    return None


def _torch_distributed() -> str | None:
    import torch.distributed as dist

    return None if dist.is_available() else "this torch build has no torch.distributed"


def _mori() -> str | None:
    return rocm_library_missing("mori", "build it from github.com/ROCm/mori on ROCm")


def _symm() -> str | None:
    from rocm_moe.comm.symm import SymmDispatcher

    return SymmDispatcher.availability()


def _triton() -> str | None:
    from rocm_moe.experts.triton import triton_availability

    if (reason := triton_availability()) is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA/ROCm device (tests run the kernels in Triton's interpreter)"
    return None


def _aiter() -> str | None:
    from rocm_moe.experts.aiter import aiter_availability

    return aiter_availability()


BACKENDS: dict[str, Backend] = {
    b.kind + ":" + b.name: b
    for b in [
        Backend("local", "comm", "rocm_moe.comm.local", "LocalDispatcher", _always),
        Backend("torch", "comm", "rocm_moe.comm.torch", "TorchDispatcher", _torch_distributed),
        Backend("mori", "comm", "rocm_moe.comm.mori", "MoriDispatcher", _mori),
        Backend("symm", "comm", "rocm_moe.comm.symm", "SymmDispatcher", _symm),
        Backend("reference", "experts", "rocm_moe.experts.reference", "ReferenceExperts", _always),
        Backend("aiter", "experts", "rocm_moe.experts.aiter", "AiterExperts", _aiter),
        Backend("triton", "experts", "rocm_moe.experts.triton", "TritonExperts", _triton),
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
    b = _get("experts", name)
    return getattr(importlib.import_module(b.module), b.factory)()


def make_dispatcher(name: str, placement: Placement, rank: int, **kw) -> Dispatcher:
    """A dispatcher; multi-rank backends take their rank from the process group."""
    b = _get("comm", name)
    cls = getattr(importlib.import_module(b.module), b.factory)
    if name == "local":
        return cls(placement, rank, **kw)
    dispatcher = cls(placement, **kw)  # multi-rank backends take the rank from their group
    if dispatcher.rank != rank:
        raise ValueError(error_message("rank", rank, f"the process group says {dispatcher.rank}",
                                       "pass the EP group's rank"))
    return dispatcher


def device_description() -> str:
    if torch.cuda.is_available():
        kind = "ROCm/HIP " + torch.version.hip if torch.version.hip else "CUDA " + str(
            torch.version.cuda)
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()} ({kind})"
    return "CPU only"
