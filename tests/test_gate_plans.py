"""The Triton gate GEMM + router's selectable plans (``rocm_moe._gate_triton.plan_from_spec``,
``ROCM_MOE_GATE_PLAN``; bench/router_plans.py sweeps them): the spec's worked example, refusals
naming the field, the environment variable read by ``gate_route``, the router's rows / warps /
PDL changing no bit of the result, and PDL compiled to
``griddepcontrol`` on sm_90 only where asked (float16/float32 under the interpreter; the GPU
test in bf16 with a CUDA graph).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from rocm_moe import RouterConfig
from rocm_moe._libs import triton_runs_on
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="triton cannot run here")

DSV3 = RouterConfig.deepseek_v3(256, 8)


def _plan(spec: str, T: int = 128, *, amd: bool = False, fp32: bool = False):
    from rocm_moe._gate_triton import plan_from_spec

    return plan_from_spec(spec, T, 256, 7168, ieee_fp32=fp32, sms=132, amd=amd)


def test_spec_worked_example_and_round_trip():
    from rocm_moe._gate_triton import gate_plan

    p = _plan("t64 e64 s8 pdl")
    assert (p.block_t, p.block_e, p.block_k, p.splits, p.kb_per_split, p.pdl) == \
        (64, 64, 64, 8, 14, True)
    assert p.route_rows is None
    assert p.route_warps is None
    assert _plan("auto") == _plan("") == gate_plan(128, 256, 7168, ieee_fp32=False, sms=132,
                                                   amd=False)
    assert _plan("pdlin").pdl_in
    assert _plan(_plan("t16 pdl pdlin").spec) == _plan("t16 pdl pdlin")
    q = _plan("t32 e128 k64 s5 w8 n2 rr4 rw2")  # 112 k blocks in 5 splits: 23 each, 5 splits
    assert (q.block_t, q.block_e, q.block_k, q.splits, q.kb_per_split, q.num_warps,
            q.num_stages, q.route_rows, q.route_warps) == (32, 128, 64, 5, 23, 8, 2, 4, 2)
    assert _plan(q.spec) == q
    assert _plan("s1000").splits == 56  # at most one k block (of 128) per split
    assert _plan("t128,e32").grid(128, 256) == (8, _plan("t128,e32").splits, 1)


@pytest.mark.parametrize(("spec", "match"), [
    ("t48", r"block_t.*48.*power of two"),
    ("e8", r"block_e.*8.*\[16, 256\]"),
    ("s0", r"splits.*0"),
    ("x4", r"'x4'.*must be t<int>"),
    ("t", r"'t'.*must be"),
    ("rw3", r"route_warps.*3"),
])
def test_bad_specs_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        _plan(spec)


def test_two_router_rows_refused():
    """2 rows per program (miscompiled on an H100): refused in a plan spec and by the router's
    own launch, before anything runs."""
    from rocm_moe._routing_triton import fused_route

    with pytest.raises(ValueError, match=r"gate plan route_rows=2: is refused.*H100"):
        _plan("t32 rr2")
    with pytest.raises(ValueError, match=r"router rows=2: is refused.*1 or a power of two >= 4"):
        fused_route(logits_TE=torch.zeros(3, 256, device=DEVICE), config=DSV3, rows=2)
    assert _plan("t32 rr4").route_rows == 4


def test_pdl_refused_on_amd():
    with pytest.raises(ValueError, match=r"pdl.*NVIDIA"):
        _plan("pdl", amd=True)
    with pytest.raises(ValueError, match=r"pdlin.*NVIDIA"):
        _plan("t32 pdlin", amd=True)
    assert not _plan("t64", amd=True).pdl


def _inputs(T, H, dtype, gen):
    x = torch.randn(T, H, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(256, H, generator=gen) / math.sqrt(H)).to(dtype).to(DEVICE)
    return x, w, (torch.rand(256, generator=gen) * 0.1).to(DEVICE)


def _same(a, b) -> bool:
    (ra, la), (rb, lb) = a, b
    return torch.equal(la, lb) and torch.equal(ra.topk_ids, rb.topk_ids) and \
        torch.equal(ra.topk_weights, rb.topk_weights)


def test_router_launch_fields_change_no_bit(gen):
    """The same GEMM plan with other router rows / warps and PDL (ignored by the interpreter,
    a programmatic dependent launch on NVIDIA GPUs) gives the same bits; the plan from the
    environment is the one used."""
    from rocm_moe._gate_triton import PLAN_ENV, ieee, plan_from_spec
    from rocm_moe._gate_triton import gate_route as kernel

    T, H, dtype = 9, 96, torch.float16
    x, w, bias = _inputs(T, H, dtype, gen)
    kw = dict(x_TH=x, weight_EH=w, config=DSV3, bias_E=bias)
    sms = 132 if DEVICE.type == "cuda" else 8

    def plan(spec):
        return plan_from_spec(spec, T, 256, H, ieee_fp32=ieee(dtype, dtype), sms=sms,
                              amd=torch.version.hip is not None)

    base = kernel(**kw, plan=plan("t32 e32 s2"))
    for spec in ("t32 e32 s2 rr1 rw1", "t32 e32 s2 rr4 rw2",
                 "t32 e32 s2 pdl pdlin" if torch.version.hip is None else "t32 e32 s2 rr8"):
        assert _same(kernel(**kw, plan=plan(spec)), base), spec
    old = os.environ.get(PLAN_ENV)
    try:
        os.environ[PLAN_ENV] = "t32 e32 s2 rr16"
        assert _same(kernel(**kw), base)
        os.environ[PLAN_ENV] = "t32 e32 s2 rr2"  # miscompiled on an H100 (Triton 3.6)
        with pytest.raises(ValueError, match=r"gate plan route_rows=2: is refused.*rr1 or rr4"):
            kernel(**kw)
        os.environ[PLAN_ENV] = "t32 e32 s3"  # another split of H: another float32 order
        other = kernel(**kw)
        torch.testing.assert_close(other[1], base[1], rtol=0,
                                   atol=1e-6 * float(base[1].abs().max()))
        os.environ[PLAN_ENV] = "t32 q2"
        with pytest.raises(ValueError, match=r"gate plan.*'q2'"):
            kernel(**kw)
    finally:
        if old is None:
            os.environ.pop(PLAN_ENV, None)
        else:
            os.environ[PLAN_ENV] = old


def test_tuned_table_and_environment(monkeypatch):
    """``default_spec``: the environment variable first, then the TUNED entry of the gate's
    (E, H) whose T_max covers T, else gate_plan's ("")."""
    from rocm_moe import _gate_triton as gt

    monkeypatch.delenv(gt.PLAN_ENV, raising=False)
    monkeypatch.setattr(gt, "TUNED", {(256, 7168): ((8, "e32 pdl"), (128, "t64 e64 s16"))})
    nvidia = torch.version.hip is None
    assert gt.default_spec(1, 256, 7168) == ("e32 pdl" if nvidia else "")
    assert gt.default_spec(9, 256, 7168) == ("t64 e64 s16" if nvidia else "")
    assert gt.default_spec(129, 256, 7168) == ""
    assert gt.default_spec(1, 128, 2048) == ""
    assert gt.default_spec(1, 256, 7168, torch.device("cpu")) == ""  # measured on sm_90
    monkeypatch.setenv(gt.PLAN_ENV, "t16")
    assert gt.default_spec(1, 256, 7168) == "t16"
    assert gt.default_spec(1, 256, 7168, torch.device("cpu")) == "t16"


