"""Triton kernel behind ``routing.route`` on GPUs (imported only where triton is installed): the
whole router after the gate GEMM in one launch, one program per token (``rows`` per program
under the interpreter).

    logits [T, E] -> softmax | sigmoid (+ e_score_correction_bias) -> grouped top-k
                  -> top-k (ties to the lower id) -> gather -> norm_topk_prob
                  -> routed_scaling_factor -> weights [T, K] float32, ids [T, K] int32

It computes the bits of the torch path (``routing._route_torch``) on CUDA, where that path is
deterministic (no tied scores), by doing each float operation the torch kernels do, in their
order:

- softmax as PyTorch's persistent warp softmax (``PersistentSoftmax.cuh``, E <= 1024): the
  max, e = exp(x - max) with the C library's ``expf`` (libdevice's, not the fast ``ex2``
  approximation ``tl.exp`` lowers to), per lane l of a WARP-wide warp the sum over
  it = 0, 1, ... of e[it * WARP + l] in order, then the butterfly: lanes l and l + n / 2
  added, n halving, so the lane sums add as a tree of halves; p = e / sum rounded as IEEE
  division (``div_rn``; ``/`` on float32 is approximate in Triton).
- sigmoid as ``1 / (1 + expf(-x))`` (PyTorch's CUDA sigmoid), IEEE division.
- the K gathered weights summed as PyTorch's CUDA reduction (``Reduce.cuh``) sums a row of
  K < 64 contiguous floats: BW = the largest power of two <= K lanes, lane l holding
  w[l] + w[l + BW] (w[l] when l + BW >= K), the lanes added as a tree of halves (lanes l and
  l + n / 2, n halving: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) for 8 lanes; torch
  2.11 on an H100 sums so for K = 2..16, ``bench/router_bits.py``); then w / (sum + eps)
  (IEEE) and w * routed_scaling_factor.
- a group's score is the sum of its two largest choice scores (one addition: no order).

The top-k is one (key, index) max per pick over the flat expert positions, the key being the
choice score's bits as an int32 ordered as the floats (taken and padded positions lowest), and
the K weights are gathered in one reduction after the picks.

``_splitk_router_kernel`` is the same router on split-K partial gate logits [S, T, E]
(``rocm_moe._gate_triton``): it sums them in order (part[0] + part[1] + ..., loaded 8 at a
time), rounds them to the logits' dtype, writes the logits and routes them.

Ties (equal scores, e.g. two equal bfloat16 logits) go to the lower expert id (and, for
groups, the lower group id); ``torch.topk`` leaves them to its implementation. A NaN score
ranks above every number, as in ``torch.topk``; the ids stay distinct and in [0, E) whatever
the logits hold. No host read: capturable in a CUDA graph.

Under Triton's interpreter (CPU tests) ``exp`` is numpy's and division numpy's, so there the
kernel computes this order with numpy's ``exp``; the tests compare it with a torch emulation
of the same order and the same ``exp``, and on GPUs with the torch path itself.

On AMD (gfx942) the same code keeps the order of torch's ROCm kernels (a softmax warp of 64,
HIP's ``expf`` from ocml through libdevice); it compiles there (``rocm_moe._compile``), but the
GPU tests that compare its bits with torch's (``tests/test_routing_triton.py -m gpu``) were
written against NVIDIA's torch and have not run on an MI300.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rocm_moe._checks import error_message
from rocm_moe._libs import triton_runs_on

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _expf(x):
    """The C library's expf: libdevice's (CUDA and HIP) when compiled, numpy's when
    interpreted (libdevice does not run there)."""
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _grid_wait():
    """PTX ``griddepcontrol.wait``: block until the grid this one programmatically depends on
    (launched with ``launch_pdl=True`` after it) has finished and its writes are visible. Only
    traced where the caller's PDL constexpr is set (NVIDIA sm_90+, compiled: never under the
    interpreter or on AMD)."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _grid_launch_dependents():
    """PTX ``griddepcontrol.launch_dependents``: the grid launched after this one with
    ``launch_pdl=True`` may start now (it waits in ``_grid_wait`` for this one's writes)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _halves_tree(v, ROWS: tl.constexpr, N: tl.constexpr):
    """Per row, the sum of the N (a power of two) values of v [ROWS, N] as a tree of halves:
    v[l] + v[l + N / 2] for l < N / 2, again until one is left (a warp's butterfly). -> [ROWS].
    """
    for s in tl.static_range(N.bit_length() - 1):
        v = tl.sum(tl.reshape(v, [ROWS, 2, N >> (s + 1)]), axis=1)
    return tl.sum(v, axis=1)  # one value: exact


@triton.jit
def _max2(v):
    return tl.max(tl.max(v, axis=2), axis=1)


@triton.jit
def _route_rows(x, row, live, r3, j, gid, valid, bias_ptr, w_ptr, ids_ptr, eps, scale,
                EPG: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                NORM: tl.constexpr, K_TOPK: tl.constexpr, K_POW2: tl.constexpr, BW: tl.constexpr,
                N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, EPG_POW2: tl.constexpr,
                G_POW2: tl.constexpr, WARP: tl.constexpr, ROWS: tl.constexpr):
    """The router on float32 logits x [ROWS, G_POW2, EPG_POW2] (-inf where not ``valid``, 0
    in rows past T): scores, choice, groups, top-k, weights; stores w and ids of live rows."""
    if SIGMOID:
        score = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + _expf(-x))
        if HAS_BIAS:
            bias = tl.load(bias_ptr + gid + r3 * 0, mask=valid, other=0.0)
            choice = score + bias.to(tl.float32)
        else:
            choice = score
    else:
        E_POW2: tl.constexpr = G_POW2 * EPG_POW2
        e = _expf(x - _max2(x)[:, None, None])  # padding: exp(-inf) = 0
        lanes = tl.reshape(e, [ROWS, E_POW2 // WARP, WARP])  # [., it, l] = e[it * WARP + l]
        it = tl.arange(0, E_POW2 // WARP)[None, :, None]
        acc = tl.zeros([ROWS, WARP], tl.float32)
        for i in tl.static_range(E_POW2 // WARP):  # row i picked exactly (zeros elsewhere)
            acc += tl.sum(tl.where(it == i, lanes, 0.0), axis=1)
        total = _halves_tree(acc, ROWS, WARP)
        score = tl.math.div_rn(e, tl.zeros(e.shape, tl.float32) + total[:, None, None])
        choice = score
    choice = tl.where(valid, tl.where(choice != choice, float("inf"), choice), -float("inf"))

    if TOPK_GROUP < N_GROUP:  # grouped top-k: keep the TOPK_GROUP best groups
        top1, j1 = tl.max(choice, axis=2, return_indices=True,
                          return_indices_tie_break_left=True)  # j1: its lowest j
        top2 = tl.max(tl.where(j == j1[:, :, None], -float("inf"), choice), axis=2)
        gscore = top1 + top2  # [ROWS, G_POW2]
        gscore = tl.where(gscore != gscore, float("inf"), gscore)
        gs = tl.arange(0, G_POW2)[None, :]
        gfree = (gs < N_GROUP) & live[:, None]
        keep = gs < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(tl.where(gfree, gscore, -float("inf")), axis=1)
            pick = tl.min(tl.where(gfree & (gscore == best[:, None]), gs, G_POW2), axis=1)
            keep |= gs == pick[:, None]
            gfree &= gs != pick[:, None]
        choice = tl.where(keep[:, :, None], choice, -float("inf"))

    # Top-k: one (key, index) reduction per pick over the flat [G_POW2 * EPG_POW2] positions
    # (flat = g * EPG_POW2 + j, in the order of the ids). key: choice's bits ordered as the
    # floats (-0.0 as +0.0, NaN already +inf), the smallest int32 for taken and padded
    # positions, so the pick is the largest free choice, ties to the lowest id, and a free
    # expert even where every free choice is -inf (the ids stay distinct).
    E_FLAT: tl.constexpr = G_POW2 * EPG_POW2
    bits = choice.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(bits == -2147483648, 0, key)  # -0.0 ties with +0.0
    key = tl.reshape(tl.where(valid, key, -2147483648), [ROWS, E_FLAT])
    flat = tl.arange(0, E_FLAT)[None, :]
    kk = tl.arange(0, K_POW2)[None, :]
    picks = tl.full([ROWS, K_POW2], -1, tl.int32)  # flat positions (-1: k >= K_TOPK)
    for k in tl.static_range(K_TOPK):
        _, at = tl.max(key, axis=1, return_indices=True, return_indices_tie_break_left=True)
        key = tl.where(flat == at[:, None], -2147483648, key)
        picks = tl.where(kk == k, at[:, None].to(tl.int32), picks)
    ids = (picks // EPG_POW2) * EPG + picks % EPG_POW2
    hit = flat[:, None, :] == picks[:, :, None]  # [ROWS, K_POW2, E_FLAT]: one position each
    w = tl.sum(tl.where(hit, tl.reshape(score, [ROWS, E_FLAT])[:, None, :], 0.0),
               axis=2)  # one term: exact

    if NORM:
        lanes_k = tl.sum(tl.reshape(w, [ROWS, K_POW2 // BW, BW]), axis=1)  # w[l] + w[l + BW]
        # then lanes l and l + n / 2, n halving: torch 2.11's CUDA sum of K contiguous floats
        # (measured on an H100 for K = 2..16, bench/results/router_bits_h100.txt)
        total_k = tl.where(live, _halves_tree(lanes_k, ROWS, BW) + eps, 1.0)
        w = tl.math.div_rn(w, tl.zeros(w.shape, tl.float32) + total_k[:, None])
    w = w * scale
    out = row[:, None].to(tl.int64) * K_TOPK + kk
    tl.store(w_ptr + out, w, mask=live[:, None] & (kk < K_TOPK))
    tl.store(ids_ptr + out, ids, mask=live[:, None] & (kk < K_TOPK))


@triton.jit(do_not_specialize=["T"])
def _router_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, stride_t, eps, scale,
                   SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                   K_TOPK: tl.constexpr, K_POW2: tl.constexpr, BW: tl.constexpr,
                   N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, EPG: tl.constexpr,
                   G_POW2: tl.constexpr, EPG_POW2: tl.constexpr, WARP: tl.constexpr,
                   ROWS: tl.constexpr):
    """Rows [pid * ROWS, pid * ROWS + ROWS) of logits [T, E] (row stride ``stride_t``, any
    float dtype) -> w [T, K] float32 and ids [T, K] int32 (contiguous). A row's experts are a
    [N_GROUP, EPG] tile (N_GROUP groups of EPG experts; 1 ungrouped), padded to
    [G_POW2, EPG_POW2]. SIGMOID: sigmoid scores, else softmax (N_GROUP must be 1: the
    softmax's lanes are the flat ids). With TOPK_GROUP < N_GROUP the TOPK_GROUP groups with the
    largest top-2 sum of choice = score + bias are kept. BW: the largest power of two <= K_TOPK,
    K_POW2: the smallest >= it; WARP: the torch softmax's warp width (min(E_POW2, 32) on
    NVIDIA, 64 on AMD). eps, scale: float32. A row's bits do not depend on ROWS (2 is refused:
    miscompiled on an H100, ``ROWS_2_RULE``).

    Example: logits [[0, 0, log(2)]], softmax, K = 1, no normalisation -> w [[0.5]],
    ids [[2]]."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = row < T
    r3 = row[:, None, None].to(tl.int64)
    g = tl.arange(0, G_POW2)[None, :, None]
    j = tl.arange(0, EPG_POW2)[None, None, :]
    gid = g * EPG + j  # [1, G_POW2, EPG_POW2] expert ids
    valid = (g < N_GROUP) & (j < EPG) & live[:, None, None]  # [ROWS, G_POW2, EPG_POW2]
    x = tl.load(logits_ptr + r3 * stride_t + gid, mask=valid, other=-float("inf"))
    x = tl.where(live[:, None, None], x.to(tl.float32), 0.0)  # rows past T: finite, unstored
    _route_rows(x, row, live, r3, j, gid, valid, bias_ptr, w_ptr, ids_ptr, eps, scale, EPG,
                SIGMOID, HAS_BIAS, NORM, K_TOPK, K_POW2, BW, N_GROUP, TOPK_GROUP, EPG_POW2,
                G_POW2, WARP, ROWS)


