"""Triton FP8 experts: w8a8 grouped SwiGLU GEMMs with 128x128 weight block scales and
activations quantised per 1x128 group (contract and arithmetic: ``experts/fp8.py``).

Pipeline (``TritonFP8Experts``), for R rows with K ids on a rank with e local experts:
1. rows quantised per 1x128 group (``quantize_rows_triton``), unless they arrive as FP8Rows;
2. ``build_layout(..., block_size=BLOCK_M, tables=False)``: the local slots sorted by expert,
   padded per expert to BLOCK_M (the same layout as the bf16 Triton experts);
3. gate/up GEMM, FP8 x FP8 -> float32 per 128-wide K step times both scales, SiLU(gate) * up
   fused, and the intermediate quantised to FP8 per 1x128 group in the epilogue -> [P, I];
4. down GEMM, FP8 x FP8 the same way; "weighted": the slot's routing weight in the epilogue;
5. "weighted": the slot sum of ``experts/triton.py`` -> [R, H]; "raw": [R, K, H], non-local
   slots exact zeros.

FP8 ``tl.dot`` needs FP8 matrix instructions (NVIDIA sm_89+, MI300 for e4m3fnuz, MI350 for
e4m3fn); elsewhere, and in Triton's interpreter, ``upcast`` converts the FP8 tiles to float16
first (exact; the same sums). Launch configs: ``fp8_block_config`` (a per-device table written
by ``bench/tune_experts_fp8.py``, else a heuristic tuned on an H100; AMD's own, fitting 64 KiB
of LDS); a config may name launch variants (``KERNEL_KEYS`` / ``TOP_KEYS``, issue 31).

Worked example (the test asserts it): H = I = 128, one row x = e_0, K = 1, weight 0.5,
gate = up = 4 * identity, down = identity: every group has one non-zero value, which FP8
holds exactly (its scale is value / 448), so the output is 0.5 * silu(4) * 4 = 7.8561... on
hidden dim 0 and 0 elsewhere, as in bfloat16.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from rocm_moe._checks import check_bool, error_message
from rocm_moe._libs import triton_runs_on
from rocm_moe.experts.fp8 import FP8Experts
from rocm_moe.experts.layout import build_layout
from rocm_moe.experts.triton import (
    _bucket,
    _is_amd,
    _on_amd,
    _operand,
    _sm_count,
    persistent_grid,
    persistent_supported,
    slot_sum,
    tma_supported,
    triton_availability,
    triton_experts_availability,
)
from rocm_moe.quant import BLOCK, FP8Rows, fp8_max, quantize_rows_triton  # (its former home)
from rocm_moe.quant import fp8_rounding as _rounding
from rocm_moe.weighting import ExpertsOutput

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "triton_fp8_configs.json")
CONFIG_ENV = "ROCM_MOE_FP8_CONFIGS"  # a table file read instead of CONFIG_FILE (tuning runs)


def fp8_config_table() -> dict:
    """The tuned table ``{device name: {"HxI": {bucket: config}}}`` (``bench/tune_experts_fp8.py
    --table`` writes it; buckets as ``experts.triton._bucket``): the file named by
    $ROCM_MOE_FP8_CONFIGS (which must exist), else the packaged ``triton_fp8_configs.json``,
    else empty."""
    path = os.environ.get(CONFIG_ENV)
    if path and not os.path.isfile(path):  # a typo must not fall back to the packaged table
        raise ValueError(error_message(CONFIG_ENV, repr(path), "names no file here",
                                       "point it at a table written by bench/tune_experts_fp8.py "
                                       "--table, or unset it for the packaged table"))
    return _read_table(path or CONFIG_FILE)


@functools.cache
def _read_table(path: str) -> dict:
    """The table at ``path`` ({} if there is none), every entry checked once (``check_config``;
    a bad one raises naming the file and the entry)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(error_message(path, "not JSON", str(err), "write it with "
                                           "bench/tune_experts_fp8.py --table")) from None
    nested = isinstance(table, dict) and all(
        isinstance(shapes, dict) and all(isinstance(b, dict) for b in shapes.values())
        for shapes in table.values())
    if not nested:
        raise ValueError(error_message(path, type(table).__name__, "must be a JSON object "
                                       "{device: {HxI: {bucket: config}}}",
                                       "write it with bench/tune_experts_fp8.py --table"))
    for device, shapes in table.items():
        for hxi, buckets in shapes.items():
            for bucket, cfg in buckets.items():
                try:
                    check_config(cfg)
                except ValueError as err:  # a hand-edited or foreign table
                    raise ValueError(f"{path}, entry [{device!r}][{hxi}][{bucket}]: {err}") \
                        from None
    return table