def test_tuned_entries_parse_in_order():
    """Each measured TUNED spec is a valid plan for its gate shape, T_max increasing."""
    from rocm_moe._gate_triton import TUNED, plan_from_spec

    for (E, H), entries in TUNED.items():
        t_max = [t for t, _ in entries]
        assert t_max == sorted(set(t_max)), (E, H)
        for t, spec in entries:
            plan = plan_from_spec(spec, t, E, H, ieee_fp32=False, sms=132, amd=False)
            assert plan.spec == plan_from_spec(plan.spec, t, E, H, ieee_fp32=False, sms=132,
                                               amd=False).spec, spec


# (router, T, dtype, spec): DeepSeek-V3's groups and bias, Qwen3's softmax and rounded logits,
# a 3-group router with float32 operands; the router 4-16 rows per program.
ROWS = [("dsv3", 33, torch.float16, "t16 e32 s2 rr8"),
        ("dsv3", 33, torch.float16, "t32 e64 s3 rr16"),
        ("qwen3", 9, torch.float16, "t16 e64 s2 rr4"), ("g3", 17, torch.float32, "t16 e32 rr4")]
CONFIGS = {"dsv3": DSV3, "qwen3": RouterConfig.qwen3_moe(128, 8),
           "g3": RouterConfig.deepseek_v3(96, 5, n_group=3, topk_group=2)}


@pytest.mark.parametrize(("name", "T", "dtype", "spec"), ROWS,
                         ids=[f"{n}_T{T}_{s.replace(' ', '_')}" for n, T, _, s in ROWS])
def test_router_rows_same_bits(gen, name, T, dtype, spec):
    """The router's rows per program change no bit (logits, weights, ids) for grouped,
    ungrouped and softmax routers (2 rows, refused, routed every row of a grouped router
    wrongly on an H100)."""
    from rocm_moe._gate_triton import gate_route as kernel
    from rocm_moe._gate_triton import ieee, plan_from_spec

    cfg, H = CONFIGS[name], 96
    x = torch.randn(T, H, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(cfg.num_experts, H, generator=gen) / 10).to(dtype).to(DEVICE)
    bias = (torch.rand(cfg.num_experts, generator=gen) * 0.1).to(DEVICE) \
        if cfg.scoring == "sigmoid" else None
    kw = dict(x_TH=x, weight_EH=w, config=cfg, bias_E=bias)

    def plan(s):
        return plan_from_spec(s, T, cfg.num_experts, H, ieee_fp32=ieee(dtype, dtype), sms=8,
                              amd=torch.version.hip is not None)

    assert _same(kernel(**kw, plan=plan(spec)), kernel(**kw, plan=plan(spec + " rr1")))


