"""Weight formats (rocm_moe/formats): quantiser, dequantised reference, footprint, checkpoint
reader, supports() per experts backend, and the refusals of bad input."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.experts.fp8 import FP8ReferenceExperts
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.families import ExpertTensors
from rocm_moe.formats import FORMATS, WeightFormat, format_class
from rocm_moe.formats.block_fp8 import BlockFP8Weights
from rocm_moe.formats.dense import DenseWeights
from rocm_moe.quant import quantize_weight_blocks
from tests.conftest import rel_err

# (e, H, I): odd hidden sizes (a partial 128-group), an empty rank, I a multiple of 128 (FP8)
SHAPES = {"e1_H33_I128": (1, 33, 128), "e3_H130_I128": (3, 130, 128),
          "e0_H7_I128": (0, 7, 128), "e2_H257_I256": (2, 257, 256)}


class DictCheckpoint:
    """A checkpoint reader over a dict (``formats.CheckpointReader``), checking shapes."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, shape: tuple | None = None) -> torch.Tensor:
        t = self.tensors[name]
        if shape is not None:
            assert all(s is None or s == g for s, g in zip(shape, t.shape, strict=True)), name
        return t


def _float_weights(e, H, I, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, 2 * I, H, generator=g).to(dtype) / H ** 0.5,
            torch.randn(e, H, I, generator=g).to(dtype) / I ** 0.5)


def test_worked_example():
    w = DenseWeights.quantize(torch.ones(2, 4, 3), torch.ones(2, 3, 2))
    assert w.nbytes == 144
    assert w.supports(ReferenceExperts()) is None
    assert (w.num_local, w.hidden_size, w.intermediate_size) == (2, 3, 2)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_footprint_is_nbytes(shape):
    e, H, I = shape
    w13, w2 = _float_weights(e, H, I, torch.bfloat16)
    dense = DenseWeights.quantize(w13, w2)
    assert dense.nbytes == DenseWeights.footprint(e, H, I, dtype=torch.bfloat16)
    fp8 = BlockFP8Weights.quantize(w13, w2)
    assert fp8.nbytes == BlockFP8Weights.footprint(e, H, I)
    if e:
        assert fp8.nbytes < dense.nbytes


@pytest.mark.parametrize("shape", [s for s in SHAPES.values() if s[0]],
                         ids=[k for k, s in SHAPES.items() if s[0]])
def test_block_fp8_dequantize_is_the_quantised_values(shape):
    e, H, I = shape
    w13, w2 = _float_weights(e, H, I, seed=e + H)
    fp8 = BlockFP8Weights.quantize(w13, w2, fp8_dtype="e4m3fn")
    d13, d2 = fp8.dequantize()
    assert d13.dtype == torch.float64
    assert tuple(d13.shape) == (e, 2 * I, H)
    assert torch.equal(d13, quantize_weight_blocks(w13).dequantize())
    assert rel_err(d13, w13.double()) < 4e-2
    assert rel_err(d2, w2.double()) < 4e-2
    fnuz = fp8.to_format("e4m3fnuz")  # the other encoding: the same values, bit for bit
    assert fnuz.fp8_dtype == torch.float8_e4m3fnuz
    assert all(torch.equal(a, b) for a, b in zip(fnuz.dequantize(), fp8.dequantize(),
                                                 strict=True))
    again = BlockFP8Weights.quantize(fp8.w13, fp8.w2, fp8_dtype="e4m3fnuz")  # FP8 in: converts
    assert torch.equal(again.dequantize()[1], d2)


@pytest.mark.parametrize("cls", [DenseWeights, BlockFP8Weights], ids=["dense", "block_fp8"])
def test_tensors_select_to_round_trip(cls):
    w = cls.quantize(*_float_weights(3, 130, 128))
    assert tuple(w.tensors()) == cls.tensor_names
    back = cls.from_tensors(w.tensors(), **w.options())
    assert all(torch.equal(a, b) for a, b in zip(back.dequantize(), w.dequantize(),
                                                 strict=True))
    sel = w.select([2, 0])
    assert sel.num_local == 2
    assert torch.equal(sel.dequantize()[0][0], w.dequantize()[0][2])
    assert torch.equal(w.to("cpu").dequantize()[1], w.dequantize()[1])