@triton.jit(do_not_specialize=["T", "S"])
def _splitk_router_kernel(part_ptr, bias_ptr, logits_ptr, w_ptr, ids_ptr, T, S, eps, scale,
                          ROUND: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                          NORM: tl.constexpr, K_TOPK: tl.constexpr, K_POW2: tl.constexpr,
                          BW: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                          EPG: tl.constexpr, G_POW2: tl.constexpr, EPG_POW2: tl.constexpr,
                          WARP: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr = False):
    """The router of ``_router_kernel`` on gate logits given as S split-K partial sums
    ``part`` [S, T, E] float32 (``rocm_moe._gate_triton``): a row's logits are
    ((part[0] + part[1]) + part[2]) + ... in this fixed order (deterministic: no atomics),
    rounded once to bfloat16 (ROUND = 1) or float16 (ROUND = 2) where the router's logits are
    in the model dtype (0: kept in float32), stored to ``logits`` [T, E] (its dtype; the
    layer's value checks read them), then routed as ``_router_kernel`` routes them. PDL: launched
    with ``launch_pdl=True`` right behind the gate GEMM (NVIDIA): wait for it before the loads;
    then a kernel launched so behind this one (the small-batch experts) may start (it waits
    for this grid before reading the routing).

    Example: part [[[1, 0]], [[2, 5]]] (S = 2, T = 1, E = 2), softmax, K = 1 -> logits
    [[3, 5]], ids [[1]]."""
    if PDL:
        _grid_wait()
        _grid_launch_dependents()
    E: tl.constexpr = N_GROUP * EPG
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = row < T
    r3 = row[:, None, None].to(tl.int64)
    g = tl.arange(0, G_POW2)[None, :, None]
    j = tl.arange(0, EPG_POW2)[None, None, :]
    gid = g * EPG + j
    valid = (g < N_GROUP) & (j < EPG) & live[:, None, None]
    step = T.to(tl.int64) * E
    x = tl.zeros([ROWS, G_POW2, EPG_POW2], tl.float32)
    base = part_ptr + r3 * E + gid
    for c in range(0, S, 8):  # 8 loads in flight, then added in order (L2 latency once)
        p = base + c * step
        left = r3 * 0 + S - c  # partials left from c on ([ROWS, 1, 1]: a tensor mask)
        p0 = tl.load(p, mask=valid, other=0.0)
        p1 = tl.load(p + step, mask=valid & (left > 1), other=0.0)
        p2 = tl.load(p + 2 * step, mask=valid & (left > 2), other=0.0)
        p3 = tl.load(p + 3 * step, mask=valid & (left > 3), other=0.0)
        p4 = tl.load(p + 4 * step, mask=valid & (left > 4), other=0.0)
        p5 = tl.load(p + 5 * step, mask=valid & (left > 5), other=0.0)
        p6 = tl.load(p + 6 * step, mask=valid & (left > 6), other=0.0)
        p7 = tl.load(p + 7 * step, mask=valid & (left > 7), other=0.0)
        x = (((((((x + p0) + p1) + p2) + p3) + p4) + p5) + p6) + p7  # (+ 0.0 past S: exact)
    if ROUND == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    tl.store(logits_ptr + r3 * E + gid, x.to(logits_ptr.dtype.element_ty), mask=valid)
    x = tl.where(valid, x, -float("inf"))
    x = tl.where(live[:, None, None], x, 0.0)  # rows past T: finite, unstored
    _route_rows(x, row, live, r3, j, gid, valid, bias_ptr, w_ptr, ids_ptr, eps, scale, EPG,
                SIGMOID, HAS_BIAS, NORM, K_TOPK, K_POW2, BW, N_GROUP, TOPK_GROUP, EPG_POW2,
                G_POW2, WARP, ROWS)


