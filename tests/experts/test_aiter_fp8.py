"""AiterFP8Experts (AITER's FP8 block-scale path) against the FP8 reference and its float64
oracle, through a fused_moe fake that enforces AITER's per_1x128 contract (tests/fakes.py)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement
from rocm_moe.experts.aiter_fp8 import AiterFP8Experts
from rocm_moe.experts.fp8 import FP8ReferenceExperts, quantize_experts
from rocm_moe.quant import quantize_rows
from tests.conftest import rel_err
from tests.fakes import ContractError, FakeFusedMoe, FakeQuantType, fake_shuffle_weight

H, I = 384, 128  # H/128 = 3 != 2I/128 = 2: a transposed scale has the wrong shape
WEIGHT_MODE = {"weighted": "experts", "raw": "combine"}
FNUZ, FN = torch.float8_e4m3fnuz, torch.float8_e4m3fn
TOL = 1e-2  # against the oracle of AITER's own arithmetic: bf16 output
# Against FP8ReferenceExperts: AITER rounds the intermediate to bf16 before requantising it,
# which moves the 1x128 group scales and so re-rolls the intermediate's FP8 rounding: the two
# differ by FP8 noise (the layer's FP8_TOLERANCE), not by bf16 rounding.
TOL_REF = 6e-2


def _oracle(rows, ids, w, wt, emap, mode):
    """Float64 oracle of AITER's per_1x128 arithmetic over the local experts: rows quantised
    per 1x128 (or given), dequantised GEMMs, the intermediate rounded to bf16 (AITER's stage-1
    output dtype) then requantised per 1x128; [R, K, H] raw or [R, H] weighted."""
    fp8 = wt.w13.dtype
    a = (rows if not isinstance(rows, torch.Tensor) else quantize_rows(rows, dtype=fp8))
    a = a.dequantize()
    R, K = ids.shape
    raw = torch.zeros(R, K, wt.w13.shape[2], dtype=torch.float64)
    local = torch.where(ids >= 0, emap.map_E[ids.long().clamp(min=0)], -1)
    for j in range(emap.num_local):
        r, k = torch.where(local == j)  # rows quantise independently: batching them is exact
        gate, up = (a[r] @ wt.w13[j].dequantize().T).chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) * up).bfloat16()
        raw[r, k] = quantize_rows(h, dtype=fp8).dequantize() @ wt.w2[j].dequantize().T
    return raw if mode == "raw" else (raw * w.double()[:, :, None]).sum(1)


def _aiter(fake=None, fp8=FNUZ, **kw):
    """The adapter on the fakes; its stage-1 probe asks the fake, as by default it asks AITER."""
    fake = fake or FakeFusedMoe(fp8_dtype=fp8)
    kw.setdefault("stage1_probe", getattr(fake, "stage1_is_asm", lambda **_: False))
    return AiterFP8Experts(fused_moe=fake, shuffle_weight=fake_shuffle_weight, fp8_dtype=fp8,
                           quant_type=FakeQuantType.per_1x128, **kw)


def _weights(e, fp8, gen, h=H):
    w13 = torch.randn(e, 2 * I, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, I, generator=gen) / I**0.5
    return quantize_experts(w13, w2, dtype=fp8)


def _inputs(R, K, E, gen, empty=0.0, h=H):
    x = torch.randn(R, h, generator=gen).bfloat16()
    ids = (torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(R)])
           if R else torch.empty(0, K, dtype=torch.int64)).to(torch.int32)
    ids[torch.rand(R, K, generator=gen) < empty] = -1
    return x, ids, torch.rand(R, K, generator=gen)


GRID = [pytest.param(R, K, E, W, fp8, s, fp8_in,
                     id=f"R{R}_K{K}_E{E}_W{W}_{str(fp8)[-6:]}_sent{int(s)}_fp8in{int(fp8_in)}")
        for R, K, E, W in [(1, 1, 4, 1), (33, 4, 8, 2), (511, 3, 6, 3)]
        for fp8 in (FNUZ, FN) for s in (True, False) for fp8_in in (False, True)]


@pytest.mark.parametrize(("R", "K", "E", "W", "fp8", "sentinel", "fp8_in"), GRID)
def test_matches_reference_and_oracle(R, K, E, W, fp8, sentinel, fp8_in, gen):
    emap = Placement.contiguous(E, W).expert_map(W - 1)
    wt = _weights(emap.num_local, fp8, gen)
    x, ids, w = _inputs(R, K, E, gen, empty=0.2 if sentinel else 0.0)
    rows = quantize_rows(x, dtype=fp8) if fp8_in else x
    fake = FakeFusedMoe(fp8_dtype=fp8)
    aiter = _aiter(fake, fp8, mask_sentinel=sentinel)
    for mode in ("weighted", "raw"):
        args = (rows, ids, w, wt.w13, wt.w2, emap)
        kw = dict(weight_mode=WEIGHT_MODE[mode])
        out = aiter(*args, **kw)
        ref = FP8ReferenceExperts()(*args, **kw, out_dtype=torch.float64)
        assert out.weights_applied == (mode == "weighted")
        assert out.out.dtype == torch.bfloat16
        assert out.out.shape == ref.out.shape
        assert rel_err(out.out.double(), _oracle(rows, ids, w, wt, emap, mode)) < TOL
        assert rel_err(out.out.double(), ref.out) < TOL_REF
        if mode == "raw":  # slots of other ranks' experts and empty slots are exact zeros
            local = emap.map_E[ids.long().clamp(min=0)] >= 0
            assert bool((out.out[~(local & (ids >= 0))] == 0).all())
    assert fake.calls == 1 + K


def test_zero_token_experts_and_no_rows(gen):
    emap = Placement.contiguous(8, 2).expert_map(0)  # local experts 0..3
    wt = _weights(4, FNUZ, gen)
    x, _, w = _inputs(33, 2, 8, gen)
    ids = torch.tensor([[1, 6]] * 33, dtype=torch.int32)  # experts 0, 2, 3 get no token
    for mode in ("weighted", "raw"):
        kw = dict(weight_mode=WEIGHT_MODE[mode])
        out = _aiter()(x, ids, w, wt.w13, wt.w2, emap, **kw).out
        assert rel_err(out.double(), _oracle(x, ids, w, wt, emap, mode)) < TOL
    fake = FakeFusedMoe()
    x0, ids0, w0 = _inputs(0, 2, 8, gen)
    for mode, shape in (("weighted", (0, H)), ("raw", (0, 2, H))):
        out = _aiter(fake)(x0, ids0, w0, wt.w13, wt.w2, emap, weight_mode=WEIGHT_MODE[mode])
        assert out.out.shape == shape
        assert out.out.dtype == torch.bfloat16
    assert fake.calls == 0  # AITER has no guard for M = 0


def test_passes_scales_as_aiter_reads_them(gen):
    """The call itself: per_1x128, scale_inv unchanged (AITER multiplies), a1_scale only with
    FP8 rows, dtype bf16, shuffled FP8 weights, the appended masked slot."""
    emap = Placement.contiguous(8, 2).expert_map(1)
    wt = _weights(4, FNUZ, gen)
    x, ids, w = _inputs(5, 2, 8, gen)
    seen = []

    def spy(*a, **kw):
        seen.append((a, kw))
        return FakeFusedMoe()(*a, **kw)

    aiter = _aiter(spy)
    aiter(x, ids, w, wt.w13, wt.w2, emap, weight_mode="experts")
    aiter(quantize_rows(x, dtype=FNUZ), ids, w, wt.w13, wt.w2, emap, weight_mode="experts")
    (a_f, kw_f), (a_q, kw_q) = seen
    for a, kw in seen:
        assert kw["quant_type"] is FakeQuantType.per_1x128
        assert kw["dtype"] == torch.bfloat16
        assert kw["w1_scale"] is not None
        assert torch.equal(kw["w1_scale"], wt.w13.scale_inv)
        assert torch.equal(kw["w2_scale"], wt.w2.scale_inv)
        assert a[1].dtype == FNUZ
        assert a[1].is_shuffled
        assert a[2].is_shuffled
        assert a[4].shape == (5, 3)
        assert bool((a[4][:, -1] == 8).all())
    assert a_f[0].dtype == torch.bfloat16
    assert kw_f["a1_scale"] is None
    assert a_q[0].dtype == FNUZ
    assert torch.equal(kw_q["a1_scale"],
                                                quantize_rows(x, dtype=FNUZ).scale)
    assert a_f[1] is a_q[1]  # the shuffled copy is cached


@pytest.mark.parametrize("R", [1, 33, 511])
def test_asm_stage1_gets_transposed_scales(R, gen):
    """Issue 32 item 4: AITER's asm stage-1 kernel reads a1_scale by its pointer as [H/128, M]
    (csrc/py_itfs_cu/asm_moe_2stage.cu ~245, no strides, e4048607); fused_moe transposes the
    scales it makes from bf16 rows (aiter/fused_moe.py ~3129, transpose_scale=True) but passes
    an FP8 input's a1_scale as it is. Where AITER's tables pick that kernel the adapter hands
    the scales transposed; where it cannot tell (AITER's internals unknown), bf16 rows, which
    AITER quantises itself on either path."""
    from rocm_moe.experts.aiter_fp8 import aiter_stage1_is_asm

    emap = Placement.contiguous(8, 2).expert_map(1)
    wt = _weights(4, FNUZ, gen)
    x, ids, w = _inputs(R, 2, 8, gen)
    rows = quantize_rows(x, dtype=FNUZ)
    asm = FakeFusedMoe(asm_stage1=lambda M: M > 1)  # a tuned table's choice by token count
    for mode in ("weighted", "raw"):
        out = _aiter(asm)(rows, ids, w, wt.w13, wt.w2, emap, weight_mode=WEIGHT_MODE[mode])
        assert rel_err(out.out.double(), _oracle(rows, ids, w, wt, emap, mode)) < TOL
    with pytest.raises(ContractError, match="transposed"):  # row-major scales on the asm path
        _aiter(FakeFusedMoe(asm_stage1=True), stage1_probe=lambda **_: False)(
            rows, ids, w, wt.w13, wt.w2, emap, weight_mode="experts")
    seen = []

    def spy(*a, **kw):
        seen.append((a[0].dtype, kw["a1_scale"]))
        return FakeFusedMoe(asm_stage1=True)(*a, **kw)

    out = _aiter(spy, stage1_probe=lambda **_: None)(rows, ids, w, wt.w13, wt.w2, emap,
                                                      weight_mode="experts")
    assert seen == [(torch.bfloat16, None)], "unknown path: bf16 rows, AITER quantises"
    assert rel_err(out.out.double(), _oracle(rows, ids, w, wt, emap, "weighted")) < TOL_REF
    if AiterFP8Experts.availability() is not None:  # no AITER here: the probe cannot tell
        assert aiter_stage1_is_asm(M=R, H=H, I=I, e=4, topk=3, shuffled=True,
                                   out_dtype=torch.bfloat16) is None


def test_refusals(gen):
    emap = Placement.contiguous(4, 1).expert_map(0)
    x, ids, w = _inputs(3, 2, 4, gen)
    fn = _weights(4, FN, gen)
    with pytest.raises(ValueError, match=r"to_format\('e4m3fnuz'\)"):  # gfx942 takes fnuz only
        _aiter()(x, ids, w, fn.w13, fn.w2, emap, weight_mode="experts")
    with pytest.raises(ValueError, match=r"to_format\('e4m3fn'\)"):  # gfx950: e4m3fn
        _aiter(fp8=FN)(x, ids, w, fn.w13.to_format(FNUZ), fn.w2.to_format(FNUZ), emap,
                     weight_mode="experts")
    fnuz = fn.to_format(FNUZ)  # converted exactly: accepted
    out = _aiter()(x, ids, w, fnuz.w13, fnuz.w2, emap, weight_mode="experts").out
    assert rel_err(out.double(), _oracle(x, ids, w, fnuz, emap, "weighted")) < TOL
    odd = _weights(4, FNUZ, gen, h=192)
    x192, _, _ = _inputs(3, 2, 4, gen, h=192)
    with pytest.raises(ValueError, match="multiple of 128"):
        _aiter()(x192, ids, w, odd.w13, odd.w2, emap, weight_mode="experts")
    with pytest.raises(ValueError, match="bfloat16"):  # AITER's FP8 tables: bf16 output only
        _aiter()(x.half(), ids, w, fnuz.w13, fnuz.w2, emap, weight_mode="experts")
    if AiterFP8Experts.availability() is not None:  # no AITER here: the install message
        with pytest.raises(ValueError, match="experts=aiter: unavailable"):
            AiterFP8Experts()(x, ids, w, fnuz.w13, fnuz.w2, emap, weight_mode="experts")
    with pytest.raises(TypeError, match="BlockFP8Weight"):
        _aiter()(x, ids, w, fnuz.w13.weight, fnuz.w2, emap, weight_mode="experts")


def test_fake_enforces_the_fp8_contract(gen):
    """The fake refuses what AITER would mis-handle, so the adapter tests above can fail."""
    wt = _weights(2, FNUZ, gen)
    x = torch.randn(3, H, generator=gen).bfloat16()
    q = quantize_rows(x, dtype=FNUZ)
    ids = torch.tensor([[0], [1], [0]], dtype=torch.int32)
    tw = torch.ones(3, 1)
    w1 = fake_shuffle_weight(wt.w13.weight)
    w2 = fake_shuffle_weight(wt.w2.weight)
    good = dict(quant_type=FakeQuantType.per_1x128, w1_scale=wt.w13.scale_inv,
                w2_scale=wt.w2.scale_inv, dtype=torch.bfloat16)
    fake = FakeFusedMoe()
    ok = fake(x, w1, w2, tw, ids, **good)
    assert ok.dtype == torch.bfloat16
    assert ok.shape == (3, H)
    bad = [
        (dict(good, w1_scale=wt.w13.scale_inv.transpose(1, 2).contiguous()), "w1_scale"),
        (dict(good, w2_scale=wt.w2.scale_inv.double()), "w2_scale"),
        (dict(good, a1_scale=q.scale), "a1_scale given with float input"),
        (dict(good, a2_scale=q.scale), "a2_scale"),
        (dict(good, dtype=torch.float32), "unsupported out dtype"),
        (dict(good, quant_type=FakeQuantType.per_Token), "per_1x128"),
    ]
    for kw, msg in bad:
        with pytest.raises(ContractError, match=msg):
            fake(x, w1, w2, tw, ids, **kw)
    with pytest.raises(AttributeError, match="value"):  # public fused_moe: quant_type.value
        fake(x, w1, w2, tw, ids, **dict(good, quant_type=4))
    with pytest.raises(ContractError, match="a1_scale must be provided"):
        fake(q.q, w1, w2, tw, ids, **good)
    with pytest.raises(ContractError, match="a1_scale must be contiguous"):
        fake(q.q, w1, w2, tw, ids, **dict(good, a1_scale=q.scale[:, :2].contiguous()))
    fn = _weights(2, FN, gen)
    with pytest.raises(ContractError, match="misread"):
        fake(x, fake_shuffle_weight(fn.w13.weight), fake_shuffle_weight(fn.w2.weight), tw, ids,
             **dict(good, w1_scale=fn.w13.scale_inv, w2_scale=fn.w2.scale_inv))
    with pytest.raises(ContractError, match="not shuffled"):
        fake(x, wt.w13.weight, wt.w2.weight, tw, ids, **good)
    # FP8 rows with their scales give what the float rows give (AITER quantises those alike)
    assert torch.equal(fake(q.q, w1, w2, tw, ids, **dict(good, a1_scale=q.scale)), ok)
    # the scale multiplies: passing its reciprocal (a "scale" read as a divisor) is far off
    inv = dict(good, w1_scale=1 / wt.w13.scale_inv, w2_scale=1 / wt.w2.scale_inv)
    assert rel_err(fake(x, w1, w2, tw, ids, **inv).double(), ok.double()) > 0.5


@pytest.mark.gpu
def test_real_aiter_fp8_matches_reference():
    pytest.importorskip("aiter")
    if not torch.cuda.is_available() or torch.version.hip is None:
        pytest.skip("needs a ROCm GPU")
    from aiter import dtypes

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    emap = Placement.contiguous(32, 4).expert_map(2)
    x, ids, w = _inputs(511, 8, 32, gen, h=512)
    w13 = torch.randn(8, 2 * 256, 512, generator=gen) / 512**0.5
    w2 = torch.randn(8, 512, 256, generator=gen) / 16
    wt = quantize_experts(w13, w2, dtype=dtypes.fp8)
    args = [x.to(dev), ids.to(dev), w.to(dev), wt.w13.to(dev), wt.w2.to(dev), emap.to(dev)]
    from rocm_moe.experts.aiter_fp8 import aiter_stage1_is_asm

    for M in (1, 33, 511, 4096):  # issue 32 item 4: AITER's own stage-1 choice is readable
        assert aiter_stage1_is_asm(M=M, H=512, I=256, e=8, topk=9, shuffled=True,
                                   out_dtype=torch.bfloat16) is not None
    for rows in (args[0], quantize_rows(args[0], dtype=dtypes.fp8)):
        for mode in ("weighted", "raw"):
            kw = dict(weight_mode=WEIGHT_MODE[mode])
            ref = FP8ReferenceExperts()(rows, *args[1:], **kw, out_dtype=torch.float64).out
            out = AiterFP8Experts()(rows, *args[1:], **kw).out
            assert rel_err(out.double(), ref) < TOL_REF


def test_fp8_layer_runs_on_aiter(gen):
    """FP8EPMoE in MI300's encoding with the AITER backend (through the fake) is within FP8
    noise of the same layer on the reference backend."""
    from rocm_moe import RouterConfig
    from rocm_moe.layer_fp8 import FP8EPMoE

    layer = FP8EPMoE(hidden_size=256, intermediate_size=128, router=RouterConfig.qwen3_moe(4, 2),
                     fp8_dtype="e4m3fnuz", experts=_aiter(), dtype=torch.bfloat16)
    x = torch.randn(33, 256, generator=gen).bfloat16()
    out = layer(x)
    layer.experts = FP8ReferenceExperts()
    ref = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.double(), ref.double()) < TOL_REF