def test_supports_names_the_backend_and_formats():
    dense = DenseWeights.quantize(*_float_weights(1, 33, 128))
    fp8 = BlockFP8Weights.quantize(*_float_weights(1, 33, 128))
    assert fp8.supports(FP8ReferenceExperts()) is None
    reason = fp8.supports(ReferenceExperts())
    assert "reference" in reason
    assert "['dense']" in reason
    assert "block_fp8" in reason
    reason = dense.supports(FP8ReferenceExperts())
    assert "['block_fp8']" in reason
    assert "dense" in reason
    assert "not an experts backend" in dense.supports(42)


def test_supports_asks_the_backend_about_the_encoding():
    class NoFnuz(FP8ReferenceExperts):
        def format_unsupported(self, dtype, device):
            return "no e4m3fnuz here" if dtype == torch.float8_e4m3fnuz else None

    fp8 = BlockFP8Weights.quantize(*_float_weights(1, 33, 128))
    assert fp8.supports(NoFnuz()) is None
    assert fp8.to_format("e4m3fnuz").supports(NoFnuz()) == "no e4m3fnuz here"


def test_format_class():
    assert format_class("dense") is DenseWeights
    assert format_class("block_fp8") is BlockFP8Weights
    assert format_class(BlockFP8Weights) is BlockFP8Weights
    assert set(FORMATS) >= {"dense", "block_fp8", "mxfp4"}
    with pytest.raises(ValueError, match=r"weight_format='fp16'.*must be one of.*Fix:"):
        format_class("fp16")
    with pytest.raises(ValueError, match=r"weight_format=.*Fix:"):
        format_class(int)
    import importlib.util

    if importlib.util.find_spec("rocm_moe.formats.mxfp4") is not None:  # the MXFP4 slot
        assert issubclass(format_class("mxfp4"), WeightFormat)
    else:
        with pytest.raises(ValueError, match=r"weight_format='mxfp4': is not available"):
            format_class("mxfp4")


def test_options_refused_by_name():
    assert BlockFP8Weights.check_options(fp8_dtype="e4m3fnuz") == {
        "fp8_dtype": torch.float8_e4m3fnuz}
    with pytest.raises(ValueError, match=r"format_options\['fp8_dtype'\]='e5m2'.*Fix:"):
        BlockFP8Weights.check_options(fp8_dtype="e5m2")
    with pytest.raises(TypeError, match=r"format_options\['dtype'\]=torch.int32.*Fix:"):
        DenseWeights.check_options(dtype=torch.int32)
    with pytest.raises(TypeError, match=r"unexpected keyword"):
        BlockFP8Weights.check_options(block=64)


@pytest.mark.parametrize("bad", ["odd_2I", "w2_shape", "int_dtype", "w2_dtype", "2d"])
def test_dense_refuses_bad_weights_by_field(bad):
    w13, w2 = _float_weights(2, 8, 4)
    field = {"odd_2I": r"w13.shape\[1\]=7", "w2_shape": r"w2.shape=\[2, 8, 3\]",
             "int_dtype": r"w13.dtype=torch.int64", "w2_dtype": r"w2.dtype=torch.float16",
             "2d": r"w13.shape=\[8, 8\]"}[bad]
    if bad == "odd_2I":
        w13 = w13[:, :7]
    elif bad == "w2_shape":
        w2 = w2[..., :3]
    elif bad == "int_dtype":
        w13 = w13.long()
    elif bad == "w2_dtype":
        w2 = w2.half()
    else:
        w13 = w13[0]
    with pytest.raises((ValueError, TypeError), match=field + r".*Fix:"):
        DenseWeights(w13, w2)


