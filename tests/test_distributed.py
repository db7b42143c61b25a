"""The launcher's failure reports: the first rank's own error, never a peer's echo of it."""

from __future__ import annotations

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
    return dict(own_group=disp.group is not dist.group.WORLD, shared=disp.group is again.group)


def test_dispatchers_get_a_finite_default_timeout():
    assert DEFAULT_TIMEOUT.total_seconds() == 300
    for res in launch(2, _timeouts, timeout_s=30):
        assert res == dict(own_group=True, shared=True)


def _refuse_everywhere(info):
    raise ValueError(f"rank {info.rank}'s input is bad. Fix: another input.")


def test_every_rank_refusing_at_once_reports_rank_zero():
    """Ranks that fail at once tore the group down while rank 0 was still connecting (its init
    failed with gloo's "connectFullMesh failed", about one launch in three at W = 3), so rank
    1's error was reported; the ranks now start together."""
    with pytest.raises(ValueError, match=r"^rank 0: rank 0's input is bad"):
        launch(3, _refuse_everywhere, timeout_s=30)
