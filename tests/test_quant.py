"""FP8 formats: block-scaled weights, per-1x128-group rows, e4m3fn <-> e4m3fnuz."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.quant import (
    BlockFP8Weight,
    FP8Rows,
    convert_fp8,
    fp8_dtype,
    fp8_max,
    quantize_rows,
    quantize_weight_blocks,
)

FORMATS = ["e4m3fn", "e4m3fnuz"]
SHAPES = [pytest.param(n, k, id=f"N{n}_K{k}") for n, k in [(1, 1), (33, 511), (128, 256),
                                                          (300, 129)]]


def test_worked_example():
    r = quantize_rows(torch.tensor([[448.0, -1.0]]))
    assert r.q.dtype == torch.float8_e4m3fn
    assert r.q.float().tolist() == [[448.0, -1.0]]
    assert r.scale.tolist() == [[1.0]]
    f = r.to_format("e4m3fnuz")
    assert f.q.dtype == torch.float8_e4m3fnuz
    assert f.q.float().tolist() == [[224.0, -0.5]]
    assert f.scale.tolist() == [[2.0]]
    assert fp8_max(torch.float8_e4m3fn) == 448
    assert fp8_max(torch.float8_e4m3fnuz) == 240


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("N", "K"), SHAPES)
def test_weight_blocks_round_trip(N, K, fmt, gen):
    w = torch.randn(3, N, K, generator=gen, dtype=torch.float64)
    w[1, : min(N, 128), : min(K, 128)] = 0  # an all-zero block: q 0, any positive scale
    b = quantize_weight_blocks(w, dtype=fmt)
    assert b.weight.dtype == fp8_dtype(fmt)
    assert b.weight.shape == w.shape
    assert b.scale_inv.shape == (3, -(-N // 128), -(-K // 128))
    assert b.scale_inv.dtype == torch.float32
    assert bool((b.scale_inv > 0).all())
    d = b.dequantize()
    assert d.dtype == torch.float64
    # Round to nearest with 3 mantissa bits: every value within half a quantum, i.e. 1/16 of
    # its magnitude, or of the block's subnormal step.
    scale = b.scale_inv.double().repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :N, :K]
    tiny = scale * 2.0 ** (-10 if fmt == "e4m3fnuz" else -9)
    assert bool(((d - w).abs() <= w.abs() / 16 + tiny).all())
    assert d[1, : min(N, 128), : min(K, 128)].eq(0).all()
    # Each block's largest magnitude maps to the format's largest value exactly.
    assert b.weight.float().abs().amax().item() == fp8_max(fp8_dtype(fmt))
    assert b[2].weight.shape == (N, K)
    assert torch.equal(b[2].dequantize(), d[2])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H", [1, 33, 128, 511])
def test_rows_round_trip(H, fmt, gen):
    x = torch.randn(7, H, generator=gen) * torch.logspace(-3, 3, 7)[:, None]
    r = quantize_rows(x, dtype=fmt)
    assert r.scale.shape == (7, -(-H // 128))
    assert r.scale.dtype == torch.float32
    err = (r.dequantize() - x.double()).norm() / x.double().norm()
    assert 0 < err.item() < 0.04  # e4m3: ~2% rms
    zero = quantize_rows(torch.zeros(2, H), dtype=fmt)
    assert zero.dequantize().eq(0).all()


@pytest.mark.parametrize(("N", "K"), SHAPES)
def test_fn_to_fnuz_keeps_every_dequantised_value(N, K, gen):
    w = torch.randn(2, N, K, generator=gen)
    w[0, 0, 0] = -0.0  # e4m3fn -0 (0x80) is NaN in fnuz: must become +0
    b = quantize_weight_blocks(w, dtype="e4m3fn")
    assert b.weight.view(torch.uint8)[0, 0, 0].item() == 0x80
    u = b.to_format("e4m3fnuz")
    assert u.weight.dtype == torch.float8_e4m3fnuz
    assert torch.equal(u.scale_inv, b.scale_inv * 2)
    assert torch.equal(u.dequantize(), b.dequantize())  # bit-identical values
    assert not torch.isnan(u.weight.float()).any()
    assert torch.equal(u.to_format("e4m3fn").dequantize(), b.dequantize())


def test_fnuz_240_cannot_go_back_to_fn():
    q = torch.tensor([240.0, 1.0]).to(torch.float8_e4m3fnuz)
    with pytest.raises(ValueError, match=r"480 in e4m3fn.*Fix: requantise"):
        convert_fp8(q, torch.ones(1), torch.float8_e4m3fn)
    nan = torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="NaN"):
        convert_fp8(nan, torch.ones(1), torch.float8_e4m3fnuz)


def test_format_checks():
    q = torch.zeros(4, 300).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale_inv.shape=\[1, 2\]: must be \[1, 3\]"):
        BlockFP8Weight(q, torch.ones(1, 2))
    with pytest.raises(TypeError, match=r"scale_inv.dtype=torch.bfloat16: must be torch.float32"):
        BlockFP8Weight(q, torch.ones(1, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"weight.dtype=torch.float32: must be one of"):
        BlockFP8Weight(q.float(), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"scale.shape=\[4, 2\]: must be \[4, 3\]"):
        FP8Rows(q, torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"fp8_dtype='e5m2': must be one of"):
        fp8_dtype("e5m2")
    with pytest.raises(TypeError, match=r"x=.*must be a float16/bfloat16/float32/float64"):
        quantize_rows(q)