# AMD (MI300, gfx942) heuristic, by mean slots per expert: (BLOCK_M, gate/up (warps, stages),
# down (BLOCK_N, warps, stages)). The NVIDIA tiles' shared memory does not fit gfx942's 64 KiB
# of LDS once the loads are pipelined (every real launch: Triton's AMD stream pipeliner keeps
# num_stages - 1 LDS buffers of 16-byte-aligned operands; 69-164 KiB at the NVIDIA configs,
# rocm_moe/_compile.py, Triton 3.9), so: one buffer (2 stages), gate/up on 8 waves (BLOCK_N is
# the 128-wide scale group: 34-48 KiB, 2 waves per SIMD), down on 8 waves at BLOCK_M 128 (2
# waves per SIMD; on 4 waves 260 VGPRs allow one). UNTUNED on hardware: they compile and fit.
AMD_FP8_CONFIGS = ((16, (16, (8, 2), (64, 4, 2))), (128, (64, (8, 2), (128, 4, 2))),
                   (float("inf"), (128, (8, 2), (128, 8, 2))))


def fp8_block_config(num_slots: int, num_local: int, *, num_experts: int | None = None,
                     device_name: str = "", hidden: int = 0, inter: int = 0) -> dict:
    """Launch config ``{"BLOCK_M", "gate_up": {...}, "down": {...}}`` by the expected slots per
    local expert, ``num_slots / num_experts`` (uniform routing; ``num_experts``: the global
    count, default ``num_local``). The tuned table's entry for (``device_name``, H x I, bucket)
    when it has one (above its largest bucket: that bucket's, the prefill tiles), else the
    heuristic: BLOCK_K is the scale group, 128; BLOCK_N 128 for gate/up, whose epilogue
    quantises a whole group; AMD devices their own (``AMD_FP8_CONFIGS``). Heuristic tuned on
    an H100 (bench/results/tune_experts_fp8_h100.*): 64-row tiles with 8 warps and 5 stages
    for gate/up from 32 to 128 slots per expert (1024 rows: 394 -> 313 us Qwen3, 689 -> 588 us
    DeepSeek-V3 rank-local), 128-row tiles above; the other sizes gained under 2%."""
    mean = num_slots / max(num_experts or num_local, 1)
    buckets = fp8_config_table().get(device_name, {}).get(f"{hidden}x{inter}", {})
    bucket = _bucket(mean)
    if bucket not in buckets and buckets and mean > max(map(float, buckets)):
        bucket = max(buckets, key=float)
    if bucket in buckets:  # (checked when the table was read)
        return {k: dict(v) if isinstance(v, dict) else v for k, v in buckets[bucket].items()}
    if _is_amd(device_name):  # AMD_FP8_CONFIGS: fits gfx942's 64 KiB of LDS
        block_m, gu, dn = next(c for m, c in AMD_FP8_CONFIGS if mean <= m)
    elif mean <= 16:
        block_m, gu, dn = 16, (4, 3), (64, 4, 3)
    elif mean <= 128:
        block_m, gu, dn = 64, (8, 5), (128, 4, 4)
    else:
        block_m, gu, dn = 128, (8, 3), (128, 8, 4)
    return dict(BLOCK_M=block_m,
                gate_up=dict(BLOCK_N=128, BLOCK_K=BLOCK, num_warps=gu[0], num_stages=gu[1]),
                down=dict(BLOCK_N=dn[0], BLOCK_K=BLOCK, num_warps=dn[1], num_stages=dn[2]))


def _fp8_dot_native(device: torch.device, dtype: torch.dtype) -> bool:
    """The device's matrix instructions take ``dtype`` (FP8) operands."""
    if device.type != "cuda":
        return False
    if torch.version.hip is not None:
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
        return (arch.startswith("gfx94") and dtype == torch.float8_e4m3fnuz) or \
            (arch.startswith("gfx95") and dtype == torch.float8_e4m3fn)
    return torch.cuda.get_device_capability(device) >= (8, 9) and dtype == torch.float8_e4m3fn


