"""Ahead-of-time compile of the package's Triton kernels for a GPU that is not here.

The PyPI triton wheel carries the AMD and NVIDIA backends with their own LLVM, so on a CPU
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("hip", "gfx942", 64))``
builds the MI300 code object and ``GPUTarget("cuda", 90, 32)`` the H100 one. This module lists
every kernel with the launch configurations it would really get on a target (the tuned table
of the target's device, else the heuristic of ``experts.triton.block_config``), compiles each
distinct one once, and reports shared memory (LDS), registers, spills and, on gfx942, the
waves per SIMD they allow. ``tests/test_compile_targets.py`` asserts they compile and fit.

Adding a kernel is one line of ``KERNELS``: its import path, the types of its pointer
arguments (other runtime arguments are i32) and its launch configurations.

Worked example (the test asserts it): ``occupancy(vgprs=108, lds=24576, num_warps=4)`` on
gfx942 is 2 waves per SIMD: 512 // 112 = 4 by registers, 65536 // 24576 = 2 workgroups of
4 waves over 4 SIMDs by LDS.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from rocm_moe.comm import symm

TARGETS = {  # name -> (backend, arch, warp size, device name of the tuned table, shared bytes,
    #                  whether the experts load through tensor descriptors there)
    "gfx942": ("hip", "gfx942", 64, "AMD Instinct MI300X", 64 * 1024, False),
    "sm_90": ("cuda", 90, 32, "NVIDIA H100 80GB HBM3", 227 * 1024, True),
}
# (H, I, K, E local) of the models the package serves, for the heuristic configs:
# Qwen3-30B-A3B and DeepSeek-V3 on EP8, Mixtral-8x7B on EP2.
MODEL_SHAPES = ((2048, 768, 8, 16), (7168, 2048, 8, 32), (4096, 14336, 2, 4))
# Mean slots per local expert: decode, mid and prefill (one per heuristic BLOCK_M branch).
MEAN_SLOTS = (1.0, 32.0, 256.0)


@dataclass(frozen=True)
class Launch:
    """One compile: constexprs plus num_warps / num_stages; ``origin`` says who chose it."""

    constexprs: tuple[tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 1
    origin: str = "grid"


@dataclass(frozen=True)
class Kernel:
    path: str  # "module:function"
    pointers: dict  # pointer argument -> "*bf16", "*i32", ... or f(constexprs) -> type
    launches: Callable[[str], list[Launch]]  # target name -> its launch configurations
    scalars: dict[str, str] = field(default_factory=dict)  # non-i32 scalar arguments
    # Integer arguments that the served shapes pass as multiples of 16 (strides, H, I): with
    # them and every pointer specialised as Triton's launcher does (16-byte aligned torch
    # allocations, ints divisible by 16), its pipeliners multi-buffer the loads (cp.async /
    # TMA on NVIDIA, the stream pipeliner's LDS buffers on AMD) and shared memory is counted
    # as launched. Without it the FP8 experts compiled at 16-48 KiB of LDS on gfx942 where
    # their launches need 69-164 KiB. Empty: no specialisation (counts can be low).
    aligned: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.split(":")[1]


# gpt-oss-20b on one rank (E = 32, H = I = 2880, K = 4) with its expert variant (biases,
# clamped SwiGLU): the Triton experts' variant constexprs compile there.
GPT_OSS_SHAPE = (2880, 2880, 4, 32)


def _variant_constexprs(gpt_oss: bool) -> tuple[tuple[str, object], ...]:
    """The gate/up kernel's variant constexprs: plain SwiGLU, or gpt-oss's."""
    from rocm_moe.experts.base import PLAIN, ExpertVariant
    from rocm_moe.experts.triton import _variant_args

    return tuple(_variant_args(ExpertVariant.gpt_oss() if gpt_oss else PLAIN).items())


def _expert_configs(target: str) -> list[tuple[dict, int, int, str, bool]]:
    """(block_config, H, I, origin, gpt_oss) the experts would use on ``target``: every tuned
    entry of its device, plus the heuristic fallback at MODEL_SHAPES x MEAN_SLOTS (plain
    SwiGLU) and GPT_OSS_SHAPE x MEAN_SLOTS (gpt-oss's variant)."""
    from rocm_moe.experts.triton import _table, block_config

    device = TARGETS[target][3]
    out = []
    for hxi, buckets in _table().get(device, {}).items():
        H, I = map(int, hxi.split("x"))
        out += [(cfg, H, I, f"table {hxi} bucket {b}", False) for b, cfg in buckets.items()]
    for (H, I, _, e), oss in [(s, False) for s in MODEL_SHAPES] + [(GPT_OSS_SHAPE, True)]:
        for mean in MEAN_SLOTS:
            cfg = block_config(int(mean * e), e, hidden=0, inter=0, device_name=device)
            out.append((cfg, H, I, f"heuristic {H}x{I} mean {mean:g}", oss))
    return out


def _persistent(target: str) -> tuple[bool, ...]:
    """The PERSISTENT values the experts launch on ``target`` with this Triton
    (``experts.triton.persistent_supported``)."""
    from rocm_moe.experts.triton import persistent_supported

    return (False, True) if persistent_supported(amd=target == "gfx942") else (False,)


def _gate_up(target: str) -> list[Launch]:
    return [Launch(tuple(sorted((("BLOCK_K", c["gate_up"]["BLOCK_K"]), ("BLOCK_M", c["BLOCK_M"]),
                    ("BLOCK_N", c["gate_up"]["BLOCK_N"]), ("DESC", TARGETS[target][5]),
                    ("EVEN_K", H % c["gate_up"]["BLOCK_K"] == 0), ("PERSISTENT", persistent),
                    *_variant_constexprs(oss)))),
                   c["gate_up"].get("num_warps", 4), c["gate_up"].get("num_stages", 3), origin)
            for c, H, _, origin, oss in _expert_configs(target)
            for persistent in _persistent(target)]


def _down(target: str) -> list[Launch]:
    return [Launch((("BIAS", oss), ("BLOCK_K", c["down"]["BLOCK_K"]), ("BLOCK_M", c["BLOCK_M"]),
                    ("BLOCK_N", c["down"]["BLOCK_N"]), ("DESC", TARGETS[target][5]),
                    ("EVEN_K", I % c["down"]["BLOCK_K"] == 0), ("PERSISTENT", persistent),
                    ("WEIGHTED", weighted)),
                   c["down"].get("num_warps", 4), c["down"].get("num_stages", 3), origin)
            for c, _, I, origin, oss in _expert_configs(target) for weighted in (True, False)
            for persistent in _persistent(target)]


def _slot_sum(target: str) -> list[Launch]:
    return [Launch((("BLOCK_H", 1024), ("BOUNDED", bounded), ("K_TOPK", K)), 4, 1, f"K={K}")
            for K in sorted({k for _, _, k, _ in MODEL_SHAPES}) for bounded in (False, True)]


def _layout_launches(target: str) -> dict[str, list[Launch]]:
    """The constexprs ``experts.layout._block_layout_triton`` picks (kept in step with it by
    hand) for the local expert counts of MODEL_SHAPES at MEAN_SLOTS slots per expert, and a
    64Ki-slot prefill: one fused launch when the slots fit one chunk, else count, scan and
    place."""
    out: dict[str, list[Launch]] = {"count": [], "scan": [], "place": []}
    for *_, e in MODEL_SHAPES:
        for N in sorted({int(m * e) for m in MEAN_SLOTS} | {65536}):
            e_pow2 = 1 << e.bit_length()  # next power of two of e + 1
            chunk = 64 if N > 64 else max(16, 1 << (N - 1).bit_length())
            n_chunks = -(-N // chunk)
            sub = max(8, min(64, 8192 // e_pow2))
            why = f"e={e} slots={N}"
            # BLOCK (the experts' BLOCK_M) only scales integer arithmetic: one value compiles
            # the code every BLOCK_M gets.
            c = dict(BLOCK=16, CHUNK=chunk, E_POW2=e_pow2, FUSED=n_chunks == 1, SUB=sub)
            out["place"].append(Launch(tuple(sorted(c.items())), 4, 1, why))
            if n_chunks == 1:
                continue
            out["count"].append(Launch((("CHUNK", chunk), ("E_POW2", e_pow2)), 4, 1, why))
            cols = min(4096, 1 << (n_chunks - 1).bit_length())
            lanes = min(e_pow2, 4096 // cols)
            out["scan"].append(Launch((("COLS", cols), ("LANES", lanes)), 4, 1, why))
    return out


def _layout(name: str) -> Callable[[str], list[Launch]]:
    return lambda target: _layout_launches(target)[name]


def _desc(rows: str, cols: str):
    """A bf16 operand that is a tensor descriptor of [rows, cols] tiles when DESC (the TMA path
    ``experts.triton.tma_supported`` picks on Hopper), else a pointer."""
    return lambda c: f"tensordesc<bf16[{c[rows]}, {c[cols]}]>" if c["DESC"] else "*bf16"

_EXPERT_PTRS = dict(x_ptr="*bf16", w13=_desc("BLOCK_N", "BLOCK_K"), inter_ptr="*bf16",
                    inter=_desc("BLOCK_M", "BLOCK_K"), w2=_desc("BLOCK_N", "BLOCK_K"),
                    out_ptr="*bf16", sorted_ptr="*i32", block_expert_ptr="*i32",
                    weight_ptr="*fp32", num_padded_ptr="*i32", b13_ptr="*bf16", b2_ptr="*bf16")
_LAYOUT_PTRS = dict(ids_ptr="*i32", map_ptr="*i32", local_ptr="*i64", rank_ptr="*i32",
                    counts_ptr="*i32", sorted_ptr="*i32", totals_ptr="*i32", before_ptr="*i32",
                    block_expert_ptr="*i32", tpe_ptr="*i32", offsets_ptr="*i32",
                    padded_ptr="*i32")

def grid(**constexprs) -> Callable[[str], list[Launch]]:
    """Every combination of the given constexpr values (a tuple: several), the same on every
    target; ``num_warps=`` sets the warps."""
    from itertools import product

    def launches(target: str) -> list[Launch]:
        values = {k: v if isinstance(v, tuple) else (v,) for k, v in constexprs.items()}
        warps = values.pop("num_warps", (4,))[0]
        return [Launch(tuple(sorted(zip(values, combo, strict=True))), warps, 1, "grid")
                for combo in product(*values.values())]
    return launches


# comm/symm.py's launches: its spin bound and blocks (its own constants), K_POW2 for the top-k
# of MODEL_SHAPES, W_POW2 for 2, 4 and 8 ranks, CHUNK for 1, 64 and 4096 tokens.
_SPIN = symm.DEFAULT_SPIN
_K_POW2 = tuple(sorted({1 << (k - 1).bit_length() for _, _, k, _ in MODEL_SHAPES}))
_SYMM_PTRS = dict(ptrs_ptr="*i64", status_ptr="*i32", ids_ptr="*i32", dest1_ptr="*i32",
                  pos_ptr="*i64", x_ptr="*i32", w_ptr="*fp32", counts_ptr="*i32",
                  recv_ptr="*i32", nvalid_ptr="*i32", y_ptr="*bf16", sel_ptr="*i32",
                  local_ptr="*i8", tok_ptr="*i32")

# Byte offsets into the symmetric buffer pass 2**31 at DeepSeek-V3 scale (EP8, 16384 tokens per
# rank, two lanes: about 7.5e9 to the flags), where Triton passes them as i64: build that form.
_SYMM_OFFSETS = {name: "i64" for name in ("FLAG_OFF", "COUNTS_OFF", "RECV_OFF", "IDS_OFF",
                                          "WTS_OFF", "TOK_OFF", "BACK_OFF")}


def _fp8(c: dict) -> str:
    """The FP8 encoding each target's matrix cores take: e4m3fnuz on gfx942, e4m3fn on sm_90."""
    return "*fp8e4b8" if c["TARGET"] == "gfx942" else "*fp8e4nv"


_FP8_PTRS = dict(x_ptr="*bf16", q_ptr=_fp8, s_ptr="*fp32", aq_ptr=_fp8, as_ptr="*fp32",
                 w_ptr=_fp8, ws_ptr="*fp32", iq_ptr=_fp8, is_ptr="*fp32", out_ptr="*bf16",
                 sorted_ptr="*i32", block_expert_ptr="*i32", weight_ptr="*fp32",
                 num_padded_ptr="*i32")


def _fp8_configs(target: str) -> list[tuple[dict, str]]:
    """(config, origin) the FP8 experts would use on ``target``: every entry of its device in
    the FP8 table (``experts.triton_fp8.fp8_config_table``) and the heuristic for that device
    at the MODEL_SHAPES x MEAN_SLOTS (and a mean of 128)."""
    from rocm_moe.experts.triton_fp8 import fp8_block_config, fp8_config_table

    device = TARGETS[target][3]
    out = [(cfg, f"table {hxi} bucket {b}")
           for hxi, buckets in fp8_config_table().get(device, {}).items()
           for b, cfg in buckets.items()]
    for H, I, _, e in MODEL_SHAPES:
        out += [(fp8_block_config(int(mean * e), e, device_name=device), f"{H}x{I} mean {mean:g}")
                for mean in (*MEAN_SLOTS, 128.0)]
    return out


def fp8_launches(c: dict, target: str, kernel: str, origin: str = "config") -> list[Launch]:
    """The launches of FP8 config ``c``'s ``kernel`` ("gate_up" or "down") on ``target``: FP8
    matrix instructions (no upcast), the launch variants the config names (descriptors only
    where the target loads through them), persistent or not as ``_forward`` launches it."""
    from rocm_moe.experts.triton_fp8 import PERSISTENT_MAX_BLOCK_M

    fnuz = target == "gfx942"
    k = c["gate_up" if kernel == "gate_up" else "down"]
    cx = dict(BLOCK_K=k["BLOCK_K"], BLOCK_M=c["BLOCK_M"], BLOCK_N=k["BLOCK_N"],
              UPCAST=False, PRECISE=False, DESC=TARGETS[target][5] and bool(k.get("desc")),
              AHEAD=bool(k.get("ahead")))
    if kernel == "gate_up":
        cx.update(FP8_MAX=240.0 if fnuz else 448.0, MIN_EXP=-7 if fnuz else -6,
                  ROUND=False, FUSED=bool(k.get("fused")))
    persist = _persistent(target) if c["BLOCK_M"] <= PERSISTENT_MAX_BLOCK_M else (False,)
    if c.get("persistent"):  # every launch persistent (where the target allows it)
        persist = (True in _persistent(target),)
    variants = [dict(WEIGHTED=w, PERSISTENT=p) for w in (True, False) for p in persist] \
        if kernel == "down" else [dict(PERSISTENT=p) for p in persist]
    return [Launch(tuple(sorted({**cx, **v}.items())), k["num_warps"], k["num_stages"], origin)
            for v in variants]


def _fp8_experts(kernel: str) -> Callable[[str], list[Launch]]:
    """``experts.triton_fp8``'s launches on the target (``_fp8_configs``)."""
    def launches(target: str) -> list[Launch]:
        return [launch for c, origin in _fp8_configs(target)
                for launch in fp8_launches(c, target, kernel, origin)]
    return launches


def _fp8_desc(rows: str, ptr) -> Callable[[dict], str]:
    """An FP8 operand of the FP8 experts: a descriptor of [``rows``, 128] tiles when DESC."""
    return lambda c: f"tensordesc<{_fp8(c)[1:]}[{c[rows]}, 128]>" if c.get("DESC") else \
        (ptr(c) if callable(ptr) else ptr)


_MXFP4_PTRS = dict(x_ptr="*bf16", wb_ptr="*u8", ws_ptr="*u8", inter_ptr="*bf16",
                   out_ptr="*bf16", sorted_ptr="*i32", block_expert_ptr="*i32",
                   num_padded_ptr="*i32", b13_ptr="*bf16", b2_ptr="*bf16", weight_ptr="*fp32")


def _mxfp4_experts(kernel: str) -> Callable[[str], list[Launch]]:
    """``experts.mxfp4.mxfp4_block_config``'s launches for gpt-oss (GPT_OSS_SHAPE, and 120b's
    16 local experts on EP8) at MEAN_SLOTS, with gpt-oss's variant (biases, clamped SwiGLU)."""
    def launches(target: str) -> list[Launch]:
        from rocm_moe.experts.mxfp4 import mxfp4_block_config

        H, I, _, e = GPT_OSS_SHAPE
        out = []
        for local in (e, 16):
            for mean in MEAN_SLOTS:
                c = mxfp4_block_config(int(mean * local), local, amd=target == "gfx942")
                k = c["gate_up" if kernel == "gate_up" else "down"]
                cx = dict(BLOCK_K=k["BLOCK_K"], BLOCK_M=c["BLOCK_M"], BLOCK_N=k["BLOCK_N"],
                          EVEN_K=(H if kernel == "gate_up" else I) % k["BLOCK_K"] == 0)
                if kernel == "gate_up":
                    cx.update(_variant_constexprs(True))
                    variants = [dict(PERSISTENT=p) for p in _persistent(target)]
                else:
                    variants = [dict(BIAS=True, WEIGHTED=w, PERSISTENT=p) for w in (True, False)
                                for p in _persistent(target)]
                out += [Launch(tuple(sorted({**cx, **v}.items())), k["num_warps"],
                               k["num_stages"], f"gpt-oss e={local} mean {mean:g}")
                        for v in variants]
        return out
    return launches


def _router(target: str) -> list[Launch]:
    """``_routing_triton.launch_config`` for the families the package serves (Qwen3-MoE with
    and without norm_topk_prob, Mixtral, DeepSeek-V3 with its bias) at the target's warp, one
    token per program (``fused_route`` on GPUs)."""
    from rocm_moe._routing_triton import launch_config
    from rocm_moe.routing import RouterConfig

    out = []
    for name, cfg in (("qwen3", RouterConfig.qwen3_moe()),
                      ("qwen3 no norm", RouterConfig.qwen3_moe(norm_topk_prob=False)),
                      ("mixtral", RouterConfig.mixtral()),
                      ("deepseek-v3", RouterConfig.deepseek_v3())):
        c, warps = launch_config(cfg, has_bias=cfg.scoring == "sigmoid",
                                 warp=TARGETS[target][2])
        out.append(Launch(tuple(sorted({**c, "ROWS": 1}.items())), warps, 1, name))
    return out


def _splitk_router(target: str) -> list[Launch]:
    """``_routing_triton.splitk_route`` after the Triton gate GEMM (``_gate_triton``):
    DeepSeek-V3 (float32 logits), Kimi K2 (384 experts, one group) and Qwen3 (bf16 logits);
    on sm_90 also as the TUNED plans launch it (PDL)."""
    from rocm_moe._routing_triton import launch_config
    from rocm_moe.routing import RouterConfig

    out = []
    for name, cfg, rnd in (("deepseek-v3", RouterConfig.deepseek_v3(), 0),
                           ("kimi-k2", RouterConfig.kimi_k2(), 0),
                           ("qwen3", RouterConfig.qwen3_moe(), 1)):
        c, warps = launch_config(cfg, has_bias=cfg.scoring == "sigmoid",
                                 warp=TARGETS[target][2])
        for pdl in (False, True) if target == "sm_90" else (False,):
            out.append(Launch(tuple(sorted({**c, "ROWS": 1, "ROUND": rnd, "PDL": pdl}.items())),
                              warps, 1, name + (" pdl" if pdl else "")))
    return out


def _gate_gemm(target: str) -> list[Launch]:
    """``_gate_triton.gate_plan`` at 1-128 tokens and a 4096-token prefill for DeepSeek-V3's
    gate (E = 256, H = 7168, bf16; float32 operands too), Kimi K2's (E = 384) and Qwen3's
    (E = 128, H = 2048) on the target's SM count; on sm_90 also the TUNED plans (bf16)."""
    from rocm_moe._gate_triton import TUNED, gate_plan, plan_from_spec

    amd = target == "gfx942"
    plans = [(plan_from_spec(spec, T, E, H, ieee_fp32=False, sms=132, amd=False), E, False,
              f"E={E} T={T} TUNED {spec}")
             for (E, H), entries in TUNED.items() if target == "sm_90" for T, spec in entries]
    plans += [(gate_plan(T, E, H, ieee_fp32=fp32, sms=304 if amd else 132, amd=amd), E, fp32,
               f"E={E} T={T}")
              for E, H in ((256, 7168), (384, 7168), (128, 2048))
              for T in (1, 8, 33, 64, 128, 4096) for fp32 in (False, True)]
    out = {}
    for p, E, fp32, why in plans:
        c = (("BLOCK_E", p.block_e), ("BLOCK_K", p.block_k), ("BLOCK_T", p.block_t), ("E", E),
             ("IEEE", fp32), ("PDL", p.pdl), ("PDL_IN", p.pdl_in))
        out.setdefault((c, p.num_warps, p.num_stages), why)
    return [Launch(c, w, s, why) for (c, w, s), why in out.items()]


def _small_ptr(fp8: str, dense: str):
    """A pointer of the small experts path: ``fp8`` ("fp8": the target's FP8 encoding, or a
    type) in FP8 mode, ``dense`` otherwise (the bf16 path passes x for unused scales)."""
    return lambda c: (_fp8(c) if fp8 == "fp8" else fp8) if c["FP8"] else dense


def _small_x(fp8: str):
    """x / xs of the small gate/up: float rows (the x pointer passed for xs too) where the
    kernel quantises them (QUANT_X)."""
    return lambda c: "*bf16" if c.get("QUANT_X") else _small_ptr(fp8, "*bf16")(c)


_SMALL_PTRS = dict(x_ptr=_small_x("fp8"), xs_ptr=_small_x("*fp32"),
                   w_ptr=lambda c: _desc("BLOCK_N", "BLOCK_K")(c) if c.get("DESC")
                   else _small_ptr("fp8", "*bf16")(c), ws_ptr=_small_ptr("*fp32", "*bf16"),
                   inter_ptr=_small_ptr("*fp32", "*bf16"), out_ptr="*bf16", ids_ptr="*i32",
                   map_ptr="*i32", weight_ptr="*fp32", num_rows_ptr="*i32")


def _small(kernel: str) -> Callable[[str], list[Launch]]:
    """``experts.triton_small.small_config``'s launches: its heuristic for one token (per-slot
    gate/up, per-slot down, then the sum) and 64 tokens (per-expert gate/up and down, then the
    sum), the other per-slot / per-row forms (for tuning) and every entry of the target
    device's tuned table, bf16 and FP8 (native FP8 dots), both row bounds and weight modes,
    at the MODEL_SHAPES' top-k."""
    def launches(target: str) -> list[Launch]:
        from rocm_moe.experts.triton_small import PER_SLOT_MAX_SLOTS, SUM_BLOCK_H, small_config
        from rocm_moe.experts.triton_small import _table as _small_table

        fnuz = target == "gfx942"
        quant = dict(FP8_MAX=240.0 if fnuz else 448.0, MIN_EXP=-7 if fnuz else -6, ROUND=False)
        top_k = sorted({t for _, _, t, _ in MODEL_SHAPES})
        configs = []
        for fp8 in (False, True):
            one, many = small_config(8, fp8=fp8), small_config(8 * PER_SLOT_MAX_SLOTS, fp8=fp8)
            gemv = dict(one, gate_up=dict(one["gate_up"], DOT=False),
                        down=dict(one["down"], FORM="row", DOT=False, BLOCK_N=16))
            row_dot = dict(one, down=dict(one["down"], FORM="row", DOT=True))
            configs += [(fp8, one, "8 slots"), (fp8, many, f"{8 * PER_SLOT_MAX_SLOTS} slots"),
                        (fp8, gemv, "8 slots GEMV"), (fp8, row_dot, "8 slots row dot")]
        for hxi, formats in _small_table().get(TARGETS[target][3], {}).items():
            configs += [(f == "fp8", c, f"table {hxi} {b}") for f, entries in formats.items()
                        for b, c in entries.items()]
        out = []
        for fp8, c, origin in configs:
            k = c["gate_up" if kernel == "gate_up" else "down"]
            form = c["down"]["FORM"]
            cx = dict(FP8=fp8, BLOCK_N=k["BLOCK_N"], BLOCK_K=k["BLOCK_K"])
            dot = dict(UPCAST=False, PRECISE=False, BLOCK_M=k["BLOCK_M"])
            bounds = [dict(BOUNDED=b) for b in (False, True)]
            weights = [dict(WEIGHTED=w, **b) for w in (True, False) for b in bounds]
            # bf16 weights of the tl.dot forms through tensor descriptors where the target's
            # experts take them (experts.triton.tma_supported: sm_90)
            desc = TARGETS[target][5] and not fp8
            if kernel == "gate_up":  # FP8: rows quantised before, or in the kernel
                cx.update(dot, **quant, CHUNK=k["CHUNK"], PER_SLOT=c["per_slot"],
                          DOT=k.get("DOT", False),
                          DESC=desc and (k.get("DOT", False) or not c["per_slot"]))
                variants = [dict(QUANT_X=q, **b) for b in bounds
                            for q in ((False, True) if fp8 else (False,))]
            elif kernel == "down" and form == "row":  # (the tuner's alternative: top-8)
                cx.update(dot, **quant, DOT=k.get("DOT", False))
                variants = [dict(K_TOPK=max(top_k), WEIGHTED=w, BOUNDED=False)
                            for w in (True, False)]
            elif kernel == "down_slots" and form != "row":
                cx.update(dot, **quant, CHUNK=k["CHUNK"], PER_SLOT=form == "slot", DESC=desc)
                variants = weights
            elif kernel == "sum" and form != "row" and not fp8:
                cx = dict(BLOCK_H=SUM_BLOCK_H)
                variants = [dict(K_TOPK=kk, **b) for b in bounds for kk in top_k]
            else:
                continue
            why = f"{'fp8' if fp8 else 'bf16'} {origin}"
            warps = (k["num_warps"], k["num_stages"]) if kernel != "sum" else (4, 1)
            out += [Launch(tuple(sorted({**cx, **v}.items())), *warps, why) for v in variants]
        return out
    return launches


_STREAM_PTRS = dict(x_ptr=lambda c: _fp8(c) if c["XFP8"] else "*bf16",
                    xs_ptr=lambda c: "*fp32" if c["XFP8"] else "*bf16",
                    w_ptr=lambda c: _fp8(c) if c.get("WFP8", True) else "*bf16",
                    ws_ptr=lambda c: "*fp32" if c.get("WFP8", True) else "*bf16",
                    inter_ptr="*fp32",
                    out_ptr=lambda c: "*bf16" if c["PER_ROW"] or not c["WEIGHTED"] else "*fp32",
                    ids_ptr="*i32", map_ptr="*i32", weight_ptr="*fp32", num_rows_ptr="*i32")


def _stream(kernel: str) -> Callable[[str], list[Launch]]:
    """``experts.triton_small_fp8``'s launches: each DEFAULTS and TUNED entry at top-8 (gate/up
    on float rows, quantised in the kernel, and on FP8Rows; down in both weight modes; both row
    bounds) and its other FORM with the same tiles (float rows, weighted, unbounded); on sm_90
    also its FORM as a PDL launch. The BF16_DEFAULTS entries alike with bf16 weights (WFP8
    off, float rows, nothing quantised): on sm_90 only (the bf16 stream path is NVIDIA's)."""
    def launches(target: str) -> list[Launch]:
        from rocm_moe.experts.triton_small_fp8 import BF16_DEFAULTS, DEFAULTS, TUNED

        fnuz = target == "gfx942"
        quant = dict(FP8_MAX=240.0 if fnuz else 448.0, MIN_EXP=-7 if fnuz else -6, ROUND=False,
                     ACT_Q=True, K_TOPK=8)
        out = []
        entries = [(b, c, True) for b, c in DEFAULTS.items()] + \
            [(f"{shape} {bucket}", cfg, True) for shape, t in TUNED.items()
             for bucket, cfg in t.items()]
        if target == "sm_90":
            entries += [(f"bf16 {b}", c, False) for b, c in BF16_DEFAULTS.items()]
        for bucket, cfg, wfp8 in entries:
            k = cfg[kernel]
            for form in ("slot", "row"):
                cx = dict(quant, PER_ROW=form == "row", S=8 if form == "row" else 1,
                          BLOCK_N=k["BLOCK_N"], BLOCK_K=k["BLOCK_K"],
                          PREFETCH=k.get("PREFETCH", False),
                          SPLIT=cfg["gate_up"].get("SPLIT", 1),
                          **({"PRELOAD": k["PRELOAD"]} if k.get("PRELOAD") else {}))
                if not wfp8:
                    cx.update(WFP8=False, ACT_Q=False)
                extra = [dict(XFP8=x) for x in (False, True)] if kernel == "gate_up" else \
                    [dict(WEIGHTED=w) for w in (True, False)]
                if not wfp8 and kernel == "gate_up":
                    extra = extra[:1]  # (float rows only)
                if form != k["FORM"]:  # (the other form: one variant)
                    extra = extra[:1]
                out += [Launch(tuple(sorted({**cx, **v, "BOUNDED": b}.items())),
                               k["num_warps"], k["num_stages"], f"{bucket} slots {form}")
                        for v in extra for b in ((False, True) if form == k["FORM"] else (False,))]
                if target == "sm_90" and form == k["FORM"]:  # (a config's PDL: NVIDIA only)
                    pdl = {**cx, **extra[0], "BOUNDED": False, "PDL": True}
                    out.append(Launch(tuple(sorted(pdl.items())), k["num_warps"],
                                      k["num_stages"], f"{bucket} slots {form} pdl"))
        return out
    return launches


_STREAM_ALIGNED = ("H", "I", "stride_xr", "stride_ir", "stride_or", "stride_ok")


def _gluon(kernel: str, kind: object = True) -> Callable[[str], list[Launch]]:
    """``experts.triton_fp8.GLUON_CONFIGS``' launches of the Gluon FP8 kernels whose "gluon"
    is ``kind`` (True: ``_gluon_fp8.py``, BLOCK_M a constexpr, BLOCK_M / 16 warps; "ws": the
    warp-specialised ``_gluon_fp8_ws.py``, 4 warps a partition); sm_90 only (Hopper's wgmma,
    cp.async, TMA), both weight modes of the down kernel."""
    def launches(target: str) -> list[Launch]:
        from rocm_moe.experts.triton_fp8 import GLUON_CONFIGS

        if target != "sm_90":
            return []
        out = []
        for bucket, cfg in GLUON_CONFIGS.items():
            if cfg["gluon"] != kind:
                continue
            cx = dict(STAGES=cfg[kernel]["num_stages"])
            if kind is True:
                cx["BLOCK_M"] = cfg["BLOCK_M"]
            variants = [dict(FP8_MAX=448.0)] if kernel == "gate_up" else \
                [dict(WEIGHTED=w) for w in (True, False)]
            out += [Launch(tuple(sorted({**cx, **v}.items())), cfg[kernel]["num_warps"], 1,
                           f"gluon {bucket}") for v in variants]
        return out
    return launches


def _ws_desc(rows: int) -> Callable[[dict], str]:
    """A Gluon TMA descriptor of [rows, 128] FP8 boxes in NVMMA shared memory."""
    def ty(_c):
        from triton.experimental.gluon import language as gl

        layout = gl.NVMMASharedLayout.get_default_for([rows, 128], gl.float8e4nv)
        return f"tensordesc<fp8e4nv[{rows}, 128],{layout!r}>"
    return ty


_GLUON_WS_PTRS = dict(a_desc=_ws_desc(64), w_desc=_ws_desc(128), as_ptr="*fp32",
                      ws_ptr="*fp32", iq_ptr="*fp8e4nv", is_ptr="*fp32", sorted_ptr="*i32",
                      block_expert_ptr="*i32", num_padded_ptr="*i32", weight_ptr="*fp32",
                      out_ptr="*bf16")


_GLUON_PTRS = dict(aq_ptr="*fp8e4nv", as_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32",
                   iq_ptr="*fp8e4nv", is_ptr="*fp32", sorted_ptr="*i32",
                   block_expert_ptr="*i32", weight_ptr="*fp32",
                   out_ptr="*bf16")


# Every Triton kernel of the package: one line each.
KERNELS = [
    Kernel("rocm_moe.experts._triton_kernels:_gate_up_kernel", _EXPERT_PTRS, _gate_up),
    Kernel("rocm_moe.experts._triton_kernels:_down_kernel", _EXPERT_PTRS, _down),
    Kernel("rocm_moe.experts._triton_kernels:_slot_sum_kernel",
           dict(slots_ptr="*bf16", local_ptr="*i64", out_ptr="*bf16", num_rows_ptr="*i32"),
           _slot_sum),
    Kernel("rocm_moe._quant_triton:_quant_rows_kernel", _FP8_PTRS,
           lambda t: grid(GROUP=128, GPB=8, ROUND=False, MIN_EXP=-7 if t == "gfx942" else -6,
                          FP8_MAX=240.0 if t == "gfx942" else 448.0)(t)),
    Kernel("rocm_moe.experts._triton_fp8:_fp8_gate_up_kernel",
           dict(_FP8_PTRS, w_ptr=_fp8_desc("BLOCK_N", _fp8)), _fp8_experts("gate_up"),
           aligned=("H", "I", "stride_ar", "stride_wn", "stride_ip")),
    Kernel("rocm_moe.experts._triton_fp8:_fp8_down_kernel",
           dict(_FP8_PTRS, w_ptr=_fp8_desc("BLOCK_N", _fp8), iq_ptr=_fp8_desc("BLOCK_M", _fp8)),
           _fp8_experts("down"), aligned=("H", "I", "stride_ip", "stride_wn", "stride_os")),
    Kernel("rocm_moe.experts._triton_small:_small_gate_up_kernel", _SMALL_PTRS,
           _small("gate_up")),
    Kernel("rocm_moe.experts._triton_small:_small_down_kernel", _SMALL_PTRS, _small("down")),
    Kernel("rocm_moe.experts._triton_small:_small_down_slots_kernel",
           dict(_SMALL_PTRS, out_ptr=lambda c: "*fp32" if c["WEIGHTED"] else "*bf16"),
           _small("down_slots")),
    Kernel("rocm_moe.experts._triton_small:_small_sum_kernel",
           dict(_SMALL_PTRS, slots_ptr="*fp32"), _small("sum")),
    Kernel("rocm_moe.experts._triton_small_fp8:_stream_gate_up_kernel", _STREAM_PTRS,
           _stream("gate_up"), aligned=_STREAM_ALIGNED),
    Kernel("rocm_moe.experts._triton_small_fp8:_stream_down_kernel", _STREAM_PTRS,
           _stream("down"), aligned=_STREAM_ALIGNED),
    Kernel("rocm_moe.experts._gluon_fp8:_gluon_fp8_gate_up_kernel", _GLUON_PTRS,
           _gluon("gate_up"), aligned=("H", "I", "stride_ar", "stride_ip")),
    Kernel("rocm_moe.experts._gluon_fp8:_gluon_fp8_down_kernel", _GLUON_PTRS, _gluon("down"),
           aligned=("H", "I", "stride_ip", "stride_os")),
    Kernel("rocm_moe.experts._gluon_fp8_ws:_ws_fp8_gate_up_kernel", _GLUON_WS_PTRS,
           _gluon("gate_up", "ws"), aligned=("stride_ip",)),
    Kernel("rocm_moe.experts._gluon_fp8_ws:_ws_fp8_down_kernel", _GLUON_WS_PTRS,
           _gluon("down", "ws"), aligned=("stride_os",)),
    Kernel("rocm_moe.experts._triton_mxfp4:_mxfp4_gate_up_kernel", _MXFP4_PTRS,
           _mxfp4_experts("gate_up")),
    Kernel("rocm_moe.experts._triton_mxfp4:_mxfp4_down_kernel", _MXFP4_PTRS,
           _mxfp4_experts("down")),
    Kernel("rocm_moe.experts._layout_triton:count_kernel", _LAYOUT_PTRS, _layout("count")),
    Kernel("rocm_moe.experts._layout_triton:scan_kernel", _LAYOUT_PTRS, _layout("scan")),
    Kernel("rocm_moe.experts._layout_triton:place_kernel", _LAYOUT_PTRS, _layout("place")),
    Kernel("rocm_moe.comm._rows_triton:pack_rows_kernel",
           dict(x_ptr="*i32", meta_ptr="*i32", csum_ptr="*i64", pos_ptr="*i64",
                send_ptr="*i32"), grid(BLOCK=512)),
    Kernel("rocm_moe.comm._rows_triton:gather_sum_kernel",
           dict(back_ptr="*bf16", pos_ptr="*i64", out_ptr="*bf16"), grid(BLOCK=1024)),
    Kernel("rocm_moe._weighting_triton:weighted_slot_sum_kernel",
           dict(raw_ptr="*bf16", w_ptr="*fp32", local_ptr="*i8", out_ptr="*bf16"),
           grid(K_TOPK=tuple(sorted({k for _, _, k, _ in MODEL_SHAPES})), BLOCK_H=1024)),
    Kernel("rocm_moe._routing_triton:_router_kernel",  # DeepSeek-V3's logits are float32
           dict(logits_ptr=lambda c: "*fp32" if c["SIGMOID"] else "*bf16", bias_ptr="*fp32",
                w_ptr="*fp32", ids_ptr="*i32"), _router, dict(eps="fp32", scale="fp32")),
    Kernel("rocm_moe._routing_triton:_splitk_router_kernel",
           dict(part_ptr="*fp32", bias_ptr="*fp32", logits_ptr=lambda c: "*bf16" if c["ROUND"]
                else "*fp32", w_ptr="*fp32", ids_ptr="*i32"), _splitk_router,
           dict(eps="fp32", scale="fp32")),
    Kernel("rocm_moe._gate_triton:_gate_splitk_kernel",
           dict(x_ptr=lambda c: "*fp32" if c["IEEE"] else "*bf16",
                w_ptr=lambda c: "*fp32" if c["IEEE"] else "*bf16", part_ptr="*fp32"),
           _gate_gemm),
    Kernel("rocm_moe._invariant_triton:linear_kernel",
           dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*fp32"),
           grid(IEEE=False, BLOCK_N=32, BLOCK_M=32, BLOCK_D=64)),  # invariant.LINEAR_CONFIG
    Kernel("rocm_moe._invariant_triton:softmax_kernel",
           dict(x_ptr="*fp32", out_ptr="*fp32"), grid(BLOCK_E=(8, 64, 128, 256))),
    Kernel("rocm_moe.comm._symm_triton:barrier_kernel", _SYMM_PTRS,
           grid(SPIN=_SPIN, num_warps=1), _SYMM_OFFSETS),
    Kernel("rocm_moe.comm._symm_triton:route_counts_kernel", _SYMM_PTRS,
           grid(K_POW2=_K_POW2, W_POW2=(2, 4, 8), CHUNK=(16, 64, 256), SPIN=_SPIN),
           _SYMM_OFFSETS),
    Kernel("rocm_moe.comm._symm_triton:pack_put_kernel", _SYMM_PTRS,
           grid(K_POW2=_K_POW2, BLOCK=symm.BLOCK_WORDS), _SYMM_OFFSETS),
    Kernel("rocm_moe.comm._symm_triton:barrier_scrub_kernel", _SYMM_PTRS,
           grid(SPIN=_SPIN, K_POW2=_K_POW2, W_POW2=(2, 4, 8), BLOCK_R=symm.SCRUB_ROWS),
           _SYMM_OFFSETS),
    Kernel("rocm_moe.comm._symm_triton:push_back_kernel", _SYMM_PTRS,
           grid(ALIGNED=(True, False), BLOCK_R=symm.PUSH_ROWS, BLOCK_H=symm.BLOCK_H),
           _SYMM_OFFSETS),
    Kernel("rocm_moe.comm._symm_triton:push_raw_kernel", _SYMM_PTRS,
           grid(ALIGNED=(True, False), BLOCK_R=symm.PUSH_ROWS, BLOCK_H=symm.BLOCK_H),
           _SYMM_OFFSETS),
]


@dataclass(frozen=True)
class Compiled:
    kernel: str
    target: str
    launch: Launch
    shared: int  # bytes of shared memory / LDS per program
    vgprs: int | None = None  # gfx942: VGPRs allocated (AGPRs included); sm_90: per thread
    sgprs: int | None = None
    vgpr_spills: int | None = None  # gfx942: VGPRs spilled; sm_90: local memory bytes
    sgpr_spills: int | None = None
    scratch: int | None = None  # bytes of private (spill) memory per lane
    mfma: int | None = None  # MFMA instructions in the code object (gfx942)
    waves_per_simd: int | None = None

    def row(self) -> str:
        c = " ".join(f"{k}={v}" for k, v in self.launch.constexprs)
        w = f"w{self.launch.num_warps} s{self.launch.num_stages}"
        regs = (f"vgpr={self.vgprs} sgpr={self.sgprs} spill={self.vgpr_spills}/"
                f"{self.sgpr_spills} scratch={self.scratch} mfma={self.mfma} "
                f"waves/SIMD={self.waves_per_simd}") if self.target == "gfx942" else \
            f"regs={self.vgprs} local={self.vgpr_spills}"
        return (f"{self.target:7} {self.kernel:18} {c} {w}: lds={self.shared} {regs} "
                f"[{self.launch.origin}]")


def occupancy(*, vgprs: int, lds: int, num_warps: int) -> int:
    """Waves per SIMD on gfx942 (CDNA3: 4 SIMDs per CU, 512 VGPRs per lane, granule 8, at most
    8 waves; 64 KiB LDS per CU shared by its workgroups of ``num_warps`` waves)."""
    by_regs = 512 // max(8, -(-vgprs // 8) * 8)
    by_lds = (65536 // lds) * num_warps // 4 if lds else 8
    return max(0, min(8, by_regs, by_lds))


def _amdgcn_stat(asm: str, key: str) -> int | None:
    m = re.search(rf"\.{key}:\s+(\d+)", asm)
    return int(m.group(1)) if m else None


def vgprs_allocated(asm: str) -> int | None:
    """Vector registers a lane holds on gfx942 (its one file of 512: arch VGPRs, aligned to 4,
    then AGPRs): the assembler's ``TotalNumVgprs``, else the metadata's ``.vgpr_count``.

    Not ``.vgpr_count + .agpr_count``: ``.vgpr_count`` already includes the AGPRs on gfx90a
    and later. The LLVM of Triton 3.6 puts MFMA accumulators in AGPRs (``.agpr_count: 64`` of
    ``.vgpr_count: 244``), so the sum counted them twice (308 registers, 1 wave per SIMD
    instead of 2); Triton 3.9's LLVM allocates no AGPRs there, which hid it.
    Example: ``"; TotalNumVgprs: 244"`` -> 244."""
    m = re.search(r"TotalNumVgprs:\s+(\d+)", asm)
    return int(m.group(1)) if m else _amdgcn_stat(asm, "vgpr_count")


def signature(fn, kernel: Kernel, constexprs: dict, target: str = "") -> dict[str, str]:
    """Triton's signature; a callable type gets the constexprs plus ``"TARGET"``."""
    def kind(a):
        t = kernel.pointers.get(a) or kernel.scalars.get(a, "i32")
        return t({**constexprs, "TARGET": target}) if callable(t) else t

    return {a: "constexpr" if a in constexprs else kind(a) for a in fn.arg_names}



def aligned_attrs(fn, sig: dict[str, str], ints: tuple[str, ...] = ()) -> dict:
    """Triton's specialisation of 16-byte aligned pointers and of integers divisible by 16
    (``tt.divisibility`` 16), for every pointer of ``sig`` and the ``ints`` named:
    ``{(index,): [["tt.divisibility", 16]], ...}``."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
            if sig[a].startswith("*") or a in ints}


def _cubin_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local memory bytes) from the wheel's cuobjdump."""
    import os
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    reg, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def compile_one(kernel: Kernel, target: str, launch: Launch) -> Compiled:
    """Compile ``kernel`` for ``target`` with ``launch``; raises what Triton raises."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = kernel.path.split(":")
    fn = getattr(importlib.import_module(module), name)
    # a constexpr the launch leaves out takes its default, as a Python launch does (not a
    # runtime argument: its branches would all be compiled)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default},
                  **dict(launch.constexprs)}
    backend, arch, warp = TARGETS[target][:3]
    sig = signature(fn, kernel, constexprs, target)
    attrs = aligned_attrs(fn, sig, kernel.aligned) if kernel.aligned else None
    if "num_warps" in fn.arg_names:  # a Gluon kernel: num_warps is its own constexpr
        from triton.experimental.gluon._runtime import GluonASTSource

        constexprs["num_warps"] = launch.num_warps
        sig["num_warps"] = "constexpr"
        src = GluonASTSource(fn, sig, constexprs, attrs)
    else:
        src = ASTSource(fn, sig, constexprs, attrs)
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    ck = triton.compile(src, target=GPUTarget(backend, arch, warp), options=options)
    md = ck.metadata
    if backend == "cuda":  # registers and local (spill) bytes from the cubin
        regs, local = _cubin_usage(ck.asm["cubin"])
        return Compiled(name, target, launch, md.shared, vgprs=regs, vgpr_spills=local)
    asm = ck.asm["amdgcn"]
    v = vgprs_allocated(asm) or 0
    return Compiled(name, target, launch, md.shared, vgprs=v,
                    sgprs=_amdgcn_stat(asm, "sgpr_count"),
                    vgpr_spills=_amdgcn_stat(asm, "vgpr_spill_count"),
                    sgpr_spills=_amdgcn_stat(asm, "sgpr_spill_count"),
                    scratch=_amdgcn_stat(asm, "private_segment_fixed_size"),
                    mfma=len(re.findall(r"\bv_mfma\w*", asm)),
                    waves_per_simd=occupancy(vgprs=v, lds=md.shared, num_warps=launch.num_warps))


def distinct_launches(target: str) -> list[tuple[Kernel, Launch, list[str]]]:
    """Each kernel's distinct launches on ``target`` (constexprs, warps, stages), with every
    origin that chose it."""
    out = []
    for kernel in KERNELS:
        seen: dict[tuple, list[str]] = {}
        first: dict[tuple, Launch] = {}
        for launch in kernel.launches(target):
            key = (launch.constexprs, launch.num_warps, launch.num_stages)
            seen.setdefault(key, []).append(launch.origin)
            first.setdefault(key, launch)
        out += [(kernel, first[k], seen[k]) for k in seen]
    return out


def main() -> None:
    """python -m rocm_moe._compile [target ...] [--device NAME]: the report; ``--device``
    compiles another device's tuned table for the targets (e.g. H100's for gfx942)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rocm_moe._compile")
    ap.add_argument("targets", nargs="*", default=list(TARGETS))
    ap.add_argument("--device", help="tuned-table device name to compile instead")
    args = ap.parse_args()
    for target in args.targets:
        if args.device:
            TARGETS[target] = (*TARGETS[target][:3], args.device, *TARGETS[target][4:])
        for kernel, launch, origins in distinct_launches(target):
            print(compile_one(kernel, target, launch).row(), f"({len(origins)} uses)")


if __name__ == "__main__":
    main()