_PDL_PROBE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rocm_moe import _compile
from rocm_moe.routing import RouterConfig
from rocm_moe._gate_triton import _gate_splitk_kernel
from rocm_moe._routing_triton import _splitk_router_kernel, launch_config
gate_sig = dict(x_ptr="*bf16", w_ptr="*bf16", part_ptr="*fp32", T="i32", H="i32",
                stride_xt="i32", stride_we="i32", KB_PER_SPLIT="i32")
c, warps = launch_config(RouterConfig.deepseek_v3(), has_bias=True, warp=32)
for pdl in (False, True):
    g = dict(E=256, BLOCK_T=64, BLOCK_E=64, BLOCK_K=64, IEEE=False, PDL=pdl, PDL_IN=pdl)
    sig = {**gate_sig, **{k: "constexpr" for k in g}}
    k = triton.compile(ASTSource(_gate_splitk_kernel, sig, g), target=GPUTarget("cuda", 90, 32))
    ptx = k.asm["ptx"]
    print("gate", pdl, ptx.count("griddepcontrol.launch_dependents"),
          ptx.count("griddepcontrol.wait"))
    r = {**c, "ROWS": 1, "ROUND": 0, "PDL": pdl}
    sig = {a: "constexpr" if a in r else "*fp32" if a.endswith("_ptr") else "fp32"
           if a in ("eps", "scale") else "i32" for a in _splitk_router_kernel.arg_names}
    sig["ids_ptr"] = "*i32"
    k = triton.compile(ASTSource(_splitk_router_kernel, sig, r), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, enable_fp_fusion=False))
    print("route", pdl, k.asm["ptx"].count("griddepcontrol.wait"),
          k.asm["ptx"].count("griddepcontrol.launch_dependents"))
"""


def test_pdl_compiles_to_griddepcontrol_on_sm90():
    """PDL=True: the GEMM lets its dependents launch and the router waits for the GEMM, then
    lets its own dependents (the small-batch experts) launch; with PDL_IN the GEMM waits for
    its own predecessor (``griddepcontrol``); False: neither instruction (what gfx942 and the
    defaults get)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("no triton backends")
    if "nvidia" not in backends:
        pytest.skip("this triton has no nvidia backend")
    out = subprocess.run([sys.executable, "-c", _PDL_PROBE], capture_output=True, text=True,
                         env=env, check=True, timeout=300).stdout.split("\n")
    assert out[:4] == ["gate False 0 0", "route False 0 0", "gate True 1 1", "route True 1 1"], \
        out


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda" or torch.version.hip is not None,
                    reason="needs an NVIDIA GPU")
def test_gpu_pdl_refused_below_sm90(gen, monkeypatch):
    """A pdl plan on an NVIDIA GPU below sm_90 (griddepcontrol needs 9.0): refused, naming it
    (``_sm90`` reports such a GPU here)."""
    from rocm_moe import _gate_triton as gt

    monkeypatch.setattr(gt, "_sm90", lambda device: False)
    x, w, bias = _inputs(2, 256, torch.bfloat16, gen)
    with pytest.raises(ValueError, match=r"gate plan pdl.*capability 9\.0"):
        gt.gate_route(x_TH=x, weight_EH=w, config=DSV3, bias_E=bias, plan=_plan("pdl", 2))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda" or torch.version.hip is not None,
                    reason="needs an NVIDIA GPU")
def test_gpu_pdl_same_bits_and_captured(gen):
    """bf16 at DeepSeek-V3's size, T = 1 / 64 / 128: the PDL launch pairs give the plain pair's
    bits, eagerly and replayed (three times) from a CUDA graph on new hidden states."""
    from rocm_moe._gate_triton import gate_route as kernel

    for T in (1, 64, 128):
        x, w, bias = _inputs(T, 7168, torch.bfloat16, gen)
        kw = dict(x_TH=x, weight_EH=w, config=DSV3, bias_E=bias)
        base = kernel(**kw, plan=_plan("t64 e64 s16", T))
        for spec in ("t64 e64 s16 pdl", "t64 e64 s16 pdl pdlin", "t64 e64 s16 pdl rr4"):
            plan = _plan(spec, T)
            assert _same(kernel(**kw, plan=plan), base), (T, spec)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = kernel(**kw, plan=plan)
            x.copy_(torch.randn(x.shape, generator=gen).to(x))
            for _ in range(3):
                graph.replay()
            base = kernel(**kw, plan=_plan("t64 e64 s16", T))
            assert _same(out, base), (T, spec)
