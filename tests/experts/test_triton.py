"""TritonExperts against the reference (interpreter on CPUs in float16; compiled on GPUs)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, ReferenceExperts
from rocm_moe.experts.triton import TritonExperts, block_config
from tests.conftest import DEVICE, rel_err

pytest.importorskip("triton")

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
# (R, K, E, W, H, I), every routing variant. BLOCK_M by mean slots per local expert: 16 (R1),
# 32 (R33), 64 (BLOCK64 below).
SHAPES = [(1, 1, 4, 1, 64, 32), (33, 4, 16, 2, 64, 32), (7, 2, 8, 2, 80, 48),
          (9, 2, 8, 1, 36, 20)]  # rows of 72 and 40 bytes: no TMA
# BLOCK_M 64: random routing at R511 (8 tiles of 64 per expert, the last partial; ~9 s a case in
# the interpreter); all_on_one / nonlocal_rows at R97 (776 slots on 8 local experts; all_on_one
# puts 97 rows on one expert: 2 tiles, the second partial), ~2 s a case. On a GPU every variant
# runs at R511, as before.
VARIANTS = ["random", "all_on_one", "nonlocal_rows"]
R511 = (511, 8, 32, 4, 64, 32)
BLOCK64 = [(v, R511) for v in VARIANTS] if DEVICE.type == "cuda" else \
    [("random", R511), ("all_on_one", (97, *R511[1:])), ("nonlocal_rows", (97, *R511[1:]))]
CASES = [pytest.param(v, *s, id=f"{v}-R{s[0]}_K{s[1]}_E{s[2]}_W{s[3]}_H{s[4]}_I{s[5]}")
         for v, s in [(v, s) for v in VARIANTS for s in SHAPES] + BLOCK64]


def _case(R, K, E, W, H, I, dtype, gen, *, all_on_one=False, nonlocal_rows=False):
    p = Placement.contiguous(E, W)
    rank = W - 1
    emap = p.expert_map(rank)
    e = emap.num_local
    x = torch.randn(R, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(R)])
    if all_on_one:  # every row uses local expert L (and K - 1 other, distinct experts)
        L = p.local_experts(rank)[0]
        others = torch.tensor([g for g in range(E) if g != L])
        ids = torch.stack([torch.cat([torch.tensor([L]), others[torch.randperm(E - 1,
                          generator=gen)[:K - 1]]]) for _ in range(R)])
    if nonlocal_rows and W > 1:
        ids[: R // 2] = torch.stack([torch.randperm(E // W, generator=gen)[:K]
                                     for _ in range(R // 2)])  # rank 0's experts only
    ids[torch.rand(R, K, generator=gen) < 0.1] = -1
    w = torch.rand(R, K, generator=gen)
    w13 = (torch.randn(e, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    w2 = (torch.randn(e, H, I, generator=gen) / I**0.5).to(dtype)
    return [t.to(DEVICE) for t in (x, ids.to(torch.int32), w, w13, w2)] + [emap.to(DEVICE)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("variant", "R", "K", "E", "W", "H", "I"), CASES)
@pytest.mark.parametrize("tma", [True, False], ids=["desc", "ptr"])
def test_matches_reference(R, K, E, W, H, I, dtype, variant, tma, gen):
    args = _case(R, K, E, W, H, I, dtype, gen, all_on_one=variant == "all_on_one",
                 nonlocal_rows=variant == "nonlocal_rows")
    for mode in ("experts", "combine"):
        ref = ReferenceExperts()(*args, weight_mode=mode)
        out = TritonExperts(tma=tma, path="grouped")(*args, weight_mode=mode)  # (small path:
        # tests/experts/test_triton_small.py)
        assert out.weights_applied == ref.weights_applied
        assert out.out.shape == ref.out.shape
        assert rel_err(out.out, ref.out) < TOL[dtype], mode
        if mode == "combine":
            local = args[5].local_ids(args[1]) >= 0
            assert out.out[~local].eq(0).all()  # non-local and empty slots are exact zeros


def test_operands_use_descriptors_only_where_tma_allows():
    from triton.tools.tensor_descriptor import TensorDescriptor

    from rocm_moe.experts.triton import _operand

    w = torch.zeros(64, 40, dtype=torch.float16)  # rows of 80 bytes: a multiple of 16
    d, desc = _operand(w, [16, 32], True)
    assert desc
    assert isinstance(d, TensorDescriptor)
    assert d.block_shape == [16, 32]
    assert _operand(w, [16, 32], False) == (w, False)
    odd = torch.zeros(64, 36, dtype=torch.float16)  # 72-byte rows
    assert _operand(odd, [16, 32], True) == (odd, False)
    shifted = w.view(-1)[1:].as_strided((60, 32), (40, 1))  # base 2 bytes past an aligned one
    assert _operand(shifted, [16, 32], True) == (shifted, False)


def test_worked_example():
    H, I = 16, 16
    x = torch.zeros(1, H, dtype=torch.float16)
    x[0, 0] = 1
    w13 = torch.zeros(1, 2 * I, H, dtype=torch.float16)
    w13[0, :I, :I] = torch.eye(I) * 4  # gate
    w13[0, I:, :I] = torch.eye(I) * 4  # up
    w2 = torch.eye(H, I, dtype=torch.float16)[None]
    args = [t.to(DEVICE) for t in (x, torch.tensor([[0]], dtype=torch.int32),
                                   torch.tensor([[0.5]]), w13, w2)]
    out = TritonExperts()(*args, Placement.contiguous(1, 1).expert_map(0).to(DEVICE),
                          weight_mode="experts").out
    expect = 0.5 * torch.nn.functional.silu(torch.tensor(4.0)) * 4
    assert abs(out[0, 0].item() - expect.item()) < 1e-2
    assert out[0, 1:].abs().max().item() == 0


def test_block_config_and_supports():
    assert block_config(8, 8)["BLOCK_M"] == 16
    assert block_config(4096, 8)["BLOCK_M"] == 64
    reason = TritonExperts().supports(mode="raw", dtype=torch.float32, device=DEVICE)
    assert "float16" in reason or "bfloat16" in reason


@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
def test_layer_with_triton_experts(weight_mode):
    from rocm_moe import EPMoE, RouterConfig, dense_moe_reference

    layer = EPMoE(hidden_size=64, intermediate_size=32, router=RouterConfig.qwen3_moe(16, 4),
                  experts=TritonExperts(), weight_mode=weight_mode, dtype=torch.float16,
                  device=DEVICE)
    layer.reset_parameters(seed=2)
    x = torch.randn(33, 64).half().to(DEVICE)
    out = layer(x, return_raw=True)
    ref, raw = dense_moe_reference(x, out.topk_weights, out.topk_ids, layer.w13, layer.w2)
    assert rel_err(out.out, ref) < 5e-3
    assert rel_err(out.raw, raw) < 5e-3
    assert rel_err(layer(x), ref) < 5e-3


def test_config_buckets_keep_tiny_batches_apart():
    from rocm_moe.experts.triton import _bucket

    assert [_bucket(8 * m / 128) for m in (1, 4, 16, 64)] == ["0.0625", "0.25", "1", "4"]
    assert _bucket(0) == "0"
    assert _bucket(3) == "4"


def test_old_triton_without_descriptors_loads_through_pointers(monkeypatch):
    import builtins

    from rocm_moe.experts import triton as tx

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where descriptors are otherwise used
    assert tx.tma_supported(torch.device("cpu"))
    real_import = builtins.__import__

    def no_descriptors(name, *args, **kwargs):
        if name == "triton.tools.tensor_descriptor":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    tx._has_tensor_descriptors.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_descriptors)
    try:
        assert not tx.tma_supported(torch.device("cpu"))
    finally:
        monkeypatch.setattr(builtins, "__import__", real_import)
        tx._has_tensor_descriptors.cache_clear()
