"""The small-batch path of the Triton experts (issue 33 item 2): decode-sized batches in two or
three launches that read the routing ids directly: no layout sort.

Pipeline (kernels in ``_triton_small.py``), for R rows with K global ids on a rank with e local
experts (bf16/fp16; block-FP8 rows quantised per 1x128 group, or float rows that the gate/up
kernel quantises as it loads them):
1. gate/up: inter[slot] = SiLU(x @ gate.T) * (x @ up.T) of every local slot, one column tile
   of I per program: per slot (``per_slot``, up to PER_SLOT_MAX_SLOTS slots; the programs
   stride over the slots; tl.dot with the slot as the one row of a 16-row tile, or GEMVs), or
   per local expert (its program gathers the expert's slots with a scan of the ids and runs
   them through tl.dot: each weight tile read once);
2. down, in one of three FORMs: per row (the row's K slots in order, "weighted" summing
   weight[r, k] * y_k in float32 in the same launch -> [R, H], deterministic, no atomics;
   "raw" writing each slot -> [R, K, H], exact zeros for non-local and empty slots), or into
   per-slot rows through tl.dot, per slot or per local expert (raw slots straight into the
   zero-filled [R, K, H]; weighted slots into float32 rows that
3. a third launch sums per row, in slot order).
Slots with id -1 and experts outside the rank's ExpertMap contribute nothing; no host reads
(CUDA-graph capturable); with ``num_rows`` the kernels stride over the device count of rows,
their grids sized by ``expected_rows``.

Block-FP8 batches run the streaming kernels of ``triton_small_fp8`` by default (the FP8 forms
here only with an explicit ``config``: they measured slower on an H100).
``TritonExperts`` and ``TritonFP8Experts`` take it (``path="auto"``) when the batch's slots
(rows x K; with ``num_rows``, ``expected_rows`` x K) are at most their ``small_max_slots``
(default SMALL_MAX_SLOTS; FP8: ``triton_small_fp8.max_slots()``); ``path="small"`` /
``"grouped"`` force either (tests, benchmarks); invariant mode and a fixed tuning ``config``
keep the grouped path.

Worked example (the test asserts it): ``choose_path("auto", rows=1, top_k=8)`` is "small"
(8 slots), ``choose_path("auto", rows=9, top_k=8)`` is "grouped" (72 > 64 slots).
"""

from __future__ import annotations

import functools
import json
import os

import torch

from rocm_moe._checks import env_count, error_message
from rocm_moe.placement import ExpertMap
from rocm_moe.weighting import ExpertsOutput

PATHS = ("auto", "small", "grouped")
# "auto" takes the small path up to this many slots: 8 tokens x top-8, where its default is the
# grouped path's kernels without the layout. The per-expert forms for up to 64 tokens (512) run
# with path="small" until GPU timings (bench/gpu_small.sh) show them ahead of the grouped path:
# the first H100 run (825871e, earlier forms) had them behind at 32 and 64 tokens.
SMALL_MAX_SLOTS = 64
# Block-FP8: "auto" takes the small path up to ``triton_small_fp8.max_slots()`` slots
# (ROCM_MOE_FP8_SMALL_MAX_SLOTS, read when TritonFP8Experts is built, else 64 on NVIDIA, where
# its streaming kernels were measured ahead of the grouped path on an H100). The tl.dot forms
# here took 86.5 / 362.6 / 874.3 us at 1 / 8 / 64 tokens on an H100 at c599ea3 against the
# grouped path's 32.1 / 112.6 / 230.0 (bench/results/decode_check_qwen3_fp8_h100.txt) and run
# only with an explicit config.
PER_SLOT_MAX_SLOTS = 64  # gate/up per slot (GEMV) up to here; per expert (tl.dot) above
# bf16 / fp16 batches of at most this many slots run the streaming kernels of
# ``triton_small_fp8`` (float weights, BF16_DEFAULTS: two launches, the weighted sum in the
# down launch, PDL on NVIDIA sm_90+) unless a config is given or the tuned table has an entry
# for the device and shape (``tuned_config``). Measured on an H200 on 2026-12-07, Qwen3-30B-A3B,
# the decode layer with 16 routings a graph (bench/results/decode_bf16_stream{64,0}_qwen3_h200
# .txt): 27.8 against 33.1 us at one token (the tl.dot forms), 131.2 against 136.3 at eight.
# 0 on ROCm (never timed there). ROCM_MOE_BF16_STREAM_MAX_SLOTS (an int >= 0) overrides it.
BF16_STREAM_MAX_SLOTS = 64 if torch.version.hip is None else 0
BF16_STREAM_ENV = "ROCM_MOE_BF16_STREAM_MAX_SLOTS"


