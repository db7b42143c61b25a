"""The symm backend on CPU ranks: ``ShmSymmDispatcher`` is ``SymmDispatcher`` with its one
"symmetric" buffer in shared memory of the gloo ranks' processes (one /dev/shm file a rank,
mapped by every rank), its kernels run in Triton's interpreter. Each rank addresses its peers'
buffers through their base addresses in its own mappings, as a GPU addresses its peers' memory
through torch symmetric memory, and the barriers' compare-and-swap are real atomics
(``triton._C.libtriton.interpreter.atomic_cas``): the kernels' whole protocol runs across
processes at W = 1-4 in CI. Test machinery only: rocm_moe never imports it."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from rocm_moe._libs import triton_missing
from rocm_moe.comm.symm import SymmDispatcher

SHM_DIR = "/dev/shm"


def shm_available() -> str | None:
    """None where ShmSymmDispatcher runs here, else why not."""
    if (reason := triton_missing()) is not None:
        return reason
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "its kernels run in Triton's interpreter (TRITON_INTERPRET=1)"
    if not os.path.isdir(SHM_DIR):
        return f"no {SHM_DIR} (POSIX shared memory) on this host"
    return None


class ShmSymmDispatcher(SymmDispatcher):
    """``SymmDispatcher`` on CPU processes of one host (see the module docstring)."""

    @classmethod
    def availability(cls) -> str | None:
        return shm_available()

    def _rank_device(self) -> torch.device:
        return torch.device("cpu")

    def _map_buffer(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        tag = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(tag, src=dist.get_global_rank(self.group, 0),
                                   group=self.group)

        def path(rank: int) -> str:
            return os.path.join(SHM_DIR, f"rocm_moe_test_symm_{tag[0]}_{rank}")

        with open(path(self.rank), "wb") as f:
            f.truncate(nbytes)  # zeros
        dist.barrier(group=self.group)
        self._peer_maps = [torch.from_file(path(r), shared=True, size=nbytes,
                                           dtype=torch.uint8) for r in range(self.world_size)]
        dist.barrier(group=self.group)  # every rank has mapped every file
        os.unlink(path(self.rank))  # the mappings stay
        ptrs = torch.tensor([t.data_ptr() for t in self._peer_maps], dtype=torch.int64)
        return self._peer_maps[self.rank], ptrs


@contextmanager
def as_symm_backend():
    """comm="symm" served by ``ShmSymmDispatcher`` for the block, reached by name as an engine
    reaches it (``backends.make_dispatcher``, the pool, the vLLM / SGLang plug-ins); yields a
    list that gets each mapped buffer's bytes (one entry per symmetric buffer allocated)."""
    from rocm_moe import backends

    saved = backends.BACKENDS["comm:symm"], ShmSymmDispatcher._map_buffer
    maps: list[int] = []

    def counting(self, nbytes):
        maps.append(nbytes)
        return saved[1](self, nbytes)

    backends.BACKENDS["comm:symm"] = backends.Backend("symm", "comm", __name__,
                                                      "ShmSymmDispatcher")
    ShmSymmDispatcher._map_buffer = counting
    try:
        yield maps
    finally:
        backends.BACKENDS["comm:symm"], ShmSymmDispatcher._map_buffer = saved


def served_as(comm: str | None):
    """The context a test serves ``comm`` in: ``as_symm_backend()`` for "symm" (it yields the
    mapped buffers' list), nothing for any other backend (it yields None)."""
    return as_symm_backend() if comm == "symm" else nullcontext()
