"""Dispatch/combine through MORI (ROCm/mori ``mori.ops.EpDispatchCombineOp``) on AMD GPUs.

NOT RUN ON MI300 HARDWARE BY THIS PROJECT: written against MORI's public source (624002c8,
python/mori/ops/dispatch_combine.py = DC, src/ops/dispatch_combine/, src/shmem/) and tested on
CPUs against a fake ``mori`` that models its lifecycle (tests/fakes.py). ``rocm-moe sanity
--comm mori`` is the check to run on a machine that has MORI.

What the adapter guarantees at the seams users trip over (see notes/dataflow.md):
- ids reach MORI as int32 and weights as float32, converted by value after range checks, never
  reinterpreted (MORI's binding reads the pointer as int32 with no dtype check);
- T <= max_tokens_per_rank is checked before MORI runs (MORI corrupts silently, mori#356);
- combine always gets this rank's own [T, K] ids, from the handle (never the dispatched ones,
  mori#475);
- MORI's combine only sums: raw expert outputs (``weight_mode="combine"``) are weighted and
  reduced over the rank's local slots by the shared combine stage before MORI sees them;
- dispatch outputs are views of MORI's persistent buffers, which the next dispatch overwrites,
  so one batch may be in flight per dispatcher; a handle of another batch is refused;
- ``return_raw`` is refused: MORI's combine returns one summed row per token, not K slots.

Set-up rules of MORI that the adapter checks or follows before MORI runs:
- launch parameters: ops are built in MORI's AUTO launch mode (its tuned MI300X tables per
  token count for IntraNode EP2/4/8 and IntraNodeLL EP8) unless the user sets
  MORI_EP_LAUNCH_CONFIG_MODE (MANUAL: IntraNode's config carries the engines' 80 x 16);
  InterNodeV1 / InterNodeV1LL get MORI's own tested block counts at every call (in MORI's
  default MANUAL mode rdma_block_num stays 0 and no block sends across nodes: the completion
  barrier never fires, internode_v1.cpp ~159, 277, 644);
- AsyncLL is split-phase: ``dispatch_recv()`` follows ``dispatch()`` and ``combine_recv()``
  follows ``combine()`` (DC ~1331, 1731) before anything is read. The adapter calls them back
  to back, so AsyncLL gives no overlap of its own here (and without ``MORI_ENABLE_SDMA=1`` MORI
  moves the data with compute units and warns that it is slow); IntraNode is the one to use in
  a node. ``EPMoE(micro_batches=2)`` overlaps every kernel type's dispatch and combine with the
  other micro-batch's experts on a side stream (``rocm_moe.overlap``; ``batches_in_flight=2``:
  one op per batch in flight, as MORI keeps a batch's routing in its op until combine);
- shmem is initialised once per process (a second init is skipped silently, src/shmem/
  init.cpp ~671): a second, different EP group in one process is refused. The unique id is
  broadcast from the group's first rank (MORI's torch helper uses global rank 0, shmem/api.py
  ~115, which fails for an EP group without it, e.g. DP x EP);
- the op constructor barriers on the default (WORLD) group (DC ~406, 649): with an EP group
  smaller than WORLD, every rank of WORLD must build its MORI dispatchers in the same order (a
  DP x EP model that builds the same layers everywhere does);
- heap: every op takes its buffers from one symmetric heap per process (4 GiB static default,
  include/mori/shmem/internal.hpp ~61); the adapter sizes tokens by the dtype, adds up what the
  process's ops need (each allocation rounded to 256 B, the barrier and chunk flags, shmem's own
  1.25 KiB) and refuses with the ``MORI_SHMEM_HEAP_SIZE`` to set when it is too small; the size
  and mode variables are read as MORI reads them (case-sensitive: "6GIB" is 6 bytes);
- gpu_per_node: derived from the group's hosts; MORI asserts (debug builds only) that it is a
  power of two dividing W (src/ops/dispatch_combine/dispatch_combine.cpp ~117), and at most
  MAX_GPUS_PER_NODE = 8 (the intra-node kernels' per-peer arrays, intranode.hpp ~40); the
  InterNode kernel assumes 8 GPUs per node (internode.hpp ~67), so other node sizes are refused.

Received rows come back in MORI's order (not sorted by source), as views of MORI's buffers that
stay valid until this batch's combine; the combined output is copied out of MORI's buffer.
By default dispatch reads the received row count R on the host once. ``capacity_sized=True``
reads nothing on the host (graph-capturable with ``validate=False``): the result is MORI's whole
receive buffer [W * cap, H] with ``num_valid`` = MORI's device counter, and the ids of rows past
it set to -1 on the device (the package's contract for capacity-sized results, as the symm
backend has it: every experts backend skips empty slots). ``forward_padded`` also hands the
count to AITER as ``num_local_tokens``, so AITER does not even sort the padding.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rocm_moe._checks import error_message
from rocm_moe._libs import rocm_library_missing
from rocm_moe.comm.base import (
    CombineHandle,
    Dispatcher,
    DispatchResult,
    check_agreement,
    check_dispatcher_args,
    group_hosts,
    join_group,
    local_refusal,
)
from rocm_moe.placement import Placement
from rocm_moe.quant import BLOCK, FP8Rows, quantize_rows_on_owner
from rocm_moe.quant import fp8_dtype as _fp8_name

# EpDispatchCombineKernelType (624002c8); IntraNodeLL: the IntraNode buffers with a low-latency
# kernel (dispatch_combine.cpp ~321, intranode_ll.hpp), within one node of at most 8 GPUs.
KERNEL_TYPES = ("IntraNode", "IntraNodeLL", "InterNode", "InterNodeV1", "InterNodeV1LL",
                "AsyncLL")
INTRA_NODE = ("IntraNode", "IntraNodeLL")
MORI_DTYPES = (torch.bfloat16, torch.float32)
MORI_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)  # fp8_ocp, fp8_fnuz
RAW_REASON = ("MORI's combine returns one summed row per token and one combine per dispatch, so "
              "per-slot [T, K, H] outputs cannot travel back through it")
# MORI's own settings for the RDMA kernels (tests/python/ops/test_dispatch_combine_internode_v1.py
# and the AUTO launch mode, DC ~580): block_num blocks, of which rdma_block_num send across nodes.
LAUNCH = {"InterNodeV1": dict(block_num=96, rdma_block_num=64, warp_per_block=8),
          "InterNodeV1LL": dict(block_num=256, rdma_block_num=128, warp_per_block=8)}
# vLLM's and SGLang's IntraNode config values (their MORI set-up; in MORI's MANUAL launch mode
# combine launches the config's, dispatch its own 256 x 16, DC _resolve_launch_params).
INTRANODE_CONFIG = dict(block_num=80, warp_num_per_block=16)
LAUNCH_MODE_VAR = "MORI_EP_LAUNCH_CONFIG_MODE"  # read once, by the op constructor (DC ~535)
GiB = 1 << 30
MAX_GPUS_PER_NODE = 8  # src/ops/dispatch_combine/intranode.hpp ~40, internode.hpp ~31


def _bad(field, value, rule, fix):
    return ValueError(error_message(field, value, rule, fix))


def gpus_per_node(hosts: list[str]) -> int:
    """GPUs per node of an EP group from each rank's host name (rank order): MORI places rank
    r on node r // gpu_per_node, so ranks must be grouped by host, equally, a power of two.

    >>> gpus_per_node(["a"] * 8 + ["b"] * 8)
    8
    """
    W = len(hosts)
    n = hosts.count(hosts[0])
    if W % n or any(hosts[r] != hosts[r - r % n] for r in range(W)) \
            or len(set(hosts)) != W // n:
        raise _bad("EP group hosts", hosts, "MORI puts rank r on node r // gpu_per_node: ranks "
                   "must come in equal, contiguous runs per host",
                   "launch the same number of ranks per node, in node order")
    return n


def mori_config(
    placement: Placement,
    rank: int,
    *,
    hidden_size: int,
    top_k: int,
    dtype: torch.dtype,
    max_tokens_per_rank: int,
    kernel_type: str = "auto",
    gpu_per_node: int | None = None,
    fp8_dtype: torch.dtype | None = None,
    max_total_recv_tokens: int | None = None,
) -> dict:
    """Keyword arguments of ``mori.ops.EpDispatchCombineConfig`` (kernel_type as a name).

    MORI places expert e on rank e // num_experts_per_rank, so only a contiguous placement can
    be expressed. ``gpu_per_node``: None = one node of W GPUs (``MoriDispatcher`` derives it from
    the group's hosts). ``kernel_type="auto"``: IntraNode within one node, InterNodeV1 across.
    Tokens are sized by ``dtype`` (``max_token_type_size``), which halves MORI's buffers in bf16.

    ``max_total_recv_tokens`` (IntraNode, IntraNodeLL): the rows a rank's receive buffers
    hold, W x ceil(M / W) instead of W x max_tokens_per_rank (MORI's config field; past it
    its IntraNode dispatch writes off the buffers; ``MoriDispatcher`` refuses such a batch).

    ``fp8_dtype`` (``comm.mori_fp8``): rows dispatched in that FP8 type with one float32 scale
    per 1x128 group (``scale_dim`` = H / 128, ``scale_type_size`` = 4); ``dtype`` stays the
    combine's (bf16), which sizes the token buffers, since one op serves both directions.
    """
    if not placement.is_contiguous:
        raise _bad("placement", "non-contiguous", "MORI owns expert e on rank e // (E / W)",
                   "use Placement.contiguous(E, W) with the mori backend")
    if dtype not in MORI_DTYPES:
        raise _bad("dtype", dtype, f"MORI dispatches {MORI_DTYPES}", "run the layer in bf16")
    scale_dim, scale_type_size = 0, 1  # no scales (MORI's tests' values)
    if fp8_dtype is not None:
        if fp8_dtype not in MORI_FP8_DTYPES:
            raise _bad("fp8_dtype", fp8_dtype, f"MORI dispatches FP8 as {MORI_FP8_DTYPES} "
                       "(its fp8_ocp / fp8_fnuz kernels)", "pass 'e4m3fnuz' (MI300) or "
                       "'e4m3fn' (MI350)")
        if hidden_size % 128:
            raise _bad("hidden_size", hidden_size, "must be a multiple of 128 for FP8 rows "
                       "through MORI: one float32 scale per 128 columns travels as MORI's "
                       "per-token scales, which AITER's per_1x128 path reads as H / 128 "
                       "whole groups", "pad H to a multiple of 128 or use comm='torch-fp8'")
        scale_dim, scale_type_size = hidden_size // 128, 4
    if max_tokens_per_rank is None or max_tokens_per_rank < 1:
        raise _bad("max_tokens_per_rank", max_tokens_per_rank, "MORI sizes its buffers from it",
                   "pass the largest batch a rank will dispatch")
    W = placement.world_size
    gpn = W if gpu_per_node is None else gpu_per_node
    if gpn < 1 or gpn & (gpn - 1) or W % gpn:
        raise _bad("gpu_per_node", gpn, f"MORI needs a power of two that divides W={W} (it "
                   "asserts so only in debug builds; release builds size node buffers W // "
                   "gpu_per_node)", (f"pass gpu_per_node={W} for one node, or run a power "
                   "of two of ranks on each node") if W & (W - 1) == 0 else
                   f"W={W} is no power of two: pass gpu_per_node=1 (one GPU per node, "
                   "InterNodeV1) or use a power-of-two EP size")
    if gpn > MAX_GPUS_PER_NODE:
        raise _bad("gpu_per_node", gpn, f"MORI reaches at most {MAX_GPUS_PER_NODE} peers "
                   "within a node (per-peer arrays of MAX_GPUS_PER_NODE in intranode.hpp and "
                   "intranode_ll.hpp; past it they overflow)",
                   "run at most 8 ranks per node (an MI300X node has 8 GPUs) and span nodes "
                   "with InterNodeV1 (kernel_type='auto')")
    if kernel_type == "auto":
        kernel_type = "IntraNode" if W == gpn else "InterNodeV1"
    if kernel_type not in KERNEL_TYPES:
        raise _bad("kernel_type", repr(kernel_type), f"must be one of {KERNEL_TYPES} or 'auto'",
                   "pick IntraNode within a node, InterNodeV1 / InterNodeV1LL across nodes")
    if kernel_type in INTRA_NODE and W != gpn:
        raise _bad("kernel_type", repr(kernel_type), f"reaches peers over XGMI within a node; "
                   f"this group spans {W // gpn} nodes", "use kernel_type='auto'")
    if kernel_type == "InterNode" and W > gpn and gpn != MAX_GPUS_PER_NODE:
        raise _bad("kernel_type", "'InterNode'", f"MORI's InterNode kernel puts rank r on node "
                   f"r // MAX_GPUS_PER_NODE ({MAX_GPUS_PER_NODE}) whatever gpu_per_node says "
                   f"(internode.hpp ~67, 140); with {gpn} GPUs per node it would address the "
                   "wrong node", "use kernel_type='auto' (InterNodeV1 reads gpu_per_node)")
    launch = LAUNCH.get(kernel_type, {})
    extra = dict(block_num=launch["block_num"], rdma_block_num=launch["rdma_block_num"],
                 warp_num_per_block=launch["warp_per_block"]) if launch else {}
    if kernel_type in INTRA_NODE:
        extra = dict(INTRANODE_CONFIG)
    if max_total_recv_tokens is not None:
        if isinstance(max_total_recv_tokens, bool) or not isinstance(max_total_recv_tokens, int) \
                or not 1 <= max_total_recv_tokens <= W * max_tokens_per_rank:
            raise _bad("max_total_recv_tokens", max_total_recv_tokens, f"must be an int in [1, "
                       f"W x max_tokens_per_rank = {W * max_tokens_per_rank}] (MORI's receive "
                       "buffers hold W x ceil(M / W) rows)", "pass the most rows one rank may "
                       "receive in a batch, or None for W x max_tokens_per_rank")
        if kernel_type not in INTRA_NODE:
            raise _bad("max_total_recv_tokens", max_total_recv_tokens, f"is adopted for "
                       f"{INTRA_NODE} only: {kernel_type} lays its receive buffers out per "
                       "source rank (internode.hpp ~118), a cap this adapter does not check",
                       "omit it across nodes")
        extra["max_total_recv_tokens"] = max_total_recv_tokens
    return dict(
        data_type=fp8_dtype or dtype, rank=rank, world_size=W, hidden_dim=hidden_size,
        scale_dim=scale_dim, scale_type_size=scale_type_size, max_token_type_size=dtype.itemsize,
        max_num_inp_token_per_rank=max_tokens_per_rank,
        num_experts_per_rank=placement.num_experts // W, num_experts_per_token=top_k,
        kernel_type=kernel_type, gpu_per_node=gpn, **extra)


def launch_mode() -> str:
    """MORI's launch mode for the next op: the user's ``MORI_EP_LAUNCH_CONFIG_MODE`` if set,
    else AUTO, in which MORI launches each dispatch and combine with its tuned values for the
    token count (python/mori/ops/tuning_configs/: MI300X IntraNode EP2/4/8, IntraNodeLL EP8;
    where no table fits, its fixed 128 x 16, or 96/64/8 and 256/128/8 for InterNodeV1 /
    InterNodeV1LL). MANUAL: the config's values (``mori_config``) and the adapter's."""
    mode = os.environ.get(LAUNCH_MODE_VAR)
    if mode is None:
        return "AUTO"
    if mode not in ("MANUAL", "AUTO"):
        raise _bad(LAUNCH_MODE_VAR, repr(mode), "MORI accepts 'MANUAL' or 'AUTO' (upper case; "
                   "its constructor raises otherwise)", f"unset {LAUNCH_MODE_VAR} (the adapter "
                   "then builds its ops in AUTO mode) or set it to AUTO or MANUAL")
    return mode


def launch_description(kernel_type: str, world_size: int, mode: str | None = None) -> str:
    """How MORI launches an op of this kernel type: what ``rocm-moe info`` shows."""
    mode = mode or launch_mode()
    fixed = LAUNCH.get(kernel_type)
    if mode == "AUTO":
        tuned = (kernel_type == "IntraNode" and world_size in (2, 4, 8)) or \
            (kernel_type == "IntraNodeLL" and world_size == 8)
        if tuned:
            return (f"AUTO: MORI's MI300X {kernel_type} EP{world_size} tables, per token count "
                    "(gfx942_mi300x_*.json)")
        if fixed:
            return (f"AUTO: no MI300X table; MORI's fixed {fixed['block_num']} blocks "
                    f"({fixed['rdma_block_num']} RDMA) x {fixed['warp_per_block']} warps")
        return "AUTO: no MI300X table; MORI's fixed 128 blocks x 16 warps"
    if fixed:
        return (f"MANUAL: {fixed['block_num']} blocks ({fixed['rdma_block_num']} RDMA) x "
                f"{fixed['warp_per_block']} warps at every call")
    return (f"MANUAL: dispatch MORI's own 256 x 16; combine the config's "
            f"{INTRANODE_CONFIG['block_num']} x {INTRANODE_CONFIG['warp_num_per_block']}")


HEAP_ALIGN = 256  # the static heap's VA manager aligns every allocation (shmem/memory.cpp ~37)
# Before any op: the static heap starts 256 B in, and shmem's internal sync buffer takes 128 x 8 B
# (src/shmem/init.cpp ~262, ~505).
SHMEM_RESERVED = 256 + 1024


def recv_rows(config: dict) -> int:
    """Rows MORI's receive buffers hold (MaxNumTokensToRecv, dispatch_combine.hpp ~160): W x
    max tokens, or with ``max_total_recv_tokens`` M, W x min(ceil(M / W), max tokens)."""
    W, T = config["world_size"], config["max_num_inp_token_per_rank"]
    M = config.get("max_total_recv_tokens", 0)
    return W * (min(-(-M // W), T) if M > 0 else T)


def _allocations(config: dict) -> list[int]:
    """The symmetric allocations of one op, in bytes (EpDispatchCombineHandle::
    InitializeShmemBuf, InitializeTokenNumSignalBuf, InitializeOrderMapBuf, InitializeBarrier in
    src/ops/dispatch_combine/dispatch_combine.cpp)."""
    W, T, H = config["world_size"], config["max_num_inp_token_per_rank"], config["hidden_dim"]
    K, e, kt = config["num_experts_per_token"], config["num_experts_per_rank"], \
        config["kernel_type"]
    nodes = W // config["gpu_per_node"]
    scale = config["scale_dim"] * config["scale_type_size"]
    tok = H * config["max_token_type_size"]
    xfer = tok + 4 * K + 4 * K + 4 + scale  # row, ids, weights, source token id, scales
    recv, send = recv_rows(config), W * T  # MaxNumTokensToRecv, MaxNumTokensToSend
    out = [recv * tok, T * tok]  # dispatch output, combine output
    if kt in INTRA_NODE:
        out += [recv * xfer]  # combine staging
    elif kt in LAUNCH:  # InterNodeV1(LL): per-node input and staging, receive staging
        out += [nodes * T * xfer, recv * xfer, 2 * nodes * T * xfer, T * xfer]
    else:  # InterNode, AsyncLL: three buffers of W * T transfers
        out += [send * xfer] * 3
    out += [recv * K * 4] * 5  # weights in / dispatch out / combine out; ids in / out
    if scale:
        out += [recv * scale] * 2  # scales in, out
    qp = config.get("num_qp_per_pe", 1)
    out += [W * 4 * 2 * qp] * 2 + [W * 2 * 8 * 2, nodes * 8]  # token-count signals
    out += [4, send * e * 4]  # dispatch offset, dispatched-token -> source-token map
    out += [W * 4 * 2 * 8, nodes * T * 8]  # cross-device barrier, inter-node chunk flags
    return out


def heap_bytes(config: dict) -> int:
    """Symmetric-heap bytes one op of ``config`` takes: its allocations (``_allocations``),
    each rounded up to 256 B.

    DeepSeek-V3 on EP8 (H=7168, K=8, 4096 tokens per rank) in bf16: about 1.0 GB; with 4-byte
    tokens (MORI's examples) about 2.0 GB, half the default 4 GiB heap for one layer.
    """
    return sum(-(-n // HEAP_ALIGN) * HEAP_ALIGN for n in _allocations(config))


def parse_size(text: str) -> int:
    """``MORI_SHMEM_HEAP_SIZE`` as MORI's ParseSizeString reads it (src/shmem/init.cpp ~96):
    the suffixes GiB/gib, MiB/mib, KiB/kib, GB/gb/Gb (and M, K alike), G/g, M/m, K/k, and
    otherwise the leading digits only, so "6GIB" is 6 bytes."""
    three = {"GiB": 30, "gib": 30, "MiB": 20, "mib": 20, "KiB": 10, "kib": 10}
    two = {f"{u}{b}": shift for u, shift in (("G", 30), ("M", 20), ("K", 10))
           for b in ("B", "b")} | {"gb": 30, "mb": 20, "kb": 10}
    shift = three.get(text[-3:]) if len(text) >= 3 else None
    num = text[:-3] if shift is not None else text
    if shift is None and len(text) >= 2 and text[-2:] in two:
        shift, num = two[text[-2:]], text[:-2]
    if shift is None and text and text[-1] in "GgMmKk":
        shift, num = {"g": 30, "m": 20, "k": 10}[text[-1].lower()], text[:-1]
    match = re.match(r"\s*\+?(\d+)", num)
    if match is None:
        raise _bad("MORI_SHMEM_HEAP_SIZE", repr(text), "MORI reads a number with an optional "
                   "G/GB/GiB, M/MB/MiB or K/KB/KiB suffix (std::stoull throws otherwise)",
                   "export e.g. MORI_SHMEM_HEAP_SIZE=8G")
    return int(match.group(1)) << (shift or 0)


def heap_limit() -> int | None:
    """The symmetric heap of this process as MORI will size it (None: no fixed heap).

    MORI_SHMEM_MODE as MORI reads it (src/shmem/init.cpp ~616): 'isolation' / 'ISOLATION'
    has no heap; 'vmm_heap' / 'VMM_HEAP' takes 16 GiB of virtual heap where ROCm >= 7 and the
    GPU support VMM and otherwise falls back to the static heap, which no CPU can tell, so its
    limit here is the fallback's (4 GiB, or MORI_SHMEM_HEAP_SIZE, which sizes both); anything
    else is the static heap."""
    mode = os.environ.get("MORI_SHMEM_MODE", "static_heap")
    if mode in ("isolation", "ISOLATION"):
        return None
    text = os.environ.get("MORI_SHMEM_HEAP_SIZE")
    return 4 * GiB if text is None else parse_size(text)


@dataclass(eq=False)
class _Process:
    """What one process has given MORI (per ``mori`` module, so tests' fakes stay apart)."""

    shmem_ranks: tuple[int, ...] | None = None
    heap_used: int = 0
    ops: int = 0

    def release(self, nbytes: int) -> None:
        self.heap_used -= nbytes


_PROCESS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _import_mori():
    try:
        import mori
    except ImportError as exc:
        raise ValueError(error_message(
            "comm backend", "'mori'", f"unavailable: {exc}",
            "install MORI on a ROCm machine (github.com/ROCm/mori) or use comm='torch'")) from exc
    return mori


def init_shmem(mori, group: dist.ProcessGroup) -> None:
    """MORI's shmem on ``group``, once per process; the unique id goes from the group's first
    rank (MORI's ``shmem_torch_process_group_init`` broadcasts from global rank 0)."""
    state = _PROCESS.setdefault(mori, _Process())
    ranks = tuple(dist.get_process_group_ranks(group))
    if state.shmem_ranks == ranks:
        return
    if state.shmem_ranks is not None:
        raise _bad("group", f"ranks {list(ranks)}", "MORI initialises its shmem once per "
                   f"process (a second init is skipped silently); this process joined ranks "
                   f"{list(state.shmem_ranks)}, so an op on another group would address the "
                   "wrong peers", "build every MORI dispatcher of a process on the same group")
    rank = dist.get_rank(group)
    uid = [mori.shmem.shmem_get_unique_id() if rank == 0 else None]
    dist.broadcast_object_list(uid, src=ranks[0], group=group)
    mori.shmem.shmem_init_attr(mori.shmem.MORI_SHMEM_INIT_WITH_UNIQUEID, rank, len(ranks), uid[0])
    state.shmem_ranks = ranks


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 100 else f"{n} bytes"


def check_heap(mori, config: dict) -> int:
    """Refuse before MORI allocates when this op and the process's earlier ones overflow the
    heap; returns this op's bytes."""
    state = _PROCESS.setdefault(mori, _Process())
    need, limit = heap_bytes(config), heap_limit()
    total = SHMEM_RESERVED + state.heap_used + need
    if limit is not None and total > limit:
        want = -(-(total + GiB // 2) // GiB)  # with half a GiB of headroom
        raise _bad("MORI_SHMEM_HEAP_SIZE", os.environ.get("MORI_SHMEM_HEAP_SIZE", "unset"),
                   f"this op needs {_size(need)} of symmetric heap ({state.ops} earlier ops "
                   f"of this process hold {_size(state.heap_used)}) but the heap has "
                   f"{_size(limit)}; past it MORI's allocation fails",
                   f"export MORI_SHMEM_HEAP_SIZE={want}G before the first MORI op (or lower "
                   "max_tokens_per_rank)")
    return need


def build_mori_op(config: dict, group: dist.ProcessGroup, mori=None):
    """Initialise MORI's shmem on ``group`` (once per process), check the heap, build the op.
    ``mori``: the module (tests pass a fake); returns (op, heap bytes it holds)."""
    mori = mori or _import_mori()
    mode = launch_mode()
    init_shmem(mori, group)
    need = check_heap(mori, config)
    kw = dict(config)
    kw["kernel_type"] = getattr(mori.ops.EpDispatchCombineKernelType, kw["kernel_type"])
    user = os.environ.get(LAUNCH_MODE_VAR)
    os.environ[LAUNCH_MODE_VAR] = mode  # MORI reads it in its constructor only
    try:
        op = mori.ops.EpDispatchCombineOp(mori.ops.EpDispatchCombineConfig(**kw))
    finally:
        if user is None:
            del os.environ[LAUNCH_MODE_VAR]
    state = _PROCESS[mori]
    state.heap_used += need
    state.ops += 1
    return op, need


@dataclass(frozen=True, kw_only=True, eq=False)
class MoriCombineHandle(CombineHandle):
    # MORI keeps the routing itself; the handle pins the batch, this rank's own ids and the op
    # (of ``batches_in_flight``) that holds the batch.
    lane: int = 0


def _check_fp8_wire(fp8_dtype: object, dtype: object, hidden_size: object) -> None:
    """What FP8 rows through MORI need (``MoriDispatcher(fp8_dtype=...)``), before any
    collective or MORI call: one of MORI's FP8 types, a combine dtype MORI has kernels for,
    H a multiple of 128."""
    dt = fp8_dtype if isinstance(fp8_dtype, torch.dtype) else _fp8_name(fp8_dtype)
    if dt not in MORI_FP8_DTYPES:
        raise _bad("fp8_dtype", dt, f"MORI dispatches FP8 as {MORI_FP8_DTYPES} (fp8_ocp / "
                   "fp8_fnuz)", "pass 'e4m3fnuz' (MI300) or 'e4m3fn' (MI350)")
    if dtype not in MORI_DTYPES:
        raise _bad("dtype", dtype, f"the rows' dtype before quantisation is the combine's, and "
                   f"MORI combines {MORI_DTYPES} (float16 has no MORI kernel; FP8 rows are made "
                   "here)", "build the layer in torch.bfloat16")
    if not isinstance(hidden_size, int) or hidden_size < 1 or hidden_size % BLOCK:
        raise _bad("hidden_size", hidden_size, f"must be a multiple of {BLOCK} for FP8 rows "
                   f"through MORI (one float32 scale per {BLOCK} columns; AITER's per_1x128 path "
                   "reads whole groups)", "pad H to a multiple of 128 or use comm='torch' with "
                   "fp8_dtype")


class MoriDispatcher(Dispatcher):
    """EP dispatch/combine through a MORI op (one per layer shape; construction is collective).

    Args: as TorchDispatcher, plus ``max_tokens_per_rank`` (required: MORI's buffer size),
    ``kernel_type`` and ``gpu_per_node`` (see ``mori_config``; None: from the group's hosts),
    ``capacity_sized`` (see the module docstring). ``mori`` injects the module (tests use a fake
    that models MORI's lifecycle). ``fp8_dtype``: the wire format (``comm.wire``): None, rows
    in ``dtype``; "e4m3fnuz" (MI300) or "e4m3fn" (MI350), FP8 rows with their float32 scales
    through MORI's FP8 token types (``comm.mori_fp8``'s docstring: what MORI does with them;
    ``mori_fp8.default_fp8_dtype()`` is the encoding this machine's MORI build has).
    ``batches_in_flight``: 1, or 2 for ``EPMoE(micro_batches >= 2)``: one MORI op per batch in
    flight (``ops``; MORI keeps a batch's routing and received rows in its op until combine, so
    a second batch needs a second op: twice the heap share, ``pool.comm_bytes``).
    """

    name = "mori"
    holds_batch = True  # received rows are views of MORI's buffers

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
        gpu_per_node: int | None = None,
        capacity_sized: bool = False,
        max_total_recv_tokens: int | None = None,
        mori=None,
        fp8_dtype: str | torch.dtype | None = None,
        batches_in_flight: int = 1,
    ):
        def check():
            check_dispatcher_args(hidden_size=hidden_size, top_k=top_k, dtype=dtype,
                                  max_tokens_per_rank=max_tokens_per_rank, required=True)
            self._set_batches_in_flight(batches_in_flight)
            if fp8_dtype is not None:
                _check_fp8_wire(fp8_dtype, dtype, hidden_size)
            self._set_wire(fp8_dtype, dtype)
            if max_total_recv_tokens is not None and capacity_sized:
                raise _bad("max_total_recv_tokens", max_total_recv_tokens, "is checked per "
                           "batch with a host read of the group's counts, which "
                           "capacity_sized=True avoids", "drop one of the two")

        refusal = local_refusal(check)  # (sent to the peers in check_agreement)
        group, rank = join_group(placement, group, self.name)
        if gpu_per_node is None:
            gpu_per_node = gpus_per_node(group_hosts(group))  # (collective)
        if refusal is None:
            refusal = local_refusal(lambda: setattr(self, "mori_config", mori_config(
                placement, rank, hidden_size=hidden_size, top_k=top_k, dtype=dtype,
                max_tokens_per_rank=max_tokens_per_rank, kernel_type=kernel_type,
                gpu_per_node=gpu_per_node, fp8_dtype=self.fp8_dtype,
                max_total_recv_tokens=max_total_recv_tokens)))
        if refusal is None:
            super().__init__(placement, rank, max_tokens_per_rank=max_tokens_per_rank,
                             hidden_size=hidden_size, top_k=top_k, dtype=dtype)
        self.group = group
        if refusal is None:
            self.kernel_type = self.mori_config["kernel_type"]
            self.launch = LAUNCH.get(self.kernel_type, {})
        self.capacity_sized = capacity_sized
        # The raw value first: ranks that disagree (one with a bad value) fail together in
        # check_agreement; a bad value every rank shares is refused right after it.
        self.launch_mode = os.environ.get(LAUNCH_MODE_VAR) or "AUTO"
        self._abandoned: int | None = None  # a batch left uncombined: MORI's count is stale
        check_agreement(self, group, refusal)  # one config on every rank, before MORI's barriers
        launch_mode()
        self._rows: dict[torch.device, torch.Tensor] = {}
        mori = mori or _import_mori()
        self.ops = []  # one per batch in flight (lane); ``op`` is the first
        for _ in range(self.batches_in_flight):
            op, nbytes = build_mori_op(self.mori_config, group, mori)
            self.ops.append(op)
            weakref.finalize(self, _PROCESS[mori].release, nbytes)
        self.op = self.ops[0]

    def capture_unsupported_reason(self) -> str | None:
        if self.capacity_sized:
            return None
        return ("this MORI dispatcher reads the received row count on the host each batch "
                "(built with capacity_sized=False)")

    def config(self) -> dict:
        return dict(super().config(), kernel_type=self.kernel_type,
                    gpu_per_node=self.mori_config["gpu_per_node"],
                    capacity_sized=self.capacity_sized, launch_mode=self.launch_mode,
                    max_total_recv_tokens=self.mori_config.get("max_total_recv_tokens"))

    def abandon(self, handle, stage: str, exc: BaseException) -> None:
        """MORI's dispatch adds to its received-row counter and only its combine zeroes it
        (intranode.hpp ~227, 482): a batch left uncombined leaves the count behind, so this op
        takes no further batch (``_check_free``)."""
        self._abandoned = handle.batch_id
        super().abandon(handle, stage, exc)

    def _check_free(self) -> None:
        if self._abandoned is not None:
            raise _bad("dispatch", "a new batch", f"batch {self._abandoned} of this MORI "
                       "dispatcher was left between dispatch and combine, and MORI's dispatch "
                       "adds to a received-row counter that only its combine zeroes: the "
                       "next count would include the old rows",
                       "build a new MoriDispatcher (and a new EP group if a peer failed)")
        super()._check_free()

    def raw_unsupported_reason(self) -> str | None:
        return RAW_REASON

    def invariant_unsupported_reason(self) -> str | None:
        return ("MORI's combine sums a token's partials in the order they arrive (which varies "
                "from run to run and with the EP size) and it has no raw per-slot return path "
                f"({RAW_REASON})")

    def _check_recv_cap(self, topk_ids_TK) -> None:
        """With ``max_total_recv_tokens``: every rank's received rows (one per token per unique
        destination, from one SUM all-reduce of what each rank sends where) must fit MORI's
        smaller receive buffers; every rank sees the same counts and refuses together."""
        if "max_total_recv_tokens" not in self.mori_config:
            return
        W = self.world_size
        dest1 = self._dest1_on(topk_ids_TK.device)[topk_ids_TK.long() + 1]  # owner + 1, 0: empty
        hit = torch.zeros(topk_ids_TK.shape[0], W + 1, dtype=torch.int64,
                          device=topk_ids_TK.device).scatter_(1, dest1, 1)[:, 1:]
        counts = hit.sum(0)
        if dist.get_backend(self.group) != "nccl":
            counts = counts.cpu()
        dist.all_reduce(counts, group=self.group)
        cap = recv_rows(self.mori_config)
        over = {r: int(n) for r, n in enumerate(counts.tolist()) if n > cap}
        if over:
            raise _bad("max_total_recv_tokens", self.mori_config["max_total_recv_tokens"],
                       f"this batch sends {over} rows to ranks whose MORI receive buffers hold "
                       f"{cap} (MORI's IntraNode dispatch has no bound check: past it the "
                       "rows are written off its buffers)", "raise max_total_recv_tokens "
                       "(or omit it), or split the batch")

    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        self._check_recv_cap(topk_ids_TK)
        tokens, scales = self._to_mori(x_TH)
        lane = self._free_lane()  # (the base class records the batch in it after this call)
        op = self.ops[lane]
        out_x, out_w, out_s, out_ids, total = op.dispatch(
            tokens, topk_weights_TK.contiguous(), scales, topk_ids_TK.contiguous(),
            **self.launch)
        if self.kernel_type == "AsyncLL":  # dispatch() only sent; the rows arrive here
            op.dispatch_recv()
        if self.capacity_sized:  # no host read: rows past MORI's counter become empty slots
            dev = out_ids.device
            if dev not in self._rows:
                self._rows[dev] = torch.arange(out_ids.shape[0], device=dev)[:, None]
            x, w, num_valid = self._from_mori(out_x, out_s, x_TH), out_w, total
            ids = torch.where(self._rows[dev] < total, out_ids, -1)
        else:
            R = int(total[0])  # one host read: the rows MORI delivered to this rank
            x = self._from_mori(out_x[:R], None if out_s is None else out_s[:R], x_TH)
            ids, w, num_valid = out_ids[:R], out_w[:R], None
        handle = MoriCombineHandle(**self.handle_fields(
            batch_id=batch_id, x_TH=x_TH, topk_weights_TK=topk_weights_TK,
            topk_ids_TK=topk_ids_TK, recv_topk_ids=ids, recv_topk_weights=w), lane=lane)
        return DispatchResult(x=x, topk_ids=ids, topk_weights=w, handle=handle,
                              num_valid=num_valid)

    def _to_mori(self, x_TH):
        """(tokens, scales) as ``op.dispatch`` takes them: the rows as they are, no scales; or
        FP8 rows and their [T, H/128] float32 scales (quantised once on the owner)."""
        if self.fp8_dtype is None:
            return x_TH.contiguous(), None
        rows = quantize_rows_on_owner(x_TH, self.fp8_dtype)
        return rows.q.contiguous(), rows.scale.contiguous()

    def _from_mori(self, out_x, out_scales, x_TH):
        """``DispatchResult.x`` from MORI's received rows (and scales): views of its buffers."""
        if self.fp8_dtype is None:
            return out_x
        assert out_scales is not None, "MORI returned no scales: config.scale_dim is 0"
        return FP8Rows(out_x, out_scales, x_TH.dtype)

    def _combine(self, y_RH, handle):
        if not self._holds(handle):
            held = [b for b in self._lanes if b is not None]
            raise _bad("handle.batch_id", handle.batch_id, f"MORI holds batch(es) {held}'s "
                       "routing; combining another batch would sum the wrong rows",
                       "combine each batch right after its own dispatch")
        op = self.ops[handle.lane]
        # call_reset: MORI's reset has been a no-op since late 2025 (combine zeroes its own
        # counter); older MORI needs it, and it costs nothing.
        out, _ = op.combine(y_RH.contiguous(), None, handle.topk_ids, call_reset=True,
                            **self.launch)
        if self.kernel_type == "AsyncLL":  # combine() only sent; the sums land here
            op.combine_recv()
        return out[:handle.num_tokens].clone()  # MORI reuses its output buffer

    def _combine_raw(self, raw_RKH, handle):
        raise _bad("return_raw", True, RAW_REASON, "use comm='torch'")


def forward_padded(dispatcher: MoriDispatcher, experts, x_TH, topk_weights_TK, topk_ids_TK,
                   w13, w2) -> torch.Tensor:
    """MORI dispatch -> AITER -> MORI combine with no host read: [T, H]. ``dispatcher`` built
    with ``capacity_sized=True``; ``experts`` an ``AiterExperts`` (``forward_padded`` hands
    MORI's device row count to AITER as ``num_local_tokens``)."""
    from rocm_moe.weighting import ExpertsOutput

    if not dispatcher.capacity_sized:
        raise _bad("dispatcher.capacity_sized", False, "the dispatch must leave its row count "
                   "on the device", "build MoriDispatcher(..., capacity_sized=True)")
    if dispatcher.fp8_dtype is not None:
        raise _bad("dispatcher", dispatcher.name, "forward_padded hands AITER bf16 rows",
                   "run FP8 rows through EPMoE(weight_format='block_fp8', validate=False) "
                   "with AiterFP8Experts")
    d = dispatcher.dispatch(x_TH, topk_weights_TK, topk_ids_TK, validate=False)
    y = experts.forward_padded(d.x, d.topk_ids, d.topk_weights, w13, w2,
                               dispatcher.expert_map_on(d.x.device), num_rows=d.num_valid)
    return dispatcher.combine(ExpertsOutput(out=y, weights_applied=True), d.handle)
