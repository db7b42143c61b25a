"""The streaming block-FP8 small-batch experts (issue 33 item 2): decode-sized batches in two
launches (three for a weighted per-slot down) that read ``topk_ids`` directly and stream every
FP8 weight tile once through the vector units (kernels: ``_triton_small_fp8.py``).

Pipeline, for R rows with K global ids on a rank with e local experts:
1. gate/up: inter[slot] = SiLU(a @ gate.T) * (a @ up.T) in float32, one column tile of I per
   program, per slot (FORM "slot": R * K x I / BLOCK_N programs) or per row (FORM "row": the
   row's K slots as lanes of one tile); ``a`` the rows quantised per 1x128 group as they load
   (float rows: no quantise launch; FP8Rows: dequantised), or kept float (ACT "float");
2. down: per row (FORM "row": the K slots as lanes; "weighted" sums weight_k * y_k in float32
   in the same launch, deterministic, no atomics; "raw" writes [R, K, H] with exact zeros for
   non-local and empty slots) or per slot (FORM "slot": weighted slots into float32 rows that
   ``_triton_small._small_sum_kernel`` adds in slot order); the intermediate quantised per
   1x128 group as it loads (ACT "fp8", the FP8 contract of ``experts/fp8.py``).
Slots with id -1 and experts outside the rank's ExpertMap contribute nothing; no host reads
(CUDA-graph capturable); with ``num_rows`` the programs stride over the device count of rows,
their grids sized by ``expected_rows``. Sums are float32 per element (``precise`` holds by
construction; ``upcast`` does not apply: no tl.dot).

Config (``stream_config``): ``{"kind": "stream", "ACT": "fp8" | "float", "PDL": bool,
"gate_up": {FORM, BLOCK_N, BLOCK_K, num_warps, num_stages, PREFETCH}, "down": {the same}}``
(other keys refused); BLOCK_K 128, 256 or 512 (whole 1x128 groups), BLOCK_N a power of two
dividing 128 (a tile inside one weight block), gate/up SPLIT (default 1) split-K over H
(partials summed by the down kernel), down PRELOAD (0-4, default 0) the first K steps' weight
tiles loaded before the down kernel waits for gate/up (with PDL: streamed while gate/up
runs; the same bits), PREFETCH (default false) the next K step's weights
loaded before this step's sums (twice the bytes in flight a thread, but 190-220 registers
instead of 80-130 on sm_90 compiled offline: fewer programs per SM; the sweep times both);
top-level PDL (default true since the H100 run of 2026-12-07: Qwen3 FP8 layer 27.2 -> 25.4
us at one token, 104.5 -> 102.4 at eight, bench/results/decode_gate_qwen3_fp8{,_pdl}_5dbd0b3_
h100.json; NVIDIA sm_90+, compiled, ignored elsewhere: the bits do not depend on it, tested on
the H100) launches gate/up as a programmatic dependent of the kernel before it (the
router's, which lets it start early) and down of gate/up, whose programs load their ids and
first weight tile before waiting for the intermediate. The environment overrides the
defaults without a code change (``bench/gpu_fp8_decode.sh`` prints the lines to set):
  ROCM_MOE_FP8_SMALL_CONFIG     JSON: one config for every size, or {"<slots>": config, ...}
                                (the entry of the smallest key >= the batch's slots, else the
                                largest), either of them per shape as {"<H>x<I>": ...} (other
                                shapes: the defaults); partial configs are merged into the
                                default.
  ROCM_MOE_FP8_SMALL_MAX_SLOTS  TritonFP8Experts(path="auto") takes this path up to this many
                                slots (rows x K); default FP8_SMALL_MAX_SLOTS.

Worked example (the test asserts it): ``stream_config(8)["gate_up"]["FORM"]`` is "slot" and
``stream_config(8)["down"]["FORM"]`` is "row".
"""

from __future__ import annotations

import json
import os

import torch

from rocm_moe._checks import env_count, error_message
from rocm_moe.placement import ExpertMap
from rocm_moe.weighting import ExpertsOutput

