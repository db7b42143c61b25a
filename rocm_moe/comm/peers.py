"""What a rank says when its EP group fails: which peer failed, and at which stage.

A collective that fails on gloo says "Connection closed by peer [127.0.0.1]:1970" or "Timed out
waiting 300000ms for recv", naming no rank; on NCCL it hangs until the timeout. This module turns
that into a ``PeerFailure`` naming the failing rank and the stage, at no cost on the hot path:

- every rank that fails (a collective raised, its experts raised between dispatch and combine,
  it refused a batch, its worker raised) posts ONE record per group, its first on that group,
  to the rendezvous store of the default process group (``post``): stage, batch, kind and
  error. Records are keyed by the group (its name and ranks), so a process that carries on
  with a new group after a failure (``dist.new_group``) starts with a clean slate there: its
  old group's records are never read for the new one. A record posted without a group (the
  launcher's worker raised) stands for every group of that process, which is ending;
- a rank whose collective raised posts its own record, then waits up to ``report_wait`` seconds
  for every peer's (``failure``): a peer with a record other than a failed collective is the
  cause; a peer with no record exited without one (``os._exit``, a native crash, a kill) or is
  stalled outside any collective; if every peer failed in a collective too, this rank is the
  likely late one (stalled past the group's timeout).

Nothing runs unless a collective has already failed: no extra collective, no store access per
forward. A group that failed, or that one of its batches left between dispatch and combine
(``abandon``), is marked broken on this rank: its next dispatch raises at once instead of
issuing a collective its peers would pair with the wrong one (gloo then delivers a short
message into a larger buffer silently: the peer returned NaN rows).

Ranks are global ranks (those of the default group), as in every rank's own logs.
"""

from __future__ import annotations

import json
import time
import weakref

import torch.distributed as dist

PREFIX = "rocm_moe/fault/"
PROCESS = "process"  # the scope of a record posted without a group (it stands for all of them)
REPORT_WAIT_S = 10.0  # longest wait for the peers' records (capped by the group's timeout)
# Keyed by the group object itself (weakly): an id() could be reused by a later group once the
# first is collected, which would then be refused as broken.
_BROKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> why it is unusable
_LEFT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> batches left


class PeerFailure(RuntimeError):
    """A collective of the EP group failed, or the group is unusable on this rank. ``stage``:
    where it failed; ``culprits``: the global ranks named as the cause (may be empty)."""

    def __init__(self, message: str, *, stage: str, culprits: tuple[int, ...] = ()):
        super().__init__(message)
        self.stage = stage
        self.culprits = culprits


def _store():
    """The default group's rendezvous store, or None (no group, or a torch without it)."""
    try:
        from torch.distributed import distributed_c10d as c10d

        return c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # a private API: never let the report itself fail
        return None


