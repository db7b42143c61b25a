"""Triton experts: grouped SwiGLU GEMMs over the local slots only.

Nothing in the kernels is NVIDIA-only, but they have only been run with CUDA Triton (H100).

Pipeline (``TritonExperts``), for R rows with K global ids on a rank with e local experts:
1. ``build_layout(ids, expert_map, block_size=BLOCK_M, tables=False)``: the local slots sorted
   by expert and padded per expert to BLOCK_M; one local expert per block (the layout module is
   the single source of truth for offsets and padding; on GPUs its Triton kernels build it;
   non-local slots are never sorted or computed);
2. gate/up GEMM with SiLU(gate) * up fused: [P, I] intermediate in the input dtype;
   expert variants (``ExpertVariant``) there too: the gate/up bias and gpt-oss's clamped
   SwiGLU in the epilogue, the routing weight on the input rows as they load (Llama 4);
3. down GEMM; its bias, then in "weighted" mode the slot's routing weight (unless it went on
   the input) in the epilogue; results go to per-slot rows [R * K, H];
4. "weighted": sum over each row's local slots in float32 (one kernel; its K slot loads are
   in flight together and never read the non-local rows, so they need no zero fill), cast to
   the input dtype -> [R, H];
   "raw": the per-slot rows as [R, K, H] (zero-filled, so non-local slots are exact zeros).

Launch configs come from ``triton_configs.json`` (per device name, H x I and bucket of mean
slots per local expert; written by ``bench/tune_experts.py`` on the device) with a heuristic
fallback. bf16 and fp16 only: a float32 tl.dot would run through TF32.

Worked example (the test asserts it): one row, K = 1, id 0, weight 0.5, identity-like weights
(gate = up = I * 4 on the first I hidden dims, down = identity) gives, for x = [1, 0, ...],
0.5 * silu(4) * 4 on hidden dim 0.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch

from rocm_moe._checks import check_bool, error_message
from rocm_moe._libs import triton_missing, triton_runs_on
from rocm_moe.experts.base import PLAIN, Experts, ExpertVariant
from rocm_moe.experts.layout import build_layout
from rocm_moe.weighting import ExpertsOutput

TRITON_DTYPES = (torch.bfloat16, torch.float16)


CONFIG_FILE = os.path.join(os.path.dirname(__file__), "triton_configs.json")
_DEFAULT_KERNEL = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
# AMD (MI300, gfx942, wave64) fallback by BLOCK_M, chosen from the gfx942 code objects that
# rocm_moe/_compile.py builds (Triton 3.9; notes/experts-mi300.md), UNTUNED ON HARDWARE: LDS is
# not the limit there (8-16 KiB per program, any stage count), registers are. 2 stages (the
# depth AMD's stream pipeliner is built for; 1-3 compile to the same code here); 64 x 64 tiles
# keep 7 / 3 / 4 waves per SIMD (gate/up) and 8 / 4 / 6 (down) without spills; at BLOCK_M 64,
# 128-column tiles over 8 waves keep the same waves per SIMD with half the programs re-reading
# each block's gathered rows.
_AMD_KERNEL = {m: dict(BLOCK_N=128 if m == 64 else 64, BLOCK_K=64, num_warps=8 if m == 64 else 4,
                       num_stages=2) for m in (16, 32, 64)}


def _is_amd(device_name: str) -> bool:
    return device_name.startswith(("AMD", "gfx")) or "Instinct" in device_name


def _bucket(mean_slots: float) -> str:
    """The table's key: slots per local expert, rounded up to a power of two, fractions kept
    apart (one token with K = 8 over 128 experts is "0.0625", four tokens "0.25")."""
    if mean_slots <= 0:
        return "0"
    b = 2.0 ** math.ceil(math.log2(mean_slots))
    return str(int(b)) if b >= 1 else str(b)


@functools.cache
def _table() -> dict:
    if not os.path.exists(CONFIG_FILE):
        return {}
    with open(CONFIG_FILE) as f:
        table = json.load(f)
    for device, shapes in table.items():
        for hxi, buckets in shapes.items():
            for bucket, cfg in buckets.items():
                try:
                    check_block_config(cfg)
                except ValueError as err:  # a hand-edited table
                    raise ValueError(f"{CONFIG_FILE}, entry [{device!r}][{hxi}][{bucket}]: "
                                     f"{err}") from None
    return table


def block_config(num_slots: int, num_local: int, *, hidden: int = 0, inter: int = 0,
                 device_name: str = "") -> dict:
    """Launch config ``{"BLOCK_M": m, "gate_up": {...}, "down": {...}}`` (each kernel's
    BLOCK_N, BLOCK_K, num_warps, num_stages; BLOCK_M is the layout's block, shared): from the
    tuned table (device, H x I, mean slots per local expert bucket) when it has the entry
    (``bench/tune_experts.py`` writes it), else a heuristic: BLOCK_M by the mean slots per
    local expert, fixed tiles (AMD devices: their own, ``_AMD_KERNEL``)."""
    mean = num_slots / max(num_local, 1)
    entry = _table().get(device_name, {}).get(f"{hidden}x{inter}", {}).get(_bucket(mean))
    if entry:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in entry.items()}
    block_m = 16 if mean <= 16 else 32 if mean <= 64 else 64
    kernel = _AMD_KERNEL[block_m] if _is_amd(device_name) else _DEFAULT_KERNEL
    return dict(BLOCK_M=block_m, gate_up=dict(kernel), down=dict(kernel))


def invariant_config(*, hidden: int, inter: int, device_name: str = "") -> dict:
    """The one launch config of ``TritonExperts(invariant=True)``, whatever the batch: the
    tuned table's entry for its largest bucket of (device, H x I) (the big-batch tiles), else
    the heuristic's BLOCK_M = 64 config. It depends on the device and the shapes only, so every
    slot goes through the same tiles (BLOCK_K fixed, no split-K) in every batch."""
    buckets = _table().get(device_name, {}).get(f"{hidden}x{inter}", {})
    if buckets:
        entry = buckets[max(buckets, key=float)]
        return {k: dict(v) if isinstance(v, dict) else v for k, v in entry.items()}
    kernel = _AMD_KERNEL[64] if _is_amd(device_name) else _DEFAULT_KERNEL
    return dict(BLOCK_M=64, gate_up=dict(kernel), down=dict(kernel))


KERNEL_KEYS = {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}


def check_block_config(cfg: object) -> dict:
    """``cfg`` (a ``config=`` of TritonExperts, or a table entry) as the grouped kernels take
    it: ``{"BLOCK_M": m, "gate_up": {...}, "down": {...}}``, each kernel's BLOCK_N and BLOCK_K
    powers of two >= 16 (BLOCK_M too: one tl.dot tile of rows), num_warps 1-16 (a power of
    two) and num_stages 1-8 (both optional); a missing, unknown or bad key is a ValueError
    naming it."""
    def bad(field, value, rule):
        raise ValueError(error_message(f"config{field}", repr(value), rule, "pass a config of "
                                       "the form block_config(...) returns"))

    def pow2(field, value, lo, hi):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi \
                or value & (value - 1):
            bad(field, value, f"must be a power of two in [{lo}, {hi}]")

    if not isinstance(cfg, dict):
        bad("", cfg, "must be a dict")
    extra = sorted(set(cfg) - {"BLOCK_M", "gate_up", "down"})
    if extra:
        bad(f"[{extra[0]!r}]", cfg[extra[0]], "is not a key (keys: BLOCK_M, gate_up, down)")
    pow2("['BLOCK_M']", cfg.get("BLOCK_M"), 16, 256)
    for stage in ("gate_up", "down"):
        k = cfg.get(stage)
        if not isinstance(k, dict):
            bad(f"[{stage!r}]", k, "must be a dict of BLOCK_N, BLOCK_K, num_warps, num_stages")
        extra = sorted(set(k) - KERNEL_KEYS)
        if extra:
            bad(f"[{stage!r}][{extra[0]!r}]", k[extra[0]],
                f"is not a key (keys: {sorted(KERNEL_KEYS)})")
        pow2(f"[{stage!r}]['BLOCK_N']", k.get("BLOCK_N"), 16, 512)
        pow2(f"[{stage!r}]['BLOCK_K']", k.get("BLOCK_K"), 16, 512)
        pow2(f"[{stage!r}]['num_warps']", k.get("num_warps", 4), 1, 16)
        stages = k.get("num_stages", 3)
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
            bad(f"[{stage!r}]['num_stages']", stages, "must be an int in [1, 8]")
    return cfg


def _launch_args(block_m: int, kcfg: dict) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=kcfg["BLOCK_N"], BLOCK_K=kcfg["BLOCK_K"],
                num_warps=kcfg.get("num_warps", 4), num_stages=kcfg.get("num_stages", 3))


triton_availability = triton_missing  # why the Triton experts cannot run here, or None


@functools.cache
def _has_tensor_descriptors() -> bool:
    try:  # host-side descriptors came with Triton 3.3-3.4; rocm_moe[triton] allows 3.2
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def tma_supported(device: torch.device) -> bool:
    """Tensor descriptors pay off where loads become TMA copies: CUDA GPUs of compute
    capability 9 (Hopper) and later; the interpreter runs them too (so CPU tests cover both
    forms). Elsewhere (ROCm, older GPUs, a Triton without host-side descriptors) the kernels
    load through pointers."""
    if not _has_tensor_descriptors():
        return False
    if device.type == "cuda":
        return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
    return triton_runs_on(device)  # elsewhere only under the interpreter


def _operand(t: torch.Tensor, block: list[int], tma: bool):
    """``t`` (2-D, rows contiguous) as a tensor descriptor of ``block`` tiles when ``tma`` and
    TMA's rules allow it (16-byte aligned base and row stride), else as itself (pointer)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    ok = tma and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
    return (TensorDescriptor.from_tensor(t, block), True) if ok else (t, False)


def persistent_programs(device: torch.device) -> int:
    """Programs of a PERSISTENT launch (``num_rows`` given): enough to keep every SM busy
    (PROGRAMS_PER_SM each), whatever the capacity; under the interpreter a few, so the CPU tests
    take several turns of the loop."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index or 0)
    return 3


PROGRAMS_PER_SM = 4
# Triton releases before this one compile the persistent gate/up loop for gfx942 with too many
# VGPRs (3.6.0: 280 at BLOCK_M 32, one wave per SIMD, against 244 and two waves for the
# one-tile launch; 3.9.0: two waves): there the experts keep the one-tile launches.
PERSISTENT_MIN_TRITON_ON_GFX = (3, 8)


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton; ``3.6.0+git1234`` -> (3, 6)."""
    import re

    import triton

    major, minor = re.findall(r"\d+", triton.__version__)[:2]
    return int(major), int(minor)


def persistent_supported(*, amd: bool) -> bool:
    """Whether the experts launch persistent grids for capacity-sized batches (``num_rows``):
    everywhere but AMD GPUs with a Triton older than PERSISTENT_MIN_TRITON_ON_GFX."""
    return not amd or triton_version() >= PERSISTENT_MIN_TRITON_ON_GFX


def _on_amd(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is not None


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_grid(n_tiles: int, persistent: bool, device: torch.device) -> tuple[int]:
    return (max(1, min(n_tiles, persistent_programs(device))) if persistent else n_tiles,)


def _variant_args(variant: ExpertVariant) -> dict:
    """The gate/up kernel's variant constexprs (see ``_triton_kernels._activate``)."""
    oai = variant.activation == "swiglu_oai"
    return dict(BIAS=variant.bias, ON_INPUT=variant.weights_on_input, OAI=oai,
                ALPHA=float(variant.alpha), CLAMP=oai and variant.limit is not None,
                LIMIT=float(variant.limit or 0.0))


def launch_gate_up(x, w13, inter, layout, kcfg: dict, *, tma: bool = False,
                   persistent: bool = False, variant: ExpertVariant = PLAIN,
                   w13_bias: torch.Tensor | None = None,
                   weights_N: torch.Tensor | None = None) -> None:
    """inter[P, I] = act(x[rows] @ gate.T, x[rows] @ up.T) over the layout's blocks (act:
    ``variant``'s, with ``w13_bias`` [e, 2I] for a variant with bias and the slots' routing
    weights ``weights_N`` [R * K] on the input for ``weights_on_input``); ``tma``: weights
    through a tensor descriptor (where ``_operand`` allows); ``persistent``: a fixed grid that
    strides over the blocks in use (``layout.num_padded``, on the device)."""
    from rocm_moe.experts._triton_kernels import _gate_up_kernel

    assert not variant.bias or w13_bias is not None, "a variant with bias needs w13_bias"
    assert not variant.weights_on_input or weights_N is not None, "weights on input need them"
    H, I, B = x.shape[1], inter.shape[1], layout.block_size
    n_blocks = layout.block_expert_ids.numel()
    w, desc = _operand(w13.view(-1, H), [kcfg["BLOCK_N"], kcfg["BLOCK_K"]], tma)
    grid = persistent_grid(n_blocks * -(-I // kcfg["BLOCK_N"]), persistent, x.device)
    _gate_up_kernel[grid](
        x, w, inter, layout.sorted_slot_ids, layout.block_expert_ids, layout.num_padded,
        x if w13_bias is None else w13_bias.contiguous(), x if weights_N is None else weights_N,
        layout.sentinel, H, I, layout.top_k, x.stride(0), w13.stride(1), inter.stride(0),
        EVEN_K=H % kcfg["BLOCK_K"] == 0, DESC=desc, PERSISTENT=persistent,
        **_variant_args(variant), **_launch_args(B, kcfg))


def launch_down(inter, w2, out_slots, layout, weights_N, kcfg: dict, *, weighted: bool,
                tma: bool = False, persistent: bool = False,
                w2_bias: torch.Tensor | None = None) -> None:
    """out_slots[slot] = inter[p] @ down.T (plus ``w2_bias`` [e, H] when given; times the
    slot's weight when ``weighted``); ``tma``: intermediate rows and weights through tensor
    descriptors (where allowed); ``persistent``: as ``launch_gate_up``."""
    from rocm_moe.experts._triton_kernels import _down_kernel

    H, I, B = w2.shape[1], inter.shape[1], layout.block_size
    n_blocks = layout.block_expert_ids.numel()
    a, desc_a = _operand(inter, [B, kcfg["BLOCK_K"]], tma)
    w, desc_w = _operand(w2.view(-1, I), [kcfg["BLOCK_N"], kcfg["BLOCK_K"]], desc_a)
    if desc_a and not desc_w:  # both or neither: one constexpr switches the kernel's loads
        a, desc_a = inter, False
    grid = persistent_grid(n_blocks * -(-H // kcfg["BLOCK_N"]), persistent, inter.device)
    _down_kernel[grid](
        a, w, out_slots, layout.sorted_slot_ids, layout.block_expert_ids, weights_N,
        layout.num_padded, out_slots if w2_bias is None else w2_bias.contiguous(),
        layout.sentinel, H, I, inter.stride(0), w2.stride(1),
        out_slots.stride(0), WEIGHTED=weighted, EVEN_K=I % kcfg["BLOCK_K"] == 0, DESC=desc_a,
        PERSISTENT=persistent, BIAS=w2_bias is not None, **_launch_args(B, kcfg))


def slot_sum(out_slots: torch.Tensor, local_ids: torch.Tensor, out: torch.Tensor,
             num_rows: torch.Tensor | None) -> None:
    """out[r] = sum of row r's local slots of out_slots [R * K, H] (float32, slot order), for
    every row, or for the first ``num_rows[0]`` (a [1] int32 device tensor; then a fixed grid
    strides over them and the rest of ``out`` is left unwritten)."""
    from rocm_moe.experts._triton_kernels import _slot_sum_kernel

    R, H = out.shape
    K = local_ids.shape[1]
    bounded = num_rows is not None
    rows = min(R, persistent_programs(out.device)) if bounded else R
    if R:
        _slot_sum_kernel[(max(rows, 1), -(-H // 1024))](
            out_slots, local_ids, out, num_rows if bounded else local_ids, R, H, K_TOPK=K,
            BOUNDED=bounded, BLOCK_H=1024)


def triton_experts_availability() -> str | None:
    """None where Triton expert kernels run here (bf16 and FP8 alike), else why not."""
    if (reason := triton_availability()) is not None:
        return reason
    if not triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        return "no CUDA/ROCm device (TRITON_INTERPRET=1 runs the kernels on a CPU, slowly)"
    return None


class TritonExperts(Experts):
    """``config``: a fixed launch config (``block_config``'s form) instead of the table's, for
    tuning. ``tma``: load weights (and the down GEMM's intermediate) through tensor
    descriptors; None (default) where ``tma_supported`` says they pay off. ``path``: "auto"
    (default: small batches take ``triton_small``'s layout-free path, up to ``small_max_slots``
    slots, default ``triton_small.SMALL_MAX_SLOTS``), "small" or "grouped" to force either."""

    name = "triton"
    bounded_rows = True

    @classmethod
    def availability(cls) -> str | None:
        return triton_experts_availability()

    def __init__(self, *, config: dict | None = None, tma: bool | None = None,
                 invariant: bool = False, path: str = "auto", small_max_slots: int | None = None):
        from rocm_moe.experts.triton_small import check_path

        check_bool("invariant", invariant)
        check_bool("tma", tma, allow_none=True, fix="pass None (TMA where the GPU has it), "
                   "True or False")
        check_path(path, small_max_slots, invariant=invariant)
        if config is not None:
            check_block_config(config)
        self.config = config
        self.tma = tma
        self.invariant = invariant  # one launch config for every batch (``invariant_config``)
        self.path, self.small_max_slots = path, small_max_slots

    def invariant_unsupported_reason(self) -> str | None:
        return None

    def as_invariant(self) -> TritonExperts:
        return TritonExperts(config=self.config, tma=self.tma, invariant=True,
                             path="grouped" if self.path == "small" else self.path)

    def supports(self, *, mode, dtype, device) -> str | None:
        if (reason := triton_availability()) is not None:
            return reason
        if not triton_runs_on(device):
            return "Triton kernels need a CUDA/ROCm device (or TRITON_INTERPRET=1 for tests)"
        if dtype not in TRITON_DTYPES:
            return f"the Triton experts compute in {TRITON_DTYPES}, not {dtype}"
        if dtype == torch.bfloat16 and torch.device(device).type != "cuda":
            return ("Triton's interpreter miscomputes bfloat16 tl.dot (Triton 3.9: errors of "
                    "1e10); interpreted runs take float16")
        return None

    def variant_unsupported_reason(self, variant: ExpertVariant) -> str | None:
        return None  # biases, swiglu_oai and weights on the input run in the kernels

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode,
                 num_rows=None, expected_rows=None, variant: ExpertVariant = PLAIN,
                 w13_bias=None, w2_bias=None):
        R, K = topk_ids_RK.shape
        from rocm_moe.experts import triton_small as small

        if small.takes_small_path(self, R, K, num_rows, expected_rows, variant):
            return small.small_experts(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                                       weighted=mode == "weighted", num_rows=num_rows,
                                       expected_rows=expected_rows, tma=self.tma)
        H, I = x_RH.shape[1], w2.shape[2]
        N = R * K
        dev_name = torch.cuda.get_device_name(x_RH.device) if x_RH.is_cuda else ""
        if self.config:
            cfg = self.config
        elif self.invariant:
            cfg = invariant_config(hidden=H, inter=I, device_name=dev_name)
        else:  # a capacity-sized batch: tiles for the rows expected, not the capacity
            rows = R if num_rows is None or expected_rows is None else expected_rows
            cfg = block_config(rows * K, expert_map.num_local, hidden=H, inter=I,
                               device_name=dev_name)
        layout = build_layout(topk_ids_RK, expert_map, block_size=cfg["BLOCK_M"], tables=False,
                              validate=False)
        P = layout.sorted_slot_ids.numel()
        x = x_RH if x_RH.stride(1) == 1 else x_RH.contiguous()
        w13, w2 = w13.contiguous(), w2.contiguous()
        inter = torch.empty(P, I, dtype=x.dtype, device=x.device)
        weighted = mode == "weighted"
        # Raw outputs need exact zeros in non-local slots; the weighted sum never reads them.
        out_slots = (torch.empty if weighted else torch.zeros)(N, H, dtype=x.dtype,
                                                               device=x.device)
        persistent = num_rows is not None and persistent_supported(amd=_on_amd(x.device))
        if N and P:
            tma = tma_supported(x.device) if self.tma is None else self.tma
            weights_N = topk_weights_RK.contiguous().view(-1)
            launch_gate_up(x, w13, inter, layout, cfg["gate_up"], tma=tma, persistent=persistent,
                           variant=variant, w13_bias=w13_bias, weights_N=weights_N)
            # weights on the input were applied there: the slots are only summed
            launch_down(inter, w2, out_slots, layout, weights_N, cfg["down"],
                        weighted=weighted and not variant.weights_on_input, tma=tma,
                        persistent=persistent, w2_bias=w2_bias)
        if weighted:
            out = torch.empty(R, H, dtype=x.dtype, device=x.device)
            slot_sum(out_slots, layout.local_ids, out, num_rows)
            return ExpertsOutput(out=out, weights_applied=True)
        return ExpertsOutput(out=out_slots.view(R, K, H), weights_applied=False,
                             weighted_inputs=variant.weights_on_input)
