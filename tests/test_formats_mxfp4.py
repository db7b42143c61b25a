"""The MXFP4 format (rocm_moe/formats/mxfp4.py): nibble order and values against transformers'
own reader, the quantiser's error and rounding, the format protocol (footprint, checkpoint
reader of gpt-oss's fused tensors, supports()), and the refusals of bad input."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.formats import format_class
from rocm_moe.formats.mxfp4 import (
    E2M1_VALUES,
    FusedExpert,
    MXFP4Tensor,
    MXFP4Weights,
    deinterleave_rows,
    pack_e2m1,
    quantize_mxfp4,
    unpack_e2m1,
)
from rocm_moe.oracle import rel_err


def test_worked_example():
    b = pack_e2m1(torch.tensor([[1, 15]]))
    assert b.tolist() == [[0xF1]]
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, :2] = torch.tensor([1, 15])
    t = MXFP4Tensor(pack_e2m1(codes), torch.tensor([[128]], dtype=torch.uint8))
    assert t.dequantize()[0, :2].tolist() == [1.0, -12.0]
    assert t.shape == (1, 32)
    assert t.nbytes == 16 + 1


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (3, 5, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_e2m1(pack_e2m1(codes)), codes.to(torch.uint8))


def test_values_match_transformers_reader():
    """Our dequantised [E, N, K] is transformers' convert_moe_packed_tensors (which returns
    [E, K, N]) transposed: the checkpoint's nibble order and scale bias, bit for bit."""
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(1)
    E, N, G = 2, 6, 3
    blocks = torch.randint(0, 256, (E, N, G, 16), generator=g).to(torch.uint8)
    scales = torch.randint(110, 135, (E, N, G), generator=g).to(torch.uint8)
    theirs = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    ours = MXFP4Tensor(blocks.flatten(-2), scales).dequantize(torch.float32)
    assert torch.equal(ours, theirs.transpose(1, 2))
    assert list(mx.FP4_VALUES) == list(E2M1_VALUES)


