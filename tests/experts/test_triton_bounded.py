"""TritonExperts on a capacity-sized batch (``num_rows``: rows past the device count are empty):
the persistent launches and the bounded slot sum give the reference's rows, read nothing past
the count, and refuse malformed bounds (issue 33, item 4)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, ReferenceExperts
from rocm_moe.experts.triton import TritonExperts
from tests.conftest import DEVICE, rel_err

pytest.importorskip("triton")

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
# (capacity rows, rows received, K, E, W, H, I): none, one, some, all rows; odd sizes
CASES = [pytest.param(*c, id="cap{}_n{}_K{}_E{}_W{}_H{}_I{}".format(*c)) for c in
         [(33, 0, 4, 16, 2, 64, 32), (33, 1, 4, 16, 2, 64, 32), (64, 17, 8, 32, 4, 64, 32),
          (40, 40, 2, 8, 1, 80, 48), (9, 5, 2, 8, 1, 36, 20)]]


def _case(cap, n, K, E, W, H, I, dtype, gen):
    emap = Placement.contiguous(E, W).expert_map(W - 1)
    e = emap.num_local
    x = torch.randn(cap, H, generator=gen).to(dtype)
    x[n:] = float("nan")  # stale rows past the count: never read
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(cap)])
    ids[torch.rand(cap, K, generator=gen) < 0.1] = -1
    ids[n:] = -1
    w = torch.rand(cap, K, generator=gen)
    w13 = (torch.randn(e, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    w2 = (torch.randn(e, H, I, generator=gen) / I**0.5).to(dtype)
    num_rows = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    return [t.to(DEVICE) for t in (x, ids.to(torch.int32), w, w13, w2)] + [emap.to(DEVICE)], \
        num_rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("cap", "n", "K", "E", "W", "H", "I"), CASES)
@pytest.mark.parametrize("tma", [True, False], ids=["desc", "ptr"])
def test_bounded_rows_match_reference(cap, n, K, E, W, H, I, dtype, tma, gen):
    args, num_rows = _case(cap, n, K, E, W, H, I, dtype, gen)
    clean = [a.nan_to_num(0.0) if i == 0 else a for i, a in enumerate(args)]
    for mode in ("experts", "combine"):
        ref = ReferenceExperts()(*clean, weight_mode=mode)
        for expected in (None, n, cap):
            grouped = TritonExperts(tma=tma, path="grouped")  # (the small path: its own file)
            out = grouped(*args, weight_mode=mode, num_rows=num_rows, expected_rows=expected)
            assert out.out.shape == ref.out.shape
            got, want = out.out[:n], ref.out[:n]
            assert not got.isnan().any(), (mode, expected)
            if n:
                assert rel_err(got, want) < TOL[dtype], (mode, expected)
            if mode == "combine":  # raw rows past the count stay exact zeros
                assert out.out[n:].eq(0).all()


def test_bounded_rows_equal_unbounded_bits(gen):
    """The persistent launches compute each tile as the one-tile-per-program launches do:
    the same bits (invariant mode relies on tile math alone)."""
    args, num_rows = _case(64, 17, 8, 32, 4, 64, 32, torch.float16, gen)
    args[0] = args[0].nan_to_num(0.0)
    for mode in ("experts", "combine"):
        grouped = TritonExperts(tma=False, path="grouped")
        a = grouped(*args, weight_mode=mode).out[:17]
        b = grouped(*args, weight_mode=mode, num_rows=num_rows, expected_rows=64).out[:17]
        assert torch.equal(a, b), mode


@pytest.mark.parametrize(("num_rows", "expected", "match"), [
    (torch.tensor([3]), None, "num_rows"),  # int64
    (torch.tensor([3, 4], dtype=torch.int32), None, "num_rows"),
    (torch.tensor([99], dtype=torch.int32), None, r"num_rows\[0\]"),
    (torch.tensor([-1], dtype=torch.int32), None, r"num_rows\[0\]"),
    (torch.tensor([1], dtype=torch.int32), None, r"topk_ids\[num_rows:\]"),
    (None, 99, "expected_rows"), (None, 2.0, "expected_rows"), (None, True, "expected_rows"),
])
def test_bad_row_bounds_refused(num_rows, expected, match, gen):
    args, _ = _case(9, 5, 2, 8, 1, 36, 20, torch.float16, gen)
    nr = None if num_rows is None else num_rows.to(DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        TritonExperts()(*args, weight_mode="experts", num_rows=nr, expected_rows=expected)


def test_reference_ignores_bound_and_checks_it(gen):
    """Backends without bounded_rows compute every row; the bound is still checked."""
    args, num_rows = _case(9, 5, 2, 8, 1, 36, 20, torch.float16, gen)
    args[0] = args[0].nan_to_num(0.0)
    a = ReferenceExperts()(*args, weight_mode="experts").out
    b = ReferenceExperts()(*args, weight_mode="experts", num_rows=num_rows).out
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected_rows"):
        ReferenceExperts()(*args, weight_mode="experts", expected_rows=-1)


@pytest.mark.parametrize("n", [0, 1, 13], ids=lambda n: f"n{n}")
def test_fp8_bounded_rows_equal_unbounded(n, gen):
    """The FP8 experts' persistent launches and bounded slot sum: the rows below the count
    are the same bits as the one-tile-per-program launches give; raw rows past it stay zero."""
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts
    from rocm_moe.quant import quantize_weight_blocks

    cap, K, E, H, I = 20, 2, 8, 128, 128
    emap = Placement.contiguous(E, 2).expert_map(1).to(DEVICE)
    x = torch.randn(cap, H, generator=gen).to(DEVICE)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(cap)])
    ids[n:] = -1
    ids = ids.to(torch.int32).to(DEVICE)
    w = torch.rand(cap, K, generator=gen).to(DEVICE)
    w13 = quantize_weight_blocks(torch.randn(4, 2 * I, H, generator=gen) / H**0.5).to(DEVICE)
    w2 = quantize_weight_blocks(torch.randn(4, H, I, generator=gen) / I**0.5).to(DEVICE)
    num_rows = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    dt = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    for mode in ("experts", "combine"):
        grouped = TritonFP8Experts(path="grouped")  # (auto: 1 row takes the small path)
        a = grouped(x, ids, w, w13, w2, emap, weight_mode=mode, out_dtype=dt).out
        b = grouped(x, ids, w, w13, w2, emap, weight_mode=mode, out_dtype=dt,
                    num_rows=num_rows, expected_rows=n).out
        assert torch.equal(a[:n], b[:n]), mode
        if mode == "combine":
            assert b[n:].eq(0).all()