_MAX_E = 1024  # PyTorch's persistent warp softmax (whose order the kernel keeps) ends there
_MAX_K = 32  # Reduce.cuh: a lane holds at most two of the K weights up to 63; 32 is plenty


def config_unsupported(config) -> str | None:
    """Why the Triton router cannot compute this ``RouterConfig`` at all, or None."""
    if config.num_experts > _MAX_E:
        return f"num_experts={config.num_experts} > {_MAX_E}"
    if config.top_k > _MAX_K:
        return f"top_k={config.top_k} > {_MAX_K}"
    if getattr(config, "score_after_topk", False):
        return "score_after_topk (gpt-oss, Llama 4) is not implemented in the fused router"
    if config.scoring == "softmax" and getattr(config, "choice_bias", False):
        return "a softmax router's choice bias (ERNIE 4.5) is not implemented in the fused router"
    return None


def fused_route_unsupported(logits_TE: torch.Tensor, config) -> str | None:
    """Why ``fused_route`` cannot route these logits with this ``RouterConfig``, or None."""
    if logits_TE.dim() != 2 or logits_TE.shape[1] != config.num_experts:
        return f"logits must be [T, E={config.num_experts}], got {list(logits_TE.shape)}"
    if logits_TE.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"logits dtype {logits_TE.dtype} (float16, bfloat16 or float32 only)"
    if logits_TE.stride(1) != 1:
        return "logits rows must be contiguous (stride 1 along E)"
    if (why := config_unsupported(config)) is not None:
        return why
    if not triton_runs_on(logits_TE.device):  # last: what the config rules out comes first
        return (f"logits on {logits_TE.device}: Triton runs on CUDA/ROCm devices (or under "
                "TRITON_INTERPRET=1)")
    return None


