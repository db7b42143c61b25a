"""The dispatcher contract every communication backend implements (local, torch, mori).

    dispatch(x_TH, topk_weights_TK, topk_ids_TK) -> DispatchResult
        x [R, H], topk_ids [R, K] int32 GLOBAL, topk_weights [R, K] float32, handle
    combine(ExpertsOutput, handle) -> [T, H]        (owner rank sums the partials)
    combine_raw(ExpertsOutput, handle) -> [T, K, H] (raw per-slot outputs back to the owner)

MORI's semantics are the contract (see notes/dataflow.md): a token goes once to each unique
destination rank (the owners of its top-k experts) carrying its full [K] ids and weights; ids
stay global; combine sums one partial per destination rank and never weights.

Exactly-once weighting (``rocm_moe.weighting``): ``combine`` reads
``ExpertsOutput.weights_applied``. Weighted [R, H] partials are only summed. Raw [R, K, H] outputs
are weighted with the dispatched weights over this rank's local slots (``weight_once``) *before*
the return trip (one row per received row on the wire either way).

Dispatchers are stateless between dispatch and combine: the frozen handle carries everything
combine needs, including this rank's own ids, so combine cannot be given another batch's ids.
All input checks run before any collective, identically on every backend.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_id_range,
    check_integer,
    check_integer_value,
    check_same_device,
    check_tensor,
    check_unique_rows,
    check_weights,
    error_message,
)
from rocm_moe.placement import ExpertMap, Placement
from rocm_moe.weighting import (  # noqa: F401 (weight_and_reduce: its former home)
    ExpertsOutput,
    weight_and_reduce,
    weight_once,
)

_batch_counter = itertools.count()


class PeerRefusal(ValueError):
    """Raised on the ranks whose own batch was fine when another rank of the EP group refused
    its batch: every rank stops before any payload moves (see ``Dispatcher.share_refusal``)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class CombineHandle:
    """Dispatch's record for combine. Backends subclass it to add their routing state."""

    dispatcher_id: int
    batch_id: int
    num_tokens: int  # T on this rank
    num_received: int  # R on this rank
    topk_ids: torch.Tensor  # [T, K] int32: this rank's own ids
    topk_weights: torch.Tensor  # [T, K] float32: this rank's own weights
    recv_topk_ids: torch.Tensor  # [R, K] int32: ids of the received rows
    recv_topk_weights: torch.Tensor  # [R, K] float32: weights of the received rows
    dtype: torch.dtype