CONFIG_ENV = "ROCM_MOE_FP8_SMALL_CONFIG"
MAX_SLOTS_ENV = "ROCM_MOE_FP8_SMALL_MAX_SLOTS"
# "auto" runs this path up to this many slots: 8 tokens x top-8 on NVIDIA GPUs. Measured on an
# H100 at b13d4a4 (bench/results/fp8_small_sweep_h100.txt, every routing its own weights: no L2
# reuse): Qwen3-30B-A3B 22.1 / 94.8 us at 1 / 8 tokens against the grouped path's 34.9 / 111.2,
# behind it from 16 tokens (161.1 vs 158.7); DeepSeek-V3 (32 local experts) 31.9 / 119.3
# against 49.7 / 120.4. 0 on ROCm (the grouped path): never timed there, and Triton 3.6 spills
# the per-row gate/up on gfx942 (tests/test_compile_targets.py).
FP8_SMALL_MAX_SLOTS = 64 if torch.version.hip is None else 0
FORMS = ("slot", "row")
ACTS = ("fp8", "float")
TOP_KEYS = {"kind", "ACT", "PDL", "gate_up", "down"}
STAGE_KEYS = {"FORM", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "PREFETCH", "SPLIT",
              "PRELOAD"}


def _stream(gate_up: tuple, down: tuple) -> dict:
    """A stream config from (FORM, BLOCK_N, BLOCK_K, num_warps, num_stages) of each kernel."""
    def k(form, bn, bk, warps, stages):
        return dict(FORM=form, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                    PREFETCH=False)
    return dict(kind="stream", ACT="fp8", PDL=True, gate_up=k(*gate_up), down=k(*down))


# Defaults by the slots expected (key: the most slots an entry serves): the H100 sweep's best
# for Qwen3-30B-A3B (bench/results/fp8_small_sweep_h100.txt). At one token: per-slot gate/up
# (R * K * I / 16 programs: 384 at one Qwen3 token), 2 x 8 KiB of FP8 weights per K step;
# per-row down with the row's 8 slots as lanes of a [8, 8, 256] tile (H / 8 programs).
DEFAULTS = {
    "8": _stream(("slot", 16, 512, 8, 3), ("row", 8, 256, 8, 1)),
    "64": _stream(("slot", 16, 256, 4, 1), ("slot", 32, 256, 4, 1)),
}
# Per (H, I) where the sweep's best differs from DEFAULTS: DeepSeek-V3's one-token down.
TUNED = {"7168x2048": {"8": _stream(("slot", 16, 512, 8, 3), ("slot", 16, 512, 4, 1))}}
# bf16 / fp16 weights (``triton_small.small_experts`` up to its BF16_STREAM_MAX_SLOTS), ACT
# "float" (nothing is quantised): the best of bench/sweep_bf16_small.py on an H200, Qwen3's
# experts, 16 routings a graph (bench/results/bf16_small_sweep_5c33a1e_h200.txt): 23.0 us at
# one token (the tl.dot forms 28.5, the first tiles here 26.3), 124.3 at eight (131.1).
BF16_DEFAULTS = {
    "8": dict(_stream(("slot", 8, 256, 4, 1), ("row", 8, 256, 8, 1)), ACT="float"),
    "64": dict(_stream(("slot", 32, 128, 8, 1), ("row", 8, 128, 8, 1)), ACT="float"),
}


def _bad(field: str, value, rule: str):
    return ValueError(error_message(field, repr(value), rule,
                                    f"fix {CONFIG_ENV} (see rocm_moe/experts/triton_small_fp8.py)"))