def _args(block_m: int, kcfg: dict) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=kcfg["BLOCK_N"], BLOCK_K=kcfg["BLOCK_K"],
                num_warps=kcfg["num_warps"], num_stages=kcfg["num_stages"])


# Launch-variant keys a config may carry (issue 31; absent = today's launch): per kernel
# ("gate_up" / "down") "desc" (weights, and the down GEMM's intermediate, through tensor
# descriptors where ``tma_supported``), "ahead" (each K step's scales loaded one step ahead)
# and, gate/up only, "fused" (gate and up tiles as one 256-wide dot; pointer loads); at the
# top level "persistent" (a persistent grid at any batch and BLOCK_M) and "programs_per_sm"
# (its programs per SM, default ``PROGRAMS_PER_SM``; 1 or 2 for tiles of which only one or two
# fit an SM; needs "persistent"). Removed on 2026-12-07: "ws" (a ``warp_specialize`` K loop:
# Triton 3.6 and 3.9 fail to compile it for sm_90 in either kernel, with or without
# descriptors, PassManager::run failed) and "flatten" (``tl.range(flatten=True)`` over the
# tiles: the same sm_90 PTX as without it in both kernels, Triton 3.6 and 3.9).
KERNEL_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "desc", "ahead", "fused")
TOP_KEYS = ("BLOCK_M", "gate_up", "down", "persistent", "programs_per_sm", "gluon")


def _gluon_config(block_m: int, gate_up_stages: int, down_stages: int, *,
                  ws: bool = False, persistent: bool = False) -> dict:
    def k(stages):
        return dict(BLOCK_N=BLOCK, BLOCK_K=BLOCK, num_warps=4 if ws else block_m // 16,
                    num_stages=stages)
    cfg = dict(BLOCK_M=block_m, gluon="ws" if ws else True, gate_up=k(gate_up_stages),
               down=k(down_stages))
    return dict(cfg, persistent=True) if persistent else cfg


# "gluon": True (issue 31): the grouped GEMMs through the Gluon kernels of
# ``experts/_gluon_fp8.py`` (NVIDIA sm_90: async wgmma, the down GEMM's promotion overlapped
# with the next K step's MMA) instead of Triton's; BLOCK_M 64 (4 warps) or 128 (8 warps),
# BLOCK_N 128, num_warps BLOCK_M / 16, num_stages the cp.async ring's depth (gate/up 2 up to
# what fits 227 KiB of shared memory: 4 at BLOCK_M 128, 5 at 64; down 3 and up).
# "gluon": "ws": the warp-specialised kernels of ``experts/_gluon_fp8_ws.py`` (a TMA producer
# warp, two consumer warpgroups of 64 rows each): BLOCK_M 128, num_warps 4 (a consumer
# warpgroup), num_stages the TMA ring's depth (2 up to 4 for gate/up, 7 for down); with
# "persistent": True, one program a SM walks the tiles, its ring running on from one tile to
# the next (the next tile's loads under the last one's epilogue).
# These are the launches compiled for sm_90 in CI (``_compile``) and timed by
# bench/gluon_fp8_experts.py.
GLUON_CONFIGS = {"64": _gluon_config(64, 4, 4), "128": _gluon_config(128, 4, 4),
                 "ws": _gluon_config(128, 4, 6, ws=True),
                 "ws_persistent": _gluon_config(128, 4, 6, ws=True, persistent=True)}
GLUON_STAGE_BYTES = {"gate_up": lambda m: m * BLOCK + 2 * BLOCK * BLOCK,
                     "down": lambda m: m * BLOCK + BLOCK * BLOCK}
GLUON_SHARED = 227 * 1024  # sm_90's shared memory a block may take