@dataclass(frozen=True, kw_only=True, eq=False)
class DispatchResult:
    """Rows this rank must run through its local experts."""

    x: torch.Tensor  # [R, H]
    topk_ids: torch.Tensor  # [R, K] int32, global
    topk_weights: torch.Tensor  # [R, K] float32
    handle: CombineHandle
    # [1] int32 on the device: rows received, where R is a capacity (the symm backend). Rows
    # past it have every id -1 (empty slots, which every experts backend skips). None: all R.
    num_valid: torch.Tensor | None = None

    @property
    def num_received(self) -> int:
        return self.x.shape[0]

    def row_bound(self, num_tokens: int, world_size: int) -> dict:
        """The experts' row-bound keywords of this dispatch: for a capacity-sized one (its row
        count on the device, ``num_valid``) ``num_rows`` and the host's estimate
        ``expected_rows`` (every rank sending ``num_tokens``, at most R), so the experts' cost
        follows the rows received, not the capacity (issue 33); nothing for a dispatch sized
        to its rows. The one place the layer and the engine adapters compute it.

        Example: R = 64 capacity rows, 3 tokens a rank, W = 4 -> ``dict(num_rows=num_valid,
        expected_rows=12)``."""
        for field, value in (("num_tokens", num_tokens), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(error_message(
                    field, repr(value), "must be an int >= 0", "pass the batch's token count "
                    "on this rank and the EP group's size"))
        if self.num_valid is None:
            return {}
        return dict(num_rows=self.num_valid,
                    expected_rows=min(self.x.shape[0], num_tokens * world_size))


def require_placement(placement: object) -> None:
    if not isinstance(placement, Placement):
        raise TypeError(error_message("placement", type(placement).__name__,
                                      "must be a rocm_moe.Placement",
                                      "use Placement.contiguous(E, W)"))


def join_group(placement: Placement, group, backend: str):
    """(group, rank) of a multi-rank backend: torch.distributed must be initialised and the
    group's size must equal the placement's world size."""
    import torch.distributed as dist

    require_placement(placement)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(error_message(
            "torch.distributed", "not initialised", f"the {backend} backend runs on a process "
            "group", "call torch.distributed.init_process_group first (or use torchrun)"))
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    if placement.world_size != world:
        raise ValueError(error_message(
            "placement.world_size", placement.world_size,
            f"must equal the process group's size {world}",
            f"use Placement.contiguous(E, {world})"))
    return group, dist.get_rank(group)


def group_hosts(group) -> list[str]:
    """Collective: the host name of every rank of ``group``, in rank order."""
    import socket

    import torch.distributed as dist

    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return hosts


def check_dispatcher_args(*, hidden_size: object = None, top_k: object = None,
                          dtype: object = None, max_tokens_per_rank: object = None,
                          required: bool = False) -> None:
    """The shape arguments every dispatcher takes (None: not given, where a backend allows it;
    ``required``: hidden_size, top_k and dtype must be given, as the multi-rank backends need
    them): ints >= 1 (not bools, not floats) and a floating torch.dtype; checked before anything
    else, so a wrong one is a TypeError / ValueError naming it, not an AttributeError later."""
    for field, value in (("hidden_size", hidden_size), ("top_k", top_k), ("dtype", dtype)):
        if required and value is None:
            raise TypeError(error_message(field, None, "is required by this backend (its "
                                          "buffers and rows are sized from it)",
                                          f"pass {field}= (the layer's)"))
    for field, value in (("hidden_size", hidden_size), ("top_k", top_k),
                         ("max_tokens_per_rank", max_tokens_per_rank)):
        if value is not None:
            check_integer_value(field, value, minimum=1)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(error_message("dtype", repr(dtype), "must be a floating torch.dtype "
                                      "(the rows' compute dtype)", "pass e.g. torch.bfloat16"))


def local_refusal(check: Callable[[], object]) -> Exception | None:
    """``check()``'s ValueError / TypeError, or None if it passes. Without an initialised
    process group it is raised at once (no peer waits for this rank); with one, the caller
    builds on and sends it through ``check_agreement``, so every rank raises together."""
    try:
        check()
    except (ValueError, TypeError) as err:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise
        return err
    return None


def check_row_bytes(hidden_size: int, dtype: torch.dtype) -> None:
    """Rows travel as 32-bit words (torch and symm backends)."""
    if hidden_size * dtype.itemsize % 4:
        raise ValueError(error_message(
            "hidden_size", hidden_size, f"H * {dtype.itemsize} bytes must be a multiple of 4 "
            "(rows travel as 32-bit words)", "use an even hidden size"))


def check_agreement(dispatcher: Dispatcher, group, refusal: Exception | None = None) -> None:
    """Collective: every rank's ``dispatcher.config()`` must be the same; all ranks raise
    together, naming the field and each rank's value, if not. ``refusal``: this rank's own
    argument error, sent in place of its config (then raised here), so that its peers raise
    too, naming it, instead of waiting for it in the next collective."""
    import torch.distributed as dist

    mine = {"refused": f"{type(refusal).__name__}: {refusal}"} if refusal is not None \
        else dispatcher.config()
    everyone: list[dict | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if refusal is not None:
        raise refusal
    refused = {r: cfg["refused"] for r, cfg in enumerate(everyone) if "refused" in cfg}
    if refused:
        raise ValueError(error_message(
            "dispatcher arguments of rank(s)", sorted(refused), f"were refused there: {refused}",
            "pass valid arguments on every rank (derive them from one model config)"))
    for field in mine:
        values = {r: cfg[field] for r, cfg in enumerate(everyone)}
        if len({repr(v) for v in values.values()}) > 1:
            shown = {r: (v if len(repr(v)) < 60 else f"<{hash(repr(v)) & 0xFFFF:04x}>")
                     for r, v in values.items()}
            raise ValueError(error_message(
                f"dispatcher {field} by rank", shown, "every rank of the EP group must "
                "build its dispatcher with the same configuration",
                "derive it from one model config on every rank"))


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Dispatcher(ABC):
    """Moves tokens to the ranks that own their experts and partial results back.

    Args:
        placement: expert ownership, identical on every rank.
        rank: this process's EP rank.
        max_tokens_per_rank: capacity; a batch with more tokens is refused before any
            collective (MORI silently corrupts past its capacity, mori#356). None = unbounded
            where the backend allows it.
    """

    name: ClassVar[str]
    # The wire format (``comm.wire``): None, rows travel in the compute dtype; an FP8 dtype,
    # FP8 rows of 1x128 groups (a dispatcher built with ``fp8_dtype=``; its ``name`` gains
    # "-fp8").
    fp8_dtype: torch.dtype | None = None
    # True where DispatchResult tensors are views of the dispatcher's persistent buffers (symm,
    # MORI): the next dispatch overwrites them, so one batch may be in flight at a time. A
    # dispatcher shared by every MoE layer of a model (``rocm_moe.comm.pool``) then refuses a
    # layer's dispatch while another layer's batch is not combined yet.
    holds_batch: ClassVar[bool] = False
    # How many batches a ``holds_batch`` dispatcher holds dispatched and not yet combined at
    # once, each in its own buffers (a "lane"): 1, or more where the backend was built with
    # ``batches_in_flight=`` (symm, MORI; EPMoE(micro_batches >= 2) needs 2). Lanes are taken
    # lowest free first, the same on every rank (every rank dispatches and combines in one order).
    batches_in_flight: int = 1

    def __init__(
        self,
        placement: Placement,
        rank: int,
        *,
        max_tokens_per_rank: int | None = None,
        hidden_size: int | None = None,
        top_k: int | None = None,
        dtype: torch.dtype | None = None,
    ):
        require_placement(placement)
        placement.num_local(rank)  # validates rank
        check_dispatcher_args(hidden_size=hidden_size, top_k=top_k, dtype=dtype,
                              max_tokens_per_rank=max_tokens_per_rank)
        self.placement = placement
        self.rank = rank
        self.max_tokens_per_rank = max_tokens_per_rank
        self.hidden_size, self.top_k, self.dtype = hidden_size, top_k, dtype
        self.expert_map = placement.expert_map(rank)
        self._maps: dict[torch.device, ExpertMap] = {}
        self._dest1: dict[torch.device, torch.Tensor] = {}
        # holds_batch: the batch each lane holds (dispatched, not combined), or None
        self._lanes: list[int | None] = [None] * self.batches_in_flight

    def config(self) -> dict:
        """What every rank of a group must agree on (checked at construction by multi-rank
        backends)."""
        n = self.batches_in_flight
        return dict(backend=self.name, num_experts=self.placement.num_experts,
                    placement=self.placement.experts_of_rank, top_k=self.top_k,
                    hidden_size=self.hidden_size, dtype=str(self.dtype),
                    max_tokens_per_rank=self.max_tokens_per_rank,
                    **({} if self.fp8_dtype is None else {"fp8_dtype": str(self.fp8_dtype)}),
                    **({} if n == 1 else {"batches_in_flight": n}))

    def _set_batches_in_flight(self, value: object) -> None:
        """``batches_in_flight`` of a buffer-holding backend, checked before any collective and
        before ``Dispatcher.__init__`` (which sizes the lanes from it)."""
        check_integer_value("batches_in_flight", value, minimum=1,
                            fix="pass 1, or 2 for EPMoE(micro_batches >= 2) (one more set of "
                            "receive buffers)")
        self.batches_in_flight = value

    @property
    def _uncombined(self) -> int | None:
        """The oldest batch held (dispatched, not combined), or None; setting None frees every
        lane (a test's reset after an abandoned batch)."""
        held = [b for b in self._lanes if b is not None]
        return min(held) if held else None

    @_uncombined.setter
    def _uncombined(self, value: None) -> None:
        assert value is None, "only None (free every lane) may be set"
        self._lanes = [None] * self.batches_in_flight

    def _free_lane(self) -> int:
        """The lane the next dispatch fills: the lowest free one (``_check_free`` ran)."""
        return self._lanes.index(None)

    def _holds(self, handle: CombineHandle) -> bool:
        return handle.batch_id in self._lanes

    def _set_wire(self, fp8_dtype: object, dtype: object) -> None:
        """The wire format (``comm.wire``) from the ``fp8_dtype`` argument, checked before any
        collective: FP8 rows name the dispatcher ``<transport>-fp8``."""
        from rocm_moe.comm.wire import check_wire_source, wire_fp8_dtype

        self.fp8_dtype = wire_fp8_dtype(fp8_dtype)
        check_wire_source(dtype, self.fp8_dtype)
        if self.fp8_dtype is not None and not self.name.endswith("-fp8"):
            self.name = f"{self.name}-fp8"

    @classmethod
    def availability(cls) -> str | None:
        """None if this backend can run in this process, else why not (a missing library)."""
        return None

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    def raw_unsupported_reason(self) -> str | None:
        """None if ``combine_raw`` works on this backend, else why not."""
        return None

    def invariant_unsupported_reason(self) -> str | None:
        """None if ``EPMoE(invariant=True)`` can run on this backend, else why not. Invariant
        mode returns each slot's raw output to its token's owner (``combine_raw``), which sums
        the slots in slot order: the backend must move rows without arithmetic."""
        return self.raw_unsupported_reason()

    def expert_map_on(self, device: torch.device) -> ExpertMap:
        if device not in self._maps:
            self._maps[device] = self.expert_map.to(device)
        return self._maps[device]

    def _dest1_on(self, device: torch.device) -> torch.Tensor:
        """[E + 1] int64: entry g + 1 holds owner(g) + 1; entry 0 (id -1) holds 0, so
        ``dest1[ids + 1]`` is owner + 1, or 0 for an empty slot, in one lookup."""
        if device not in self._dest1:
            owner1 = self.placement.owner_E.long() + 1
            self._dest1[device] = torch.cat([owner1.new_zeros(1), owner1]).to(device)
        return self._dest1[device]

    # ---- dispatch -------------------------------------------------------------------------------
    def check_dispatch_inputs(self, x_TH, topk_weights_TK, topk_ids_TK, *, validate: bool = True):
        """The bad-input catalog, shared by every backend; returns contiguous int32 ids,
        which the backend dispatches and the handle keeps for combine (MORI reads the ids'
        data_ptr() as a dense [T, K] array in both, issue 32: a caller's strided view must not
        reach combine as it is)."""
        check_tensor("x", x_TH, shape=(None, self.hidden_size),
                     dtypes=(self.dtype,) if self.dtype else FLOAT_DTYPES,
                     fix=f"pass [T, H={self.hidden_size}] in {self.dtype}, as this dispatcher "
                     "was built for")
        T = x_TH.shape[0]
        check_tensor("topk_ids", topk_ids_TK, shape=(T, self.top_k),
                     fix=f"pass [T={T}, K={self.top_k}] ids; pad unused slots with -1")
        check_integer("topk_ids", topk_ids_TK)
        K = topk_ids_TK.shape[1]
        check_tensor("topk_weights", topk_weights_TK, shape=(T, K), dtypes=(torch.float32,),
                     fix="pass float32 routing weights (rocm_moe.route returns them)")
        check_same_device({"x": x_TH, "topk_ids": topk_ids_TK, "topk_weights": topk_weights_TK})
        cap = self.max_tokens_per_rank
        if cap is not None and T > cap:
            raise ValueError(error_message(
                "x.shape[0]", T,
                f"exceeds max_tokens_per_rank={cap} of this dispatcher (past its capacity "
                "MORI corrupts silently, mori#356)",
                "split the batch or build the dispatcher with a larger max_tokens_per_rank"))
        if validate:
            check_id_range("topk_ids", topk_ids_TK, self.placement.num_experts,
                           allow_minus_one=True)
            check_unique_rows("topk_ids", topk_ids_TK)
            check_weights("topk_weights", topk_weights_TK)
        return topk_ids_TK.to(torch.int32).contiguous()

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, *, validate: bool = True):
        """Send each token to the owners of its experts. See the module docstring.

        A refusal (ValueError / TypeError) on one rank is a refusal on every rank where the
        backend supports it (``share_refusal``): that rank raises its own error, the others
        ``PeerRefusal`` naming it, and no payload moves. Under CUDA-graph capture a backend
        that reads the host (``capture_unsupported_reason``) refuses before anything is
        captured (every rank captures the same step: the refusal is everyone's, unshared)."""
        self._check_capturable()
        try:
            ids = self.check_dispatch_inputs(x_TH, topk_weights_TK, topk_ids_TK,
                                             validate=validate)
            self._check_free()
        except (ValueError, TypeError):
            self.share_refusal()
            raise
        lane = self._free_lane() if self.holds_batch else 0
        d = self._dispatch(x_TH, topk_weights_TK, ids, next(_batch_counter))
        if self.holds_batch:
            self._lanes[lane] = d.handle.batch_id
        return d

    def capture_unsupported_reason(self) -> str | None:
        """None if this dispatcher's dispatch and combine can be captured in a CUDA graph (no
        host read, no host-sized allocation), else why not."""
        return None

    def _check_capturable(self) -> None:
        # (the backend's answer first: graph-safe backends ask CUDA nothing on the hot path)
        if (why := self.capture_unsupported_reason()) is not None and _capturing():
            raise ValueError(error_message(
                f"comm={self.name}", "dispatch under CUDA-graph capture", why,
                "use a graph-safe backend (symm on one host, mori with capacity_sized=True; "
                "the engines' plug-ins: ROCM_MOE_VLLM_COMM / ROCM_MOE_SGLANG_COMM=symm or "
                "mori) or run eagerly (vLLM --enforce-eager, SGLang --disable-cuda-graph)"))

    def _check_free(self) -> None:
        """A backend whose results are views of its buffers takes a batch only once the last
        one is combined (or abandoned): another dispatch would overwrite rows not yet run."""
        if self.holds_batch and None not in self._lanes:
            held = sorted(b for b in self._lanes if b is not None)
            raise ValueError(error_message(
                "dispatch", "a new batch",
                f"batch(es) {held} of this {self.name} dispatcher are dispatched but not "
                f"combined, holding all its batches_in_flight={self.batches_in_flight} "
                "buffers, and their received rows are views of the buffers this dispatch "
                "would overwrite (a dispatcher shared by a model's layers serves one layer at a "
                "time)", "combine each layer's batch before the next layer dispatches, build "
                "the dispatcher with batches_in_flight=2, or give the overlapping batch its own "
                "dispatcher (pool.shared_dispatcher(..., slot=1))"))

    # ---- batches larger than the buffers -------------------------------------------------------
    def num_chunks(self, num_tokens: int, *, group_max_tokens: int | None = None) -> int:
        """How many chunks of at most ``max_tokens_per_rank`` tokens every rank of the group runs
        for a batch of ``num_tokens`` tokens here (the largest count over the group: a rank
        with fewer chunks joins the others with empty ones, so no rank waits alone).

        One rank, or no capacity: a host computation. Several ranks: a collective (one host
        read of a [1] int MAX all-reduce) in eager mode; under CUDA-graph capture no collective
        runs and every rank must fit its batch in one chunk (a graph bucket is at most the
        capacity), else ValueError before anything is captured.

        ``group_max_tokens``: the largest token count of any rank of the group, where the caller
        already holds it (an engine's DP-synchronised counts, e.g. SGLang's
        ``get_dp_global_num_tokens``): then no collective runs."""
        check_integer_value("num_tokens", num_tokens, minimum=0)
        if group_max_tokens is not None:  # checked whatever the group's size
            check_integer_value("group_max_tokens", group_max_tokens, minimum=num_tokens)
        cap = self.max_tokens_per_rank
        mine = 1 if cap is None else max(1, -(-num_tokens // cap))
        if self.world_size == 1 or cap is None:
            return mine
        if group_max_tokens is not None:
            return max(1, -(-group_max_tokens // cap))
        if _capturing():
            if mine > 1:
                raise ValueError(error_message(
                    "num_tokens", num_tokens, f"a captured batch must fit the dispatcher's "
                    f"max_tokens_per_rank={cap} (ranks cannot agree on a chunk count inside a "
                    "CUDA graph)", "capture buckets of at most max_tokens_per_rank tokens"))
            return 1
        return self._agree_max(mine)

    def _agree_max(self, value: int) -> int:
        """Collective: the largest ``value`` over the EP group (multi-rank backends)."""
        import torch.distributed as dist

        group = getattr(self, "group", None)
        dev = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())

    def share_refusal(self) -> None:
        """Collective on multi-rank backends that support it: tell every rank of the group
        that this rank refuses the current batch, in place of the dispatch it will not run (the
        others' dispatch then raises ``PeerRefusal``). The caller raises its own error next.
        Nothing to tell by default (one rank, or a backend without it)."""
        return None

    def abandon(self, handle: CombineHandle, stage: str, exc: BaseException) -> None:
        """This rank leaves ``handle``'s batch between dispatch and combine because ``exc`` was
        raised at ``stage`` (the layer calls it). Multi-rank backends record it for the peers
        waiting in combine and refuse further collectives on the group (``comm.peers``);
        nothing to do on one rank."""
        self._release(handle)

    def _release(self, handle: CombineHandle) -> None:
        self._lanes = [None if b == handle.batch_id else b for b in self._lanes]

    # ---- combine --------------------------------------------------------------------------------
    def _check_handle(self, handle: object, expert_output: object, *, raw: bool) -> None:
        if not isinstance(handle, CombineHandle) or handle.dispatcher_id != id(self):
            raise ValueError(error_message(
                "handle", type(handle).__name__, "must be the handle returned by this "
                "dispatcher's dispatch() for this batch", "pass dispatch(...).handle"))
        if not isinstance(expert_output, ExpertsOutput):
            raise TypeError(error_message(
                "expert_output", type(expert_output).__name__, "must be an ExpertsOutput that "
                "declares whether the routing weights are applied",
                "wrap it: ExpertsOutput(out=y, weights_applied=True)"))
        R, K = handle.recv_topk_ids.shape
        y = expert_output.out
        H = y.shape[-1] if y.dim() else 0
        if raw and expert_output.weights_applied:
            raise ValueError(error_message(
                "expert_output.weights_applied", True, "combine_raw needs raw per-slot outputs",
                "run the experts with mode='raw'"))
        want = (R, H) if expert_output.weights_applied else (R, K, H)
        if tuple(y.shape) != want:
            raise ValueError(error_message(
                "expert_output.out.shape", list(y.shape),
                f"must be {list(want)}: one row per received row of this batch (R={R}); ids or "
                "outputs of another batch were passed (mori#475)",
                "pass the experts' output for dispatch(...).x of the same batch"))
        if y.dtype != handle.dtype:
            raise TypeError(error_message("expert_output.out.dtype", y.dtype,
                                          f"must equal the dispatched dtype {handle.dtype}",
                                          "return outputs in the input dtype"))

    def combine(self, expert_output: ExpertsOutput, handle: CombineHandle) -> torch.Tensor:
        """[T, H] on the owner: weighted partials summed, raw ones weighted once first."""
        self._check_handle(handle, expert_output, raw=False)
        self._check_live(handle)
        y_RH = weight_once(expert_output, handle.recv_topk_weights, handle.recv_topk_ids,
                           self.expert_map_on(expert_output.out.device))
        out = self._combine(y_RH, handle)
        self._release(handle)
        return out

    def combine_raw(self, expert_output: ExpertsOutput, handle: CombineHandle) -> torch.Tensor:
        """[T, K, H] on the owner: slot k's unweighted output from the rank owning expert k;
        zeros for empty slots."""
        self._check_handle(handle, expert_output, raw=True)
        self._check_live(handle)
        out = self._combine_raw(expert_output.out, handle)
        self._release(handle)
        return out

    # ---- backend hooks --------------------------------------------------------------------------
    def _check_live(self, handle: CombineHandle) -> None:
        """Refuse a handle whose received rows are gone (a buffer-holding backend whose later
        dispatch reused them), before anything reads them; nothing to check by default."""
        return None

    @abstractmethod
    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id: int) -> DispatchResult:
        ...

    @abstractmethod
    def _combine(self, y_RH: torch.Tensor, handle: CombineHandle) -> torch.Tensor: ...

    @abstractmethod
    def _combine_raw(self, raw_RKH: torch.Tensor, handle: CombineHandle) -> torch.Tensor: ...

    def handle_fields(self, *, batch_id, x_TH, topk_weights_TK, topk_ids_TK, recv_topk_ids,
                      recv_topk_weights) -> dict:
        """Common CombineHandle fields, for backends building their handle."""
        return dict(dispatcher_id=id(self), batch_id=batch_id, num_tokens=x_TH.shape[0],
                    num_received=recv_topk_ids.shape[0], topk_ids=topk_ids_TK,
                    topk_weights=topk_weights_TK, recv_topk_ids=recv_topk_ids,
                    recv_topk_weights=recv_topk_weights, dtype=x_TH.dtype)