def check_config(cfg: object) -> dict:
    """``cfg`` as a complete stream config, or ValueError naming the field."""
    if not isinstance(cfg, dict):
        raise _bad("config", cfg, "must be a dict")
    if cfg.get("kind") != "stream":
        raise _bad("config.kind", cfg.get("kind"), "must be 'stream'")
    extra = sorted(set(cfg) - TOP_KEYS)
    if extra:
        raise _bad(f"config.{extra[0]}", cfg[extra[0]], f"is not a key (keys: {sorted(TOP_KEYS)})")
    if cfg.get("ACT") not in ACTS:
        raise _bad("config.ACT", cfg.get("ACT"), f"must be one of {list(ACTS)}")
    if not isinstance(cfg.get("PDL", False), bool):
        raise _bad("config.PDL", cfg.get("PDL"), "must be true or false")
    for stage in ("gate_up", "down"):
        k = cfg.get(stage)
        if not isinstance(k, dict):
            raise _bad(f"config.{stage}", k, "must be a dict")
        extra = sorted(set(k) - STAGE_KEYS)
        if extra:
            raise _bad(f"config.{stage}.{extra[0]}", k[extra[0]],
                       f"is not a key (keys: {sorted(STAGE_KEYS)})")
        if k.get("FORM") not in FORMS:
            raise _bad(f"config.{stage}.FORM", k.get("FORM"), f"must be one of {list(FORMS)}")
        if k.get("BLOCK_K") not in (128, 256, 512):
            raise _bad(f"config.{stage}.BLOCK_K", k.get("BLOCK_K"), "must be 128, 256 or 512")
        bn = k.get("BLOCK_N")
        if not isinstance(bn, int) or bn < 1 or 128 % bn:
            raise _bad(f"config.{stage}.BLOCK_N", bn, "must be a power of two dividing 128")
        split = k.get("SPLIT", 1)
        if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= 16 or (
                stage == "down" and split != 1):
            raise _bad(f"config.{stage}.SPLIT", split,
                       "must be an int 1-16 (gate/up; the down kernel takes no split)")
        pre = k.get("PRELOAD", 0)
        if isinstance(pre, bool) or not isinstance(pre, int) or not 0 <= pre <= 4 or (
                stage == "gate_up" and pre):
            raise _bad(f"config.{stage}.PRELOAD", pre,
                       "must be an int 0-4 (down; gate/up takes none: it needs the ids first)")
        if not isinstance(k.get("PREFETCH", False), bool):
            raise _bad(f"config.{stage}.PREFETCH", k.get("PREFETCH"), "must be true or false")
        for key, ok in (("num_warps", (1, 2, 4, 8, 16)), ("num_stages", (1, 2, 3, 4, 5))):
            if k.get(key) not in ok:
                raise _bad(f"config.{stage}.{key}", k.get(key), f"must be one of {list(ok)}")
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = {**base, **{k: v for k, v in over.items() if not isinstance(v, dict)}}
    for stage in ("gate_up", "down"):
        out[stage] = {**base[stage], **over.get(stage, {})}
    return out


def _pick(table: dict, slots: int) -> dict:
    keys = sorted(table, key=int)
    return table[next((k for k in keys if int(k) >= slots), keys[-1])]


def _is_shape(key: str) -> bool:
    h, _, i = key.partition("x")
    return h.isdigit() and i.isdigit()


def stream_config(slots: int, *, hidden: int = 0, inter: int = 0) -> dict:
    """The launch config for a batch of ``slots`` (rows x K) expected of experts with H =
    ``hidden``, I = ``inter``: DEFAULTS with the shape's TUNED entries in their place,
    overridden by ROCM_MOE_FP8_SMALL_CONFIG (module docstring; a table keyed "HxI" holds one
    per shape, other shapes keep the defaults)."""
    cfg = _pick({**DEFAULTS, **TUNED.get(f"{hidden}x{inter}", {})}, slots)
    over = _env_override()
    if over is not None:
        if over and all(_is_shape(k) for k in over):
            over = over.get(f"{hidden}x{inter}", {})
            if not isinstance(over, dict):
                raise _bad(f"{CONFIG_ENV}[{hidden}x{inter}]", over, "must be a JSON object")
        if over and all(k.isdigit() for k in over):
            over = _pick(over, slots)
        if not isinstance(over, dict):
            raise _bad(CONFIG_ENV, over, "must hold configs as JSON objects")
        for key, part in over.items():  # (an object under any other key would be dropped)
            if key in ("gate_up", "down") and not isinstance(part, dict):
                raise _bad(f"{CONFIG_ENV}.{key}", part, "must be a JSON object")
            if key not in ("gate_up", "down") and isinstance(part, dict):
                raise _bad(f"{CONFIG_ENV}.{key}", part, "is not a config key here: a config, "
                           "a table of configs by slot count (digit keys only) or by shape "
                           "(HxI keys only)")
        cfg = _merge(cfg, over)
    return check_config({**cfg, "gate_up": dict(cfg["gate_up"]), "down": dict(cfg["down"])})


