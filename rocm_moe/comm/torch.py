"""Dispatch/combine over torch.distributed (gloo on CPU, NCCL on NVIDIA, RCCL on ROCm), with
MORI's semantics. This is also the executable specification the MORI adapter is checked against.

Dispatch (two collectives, one host read):
  1. each token goes once to every unique owner rank of its valid slots (ids -1 are ignored; a
     token with no valid slot goes nowhere and combines to zeros); send order is (destination
     rank, token), so every rank receives rows ordered by (source rank, source token);
  2. counts: an asynchronous ``all_to_all_single`` of [W] int64; while it travels the rows are
     packed (``rows.pack_rows``: one Triton kernel on GPUs) into a buffer of the upper-bound
     size; then one host read of the split sizes. The counts double as an error flag: a rank
     that refuses its batch sends -1 to every rank instead (``share_refusal``), so every rank
     raises before any payload moves (that rank its own error, the others ``PeerRefusal``
     naming it), and the group stays in step for the next batch;
  3. payload: one ``all_to_all_single`` of packed rows ``[x row | K int32 ids | K float32
     weights]`` as 32-bit words. The received x, ids and weights are zero-copy strided views
     into the receive buffer (``DispatchResult.x.stride(0)`` may exceed H).

Combine (one collective): each received row's partial [R, H] goes back to its source, which sums
each token's partials in float32 in rank order and casts once (``rows.gather_sum``: one Triton
kernel on GPUs, no atomics), so repeats are bit-identical.

Failure semantics: every collective of a dispatcher runs with a finite timeout,
``DEFAULT_TIMEOUT`` (300 s) on the default group unless ``timeout=`` says otherwise, so a rank
that dies or stalls makes the others fail after at most that long, never hang for gloo's
30-minute default. A failed collective raises ``peers.PeerFailure`` naming the stage and the
failing rank (read from the records failing ranks leave in the rendezvous store, see
``rocm_moe.comm.peers``; nothing is read unless a collective failed). A rank that leaves a batch
between dispatch and combine (``abandon``: its experts raised) marks the group broken: its next
dispatch raises instead of pairing with its peers' combine.

combine_raw (two collectives): only the local slots' raw rows travel back, in (row, slot) order;
the owner places them at [t, k] of a zero [T, K, H].
"""

from __future__ import annotations

import datetime
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rocm_moe._checks import error_message
from rocm_moe.comm import peers, rows, wire
from rocm_moe.comm.base import (
    CombineHandle,
    Dispatcher,
    DispatchResult,
    PeerRefusal,
    check_agreement,
    check_dispatcher_args,
    check_row_bytes,
    join_group,
    local_refusal,
)
from rocm_moe.placement import Placement
from rocm_moe.weighting import local_slots

DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)
# group -> {timeout: the group made over its ranks}; keyed by the group object (weakly), so a
# new group (the recovery after a failure) gets a new one, never the broken one of the group
# before it over the same ranks.
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _group_with_timeout(group: dist.ProcessGroup, timeout: datetime.timedelta):
    """A group over ``group``'s ranks whose collectives time out after ``timeout``; one per
    (group, timeout), shared by every dispatcher (``dist.new_group`` is collective over the
    default group, so every rank must construct its dispatchers in the same order)."""
    made = _GROUPS.setdefault(group, {})
    if timeout not in made:
        made[timeout] = dist.new_group(dist.get_process_group_ranks(group), timeout=timeout)
    return made[timeout]


@dataclass(frozen=True, kw_only=True, eq=False)
class TorchCombineHandle(CombineHandle):
    pos: torch.Tensor  # [T, W] int64: send row of token t to rank d (dest-major), -1 if none
    send_counts: tuple[int, ...]  # [W] rows sent to each rank
    recv_counts: tuple[int, ...]  # [W] rows received from each rank
    owner: torch.Tensor  # [T, K] int64: owner rank of each own slot, -1 if empty


