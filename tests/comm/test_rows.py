"""rows.pack_rows / rows.gather_sum: the Triton kernels against the torch versions.

Without a GPU the kernels run in Triton's interpreter (float16/float32 there: the interpreter
of triton 3.9 miscomputes bfloat16); on a GPU they are compiled and bfloat16 is tested too.
"""

from __future__ import annotations

import pytest
import torch

from rocm_moe.comm import rows
from tests.conftest import DEVICE

pytest.importorskip("triton")

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
GRID = [pytest.param(T, W, K, H, id=f"T{T}_W{W}_K{K}_H{H}")
        for T, W, K, H in [(1, 1, 1, 2), (33, 2, 4, 64), (511, 4, 8, 96), (7, 8, 2, 1030)]]
# pack_rows at T511 runs 511 programs (~6 s in the interpreter): float16 only there on CPUs;
# float32's row words are packed at T1, T33 and T7 (H1030: three column blocks).
PACK_CASES = [pytest.param(*p.values, d, id=f"{p.id}-{d}") for p in GRID for d in DTYPES
              if DEVICE.type == "cuda" or not (p.values[0] == 511 and d == torch.float32)]


def _positions(T, W, gen):
    """Random destinations: (csum [W, T], pos [T, W], rows sent)."""
    send_WT = (torch.rand(W, T, generator=gen) < 0.6).long()
    csum = send_WT.cumsum(1)
    counts = send_WT.sum(1)
    pos = torch.where(send_WT > 0, (counts.cumsum(0) - counts)[:, None] + csum - 1,
                      torch.full_like(send_WT, -1)).T.contiguous()
    return csum.to(DEVICE), pos.to(DEVICE), int(counts.sum())


@pytest.mark.parametrize(("T", "W", "K", "H", "dtype"), PACK_CASES)
def test_pack_rows_triton_matches_torch(T, W, K, H, dtype, gen):
    x = torch.randn(T, H, generator=gen).to(dtype).to(DEVICE)
    ids = torch.randint(-1, 64, (T, K), generator=gen, dtype=torch.int32).to(DEVICE)
    w = torch.rand(T, K, generator=gen).to(DEVICE)
    csum, pos, S = _positions(T, W, gen)
    a, pos_a = rows.pack_rows(x, ids, w, csum, S, impl="triton")
    b, pos_b = rows.pack_rows(x, ids, w, csum, S, impl="torch")
    assert torch.equal(pos_a, pos)
    assert torch.equal(pos_b, pos)
    assert torch.equal(a, b)
    rx, rids, rw = rows.unpack(b, H, dtype, K)
    for d in range(W):  # every mapped row carries its token's x, ids and weights
        valid = pos[:, d] >= 0
        assert torch.equal(rx[pos[valid, d]], x[valid])
        assert torch.equal(rids[pos[valid, d]], ids[valid])
        assert torch.equal(rw[pos[valid, d]], w[valid])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("T", "W", "K", "H"), GRID)
def test_gather_sum_triton_matches_torch(T, W, K, H, dtype, gen):
    _, pos, S = _positions(T, W, gen)
    back = torch.randn(S, H, generator=gen).to(dtype).to(DEVICE)
    a = rows.gather_sum(back, pos, impl="triton")
    b = rows.gather_sum(back, pos, impl="torch")
    assert torch.equal(a, b)  # same float32 additions in the same order
    ref = torch.zeros(T, H, dtype=torch.float64, device=DEVICE)
    for d in range(W):
        valid = pos[:, d] >= 0
        ref[valid] += back[pos[valid, d]].double()
    torch.testing.assert_close(a.double(), ref, rtol=1e-2, atol=1e-2)


def test_gather_sum_worked_example():
    back = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], device=DEVICE)
    pos = torch.tensor([[0, 2], [1, -1]], device=DEVICE)
    for impl in ("triton", "torch"):
        assert rows.gather_sum(back, pos, impl=impl).tolist() == [[6.0, 8.0], [3.0, 4.0]]


def test_row_words_alignment():
    assert rows.row_words(7168, torch.bfloat16, 8) == 7168 // 2 + 16
    assert rows.row_words(2, torch.bfloat16, 1) == 4  # 1 + 2 words, padded to 16 bytes
    with pytest.raises(AssertionError):
        rows.row_words(3, torch.bfloat16, 1)
