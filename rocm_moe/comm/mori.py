"""Dispatch/combine through MORI (ROCm/mori ``mori.ops.EpDispatchCombineOp``) on AMD GPUs.

NOT RUN ON MI300 HARDWARE BY THIS PROJECT: written against MORI's public source
(python/mori/ops/dispatch_combine.py, src/ops/dispatch_combine/) and tested on CPUs against a
fake op that enforces MORI's documented contract (tests/fakes.py). ``rocm-moe sanity
--comm mori`` is the check to run on a machine that has MORI.

What the adapter guarantees at the seams users trip over (see notes/dataflow.md):
- ids reach MORI as int32 and weights as float32, converted by value after range checks, never
  reinterpreted (MORI's binding reads the pointer as int32 with no dtype check);
- T <= max_tokens_per_rank is checked before MORI runs (MORI corrupts silently, mori#356);
- combine always gets this rank's own [T, K] ids, from the handle (never the dispatched ones,
  mori#475), and resets the op (``call_reset=True``) so the next dispatch starts clean;
- MORI's combine only sums: raw expert outputs (``weight_mode="combine"``) are weighted and
  reduced over the rank's local slots by the shared combine stage before MORI sees them;
- MORI keeps one batch's routing inside the op, so one batch may be in flight per dispatcher;
  a handle of another batch is refused instead of combining with the wrong routing;
- ``return_raw`` is refused: MORI's combine returns one summed row per token, not K slots.

Received rows come back in MORI's order (not sorted by source), as views of MORI's buffers that
stay valid until this batch's combine; the combined output is copied out of MORI's buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rocm_moe._checks import error_message
from rocm_moe._libs import rocm_library_missing
from rocm_moe.comm.base import CombineHandle, Dispatcher, DispatchResult, join_group
from rocm_moe.placement import Placement

KERNEL_TYPES = ("IntraNode", "InterNode", "InterNodeV1", "InterNodeV1LL", "AsyncLL")
MORI_DTYPES = (torch.bfloat16, torch.float32)
RAW_REASON = ("MORI's combine returns one summed row per token and one combine per dispatch, so "
              "per-slot [T, K, H] outputs cannot travel back through it")


def mori_config(
    placement: Placement,
    rank: int,
    *,
    hidden_size: int,
    top_k: int,
    dtype: torch.dtype,
    max_tokens_per_rank: int,
    kernel_type: str = "auto",
    gpu_per_node: int = 8,
) -> dict:
    """Keyword arguments of ``mori.ops.EpDispatchCombineConfig`` (kernel_type as a name).

    MORI places expert e on rank e // num_experts_per_rank, so only a contiguous placement can
    be expressed. ``kernel_type="auto"``: IntraNode within one node, InterNodeV1 across nodes.
    """
    def bad(field, value, rule, fix):
        return ValueError(error_message(field, value, rule, fix))

    if not placement.is_contiguous:
        raise bad("placement", "non-contiguous", "MORI owns expert e on rank e // (E / W)",
                  "use Placement.contiguous(E, W) with the mori backend")
    if dtype not in MORI_DTYPES:
        raise bad("dtype", dtype, f"MORI dispatches {MORI_DTYPES}", "run the layer in bf16")
    if max_tokens_per_rank is None or max_tokens_per_rank < 1:
        raise bad("max_tokens_per_rank", max_tokens_per_rank, "MORI sizes its buffers from it",
                  "pass the largest batch a rank will dispatch")
    W = placement.world_size
    if kernel_type == "auto":
        kernel_type = "IntraNode" if W <= gpu_per_node else "InterNodeV1"
    if kernel_type not in KERNEL_TYPES:
        raise bad("kernel_type", repr(kernel_type), f"must be one of {KERNEL_TYPES} or 'auto'",
                  "pick IntraNode within a node, InterNodeV1 / InterNodeV1LL across nodes")
    return dict(
        data_type=dtype, rank=rank, world_size=W, hidden_dim=hidden_size, scale_dim=0,
        scale_type_size=1, max_token_type_size=4,  # float32: the widest dtype dispatched
        max_num_inp_token_per_rank=max_tokens_per_rank,
        num_experts_per_rank=placement.num_experts // W, num_experts_per_token=top_k,
        kernel_type=kernel_type, gpu_per_node=gpu_per_node)


_SHMEM_READY: set[int] = set()


def build_mori_op(config: dict, group: dist.ProcessGroup):
    """Initialise MORI's shmem on ``group`` (once per process) and build the op."""
    try:
        import mori
    except ImportError as exc:
        raise ValueError(error_message(
            "comm backend", "'mori'", f"unavailable: {exc}",
            "install MORI on a ROCm machine (github.com/ROCm/mori) or use comm='torch'")) from exc
    if id(group) not in _SHMEM_READY:
        name = f"rocm_moe_{id(group)}"
        torch._C._distributed_c10d._register_process_group(name, group)
        mori.shmem.shmem_torch_process_group_init(name)
        _SHMEM_READY.add(id(group))
    kw = dict(config)
    kw["kernel_type"] = getattr(mori.ops.EpDispatchCombineKernelType, kw["kernel_type"])
    return mori.ops.EpDispatchCombineOp(mori.ops.EpDispatchCombineConfig(**kw))