def _check_bias(bias_E, logits_TE: torch.Tensor, num_experts: int) -> None:
    """bias_E: None, or a floating [E] tensor on the logits' device (the kernel reads E
    values from it: a shorter one was read out of bounds)."""
    if bias_E is None:
        return
    if not isinstance(bias_E, torch.Tensor) or not bias_E.is_floating_point() \
            or tuple(bias_E.shape) != (num_experts,):
        got = f"{list(bias_E.shape)} {bias_E.dtype}" if isinstance(bias_E, torch.Tensor) \
            else type(bias_E).__name__
        raise ValueError(error_message("bias_E", got, f"must be a floating [E={num_experts}] "
                                       "tensor", "pass the layer's e_score_correction_bias"))
    if bias_E.device != logits_TE.device:
        raise ValueError(error_message("bias_E.device", str(bias_E.device), "must be the "
                                       f"logits' device ({logits_TE.device})",
                                       "move it with bias_E.to(logits.device)"))


def _warp_width(device: torch.device) -> int:
    """PyTorch's C10_WARP_SIZE on ``device``: 32 on NVIDIA, 64 on CDNA (gfx9)."""
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    width = getattr(props, "warp_size", None)
    return int(width) if width else (64 if torch.version.hip else 32)


def _exact_options() -> dict:
    """No contraction of a multiply into a later add (torch's kernels round each operation
    here; expf's own FMAs are written as FMAs) and, on NVIDIA, libdevice's expf without
    flushing denormals (torch is built without -ftz)."""
    options = dict(enable_fp_fusion=False)
    if torch.version.hip is None:
        options["enable_reflect_ftz"] = False
    return options