def test_block_fp8_refuses_bad_weights_by_field():
    with pytest.raises(ValueError, match=r"w13.shape\[1\]=128: must be 2I with I a multiple"):
        BlockFP8Weights.quantize(*_float_weights(1, 33, 64))
    with pytest.raises(TypeError, match=r"w13=.*must be a quant.BlockFP8Weight.*Fix:"):
        BlockFP8Weights(torch.zeros(1, 256, 33), torch.zeros(1, 33, 128))
    fp8 = BlockFP8Weights.quantize(*_float_weights(1, 33, 128))
    fp8.w2.scale_inv[0, 0, 0] = 0.0
    with pytest.raises(ValueError, match=r"w2.scale_inv=contains 0.0.*Fix:"):
        BlockFP8Weights.quantize(fp8.w13, fp8.w2)


def test_check_values():
    dense = DenseWeights.quantize(*_float_weights(2, 8, 4))
    dense.check_values()
    dense.w2[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weights.w2.*Fix:"):
        dense.check_values()
    fp8 = BlockFP8Weights.quantize(*_float_weights(1, 33, 128))
    fp8.check_values()
    fp8.w13.scale_inv[0, 1, 0] = -1.0
    with pytest.raises(ValueError, match=r"weights.w13.scale_inv=contains -1.0.*Fix:"):
        fp8.check_values()


def _checkpoint(e, H, I, *, fp8: bool):
    names = [ExpertTensors(gate=f"e{j}.gate.weight", up=f"e{j}.up.weight",
                           down=f"e{j}.down.weight") for j in range(e)]
    w13, w2 = _float_weights(e, H, I)
    tensors = {}
    for j, n in enumerate(names):
        for name, t in ((n.gate, w13[j, :I]), (n.up, w13[j, I:]), (n.down, w2[j])):
            if fp8:
                q = quantize_weight_blocks(t)
                tensors[name], tensors[name + "_scale_inv"] = q.weight, q.scale_inv
            else:
                tensors[name] = t
    return DictCheckpoint(tensors), names, w13, w2


def test_checkpoint_readers():
    e, H, I = 3, 130, 128
    ck, names, w13, w2 = _checkpoint(e, H, I, fp8=False)
    assert DenseWeights.in_checkpoint(ck, names[0])
    assert not BlockFP8Weights.in_checkpoint(
        ck, names[0])
    dense = DenseWeights.from_checkpoint(ck, names[::2], hidden_size=H, intermediate_size=I)
    assert torch.equal(dense.w13, w13[::2])
    assert torch.equal(dense.w2, w2[::2])
    with pytest.raises(ValueError, match=r"e0.gate.weight.dtype=torch.float32: a block-FP8"):
        BlockFP8Weights.from_checkpoint(ck, names, hidden_size=H, intermediate_size=I)

    ck, names, w13, w2 = _checkpoint(e, H, I, fp8=True)
    assert BlockFP8Weights.in_checkpoint(ck, names[1])
    fp8 = BlockFP8Weights.from_checkpoint(ck, names[1:], hidden_size=H, intermediate_size=I,
                                          fp8_dtype="e4m3fnuz")
    assert fp8.fp8_dtype == torch.float8_e4m3fnuz
    assert fp8.num_local == 2
    # gate and up quantised apart equal the stack quantised (I % 128 == 0)
    assert torch.equal(fp8.dequantize()[0], quantize_weight_blocks(w13[1:]).dequantize())
    with pytest.raises(ValueError, match=r"e0.gate.weight.dtype=torch.float8_e4m3fn: a dense"):
        DenseWeights.from_checkpoint(DictCheckpoint(
            {k: v for k, v in ck.tensors.items() if not k.endswith("_scale_inv")}), names,
            hidden_size=H, intermediate_size=I)
    with pytest.raises(ValueError, match=r"intermediate_size=64: an FP8 checkpoint"):
        BlockFP8Weights.from_checkpoint(ck, names, hidden_size=H, intermediate_size=64)
    empty = BlockFP8Weights.from_checkpoint(ck, [], hidden_size=H, intermediate_size=I)
    assert empty.num_local == 0
    assert empty.nbytes == 0
