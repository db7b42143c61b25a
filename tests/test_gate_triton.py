"""The Triton gate GEMM + router (rocm_moe._gate_triton, ``routing.gate_route``,
``EPMoE(fused_gate=...)``) against a float64 gate GEMM and a float64 router.

Everywhere (Triton's interpreter on CPUs, float16/float32 there): the logits within 1e-6 of
sum |x w| of the float64 GEMM (median per-logit relative error <= 1e-6), ids equal to the
float64 router's outside near-ties, weights within 1e-6; the split-K partials summed in their
fixed order; the float16 logits of a model-dtype router rounded once; the worked examples;
the refusals; the layer taking the path only where it may, and the transformers blocks of
DeepSeek-V3 and GLM-4.5 matched with it. On GPUs (``-m gpu``): the same in bfloat16 at the
real sizes (E = 256 / 384 / 160, H = 7168 / 5120), against torch's float32 GEMM + router too,
deterministic, captured in a CUDA graph, the layer equal to its torch path's routing.
"""

from __future__ import annotations

import math

import pytest
import torch

from rocm_moe import EPMoE, RouterConfig, routing
from rocm_moe._libs import triton_runs_on
from rocm_moe.routing import (
    check_fused_gate,
    gate_route,
    gate_route_unsupported,
    route,
)
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="triton cannot run here")

GPU = DEVICE.type == "cuda"
CPU_DTYPES = [torch.float16, torch.float32]

# Float32-gate routers: DeepSeek-V3 (grouped), Kimi K2 (384 experts, one group), GLM-4.5
# (160 experts, one group), and a non-power-of-two group count.
ROUTERS = {
    "dsv3_E256": RouterConfig.deepseek_v3(256, 8),
    "kimi_E384": RouterConfig.kimi_k2(384, 8),
    "glm45_E160": RouterConfig.deepseek_v3(160, 8, n_group=1, topk_group=1),
    "E96_G3_K5": RouterConfig.deepseek_v3(96, 5, n_group=3, topk_group=2),
}


def _inputs(T: int, H: int, cfg: RouterConfig, dtype, gen):
    E = cfg.num_experts
    x = torch.randn(T, H, generator=gen).to(dtype)
    w = (torch.randn(E, H, generator=gen) / math.sqrt(H)).to(dtype)
    bias = torch.rand(E, generator=gen) * 0.1 if cfg.scoring == "sigmoid" else None
    return x.to(DEVICE), w.to(DEVICE), None if bias is None else bias.to(DEVICE)


def _route64(logits64: torch.Tensor, cfg: RouterConfig, bias, gap: float | torch.Tensor = 1e-6):
    """The float64 router on float64 logits: (weights [T, K] float64, ids [T, K] sorted,
    near [T]: a choice-score gap < ``gap`` (a number, or [T]: per token) at the edge of the
    top-k or of the kept groups)."""
    s = logits64.softmax(-1) if cfg.scoring == "softmax" else logits64.sigmoid()
    choice = s if bias is None else s + bias.double()
    T, E, G = choice.shape[0], cfg.num_experts, cfg.n_group
    near = torch.zeros(T, dtype=torch.bool, device=choice.device)
    if G > 1:
        gscore = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
        ordered = gscore.sort(-1, descending=True).values
        near |= ordered[:, cfg.topk_group - 1] - ordered[:, cfg.topk_group] < 2 * gap
        keep = torch.zeros(T, G, dtype=torch.bool, device=choice.device)
        keep.scatter_(1, gscore.topk(cfg.topk_group).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, 1), -math.inf)
    top = choice.topk(cfg.top_k + 1, dim=-1)
    near |= (top.values[:, :-1] - top.values[:, 1:]).min(-1).values < gap
    ids = top.indices[:, :-1]
    w = s.gather(1, ids)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if cfg.scoring == "sigmoid" else 0.0))
    w = w * cfg.routed_scaling_factor
    order = ids.argsort(-1)
    return w.gather(1, order), ids.gather(1, order), near