def _default_rows() -> int:
    """Tokens per program: 1 on GPUs, 64 under the interpreter (where each program's
    operations cost the same for 1 or 64 rows)."""
    return 64 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_config(config, *, has_bias: bool, warp: int) -> tuple[dict, int]:
    """(constexprs, num_warps) of ``_router_kernel`` for a ``RouterConfig`` on a device whose
    torch softmax runs ``warp`` lanes wide (``rocm_moe._compile`` compiles these too)."""
    E, K, G = config.num_experts, config.top_k, config.n_group
    e_pow2 = _pow2(E)
    constexprs = dict(
        SIGMOID=config.scoring == "sigmoid", HAS_BIAS=has_bias, NORM=config.norm_topk_prob,
        K_TOPK=K, K_POW2=_pow2(K), BW=1 << (K.bit_length() - 1), N_GROUP=G,
        TOPK_GROUP=config.topk_group, EPG=E // G, G_POW2=_pow2(G), EPG_POW2=_pow2(E // G),
        WARP=min(e_pow2, warp))
    return constexprs, 1 if e_pow2 <= 256 else 4


def fused_route(*, logits_TE: torch.Tensor, config, bias_E: torch.Tensor | None = None,
                warp: int | None = None, rows: int | None = None):
    """``routing.route`` for [T, E] logits in one launch: -> ``RoutingResult`` with [T, K]
    float32 weights and [T, K] int32 ids, the torch path's bits on CUDA (see the module
    docstring). No host read (capturable in a CUDA graph); nothing is validated here beyond
    ``fused_route_unsupported`` (``route`` checks the inputs).

    Args:
        logits_TE: [T, E] float16 / bfloat16 / float32 gate logits, rows contiguous.
        config: the ``RouterConfig``.
        bias_E: [E] floating ``e_score_correction_bias`` (sigmoid routers), or None (zeros).
        warp: the warp width of the torch softmax whose order is kept (default: the
            device's, 32 on NVIDIA, 64 on AMD CDNA).
        rows: tokens per program, 1 or a power of two >= 4 (default 1 on GPUs, 64 under
            the interpreter, where each program's operations cost the same for 1 or 64 rows;
            2 is refused: miscompiled for grouped routers on an H100 with Triton 3.6).

    Example (a test asserts it): logits [[0, 0, log(2)]], softmax, K = 1,
    norm_topk_prob=False -> weights [[0.5]], ids [[2]].
    """
    from rocm_moe.routing import RoutingResult

    _check_bias(bias_E, logits_TE, config.num_experts)
    why = fused_route_unsupported(logits_TE, config)
    if why is not None:
        raise ValueError(error_message("fused_route", why, "is outside the fused router",
                                       "call routing.route, which falls back to torch"))
    T = logits_TE.shape[0]
    w, ids, grid, kw = _launch(T, config, bias_E, logits_TE.device, warp, rows)
    if T:
        _router_kernel[grid](
            logits_TE, bias_E if bias_E is not None else logits_TE,  # (unread without HAS_BIAS)
            w, ids, T, logits_TE.stride(0), *_scalars(config), **kw)
    return RoutingResult(topk_weights=w, topk_ids=ids)