@dataclass(frozen=True, kw_only=True, eq=False)
class MoriCombineHandle(CombineHandle):
    pass  # MORI keeps the routing itself; the handle pins the batch and this rank's own ids


class MoriDispatcher(Dispatcher):
    """EP dispatch/combine through a MORI op (one per layer shape; construction is collective).

    Args: as TorchDispatcher, plus ``max_tokens_per_rank`` (required: MORI's buffer size),
    ``kernel_type`` and ``gpu_per_node`` (see ``mori_config``). ``op`` injects a ready op
    (tests use a fake that enforces MORI's contract).
    """

    name = "mori"

    @classmethod
    def availability(cls) -> str | None:
        return rocm_library_missing("mori", "build it from github.com/ROCm/mori on ROCm")

    def __init__(
        self,
        placement: Placement,
        *,
        hidden_size: int,
        top_k: int,
        dtype: torch.dtype,
        max_tokens_per_rank: int,
        group: dist.ProcessGroup | None = None,
        kernel_type: str = "auto",
        gpu_per_node: int = 8,
        op=None,
    ):
        group, rank = join_group(placement, group, self.name)
        self.mori_config = mori_config(placement, rank, hidden_size=hidden_size, top_k=top_k,
                                       dtype=dtype, max_tokens_per_rank=max_tokens_per_rank,
                                       kernel_type=kernel_type, gpu_per_node=gpu_per_node)
        super().__init__(placement, rank, max_tokens_per_rank=max_tokens_per_rank,
                         hidden_size=hidden_size, top_k=top_k, dtype=dtype)
        self.group = group
        self.op = op if op is not None else build_mori_op(self.mori_config, group)
        self._in_flight: int | None = None

    def raw_unsupported_reason(self) -> str | None:
        return RAW_REASON

    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        if self._in_flight is not None:
            raise ValueError(error_message(
                "dispatch", f"batch {batch_id}", f"batch {self._in_flight} is still in MORI: "
                "MORI holds one batch's routing at a time", "combine it before the next dispatch"))
        out_x, out_w, _, out_ids, total = self.op.dispatch(
            x_TH.contiguous(), topk_weights_TK.contiguous(), None, topk_ids_TK.contiguous())
        R = int(total[0])  # one host read: the rows MORI delivered to this rank
        x, ids, w = out_x[:R], out_ids[:R], out_w[:R]
        handle = MoriCombineHandle(**self.handle_fields(
            batch_id=batch_id, x_TH=x_TH, topk_weights_TK=topk_weights_TK,
            topk_ids_TK=topk_ids_TK, recv_topk_ids=ids, recv_topk_weights=w))
        self._in_flight = batch_id
        return DispatchResult(x=x, topk_ids=ids, topk_weights=w, handle=handle)

    def _combine(self, y_RH, handle):
        if self._in_flight != handle.batch_id:
            raise ValueError(error_message(
                "handle.batch_id", handle.batch_id, f"MORI holds batch {self._in_flight}'s "
                "routing; combining another batch would sum the wrong rows",
                "combine each batch right after its own dispatch"))
        out, _ = self.op.combine(y_RH.contiguous(), None, handle.topk_ids, call_reset=True)
        self._in_flight = None
        return out[:handle.num_tokens].clone()  # MORI reuses its output buffer

    def _combine_raw(self, raw_RKH, handle):
        raise ValueError(error_message("return_raw", True, RAW_REASON, "use comm='torch'"))