def short(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def scope(group) -> str:
    """The key of ``group``'s records: its name and global ranks, the same on every rank (torch
    names groups in the order ranks create them, which must be the same on every rank);
    ``PROCESS`` for ``None``."""
    if group is None:
        return PROCESS
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:
        ranks = range(dist.get_world_size())
    return f"{getattr(group, 'group_name', '')}:{'-'.join(map(str, ranks))}"


def post(*, stage: str, kind: str, error: str, batch: int | None = None, group=None) -> None:
    """This rank's record on ``group`` (the first one only: later failures on that group only
    follow from it). ``group=None``: a record for every group (the worker raised; the process
    ends).

    ``kind``: "collective" (a collective raised), "abandoned" (left a batch between dispatch and
    combine), "refused" (a bad batch or input, raised before any payload moved), "raised" (the
    worker raised outside the layer)."""
    store = _store()
    if store is None:
        return
    rank = dist.get_rank()
    key = f"{PREFIX}{scope(group)}/{rank}"
    try:
        if store.add(f"{key}/n", 1) == 1:
            store.set(key, json.dumps(dict(stage=stage, kind=kind, error=error, batch=batch)))
    except Exception:  # the store's host may be the rank that died
        pass


def _read(store, where: str, rank: int) -> dict | None:
    """``rank``'s record on the group of scope ``where``, else its process-wide one."""
    for key in (f"{PREFIX}{where}/{rank}", f"{PREFIX}{PROCESS}/{rank}"):
        if store.check([key]):
            return json.loads(store.get(key))
    return None


def _collect(group, peers: list[int], wait_s: float) -> tuple[dict[int, dict], str | None]:
    """The peers' records on ``group``, waiting up to ``wait_s`` for all of them; (records,
    store problem)."""
    store = _store()
    if store is None:
        return {}, "no rendezvous store to read the peers' records from"
    found: dict[int, dict] = {}
    where = scope(group)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            for r in peers:
                if r not in found and (rec := _read(store, where, r)) is not None:
                    found[r] = rec
            if len(found) == len(peers) or time.monotonic() >= deadline:
                return found, None
            time.sleep(0.05)
    except Exception as exc:
        return found, f"the rendezvous store stopped answering ({short(exc, 120)}): its host " \
                      "(rank 0 or the launcher) is gone"


_KIND = {"abandoned": "left", "refused": "refused its input at", "raised": "raised in",
         "collective": "failed in a collective at"}


def _describe(rank: int, rec: dict) -> str:
    batch = f" of batch {rec['batch']}" if rec.get("batch") is not None else ""
    return f"rank {rank} {_KIND.get(rec['kind'], rec['kind'])} {rec['stage']}{batch} " \
           f"({rec['error']})"


def failure(group, *, stage: str, batch: int | None, exc: BaseException,
            timeout_s: float | None) -> PeerFailure:
    """Called when a collective of ``group`` raised ``exc`` on this rank: post this rank's
    record, read the peers' and return the PeerFailure to raise (the group is marked broken)."""
    me = dist.get_rank()
    post(stage=stage, kind="collective", error=short(exc), batch=batch, group=group)
    try:
        peers = [r for r in dist.get_process_group_ranks(group) if r != me]
    except Exception:
        peers = [r for r in range(dist.get_world_size()) if r != me]
    wait_s = min(REPORT_WAIT_S, timeout_s or REPORT_WAIT_S)
    found, store_problem = _collect(group, peers, wait_s)
    causes = {r: rec for r, rec in found.items() if rec["kind"] != "collective"}
    silent = [r for r in peers if r not in found]
    if causes:
        culprits = tuple(sorted(causes))
        why = "; ".join(_describe(r, causes[r]) for r in culprits)
        fix = f"read rank {culprits[0]}'s own error above: it is the cause"
    elif silent:
        culprits = tuple(silent)
        why = (f"rank(s) {silent} left no record within {wait_s:.0f} s: exited without one "
               "(os._exit, a native crash, killed) or stalled outside any collective"
               + (f" ({store_problem})" if store_problem else ""))
        fix = (f"read rank {silent[0]}'s log; if it is only slow, raise the group's timeout "
               "(TorchDispatcher(timeout=...), default 300 s)")
    else:
        culprits = ()
        why = ("every peer had already failed in a collective (" +
               "; ".join(_describe(r, found[r]) for r in sorted(found)) +
               "): this rank is likely the late one, stalled past the group's timeout")
        fix = "find what held this rank back, or raise the group's timeout " \
              "(TorchDispatcher(timeout=...), default 300 s)"
    batch_txt = f" of batch {batch}" if batch is not None else ""
    message = (f"rank {me}: {stage}{batch_txt} failed ({short(exc, 160)}): {why}. Fix: {fix}")
    mark_broken(group, message)
    return PeerFailure(message, stage=stage, culprits=culprits)


def everyone_left(group, wait_s: float) -> bool:
    """Called by a rank leaving a batch between dispatch and combine: whether every rank of
    ``group`` leaves that same batch within ``wait_s`` (an error every rank raises, such as a
    combine_raw the experts cannot feed): then the group is still in step. The ranks compare
    the count of batches each left on the group, in the store; only this error path pays."""
    store = _store()
    if store is None:
        return False
    try:
        ranks = dist.get_process_group_ranks(group)
        n = _LEFT[group] = _LEFT.get(group, 0) + 1
        tag = f"{PREFIX}left/{scope(group)}/{n}/"
        store.set(tag + str(dist.get_rank()), "1")
        keys = [tag + str(r) for r in ranks]
        deadline = time.monotonic() + wait_s
        while not store.check(keys):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True
    except Exception:
        return False


def mark_broken(group, why: str) -> None:
    _BROKEN.setdefault(group, why)  # the first reason is the cause


def is_broken(group) -> bool:
    return group in _BROKEN


def check_usable(group, stage: str) -> None:
    """Raise at once if this rank must not issue collectives on ``group`` any more (one dict
    lookup: the only cost on the hot path)."""
    why = _BROKEN.get(group)
    if why is not None:
        raise PeerFailure(
            f"rank {dist.get_rank()}: {stage} refused: the EP group is unusable on this rank "
            f"({why}); a rank cannot skip a step of a collective sequence, its peers would "
            "pair this collective with another one. Fix: do not catch the error and carry on: "
            "restart every rank (a new process group)", stage=stage)


def forget(group) -> None:
    """Drop ``group``'s broken mark (its records in the store stay: a group that failed is not
    used again; carry on with a new group)."""
    _BROKEN.pop(group, None)
