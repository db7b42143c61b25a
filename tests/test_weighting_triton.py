"""The Triton weighted slot sum behind rocm_moe.weighting on GPUs, against the torch path
(Triton's interpreter on CPUs; float16/float32 there, bfloat16 too on GPUs)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe._libs import triton_runs_on
from rocm_moe.weighting import _weighted_sum
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="triton cannot run here")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def _torch_path(raw, w, local):
    return _weighted_sum(raw.cpu(), w.cpu(), local.cpu())  # CPU tensors: the torch loop


def _kernel(raw, w, local):
    from rocm_moe._weighting_triton import weighted_slot_sum_kernel

    R, K, H = raw.shape
    out = raw.new_empty(R, H)
    weighted_slot_sum_kernel[(R, -(-H // 64))](raw, raw.stride(0), raw.stride(1), w,
                                               local.to(torch.int8), out, H, K_TOPK=K,
                                               BLOCK_H=64)
    return out


def test_docstring_example():
    raw = torch.tensor([[[2.0], [float("nan")]]], device=DEVICE)
    w = torch.tensor([[0.5, 9.0]], device=DEVICE)
    local = torch.tensor([[True, False]], device=DEVICE)
    assert _kernel(raw, w, local).cpu().tolist() == [[1.0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("R", "K", "H"), [(1, 1, 7), (33, 4, 100), (5, 8, 130)],
                         ids=["R1_K1_H7", "R33_K4_H100", "R5_K8_H130"])
def test_matches_torch_path_and_never_reads_non_local(gen, dtype, R, K, H):
    raw = torch.randn(R, K, H, generator=gen).to(dtype)
    w = torch.rand(R, K, generator=gen)
    local = torch.rand(R, K, generator=gen) < 0.5
    local[0] = False  # a row with no local slot sums to zero
    want = _torch_path(raw, w, local)
    poisoned = torch.where(local[..., None], raw, float("nan")).to(dtype)
    got = _kernel(poisoned.to(DEVICE), w.to(DEVICE), local.to(DEVICE)).cpu()
    assert not got.isnan().any()
    assert torch.equal(got[0], torch.zeros(H, dtype=dtype))
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype != torch.float32 else 1e-6,
                               atol=1e-2 if dtype != torch.float32 else 1e-6)
