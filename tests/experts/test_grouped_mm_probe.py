"""bench/grouped_mm_probe.py's pipeline (issue 31: the experts' two GEMMs through
torch._grouped_mm) computes the weighted experts stage: against the reference experts on CPU
(torch runs _grouped_mm there as a loop over groups), so the GPU probe times a correct
pipeline."""

import importlib.util
from pathlib import Path

import pytest
import torch

from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.placement import Placement

_PATH = Path(__file__).resolve().parents[2] / "bench" / "grouped_mm_probe.py"


def _probe():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    spec = importlib.util.spec_from_file_location("grouped_mm_probe", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("R", "W", "rank"), [(1, 1, 0), (33, 1, 0), (33, 3, 1), (64, 4, 3)])
def test_grouped_mm_pipeline_matches_the_reference(R, W, rank):
    mod = _probe()
    E, H, I, K = 12, 64, 32, 3
    g = torch.Generator().manual_seed(R * 10 + W)
    emap = Placement.contiguous(E, W).expert_map(rank)
    e = emap.num_local
    x = torch.randn(R, H, generator=g)
    ids = torch.rand(R, E, generator=g).topk(K, dim=1).indices.int()
    ids[0, -1] = -1  # an empty slot
    ids[R // 2:, 0] = 0  # many rows on expert 0, so some local experts get none on most ranks
    w = torch.rand(R, K, generator=g)
    w13 = torch.randn(e, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(e, H, I, generator=g) / I**0.5
    try:
        out = mod.grouped_mm_experts(x, ids, w, w13, w2, emap)
    except RuntimeError as err:  # (a torch whose CPU _grouped_mm takes no float32)
        pytest.skip(f"torch._grouped_mm on CPU: {err}")
    ref = ReferenceExperts()(x, ids, w, w13, w2, emap, weight_mode="experts",
                             validate=False).out
    assert out.shape == (R, H)
    assert ((out - ref).norm() / ref.norm().clamp(min=1e-30)) < 1e-5
    bad = w13.clone()
    bad[0, I:] *= 1.01  # expert 0's up rows 1% off: the pipeline must see it
    if emap.local_ids(torch.tensor([[0]])).item() == 0 and (ids == 0).any():
        assert not torch.allclose(mod.grouped_mm_experts(x, ids, w, bad, w2, emap), ref,
                                  rtol=1e-4, atol=1e-6)
