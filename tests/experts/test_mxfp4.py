"""MXFP4 experts (experts/mxfp4.py): the Triton kernels (interpreter on CPUs in float16; compiled
on GPUs, bfloat16 too) against the reference on the dequantised weights and the float64 oracle,
by relative error: odd row counts, -1 slots, another rank's experts masked out, both weight
modes, gpt-oss's variant and the weights on the input, capacity-sized batches."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, oracle
from rocm_moe.experts.base import PLAIN, ExpertVariant
from rocm_moe.experts.mxfp4 import MXFP4ReferenceExperts, TritonMXFP4Experts
from rocm_moe.formats.mxfp4 import MXFP4Tensor, MXFP4Weights, quantize_mxfp4
from tests.conftest import DEVICE

pytest.importorskip("triton")

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
VARIANTS = {"plain": PLAIN, "gpt_oss": ExpertVariant.gpt_oss(limit=0.6),
            "on_input": ExpertVariant.llama4()}
# (R, K, E, W, H, I): one row; 33 rows with H = 96 (a K tail: 1.5 BLOCK_K), ranks masking
GRID = [pytest.param(*c, id="R{}_K{}_E{}_W{}_H{}_I{}".format(*c))
        for c in [(1, 1, 4, 1, 64, 32), (33, 4, 16, 2, 96, 64), (33, 2, 8, 4, 64, 96)]]


def _case(R, K, E, W, H, I, variant, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    p = Placement.contiguous(E, W)
    rank = W - 1
    emap = p.expert_map(rank)
    local = list(p.local_experts(rank))
    x = torch.randn(R, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(R)])
    ids[torch.rand(R, K, generator=g) < 0.15] = -1
    w = torch.rand(R, K, generator=g) + 0.1
    q13 = quantize_mxfp4(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
    q2 = quantize_mxfp4(torch.randn(E, H, I, generator=g) / I**0.5)
    b13 = (0.5 * torch.randn(E, 2 * I, generator=g)).to(dtype)
    b2 = (0.5 * torch.randn(E, H, generator=g)).to(dtype)
    args = [x.to(DEVICE), ids.int().to(DEVICE), w.to(DEVICE), q13[local].to(DEVICE),
            q2[local].to(DEVICE), emap.to(DEVICE)]
    kw = dict(variant=variant)
    if variant.bias:
        kw.update(w13_bias=b13[local].to(DEVICE), w2_bias=b2[local].to(DEVICE))
    d13, d2 = q13.dequantize(), q2.dequantize()
    fetch = (lambda e: (d13[e], d2[e], b13[e], b2[e])) if variant.bias else \
        (lambda e: (d13[e], d2[e]))
    raw64 = oracle.dense_experts(x, ids, local, fetch, variant=variant, weights_RK=w)
    return args, kw, raw64, w


def _expected(raw64, w, variant, weight_mode):
    if weight_mode == "combine":
        return raw64
    return oracle.summed(raw64) if variant.weights_on_input else oracle.weighted_sum(raw64, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("R", "K", "E", "W", "H", "I"), GRID)
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
def test_triton_matches_the_dequantised_oracle(R, K, E, W, H, I, name, weight_mode, dtype):
    variant = VARIANTS[name]
    args, kw, raw64, w = _case(R, K, E, W, H, I, variant, dtype, seed=R + 3 * K + W)
    out = TritonMXFP4Experts()(*args, weight_mode=weight_mode, **kw)
    ref = MXFP4ReferenceExperts()(*args, weight_mode=weight_mode, **kw)
    assert out.weights_applied == ref.weights_applied == (weight_mode == "experts")
    assert out.weighted_inputs == ref.weighted_inputs
    want = _expected(raw64, w, variant, weight_mode)
    assert oracle.rel_err(out.out, want) < TOL[dtype]
    assert oracle.rel_err(out.out, ref.out) < TOL[dtype]
    if weight_mode == "combine":
        local = args[5].local_ids(args[1]) >= 0
        assert out.out[~local].eq(0).all()


def test_reference_is_the_reference_experts_on_dequantised_weights():
    args, kw, raw64, w = _case(33, 4, 16, 2, 96, 64, VARIANTS["gpt_oss"], torch.float32, seed=1)
    out = MXFP4ReferenceExperts()(*args, weight_mode="experts", **kw)
    assert oracle.rel_err(out.out, oracle.weighted_sum(raw64, w)) < 1e-6


def test_worked_example():
    H = I = 32
    x = torch.zeros(1, H, dtype=torch.float16)
    x[0, 0] = 1
    w13 = torch.zeros(1, 2 * I, H)
    w13[0, 0, 0] = w13[0, I, 0] = 4  # gate and up
    w2 = torch.eye(H, I)[None]
    q13, q2 = quantize_mxfp4(w13), quantize_mxfp4(w2)
    assert torch.equal(q13.dequantize(), w13.double())  # 4, 1 and 0 are E2M1 values
    out = TritonMXFP4Experts()(x.to(DEVICE), torch.tensor([[0]], dtype=torch.int32).to(DEVICE),
                               torch.tensor([[0.5]]).to(DEVICE), q13.to(DEVICE), q2.to(DEVICE),
                               Placement.contiguous(1, 1).expert_map(0).to(DEVICE),
                               weight_mode="experts").out
    assert out[0, 0].item() == pytest.approx(0.5 * 4 * 4 / (1 + 2.718281828 ** -4), rel=1e-3)
    assert out[0, 1:].abs().max().item() == 0


@pytest.mark.parametrize("name", ["gpt_oss", "on_input"])
def test_bounded_rows(name):
    """A capacity-sized batch (rows past num_rows empty): persistent launches, the rows
    received match the oracle."""
    variant = VARIANTS[name]
    args, kw, raw64, w = _case(33, 2, 8, 2, 64, 32, variant, torch.float16, seed=9)
    n = 20
    args[1][n:] = -1
    raw64[n:] = 0
    out = TritonMXFP4Experts()(*args, weight_mode="experts", expected_rows=n,
                               num_rows=torch.tensor([n], dtype=torch.int32, device=DEVICE),
                               **kw)
    want = _expected(raw64, w, variant, "experts")
    assert oracle.rel_err(out.out[:n], want[:n]) < TOL[torch.float16]


def test_format_supports_only_the_mxfp4_experts():
    from rocm_moe.experts.reference import ReferenceExperts
    from rocm_moe.experts.triton import TritonExperts

    fmt = MXFP4Weights.quantize(torch.zeros(1, 64, 32), torch.zeros(1, 32, 32))
    assert fmt.supports(TritonMXFP4Experts()) is None
    assert fmt.supports(MXFP4ReferenceExperts()) is None
    assert "not mxfp4" in fmt.supports(TritonExperts())
    assert "not mxfp4" in fmt.supports(ReferenceExperts())


def test_refusals():
    args, *_ = _case(5, 2, 4, 1, 64, 32, PLAIN, torch.float16, seed=2)
    x, ids, w, q13, q2, emap = args
    with pytest.raises(TypeError, match=r"w13=Tensor.*must be a formats.mxfp4.MXFP4Tensor"):
        TritonMXFP4Experts()(x, ids, w, q13.dequantize(torch.float16), q2, emap,
                             weight_mode="experts")
    with pytest.raises(ValueError, match=r"w13.shape\[0\]=4: must be e=2 local experts"):
        TritonMXFP4Experts()(x, ids, w, q13, q2, Placement.contiguous(4, 2).expert_map(0),
                             weight_mode="experts")
    with pytest.raises(ValueError, match=r"w13.shape\[2\]=64: must be H=32"):
        TritonMXFP4Experts()(x[:, :32], ids, w, q13, q2, emap, weight_mode="experts")
    with pytest.raises(ValueError, match=r"experts=triton, mode='weighted': unsupported: .*"
                                         r"compute in .*not torch.float32"):
        TritonMXFP4Experts()(x.float(), ids, w, q13, q2, emap, weight_mode="experts")
    with pytest.raises(TypeError, match=r"w13_bias=None: must be a torch.Tensor"):
        TritonMXFP4Experts()(x, ids, w, q13, q2, emap, weight_mode="experts",
                             variant=ExpertVariant.gpt_oss())
    with pytest.raises(ValueError, match=r"MXFP4Tensor.scales.shape=\[4, 1, 2\]"):
        MXFP4Tensor(q13.blocks, q13.scales[:, :1])


@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
def test_layer_of_the_mxfp4_format(weight_mode):
    """EPMoE(weight_format="mxfp4") with the Triton MXFP4 experts (a float backend is swapped
    for its MXFP4 sibling): gpt-oss's router and variant, against the float64 oracle of the
    dequantised weights."""
    from rocm_moe import EPMoE, RouterConfig, dense_moe_reference
    from rocm_moe.experts.triton import TritonExperts

    E, H, I = 8, 64, 32
    variant = VARIANTS["gpt_oss"]
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.gpt_oss(E, 2),
                  experts=TritonMXFP4Experts(), weight_format="mxfp4", expert_variant=variant,
                  weight_mode=weight_mode, dtype=torch.float16, device=DEVICE)
    assert layer.weight_format == "mxfp4"
    assert TritonExperts().for_weight_format("mxfp4").__class__ is TritonMXFP4Experts
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        layer.load_experts(torch.randn(E, 2 * I, H, generator=g) / H**0.5,
                           torch.randn(E, H, I, generator=g) / I**0.5)
        layer.w13_bias.copy_(0.3 * torch.randn(E, 2 * I, generator=g))
        layer.w2_bias.copy_(0.3 * torch.randn(E, H, generator=g))
    x = torch.randn(33, H, generator=g).half().to(DEVICE)
    out = layer(x, return_raw=True)
    d13, d2 = layer.weights.dequantize()
    ref, raw = dense_moe_reference(x, out.topk_weights, out.topk_ids, d13, d2, variant=variant,
                                   w13_bias_E=layer.w13_bias.detach(),
                                   w2_bias_E=layer.w2_bias.detach())
    assert oracle.rel_err(out.out, ref) < TOL[torch.float16]
    assert oracle.rel_err(out.raw, raw) < TOL[torch.float16]
