"""Triton gate GEMM + router (imported only where triton is installed): the router's logits
from the hidden states and the gate weight as stored, in two launches.

    x [T, H] (bf16 / fp16 / fp32)  W [E, H] (as stored: bf16 for DeepSeek-V3, Kimi K2, GLM-4.5)
      -> _gate_splitk_kernel: grid (E tiles, S splits of H, T tiles); program (e, s, t) sums
         x[t-tile, k] * W[e-tile, k] over its k-range in float32 -> part [S, T, E] float32
      -> _splitk_router_kernel (``rocm_moe._routing_triton``): logits = part[0] + part[1] +
         ... in order (no atomics: deterministic), rounded to the logits' dtype, routed
      -> weights [T, K] float32, ids [T, K] int32, logits [T, E]

Why: DeepSeek-V3's gate is ``F.linear(x.float(), W.float())`` (transformers), a float32 GEMM
whose cuBLAS kernel takes 7-28 us on an H100 at 1-128 tokens for a weight that is 3.7 MB in
bf16 (~1.2 us to read). Here every SM streams a slice of the bf16 weight (split over H and
over experts), and the float32 sum is the only thing float32 about it:

- bf16 x bf16 (and fp16 x fp16) products are exact in float32 (8 + 8 and 11 + 11 significant
  bits <= 24), so ``tl.dot`` on the 16-bit operands with a float32 accumulator computes the
  float32 GEMM's products exactly; the logits differ from torch's float32 GEMM only in the
  order (and the hardware's rounding) of the float32 additions. Other pairs (a float32
  operand, or two different 16-bit dtypes) are converted to float32 and multiplied with
  ``input_precision="ieee"`` (never TF32).
- Routers whose logits are in the model dtype (Qwen3, Mixtral: ``RouterConfig
  .logits_in_float32`` False) get the float32 sum rounded once to that dtype, as cuBLAS rounds
  its float32 accumulator.

Not batch-invariant (S and the tiles follow T): ``invariant=True`` keeps the torch path
(``invariant.linear_acc``). No host read: capturable in a CUDA graph.

Plans (``GatePlan``; ``plan_from_spec`` reads them from a short spec such as "t64 e64 s16 pdl",
``ROCM_MOE_GATE_PLAN`` sets one for every call, ``TUNED`` holds measured ones by gate shape,
bench/router_plans.py sweeps them): the tiles and splits above; the router's rows and warps per
program; ``pdl`` (NVIDIA sm_90+: the router launched as a programmatic dependent of the GEMM,
``griddepcontrol``, so its launch overlaps the GEMM); ``pdlin`` (the GEMM launched the same
way behind whatever wrote x). The router's fields never change a bit; the GEMM's change only
the order of the float32 additions. (A one-launch plan, the GEMM's last program per T tile
routing its rows, measured 9.4-58.2 us for DeepSeek-V3 and 5.8-17.2 for Qwen3 at 1-128 tokens
on an H100, against the best two launches' 6.9-8.3 and 4.6-5.6, and was removed:
bench/results/router_plans_h100.txt.)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from rocm_moe._checks import error_message
from rocm_moe._routing_triton import ROWS_2_RULE, _grid_launch_dependents, _grid_wait


@triton.jit(do_not_specialize=["T", "KB_PER_SPLIT"])
def _gate_splitk_kernel(x_ptr, w_ptr, part_ptr, T, H, stride_xt, stride_we, KB_PER_SPLIT,
                        E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
                        PDL_IN: tl.constexpr = False):
    """part[s, t, e] = sum over k in split s (KB_PER_SPLIT blocks of BLOCK_K) of
    x[t, k] * w[e, k], float32, for program (e tile, s, t tile). x [T, H] and w [E, H] with
    unit stride along H; part [S, T, E] contiguous. IEEE: operands converted to float32 and
    multiplied in IEEE float32 (else the 16-bit operands go to the tensor cores, products
    exact in the float32 accumulator). PDL: let the router launched behind it with
    ``launch_pdl=True`` start now (it waits for these partials before reading them). PDL_IN:
    launched itself with ``launch_pdl=True`` behind whatever wrote x: wait for it first.

    Example: x [[1, 2]], w [[3, 4], [5, 6]], one split -> part [[[11, 17]]]."""
    if PDL_IN:
        _grid_wait()
    if PDL:
        _grid_launch_dependents()
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    k = tl.arange(0, BLOCK_K)
    k0 = pid_s * KB_PER_SPLIT * BLOCK_K
    x_ptrs = x_ptr + t[:, None].to(tl.int64) * stride_xt + (k0 + k)[None, :]
    w_ptrs = w_ptr + e[:, None].to(tl.int64) * stride_we + (k0 + k)[None, :]
    t_in = t[:, None] < T
    e_in = e[:, None] < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    n = tl.minimum(KB_PER_SPLIT, tl.cdiv(H - k0, BLOCK_K))
    for i in range(n):
        k_in = (k0 + i * BLOCK_K + k)[None, :] < H
        a = tl.load(x_ptrs, mask=t_in & k_in, other=0.0)
        b = tl.load(w_ptrs, mask=e_in & k_in, other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = part_ptr + (pid_s * T + t)[:, None].to(tl.int64) * E + e[None, :]
    tl.store(out, acc, mask=t_in & (e[None, :] < E))


@dataclass(frozen=True, kw_only=True)
class GatePlan:
    """Tiles and split of ``_gate_splitk_kernel`` for one call: ``splits`` S programs along H,
    each ``kb_per_split`` blocks of ``block_k``; and the split-K router's launch behind it:
    ``route_rows`` tokens per program (None: 1 on GPUs, 64 interpreted; 2 refused),
    ``route_warps`` (None: ``_routing_triton.launch_config``'s), ``pdl`` (NVIDIA sm_90+: the
    router launched as a programmatic dependent of the GEMM, so its launch overlaps the GEMM's
    tail); ``pdl_in`` (NVIDIA sm_90+: the GEMM launched as a programmatic dependent of whatever
    ran before it, waiting for it before reading x). None of
    the router's fields changes a bit of the result; the GEMM's change the order of the
    float32 additions only."""

    block_t: int
    block_e: int
    block_k: int
    splits: int
    kb_per_split: int
    num_warps: int = 4
    num_stages: int = 3
    route_rows: int | None = None
    route_warps: int | None = None
    pdl: bool = False
    pdl_in: bool = False

    def grid(self, T: int, E: int) -> tuple[int, int, int]:
        return (triton.cdiv(E, self.block_e), self.splits, triton.cdiv(T, self.block_t))

    @property
    def spec(self) -> str:
        """The plan as ``plan_from_spec`` reads it (every field)."""
        out = (f"t{self.block_t} e{self.block_e} k{self.block_k} s{self.splits} "
               f"w{self.num_warps} n{self.num_stages}")
        if self.route_rows:
            out += f" rr{self.route_rows}"
        if self.route_warps:
            out += f" rw{self.route_warps}"
        return out + (" pdl" if self.pdl else "") + (" pdlin" if self.pdl_in else "")


def ieee(x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies in IEEE float32: unless both operands are the same
    16-bit float (whose products are exact in float32 on the tensor cores)."""
    return not (x_dtype == w_dtype and x_dtype in (torch.bfloat16, torch.float16))


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: few programs, fast tests
    return torch.cuda.get_device_properties(device).multi_processor_count