def gluon_refusal(device: torch.device, dtype: torch.dtype, *, upcast: bool, precise: bool,
                  hidden: int, inter: int) -> str | None:
    """Why the Gluon FP8 kernels cannot run here (None: they can): H a multiple of 16 (the
    rows' cp.async copies move 16 bytes), I of 128, NVIDIA sm_90 with FP8 (e4m3fn) matrix
    instructions, Gluon's Hopper modules in this Triton, native FP8 dots (not ``upcast``),
    the tensor core's accumulator over a K step (not ``precise``)."""
    if hidden % 16:
        return f"need H (here {hidden}) a multiple of 16 (16-byte cp.async row copies)"
    if inter % BLOCK:
        return f"need I (here {inter}) a multiple of {BLOCK}"
    if device.type != "cuda" or torch.version.hip is not None or \
            torch.cuda.get_device_capability(device) != (9, 0):
        return "run on NVIDIA sm_90 (Hopper) only"
    if dtype != torch.float8_e4m3fn:
        return f"take float8_e4m3fn weights, not {dtype}"
    if upcast or precise:
        return "run native FP8 wgmma over each 128-wide K step (no upcast, no precise)"
    try:
        import triton.experimental.gluon.language.nvidia.hopper  # noqa: F401
    except ImportError:
        return "need Triton with Gluon's Hopper modules (3.6+)"
    return None


def check_config(cfg: dict) -> None:
    """ValueError naming the key, value, rule and fix for a launch config the FP8 kernels
    cannot run (a user's ``config=`` or a table entry)."""
    def bad(field, value, rule, fix):
        raise ValueError(error_message(field, value, rule, fix))

    if not isinstance(cfg, dict):
        bad("config", type(cfg).__name__, "must be a dict", "pass fp8_block_config(...)'s form")
    for k in cfg:
        if k not in TOP_KEYS:
            bad(f"config[{k!r}]", cfg[k], f"unknown key (known: {', '.join(TOP_KEYS)})",
                "drop it")
    if cfg.get("BLOCK_M") not in (16, 32, 64, 128, 256):
        bad("config['BLOCK_M']", cfg.get("BLOCK_M"), "must be 16, 32, 64, 128 or 256 (the "
            "layout's block of rows)", "pick one of those")
    for name in ("gate_up", "down"):
        kc = cfg.get(name)
        if not isinstance(kc, dict):
            bad(f"config[{name!r}]", kc, "must be a dict of BLOCK_N, BLOCK_K, num_warps, "
                "num_stages", "give both kernels' entries")
        for k in kc:
            if k not in KERNEL_KEYS:
                bad(f"config[{name!r}][{k!r}]", kc[k],
                    f"unknown key (known: {', '.join(KERNEL_KEYS)})", "drop it")
        for k in ("num_warps", "num_stages"):
            if not isinstance(kc.get(k), int) or kc[k] < 1:
                bad(f"config[{name!r}][{k!r}]", kc.get(k), "must be a positive int",
                    "give it (fp8_block_config's are examples)")
        if kc.get("BLOCK_K") != BLOCK:
            bad(f"config[{name!r}]['BLOCK_K']", kc.get("BLOCK_K"),
                f"must be {BLOCK}, the scale group", f"set it to {BLOCK}")
    if cfg["gate_up"].get("BLOCK_N") != BLOCK:
        bad("config['gate_up']['BLOCK_N']", cfg["gate_up"].get("BLOCK_N"),
            f"must be {BLOCK} (the epilogue quantises whole 1x{BLOCK} groups)",
            f"set it to {BLOCK}")
    if cfg["down"].get("fused"):
        bad("config['down']['fused']", True, "fuses the gate and up tiles (gate_up only)",
            "drop it from 'down'")
    if cfg["gate_up"].get("fused") and cfg["gate_up"].get("desc"):
        bad("config['gate_up']['fused']", True, "loads its one gate+up tile through pointers "
            "(the two row ranges are not one descriptor box)", "drop 'desc' or 'fused'")
    bn = cfg["down"].get("BLOCK_N")
    if bn not in (16, 32, 64, 128, 256):
        bad("config['down']['BLOCK_N']", bn, "must be 16, 32, 64, 128 (within one weight "
            "block) or 256 (two)", "pick one of those")
    if cfg.get("gluon"):
        _check_gluon(cfg, bad)
    if "programs_per_sm" in cfg and not cfg.get("persistent"):
        bad("config['programs_per_sm']", cfg["programs_per_sm"], "sets the persistent launch",
            "set config['persistent'] = True too, or drop programs_per_sm")
    pps = cfg.get("programs_per_sm", 1)
    if not isinstance(pps, int) or pps < 1:
        bad("config['programs_per_sm']", pps, "must be a positive int", "use 1, 2 or 4")