def bf16_stream_max_slots() -> int:
    """The most slots of a bf16 / fp16 batch that the streaming kernels take by default:
    ROCM_MOE_BF16_STREAM_MAX_SLOTS, else BF16_STREAM_MAX_SLOTS."""
    return env_count(BF16_STREAM_ENV, BF16_STREAM_MAX_SLOTS,
                     "set it to the most slots (rows x top_k), e.g. 8, or 0 for the tl.dot forms")


def check_path(path: object, small_max_slots: object, *, invariant: bool = False) -> None:
    """The experts' ``path`` ("auto", "small" or "grouped") and ``small_max_slots`` (int >= 0)
    arguments; invariant experts (one launch config for every batch) run only "grouped"."""
    if path not in PATHS:
        raise ValueError(error_message("path", repr(path), f"must be one of {list(PATHS)}",
                                       "pass 'auto' (by batch size), 'small' or 'grouped'"))
    if invariant and path == "small":
        raise ValueError(error_message(
            "path", repr(path), "invariant=True runs the grouped path's one launch config for "
            "every batch size", "pass path='auto' (or 'grouped') with invariant=True"))
    if small_max_slots is not None and (isinstance(small_max_slots, bool) or not isinstance(
            small_max_slots, int) or small_max_slots < 0):
        raise ValueError(error_message(
            "small_max_slots", repr(small_max_slots), "must be None or an int >= 0",
            f"pass the most slots (rows x top_k) of the small path, e.g. {SMALL_MAX_SLOTS}"))


def choose_path(path: str, *, rows: int, top_k: int, max_slots: int | None = None) -> str:
    """"small" or "grouped": ``path`` itself unless "auto", then "small" for at most
    ``max_slots`` (default SMALL_MAX_SLOTS) slots, rows x top_k."""
    if path != "auto":
        return path
    limit = SMALL_MAX_SLOTS if max_slots is None else max_slots
    return "small" if rows * top_k <= limit else "grouped"


def takes_small_path(experts, R: int, K: int, num_rows, expected_rows, variant=None) -> bool:
    """Whether ``experts`` (a TritonExperts or TritonFP8Experts, with ``path`` and
    ``small_max_slots``) run this call on the small path: forced, or "auto" and small enough;
    never in invariant mode, with a fixed tuning ``config`` under "auto", or for an expert
    variant other than plain SwiGLU (refused when forced)."""
    from rocm_moe.experts.base import PLAIN

    plain = variant is None or variant == PLAIN
    if experts.path == "small" and not plain:
        raise ValueError(error_message(
            "path", "'small'", f"the small path runs plain SwiGLU only, not {variant}",
            "pass path='auto' or 'grouped' for this expert variant"))
    if not plain or getattr(experts, "invariant", False) or (
            experts.path == "auto" and experts.config is not None):
        return False
    rows = expected_rows_of(R, num_rows, expected_rows)
    return choose_path(experts.path, rows=rows, top_k=K,
                       max_slots=experts.small_max_slots) == "small"


def expected_rows_of(R: int, num_rows: torch.Tensor | None, expected_rows: int | None) -> int:
    """The rows a launch is sized for: R, or the host's ``expected_rows`` for a capacity-sized
    batch (``num_rows`` on the device)."""
    return R if num_rows is None or expected_rows is None else expected_rows