S_MAX = 16  # splits of H at most (the split-K router loads 8 partials per round trip)


def gate_plan(T: int, E: int, H: int, *, ieee_fp32: bool, sms: int, amd: bool,
              block_e: int | None = None, waves: float = 2.0, block_t: int | None = None,
              block_k: int | None = None) -> GatePlan:
    """The plan for [T, H] x [E, H]: T tiles of 16 rows (T <= 16), 32 (T <= 128) or 64,
    expert tiles of 16 (T <= 16), 32 (T <= 64) or 64 (each expert tile reads x again, each T
    tile the weight, from L2 after the first), and enough splits of H that about ``waves``
    programs per SM stream the weight (each SM reads a slice: the weight read is the floor at
    small T), at most S_MAX (the router sums the S partials 8 at a time: two round trips to
    L2) and with the [S, T, E] float32 workspace no larger than the weight itself. On gfx942
    (64 KiB of LDS, 512 VGPRs) 2 stages and 64-wide k blocks for the 32 x 64 tiles.

    Example (a test asserts it): T = 1, E = 256, H = 7168, bf16 on 132 SMs -> 16-row tiles,
    16 expert tiles of 16, 128-wide k blocks, S = 14 splits of 4 blocks (224 programs)."""
    block_t = block_t or (16 if T <= 16 else 32 if T <= 128 else 64)
    block_e = block_e or (16 if T <= 16 else 32 if T <= 64 else 64)
    block_k = block_k or (32 if ieee_fp32 else 64 if block_t >= 64 or (
        amd and block_t * block_e >= 2048) else 128)
    # (gfx942 at 32 x 64 x 128: 269 VGPRs, 44 SGPRs spilled, 1 wave per SIMD)
    n_kb = triton.cdiv(H, block_k)
    tiles = triton.cdiv(E, block_e) * triton.cdiv(max(T, 1), block_t)
    want = max(1, round(waves * sms / tiles))
    weight_bytes = E * H * (4 if ieee_fp32 else 2)
    cap = max(1, weight_bytes // max(1, T * E * 4))
    s = max(1, min(n_kb, want, cap, S_MAX))
    kb = triton.cdiv(n_kb, s)
    return GatePlan(block_t=block_t, block_e=block_e, block_k=block_k,
                    splits=triton.cdiv(n_kb, kb), kb_per_split=kb,
                    num_stages=2 if amd else 3)


PLAN_ENV = "ROCM_MOE_GATE_PLAN"  # a plan_from_spec string for every call (bench sweeps)
# Measured plans by gate shape: (E, H) -> ((T_max, spec), ...) in increasing T_max; a call
# with T <= T_max takes the first such spec (else gate_plan's). Filled from
# bench/router_plans.py's "best plan per size" on an H100 (bench/gpu_router_dsv3.sh; at
# b13d4a4: bench/results/router_plans_h100.txt, gate + route 6.9-8.3 us for DeepSeek-V3,
# 4.6-5.6 us for Qwen3, against 7.5-10.8 and 5.1-6.3 with gate_plan's plans).
# Measured on an H100 (bench/results/router_plans_5dbd0b3_h100.txt, 200 replays of 20 calls a
# graph): "pdl pdlin" was the fastest at every size of both gates (DeepSeek-V3 6.7 / 6.9 / 7.6 /
# 8.0 us at 1 / 8 / 64 / 128 tokens, Qwen3 4.5 / 4.7 / 5.0 / 5.3).
TUNED: dict[tuple[int, int], tuple[tuple[int, str], ...]] = {
    (256, 7168): ((8, "pdl pdlin"), (128, "t64 e64 s16 pdl pdlin")),  # DeepSeek-V3
    (128, 2048): ((64, "pdl pdlin"), (128, "t64 e64 pdl pdlin")),  # Qwen3-30B-A3B
}


def default_spec(T: int, E: int, H: int, device: torch.device | None = None) -> str:
    """The spec ``gate_route`` uses without a plan: ``ROCM_MOE_GATE_PLAN`` if set, else the
    ``TUNED`` entry of this (E, H) for T (measured on an H100: used on NVIDIA sm_90+ only;
    ``device`` None: assumed so), else "" (``gate_plan``'s)."""
    env = os.environ.get(PLAN_ENV)
    if env is not None:
        return env
    if torch.version.hip is not None or (device is not None and not _sm90(device)):
        return ""
    return next((spec for t_max, spec in TUNED.get((E, H), ()) if T <= t_max), "")


@functools.lru_cache(maxsize=16)
def _sm90(device: torch.device) -> bool:
    """Whether ``device`` is an NVIDIA GPU of compute capability 9.0+ (PDL, TUNED)."""
    return device.type == "cuda" and torch.version.hip is None and \
        torch.cuda.get_device_capability(device)[0] >= 9


def _compiled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are compiled for a GPU (not run in Triton's interpreter)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be programmatic dependent launches: compiled (not
    Triton's interpreter) for an NVIDIA GPU of compute capability 9.0+."""
    return _compiled(device) and _sm90(device)


_POW2_FIELDS = {"t": "block_t", "e": "block_e", "k": "block_k"}
_INT_FIELDS = {"s": "splits", "w": "num_warps", "n": "num_stages", "rr": "route_rows",
               "rw": "route_warps"}


def _spec_fields(spec: str) -> dict:
    """``"t64 e64 s8 pdl"`` -> {"block_t": 64, "block_e": 64, "splits": 8, "pdl": True}."""
    fields: dict = {}
    for word in spec.replace(",", " ").split():
        if word in ("auto", ""):
            continue
        if word in ("pdl", "pdlin"):
            fields["pdl_in" if word == "pdlin" else word] = True
            continue
        key = word.rstrip("0123456789")
        num = word[len(key):]
        name = _POW2_FIELDS.get(key) or _INT_FIELDS.get(key)
        if name is None or not num:
            raise ValueError(error_message(
                "gate plan", repr(word), "must be t<int> e<int> k<int> (tiles), s<int> "
                "(splits of H), w<int> n<int> (GEMM warps, stages), rr<int> rw<int> (router "
                "rows per program, warps), pdl or pdlin", f"fix {PLAN_ENV} or the spec"))
        value = int(num)
        ok = {"block_t": (16, 256), "block_e": (16, 256), "block_k": (16, 512),
              "splits": (1, 1024), "num_warps": (1, 16), "num_stages": (1, 8),
              "route_rows": (1, 256), "route_warps": (1, 16)}[name]
        pow2 = name != "splits" and name != "num_stages"
        if not ok[0] <= value <= ok[1] or (pow2 and value & (value - 1)):
            raise ValueError(error_message(
                f"gate plan {name}", value, f"must be {'a power of two ' if pow2 else ''}"
                f"in [{ok[0]}, {ok[1]}]", f"fix {PLAN_ENV} or the spec"))
        if name == "route_rows" and value == 2:
            raise ValueError(error_message("gate plan route_rows", 2, ROWS_2_RULE,
                                           f"use rr1 or rr4 and up in {PLAN_ENV} or the spec"))
        fields[name] = value
    return fields


@functools.lru_cache(maxsize=256)
def plan_from_spec(spec: str, T: int, E: int, H: int, *, ieee_fp32: bool, sms: int,
                   amd: bool) -> GatePlan:
    """``gate_plan``'s plan with the fields a spec names changed: ``t`` ``e`` ``k`` the tiles
    (the splits then follow ``gate_plan``'s rule), ``s`` the splits of H (whole k blocks each:
    the count may come out lower), ``w`` ``n`` the GEMM's warps and stages, ``rr`` ``rw`` the
    router's rows per program and warps, ``pdl`` the router as a programmatic dependent launch
    (NVIDIA only). ``"auto"`` or ``""``: ``gate_plan``'s. Also read from the environment
    variable ``ROCM_MOE_GATE_PLAN`` by ``gate_route`` (the bench's sweeps).

    Example (a test asserts it): "t64 e64 s8 pdl" at T = 128, E = 256, H = 7168, bf16 ->
    64 x 64 tiles, 64-wide k blocks (gate_plan's for 64-row tiles), 8 splits of 14 blocks."""
    f = _spec_fields(spec)
    for word, name in (("pdl", "pdl"), ("pdlin", "pdl_in")):
        if f.get(name) and amd:
            raise ValueError(error_message(f"gate plan {word}", True, "is NVIDIA's programmatic "
                                           "dependent launch (sm_90+)",
                                           f"drop {word} from {PLAN_ENV}"))
    plan = gate_plan(T, E, H, ieee_fp32=ieee_fp32, sms=sms, amd=amd,
                     block_e=f.get("block_e"), block_t=f.get("block_t"),
                     block_k=f.get("block_k"))
    if "splits" in f:
        n_kb = triton.cdiv(H, plan.block_k)
        kb = triton.cdiv(n_kb, min(f["splits"], n_kb))
        plan = replace(plan, splits=triton.cdiv(n_kb, kb), kb_per_split=kb)
    rest = {k: v for k, v in f.items() if k not in ("block_t", "block_e", "block_k", "splits")}
    plan = replace(plan, **rest)
    return plan


def gate_route(*, x_TH: torch.Tensor, weight_EH: torch.Tensor, config,
               bias_E: torch.Tensor | None = None, plan: GatePlan | None = None,
               warp: int | None = None):
    """Gate GEMM + router in two launches -> (``RoutingResult``, logits [T, E]). The logits
    are float32 where ``config.logits_in_float32`` (DeepSeek-V3's sigmoid routers), else in
    x's dtype (rounded once from the float32 sum, as a bf16 GEMM rounds its accumulator).
    Nothing is checked here (``routing.gate_route`` checks the inputs); ``plan`` overrides
    ``gate_plan`` (the bench's sweep).

    Args:
        x_TH: [T, H] float16 / bfloat16 / float32 hidden states, unit stride along H.
        weight_EH: [E, H] float16 / bfloat16 / float32 gate weight as stored, unit stride
            along H.
        config: the ``RouterConfig`` (within ``_routing_triton.config_unsupported``).
        bias_E: [E] floating ``e_score_correction_bias``, or None.

    Example (a test asserts it): x [[1, 2]], weight [[3, 4], [5, 6]], softmax, K = 1, no
    normalisation -> logits [[11, 17]], ids [[1]].
    """
    from rocm_moe._routing_triton import splitk_route

    T, H = x_TH.shape
    E = weight_EH.shape[0]
    dev = x_TH.device
    fp32 = ieee(x_TH.dtype, weight_EH.dtype)
    out_dtype = torch.float32 if config.logits_in_float32 or x_TH.dtype == torch.float32 \
        else x_TH.dtype
    if plan is None:
        plan = plan_from_spec(default_spec(T, E, H, dev), T, E, H, ieee_fp32=fp32,
                              sms=_sm_count(dev), amd=torch.version.hip is not None)
    part = torch.empty(plan.splits, T, E, dtype=torch.float32, device=dev)
    logits = torch.empty(T, E, dtype=out_dtype, device=dev)
    compiled = _compiled(dev)
    pdl, pdl_in = plan.pdl and compiled, plan.pdl_in and compiled
    for word, on in (("pdl", pdl), ("pdlin", pdl_in)):
        if on and not _sm90(dev):
            raise ValueError(error_message(f"gate plan {word}", True, "needs an NVIDIA GPU of "
                                           f"compute capability 9.0+ ({dev} is not)",
                                           f"drop {word} from {PLAN_ENV} or the plan"))
    if T > 0:
        gate_gemm(x_TH, weight_EH, part, plan, pdl=pdl, pdl_in=pdl_in)
    routing = splitk_route(part_STE=part, logits_TE=logits, config=config, bias_E=bias_E,
                           warp=warp, rows=plan.route_rows, num_warps=plan.route_warps,
                           pdl=pdl and T > 0)
    return routing, logits


def gate_gemm(x_TH: torch.Tensor, weight_EH: torch.Tensor, part_STE: torch.Tensor,
              plan: GatePlan, *, pdl: bool = False, pdl_in: bool = False) -> None:
    """The split-K gate GEMM alone: fills ``part_STE`` [plan.splits, T, E] float32 with
    ``plan`` (``pdl``: lets a router launched with ``launch_pdl=True`` start early;
    ``pdl_in``: itself launched so, behind whatever wrote x)."""
    (T, H), E = x_TH.shape, weight_EH.shape[0]
    extra = dict(launch_pdl=True) if pdl_in else {}
    _gate_splitk_kernel[plan.grid(T, E)](
        x_TH, weight_EH, part_STE, T, H, x_TH.stride(0), weight_EH.stride(0),
        plan.kb_per_split, E=E, BLOCK_T=plan.block_t, BLOCK_E=plan.block_e,
        BLOCK_K=plan.block_k, IEEE=ieee(x_TH.dtype, weight_EH.dtype), PDL=pdl, PDL_IN=pdl_in,
        num_warps=plan.num_warps, num_stages=plan.num_stages, **extra)
