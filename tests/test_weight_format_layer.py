"""One EPMoE for every weight format (issue 30 item 1): ``weight_format`` / ``format_options``,
the dispatchers' wire format as a parameter (``fp8_dtype``), the deprecated FP8 aliases, and
``DispatchResult.row_bound``."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, RouterConfig
from rocm_moe.comm.base import CombineHandle, DispatchResult
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.distributed import launch
from rocm_moe.experts.fp8 import FP8ReferenceExperts
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.formats.block_fp8 import BlockFP8Weights
from rocm_moe.formats.dense import DenseWeights
from rocm_moe.layer import EPMoE
from rocm_moe.layer_fp8 import FP8EPMoE
from rocm_moe.quant import FP8Rows, quantize_rows

H, I, E, K = 130, 128, 6, 2  # H: one full and one partial 128-group


def _layer(**kw):
    return EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K), **kw)


def _x(T, seed=0):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [1, 33], ids=["T1", "T33"])
def test_block_fp8_layer_is_the_fp8_layer(T):
    new = _layer(weight_format="block_fp8", format_options={"fp8_dtype": "e4m3fnuz"})
    with pytest.warns(DeprecationWarning, match="FP8EPMoE"):
        old = FP8EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                       fp8_dtype="e4m3fnuz")
    assert isinstance(new.experts, FP8ReferenceExperts)  # the reference's FP8 kernel
    assert new.weight_format == old.weight_format == "block_fp8"
    assert new.fp8_dtype == torch.float8_e4m3fnuz
    assert isinstance(new.weights, BlockFP8Weights)
    assert new.expert_bytes == BlockFP8Weights.footprint(E, H, I)
    x = _x(T)
    assert torch.equal(new(x), old(x))
    dense = _layer()
    assert dense.weight_format == "dense"
    assert dense.fp8_dtype is None
    assert isinstance(dense.weights, DenseWeights)
    assert dense.expert_bytes == DenseWeights.footprint(E, H, I, dtype=torch.float32)
    # the FP8 layer's weights are the dense layer's (same seed), quantised
    want = BlockFP8Weights.quantize(dense.w13.detach(), dense.w2.detach(), fp8_dtype="e4m3fnuz")
    assert torch.equal(new.weights.dequantize()[0], want.dequantize()[0])


def test_load_experts_takes_a_format_object():
    a, b = _layer(weight_format="block_fp8"), _layer(weight_format="block_fp8",
                                                     format_options={"fp8_dtype": "e4m3fnuz"})
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    a.load_experts(w13, w2)
    b.load_experts(BlockFP8Weights.quantize(w13, w2))  # e4m3fn, converted to the layer's
    assert b.fp8_dtype == torch.float8_e4m3fnuz
    assert torch.equal(a.weights.dequantize()[1], b.weights.dequantize()[1])
    d = _layer()
    d.load_experts(DenseWeights(w13, w2))
    assert torch.equal(d.w13, w13)
    with pytest.raises(TypeError, match=r"w2=.*must be None when w13 is a WeightFormat.*Fix:"):
        d.load_experts(DenseWeights(w13, w2), w2)
    with pytest.raises(ValueError, match=r"w13.shape\[0\]=2: must be E=6.*Fix:"):
        a.load_experts(w13[:2], w2[:2])


def test_quantised_buffers_survive_a_dtype_cast():
    layer = _layer(weight_format="block_fp8").to(torch.bfloat16)
    assert layer.w13.dtype == torch.bfloat16
    assert layer.w13_fp8.dtype == torch.float8_e4m3fn
    assert layer.w13_scale_inv.dtype == torch.float32
    assert layer(_x(5).bfloat16()).dtype == torch.bfloat16


def test_bad_format_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"weight_format='fp4': must be one of.*Fix:"):
        _layer(weight_format="fp4")
    with pytest.raises(TypeError, match=r"format_options=.*must be a dict or None.*Fix:"):
        _layer(weight_format="block_fp8", format_options="e4m3fn")
    with pytest.raises(TypeError, match=r"format_options=\['dtype'\]: the block_fp8 format "
                       r"takes \['fp8_dtype'\].*Fix:"):
        _layer(weight_format="block_fp8", format_options={"dtype": torch.bfloat16})
    with pytest.raises(ValueError, match=r"format_options\['fp8_dtype'\]='e5m2'.*Fix:"):
        _layer(weight_format="block_fp8", format_options={"fp8_dtype": "e5m2"})
    with pytest.raises(ValueError, match=r"experts=reference: computes \['block_fp8'\] expert "
                       r"weights, not weight_format='dense'.*Fix:"):
        _layer(experts=FP8ReferenceExperts())


def test_experts_swapped_for_another_format_are_refused_before_dispatch():
    layer = _layer(weight_format="block_fp8")
    layer.experts = ReferenceExperts()  # a float backend on FP8 weights
    with pytest.raises(ValueError, match=r"weight_format=block_fp8: experts=reference cannot "
                       r"compute it: .*\['dense'\].*Fix:"):
        layer(_x(3))


def test_backends_name_their_kernel_for_a_format():
    ref = ReferenceExperts()
    assert ref.for_weight_format("dense") is ref
    assert isinstance(ref.for_weight_format("block_fp8"), FP8ReferenceExperts)
    assert ref.for_weight_format("int4") is None
    fp8 = FP8ReferenceExperts()
    assert fp8.for_weight_format("block_fp8") is fp8
    assert fp8.for_weight_format("dense") is None


def test_fp8_dispatcher_aliases_are_deprecated():
    from rocm_moe.comm.torch_fp8 import TorchFP8Dispatcher

    with pytest.warns(DeprecationWarning, match="TorchDispatcher"), \
            pytest.raises(ValueError, match=r"torch\.distributed=not initialised"):
        TorchFP8Dispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32)


def test_local_dispatcher_wire_format():
    p = Placement.contiguous(E, 1)
    disp = LocalDispatcher(p, fp8_dtype="e4m3fn", hidden_size=H, top_k=K, dtype=torch.float32)
    assert disp.name == "local-fp8"
    assert disp.config()["fp8_dtype"] == "torch.float8_e4m3fn"
    x = _x(33)
    ids = torch.tensor([[0, 1]] * 33, dtype=torch.int32)
    d = disp.dispatch(x, torch.full((33, K), 0.5), ids)
    assert isinstance(d.x, FP8Rows)
    assert torch.equal(d.x.dequantize(), quantize_rows(x).dequantize())
    # the FP8 layer gives the same output whether the rows arrive quantised or not
    fp8 = _layer(weight_format="block_fp8", dispatcher=disp)
    plain = _layer(weight_format="block_fp8")
    assert torch.equal(fp8(x), plain(x))
    with pytest.raises(ValueError, match=r"fp8_dtype='e5m2': must be one of \['e4m3fn'.* None"):
        LocalDispatcher(p, fp8_dtype="e5m2")
    with pytest.raises(TypeError, match=r"dtype=torch.float64: must be one of .*Fix:"):
        LocalDispatcher(p, fp8_dtype="e4m3fn", dtype=torch.float64)


def _handle(T):
    z = torch.zeros(T, K, dtype=torch.int32)
    return CombineHandle(dispatcher_id=0, batch_id=0, num_tokens=T, num_received=T,
                         topk_ids=z, topk_weights=z.float(), recv_topk_ids=z,
                         recv_topk_weights=z.float(), dtype=torch.float32)


def test_row_bound():
    x = torch.zeros(64, 4)
    ids, w = torch.zeros(64, K, dtype=torch.int32), torch.zeros(64, K)
    sized = DispatchResult(x=x, topk_ids=ids, topk_weights=w, handle=_handle(64))
    assert sized.row_bound(3, 4) == {}
    n = torch.tensor([7], dtype=torch.int32)
    cap = DispatchResult(x=x, topk_ids=ids, topk_weights=w, handle=_handle(64), num_valid=n)
    bound = cap.row_bound(3, 4)
    assert bound["num_rows"] is n
    assert bound["expected_rows"] == 12
    assert cap.row_bound(33, 4)["expected_rows"] == 64  # at most R
    assert cap.row_bound(0, 1)["expected_rows"] == 0
    for bad in (True, -1, 2.0):
        with pytest.raises(TypeError, match=r"num_tokens=.*must be an int >= 0.*Fix:"):
            cap.row_bound(bad, 4)
    with pytest.raises(TypeError, match=r"world_size=None: must be an int >= 0.*Fix:"):
        sized.row_bound(3, None)


def _torch_worker(info):
    from rocm_moe.comm.torch import TorchDispatcher

    p = Placement.contiguous(E, info.world_size)
    kw = dict(hidden_size=H, top_k=K, dtype=torch.float32)
    disp = TorchDispatcher(p, fp8_dtype="e4m3fn", **kw)
    fp8 = _layer(weight_format="block_fp8", dispatcher=disp)
    plain = _layer(weight_format="block_fp8", dispatcher=TorchDispatcher(p, **kw))
    x = _x([5, 0][info.rank], seed=info.rank)  # rank 1 sends no tokens
    r = fp8.route_tokens(x)
    d = disp.dispatch(x, r.topk_weights, r.topk_ids)
    disp.abandon(d.handle, "test", RuntimeError("only looked"))  # (every rank leaves it)
    return dict(name=disp.name, fp8_rows=isinstance(d.x, FP8Rows), cfg=disp.config(),
                equal=torch.equal(fp8(x), plain(x)))


def test_torch_dispatcher_wire_format_W2():
    out = launch(2, _torch_worker, backend="gloo", timeout_s=120)
    for r in out:
        assert r["name"] == "torch-fp8"
        assert r["fp8_rows"]
        assert r["cfg"]["fp8_dtype"] == "torch.float8_e4m3fn"
        assert r["equal"]


@pytest.mark.gpu
def test_block_fp8_layer_takes_the_triton_fp8_kernel_on_a_gpu():
    """EPMoE(weight_format="block_fp8", experts=TritonExperts()) runs the Triton FP8 experts
    (the float backend's kernel for the format) and agrees with the reference FP8 layer."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU (Triton FP8 experts)")
    from rocm_moe.experts.triton import TritonExperts
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts
    from rocm_moe.formats.block_fp8 import FP8_TOLERANCE
    from rocm_moe.quant import native_fp8_dtype

    opts = {"fp8_dtype": native_fp8_dtype("cuda")}
    kw = dict(weight_format="block_fp8", format_options=opts, dtype=torch.bfloat16)
    gpu = _layer(experts=TritonExperts(), device="cuda", **kw)
    ref = _layer(**kw)
    assert isinstance(gpu.experts, TritonFP8Experts)
    for T in (1, 33, 511):
        x = _x(T, seed=T).bfloat16()
        got, want = gpu(x.cuda()).cpu().double(), ref(x).double()
        assert (got - want).norm() / want.norm() < FP8_TOLERANCE, T