def _env_override() -> dict | None:
    """ROCM_MOE_FP8_SMALL_CONFIG parsed (None where unset or empty)."""
    env = os.environ.get(CONFIG_ENV)
    if not env:
        return None
    try:
        over = json.loads(env)
    except json.JSONDecodeError as exc:
        raise _bad(CONFIG_ENV, env, f"must be JSON ({exc})") from None
    if not isinstance(over, dict):
        raise _bad(CONFIG_ENV, env, "must be a JSON object")
    return over


def check_env_config() -> None:
    """ROCM_MOE_FP8_SMALL_CONFIG checked whole: every entry it holds (each shape's, each slot
    count's) merged into the defaults as ``stream_config`` would merge it (``rocm-moe info``)."""
    over = _env_override()
    if not over:
        return
    shapes = [k for k in over if _is_shape(k)] if all(_is_shape(k) for k in over) else ["0x0"]
    for shape in shapes:
        entry = over.get(shape, over)
        slots = [int(k) for k in entry if k.isdigit()] if isinstance(entry, dict) else []
        hidden, _, inter = shape.partition("x")
        for n in {1, *slots, *(int(k) for k in DEFAULTS)}:
            stream_config(n, hidden=int(hidden), inter=int(inter))


def max_slots() -> int:
    """The most slots "auto" sends here: ROCM_MOE_FP8_SMALL_MAX_SLOTS, else
    FP8_SMALL_MAX_SLOTS."""
    return env_count(MAX_SLOTS_ENV, FP8_SMALL_MAX_SLOTS,
                     "set it to the most slots (rows x top_k), e.g. 8")


def _lanes(K: int) -> int:
    return 1 << max(0, (K - 1).bit_length())