CONFIG_FILE = os.path.join(os.path.dirname(__file__), "triton_small_configs.json")


@functools.cache
def _table() -> dict:
    """``bench/tune_experts_small.py``'s table: device -> "HxI" -> "bf16"/"fp8" -> slots (a
    power of two, as a string) -> config; {} where none was written."""
    if not os.path.exists(CONFIG_FILE):
        return {}
    with open(CONFIG_FILE) as f:
        return json.load(f)


def tuned_config(slots: int, *, fp8: bool, hidden: int, inter: int,
                 device_name: str) -> dict | None:
    """The tuned entry for the smallest tuned slot count >= ``slots`` (else the largest), or
    None where the table has nothing for this device, shape and format."""
    entries = _table().get(device_name, {}).get(f"{hidden}x{inter}", {}).get(
        "fp8" if fp8 else "bf16", {})
    if not entries:
        return None
    keys = sorted(entries, key=int)
    key = next((k for k in keys if int(k) >= slots), keys[-1])
    return {k: dict(v) if isinstance(v, dict) else v for k, v in entries[key].items()}


def small_config(slots: int, *, fp8: bool, hidden: int = 0, inter: int = 0,
                 device_name: str = "") -> dict:
    """Launch config of the small path for a batch of ``slots`` (rows x K) expected: the
    tuned table's (``tuned_config``) where it has this device and H x I, else a heuristic:
    ``{"per_slot": gate/up per slot or per local expert (tl.dot), "gate_up": {BLOCK_M,
    BLOCK_N, BLOCK_K, CHUNK, num_warps, num_stages, DOT}, "down": {the same, FORM}}``.
    gate_up DOT: the per-slot gate/up through tl.dot (the slot as the one row of a BLOCK_M
    tile: weight loads pipelined through shared memory) instead of GEMVs on the vector units.
    down FORM: "row" (one program per row and tile, the K slots in order, the weighted sum in
    the same launch; DOT as for gate/up), "slot" or "expert" (tl.dot into per-slot rows, one
    program per slot or per local expert and tile; a weighted sum is a third launch).
    Heuristic, UNTUNED ON HARDWARE for this path: up to PER_SLOT_MAX_SLOTS the grouped path's
    kernels without its layout (per slot, tl.dot, the grouped path's tuned one-token H100
    tiles: gate/up 64 x 128, down 32 x 256; FP8: 32-column gate/up tiles); per local expert
    above, where tokens share experts and per-slot reads would repeat. FP8: BLOCK_K is the
    128 group, BLOCK_N divides 128."""
    tuned = tuned_config(slots, fp8=fp8, hidden=hidden, inter=inter, device_name=device_name)
    if tuned is not None:
        return tuned
    per_slot = slots <= PER_SLOT_MAX_SLOTS
    if per_slot:  # the grouped path's H100 tiles at one token (tl.dot)
        gate_up = dict(BLOCK_M=16, BLOCK_N=32 if fp8 else 64, BLOCK_K=128, CHUNK=128,
                       num_warps=4, num_stages=3, DOT=True)
        down = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if fp8 else 256, CHUNK=128,
                    num_warps=4, num_stages=3 if fp8 else 2, DOT=True, FORM="slot")
    else:
        gate_up = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if fp8 else 64, CHUNK=128,
                       num_warps=4, num_stages=3, DOT=True)
        down = dict(gate_up, FORM="expert")
    return dict(per_slot=per_slot, gate_up=gate_up, down=down)


DOWN_FORMS = ("row", "slot", "expert")


def _per_slot_rows(cfg: dict) -> bool:
    """The down kernel writes per-slot rows (FORM "slot" or "expert"): raw outputs need a
    zero fill, weighted ones a third launch."""
    form = cfg["down"]["FORM"]
    assert form in DOWN_FORMS, cfg
    return form != "row"