def _check_gluon(cfg: dict, bad) -> None:
    """A config with "gluon": the tiles and rings the Gluon kernels take."""
    ws = cfg["gluon"] == "ws"
    if cfg["gluon"] is not True and not ws:
        bad("config['gluon']", cfg["gluon"], "must be True, 'ws' or absent",
            "drop it, or pass True (the Gluon kernels) or 'ws' (the warp-specialised ones)")
    m = cfg["BLOCK_M"]
    if m not in ((128,) if ws else (64, 128)):
        bad("config['BLOCK_M']", m, "must be 128 with 'gluon': 'ws' (two consumer warpgroups "
            "of 64 rows)" if ws else "must be 64 or 128 with 'gluon' (one or two warpgroups of "
            "wgmma rows)", "pick 128" if ws else "pick 64 or 128")
    if cfg.get("persistent") and not ws:
        bad("config['persistent']", True, "is a Triton launch (the 'gluon': True kernels take "
            "one tile a program)", "drop 'persistent', or use 'gluon': 'ws'")
    warps = 4 if ws else m // 16
    for name, least in (("gate_up", 2), ("down", 2 if ws else 3)):
        kc = cfg[name]
        for key in ("desc", "ahead", "fused"):
            if kc.get(key):
                bad(f"config[{name!r}][{key!r}]", kc[key], "is a Triton kernel variant",
                    "drop it with 'gluon'")
        if kc.get("BLOCK_N") != BLOCK:
            bad(f"config[{name!r}]['BLOCK_N']", kc.get("BLOCK_N"),
                f"must be {BLOCK} with 'gluon' (one weight-scale block)", f"set it to {BLOCK}")
        if kc["num_warps"] != warps:
            bad(f"config[{name!r}]['num_warps']", kc["num_warps"],
                "must be 4 with 'gluon': 'ws' (a consumer warpgroup)" if ws else
                f"must be BLOCK_M / 16 = {warps} with 'gluon' (16 rows a warp)",
                f"set it to {warps}")
        most = GLUON_SHARED // GLUON_STAGE_BYTES[name](m)
        if not least <= kc["num_stages"] <= most:
            ring = "TMA" if ws else "cp.async"
            bad(f"config[{name!r}]['num_stages']", kc["num_stages"],
                f"must be {least}..{most} with 'gluon' at BLOCK_M {m} (the {ring} ring in "
                f"{GLUON_SHARED // 1024} KiB of shared memory)", f"pick {least}..{most}")


def _variant_args(kcfg: dict, desc: bool, *, gate_up: bool) -> dict:
    out = dict(DESC=desc, AHEAD=bool(kcfg.get("ahead", False)))
    return dict(out, FUSED=bool(kcfg.get("fused", False))) if gate_up else out


def _grid(n_tiles: int, persistent: bool, dev: torch.device, cfg: dict) -> tuple[int]:
    """One program per tile, or persistent: ``persistent_grid``'s programs, or the config's
    ``programs_per_sm`` per SM (GPUs; the interpreter keeps its few)."""
    pps = cfg.get("programs_per_sm")
    if not persistent or pps is None or dev.type != "cuda":
        return persistent_grid(n_tiles, persistent, dev)
    return (max(1, min(n_tiles, pps * _sm_count(dev.index or 0))),)


PERSISTENT_MAX_BLOCK_M = 64  # largest BLOCK_M launched persistent (``_forward``)


