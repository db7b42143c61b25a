"""FP8 dispatch on the torch backend (gloo on CPUs, W = 1, 2, 3; NCCL on GPUs): rows quantised on
the owner, scales with the row, FP8 experts consuming them in place, combine in the rows' dtype.

The strongest check: quantising on the owner before transport or on the receiver inside the
experts is the same arithmetic, so an FP8EPMoE over TorchFP8Dispatcher must equal, bit for
bit, the same layer over TorchDispatcher; and both are checked against the float64 oracles.
"""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, RouterConfig, synthetic
from rocm_moe.comm.rows import row_words
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.comm.torch_fp8 import TorchFP8Dispatcher, fp8_row_bytes, pack_fp8, unpack_fp8
from rocm_moe.distributed import launch
from rocm_moe.experts.fp8 import fp8_dense_reference
from rocm_moe.layer_fp8 import FP8_TOLERANCE, FP8EPMoE
from rocm_moe.quant import BlockFP8Weight, FP8Rows, quantize_rows, quantize_weight_blocks

E, K, H, I = 12, 3, 200, 128  # H: a partial 128-group and a row of 200 FP8 bytes


def test_payload_round_trip_and_bytes(gen):
    x = torch.randn(5, H, generator=gen)
    rows = quantize_rows(x)
    p = pack_fp8(rows)
    assert p.shape == (5, fp8_row_bytes(H))
    assert fp8_row_bytes(H) == 4 * 2 + 200
    wide = torch.zeros(5, p.shape[1] + 12, dtype=torch.uint8)  # a strided receive buffer
    wide[:, :p.shape[1]] = p
    back = unpack_fp8(wide[:, :p.shape[1]], H, torch.float8_e4m3fn, torch.float32)
    assert back.q.data_ptr() == wide.data_ptr() + 8  # views, no copy
    assert torch.equal(back.dequantize(), rows.dequantize())
    # DeepSeek-V3's row: 1.93x fewer bytes than bfloat16 on the wire
    bf16 = 4 * row_words(7168, torch.bfloat16, 8)
    fp8 = 4 * row_words(fp8_row_bytes(7168), torch.uint8, 8)
    assert (bf16, fp8) == (14400, 7456)


def _layer(dispatcher, seed, fp8_dtype):
    layer = FP8EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                     dispatcher=dispatcher, fp8_dtype=fp8_dtype, dtype=torch.float32)
    layer.reset_parameters(seed)
    return layer


def _worker(info, seed, fp8_dtype):
    W, rank = info.world_size, info.rank
    p = Placement.contiguous(E, W)
    kw = dict(hidden_size=H, top_k=K, dtype=torch.float32)
    plain = _layer(TorchDispatcher(p, **kw), seed, fp8_dtype)
    fp8 = _layer(TorchFP8Dispatcher(p, fp8_dtype=fp8_dtype, **kw), seed, fp8_dtype)
    T = [33, 0, 1][rank % 3]  # rank 1 has no tokens
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + rank))
    d = fp8.dispatcher.dispatch(x, *_routing(plain, x))
    out = {"rows_fp8": isinstance(d.x, FP8Rows), "R": d.x.shape[0]}
    for mode in ("experts", "combine"):
        plain.weight_mode = fp8.weight_mode = mode
        a, b = plain(x, return_raw=True), fp8(x, return_raw=True)
        out[f"{mode}_equal"] = torch.equal(a.out, b.out) and torch.equal(a.raw, b.raw)
    # the float64 oracles over every expert (weights regenerated from the seed, quantised)
    ws = [synthetic.expert_weights(seed, g, H, I) for g in range(E)]
    w13 = quantize_weight_blocks(torch.stack([w for w, _ in ws]), dtype=fp8_dtype)
    w2 = quantize_weight_blocks(torch.stack([w for _, w in ws]), dtype=fp8_dtype)
    res = fp8(x, return_raw=True)
    y_q = fp8_dense_reference(x, res.topk_weights, res.topk_ids, w13, w2)
    y_m = fp8_dense_reference(x, res.topk_weights, res.topk_ids, w13, w2,
                              quantize_activations=False)
    out["err_q"] = _rel(res.out, y_q)
    out["err_model"] = _rel(res.out, y_m)
    return out


def _routing(layer, x):
    r = layer.route_tokens(x)
    return r.topk_weights, r.topk_ids


def _rel(a, b) -> float:
    n = b.double().norm().item()
    return (a.double() - b.double()).norm().item() / n if n else a.double().norm().item()


@pytest.mark.parametrize(("W", "fp8_dtype"), [(1, "e4m3fn"), (2, "e4m3fnuz"), (3, "e4m3fn")],
                         ids=["W1_fn", "W2_fnuz", "W3_fn"])
def test_fp8_dispatch_equals_quantising_in_the_experts(W, fp8_dtype):
    results = launch(W, _worker, 5, fp8_dtype, backend="gloo", timeout_s=120)
    for rank, r in enumerate(results):
        assert r["rows_fp8"], rank
        assert r["experts_equal"], (rank, r)
        assert r["combine_equal"], (rank, r)
        assert r["err_q"] < 1e-5, (rank, r)
        assert r["err_model"] < FP8_TOLERANCE, (rank, r)
    assert sum(r["R"] for r in results) > 0


def test_fp8_dispatcher_needs_matching_weights():
    """Rows in e4m3fnuz meeting e4m3fn weights are refused by the experts, naming both."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts

    q = quantize_rows(torch.randn(2, 128), dtype="e4m3fnuz")
    w13 = BlockFP8Weight(torch.zeros(1, 256, 128).to(torch.float8_e4m3fn), torch.ones(1, 2, 1))
    w2 = BlockFP8Weight(torch.zeros(1, 128, 128).to(torch.float8_e4m3fn), torch.ones(1, 1, 1))
    emap = Placement.contiguous(1, 1).expert_map(0)
    with pytest.raises(ValueError, match=r"x.dtype=torch.float8_e4m3fnuz: must be the weights'"):
        FP8ReferenceExperts()(q, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1), w13,
                              w2, emap, weight_mode="experts")
