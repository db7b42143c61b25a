"""Fakes of MORI (its ``mori`` module: shmem and EpDispatchCombineOp) and of AITER's fused_moe
and shuffle_weight, so that the adapters can be tested on CPUs (vLLM tests its MORI path the
same way).

They model what the real libraries do, per their source (ROCm/mori 624002c8, ROCm/aiter
e4048607; see ../shared/UPSTREAM.md and notes/dataflow.md): the same numbers, the same
lifecycle, and an error where the real library would hang, corrupt or silently misbehave (a
``ContractError``; where the real library raises, the fake raises what it raises). Rules MORI
does not have (one batch in flight, a reset between batches) are the adapter's, not the fake's.
"""

from __future__ import annotations

import enum
import os
import weakref
from types import SimpleNamespace

import torch
import torch.distributed as dist

from rocm_moe.experts.base import swiglu_expert
from rocm_moe.quant import quantize_rows


class ContractError(AssertionError):
    """The caller broke a rule the real library does not check (it would misbehave silently,
    hang or read device memory on the host)."""


class DeviceTensor(torch.Tensor):
    """A value that lives on the GPU: reading it on the host (int(), .item(), indexing a
    Python sequence with it) is a device sync, which the no-host-read paths must not do."""

    def _host_read(self, *args, **kwargs):
        raise ContractError("host read of a device-side count (a GPU sync; breaks graph "
                            "capture): keep it on the device")

    __int__ = __index__ = __bool__ = __float__ = item = tolist = numpy = _host_read

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Views of the count stay guarded (``total[0]``); results computed from it on the
        device (a comparison, a where) are plain tensors."""
        out = super().__torch_function__(func, types, args, kwargs or {})
        keep = func in (torch.Tensor.__getitem__, torch.Tensor.view, torch.Tensor.reshape)
        return out if keep or not isinstance(out, DeviceTensor) else out.as_subclass(
            torch.Tensor)


def device_value(t: torch.Tensor) -> torch.Tensor:
    """What a kernel sees: the plain tensor behind a DeviceTensor."""
    return t.as_subclass(torch.Tensor)


# ---- MORI ---------------------------------------------------------------------------------------
KernelType = enum.Enum("EpDispatchCombineKernelType",
                       ["IntraNode", "IntraNodeLL", "InterNode", "InterNodeV1", "InterNodeV1LL",
                        "AsyncLL"])
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_ocp",
           torch.float8_e4m3fnuz: "fp8_fnuz", torch.float4_e2m1fn_x2: "fp4"}  # DC _DTYPE_SUFFIX
# The FP8 kernels a build has: HIP defines one FP8 encoding per GPU (include/mori/utils/
# data_types.hpp); MORI's tests run fnuz on gfx94x only, ocp on gfx95x only (tests/python/utils.py).
_ARCH_FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}
# FP4 (two e2m1 per byte, H/2 bytes a row) has kernels on gfx950 only (the fp4 conversion
# instructions; DC refuses fp4_blockwise elsewhere, ~520).
_ARCH_FP4 = {"gfx950"}
_V1 = ("InterNodeV1", "InterNodeV1LL")


def _parse_size(text: str) -> int:
    """MORI's ParseSizeString (src/shmem/init.cpp ~96): a three-letter suffix GiB/gib, MiB/mib,
    KiB/kib; else two letters GB/gb/Gb, MB/mb/Mb, KB/kb/Kb; else one letter G/g, M/m, K/k; then
    std::stoull, which reads the leading digits and ignores the rest ("6GIB" is 6 bytes)."""
    units = [({"GiB", "gib"}, 30), ({"MiB", "mib"}, 20), ({"KiB", "kib"}, 10),
             ({"GB", "gb", "Gb"}, 30), ({"MB", "mb", "Mb"}, 20), ({"KB", "kb", "Kb"}, 10),
             ({"G", "g"}, 30), ({"M", "m"}, 20), ({"K", "k"}, 10)]
    shift, num = 0, text
    for names, bits in units:
        n = len(next(iter(names)))
        if len(text) >= n and text[-n:] in names:
            shift, num = bits, text[:-n]
            break
    digits = ""
    for ch in num.strip():
        if not ch.isdigit():
            break
        digits += ch
    if not digits:
        raise ValueError(f"stoull: no conversion of {text!r}")  # std::invalid_argument
    return int(digits) << shift


def _heap_size() -> int | None:
    """MORI's heap limit: MORI_SHMEM_MODE 'isolation'/'ISOLATION' has none; VMM mode on a
    machine without VMM (what the fake models: no GPU to ask) falls back to the static heap;
    anything else is the static heap of MORI_SHMEM_HEAP_SIZE or 4 GiB (init.cpp ~223, 282,
    616)."""
    if os.environ.get("MORI_SHMEM_MODE", "") in ("isolation", "ISOLATION"):
        return None
    text = os.environ.get("MORI_SHMEM_HEAP_SIZE")
    return 4 << 30 if text is None else _parse_size(text)


_SHMEM_OWN = 256 + 128 * 8  # the static heap's initial offset; shmem's internal sync buffer


def _recv_rows(c: SimpleNamespace) -> int:
    """MaxNumTokensToRecv (dispatch_combine.hpp ~160): W x max_num_inp_token_per_rank, or with
    max_total_recv_tokens M > 0, W x min(ceil(M / W), max_num_inp_token_per_rank)."""
    W, T, M = c.world_size, c.max_num_inp_token_per_rank, getattr(c, "max_total_recv_tokens", 0)
    return W * (min(-(-M // W), T) if M > 0 else T)


def _op_bytes(c: SimpleNamespace) -> int:
    """Symmetric allocations of one op, buffer by buffer (dispatch_combine.cpp ~300-560), each
    aligned to 256 B by the static heap (shmem/memory.cpp ~37)."""
    W, T, H, K = c.world_size, c.max_num_inp_token_per_rank, c.hidden_dim, \
        c.num_experts_per_token
    nodes = W // c.gpu_per_node
    tok_bytes = H * c.max_token_type_size
    xfer = tok_bytes + K * 4 + K * 4 + 4 + c.scale_dim * c.scale_type_size
    recv, send, kt = _recv_rows(c), W * T, c.kernel_type.name
    bufs = [recv * tok_bytes, T * tok_bytes]  # dispatchOut, combineOut
    if kt in ("IntraNode", "IntraNodeLL"):
        bufs += [recv * xfer]  # combineInp
    elif kt in _V1:
        bufs += [nodes * T * xfer, recv * xfer, 2 * nodes * T * xfer, T * xfer]
    else:
        bufs += [send * xfer] * 3  # MaxNumTokensToSend
    bufs += [recv * K * 4] * 3 + [recv * K * 4] * 2  # weights in/out/combine; indices in/out
    qp = getattr(c, "num_qp_per_pe", 1)
    bufs += [W * 4 * 2 * qp] * 2 + [W * 2 * 8 * 2, nodes * 8, 4]  # signals
    bufs += [send * c.num_experts_per_rank * 4]  # dispTokIdToSrcTokId (MaxNumTokensToSend)
    bufs += [W * 4 * 2 * 8, nodes * T * 8]  # crossDeviceBarrier, interNodeChunkFlag (~540)
    if c.scale_dim > 0 and c.scale_type_size > 0:  # shmemInpScales, shmemOutScales (~362)
        bufs += [recv * c.scale_dim * c.scale_type_size] * 2
    return sum((b + 255) // 256 * 256 for b in bufs)


def _check_row_major(name: str, t: torch.Tensor) -> None:
    """MORI hands ``t.data_ptr()`` to its kernels, which index it as a dense row-major [T, K]
    array (``tokenIndices[tokenId * numExpertPerToken + e]``, internode_v1.cpp ~125, 1291;
    DC ``dispatch`` / ``combine`` pass ``indices.data_ptr()`` with no layout check): a strided
    view is read as the wrong ids, silently."""
    if not t.is_contiguous():
        raise ContractError(f"{name} {tuple(t.shape)} with strides {t.stride()} is not "
                            "contiguous: MORI reads data_ptr() as a row-major [T, K] array, so "
                            "these ids would be read as other tokens' ids")


class FakeShmem:
    """``mori.shmem`` of one process: initialised once (a second init is skipped silently,
    src/shmem/init.cpp ~671); the torch helper broadcasts the unique id from GLOBAL rank 0
    (python/mori/shmem/api.py ~115). ``groups``: the torch groups a unique-id init may join
    (the fake needs a gloo group to move data; MORI uses its own bootstrap)."""

    MORI_SHMEM_INIT_WITH_UNIQUEID = 1

    def __init__(self, groups=()):
        self.groups = list(groups)
        self.group = None  # the group the PEs were set up on
        self.inits = 0
        self.skipped = 0
        self.heap_used = _SHMEM_OWN  # taken at init, before any op

    def free(self, nbytes: int) -> None:
        self.heap_used -= nbytes

    def shmem_torch_process_group_init(self, group_name: str) -> int:
        group = dist.distributed_c10d._resolve_process_group(group_name)
        uid = [self.shmem_get_unique_id() if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(uid, src=0, group=group)  # src is a GLOBAL rank in torch
        self.groups.append(group)
        return self.shmem_init_attr(1, dist.get_rank(group), dist.get_world_size(group), uid[0])

    def shmem_get_unique_id(self) -> bytes:
        return f"uid-from-{dist.get_rank()}".encode()

    def shmem_init_attr(self, flags, rank, nranks, unique_id) -> int:
        if self.group is not None:
            self.skipped += 1  # MORI_SHMEM_INFO("Shmem already initialized, skipping")
            return 0
        origin = int(unique_id.decode().rsplit("-", 1)[1])
        for g in [*self.groups, dist.group.WORLD]:
            ranks = dist.get_process_group_ranks(g)
            if dist.get_rank() in ranks and ranks[0] == origin and len(ranks) == nranks:
                if ranks.index(dist.get_rank()) != rank:
                    raise ContractError(f"shmem rank {rank} is not this process's rank in "
                                        f"the group {ranks}")
                self.group, self.inits = g, self.inits + 1
                return 0
        raise ContractError(f"fake: no group of {nranks} ranks from {origin}; pass it in "
                            "FakeMori(groups=...)")


class FakeMori:
    """The ``mori`` module of one process (tests make one per simulated process).
    ``no_host_reads``: the received-row counter is a DeviceTensor (host reads raise).
    ``arch``: the GPU the build targets, which decides its one FP8 encoding (gfx942 = MI300:
    e4m3fnuz; gfx950 = MI350: e4m3fn)."""

    def __init__(self, groups=(), *, no_host_reads: bool = False, arch: str = "gfx942"):
        self.shmem = FakeShmem(groups)
        self.no_host_reads = no_host_reads
        self.arch = arch
        self.ops = SimpleNamespace(
            EpDispatchCombineConfig=lambda **kw: SimpleNamespace(**{**_CONFIG_DEFAULTS, **kw}),
            EpDispatchCombineOp=lambda cfg: FakeMoriOp(cfg, self),
            EpDispatchCombineKernelType=KernelType)
        self.built = 0  # ops constructed (they free their heap share when collected)


_CONFIG_DEFAULTS = dict(warp_num_per_block=8, block_num=80, max_total_recv_tokens=0,
                        use_external_inp_buf=True, gpu_per_node=8, rdma_block_num=0,
                        num_qp_per_pe=1, quant_type="none")


class FakeMoriOp:
    """MORI's EpDispatchCombineOp over the gloo group its shmem was set up on, CPU tensors.

    Modelled (from MORI's source and tests):
    - construction: WORLD barrier before and after allocating (DC ~406, 649); shmem must be up
      and agree with the config's rank and world size; ``W % gpu_per_node == 0`` with a power
      of two (debug-build assert); the buffers come out of the process's symmetric heap;
    - ids int32 (read as int32), weights float32; x in float32 / bf16 / fp8 (``data_type`` is
      deprecated: the dtype comes from the input; fp16 has no kernel: KeyError; the FP8
      encoding the build's arch lacks: hipModuleGetFunction's RuntimeError), at most
      ``max_token_type_size`` bytes wide; ``hidden_dim`` is a maximum; dispatch and combine
      may use different dtypes (MORI's cross-dtype tests: FP8 dispatch, bf16 combine);
    - scales (DC ``has_scales``, intranode.hpp ~193): used only when ``scale_dim > 0`` (given
      with 0 they are dropped: refused here); then a contiguous [T, scale_dim] tensor of
      ``scale_type_size``-byte elements (MORI copies that many raw bytes per token), moved
      with its row into a persistent [W * T, scale_dim] buffer returned in the scales' dtype;
      no scales passed: None back;
    - T <= max_num_inp_token_per_rank (MORI would corrupt memory, mori#356);
    - a token is sent once per unique destination rank (e // num_experts_per_rank), with its
      full [K] global ids and weights; slots < 0 are skipped; received rows come in an
      arbitrary order (here: shuffled);
    - outputs are views of persistent buffers (world_size * max tokens rows, zeroed at
      allocation) that the next dispatch overwrites; rows past the count keep stale data;
      total_recv [1] int32 is a device counter that combine zeroes;
    - launch parameters: the mode (MORI_EP_LAUNCH_CONFIG_MODE, read at construction); in
      MANUAL, IntraNode dispatch's own 256 x 16 and combine's config values (``launches``);
      InterNodeV1(LL) with rdma_block_num 0 (MORI's MANUAL default) sends nothing across nodes
      and never completes;
    - AsyncLL: ``dispatch()`` only sends; rows arrive with ``dispatch_recv()``, sums with
      ``combine_recv()``;
    - combine: ``indices`` must have this rank's T rows (ValueError, mori#475); IntraNode uses
      the routing recorded at dispatch, InterNodeV1(LL) reads the ids given; one partial per
      unique destination rank, never weighted; weights given -> summed weights (w * U);
    - ``reset()`` is a no-op (MORI's LaunchReset is empty); ``return_routing`` / ``routing=``
      (IntraNode, InterNodeV1) snapshot and replay a dispatch's routing;
    - ``call_local_expert_count``: local_expert_count [e] counts received slots per local
      expert (dispatch; AsyncLL: dispatch_recv).
    """

    def __init__(self, cfg: SimpleNamespace, mori: FakeMori):
        self.cfg, self.mori, self.kt = cfg, mori, cfg.kernel_type.name
        if dist.is_initialized():
            dist.barrier()  # WORLD, as MORI's constructor
        sh = mori.shmem
        if sh.group is None:
            raise ContractError("MORI op built before shmem init (MORI asserts)")
        ranks = dist.get_process_group_ranks(sh.group)
        if cfg.world_size != len(ranks) or ranks[cfg.rank] != dist.get_rank():
            raise ContractError(f"config rank {cfg.rank} / world {cfg.world_size} != shmem "
                                f"PEs {ranks}: every peer address would be wrong")
        g = cfg.gpu_per_node
        if g < 1 or g & (g - 1) or cfg.world_size % g:
            raise ContractError(f"gpu_per_node={g} with world_size={cfg.world_size}: MORI "
                                "asserts W % gpu_per_node == 0 (debug builds only)")
        need, limit = _op_bytes(cfg), _heap_size()
        if limit is not None and sh.heap_used + need > limit:
            raise RuntimeError(f"Out of static heap memory! Requested: {need} bytes. Hint: "
                               "Increase via MORI_SHMEM_HEAP_SIZE")
        sh.heap_used += need
        weakref.finalize(self, FakeShmem.free, sh, need)  # the C++ handle frees its buffers
        self.group = sh.group  # MORI addresses the PEs shmem was set up with
        # Read once, in the constructor (DC ~535): AUTO looks launch values up in the tuned
        # tables per token count (MI300X: IntraNode EP2/4/8, IntraNodeLL EP8), else fixed ones.
        self.launch_mode = os.environ.get("MORI_EP_LAUNCH_CONFIG_MODE", "MANUAL")
        if self.launch_mode not in ("MANUAL", "AUTO"):
            raise ValueError("invalid MORI_EP_LAUNCH_CONFIG_MODE, must be ['MANUAL', 'AUTO'], "
                             f"got '{self.launch_mode}'")
        self.launches: list[tuple] = []  # (phase, block_num, warp_per_block) as launched
        self.rank = cfg.rank
        self.calls: list[str] = []
        self._gen = torch.Generator().manual_seed(1234 + self.rank)
        R, K = _recv_rows(cfg), cfg.num_experts_per_token
        self._x = torch.zeros(R * cfg.hidden_dim * cfg.max_token_type_size, dtype=torch.uint8)
        self._w = torch.zeros(R, K)
        self._i = torch.zeros(R, K, dtype=torch.int32)
        self._total = torch.zeros(1, dtype=torch.int32)
        if mori.no_host_reads:
            self._total = self._total.as_subclass(DeviceTensor)
        scale_bytes = max(cfg.scale_dim, 0) * max(cfg.scale_type_size, 0)
        self._s = torch.zeros(R * scale_bytes, dtype=torch.uint8)  # shmemOutScales
        self._s_dtype = None
        self._comb = torch.zeros(cfg.max_num_inp_token_per_rank * cfg.hidden_dim *
                                 cfg.max_token_type_size, dtype=torch.uint8)
        self._comb_w = torch.zeros(cfg.max_num_inp_token_per_rank, K)
        self.local_expert_count = torch.zeros(cfg.num_experts_per_rank, dtype=torch.int32)
        self._pending = None
        self._T = 0
        mori.built += 1
        if dist.is_initialized():
            dist.barrier()

    # ---- helpers --------------------------------------------------------------------------------
    def _view(self, buf, rows, H, dtype):
        return buf[:rows * H * dtype.itemsize].view(dtype).view(rows, H)

    def _owner(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.long() // self.cfg.num_experts_per_rank

    def _resolve_launch(self, phase, block_num, warp_per_block):
        """What MORI launches (DC ``_resolve_launch_params``): in AUTO mode its tables' values
        ('tuned'); in MANUAL the caller's, else IntraNode dispatch's own 256 x 16 (gfx942's
        portable body, DC ``_intranode_dispatch_default_launch``), else the config's."""
        if self.launch_mode == "AUTO":
            self.launches.append((phase, "tuned", "tuned"))
            return
        c = self.cfg
        own = (256, 16) if self.kt == "IntraNode" and phase == "dispatch" else (0, 0)
        bn = block_num if block_num > 0 else (own[0] or c.block_num)
        wpb = warp_per_block if warp_per_block > 0 else (own[1] or c.warp_num_per_block)
        self.launches.append((phase, bn, wpb))

    def _check_launch(self, rdma_block_num, block_num):
        if self.kt not in _V1:
            return
        auto = self.launch_mode == "AUTO"
        rbn = rdma_block_num if rdma_block_num > 0 else self.cfg.rdma_block_num
        bn = block_num if block_num > 0 else self.cfg.block_num
        if not auto and (rbn <= 0 or rbn >= bn):
            raise ContractError(f"{self.kt} launched with rdma_block_num={rbn}, block_num={bn}:"
                                " no block sends across nodes and the completion barrier "
                                "never fires (internode_v1.cpp ~159, 277): MORI would hang")

    def _check_tokens(self, x: torch.Tensor, kernel: str = "EpDispatchIntraNodeKernel"):
        if x.dtype not in _SUFFIX:
            raise KeyError(x.dtype)  # MORI: _DTYPE_SUFFIX[input.dtype]
        fp8 = _ARCH_FP8.get(self.mori.arch)
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) and x.dtype != fp8:
            raise RuntimeError(f"HIP error 500: hipModuleGetFunction({kernel}_"
                               f"{_SUFFIX[x.dtype]}) (a {self.mori.arch} build has {fp8} only)")
        if x.dtype == torch.float4_e2m1fn_x2 and self.mori.arch not in _ARCH_FP4:
            raise RuntimeError(f"HIP error 500: hipModuleGetFunction({kernel}_fp4) (FP4 kernels "
                               f"are built for gfx950, not {self.mori.arch})")
        if x.element_size() > self.cfg.max_token_type_size or x.shape[1] > self.cfg.hidden_dim:
            raise ContractError(f"x {tuple(x.shape)} {x.dtype} overflows buffers of hidden_dim "
                                f"{self.cfg.hidden_dim} x {self.cfg.max_token_type_size} bytes")

    # ---- dispatch -------------------------------------------------------------------------------
    def dispatch(self, input, weights, scales, indices, block_num=-1, rdma_block_num=-1,
                 warp_per_block=-1, call_local_expert_count=False, *, routing=None,
                 return_routing=False):
        self.calls.append("dispatch")
        c = self.cfg
        if (routing is not None or return_routing) and self.kt not in ("IntraNode",
                                                                        "InterNodeV1"):
            raise NotImplementedError(f"routing handle path not supported for {self.kt}")
        self._check_tokens(input)
        self._check_launch(rdma_block_num, block_num)
        self._resolve_launch("dispatch", block_num, warp_per_block)
        if indices.dtype != torch.int32:
            raise ContractError(f"indices must be int32, got {indices.dtype} (read as int32)")
        _check_row_major("dispatch indices", indices)
        if weights is None:  # weight_ptr 0: the kernels skip the weights where they check
            if self.kt in _V1:  # internode_v1.cpp ~685 copies from weightsBuf unchecked
                raise ContractError(f"{self.kt} dispatch reads the weights unchecked: None "
                                    "is a null-pointer read")
        elif weights.dtype != torch.float32:
            raise ContractError(f"weights must be float32, got {weights.dtype}")
        T, K = indices.shape
        if T > c.max_num_inp_token_per_rank:
            raise ContractError(f"{T} tokens > max_num_inp_token_per_rank: MORI would corrupt")
        if K != c.num_experts_per_token or input.shape[0] != T:
            raise ContractError(f"shapes {tuple(input.shape)} / {tuple(indices.shape)} != config")
        scales = self._check_scales(scales, T)
        everyone = [None] * dist.get_world_size(self.group)  # (fp8 does not pickle: bytes)
        dist.all_gather_object(everyone, (input.contiguous().view(torch.uint8), weights,
                                          indices, scales), group=self.group)
        rows = []  # (source rank, source token) delivered here, once per unique destination
        for src, (_, _, ids, _) in enumerate(everyone):
            for t in range(ids.shape[0]):
                if (self._owner(ids[t][ids[t] >= 0]) == self.rank).any():
                    rows.append((src, t))
        order = torch.randperm(len(rows), generator=self._gen).tolist()
        rows = [rows[i] for i in order]
        self._T, self._own_ids, self._rows = T, indices.clone(), rows
        self._dtype, self._H = input.dtype, input.shape[1]
        self._s_dtype = None if scales is None else self._s_dtype
        self._pending = (everyone, rows, call_local_expert_count)
        device_total = device_value(self._total)
        if self.kt == "AsyncLL":
            device_total[0] = 0  # the send kernels zero it; dispatch_recv fills it
        else:
            self._deliver()
        out = self._outputs()
        if return_routing:
            return (*out, SimpleNamespace(rows=rows, T=T, own_ids=indices.clone(),
                                          total_recv_token_num=self._total))
        return out

    def _check_scales(self, scales, T: int):
        """Scales as MORI reads them (class docstring): their bytes, or None."""
        c = self.cfg
        if scales is None:
            return None
        if c.scale_dim <= 0 and scales.numel() == 0:
            return None  # empty [T, 0] scales with scale_dim 0: has_scales False, nothing lost
        if c.scale_dim <= 0:
            raise ContractError("scales passed with config.scale_dim=0: MORI ignores them "
                                "(has_scales is False) and returns no scales")
        if scales.dim() != 2 or tuple(scales.shape) != (T, c.scale_dim) \
                or scales.element_size() != c.scale_type_size or not scales.is_contiguous():
            raise ContractError(
                f"scales {tuple(scales.shape)} {scales.dtype} (contiguous: "
                f"{scales.is_contiguous()}): MORI copies scale_dim * scale_type_size = "
                f"{c.scale_dim} * {c.scale_type_size} raw bytes per token from a [T={T}, "
                f"{c.scale_dim}] buffer; anything else is misread")
        self._s_dtype = scales.dtype
        return scales.view(torch.uint8)

    def _deliver(self):
        everyone, rows, count = self._pending
        if len(rows) > _recv_rows(self.cfg):  # no bound check (intranode.hpp ~148)
            raise ContractError(f"{len(rows)} rows received, buffers hold {_recv_rows(self.cfg)}"
                                f" (max_total_recv_tokens={self.cfg.max_total_recv_tokens}): "
                                "MORI would write past its buffers")
        x = self._view(self._x, len(rows), self._H * self._dtype.itemsize, torch.uint8)
        sb = self.cfg.scale_dim * self.cfg.scale_type_size
        for r, (src, t) in enumerate(rows):  # rows move as bytes (FP8 and FP4 alike)
            x[r] = everyone[src][0][t]
            self._i[r] = everyone[src][2][t]
            if everyone[src][1] is not None:  # no weights: the buffer keeps what it held
                self._w[r] = everyone[src][1][t]
            if self._s_dtype is not None:
                if everyone[src][3] is None:
                    raise ContractError(f"rank {src} dispatched no scales: its rows' scales "
                                        "here are whatever the buffer held")
                self._s[r * sb:(r + 1) * sb] = everyone[src][3][t]
        if self.kt == "AsyncLL":  # its receive sets the count (prefix sum)
            device_value(self._total)[0] = len(rows)
        else:  # the others atomicAdd it (intranode.hpp ~227); only combine zeroes it (~482)
            device_value(self._total)[0] += len(rows)
        if count:
            local = self._i[:len(rows)].long() - self.rank * self.cfg.num_experts_per_rank
            ok = (local >= 0) & (local < self.cfg.num_experts_per_rank)
            self.local_expert_count.copy_(torch.bincount(
                local[ok], minlength=self.cfg.num_experts_per_rank).to(torch.int32))

    def _outputs(self):
        R = _recv_rows(self.cfg)
        s = None if self._s_dtype is None else \
            self._s.view(self._s_dtype).view(R, self.cfg.scale_dim)
        return (self._view(self._x, R, self._H, self._dtype), self._w, s, self._i,
                self._total)

    def dispatch_recv(self, block_num=-1, warp_per_block=-1, call_local_expert_count=False):
        self.calls.append("dispatch_recv")
        if self.kt != "AsyncLL":
            raise ValueError(f"dispatch_recv only supports AsyncLL, got kernel_type={self.kt}")
        assert self._pending is not None, "dispatch_recv requires a prior dispatch"
        everyone, rows, _ = self._pending
        self._pending = (everyone, rows, call_local_expert_count)
        self._deliver()

    # ---- combine --------------------------------------------------------------------------------
    def combine(self, input, weights, indices, block_num=-1, rdma_block_num=-1,
                warp_per_block=-1, use_external_inp_buf=-1, call_reset=False, *, routing=None):
        self.calls.append("combine")
        T = routing.T if routing is not None else self._T
        rows = routing.rows if routing is not None else self._rows
        if indices.shape[0] != T:
            raise ValueError(f"combine() indices has {indices.shape[0]} rows but this rank "
                             f"dispatched {T} tokens. Pass this rank's own [num_tokens, topk] "
                             "routing, not dispatch()'s returned out_idx (ROCm/mori#475).")
        if indices.dtype != torch.int32:
            raise ContractError(f"combine indices must be int32, got {indices.dtype}")
        _check_row_major("combine indices", indices)
        self._check_tokens(input, "EpCombineIntraNodeKernel")
        self._check_launch(rdma_block_num, block_num)
        self._resolve_launch("combine", block_num, warp_per_block)
        R = int(device_value(self._total)[0]) if routing is None else len(rows)
        if input.shape[0] < R:
            raise ContractError(f"combine input has {input.shape[0]} rows, {R} were received")
        has_w = weights is not None and weights.shape[0] != 0
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, (input[:R].contiguous().view(torch.uint8).clone(),
                                          weights[:R].clone() if has_w else None, rows),
                               group=self.group)  # as bytes: FP8 tensors do not pickle
        partial = {}  # (dest rank, my token) -> (row, weights)
        for d, (part, w, their_rows) in enumerate(everyone):
            part = part.view(input.dtype)
            for r, (src, t) in enumerate(their_rows):
                if src == self.rank:
                    partial[d, t] = (part[r].float(), None if w is None else w[r])
        acc = torch.zeros(T, input.shape[1])
        acc_w = torch.zeros(T, self.cfg.num_experts_per_token)
        for t in range(T):  # a plain sum over unique destinations: MORI's combine never weights
            if self.kt in _V1:  # the V1 kernels walk the ids they are given
                ids = indices[t][indices[t] >= 0]
                dests = self._owner(ids).unique().tolist()
            else:
                dests = [d for d in range(len(everyone)) if (d, t) in partial]
            for d in dests:
                row, w = partial.get((d, t), (torch.full((input.shape[1],), float("nan")), None))
                acc[t] += row
                if w is not None:
                    acc_w[t] += w
        self._combined = (acc, acc_w if has_w else None, input.dtype, input.shape[1])
        if routing is None:
            device_value(self._total)[0] = 0  # the combine kernel zeroes the counter
        if self.kt != "AsyncLL":
            self._land()
        if call_reset:
            self.reset()
        return self._comb_outputs(input.dtype, input.shape[1], has_w)

    def _land(self):
        acc, acc_w, dtype, H = self._combined
        self._view(self._comb, acc.shape[0], H, dtype).copy_(acc.to(dtype))
        if acc_w is not None:
            self._comb_w[:acc.shape[0]] = acc_w

    def _comb_outputs(self, dtype, H, has_w):
        Tmax = self.cfg.max_num_inp_token_per_rank
        return self._view(self._comb, Tmax, H, dtype), self._comb_w if has_w else None

    def combine_recv(self, block_num=-1, warp_per_block=-1):
        self.calls.append("combine_recv")
        if self.kt != "AsyncLL":
            raise ValueError(f"combine_recv only supports AsyncLL, got kernel_type={self.kt}")
        self._land()

    def reset(self):
        self.calls.append("reset")  # EpDispatchCombineHandle::LaunchReset is empty


def fake_mori_op(config: dict, groups=(), arch: str = "gfx942") -> FakeMoriOp:
    """A FakeMoriOp of an adapter config dict, its shmem set up on WORLD (or ``groups[0]``)."""
    mori = FakeMori(groups, arch=arch)
    group = groups[0] if groups else dist.group.WORLD
    ranks = dist.get_process_group_ranks(group)
    uid = [mori.shmem.shmem_get_unique_id() if dist.get_rank() == ranks[0] else None]
    dist.broadcast_object_list(uid, src=ranks[0], group=group)
    mori.shmem.shmem_init_attr(1, dist.get_rank(group), len(ranks), uid[0])
    kw = {**config, "kernel_type": getattr(KernelType, config["kernel_type"])}
    return mori.ops.EpDispatchCombineOp(mori.ops.EpDispatchCombineConfig(**kw))


# ---- AITER --------------------------------------------------------------------------------------
# csrc/include/aiter_enum.h (aiter/ops/enum.py parses it): a C++ enum class, so 0-based.
_QUANT_TYPES = ["No", "per_Tensor", "per_Token", "per_1x32", "per_1x128", "per_128x128",
                "per_256x128", "per_1024x128"]
FakeQuantType = enum.IntEnum("QuantType", [(n, i) for i, n in enumerate(_QUANT_TYPES)])
_TILE_N, _TILE_K = 16, 32  # aiter.ops.shuffle.shuffle_weight's default layout (16, 16)


def shuffleable(w: torch.Tensor) -> bool:
    return w.shape[-2] % _TILE_N == 0 and w.shape[-1] % _TILE_K == 0


def _tiles(w: torch.Tensor) -> tuple[int, ...]:
    """[e, N, K] as AITER's shuffle views it: [e, N/16, 16, K/32, 32/P, P], P = 16 bytes."""
    e, N, K = w.shape
    P = 16 // w.element_size()
    return e, N // _TILE_N, _TILE_N, K // _TILE_K, _TILE_K // P, P


def fake_shuffle_weight(w: torch.Tensor, layout=(16, 16)) -> torch.Tensor:
    """AITER's shuffle_weight layout (aiter/ops/shuffle.py ~192, layout (16, 16)): the same
    shape, each 16 x 32 tile stored as its 16-byte packs of a row, pack-major then row-major;
    tagged ``is_shuffled``. A plain reader of it gets garbage."""
    if not shuffleable(w):
        raise AssertionError(f"{tuple(w.shape)} is not a multiple of {_TILE_N} x {_TILE_K}")
    dims = _tiles(w)
    out = w.reshape(dims).permute(0, 1, 3, 4, 2, 5).contiguous().view(w.shape)
    out.is_shuffled = True
    return out


def _unshuffle(w: torch.Tensor) -> torch.Tensor:
    e, tn, n, tk, pk, p = _tiles(w)
    t = w.reshape(e, tn, tk, pk, n, p)
    return t.permute(0, 1, 4, 2, 3, 5).reshape(w.shape)


class FakeFusedMoe:
    """AITER's fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=...,
    num_local_tokens=...).

    Enforced: x in bf16/fp16 (CPU tests may use float32, see ``allow_float32``) with M >= 1
    (AITER has no guard for M = 0), w1 [e, 2I, H], w2 [e, H, I] in x's dtype, topk_weight
    float32 [M, K], topk_ids int32 [M, K] (global ids in [0, mask.numel())), expert_mask int32
    of 0/1 only (an id map with -1 or local ids is refused) with mask.sum() == e. Under EP
    (a mask given) the last slot of every row must be masked: AITER looks tuned configs up with
    ``topk - 1`` (aiter#3377). Weights of a shape tuned kernels serve (multiples of the shuffle
    tile) must be shuffled (``is_shuffled``; tuned kernels read the shuffled layout, FM ~2438).
    ``num_local_tokens`` [1] int32 on the device: rows past it are not computed (zeros).
    Computes like AITER: local row = prefix sum of the mask, masked slots skipped, weighted sum
    in float32, output in x's dtype.
    """

    def __init__(self, *, allow_float32: bool = True,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fnuz, asm_stage1=False):
        self.allow_float32 = allow_float32
        self.fp8_dtype = fp8_dtype  # AITER's dtypes.fp8 on the target (gfx942: e4m3fnuz)
        # Whether the tuned table picks AITER's asm stage-1 kernel for a per_1x128 call of M
        # rows (a bool, or a function of M): that kernel reads a1_scale by its pointer as
        # [H/128, M] (csrc/py_itfs_cu/asm_moe_2stage.cu ~245, no strides); AITER transposes
        # the scales it makes from float rows (FM fused_moe_2stages, transpose_scale=True) and
        # passes an FP8 input's a1_scale as it is.
        self.asm_stage1 = asm_stage1
        self.calls = 0

    def __call__(self, hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None,
                 num_local_tokens=None, quant_type=FakeQuantType.No, w1_scale=None,
                 w2_scale=None, a1_scale=None, a2_scale=None, dtype=None, **kw):
        self.calls += 1
        if not isinstance(quant_type, FakeQuantType):  # FM fused_moe: quant_type.value
            raise AttributeError(f"{type(quant_type).__name__!r} object has no attribute "
                                 "'value' (fused_moe takes a QuantType)")
        if quant_type not in (FakeQuantType.No, FakeQuantType.per_1x128):
            raise ContractError(f"the fake models QuantType.No and per_1x128, not {quant_type}")
        fp8 = quant_type == FakeQuantType.per_1x128
        x, dtypes = hidden_states, (torch.bfloat16, torch.float16)
        M, H = x.shape
        if fp8:
            out_dtype = x.dtype if dtype is None else dtype
            if out_dtype not in dtypes:  # FM: assert dtype in [fp16, bf16]
                raise ContractError(f"Fused_moe unsupported out dtype: {out_dtype}")
            if self.stage1_is_asm(M=M) and x.dtype == self.fp8_dtype:
                a1_scale = _asm_scale(a1_scale, M, H)
            scales = _check_fp8_block(self.fp8_dtype, x, w1, w2, w1_scale, w2_scale, a1_scale,
                                      a2_scale)
        else:
            if x.dtype not in dtypes + ((torch.float32,) if self.allow_float32 else ()):
                raise ContractError(f"fused_moe computes in bf16/fp16, got {x.dtype}")
            if any(t is not None for t in (w1_scale, w2_scale, a1_scale, a2_scale)):
                raise ContractError("scales passed with QuantType.No: they would be ignored")
            out_dtype = x.dtype
        if M == 0:
            raise ContractError("fused_moe with M = 0 rows: AITER has no guard for it")
        e, I2, _ = w1.shape
        if w1.shape != (e, I2, H) or w2.shape != (e, H, I2 // 2) or (
                not fp8 and w1.dtype != x.dtype):
            raise ContractError(f"weights {tuple(w1.shape)} / {tuple(w2.shape)} for x {(M, H)}")
        tags = {"w1": getattr(w1, "is_shuffled", False), "w2": getattr(w2, "is_shuffled", False)}
        if any(tags.values()):  # FM ~747: isShuffled = w1.is_shuffled or w2.is_shuffled
            if not all(tags.values()):
                raise ContractError(f"is_shuffled {tags}: AITER reads both weights as shuffled "
                                    "when either is tagged, so the plain one is misread")
            w1, w2 = _unshuffle(w1), _unshuffle(w2)
        elif shuffleable(w1) and shuffleable(w2):
            raise ContractError(f"w1 {tuple(w1.shape)} / w2 {tuple(w2.shape)} are not shuffled: "
                                "tuned kernels assume pre-shuffled weights (incorrect results "
                                "otherwise, FM ~2438)")
        if topk_ids.dtype != torch.int32:
            raise ContractError(f"topk_ids must be int32, got {topk_ids.dtype} (aiter#5255)")
        if topk_weight.dtype != torch.float32 or topk_weight.shape != topk_ids.shape:
            raise ContractError("topk_weight must be float32 [M, K]")
        ep = expert_mask is not None
        if not ep:  # no EP: every expert is local, ids are local ids
            expert_mask = torch.ones(e, dtype=torch.int32)
        if expert_mask.dtype != torch.int32 or expert_mask.dim() != 1:
            raise ContractError("expert_mask must be a 1-D int32 tensor under EP")
        if not bool(((expert_mask == 0) | (expert_mask == 1)).all()):
            raise ContractError("expert_mask holds values other than 0/1: an expert_map (local "
                                "id or -1) was passed as the mask (vllm#49758)")
        if int(expert_mask.sum()) != e:
            raise ContractError(f"mask marks {int(expert_mask.sum())} local experts, w1 has {e}")
        n = M if num_local_tokens is None else int(device_value(num_local_tokens)[0])
        ids = topk_ids[:n].long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= expert_mask.numel()):
            raise ContractError("topk_ids must be global ids in [0, mask.numel())")
        if ep and ids.numel() and bool(expert_mask[ids[:, -1]].any()):
            raise ContractError("the last topk slot is not masked: under EP AITER drops one "
                                "slot from K for its tuned-config lookup (aiter#3377); append "
                                "an always-masked slot")
        local = torch.cumsum(expert_mask, 0) - 1  # AITER: local row by prefix sum
        out = torch.zeros(M, H, dtype=torch.float32)
        for k in range(ids.shape[1]):
            for g in ids[:, k].unique().tolist():
                if int(expert_mask[g]) == 0:
                    continue
                rows = (ids[:, k] == g).nonzero().flatten()
                j = int(local[g])
                if fp8:
                    y = _fp8_block_expert(scales[0][rows], w1[j], w2[j], scales[1][j],
                                          scales[2][j], self.fp8_dtype, out_dtype)
                else:
                    y = swiglu_expert(x[rows].float(), w1[j].float(), w2[j].float())
                out[rows] += topk_weight[rows, k, None] * y
        return out.to(out_dtype)


    def stage1_is_asm(self, *, M: int, **_) -> bool:
        """The fake's choice of stage-1 kernel for M rows (what the adapter's probe asks)."""
        return bool(self.asm_stage1(M) if callable(self.asm_stage1) else self.asm_stage1)


def _asm_scale(a1_scale, M: int, H: int) -> torch.Tensor:
    """a1_scale as the asm stage-1 kernel reads it: contiguous float32 [H/128, M], returned as
    the [M, H/128] it means. A row-major [M, H/128] is misread (refused here)."""
    want = (H // 128, M)
    if not isinstance(a1_scale, torch.Tensor) or a1_scale.dtype != torch.float32 \
            or tuple(a1_scale.shape) != want or not a1_scale.is_contiguous():
        got = None if a1_scale is None else (tuple(a1_scale.shape), a1_scale.is_contiguous())
        raise ContractError(f"asm stage 1 reads a1_scale as a contiguous float32 {list(want)} "
                            f"(transposed; asm_moe_2stage.cu takes its pointer, no strides), got "
                            f"{got}: a row-major [M, H/128] is read as other tokens' scales")
    return a1_scale.t().contiguous()


def _check_fp8_block(fp8, x, w1, w2, w1_scale, w2_scale, a1_scale, a2_scale):
    """QuantType.per_1x128's contract (FM): weights in dtypes.fp8 (the activation FP8 type is
    w1.dtype; kernel tables are keyed by dtypes.fp8, e4m3fnuz on gfx942), H and I multiples
    of 128 (weights viewed as 128x128 blocks), w1_scale [e, 2I/128, H/128] and w2_scale
    [e, H/128, I/128] float32 multipliers; FP8 input needs a1_scale [M, H/128] float32, float
    input is quantised inside (a1_scale None: a given one would be used as a static scale)."""
    for name, w in (("w1", w1), ("w2", w2)):
        if w.dtype != fp8:
            raise ContractError(f"{name} is {w.dtype}: AITER's FP8 kernels here read {fp8} "
                                "(dtypes.fp8); other FP8 bits are misread")
    e, I2, H = w1.shape
    if H % 128 or (I2 // 2) % 128:
        raise ContractError(f"H={H}, I={I2 // 2} must be multiples of 128 for per_1x128")
    for name, s, want in (("w1_scale", w1_scale, (e, I2 // 128, H // 128)),
                          ("w2_scale", w2_scale, (e, H // 128, I2 // 256))):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 \
                or tuple(s.shape) != want or not s.is_contiguous():
            raise ContractError(f"{name} must be contiguous float32 {list(want)}, got "
                                f"{None if s is None else (s.dtype, list(s.shape))}")
    if a2_scale is not None:
        raise ContractError("a2_scale given: AITER would use it as a static intermediate scale")
    M = x.shape[0]
    if x.dtype == fp8:
        if a1_scale is None:
            raise ContractError("a1_scale must be provided for quantized input for fused_moe")
        if a1_scale.dtype != torch.float32 or tuple(a1_scale.shape) != (M, H // 128) \
                or not a1_scale.is_contiguous():
            raise ContractError(f"a1_scale must be contiguous float32 [{M}, {H // 128}]")
        a = x.double() * a1_scale.double().repeat_interleave(128, dim=1)
    elif x.dtype in (torch.bfloat16, torch.float16):
        if a1_scale is not None:
            raise ContractError("a1_scale given with float input: AITER would quantise with it "
                                "as a static scale")
        a = quantize_rows(x, dtype=fp8).dequantize()
    else:
        raise ContractError(f"hidden_states must be bf16/fp16 or {fp8}, got {x.dtype}")
    return a, w1_scale, w2_scale


def _fp8_block_expert(a_rows, w1_j, w2_j, w1_scale_j, w2_scale_j, fp8, out_dtype):
    """One expert as AITER's two stages compute it: dequantised operands, float32 GEMMs, the
    intermediate written in the output dtype (FM fused_moe_2stages: ``a2`` of ``dtype``) and
    requantised per 1x128 for stage 2."""
    w1 = _dequant_blocks(w1_j, w1_scale_j)
    w2 = _dequant_blocks(w2_j, w2_scale_j)
    gate, up = (a_rows.float() @ w1.T).chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate) * up).to(out_dtype)
    d = quantize_rows(h, dtype=fp8).dequantize(torch.float32)
    return d @ w2.T


def _dequant_blocks(w, scale):
    """AITER's torch reference: w viewed as [N/128, 128, K/128, 128] times scale [N/128, K/128]."""
    N, K = w.shape
    v = w.float().view(N // 128, 128, K // 128, 128) * scale.view(N // 128, 1, K // 128, 1)
    return v.view(N, K)


