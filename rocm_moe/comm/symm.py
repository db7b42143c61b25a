"""Device-initiated dispatch/combine on torch symmetric memory: no host round trip, CUDA-graph
capturable. MORI's semantics, exactly as the torch backend (rocm_moe.comm.torch) has them.

Every rank allocates one symmetric buffer once (sized from ``max_tokens_per_rank``, called cap
below) that every peer can address directly:

    recv   [W * cap, row words] int32   rows received, as they travel (``_to_wire``'s payload:
                                        x itself, or FP8 values and scales, ``comm.wire``),
                                        each padded to 16 bytes
    ids    [W * cap, K] int32           their global ids, and
    weights [W * cap, K] float32        their routing weights, each in a section of its own
                                        (contiguous [R, K] results: no experts backend copies
                                        them, issue 33: two copies of the strided ids and
                                        weights cost 1.5-2.0 us each per decode layer)
    token  [W * cap] int32              each received row's token index on its source rank
    back   [2, W * cap, H] x.dtype      partials returned to this rank: rank d's row j for the
                                        j-th token this rank sent to d lands on row d * cap + j
                                        of one half (combine); slot k of token t on row
                                        t * P + k % P (combine_raw, P = min(W, K) slots a
                                        push); consecutive pushes alternate halves
    counts [W, W] int32                 row s: tokens rank s sends to each rank
    flags  [W] int32                    barrier signals, one per peer

Dispatch (three launches, nothing read on the host):
  1. ``route_counts``: the owner ranks of each token's slots (a token goes once to each unique
     owner) and its index among the tokens sent to each owner; each rank writes its [W] send
     counts into every peer's count matrix, then a barrier: every rank holds the whole matrix;
  2. ``pack_put``: each token's payload, ids and weights are written straight into each
     owner's receive, ids and weights sections at row (tokens that lower ranks send there) +
     (its index): received rows are compact and ordered by (source rank, token), as with the
     torch backend, so repeats are bit-identical;
  3. ``barrier_scrub``: a barrier (every rank's rows have arrived) while other programs mark
     every row at or past R empty (ids -1, weights 0).
The received row count R stays on the device (``DispatchResult.num_valid``). The result is
capacity-sized: ``x`` [W * cap, H] (a strided view of the receive section), and rows past R
have every id -1 (empty slots), which every experts backend already skips: nothing is computed
for them and nothing reads their stale x.

Combine: each expert rank pushes the partial of each received row i < R (read on the device)
to row ``d * cap + j`` of its source's back section; a barrier; each rank sums its tokens'
partials in float32 in rank order (``rows.gather_sum``, the torch backend's kernel) and casts
once. combine_raw pushes P = min(W, K) slots at a time (one push for K <= W, e.g. DeepSeek-V3 at
EP8; issue 28: it was one push, barrier and sum per slot k): each expert rank sends every local
slot k of the round's P of received row i straight to row ``token(i) * P + k % P`` of the
source's back section (a slot has one owner, so every valid [t, k] is written once, and T * P
rows fit the W * cap of a half), a barrier, and the owner copies those P slots of its [T, K, H]
out, zeros for empty slots.
The back section has two halves used in turn: a rank may push the next partials (another
combine of the same batch, combine_raw's next round) while a slower peer still reads the other
half; any two uses of one half are separated by a barrier every rank passes after the first use
(the next dispatch's, or the other half's push), so no extra barrier is needed. (The half is
chosen on the host: a CUDA graph that captures an odd number of pushes and no dispatch, replayed
back to back, would use one half twice in a row; the layer's graphs hold a dispatch each.)

Buffers are reused: DispatchResult tensors are views that the next dispatch into the same
receive section overwrites (as MORI's are); one batch is in flight per dispatcher, or
``batches_in_flight`` (each in its own receive section and count matrix, a "lane", taken lowest
free first; combine refuses a handle whose lane was reused). Two in flight (the micro-batch
overlap of ``rocm_moe.overlap``) keep the race-free order above: their comm kernels run on one
stream in the same order on every rank (D0 D1 C0 D2 C1 ...), a lane is dispatched into again
only after its batch's combine barrier (which every rank passes after its experts read the
lane), and a lane's count matrix is rewritten only after that barrier too (the next dispatch
into the other lane may run while a slow peer still reads this lane's counts).
Every barrier spins a bounded number of times; a peer that never arrives is recorded on the
device and reported by rank (``check_peers``, run by every validated dispatch) instead of a
hang.

Nothing here is vendor-specific (torch symmetric memory runs on ROCm through HIP VMM or MORI's
allocator; the kernels use plain pointers and system-scope atomics), but only NVIDIA GPUs have
run it.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rocm_moe._checks import check_integer_value, error_message, value_checks_allowed
from rocm_moe._libs import triton_missing
from rocm_moe.comm import rows, wire
from rocm_moe.comm.base import (
    CombineHandle,
    Dispatcher,
    DispatchResult,
    check_agreement,
    check_dispatcher_args,
    check_row_bytes,
    group_hosts,
    join_group,
    local_refusal,
)
from rocm_moe.placement import Placement
from rocm_moe.weighting import local_slots

_ALIGN = 256  # bytes; sections start aligned
BLOCK_WORDS = 1024  # pack kernel: row words per program
BLOCK_H = 1024  # push kernel: hidden elements per program
PUSH_ROWS = 4  # push kernel: rows per program and step
PUSH_PROGRAMS = 512  # push kernel: programs over the rows at most (each loops over blocks)
SCRUB_ROWS = 64  # rows per program marking rows past R empty
# Barrier spin bound: minutes (a peer may be late by seconds of host work, a Triton compile or a
# slow rank's Python; 1 << 22, about a second, timed out such healthy waits).
DEFAULT_SPIN = 1 << 30


@dataclass(frozen=True, kw_only=True, eq=False)
class SymmCombineHandle(CombineHandle):
    pos: torch.Tensor  # [T, W] int64: back-section row of token t's partial from rank d, or -1
    recv_from: torch.Tensor  # [W] int32: rows received from each rank (rank order)
    num_valid: torch.Tensor  # [1] int32: R, rows received (on the device)
    lane: int  # the receive buffers (of ``batches_in_flight``) this batch's rows are in


def _round_up(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


def _check_one_host(group) -> None:
    """Collective: every rank of ``group`` on one host (all raise together if not)."""
    hosts = group_hosts(group)
    if len(set(hosts)) > 1:
        raise ValueError(error_message(
            "EP group hosts", sorted(set(hosts)), "the symm backend's puts are peer-to-peer "
            "loads/stores, which reach the GPUs of one host only",
            "use comm='torch' (or 'mori') for a group that spans nodes"))


@dataclass(frozen=True)
class BufferLayout:
    """Where each section of the symmetric buffer lies (bytes; see the module docstring)."""

    row_words: int  # 32-bit words of one received row (the payload, padded to 16 bytes)
    sizes: dict[str, int]  # section -> bytes (all lanes)
    lane_bytes: dict[str, int]  # per-lane section -> bytes of one lane (each starts aligned)
    offsets: dict[str, int]  # section -> byte offset of its first lane
    total: int


def buffer_layout(world_size: int, max_tokens_per_rank: int, hidden_size: int, top_k: int,
                  dtype: torch.dtype, *, payload: tuple[int, torch.dtype] | None = None,
                  batches_in_flight: int = 1) -> BufferLayout:
    """The symmetric buffer's sections for these sizes (pure: what ``SymmDispatcher``
    allocates and ``pool.comm_bytes`` reports). ``payload``: (P, dtype) of the [T, P] rows as
    they travel (``comm.wire``); default x itself, [T, H] in ``dtype``. Per lane
    (``batches_in_flight``): a receive section, the ids, weights and token sections, a count
    matrix, each starting aligned; one back section and one set of flags for all."""
    W, cap, H, K, L = world_size, max_tokens_per_rank, hidden_size, top_k, batches_in_flight
    P, wire_dtype = payload or (H, dtype)
    words = rows.row_words(P, wire_dtype, 0)  # the payload alone, padded to 16 bytes
    lane = {"recv": _round_up(W * cap * words * rows.WORD), "ids": _round_up(W * cap * K * 4),
            "weights": _round_up(W * cap * K * 4), "token": _round_up(W * cap * 4),
            "counts": _round_up(W * W * 4)}
    sizes = {name: L * n for name, n in lane.items()}
    sizes["back"] = 2 * W * cap * H * dtype.itemsize
    sizes["flags"] = W * 4
    offsets, total = {}, 0
    for name, size in sizes.items():
        offsets[name] = total
        total += _round_up(size)
    return BufferLayout(row_words=words, sizes=sizes, lane_bytes=lane, offsets=offsets,
                        total=total)


class SymmDispatcher(Dispatcher):
    """Dispatch/combine over torch symmetric memory with Triton kernels; CUDA-graph safe.

    Args:
        placement: expert ownership; ``placement.world_size`` must equal the group's size.
        hidden_size, top_k, dtype: what every batch must have (they size the buffers).
        max_tokens_per_rank: capacity per rank (required): a rank receives at most
            W x max_tokens_per_rank rows; a larger batch is refused before anything moves.
        group: the EP process group (default: the default group). All its ranks must be on one
            node with peer access (NVLink / xGMI).
        fp8_dtype: the wire format (``comm.wire``): None, rows in ``dtype``; "e4m3fn" (or
            "e4m3fnuz" on ROCm), FP8 rows quantised on their owner in one launch, received as
            ``quant.FP8Rows`` views of the receive section (combine stays in ``dtype``).
        spin_limit: bound of every barrier spin (iterations); a peer that does not arrive within
            it is reported by ``check_peers``.
        batches_in_flight: batches held dispatched and not combined at once (1, or 2 for
            ``EPMoE(micro_batches >= 2)``, whose next micro-batch is dispatched while the last
            one's experts run): each has its own receive section and count matrix at full
            capacity (double buffering: + W x max_tokens_per_rank rows of memory), not two
            halves of one (a layer sharing the dispatcher without micro-batches keeps the whole
            capacity, and an odd capacity splits into no two equal halves). The partials' back
            section and the barrier flags stay shared: every rank runs its comm in one order,
            on one stream.

    Construction is collective (configuration check, then the symmetric allocation).
    """

    name = "symm"
    holds_batch = True  # DispatchResult tensors are views of the symmetric buffers

    @classmethod
    def availability(cls) -> str | None:
        """None if this backend can run in this process, else why not."""
        if (reason := triton_missing()) is not None:
            return reason
        if not torch.cuda.is_available():
            return "no CUDA/ROCm device (symmetric memory maps GPU memory of peer GPUs)"
        if importlib.util.find_spec("torch.distributed._symmetric_memory") is None:
            return f"torch {torch.__version__} has no torch.distributed._symmetric_memory"
        return None

    def __init__(
        self,
        placement: Placement,
        *,
        hidden_size: int,
        top_k: int,
        dtype: torch.dtype,
        max_tokens_per_rank: int,
        group: dist.ProcessGroup | None = None,
        spin_limit: int = DEFAULT_SPIN,
        fp8_dtype: str | torch.dtype | None = None,
        batches_in_flight: int = 1,
    ):
        def check():
            check_dispatcher_args(hidden_size=hidden_size, top_k=top_k, dtype=dtype,
                                  max_tokens_per_rank=max_tokens_per_rank, required=True)
            self._set_wire(fp8_dtype, dtype)
            self._set_batches_in_flight(batches_in_flight)
            self._check_args(spin_limit, max_tokens_per_rank)
            check_row_bytes(hidden_size, dtype)

        refusal = local_refusal(check)  # (sent to the peers in check_agreement)
        group, rank = join_group(placement, group or dist.group.WORLD, self.name)
        if refusal is None:
            super().__init__(placement, rank, max_tokens_per_rank=max_tokens_per_rank,
                             hidden_size=hidden_size, top_k=top_k, dtype=dtype)
        self.group = group
        self.spin_limit = spin_limit
        check_agreement(self, group, refusal)
        _check_one_host(group)
        self.device = self._rank_device()
        self._allocate()
        self.expert_map_on(self.device)  # built now: its first use may be inside a graph capture

    def _check_args(self, spin_limit: object, max_tokens_per_rank: object) -> None:
        if self.fp8_dtype == torch.float8_e4m3fnuz and torch.version.hip is None:
            raise ValueError(error_message(
                "fp8_dtype", "e4m3fnuz", "NVIDIA Triton has no e4m3fnuz type (fp8e4b8 is "
                "AMD-only), so the rows cannot be quantised to it here",
                "pass fp8_dtype='e4m3fn'"))
        if (reason := self.availability()) is not None:
            raise ValueError(error_message("comm backend", "'symm'", f"unavailable: {reason}",
                                           "use the torch backend (TorchDispatcher)"))
        check_integer_value("spin_limit", spin_limit, minimum=1)
        if not spin_limit < 2**31:
            raise ValueError(error_message("spin_limit", spin_limit, "must be in [1, 2**31)",
                                           "keep the default (minutes) or pass a smaller bound"))
        if max_tokens_per_rank is None:
            raise ValueError(error_message(
                "max_tokens_per_rank", None, "the symm backend sizes its fixed buffers from it",
                "pass the largest batch a rank will send (e.g. the engine's max batched tokens)"))

    # ---- buffers ----------------------------------------------------------------------------
    def _allocate(self) -> None:
        import triton

        W, cap, H, K = self.world_size, self.max_tokens_per_rank, self.hidden_size, self.top_k
        L = self.batches_in_flight
        P, wire_dtype = self._wire_format()
        lay = buffer_layout(W, cap, H, K, self.dtype, payload=(P, wire_dtype),
                            batches_in_flight=L)
        self.row_words, self.offsets, self._lane_bytes = lay.row_words, lay.offsets, lay.lane_bytes
        buf, ptrs = self._map_buffer(lay.total)
        self._buf, self._ptrs = buf, ptrs

        def section(name, dtype, shape, lane=0):
            o = self.offsets[name] + lane * self._lane_bytes.get(name, 0)
            n = self._lane_bytes.get(name, lay.sizes[name])
            return buf[o:o + n].view(dtype)[:math.prod(shape)].view(shape)

        self._recv_views, self._counts, self._tokens = [], [], []
        for lane in range(L):
            recv = section("recv", torch.int32, (W * cap, self.row_words), lane)
            payload = recv[:, :P * wire_dtype.itemsize // rows.WORD].view(wire_dtype)
            # (x [W * cap, H], ids [W * cap, K], weights [W * cap, K]): the lane's views
            self._recv_views.append((self._from_wire(payload),
                                     section("ids", torch.int32, (W * cap, K), lane),
                                     section("weights", torch.float32, (W * cap, K), lane)))
            self._counts.append(section("counts", torch.int32, (W, W), lane))
            self._tokens.append(section("token", torch.int32, (W * cap,), lane))
        self._rows_of: list[int | None] = [None] * L  # the batch whose rows each lane holds
        self._back = section("back", self.dtype, (2, W * cap, H))
        self._half = 0  # the back half the next push uses
        self._status = torch.zeros(W, dtype=torch.int32, device=self.device)
        self._dest1_i32 = self._dest1_on(self.device).to(torch.int32)
        self._w_pow2 = triton.next_power_of_2(W)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # every buffer zeroed before any peer signals

    def _rank_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def _map_buffer(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: this rank's zeroed symmetric buffer of ``nbytes`` (uint8) and the [W]
        int64 base addresses of every rank's buffer as this rank addresses them."""
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        buf.zero_()  # flags start at 0; rows past R are never read, but hold no NaN either
        self._hdl = symm_mem.rendezvous(buf, self.group.group_name)
        return buf, torch.tensor(list(self._hdl.buffer_ptrs), dtype=torch.int64,
                                 device=self.device)

    # ---- health ----------------------------------------------------------------------------
    def check_peers(self) -> None:
        """Raise naming the peers that did not arrive at a barrier of an earlier call (a host
        read: not for the hot path; every validated dispatch runs it)."""
        failed = self._status.nonzero().flatten().tolist()
        if failed:
            raise RuntimeError(error_message(
                "symm dispatcher peers", failed, f"rank {self.rank} waited for them at a barrier "
                f"past spin_limit={self.spin_limit}: they failed, stalled or ran another batch",
                "check those ranks' logs; this dispatcher is unusable now, build a new one"))

    def _barrier(self) -> None:
        from rocm_moe.comm._symm_triton import barrier_kernel

        barrier_kernel[(self.world_size,)](self._ptrs, self.rank, self.offsets["flags"],
                                           self._status, SPIN=self.spin_limit, num_warps=1)

    # ---- dispatch ---------------------------------------------------------------------------
    def _wire_format(self) -> tuple[int, torch.dtype]:
        """(P, dtype) of the [T, P] payload one row travels as (``comm.wire``: x itself,
        [T, H], or packed FP8 rows); P * itemsize must be a multiple of 4 bytes."""
        return wire.wire_format(self.hidden_size, self.dtype, self.fp8_dtype)

    def _to_wire(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, H] rows -> the [T, P] payload that travels (the rows, or FP8 rows quantised in
        one launch); on the device, without host reads (dispatch is captured in CUDA graphs)."""
        return wire.to_wire(x_TH, self.fp8_dtype)

    def _from_wire(self, payload_RP: torch.Tensor):
        """[W * cap, P] received payloads (views of the receive section, built once) ->
        ``DispatchResult.x`` (the rows, or FP8Rows views)."""
        return wire.from_wire(payload_RP, self.hidden_size, self.fp8_dtype, self.dtype)

    def dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, *, validate: bool = True):
        if validate and value_checks_allowed(x_TH):
            self.check_peers()
        if x_TH.device != self.device:
            raise ValueError(error_message(
                "x.device", x_TH.device, f"must be this dispatcher's device {self.device}",
                "move the batch to the rank's GPU (torch.cuda.set_device before building)"))
        return super().dispatch(x_TH, topk_weights_TK, topk_ids_TK, validate=validate)

    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        import triton

        from rocm_moe.comm._symm_triton import (
            barrier_scrub_kernel,
            pack_put_kernel,
            route_counts_kernel,
        )

        T, K = topk_ids_TK.shape
        W, me, cap, dev = self.world_size, self.rank, self.max_tokens_per_rank, self.device
        lane = self._free_lane()  # (the base class records the batch in it after this call)
        off = {name: self.offsets[name] + lane * self._lane_bytes[name]
               for name in ("counts", "recv", "ids", "weights", "token")}
        counts_WW = self._counts[lane]
        ids = topk_ids_TK.contiguous()
        w = topk_weights_TK.contiguous()
        pos_TW = torch.empty(T, W, dtype=torch.int64, device=dev)
        k_pow2 = triton.next_power_of_2(K)
        route_counts_kernel[(W,)](
            ids, self._dest1_i32, pos_TW, self._ptrs, T, K, me, W, cap, off["counts"],
            self.offsets["flags"], self._status, K_POW2=k_pow2, W_POW2=self._w_pow2,
            CHUNK=min(256, max(16, triton.next_power_of_2(T))), SPIN=self.spin_limit, num_warps=4)
        if T:
            x_words = self._to_wire(x_TH).contiguous().view(torch.int32)
            pack_put_kernel[(T, -(-self.row_words // BLOCK_WORDS))](
                x_words, ids, w, pos_TW, counts_WW, self._ptrs, x_words.shape[1], K,
                self.row_words, me, W, cap, off["recv"], off["ids"], off["weights"],
                off["token"], K_POW2=k_pow2, BLOCK=BLOCK_WORDS)
        recv_W = torch.empty(W, dtype=torch.int32, device=dev)
        nvalid = torch.empty(1, dtype=torch.int32, device=dev)
        n_rows = W * cap
        x_R, ids_R, w_R = self._recv_views[lane]
        self._rows_of[lane] = batch_id
        barrier_scrub_kernel[(W + -(-n_rows // SCRUB_ROWS),)](
            self._ptrs, me, W, self.offsets["flags"], self._status, counts_WW, recv_W,
            nvalid, ids_R, w_R, K, n_rows, SPIN=self.spin_limit, K_POW2=k_pow2,
            W_POW2=self._w_pow2, BLOCK_R=SCRUB_ROWS, num_warps=4)
        handle = SymmCombineHandle(
            **self.handle_fields(batch_id=batch_id, x_TH=x_TH, topk_weights_TK=topk_weights_TK,
                                 topk_ids_TK=topk_ids_TK, recv_topk_ids=ids_R,
                                 recv_topk_weights=w_R),
            pos=pos_TW, recv_from=recv_W, num_valid=nvalid, lane=lane)
        return DispatchResult(x=x_R, topk_ids=ids_R, topk_weights=w_R, handle=handle,
                              num_valid=nvalid)

    def abandon(self, handle, stage: str, exc: BaseException) -> None:
        if self._rows_of[handle.lane] == handle.batch_id:  # never combined after this
            self._rows_of[handle.lane] = None
        super().abandon(handle, stage, exc)

    # ---- combine ----------------------------------------------------------------------------
    def _check_live(self, handle) -> None:
        """A batch may be combined again (another weight mode, combine_raw) until a later
        dispatch fills its lane: its received ids and weights are views of the lane, and
        consecutive pushes alternate the back halves (module docstring)."""
        if self._rows_of[handle.lane] != handle.batch_id:
            held = [b for b in self._rows_of if b is not None]
            raise ValueError(error_message(
                "handle.batch_id", handle.batch_id, f"the symm backend's buffers hold batch(es) "
                f"{held} now (batches_in_flight={self.batches_in_flight} per dispatcher; a "
                "later dispatch overwrote this one's rows)",
                "combine each batch before dispatching past the buffers it holds"))

    def _rows_aligned(self) -> bool:
        """Back rows start 16-byte aligned (the section is; H * itemsize keeps every row so)."""
        return self.hidden_size * self.dtype.itemsize % 16 == 0

    def _push_programs(self, handle) -> int:
        """Row programs of a push: enough for the rows this rank expects, W x its own T (the
        received count R is on the device; the programs loop over R's row blocks whatever
        the grid, so a skewed batch only takes more steps), at most ``PUSH_PROGRAMS``. Sized by
        the capacity, a 1-token decode step at 16384 tokens per rank launched 512 programs
        that found nothing to do (issue 33)."""
        rows = min(self.world_size * max(handle.num_tokens, 1),
                   self.world_size * self.max_tokens_per_rank)
        return min(-(-rows // PUSH_ROWS), PUSH_PROGRAMS)

    def _next_half(self) -> tuple[torch.Tensor, int]:
        """The back half the next push writes (this rank's view) and its byte offset."""
        half, self._half = self._half, 1 - self._half
        return self._back[half], self.offsets["back"] + half * self._back[0].numel() * \
            self.dtype.itemsize

    def _push(self, y_RH: torch.Tensor, handle) -> torch.Tensor:
        """Send each valid received row's [H] partial to its source; a barrier; returns this
        rank's back half that holds the partials sent to it."""
        from rocm_moe.comm._symm_triton import push_back_kernel

        H = y_RH.shape[1]
        back, offset = self._next_half()
        push_back_kernel[(self._push_programs(handle), -(-H // BLOCK_H))](
            y_RH, y_RH.stride(0), handle.recv_from, self._ptrs, self.rank, self.world_size,
            self.max_tokens_per_rank, H, offset, ALIGNED=self._rows_aligned(),
            BLOCK_R=PUSH_ROWS, BLOCK_H=BLOCK_H)
        self._barrier()
        return back

    def _combine(self, y_RH, handle):
        if y_RH.stride(1) != 1:
            y_RH = y_RH.contiguous()
        return rows.gather_sum(self._push(y_RH, handle), handle.pos)

    def _combine_raw(self, raw_RKH, handle):
        from rocm_moe.comm._symm_triton import push_raw_kernel

        raw_RKH = raw_RKH.contiguous()
        K, H = raw_RKH.shape[1:]
        T, P = handle.num_tokens, min(self.world_size, K)
        local_RK = local_slots(handle.recv_topk_ids, self.expert_map_on(self.device))
        local_RK = local_RK.to(torch.int8).contiguous()
        out = raw_RKH.new_empty(T, K, H)
        for k0 in range(0, K, P):  # one round for K <= W
            n = min(P, K - k0)
            back, offset = self._next_half()
            push_raw_kernel[(self._push_programs(handle), -(-H // BLOCK_H))](
                raw_RKH, local_RK, handle.recv_from, self._tokens[handle.lane], self._ptrs,
                self.rank, self.world_size, K, H, k0, n, P, offset,
                ALIGNED=self._rows_aligned(), BLOCK_R=PUSH_ROWS, BLOCK_H=BLOCK_H)
            self._barrier()
            got = back[:T * P].view(T, P, H)[:, :n]
            out[:, k0:k0 + n] = torch.where(handle.topk_ids[:, k0:k0 + n, None] >= 0, got,
                                            got.new_zeros(()))
        return out
