"""Expert-parallel load balancing: the load counters and the weight move (see notes/eplb.md).

Letters as in ``rocm_moe.replicas`` (E logical, P physical, W ranks, e = P / W, N window).

Load (``ExpertLoad``): every forward of an EPLB layer adds, on the device, its (token, slot)
pairs per logical expert [E] and per physical expert [P] into row ``step mod N`` of two ring
buffers [N, E] / [N, P] (a scatter-add and an ``index_copy_`` at a device step counter: no host
read, fixed shapes, so a CUDA graph captures it). ``report`` sums the window, on this rank or
over the EP group (one all-reduce), on demand. The physical ring restarts at a rebalance (its
ids mean other experts then); the logical ring does not.

Weight move (``plan_move``, ``move_weights``): from the old and the new placement every rank
derives the same list of transfers: each physical slot whose logical expert changes gets it from
the same rank's old slot where that rank held it (a local copy), else from a rank that held it
(its replicas taken in turn). Each rank receives its incoming experts into a staging buffer
(memory: the rank's changed slots, at most its e experts, one copy) in rounds of point-to-point
messages (``torch.distributed.batch_isend_irecv``, ``experts_per_round`` transfers of the whole
group per round, straight from the live weights to the staging rows); then every rank posts its
end state to the rendezvous store and waits for all of them (``_Outcomes``), and only when every
rank succeeded does each copy its staging rows into its weights and swap its placement. A rank
that fails in the move is named by its peers (a ``comm.peers.PeerFailure`` naming it), every
rank keeps its old placement and weights, and the group is marked broken (a restart is needed,
as after any failed collective).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from rocm_moe._checks import check_integer_value, error_message
from rocm_moe.comm import peers
from rocm_moe.replicas import ReplicatedPlacement

MOVE_STAGE = "rebalance (weight move)"


@dataclass(frozen=True, kw_only=True, eq=False)
class LoadReport:
    """Expert load over the window: (token, slot) pairs, int64.

    ``logical`` [E]: per logical expert; ``physical`` [P]: per physical expert (since the last
    rebalance); ``per_rank`` [W]: the expert work of each rank (its physical experts' sum);
    ``steps``: forwards in the window; ``scope``: "rank" (this rank's tokens) or "group"."""

    logical: torch.Tensor
    physical: torch.Tensor
    per_rank: torch.Tensor
    steps: int
    scope: Literal["rank", "group"]

    @property
    def imbalance(self) -> float:
        """max / mean of ``per_rank`` (1.0 where no work was recorded)."""
        w = self.per_rank.double()
        return float(w.max() / w.mean()) if float(w.sum()) > 0 else 1.0


class ExpertLoad(nn.Module):
    """Ring buffers of per-step expert load on the device (see the module docstring); buffers
    outside the state dict, which ``layer.to(device)`` moves."""

    def __init__(self, num_experts: int, num_physical: int, window: int, device):
        super().__init__()
        check_integer_value("load_window", window, minimum=1,
                            fix="pass the number of forwards the load is summed over")
        self.E, self.P, self.window = num_experts, num_physical, window
        kw = dict(dtype=torch.int64, device=device)
        self.register_buffer("logical_NE", torch.zeros(window, num_experts, **kw),
                             persistent=False)
        self.register_buffer("physical_NP", torch.zeros(window, num_physical, **kw),
                             persistent=False)
        self.register_buffer("step", torch.zeros(1, **kw), persistent=False)  # forwards

    @staticmethod
    def _count(ids_TK: torch.Tensor, n: int) -> torch.Tensor:
        """[1, n] int64: how many slots hold each id (-1 slots land in a dropped bin)."""
        flat = ids_TK.reshape(-1).long() + 1
        c = torch.zeros(n + 1, dtype=torch.int64, device=ids_TK.device)
        c.scatter_add_(0, flat, torch.ones_like(flat))
        return c[None, 1:]

    def record(self, logical_TK: torch.Tensor, physical_TK: torch.Tensor) -> None:
        """Add one forward's [T, K] logical and physical ids (device ops only)."""
        slot = torch.remainder(self.step, self.window)
        self.logical_NE.index_copy_(0, slot, self._count(logical_TK, self.E))
        self.physical_NP.index_copy_(0, slot, self._count(physical_TK, self.P))
        self.step.add_(1)

    def restart_physical(self) -> None:
        self.physical_NP.zero_()

    def reset(self) -> None:
        """Forget every recorded step (the window starts empty)."""
        self.logical_NE.zero_()
        self.physical_NP.zero_()
        self.step.zero_()

    def report(self, placement: ReplicatedPlacement, *, group=None) -> LoadReport:
        """The window's sums; with ``group`` (collective) summed over the EP group."""
        both = torch.cat([self.logical_NE.sum(0), self.physical_NP.sum(0)])
        scope: Literal["rank", "group"] = "rank"
        if group is not None:
            dist.all_reduce(both, group=group)
            scope = "group"
        both = both.cpu()
        physical = both[self.E:]
        return LoadReport(logical=both[:self.E], physical=physical,
                          per_rank=placement.rank_load(physical),
                          steps=min(int(self.step.item()), self.window), scope=scope)


@dataclass(frozen=True)
class Transfer:
    """One expert's weights from (src_rank, src_slot) of the old placement to (dst_rank,
    dst_slot) of the new one (local slots; a local copy where the ranks are equal)."""

    logical: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


def plan_move(old: ReplicatedPlacement, new: ReplicatedPlacement) -> tuple[Transfer, ...]:
    """Every slot whose logical expert changes, with its source (see the module docstring);
    the same list on every rank, in increasing new physical id.

    Example: W = 2, e = 2, old [0, 1, 2, 0] -> new [0, 2, 1, 0]: slot 1 of rank 0 gets logical 2
    from rank 1 slot 0, slot 0 of rank 1 gets logical 1 from rank 0 slot 1."""
    if old.num_physical != new.num_physical or old.world_size != new.world_size \
            or old.num_experts != new.num_experts:
        raise ValueError(error_message(
            "new placement (E, P, W)", (new.num_experts, new.num_physical, new.world_size),
            f"must keep the layer's (E, P, W) = ({old.num_experts}, {old.num_physical}, "
            f"{old.world_size}): a rebalance moves experts, it does not add any",
            "pass a phys_to_log of the same length for the same EP group"))
    e, o, n = old.num_local, old.phys_to_log.tolist(), new.phys_to_log.tolist()
    used: dict[int, int] = {}
    out = []
    for p, g in enumerate(n):
        if o[p] == g:
            continue
        r = p // e
        local = [q for q in range(r * e, (r + 1) * e) if o[q] == g]
        if local:
            q = local[0]
        else:
            replicas = [q for q in range(len(o)) if o[q] == g]
            q = replicas[used.get(g, 0) % len(replicas)]
            used[g] = used.get(g, 0) + 1
        out.append(Transfer(logical=g, src_rank=q // e, src_slot=q % e, dst_rank=r,
                            dst_slot=p % e))
    return tuple(out)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A view that every backend can send (float8 as bytes)."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t


def _round_ops(transfers, tensors, staged, slot_of, rank: int, group) -> list:
    """This rank's sends and receives of one round (a seam the failure tests patch)."""
    ops = []
    for n, t in transfers:
        for k, (x, s) in enumerate(zip(tensors, staged, strict=True)):
            tag = n * len(tensors) + k
            if t.src_rank == rank:
                ops.append(dist.P2POp(dist.isend, _wire(x[t.src_slot]),
                                      dist.get_global_rank(group, t.dst_rank), group, tag))
            elif t.dst_rank == rank:
                ops.append(dist.P2POp(dist.irecv, _wire(s[slot_of[id(t)]]),
                                      dist.get_global_rank(group, t.src_rank), group, tag))
    return ops


def _exchange_round(ops: list) -> None:
    """One round of point-to-point messages."""
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


_EPOCHS: dict[str, int] = {}  # group -> moves so far (the same count on every rank)


class _Outcomes:
    """Each rank's end state of one move, through the default group's rendezvous store (the
    move's agreement): "ok" (its transfers completed), "collective" (a transfer with a peer
    failed) or "raised" (its own step failed). Every rank posts its state BEFORE it waits for
    the others', so a rank that failed fast does not wait for a peer still blocked in a transfer
    to time out; a rank that posts nothing within the wait died or stalled."""

    def __init__(self, group, timeout_s: float | None):
        from torch.distributed import distributed_c10d as c10d

        self.ranks = dist.get_process_group_ranks(group)
        scope = f"{getattr(group, 'group_name', '')}:{'-'.join(map(str, self.ranks))}"
        n = _EPOCHS[scope] = _EPOCHS.get(scope, 0) + 1
        self.prefix = f"rocm_moe/eplb/{scope}/{n}/"
        self.me = dist.get_rank()
        self.timeout_s = timeout_s or 300.0
        self.store = c10d._get_default_store()

    def post(self, state: str) -> None:
        with contextlib.suppress(Exception):  # the store's host may be the rank that died
            self.store.set(self.prefix + str(self.me), state)

    def settle(self) -> tuple[dict[int, str], list[int]]:
        """(every rank's posted state, the ranks that posted none): returns once all posted,
        at once when a rank "raised", else when nothing new came for twice the timeout (a peer
        blocked in a transfer on a live rank posts after its own timeout)."""
        states: dict[int, str] = {}
        last = time.monotonic()
        while True:
            try:
                for r in self.ranks:
                    key = self.prefix + str(r)
                    if r not in states and self.store.check([key]):
                        states[r] = self.store.get(key).decode()
                        last = time.monotonic()
            except Exception:
                break  # the store is gone with its host: what we have is what we know
            if len(states) == len(self.ranks) or "raised" in states.values() \
                    or time.monotonic() - last > 2 * self.timeout_s:
                break
            time.sleep(0.02)
        return states, [r for r in self.ranks if r not in states]


def move_weights(tensors: list[torch.Tensor], plan: tuple[Transfer, ...], rank: int, group, *,
                 experts_per_round: int = 1, timeout_s: float | None = None
                 ) -> list[torch.Tensor]:
    """This rank's part of ``plan`` for the [e, ...] ``tensors`` (every per-expert tensor of the
    layer): the staging tensors [n_in, ...] of its incoming slots in plan order (nothing in
    ``tensors`` changes). Collective over ``group`` (None: one rank, local copies only):
    returns only when every rank's transfers completed. Otherwise raises this rank's own error
    (its failure posted for its peers first) or ``PeerFailure`` naming the failing rank(s):
    those whose own step raised, else those that reported nothing (died or stalled)."""
    incoming = [t for t in plan if t.dst_rank == rank]
    staged = [x.new_empty((len(incoming), *x.shape[1:])) for x in tensors]
    outcomes = _Outcomes(group, timeout_s) if group is not None else None
    state, error = "raised", None
    try:
        for i, t in enumerate(incoming):
            if t.src_rank == rank:
                for x, s in zip(tensors, staged, strict=True):
                    s[i].copy_(x[t.src_slot])
        remote = [(i, t) for i, t in enumerate(plan) if t.src_rank != t.dst_rank]
        slot_of = {id(t): i for i, t in enumerate(incoming)}
        for start in range(0, len(remote), experts_per_round):
            ops = _round_ops(remote[start:start + experts_per_round], tensors, staged, slot_of,
                             rank, group)
            state = "collective"
            _exchange_round(ops)
            state = "raised"
        if tensors and tensors[0].is_cuda:
            torch.cuda.synchronize(tensors[0].device)  # (NCCL's wait only orders the stream)
        state = "ok"
    except Exception as exc:
        error = exc
        if outcomes is None:
            raise
        kind = "raised" if state == "raised" or isinstance(exc, (ValueError, TypeError)) \
            else "collective"
        state = kind
        peers.post(stage=MOVE_STAGE, kind=kind, error=peers.short(exc))
        peers.mark_broken(group, f"rank {rank} failed in {MOVE_STAGE}: {peers.short(exc, 160)}")
    if outcomes is None:
        return staged
    outcomes.post(state)
    if state == "raised":
        raise error  # this rank's own failure: its peers name it
    states, missing = outcomes.settle()
    if state == "ok" and not missing and all(v == "ok" for v in states.values()):
        return staged
    raised = sorted(r for r, v in states.items() if v == "raised")
    culprits = tuple(raised or missing)
    if raised:
        why = f"rank(s) {raised} failed in their own step of the move"
        fix = f"read rank {raised[0]}'s own error: it is the cause"
    elif missing:
        why = (f"rank(s) {missing} reported nothing within {2 * outcomes.timeout_s:.0f} s: "
               "exited (os._exit, a native crash, killed) or stalled")
        fix = (f"read rank {missing[0]}'s log; if it is only slow, raise the group's timeout "
               "(TorchDispatcher(timeout=...))")
    else:
        why, fix = "every failing rank failed in a transfer", "read every rank's log"
    seen = f" ({peers.short(error, 160)})" if error is not None else ""
    message = (f"rank {dist.get_rank()}: {MOVE_STAGE} failed{seen}: {why}; every rank keeps "
               f"its old placement and weights. Fix: {fix}")
    peers.mark_broken(group, message)
    raise peers.PeerFailure(message, stage=MOVE_STAGE, culprits=culprits) from error


def _collective(group, stage: str, run, timeout_s: float | None):
    try:
        return run()
    except Exception as exc:
        if isinstance(exc, (ValueError, TypeError)):
            raise
        raise peers.failure(group, stage=stage, batch=None, exc=exc,
                            timeout_s=timeout_s) from exc


def commit(tensors: list[torch.Tensor], staged: list[torch.Tensor], plan: tuple[Transfer, ...],
           rank: int) -> None:
    """Copy the staging rows into their slots (after every rank agreed)."""
    incoming = [t for t in plan if t.dst_rank == rank]
    for x, s in zip(tensors, staged, strict=True):
        for i, t in enumerate(incoming):
            x[t.dst_slot].copy_(s[i])


@dataclass(frozen=True, kw_only=True, eq=False)
class RebalanceResult:
    """What ``EPMoE.rebalance`` did: the new placement, the group's transfers between ranks
    (``moved``) and inside ranks (``copied``), and the bytes this rank received."""

    placement: ReplicatedPlacement
    moved: int
    copied: int
    received_bytes: int


def agree_placement(mine: ReplicatedPlacement | Exception, rank: int, group,
                    timeout_s: float | None) -> ReplicatedPlacement:
    """Collective (before any weight moves): every rank's new placement, or its refusal. A rank
    whose table is bad raises its own error, the others ``PeerRefusal`` naming it; tables that
    differ between ranks raise on every rank."""
    from rocm_moe.comm.base import PeerRefusal

    peers.check_usable(group, "rebalance")
    entry = ("refused", str(mine)) if isinstance(mine, Exception) \
        else ("ok", mine.phys_to_log.tolist())
    everyone: list = [None] * dist.get_world_size(group)
    _collective(group, "rebalance (placement exchange)", lambda: dist.all_gather_object(
        everyone, entry, group=group), timeout_s)
    if isinstance(mine, Exception):
        raise mine
    refused = [r for r, (kind, _) in enumerate(everyone) if kind == "refused"]
    if refused:
        raise PeerRefusal(error_message(
            "rebalance on rank", rank, f"rank(s) {refused} refused their new placement, so no "
            "rank moves any expert", f"read rank {refused[0]}'s error: it names the bad input"))
    if len({tuple(v) for _, v in everyone}) > 1:
        shown = {r: v[:8] for r, (_, v) in enumerate(everyone)}
        raise ValueError(error_message(
            "phys_to_log by rank", shown, "every rank of the EP group must pass the same new "
            "placement", "compute it on every rank from layer.expert_load(scope='group') with "
            "the same deterministic algorithm, or broadcast one rank's"))
    return mine