class TritonFP8Experts(FP8Experts):
    """``config``: a fixed ``fp8_block_config``-form launch config (tuning); ``upcast``: FP8
    tiles to float16 before tl.dot (None: where the device has no FP8 matrix instructions);
    ``precise``: FP8 products summed in float32 after every MMA instruction instead of in the
    tensor core's reduced-precision accumulator over a whole 128-wide K step. ``path`` /
    ``small_max_slots``: as ``TritonExperts``; the FP8 small path is the streaming kernels of
    ``triton_small_fp8`` (FP8 weights into registers, float32 sums, so ``precise`` holds
    there by construction and ``upcast`` does not apply), which "auto" takes up to
    ``triton_small_fp8.max_slots()`` slots (ROCM_MOE_FP8_SMALL_MAX_SLOTS; 64 on NVIDIA,
    measured on an H100; 0 on ROCm)."""

    name = "triton"

    @classmethod
    def availability(cls) -> str | None:
        return triton_experts_availability()

    def __init__(self, *, config: dict | None = None, upcast: bool | None = None,
                 precise: bool = False, path: str = "auto", small_max_slots: int | None = None):
        from rocm_moe.experts.triton_small import check_path
        from rocm_moe.experts.triton_small_fp8 import max_slots

        check_bool("precise", precise)
        check_bool("upcast", upcast, allow_none=True, fix="pass None (where the device has no "
                   "FP8 matrix instructions), True or False")
        check_path(path, small_max_slots)
        if config is not None:
            check_config(config)
        self.config = config
        self.upcast = upcast
        self.precise = precise
        self.path = path
        self.small_max_slots = max_slots() if small_max_slots is None else small_max_slots

    def supports(self, *, mode, dtype, device) -> str | None:
        if (reason := triton_availability()) is not None:
            return reason
        if not triton_runs_on(device):
            return "Triton kernels need a CUDA/ROCm device (or TRITON_INTERPRET=1 for tests)"
        if dtype == torch.float64:
            return "the Triton FP8 experts return bfloat16, float16 or float32, not float64"
        return None

    def quantize(self, x_RH, dtype) -> FP8Rows:
        return quantize_rows_triton(x_RH, dtype)  # bit-identical to quant.quantize_rows

    def quantizes_rows(self, R, K, num_rows, expected_rows) -> bool:
        """The small path (``triton_small``) quantises float rows in its gate/up kernel."""
        from rocm_moe.experts import triton_small as small

        return small.takes_small_path(self, R, K, num_rows, expected_rows)

    def format_unsupported(self, dtype, device) -> str | None:
        if device.type == "cuda" and torch.version.hip is None and \
                dtype == torch.float8_e4m3fnuz:
            return "NVIDIA Triton has no e4m3fnuz type (fp8e4b8 is AMD-only)"
        return None

    bounded_rows = True

    def _forward(self, rows: FP8Rows | torch.Tensor, topk_ids_RK, topk_weights_RK, w13, w2,
                 expert_map, *, mode, out_dtype, num_rows=None, expected_rows=None):
        """``rows``: FP8Rows, or float rows where ``quantizes_rows`` (the small path)."""
        from rocm_moe.experts._triton_fp8 import _fp8_down_kernel, _fp8_gate_up_kernel

        R, K = topk_ids_RK.shape
        H, I = w13.shape[2], w2.shape[2]
        N, dev = R * K, rows.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
        # a capacity-sized batch: tiles for the rows expected, not the capacity
        slots = N if num_rows is None or expected_rows is None else expected_rows * K
        cfg = self.config or fp8_block_config(slots, expert_map.num_local,
                                              num_experts=expert_map.num_experts,
                                              device_name=name, hidden=H, inter=I)
        upcast = (not _fp8_dot_native(dev, w13.dtype)) if self.upcast is None else self.upcast
        from rocm_moe.experts import triton_small as small

        if small.takes_small_path(self, R, K, num_rows, expected_rows):
            return small.small_fp8_experts(
                rows, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                weighted=mode == "weighted", out_dtype=out_dtype, upcast=upcast,
                precise=self.precise, num_rows=num_rows, expected_rows=expected_rows)
        layout = build_layout(topk_ids_RK, expert_map, block_size=cfg["BLOCK_M"], tables=False,
                              validate=False)
        P = layout.sorted_slot_ids.numel()
        # rows may be strided views into a receive buffer: read in place (unit column stride)
        aq = rows.q if rows.q.stride(1) == 1 else rows.q.contiguous()
        as_ = rows.scale if rows.scale.stride(1) == 1 else rows.scale.contiguous()
        w13, w2 = w13.contiguous(), w2.contiguous()
        iq = torch.empty(P, I, dtype=rows.dtype, device=dev)
        is_ = torch.empty(P, I // BLOCK, dtype=torch.float32, device=dev)
        weighted = mode == "weighted"
        out_slots = (torch.empty if weighted else torch.zeros)(N, H, dtype=out_dtype, device=dev)
        n_blocks = layout.block_expert_ids.numel()
        # Persistent launches where a capacity-sized batch picks decode-to-mid tiles; the
        # BLOCK_M = 128 (prefill) gate/up spills 3 VGPRs in the loop on gfx942 (Triton 3.9),
        # and a batch that picks it fills most of its capacity anyway.
        persistent = num_rows is not None and cfg["BLOCK_M"] <= PERSISTENT_MAX_BLOCK_M \
            and persistent_supported(amd=_on_amd(dev))
        persistent = persistent or (bool(cfg.get("persistent", False))
                                    and persistent_supported(amd=_on_amd(dev)))
        if N and P and cfg.get("gluon"):
            why = gluon_refusal(dev, w13.dtype, upcast=upcast, precise=self.precise, hidden=H,
                                inter=I)
            if why:
                raise ValueError(error_message(
                    "config['gluon']", True, f"the Gluon FP8 kernels {why}",
                    "drop 'gluon' from the config (the Triton kernels run everywhere)"))
            if aq.stride(0) % 16 or aq.data_ptr() % 16:  # (rows in place in a receive
                aq = aq.clone(memory_format=torch.contiguous_format)  # buffer: 16-byte rows)
            _gluon_gemms(aq, as_, w13, w2, iq, is_, out_slots, layout, topk_weights_RK, cfg,
                         weighted=weighted)
        elif N and P:
            gu, dn = cfg["gate_up"], cfg["down"]
            assert gu["BLOCK_N"] == BLOCK, cfg  # the epilogue quantises whole groups
            assert BLOCK % dn["BLOCK_N"] == 0 or dn["BLOCK_N"] == 2 * BLOCK, cfg
            ws13, ws2 = w13.scale_inv, w2.scale_inv
            tma = tma_supported(dev)
            w13_op, d13 = _operand(w13.weight.view(-1, H), [gu["BLOCK_N"], BLOCK],
                                   tma and bool(gu.get("desc")))
            grid = _grid(n_blocks * (I // gu["BLOCK_N"]), persistent, dev, cfg)
            _fp8_gate_up_kernel[grid](
                aq, as_, w13_op, ws13, iq, is_, layout.sorted_slot_ids,
                layout.block_expert_ids, layout.num_padded, layout.sentinel, H, I, layout.top_k,
                -(-H // BLOCK),
                aq.stride(0), as_.stride(0), H, ws13.stride(0), ws13.stride(1), iq.stride(0),
                is_.stride(0), UPCAST=upcast, PRECISE=self.precise, PERSISTENT=persistent,
                FP8_MAX=fp8_max(rows.dtype),
                **_rounding(rows.dtype), **_variant_args(gu, d13, gate_up=True),
                **_args(cfg["BLOCK_M"], gu))
            want = tma and bool(dn.get("desc"))
            iq_op, d_iq = _operand(iq, [cfg["BLOCK_M"], BLOCK], want)
            w2_op, d2 = _operand(w2.weight.view(-1, I), [dn["BLOCK_N"], BLOCK], want)
            if d_iq != d2:  # (one DESC flag for both operands)
                iq_op, w2_op, d2 = iq, w2.weight.view(-1, I), False
            grid = _grid(n_blocks * -(-H // dn["BLOCK_N"]), persistent, dev, cfg)
            _fp8_down_kernel[grid](
                iq_op, is_, w2_op, ws2, out_slots, layout.sorted_slot_ids,
                layout.block_expert_ids, topk_weights_RK.contiguous().view(-1),
                layout.num_padded, layout.sentinel,
                H, I, I // BLOCK, iq.stride(0), is_.stride(0), I, ws2.stride(0), ws2.stride(1),
                out_slots.stride(0), PERSISTENT=persistent, WEIGHTED=weighted, UPCAST=upcast,
                PRECISE=self.precise, **_variant_args(dn, d2, gate_up=False),
                **_args(cfg["BLOCK_M"], dn))
        if weighted:
            out = torch.empty(R, H, dtype=out_dtype, device=dev)
            slot_sum(out_slots, layout.local_ids, out, num_rows)
            return ExpertsOutput(out=out, weights_applied=True)
        return ExpertsOutput(out=out_slots.view(R, K, H), weights_applied=False)


def _gluon_gemms(aq, as_, w13, w2, iq, is_, out_slots, layout, topk_weights_RK, cfg: dict, *,
                 weighted: bool) -> None:
    """Both grouped GEMMs through the Gluon kernels (``cfg`` checked, ``gluon_refusal`` None):
    the same layout, buffers and contract as the Triton kernels' launch in ``_forward``."""
    if cfg["gluon"] == "ws":
        return _ws_gemms(aq, as_, w13, w2, iq, is_, out_slots, layout, topk_weights_RK, cfg,
                         weighted=weighted)
    from rocm_moe.experts._gluon_fp8 import _gluon_fp8_down_kernel, _gluon_fp8_gate_up_kernel

    H, I = w13.shape[2], w2.shape[2]
    n_blocks = layout.block_expert_ids.numel()
    m, warps = cfg["BLOCK_M"], cfg["BLOCK_M"] // 16
    ws13, ws2 = w13.scale_inv, w2.scale_inv
    _gluon_fp8_gate_up_kernel[(n_blocks * (I // BLOCK),)](
        aq, as_, w13.weight, ws13, iq, is_, layout.sorted_slot_ids, layout.block_expert_ids,
        layout.sentinel, H, I, layout.top_k, -(-H // BLOCK), aq.stride(0), as_.stride(0),
        ws13.stride(0), ws13.stride(1), iq.stride(0), is_.stride(0),
        FP8_MAX=fp8_max(aq.dtype), BLOCK_M=m, STAGES=cfg["gate_up"]["num_stages"],
        num_warps=warps)
    _gluon_fp8_down_kernel[(n_blocks * -(-H // BLOCK),)](
        iq, is_, w2.weight, ws2, out_slots, layout.sorted_slot_ids, layout.block_expert_ids,
        topk_weights_RK.contiguous().view(-1), layout.sentinel, H, I, I // BLOCK,
        iq.stride(0), is_.stride(0), ws2.stride(0), ws2.stride(1), out_slots.stride(0),
        WEIGHTED=weighted, BLOCK_M=m, STAGES=cfg["down"]["num_stages"], num_warps=warps)


def _ws_gemms(aq, as_, w13, w2, iq, is_, out_slots, layout, topk_weights_RK, cfg: dict, *,
              weighted: bool) -> None:
    """``_gluon_gemms`` through the warp-specialised kernels: TMA cannot gather rows, so the
    gate/up rows (and their scales, 0 on padding positions) are first put in block order, [P,
    H] FP8 and [P, H/128] float32, one index_select each."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from rocm_moe.experts import _gluon_fp8_ws as k

    H, I = w13.shape[2], w2.shape[2]
    n_blocks = layout.block_expert_ids.numel()
    sorted_ids = layout.sorted_slot_ids
    used = sorted_ids < layout.sentinel
    src = torch.where(used, sorted_ids // layout.top_k, 0)
    a_p = aq.view(torch.uint8).index_select(0, src).view(aq.dtype)
    as_p = as_.index_select(0, src) * used.unsqueeze(1)
    half, tile = k.HALF_ROWS.value, k.TILE.value

    def desc(t, rows):
        return TensorDescriptor.from_tensor(
            t, [rows, tile], gl.NVMMASharedLayout.get_default_for([rows, tile], gl.float8e4nv))

    def grid(n_tiles):  # one program a tile of the most blocks, or (persistent) one a SM
        # walking the used blocks' tiles (the kernels read num_padded: unused blocks cost none)
        sms = _sm_count(aq.device.index or 0) if cfg.get("persistent") else n_tiles
        return (max(1, min(n_tiles, sms)),)

    ws13, ws2 = w13.scale_inv, w2.scale_inv
    n_gu, n_dn = n_blocks * (I // tile), n_blocks * -(-H // tile)
    k._ws_fp8_gate_up_kernel[grid(n_gu)](
        desc(a_p, half), desc(w13.weight.view(-1, H), tile), as_p, ws13, iq, is_,
        layout.block_expert_ids, layout.num_padded, I, -(-H // tile), as_p.stride(0),
        ws13.stride(0), ws13.stride(1), iq.stride(0), is_.stride(0), FP8_MAX=fp8_max(aq.dtype),
        STAGES=cfg["gate_up"]["num_stages"], num_warps=4)
    k._ws_fp8_down_kernel[grid(n_dn)](
        desc(iq, half), desc(w2.weight.view(-1, I), tile), is_, ws2, out_slots, sorted_ids,
        layout.block_expert_ids, topk_weights_RK.contiguous().view(-1), layout.num_padded,
        layout.sentinel, H, I // tile, is_.stride(0), ws2.stride(0), ws2.stride(1),
        out_slots.stride(0), WEIGHTED=weighted, STAGES=cfg["down"]["num_stages"], num_warps=4)