def _score_gap(logit_err_T: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """[T] choice-score gap a token's logit errors (each <= ``logit_err_T``) can close."""
    per_score = logit_err_T * (0.25 if cfg.scoring == "sigmoid" else 2.0)
    return 1e-6 + 2 * per_score


def _sorted(r):
    order = r.topk_ids.long().argsort(-1)
    return r.topk_weights.double().gather(1, order), r.topk_ids.long().gather(1, order)


def _check_against_float64(x, w, bias, cfg, what: str, *, max_near: float = 0.05,
                           median: bool = True):
    """gate_route's logits, ids and weights against the float64 GEMM and router (``median``:
    also the median error relative to |logit| <= 1e-6; above FUSED_GATE_MAX_TOKENS the plan
    sums all of H in one float32 accumulator, ~8e-6 there on an H100 at T = 4096,
    bench/results/tests_gpu_2415763_h100.txt, so only the bound relative to sum |x w| holds)."""
    from rocm_moe._gate_triton import gate_route as kernel

    r, logits = kernel(x_TH=x, weight_EH=w, config=cfg, bias_E=bias)
    assert logits.dtype == torch.float32, what
    assert r.topk_weights.dtype == torch.float32, what
    assert r.topk_ids.dtype == torch.int32, what
    ref = x.double() @ w.double().T
    err = (logits.double() - ref).abs()
    scale = x.double().abs() @ w.double().abs().T
    assert float((err / scale).max()) <= 1e-6, f"{what}: {float((err / scale).max())}"
    if median:
        assert float((err / ref.abs()).median()) <= 1e-6, what
    # near-ties: choice gaps within what the token's own logit errors can move (a score moves
    # by at most its logit's error: softmax by s (|dl_i| + sum s_j |dl_j|) <= 2 |dl|, a
    # sigmoid by |dl| / 4; two scores close a gap by twice that, a group score of two by 4x);
    # the weights within 1e-6 plus 4x that error. Per token: at T = 4096 one float32
    # accumulator sums all of H, and the largest error of a million logits made 5-17% of the
    # tokens "near" (bench/results/tests_gpu_afa1191_h100.txt)
    err_T = err.max(-1).values
    w64, ids64, near = _route64(ref, cfg, bias, gap=_score_gap(err_T, cfg))
    got_w, got_ids = _sorted(r)
    far = ~near
    assert int(near.sum()) <= max(1, max_near * len(near)), f"{what}: {int(near.sum())} near"
    assert torch.equal(got_ids[far], ids64[far]), f"{what}: ids differ from float64's"
    rel = ((got_w - w64).abs() / w64.abs())[far]
    tol = (1e-6 + 4 * err_T)[far, None]
    assert rel.numel() == 0 or bool((rel <= tol).all()), f"{what}: weights {float(rel.max())}"
    return r, logits


# ---- everywhere (the interpreter on CPUs) ------------------------------------------------------
def test_docstring_examples():
    from rocm_moe._gate_triton import _gate_splitk_kernel, gate_plan
    from rocm_moe._routing_triton import splitk_route

    x = torch.tensor([[1.0, 2.0]], device=DEVICE)
    w = torch.tensor([[3.0, 4.0], [5.0, 6.0]], device=DEVICE)
    part = torch.full((1, 1, 2), math.nan, device=DEVICE)
    _gate_splitk_kernel[(1, 1, 1)](x, w, part, 1, 2, 2, 2, 1, E=2, BLOCK_T=16, BLOCK_E=16,
                                   BLOCK_K=16, IEEE=True)
    assert part.tolist() == [[[11.0, 17.0]]]
    cfg = RouterConfig(num_experts=2, top_k=1, norm_topk_prob=False)
    r = gate_route(x, w, cfg)
    assert r.topk_ids.tolist() == [[1]]
    assert r.topk_weights.item() == pytest.approx(1 / (1 + math.exp(-6)), rel=1e-6)
    logits = torch.empty(1, 2, device=DEVICE)
    r = splitk_route(part_STE=torch.tensor([[[1.0, 0.0]], [[2.0, 5.0]]], device=DEVICE),
                     logits_TE=logits, config=cfg)
    assert logits.tolist() == [[3.0, 5.0]]
    assert r.topk_ids.tolist() == [[1]]
    p = gate_plan(1, 256, 7168, ieee_fp32=False, sms=132, amd=False)
    assert (p.block_t, p.block_e, p.block_k, p.splits, p.kb_per_split) == (16, 16, 128, 14, 4)
    assert p.grid(1, 256) == (16, 14, 1)


def test_split_k_partials_summed_in_order():
    """((p0 + p1) + p2) in float32: 1e8 + 1 rounds back to 1e8, so the order s = 0, 1, 2
    gives 0 where any other gives 1 (the fixed order is the determinism)."""
    from rocm_moe._routing_triton import splitk_route

    cfg = RouterConfig.deepseek_v3(4, 1, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    part = torch.zeros(3, 2, 4, device=DEVICE)
    part[:, :, 0] = torch.tensor([1e8, 1.0, -1e8], device=DEVICE)[:, None]
    part[:, :, 1] = 0.5
    logits = torch.empty(2, 4, device=DEVICE)
    r = splitk_route(part_STE=part, logits_TE=logits, config=cfg)
    assert logits[:, 0].tolist() == [0.0, 0.0]
    assert logits[:, 1].tolist() == [1.5, 1.5]
    assert r.topk_ids.tolist() == [[1], [1]]


# (T, H, router, dtype): every router at T = 1, 33, 129 with a small H in both dtypes, and the
# real H = 7168 once per router in float16 (float32 operands take 4x the interpreter's time
# there; the GPU tests run every dtype at the real sizes).
GRID = [(T, 96, name, dtype) for name in ROUTERS for T in (1, 33, 129) for dtype in CPU_DTYPES] \
    + [(1, 7168, "dsv3_E256", torch.float16), (33, 7168, "glm45_E160", torch.float16)]


@pytest.mark.parametrize(("T", "H", "name", "dtype"), GRID,
                         ids=[f"{n}_T{T}_H{H}_{str(d).split('.')[1]}" for T, H, n, d in GRID])
def test_against_the_float64_router(gen, T, H, name, dtype):
    cfg = ROUTERS[name]
    x, w, bias = _inputs(T, H, cfg, dtype, gen)
    _check_against_float64(x, w, bias, cfg, f"{name} T={T} H={H} {dtype}")


def test_other_plans_agree_and_calls_repeat(gen):
    """Another split of H changes only the order of float32 additions; one plan's bits repeat
    from call to call."""
    from rocm_moe._gate_triton import gate_plan
    from rocm_moe._gate_triton import gate_route as kernel

    cfg = ROUTERS["dsv3_E256"]
    x, w, bias = _inputs(33, 96, cfg, torch.float32, gen)
    r0, lg0 = kernel(x_TH=x, weight_EH=w, config=cfg, bias_E=bias)
    r1, lg1 = kernel(x_TH=x, weight_EH=w, config=cfg, bias_E=bias)
    assert torch.equal(lg0, lg1)
    assert torch.equal(r0.topk_weights, r1.topk_weights)
    for block_e, sms in ((32, 64), (128, 1)):
        plan = gate_plan(33, 256, 96, ieee_fp32=True, sms=sms, amd=False, block_e=block_e)
        r, lg = kernel(x_TH=x, weight_EH=w, config=cfg, bias_E=bias, plan=plan)
        torch.testing.assert_close(lg, lg0, rtol=0, atol=1e-6 * float(lg0.abs().max()))
        assert torch.equal(r.topk_ids, r0.topk_ids)


def test_model_dtype_logits_rounded_once(gen):
    """A router whose logits are in the model dtype (Qwen3, "all" mode): float16 logits, the
    float64 GEMM rounded to float16 (one rounding; off by one float16 ulp, or by the float32
    sum's error where the sum cancels, only where that error straddles a rounding boundary),
    routed as the Triton router routes them."""
    from rocm_moe._gate_triton import gate_route as kernel
    from rocm_moe._routing_triton import fused_route

    cfg = RouterConfig.qwen3_moe(128, 8)
    x, w, _ = _inputs(129, 96, cfg, torch.float16, gen)
    r, logits = kernel(x_TH=x, weight_EH=w, config=cfg)
    assert logits.dtype == torch.float16
    ref = (x.double() @ w.double().T).half()
    off = logits != ref
    assert float(off.float().mean()) <= 1e-2
    ulp = (ref.float().abs() * 2**-10).clamp_min(2**-24)
    near_zero = 1e-6 * (x.double().abs() @ w.double().abs().T).float()  # a cancelling sum's
    assert bool(((logits.float() - ref.float()).abs() <= ulp + near_zero).all())  # error
    want = fused_route(logits_TE=logits, config=cfg)
    assert torch.equal(r.topk_ids, want.topk_ids)
    assert torch.equal(r.topk_weights, want.topk_weights)


def test_zero_tokens():
    cfg = ROUTERS["dsv3_E256"]
    r = gate_route(torch.zeros(0, 96, device=DEVICE), torch.zeros(256, 96, device=DEVICE), cfg)
    assert r.topk_ids.shape == r.topk_weights.shape == (0, 8)


def test_fused_gate_values():
    assert check_fused_gate(None) == routing.FUSED_GATE_DEFAULT
    assert routing.FUSED_GATE_DEFAULT in routing.FUSED_GATE_MODES
    for mode in routing.FUSED_GATE_MODES:
        assert check_fused_gate(mode) == mode
    with pytest.raises(TypeError, match=r"fused_gate.*True.*'float32'"):
        check_fused_gate(True)
    with pytest.raises(ValueError, match=r"fused_gate.*'yes'.*must be one of"):
        check_fused_gate("yes")
    cfg = RouterConfig.deepseek_v3(8, 2, n_group=1, topk_group=1)
    with pytest.raises(TypeError, match="fused_gate"):
        EPMoE(hidden_size=8, intermediate_size=4, router=cfg, fused_gate=1)
    with pytest.raises(ValueError, match="fused_gate"):
        EPMoE(hidden_size=8, intermediate_size=4, router=cfg, fused_gate="float64")
    layer = EPMoE(hidden_size=8, intermediate_size=4, router=cfg, fused_gate="float32")
    assert layer.fused_gate == "float32"
    layer.fused_gate = "on"  # assigned later: refused at the next forward
    with pytest.raises(ValueError, match=r"fused_gate.*'on'"):
        layer(torch.randn(3, 8))


def test_unsupported_reasons(monkeypatch):
    monkeypatch.setattr(routing, "_on_gpu", lambda t: True)
    dsv3, qwen = ROUTERS["dsv3_E256"], RouterConfig.qwen3_moe(256, 8)
    x, w = torch.zeros(2, 16, device=DEVICE), torch.zeros(256, 16, device=DEVICE)
    assert gate_route_unsupported(x, w, dsv3, mode="float32") is None
    assert gate_route_unsupported(x, w, qwen, mode="all") is None
    assert "off" in gate_route_unsupported(x, w, dsv3, mode="off")
    assert "model dtype" in gate_route_unsupported(x, w, qwen, mode="float32")
    assert "bias" in gate_route_unsupported(x, w, dsv3, gate_bias_E=torch.zeros(256))
    assert "float64" in gate_route_unsupported(x.double(), w, dsv3)
    assert "unit stride" in gate_route_unsupported(torch.zeros(16, 2).t(), w, dsv3)
    one_strided = torch.zeros(1, 32, device=DEVICE)[:, ::2]  # one token, stride 2 along H
    assert "unit stride" in gate_route_unsupported(one_strided, w, dsv3)
    assert "score_after_topk" in gate_route_unsupported(x, w, RouterConfig.llama4(256, 1))
    wg = w.clone().requires_grad_()
    assert "autograd" in gate_route_unsupported(x, wg, dsv3)
    with torch.no_grad():
        assert gate_route_unsupported(x, wg, dsv3) is None
    monkeypatch.setattr(routing, "_on_gpu", lambda t: False)
    assert "runs on GPUs" in gate_route_unsupported(x, w, dsv3)
    monkeypatch.setattr(routing, "_on_gpu", lambda t: True)
    big = torch.zeros(routing.FUSED_GATE_MAX_TOKENS + 1, 16, device=DEVICE)
    assert "FUSED_GATE_MAX_TOKENS" in gate_route_unsupported(big, w, dsv3, mode="float32")
    assert gate_route_unsupported(big[:-1], w, dsv3, mode="float32") is None


def test_bad_inputs_refused(gen):
    cfg = ROUTERS["dsv3_E256"]
    x, w, bias = _inputs(3, 96, cfg, torch.float32, gen)
    with pytest.raises(ValueError, match=r"hidden_states.shape.*\[T, H\]"):
        gate_route(x[:, :50], w, cfg)
    with pytest.raises(ValueError, match=r"gate_weight.shape"):
        gate_route(x, w[:100], cfg)
    with pytest.raises(TypeError, match="gate_weight"):
        gate_route(x, w.tolist(), cfg)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        gate_route(x, w, cfg, e_score_correction_bias=bias[:7])
    with pytest.raises(ValueError, match=r"e_score_correction_bias.*finite"):
        gate_route(x, w, cfg, e_score_correction_bias=torch.full_like(bias, math.nan))
    with pytest.raises(ValueError, match=r"gate_route.*score_after_topk"):
        gate_route(x, w, RouterConfig.llama4(256, 1))
    with pytest.raises(TypeError, match="validate"):
        gate_route(x, w, cfg, validate=1)
    x[1, 5] = math.nan
    with pytest.raises(ValueError, match=r"router_logits.*must be finite"):
        gate_route(x, w, cfg, e_score_correction_bias=bias)
    r = gate_route(x, w, cfg, e_score_correction_bias=bias, validate=False)  # the hot path
    assert r.topk_ids.shape == (3, 8)


def _spy(monkeypatch):
    """Count the layer's calls of gate_route (on CPUs: let the automatic choice take it)."""
    import rocm_moe.layer as layer_mod

    calls = []
    real = layer_mod.gate_route

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(layer_mod, "gate_route", counted)
    if not GPU:
        monkeypatch.setattr(routing, "_on_gpu", lambda t: True)
    return calls


def test_layer_takes_the_path_only_where_it_may(gen, monkeypatch):
    """EPMoE(fused_gate=...): the Triton gate where asked; the torch path with "off", invariant
    mode, router replay, autograd, and for a model-dtype router under "float32". The routing
    agrees with the torch path's outside near-ties."""
    calls = _spy(monkeypatch)
    cfg = ROUTERS["E96_G3_K5"]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    layer = EPMoE(hidden_size=64, intermediate_size=16, router=cfg, device=DEVICE,
                  fused_gate="float32", validate=False)
    layer.reset_parameters(seed=1)
    x = torch.randn(33, 64, device=DEVICE)
    with torch.no_grad():
        got = layer.route_tokens(x)
        assert len(calls) == 1
        layer.fused_gate = "off"
        want = layer.route_tokens(x)
        assert len(calls) == 1
        logits64 = x.double() @ layer.gate.weight.double().T
        *_, near = _route64(logits64, cfg, layer.e_score_correction_bias)
        assert torch.equal(got.topk_ids[~near], want.topk_ids[~near])
        torch.testing.assert_close(got.topk_weights[~near], want.topk_weights[~near],
                                   rtol=1e-6, atol=0)
        layer.fused_gate = "float32"
        layer.route_tokens(x, forced_expert_ids=want.topk_ids)
        layer.invariant = True
        layer.route_tokens(x)
        layer.invariant = False
        assert len(calls) == 1
        layer(x)
        assert len(calls) == 2
    layer.route_tokens(x)  # autograd records the trainable gate weight: torch path
    assert len(calls) == 2
    qwen = EPMoE(hidden_size=64, intermediate_size=16, router=RouterConfig.qwen3_moe(16, 2),
                 device=DEVICE, fused_gate="float32")
    with torch.no_grad():
        qwen.route_tokens(x)
        assert len(calls) == 2
        qwen.fused_gate = "all"
        qwen.route_tokens(x)
    assert len(calls) == 3


# ---- transformers' DeepSeek-V3 and GLM-4.5 blocks with the Triton gate ------------------------
def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    from tests.families_parity import COMMON
    from tests.test_hf import COMMON as HF_COMMON

    return {
        "deepseek_v3": transformers.DeepseekV3Config(
            **{**HF_COMMON, "num_key_value_heads": 4}, intermediate_size=48,
            moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1),
        "glm4_moe": transformers.Glm4MoeConfig(
            **{**COMMON, "num_experts_per_tok": 3}, intermediate_size=48,
            moe_intermediate_size=12, n_routed_experts=12, n_group=3, topk_group=2,
            first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True,
            routed_scaling_factor=1.5),
    }


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_transformers_block_parity_with_the_triton_gate(family, tmp_path, monkeypatch):
    """The layer built from the transformers block (float32; bf16 too on GPUs), with
    fused_gate="float32" as its default, against the block: as tests/families_parity.py's
    float32 bound (1e-5), and the Triton gate ran."""
    from rocm_moe import Placement, oracle
    from rocm_moe.integrations import hf
    from tests import families_parity as fp

    cfg = _tiny_configs()[family]
    directory = fp.save_tiny(cfg, tmp_path)
    monkeypatch.setattr(routing, "FUSED_GATE_DEFAULT", "float32")
    calls = _spy(monkeypatch)
    torch.manual_seed(1)
    dtypes = [torch.float32] + ([torch.bfloat16] if GPU else [])
    for dtype in dtypes:
        model = fp.load_model(directory, dtype).to(DEVICE)
        block = fp.block_of(model, 1)
        x = torch.randn(1, 33, cfg.hidden_size, device=DEVICE)
        with torch.no_grad():
            ref = fp.block_out(fp.block_of(fp.load_model(directory).to(DEVICE), 1), x)
            E = fp.num_experts(model.config)
            layer = hf.build_layer(hf.weights_from_block(block, model.config,
                                                         Placement.contiguous(E, 1), 0))
            assert layer.fused_gate == "float32"
            err = oracle.rel_err(layer.to(DEVICE)(x[0].to(dtype)), ref[0])
            ours = oracle.rel_err(fp.block_out(block, x.to(dtype))[0], ref[0])
        assert err <= (1e-5 if dtype == torch.float32 else max(2 * ours, 1e-2)), (dtype, err)
    assert len(calls) == len(dtypes)


# ---- GPUs: bf16 at the real sizes, against torch's float32 GEMM too ---------------------------
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
REAL = {"dsv3_E256": 7168, "kimi_E384": 7168, "glm45_E160": 5120}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("name", list(REAL))
def test_gpu_against_float64_and_torch(gen, name, dtype):
    """bf16 (and fp16 / fp32) hidden states and weight as stored at T = 1..4096: within 1e-6
    of the float64 GEMM, ids of the float64 router outside near-ties, and those of torch's
    float32 GEMM + router (``F.linear(x.float(), w.float())``, ``route``) too."""
    cfg = ROUTERS[name]
    for T in (1, 8, 33, 64, 128, 129, 4096):
        x, w, bias = _inputs(T, REAL[name], cfg, dtype, gen)
        r, logits = _check_against_float64(x, w, bias, cfg, f"{name} T={T} {dtype}",
                                           median=T <= routing.FUSED_GATE_MAX_TOKENS)
        torch_logits = torch.nn.functional.linear(x.float(), w.float())
        torch_r = route(torch_logits, cfg, e_score_correction_bias=bias)
        ref = x.double() @ w.double().T
        err_T = torch.maximum(*[(lg.double() - ref).abs().max(-1).values
                                for lg in (logits, torch_logits)])
        *_, near = _route64(ref, cfg, bias, gap=_score_gap(err_T, cfg))
        assert torch.equal(_sorted(r)[1][~near], _sorted(torch_r)[1][~near]), (name, T)


@pytest.mark.gpu
@needs_gpu
def test_gpu_deterministic_and_captured(gen):
    """Same bits on every call; ``gate_route(validate=False)`` captures in a CUDA graph and a
    replay on new hidden states gives the eager bits."""
    cfg = ROUTERS["dsv3_E256"]
    x, w, bias = _inputs(64, 7168, cfg, torch.bfloat16, gen)
    kw = dict(e_score_correction_bias=bias, validate=False)
    first = gate_route(x, w, cfg, **kw)
    for _ in range(5):
        again = gate_route(x, w, cfg, **kw)
        assert torch.equal(again.topk_weights, first.topk_weights)
        assert torch.equal(again.topk_ids, first.topk_ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gate_route(x, w, cfg, **kw)
    x.copy_(_inputs(64, 7168, cfg, torch.bfloat16, gen)[0])
    graph.replay()
    eager = gate_route(x, w, cfg, **kw)
    assert torch.equal(out.topk_weights, eager.topk_weights)
    assert torch.equal(out.topk_ids, eager.topk_ids)


@pytest.mark.gpu
@needs_gpu
def test_gpu_qwen3_bf16_gate(gen):
    """Qwen3's bf16 gate ("all"): bf16 logits within one bf16 ulp of the float64 GEMM rounded
    once, ids those of torch's bf16 GEMM + route outside ties."""
    from rocm_moe._gate_triton import gate_route as kernel

    cfg = RouterConfig.qwen3_moe(128, 8)
    same = []
    for T in (1, 33, 128):
        x, w, _ = _inputs(T, 2048, cfg, torch.bfloat16, gen)
        r, logits = kernel(x_TH=x, weight_EH=w, config=cfg)
        assert logits.dtype == torch.bfloat16
        ref = (x.double() @ w.double().T).bfloat16().float()
        near_zero = 1e-6 * (x.double().abs() @ w.double().abs().T).float()
        assert bool(((logits.float() - ref).abs() <= ref.abs() * 2**-7 + near_zero).all())
        want = route(torch.nn.functional.linear(x, w), cfg, fused=True)
        same += (r.topk_ids == want.topk_ids).all(-1).tolist()
    assert sum(same) >= 0.75 * len(same)  # bf16 logits tie, and round apart near a midpoint


_PRECISION_PROBE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rocm_moe._gate_triton import _gate_splitk_kernel as fn
sig = dict(x_ptr="*fp32", w_ptr="*fp32", part_ptr="*fp32", T="i32", H="i32", stride_xt="i32",
           stride_we="i32", KB_PER_SPLIT="i32", E="constexpr", BLOCK_T="constexpr",
           BLOCK_E="constexpr", BLOCK_K="constexpr", IEEE="constexpr", PDL="constexpr",
           PDL_IN="constexpr")
c = dict(E=256, BLOCK_T=16, BLOCK_E=64, BLOCK_K=32, IEEE=True, PDL=False, PDL_IN=False)
for backend, arch, warp, key in (("cuda", 90, 32, "ptx"), ("hip", "gfx942", 64, "amdgcn")):
    try:
        k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget(backend, arch, warp))
    except Exception as exc:  # a wheel without this backend
        print(backend, "skip", type(exc).__name__)
        continue
    asm = k.asm[key].lower()
    print(backend, "tf32" if ("tf32" in asm or "xf32" in asm) else "ieee")
"""


def test_float32_operands_multiply_in_ieee_not_tf32():
    """The IEEE=True gate compiles to no TF32 MMA on sm_90 and no XF32 MFMA on gfx942 (a
    float32 gate weight keeps float32 products; TF32 would round them to 10 bits)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", _PRECISION_PROBE], capture_output=True,
                         text=True, env=env, check=True, timeout=300).stdout
    assert "tf32" not in out, out
    assert "ieee" in out, out


@pytest.mark.gpu
@needs_gpu
def test_gpu_layer_with_the_triton_gate_in_a_cuda_graph(gen, monkeypatch):
    """EPMoE(fused_gate="float32", validate=False), bf16, DeepSeek-V3's router and H, 8 tokens
    (the Triton experts' small path: no atomics, the same bits every call): the
    forward captures in a CUDA graph with the Triton gate in it (it ran: counted), a replay
    on new tokens gives the eager output, and the routing equals the torch gate's outside
    near-ties."""
    from rocm_moe.experts.triton import TritonExperts

    calls = _spy(monkeypatch)
    cfg = RouterConfig.deepseek_v3(256, 8)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    layer = EPMoE(hidden_size=7168, intermediate_size=64, router=cfg, dtype=torch.bfloat16,
                  device=DEVICE, experts=TritonExperts(), fused_gate="float32", validate=False)
    layer.reset_parameters(seed=2)
    x = torch.randn(8, 7168, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream(DEVICE)  # warm-up (compiles) on a side stream, as capture wants
        side.wait_stream(torch.cuda.current_stream(DEVICE))
        with torch.cuda.stream(side):
            layer(x)
        torch.cuda.current_stream(DEVICE).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn(8, 7168, device=DEVICE, dtype=torch.bfloat16))
        graph.replay()
        assert torch.equal(out, layer(x))
        got = layer.route_tokens(x)
        layer.fused_gate = "off"
        want = layer.route_tokens(x)
    assert len(calls) >= 4
    ref = x.double() @ layer.gate.weight.double().T
    *_, near = _route64(ref, cfg, layer.e_score_correction_bias, gap=1e-5)
    assert torch.equal(_sorted(got)[1][~near], _sorted(want)[1][~near])