class TorchDispatcher(Dispatcher):
    """Expert-parallel dispatch/combine on a torch.distributed process group.

    Args:
        placement: expert ownership; ``placement.world_size`` must equal the group's size.
        group: the EP process group (default: the default group). Its rank is this rank.
        hidden_size, top_k, dtype: what every batch must have (like MORI's config).
        max_tokens_per_rank: refuse larger batches before any collective (None = unbounded).
        fp8_dtype: the wire format (``comm.wire``): None, rows in ``dtype``; "e4m3fn" or
            "e4m3fnuz", each row quantised once on its owner to FP8 per 1x128 group (received
            as ``quant.FP8Rows`` views, for the FP8 experts; combine stays in ``dtype``).
        timeout: the collective timeout of this dispatcher: a group with this timeout is
            created over the same ranks (every rank of the default group must construct the
            dispatcher then, as ``dist.new_group`` requires; dispatchers share it). Default:
            ``DEFAULT_TIMEOUT`` (300 s) on the default group; a ``group`` passed explicitly
            keeps its own timeout unless ``timeout`` is given.

    Construction is collective: all ranks exchange their configuration and fail together,
    naming the field, if they disagree.
    """

    name = "torch"

    @classmethod
    def availability(cls) -> str | None:
        return None if dist.is_available() else "this torch build has no torch.distributed"

    def __init__(
        self,
        placement: Placement,
        *,
        hidden_size: int,
        top_k: int,
        dtype: torch.dtype,
        group: dist.ProcessGroup | None = None,
        max_tokens_per_rank: int | None = None,
        timeout: datetime.timedelta | None = None,
        fp8_dtype: str | torch.dtype | None = None,
    ):
        timeout_ok = timeout is None or (isinstance(timeout, datetime.timedelta)
                                         and timeout.total_seconds() > 0)

        def check():
            if not timeout_ok:
                raise TypeError(error_message(
                    "timeout", repr(timeout), "must be a datetime.timedelta > 0 (or None: "
                    "300 s)", "pass datetime.timedelta(seconds=...)"))
            check_dispatcher_args(hidden_size=hidden_size, top_k=top_k, dtype=dtype,
                                  max_tokens_per_rank=max_tokens_per_rank, required=True)
            self._set_wire(fp8_dtype, dtype)
            check_row_bytes(hidden_size, dtype)

        refusal = local_refusal(check)  # (sent to the peers in check_agreement)
        timeout = timeout if timeout_ok else None
        if group is None and dist.is_initialized():
            group, timeout = dist.group.WORLD, timeout or DEFAULT_TIMEOUT
        group, rank = join_group(placement, group, self.name)
        self.timeout = timeout
        if refusal is None:
            super().__init__(placement, rank, max_tokens_per_rank=max_tokens_per_rank,
                             hidden_size=hidden_size, top_k=top_k, dtype=dtype)
        # On the caller's group, before the timeout group's collective new_group: a refusing
        # rank never leaves its peers waiting there, and agreeing ranks (the timeout is part of
        # the config) all make it, or all do not.
        check_agreement(self, group, refusal)
        self.group = group if timeout is None else _group_with_timeout(group, timeout)

    def config(self) -> dict:
        return dict(super().config(),
                    timeout_s=None if self.timeout is None else self.timeout.total_seconds())

    def share_refusal(self) -> None:
        """The counts exchange with -1 in place of every count (see the module docstring)."""
        dev = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        flags_W = torch.full((self.world_size,), -1, dtype=torch.int64, device=dev)
        if peers.is_broken(self.group):
            return  # no collective on a broken group: the caller raises its own error next
        self._collective("dispatch (refusal exchange)", None, lambda: dist.all_to_all_single(
            torch.empty_like(flags_W), flags_W, group=self.group))

    def capture_unsupported_reason(self) -> str | None:
        return ("the torch backend reads each batch's split sizes on the host (all_to_all_single "
                "takes host counts), which a CUDA graph cannot capture")

    def _agree_max(self, value: int) -> int:
        """The chunk-count agreement of ``num_chunks`` as an exchange of the same shape as the
        refusal exchange ([W] int64 to every rank): a rank that refuses its batch before it
        (``share_refusal``'s -1) is named here by its peers, which raise PeerRefusal."""
        peers.check_usable(self.group, "dispatch (chunk count)")
        dev = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        send_W = torch.full((self.world_size,), value, dtype=torch.int64, device=dev)
        recv_W = torch.empty_like(send_W)
        self._collective("dispatch (chunk count exchange)", None, lambda: dist.all_to_all_single(
            recv_W, send_W, group=self.group))
        got = tuple(recv_W.tolist())
        self._raise_if_refused(got)
        return max(got)

    def _collective(self, stage: str, batch_id: int | None, run):
        """``run()``; a failure becomes a PeerFailure naming the stage and the failing rank."""
        try:
            return run()
        except Exception as exc:
            if isinstance(exc, (ValueError, TypeError)):
                raise  # a usage error of torch.distributed, not a peer's failure
            timeout_s = self.timeout.total_seconds() if self.timeout else None
            raise peers.failure(self.group, stage=stage, batch=batch_id, exc=exc,
                                timeout_s=timeout_s) from exc

    def abandon(self, handle, stage: str, exc: BaseException) -> None:
        """This rank leaves ``handle``'s batch between dispatch and combine (``exc`` was raised
        at ``stage``): its peers, waiting in combine, will name it; this rank's next dispatch on
        the group raises (see the module docstring). Unless every rank leaves the same batch
        (an error they all raise, checked through the store for up to half the timeout): the
        group is then still in step."""
        timeout_s = self.timeout.total_seconds() if self.timeout else 2 * peers.REPORT_WAIT_S
        if peers.everyone_left(self.group, min(peers.REPORT_WAIT_S, timeout_s / 2)):
            return
        peers.post(stage=stage, kind="abandoned", error=peers.short(exc), batch=handle.batch_id,
                   group=self.group)
        peers.mark_broken(self.group, f"rank {self.rank} left batch {handle.batch_id} between "
                          f"dispatch and combine after {peers.short(exc, 160)} at {stage}")

    def _raise_if_refused(self, recv_counts: tuple[int, ...]) -> None:
        refused = [r for r, c in enumerate(recv_counts) if c < 0]
        if refused:
            raise PeerRefusal(error_message(
                "dispatch on rank", self.rank, f"rank(s) {refused} of the EP group refused "
                "their batch, so every rank stops before any payload moves",
                f"read rank {refused[0]}'s error: it names the bad input"))

    def _a2a(self, out, inp, out_splits, in_splits, *, stage: str = "all_to_all",
             batch_id: int | None = None) -> None:
        self._collective(stage, batch_id, lambda: dist.all_to_all_single(
            out, inp, list(out_splits), list(in_splits), group=self.group))

    # ---- dispatch -------------------------------------------------------------------------------
    def _to_wire(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, H] rows -> the [T, P] payload that travels (``comm.wire``: the rows themselves,
        or packed FP8 rows)."""
        return wire.to_wire(x_TH, self.fp8_dtype)

    def _from_wire(self, payload_RP: torch.Tensor, x_TH: torch.Tensor):
        """Received [R, P] payloads -> ``DispatchResult.x`` (the rows, or FP8Rows views)."""
        return wire.from_wire(payload_RP, x_TH.shape[1], self.fp8_dtype, x_TH.dtype)

    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        peers.check_usable(self.group, "dispatch")
        T, K = topk_ids_TK.shape
        W, dev = self.world_size, x_TH.device
        # dest1 = owner + 1, or 0 for an empty slot (id -1): one lookup in an [E + 1] table.
        dest1_TK = self._dest1_on(dev)[topk_ids_TK + 1]
        send_WT = torch.zeros(W + 1, T, dtype=torch.int64, device=dev)
        send_WT.scatter_(0, dest1_TK.T, 1)  # row 0 collects the empty slots
        # [W, T] (not [T, W]): the scan runs along the contiguous token dimension.
        csum_WT = send_WT[1:].cumsum(1)
        send_counts_W = csum_WT[:, -1].contiguous() if T else csum_WT.new_zeros(W)
        recv_counts_W = torch.empty_like(send_counts_W)
        work = dist.all_to_all_single(recv_counts_W, send_counts_W, group=self.group,
                                      async_op=True)
        # While the counts travel: each (token, destination)'s send row, and the packing.
        payload = self._to_wire(x_TH)
        send, pos_TW = rows.pack_rows(payload, topk_ids_TK, topk_weights_TK, csum_WT,
                                      T * min(W, K))
        self._collective("dispatch (counts exchange)", batch_id, work.wait)
        send_counts, recv_counts = (tuple(c) for c in
                                    torch.stack([send_counts_W, recv_counts_W]).tolist())
        self._raise_if_refused(recv_counts)
        recv = send.new_empty(sum(recv_counts), send.shape[1])
        self._a2a(recv, send[:sum(send_counts)], recv_counts, send_counts,
                  stage="dispatch (payload)", batch_id=batch_id)
        recv_p, recv_ids, recv_w = rows.unpack(recv, payload.shape[1], payload.dtype, K)
        recv_x = self._from_wire(recv_p, x_TH)
        handle = TorchCombineHandle(
            **self.handle_fields(batch_id=batch_id, x_TH=x_TH, topk_weights_TK=topk_weights_TK,
                                 topk_ids_TK=topk_ids_TK, recv_topk_ids=recv_ids,
                                 recv_topk_weights=recv_w),
            pos=pos_TW, send_counts=send_counts, recv_counts=recv_counts, owner=dest1_TK - 1)
        return DispatchResult(x=recv_x, topk_ids=recv_ids, topk_weights=recv_w, handle=handle)

    # ---- combine --------------------------------------------------------------------------------
    def _combine(self, y_RH, handle: TorchCombineHandle):
        peers.check_usable(self.group, "combine")
        back = y_RH.new_empty(sum(handle.send_counts), y_RH.shape[1])
        self._a2a(back, y_RH.contiguous(), handle.send_counts, handle.recv_counts,
                  stage="combine", batch_id=handle.batch_id)
        return rows.gather_sum(back, handle.pos)

    def _combine_raw(self, raw_RKH, handle: TorchCombineHandle):
        peers.check_usable(self.group, "combine_raw")
        R, K, H = raw_RKH.shape
        dev = raw_RKH.device
        local_RK = local_slots(handle.recv_topk_ids, self.expert_map_on(dev))
        per_row = local_RK.sum(1)
        src_of_row = torch.repeat_interleave(
            torch.arange(self.world_size, device=dev),
            torch.tensor(handle.recv_counts, device=dev), output_size=R)
        send_counts_W = torch.zeros(self.world_size, dtype=torch.int64, device=dev)
        send_counts_W.index_add_(0, src_of_row, per_row)
        send = raw_RKH[local_RK]  # [slots, H] in (row, slot) order
        # The owner expects, from each rank d, its slots owned by d in (token, slot) order.
        W, T = self.world_size, handle.num_tokens
        mask_WTK = handle.owner[None] == torch.arange(W, device=dev)[:, None, None]
        expect_W = mask_WTK.sum((1, 2))
        where = mask_WTK.nonzero()  # (d, t, k), lexicographic
        back = raw_RKH.new_empty(where.shape[0], H)
        self._a2a(back, send, expect_W.tolist(), send_counts_W.tolist(), stage="combine_raw",
                  batch_id=handle.batch_id)
        out = raw_RKH.new_zeros(T, K, H)
        out[where[:, 1], where[:, 2]] = back
        return out