# 2 rows per program: every row of DeepSeek-V3's grouped router came out wrong on an H100
# (Triton 3.6), in both router kernels and with any warps; 1, 4, 8 and 16 rows, and the router
# without groups, exact (bench/results/router_rows_h100.txt; other routers were not reached).
ROWS_2_RULE = ("is refused: 2 rows per program routed every row of DeepSeek-V3's grouped router "
               "wrongly on an H100 with Triton 3.6 (bench/results/router_rows_h100.txt)")


def _launch(T: int, config, bias_E, device, warp: int | None, rows: int | None,
            num_warps: int | None = None):
    """What both router launches share: (the [T, K] float32 weights and int32 ids to fill, the
    grid, the launch keywords: rows per program, warps (``num_warps``: launch_config's where
    None), the config's constexprs, exact math)."""
    if rows == 2:
        raise ValueError(error_message("router rows", rows, ROWS_2_RULE,
                                       "use 1 or a power of two >= 4"))
    K = config.top_k
    w = torch.empty(T, K, dtype=torch.float32, device=device)
    ids = torch.empty(T, K, dtype=torch.int32, device=device)
    constexprs, warps = launch_config(config, has_bias=bias_E is not None,
                                      warp=warp or _warp_width(device))
    rows = rows or _default_rows()
    kw = dict(ROWS=rows, num_warps=num_warps or warps, **constexprs, **_exact_options())
    return w, ids, (triton.cdiv(T, rows),), kw


def _scalars(config) -> tuple[float, float]:
    """The kernels' (norm epsilon, routed scaling) arguments."""
    return 1e-20 if config.scoring == "sigmoid" else 0.0, float(config.routed_scaling_factor)


_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def splitk_route(*, part_STE: torch.Tensor, logits_TE: torch.Tensor, config,
                 bias_E: torch.Tensor | None = None, warp: int | None = None,
                 rows: int | None = None, num_warps: int | None = None, pdl: bool = False):
    """The router on split-K partial gate logits, one launch (``_splitk_router_kernel``): the
    partials ``part_STE`` [S, T, E] float32 (contiguous) are summed over S in order, rounded to
    ``logits_TE``'s dtype and written there (``logits_TE`` [T, E] contiguous float32, or
    bfloat16 / float16 for a router whose logits are in the model dtype), then routed as
    ``fused_route`` routes them -> ``RoutingResult``. No host read. Called by
    ``rocm_moe._gate_triton.gate_route``, which checks the arguments and chooses ``rows``
    (tokens per program), ``num_warps`` and ``pdl`` (NVIDIA only: a programmatic dependent
    launch behind the gate GEMM, which lets it start early; the bits do not depend on them).

    Example (a test asserts it): part [[[1, 0]], [[2, 5]]], softmax, K = 1 -> logits
    [[3, 5]], ids [[1]]."""
    from rocm_moe.routing import RoutingResult

    S, T = part_STE.shape[:2]
    w, ids, grid, kw = _launch(T, config, bias_E, part_STE.device, warp, rows, num_warps)
    if pdl:
        kw["launch_pdl"] = True
    if T:
        _splitk_router_kernel[grid](
            part_STE, bias_E if bias_E is not None else part_STE, logits_TE, w, ids, T, S,
            *_scalars(config), ROUND=_ROUND[logits_TE.dtype], PDL=pdl, **kw)
    return RoutingResult(topk_weights=w, topk_ids=ids)