def stream_fp8_experts(rows, topk_ids_RK: torch.Tensor, topk_weights_RK: torch.Tensor, w13, w2,
                       expert_map: ExpertMap, *, weighted: bool, out_dtype: torch.dtype,
                       num_rows: torch.Tensor | None = None, expected_rows: int | None = None,
                       config: dict | None = None) -> ExpertsOutput:
    """The experts of a small batch through the streaming kernels (checked inputs:
    ``TritonFP8Experts`` / ``TritonExperts`` call it through ``triton_small``): ``rows``
    FP8Rows [R, H] or float rows [R, H]; ``w13`` / ``w2`` BlockFP8Weights, or bf16 / fp16
    tensors [e, 2I, H] / [e, H, I] (float rows of their dtype; ACT is then "float" whatever
    the config says: nothing is quantised); ``config``: ``stream_config``'s form (default: by
    the slots expected, ``BF16_DEFAULTS`` for float weights). Returns [R, H] (``weighted``) or
    [R, K, H] in ``out_dtype``."""
    from rocm_moe._gate_triton import pdl_supported
    from rocm_moe.experts import _triton_small as small_k
    from rocm_moe.experts import _triton_small_fp8 as k
    from rocm_moe.experts.triton_small import expected_rows_of
    from rocm_moe.quant import FP8Rows, fp8_max, fp8_rounding

    R, K = topk_ids_RK.shape
    H, I = w13.shape[2], w2.shape[2]
    dev = rows.device
    wfp8 = not isinstance(w13, torch.Tensor)  # BlockFP8Weights, else float weights
    expect = max(1, min(R, expected_rows_of(R, num_rows, expected_rows)))
    if config is not None:
        cfg = check_config(config)
    elif wfp8:
        cfg = stream_config(expect * K, hidden=H, inter=I)
    else:
        cfg = _pick(BF16_DEFAULTS, expect * K)
    gu, dn = cfg["gate_up"], cfg["down"]
    xfp8 = isinstance(rows, FP8Rows)
    if xfp8:
        x = rows.q if rows.q.stride(1) == 1 else rows.q.contiguous()
        xs = rows.scale if rows.scale.stride(1) == 1 else rows.scale.contiguous()
    else:
        x = xs = rows if rows.stride(1) == 1 else rows.contiguous()
    bounded = num_rows is not None
    row_down = dn["FORM"] == "row"
    if weighted:
        out = torch.empty(R, H, dtype=out_dtype, device=dev)
    else:  # per-row downs write every slot of their rows; per-slot ones only local slots
        out = (torch.empty if row_down and not bounded else torch.zeros)(
            R, K, H, dtype=out_dtype, device=dev)
    if R * K == 0:
        return ExpertsOutput(out=out, weights_applied=weighted)
    ids = topk_ids_RK.contiguous().view(-1)
    wts = topk_weights_RK.contiguous().view(-1)
    emap = expert_map.map_E.to(dev)
    nr = num_rows if bounded else ids
    if wfp8:
        ws13, ws2 = w13.scale_inv.contiguous(), w2.scale_inv.contiguous()
        w13q, w2q = w13.weight.contiguous(), w2.weight.contiguous()
        quant = dict(ACT_Q=cfg["ACT"] == "fp8", FP8_MAX=fp8_max(w13.dtype),
                     **fp8_rounding(w13.dtype))
    else:  # no scales (the kernels read none: WFP8 off), nothing quantised
        w13q, w2q = w13.contiguous(), w2.contiguous()
        ws13 = ws2 = w13q
        quant = dict(ACT_Q=False, FP8_MAX=448.0, ROUND=False, MIN_EXP=-6)
    pdl = cfg.get("PDL", False) and pdl_supported(dev)
    common = dict(**quant, BOUNDED=bounded, PDL=pdl, WFP8=wfp8)
    extra = dict(launch_pdl=True) if pdl else {}
    split = gu.get("SPLIT", 1)  # split-K: gate and up partials per split, summed by the down
    inter = torch.empty(R * K, I, dtype=torch.float32, device=dev) if split == 1 else \
        torch.empty(2 * split, R * K, I, dtype=torch.float32, device=dev)
    plane = R * K * I
    steps = -(-H // (gu["BLOCK_K"] * split))  # K steps per split
    per_row = gu["FORM"] == "row"
    grid = (expect if per_row else expect * K, -(-I // gu["BLOCK_N"]), split)
    k._stream_gate_up_kernel[grid](
        x, xs, w13q, ws13, inter, ids, emap, nr, R, H, I, x.stride(0),
        xs.stride(0) if xfp8 else 0, ws13.stride(0), ws13.stride(1), I, plane, steps,
        K_TOPK=K, XFP8=xfp8, **common, PER_ROW=per_row, S=_lanes(K) if per_row else 1,
        SPLIT=split,
        BLOCK_N=gu["BLOCK_N"], BLOCK_K=gu["BLOCK_K"], PREFETCH=gu.get("PREFETCH", False),
        num_warps=gu["num_warps"], num_stages=gu["num_stages"], **extra)
    launch = dict(K_TOPK=K, **common, SPLIT=split, BLOCK_N=dn["BLOCK_N"], BLOCK_K=dn["BLOCK_K"],
                  PREFETCH=dn.get("PREFETCH", False), PRELOAD=dn.get("PRELOAD", 0),
                  num_warps=dn["num_warps"], num_stages=dn["num_stages"], **extra)
    if row_down:
        k._stream_down_kernel[(expect, -(-H // dn["BLOCK_N"]))](
            inter, w2q, ws2, out, ids, emap, wts, nr, R, H, I, I, plane,
            ws2.stride(0), ws2.stride(1), out.stride(0), 0 if weighted else out.stride(1),
            WEIGHTED=weighted, PER_ROW=True, S=_lanes(K), **launch)
        return ExpertsOutput(out=out, weights_applied=weighted)
    # per-slot rows: raw straight into out ([R * K, H], zero-filled); weighted into float32
    # slot rows that a third launch sums per row in slot order
    slots = out.view(R * K, H) if not weighted else torch.empty(R * K, H, dtype=torch.float32,
                                                                device=dev)
    k._stream_down_kernel[(expect * K, -(-H // dn["BLOCK_N"]))](
        inter, w2q, ws2, slots, ids, emap, wts, nr, R, H, I, I, plane,
        ws2.stride(0), ws2.stride(1), 0, slots.stride(0), WEIGHTED=weighted, PER_ROW=False, S=1,
        **launch)
    if weighted:
        from rocm_moe.experts.triton_small import SUM_BLOCK_H

        small_k._small_sum_kernel[(expect, -(-H // SUM_BLOCK_H))](
            slots, ids, emap, out, nr, R, H, K_TOPK=K, BOUNDED=bounded, BLOCK_H=SUM_BLOCK_H)
    return ExpertsOutput(out=out, weights_applied=weighted)