@pytest.mark.parametrize("shape", [(1, 32), (3, 33, 64), (2, 7, 96)], ids=str)
def test_quantise_error_and_grid(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    q = quantize_mxfp4(w)
    d = q.dequantize()
    assert q.shape == tuple(shape)
    assert q.blocks.shape[-1] == shape[-1] // 2
    assert q.scales.shape[-1] == shape[-1] // 32
    assert rel_err(d, w.double()) < 0.15  # 4-bit values: ~10% of the norm
    # each group's largest value: at worst clamped from just under 8 to 6 (x 0.75) or rounded
    # from just over 5 up to 6 (x 1.2)
    amax_in = w.double().unflatten(-1, (-1, 32)).abs().amax(-1)
    amax_out = d.unflatten(-1, (-1, 32)).abs().amax(-1)
    assert bool((amax_out >= 0.75 * amax_in).all())
    assert bool((amax_out <= 1.2 * amax_in).all())
    assert torch.equal(quantize_mxfp4(d.float()).dequantize(), d)  # grid values stay put


def test_rounding_is_to_nearest_ties_even():
    # scale 1 (amax 4 -> floor(log2 4) - 2 = 0): 0.25 -> 0 (tie, even), 0.75 -> 1.0 (tie, even),
    # 2.5 -> 2 (tie, even), 5 -> 4 (tie, even), 1.2 -> 1.0, 5.5 -> 6
    row = torch.zeros(1, 32)
    row[0, :7] = torch.tensor([4.0, 0.25, 0.75, 2.5, 5.0, 1.2, 5.5])
    d = quantize_mxfp4(row).dequantize()
    assert d[0, :7].tolist() == [4.0, 0.0, 1.0, 2.0, 4.0, 1.0, 6.0]
    zero = quantize_mxfp4(torch.zeros(2, 32))
    assert zero.dequantize().abs().max().item() == 0


def test_format_protocol():
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(3, 64, 96, generator=g), torch.randn(3, 96, 32, generator=g)
    fmt = format_class("mxfp4").quantize(w13, w2)
    assert isinstance(fmt, MXFP4Weights)
    assert fmt.shape() == (3, 96, 32)
    assert fmt.nbytes == MXFP4Weights.footprint(3, 96, 32) == 3 * (3 * 96 * 32 * 17 // 32)
    d13, d2 = fmt.dequantize()
    assert torch.equal(d13, quantize_mxfp4(w13).dequantize())
    again = MXFP4Weights.from_tensors(fmt.tensors())
    assert torch.equal(again.dequantize()[1], d2)
    picked = fmt.select([2, 0])
    assert torch.equal(picked.dequantize()[0][0], d13[2])
    from rocm_moe.experts.reference import ReferenceExperts

    assert "compute ['dense'] weights, not mxfp4" in fmt.supports(ReferenceExperts())


def test_refusals():
    with pytest.raises(ValueError, match=r"w.shape\[-1\]=33: must be a multiple of 32"):
        quantize_mxfp4(torch.zeros(2, 33))
    with pytest.raises(TypeError, match=r"MXFP4Tensor.blocks=.*must be a uint8 tensor"):
        MXFP4Tensor(torch.zeros(2, 16), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"MXFP4Tensor.scales.shape=\[2, 2\]: must be"):
        MXFP4Tensor(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"w.*non-finite"):
        quantize_mxfp4(torch.full((1, 32), float("nan")))
    nan = MXFP4Tensor(torch.zeros(1, 16, dtype=torch.uint8), torch.full((1, 1), 255,
                                                                          dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"w13.scales=holds 255: E8M0 scale 255 is NaN"):
        nan.check_values("w13")
    with pytest.raises(TypeError, match=r"w2=Tensor.*must be a formats.mxfp4.MXFP4Tensor"):
        MXFP4Weights(quantize_mxfp4(torch.zeros(1, 64, 32)), torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match=r"w2.shape=\[1, 32, 64\]: must be \[e=1, H=32, I=32\]"):
        MXFP4Weights(quantize_mxfp4(torch.zeros(1, 64, 32)), quantize_mxfp4(torch.zeros(1, 32, 64)))


def test_layer_sizes_off_the_groups_are_refused_by_name():
    from rocm_moe import EPMoE, RouterConfig

    with pytest.raises(ValueError, match=r"hidden_size H=48: must be a multiple of 32 for "
                                         r"MXFP4 experts"):
        EPMoE(hidden_size=48, intermediate_size=32, router=RouterConfig.gpt_oss(8, 2),
              weight_format="mxfp4")
    with pytest.raises(ValueError, match=r"intermediate_size I=40: must be a multiple of 32"):
        MXFP4Weights.quantize(torch.zeros(1, 80, 64), torch.zeros(1, 64, 40))


class _Fused:
    gate_up = "L.mlp.experts.gate_up_proj"
    down = "L.mlp.experts.down_proj"


class DictCheckpoint:
    def __init__(self, tensors):
        self.tensors = tensors

    def has(self, name):
        return name in self.tensors

    def tensor(self, name, shape=None):
        t = self.tensors[name]
        assert shape is None or all(s is None or s == g for s, g in zip(shape, t.shape,
                                                                         strict=True)), name
        return t


def test_checkpoint_reader_takes_this_ranks_rows_deinterleaved():
    E, H, I = 4, 64, 32
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn(E, 2 * I, H, generator=g)  # rows alternate gate, up (the checkpoint)
    down = torch.randn(E, H, I, generator=g)
    q13, q2 = quantize_mxfp4(gate_up), quantize_mxfp4(down)
    ck = DictCheckpoint({
        _Fused.gate_up + "_blocks": q13.blocks.unflatten(-1, (H // 32, 16)),
        _Fused.gate_up + "_scales": q13.scales,
        _Fused.down + "_blocks": q2.blocks.unflatten(-1, (I // 32, 16)),
        _Fused.down + "_scales": q2.scales})
    assert MXFP4Weights.in_checkpoint(ck, _Fused)
    fmt = MXFP4Weights.from_checkpoint(ck, [FusedExpert(_Fused, e, E) for e in (3, 1)],
                                       hidden_size=H, intermediate_size=I)
    d13, d2 = fmt.dequantize()
    full = q13.dequantize()
    assert torch.equal(d13[0, :I], full[3, 0::2])  # gate rows first
    assert torch.equal(d13[0, I:], full[3, 1::2])
    assert torch.equal(d2[1], q2.dequantize()[1])
    assert torch.equal(deinterleave_rows(torch.arange(4.0)[None, :, None])[0, :, 0],
                       torch.tensor([0.0, 2.0, 1.0, 3.0]))
    empty = MXFP4Weights.from_checkpoint(ck, [], hidden_size=H, intermediate_size=I)
    assert empty.shape() == (0, H, I)
