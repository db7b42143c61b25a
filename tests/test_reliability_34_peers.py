"""Issue 34, leftover (a): a rank's failure record belongs to the group it failed on.

``peers.post`` kept one record per rank per process: a process that carried on after a failure
with a new group (``dist.new_group``) kept its first record, so when another rank failed later
on the new group, the survivors read the old record and blamed the rank that failed first (found
by the soak, tests/test_soak.py). Records are now keyed by the group (name and ranks).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from rocm_moe import EPMoE, Placement, RouterConfig
from rocm_moe.comm import peers
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch

W, E, K, H, I = 3, 6, 2, 8, 8
TIMEOUT = datetime.timedelta(seconds=4)  # a failing round costs this much


class _Boom:
    """Experts that raise on the failing rank of a round."""

    def __init__(self, inner, fail: bool):
        self.inner, self.fail = inner, fail

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("experts boom (injected)")
        return self.inner(*args, **kwargs)


def _rounds_worker(info, failing: list[int]) -> list:
    """One round per entry of ``failing``, each on a new group: a good forward, then one where
    rank ``failing[i]``'s experts raise. What each rank saw, per round. Each round's dispatcher
    gets its new group and the same timeout= as the round before: it must run on a group made
    from the new one (the groups made per timeout were cached by ranks, so the new group was
    replaced by the broken one of round 1 and the first forward of round 2 raised "unusable")."""
    torch.set_grad_enabled(False)
    seen = []
    for fails in failing:
        dist.barrier()  # on the default group (60 s): the ranks leave a failed round apart
        group = dist.new_group(list(range(info.world_size)))
        disp = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                               dtype=torch.float32, max_tokens_per_rank=8, group=group,
                               timeout=TIMEOUT)
        layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                      dispatcher=disp)
        layer.reset_parameters(seed=1)
        x = torch.randn(5, H, generator=torch.Generator().manual_seed(info.rank))
        layer(x)  # the new group works
        layer.experts = _Boom(layer.experts, fails == info.rank)
        try:
            layer(x)
            seen.append(("returned", []))
        except peers.PeerFailure as exc:
            seen.append(("peer_failure", list(exc.culprits)))
        except RuntimeError as exc:
            seen.append(("own", [info.rank] if "experts boom" in str(exc) else str(exc)))
    return seen


def test_a_later_failure_on_a_new_group_names_its_own_rank():
    """Rounds failing on ranks 0, 2 then 1 in the same processes: every survivor names the
    rank that failed in that round (before: later rounds blamed rank 0 as well, from its record
    of round 1)."""
    failing = [0, 2, 1]
    out = launch(W, _rounds_worker, failing, backend="gloo", timeout_s=60, threads_per_rank=1)
    for i, fails in enumerate(failing):
        for rank in range(W):
            kind, culprits = out[rank][i]
            if rank == fails:
                assert (kind, culprits) == ("own", [rank]), (i, rank, out[rank][i])
            else:
                assert (kind, culprits) == ("peer_failure", [fails]), (i, rank, out[rank][i])