def _launch(x, xs, w13, ws13, w2, ws2, inter, out, topk_ids_RK, topk_weights_RK,
            expert_map: ExpertMap, *, weighted: bool, num_rows, expected_rows, cfg: dict,
            fp8: dict | None, tma: bool = False) -> None:
    """The kernels; ``fp8``: None (bf16/fp16) or the FP8 constexprs (UPCAST, PRECISE, FP8_MAX,
    ROUND, MIN_EXP); ``xs`` / ``ws13`` / ``ws2``: the FP8 scales (unused otherwise); ``tma``:
    the tl.dot forms load bf16/fp16 weights through tensor descriptors (where
    ``triton._operand`` allows)."""
    from rocm_moe.experts import _triton_small as k
    from rocm_moe.experts.triton import _operand

    R, K = topk_ids_RK.shape
    e, H, I = w13.shape[0], x.shape[1], w2.shape[2]
    dev = x.device
    rows = max(1, min(R, expected_rows_of(R, num_rows, expected_rows)))
    ids = topk_ids_RK.contiguous().view(-1)
    weights = topk_weights_RK.contiguous().view(-1)
    emap = expert_map.map_E.to(dev)
    bounded = num_rows is not None
    nr = num_rows if bounded else ids
    gu, dn = cfg["gate_up"], cfg["down"]
    f = fp8 or {}
    fp8_args = dict(FP8=fp8 is not None, UPCAST=f.get("UPCAST", False),
                    PRECISE=f.get("PRECISE", False))
    quant = dict(FP8_MAX=f.get("FP8_MAX", 448.0), ROUND=f.get("ROUND", False),
                 MIN_EXP=f.get("MIN_EXP", -6))
    s13 = (ws13.stride(0), ws13.stride(1)) if fp8 else (0, 0)
    s2 = (ws2.stride(0), ws2.stride(1)) if fp8 else (0, 0)
    dot_gu = gu.get("DOT", False) or not cfg["per_slot"]
    w13_op, desc13 = _operand(w13.view(-1, H), [gu["BLOCK_N"], gu["BLOCK_K"]],
                              tma and dot_gu and fp8 is None)
    k._small_gate_up_kernel[(rows * K if cfg["per_slot"] else e, -(-I // gu["BLOCK_N"]))](
        x, xs, w13_op, ws13, inter, ids, emap, nr, R, H, I, K,
        x.stride(0), xs.stride(0), H, *s13, inter.stride(0), **fp8_args, **quant,
        QUANT_X=f.get("QUANT_X", False), BOUNDED=bounded, PER_SLOT=cfg["per_slot"],
        DOT=gu.get("DOT", False), DESC=desc13, BLOCK_M=gu["BLOCK_M"], BLOCK_N=gu["BLOCK_N"],
        BLOCK_K=gu["BLOCK_K"], CHUNK=gu["CHUNK"],
        num_warps=gu["num_warps"], num_stages=gu["num_stages"])
    tiles = dict(BLOCK_N=dn["BLOCK_N"], BLOCK_K=dn["BLOCK_K"], num_warps=dn["num_warps"],
                 num_stages=dn["num_stages"])
    if not _per_slot_rows(cfg):
        k._small_down_kernel[(rows, -(-H // dn["BLOCK_N"]))](
            inter, w2.view(-1, I), ws2, out, ids, emap, weights, nr,
            R, H, I, inter.stride(0), I, *s2, out.stride(0), 0 if weighted else out.stride(1),
            K_TOPK=K, **fp8_args, **quant, WEIGHTED=weighted, BOUNDED=bounded,
            DOT=dn.get("DOT", False), BLOCK_M=dn["BLOCK_M"], **tiles)
        return
    # per-slot rows: raw slots straight into out ([R, K, H] = [R * K, H], zero-filled),
    # weighted ones into float32 slot rows that a third launch sums per row
    slots = out.view(R * K, H) if not weighted else torch.empty(R * K, H, dtype=torch.float32,
                                                                device=dev)
    per_slot = dn["FORM"] == "slot"
    w2_op, desc2 = _operand(w2.view(-1, I), [dn["BLOCK_N"], dn["BLOCK_K"]], tma and fp8 is None)
    k._small_down_slots_kernel[(rows * K if per_slot else e, -(-H // dn["BLOCK_N"]))](
        inter, w2_op, ws2, slots, ids, emap, weights, nr, R, H, I, K,
        inter.stride(0), I, *s2, slots.stride(0), **fp8_args, **quant, WEIGHTED=weighted,
        BOUNDED=bounded, PER_SLOT=per_slot, DESC=desc2, BLOCK_M=dn["BLOCK_M"], CHUNK=dn["CHUNK"],
        **tiles)
    if weighted:
        k._small_sum_kernel[(rows, -(-H // SUM_BLOCK_H))](
            slots, ids, emap, out, nr, R, H, K_TOPK=K, BOUNDED=bounded, BLOCK_H=SUM_BLOCK_H)


SUM_BLOCK_H = 1024  # columns per program of the weighted slots' sum (per-slot-row downs)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def _outputs(R: int, K: int, H: int, *, weighted: bool, zeros: bool, dtype, device):
    """The output: weighted [R, H] (rows past a device count unwritten), raw [R, K, H],
    zero-filled where the kernels leave slots unwritten (``zeros``: the per-expert down, or
    rows past a device count, which must stay zero; the per-row down writes every slot of
    its rows, zeros included)."""
    if weighted:
        return torch.empty(R, H, dtype=dtype, device=device)
    return (torch.zeros if zeros else torch.empty)(R, K, H, dtype=dtype, device=device)


def small_experts(x_RH: torch.Tensor, topk_ids_RK: torch.Tensor, topk_weights_RK: torch.Tensor,
                  w13: torch.Tensor, w2: torch.Tensor, expert_map: ExpertMap, *, weighted: bool,
                  num_rows: torch.Tensor | None = None, expected_rows: int | None = None,
                  config: dict | None = None, tma: bool | None = None) -> ExpertsOutput:
    """The bf16/fp16 experts of a small batch (checked inputs: ``TritonExperts`` calls it);
    ``config``: ``small_config``'s form (default: by the slots expected); ``tma``: weights of
    the tl.dot forms through tensor descriptors (None: where ``triton.tma_supported``)."""
    from rocm_moe.experts.triton import tma_supported

    R, K = topk_ids_RK.shape
    H, I = x_RH.shape[1], w2.shape[2]
    dev = x_RH.device
    slots = expected_rows_of(R, num_rows, expected_rows) * K
    name = _device_name(dev)
    if (config or {}).get("kind") == "stream" or (
            config is None and slots <= bf16_stream_max_slots()
            and tuned_config(slots, fp8=False, hidden=H, inter=I, device_name=name) is None):
        from rocm_moe.experts.triton_small_fp8 import stream_fp8_experts

        return stream_fp8_experts(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                                  weighted=weighted, out_dtype=x_RH.dtype, num_rows=num_rows,
                                  expected_rows=expected_rows, config=config)
    cfg = config or small_config(slots, fp8=False, hidden=H, inter=I, device_name=name)
    x = x_RH if x_RH.stride(1) == 1 else x_RH.contiguous()
    out = _outputs(R, K, H, weighted=weighted, dtype=x.dtype, device=dev,
                   zeros=num_rows is not None or _per_slot_rows(cfg))
    if R * K:
        inter = torch.empty(R * K, I, dtype=x.dtype, device=dev)
        _launch(x, x, w13.contiguous(), x, w2.contiguous(), x, inter, out, topk_ids_RK,
                topk_weights_RK, expert_map, weighted=weighted, num_rows=num_rows,
                expected_rows=expected_rows, cfg=cfg, fp8=None,
                tma=tma_supported(dev) if tma is None else tma)
    return ExpertsOutput(out=out, weights_applied=weighted)


def small_fp8_experts(rows, topk_ids_RK: torch.Tensor, topk_weights_RK: torch.Tensor, w13, w2,
                      expert_map: ExpertMap, *, weighted: bool, out_dtype: torch.dtype,
                      upcast: bool, precise: bool, num_rows: torch.Tensor | None = None,
                      expected_rows: int | None = None,
                      config: dict | None = None) -> ExpertsOutput:
    """The block-FP8 experts of a small batch: ``rows`` FP8Rows [R, H] (1x128 groups) or float
    rows [R, H] that the gate/up kernel quantises per 1x128 group as it loads them (as
    ``quant.quantize_rows``, bit for bit: no launch of their own), ``w13`` / ``w2``
    BlockFP8Weights (checked: ``TritonFP8Experts`` calls it); the intermediate is kept in
    float32 and quantised per 1x128 group by the down kernel; ``upcast`` / ``precise`` as
    ``TritonFP8Experts`` (the per-expert kernels' tl.dot). ``config`` None or of kind "stream":
    the streaming kernels of ``triton_small_fp8`` (float32 sums, no tl.dot); else
    ``small_config``'s tl.dot / GEMV forms here."""
    from rocm_moe.quant import FP8Rows, fp8_max, fp8_rounding

    if config is None or config.get("kind") == "stream":  # the default: streaming kernels
        from rocm_moe.experts.triton_small_fp8 import stream_fp8_experts

        return stream_fp8_experts(rows, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                                  weighted=weighted, out_dtype=out_dtype, num_rows=num_rows,
                                  expected_rows=expected_rows, config=config)
    R, K = topk_ids_RK.shape
    H, I = w13.shape[2], w2.shape[2]
    dev = rows.device
    cfg = config or small_config(expected_rows_of(R, num_rows, expected_rows) * K, fp8=True,
                                 hidden=H, inter=I, device_name=_device_name(dev))
    assert cfg["gate_up"]["BLOCK_K"] == 128, cfg  # one activation group a K step
    assert cfg["down"]["BLOCK_K"] == 128, cfg
    assert 128 % cfg["gate_up"]["BLOCK_N"] == 0, cfg  # a column tile in one weight block
    assert 128 % cfg["down"]["BLOCK_N"] == 0, cfg
    quant_x = not isinstance(rows, FP8Rows)
    if quant_x:  # float rows: quantised in the gate/up kernel
        aq = as_ = rows if rows.stride(1) == 1 else rows.contiguous()
    else:
        aq = rows.q if rows.q.stride(1) == 1 else rows.q.contiguous()
        as_ = rows.scale if rows.scale.stride(1) == 1 else rows.scale.contiguous()
    out = _outputs(R, K, H, weighted=weighted, dtype=out_dtype, device=dev,
                   zeros=num_rows is not None or _per_slot_rows(cfg))
    if R * K:
        inter = torch.empty(R * K, I, dtype=torch.float32, device=dev)
        fp8 = dict(UPCAST=upcast, PRECISE=precise, QUANT_X=quant_x,
                   FP8_MAX=fp8_max(w13.dtype), **fp8_rounding(w13.dtype))
        _launch(aq, as_, w13.weight.contiguous(), w13.scale_inv.contiguous(),
                w2.weight.contiguous(), w2.scale_inv.contiguous(), inter, out, topk_ids_RK,
                topk_weights_RK, expert_map, weighted=weighted, num_rows=num_rows,
                expected_rows=expected_rows, cfg=cfg, fp8=fp8)
    return ExpertsOutput(out=out, weights_applied=weighted)


# A dense SwiGLU (the shared experts of DeepSeek-V3, Kimi K2, GLM-4.5, Qwen2-MoE) on at most
# this many rows runs through the streaming kernels as one expert that every row goes to (two
# launches, PDL-chained, instead of torch's GEMM, SiLU, multiply and GEMM): 0 (off) until
# measured ahead of the torch path; ROCM_MOE_SHARED_STREAM_MAX_ROWS (an int >= 0) overrides it.
SHARED_STREAM_MAX_ROWS = 0
SHARED_STREAM_ENV = "ROCM_MOE_SHARED_STREAM_MAX_ROWS"
SHARED_ROWS_CAP = 1024  # the most rows the streaming SwiGLU takes (a larger setting is refused)


def shared_stream_max_rows() -> int:
    """ROCM_MOE_SHARED_STREAM_MAX_ROWS, else SHARED_STREAM_MAX_ROWS."""
    rows = env_count(SHARED_STREAM_ENV, SHARED_STREAM_MAX_ROWS,
                     "set it to the most rows, e.g. 8, or 0 for torch's GEMMs")
    if rows > SHARED_ROWS_CAP:  # (it would be cut there: say so instead)
        raise ValueError(error_message(SHARED_STREAM_ENV, rows, f"must be at most "
                                       f"{SHARED_ROWS_CAP} (the most rows the streaming SwiGLU "
                                       "takes)", f"set it to {SHARED_ROWS_CAP} or fewer"))
    return rows


_ONE_EXPERT: dict = {}  # device -> (map of a one-expert rank, zero ids, unit weights)


def _one_expert(device: torch.device) -> tuple[ExpertMap, torch.Tensor, torch.Tensor] | None:
    """The map of a one-expert rank and [SHARED_ROWS_CAP, 1] zero ids / unit weights on
    ``device`` (sliced per call: no fill launch in a decode step), made on the first eager call
    for the device; None while a CUDA graph is being captured before that (a host copy and
    fills cannot be captured: the caller takes torch's path)."""
    if device not in _ONE_EXPERT:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        from rocm_moe.placement import Placement

        _ONE_EXPERT[device] = (
            Placement.contiguous(1, 1).expert_map(0).to(device),
            torch.zeros(SHARED_ROWS_CAP, 1, dtype=torch.int32, device=device),
            torch.ones(SHARED_ROWS_CAP, 1, dtype=torch.float32, device=device))
    return _ONE_EXPERT[device]


def stream_swiglu(x_TH: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor | None:
    """``swiglu_expert(x, w13, w2)`` ([T, H] rows, w13 [2I, H], w2 [H, I]) through the
    streaming kernels, or None where they do not take it: T above ``shared_stream_max_rows()``
    (default 0: never) or SHARED_ROWS_CAP, Triton not runnable on the device (an NVIDIA GPU, or
    the interpreter), ROCm, rows and weights not one bf16 / fp16 dtype, x not 2-D, weights not
    contiguous, autograd on for any of them, or a CUDA graph captured before the first eager
    call. Float32 sums (SiLU(gate) * up kept in float32), rounded once to x's dtype: within
    bf16 rounding of torch's path, not its bits. Shapes or devices that do not match: a
    ValueError."""
    from rocm_moe._libs import triton_runs_on

    T = x_TH.shape[0]
    if not 0 < T <= min(shared_stream_max_rows(), SHARED_ROWS_CAP):
        return None
    ws = (x_TH, w13, w2)
    if torch.version.hip is not None or not triton_runs_on(x_TH.device) or x_TH.dim() != 2 or \
            x_TH.dtype not in (torch.bfloat16, torch.float16) or \
            any(t.dtype != x_TH.dtype for t in ws) or \
            not (w13.is_contiguous() and w2.is_contiguous()) or \
            (torch.is_grad_enabled() and any(t.requires_grad for t in ws)):
        return None
    H, I = x_TH.shape[1], w2.shape[-1]
    if w13.shape != (2 * I, H) or w2.shape != (H, I) or \
            any(t.device != x_TH.device for t in ws):
        raise ValueError(error_message(
            "stream_swiglu(w13, w2)", f"w13 {tuple(w13.shape)} on {w13.device}, w2 "
            f"{tuple(w2.shape)} on {w2.device}, x {tuple(x_TH.shape)} on {x_TH.device}",
            "w13 must be [2I, H] and w2 [H, I] for x [T, H], all on one device",
            "pass the shared expert's own weights"))
    one = _one_expert(x_TH.device)
    if one is None:
        return None
    from rocm_moe.experts.triton_small_fp8 import stream_fp8_experts

    emap, ids, ones = one
    return stream_fp8_experts(x_TH, ids[:T], ones[:T], w13[None], w2[None], emap,
                              weighted=True, out_dtype=x_TH.dtype).out
