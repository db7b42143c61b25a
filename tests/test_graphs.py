"""GraphedEPMoE: bucket choice and refusals on any machine (capture and replay against the
eager forward are GPU tests: tests/comm/test_symm.py)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.graphs import GraphedEPMoE


def _buckets_only(buckets) -> GraphedEPMoE:
    g = object.__new__(GraphedEPMoE)  # no capture: only the bucket table
    g.buckets = sorted(buckets)
    return g


@pytest.mark.parametrize(("T", "want"), [(0, 1), (1, 1), (2, 8), (8, 8), (33, 64), (64, 64)])
def test_smallest_bucket_that_holds_the_batch(T, want):
    assert _buckets_only([1, 8, 64]).bucket(T) == want


def test_batch_above_the_largest_bucket_is_refused():
    with pytest.raises(ValueError, match="exceeds the largest captured bucket 64"):
        _buckets_only([1, 8, 64]).bucket(65)


@pytest.mark.parametrize("buckets", [(), (0, 4), (-1,)])
def test_bad_buckets_refused_before_any_capture(buckets):
    with pytest.raises(ValueError, match="must be token counts >= 1"):
        GraphedEPMoE(layer=None, buckets=buckets)


def test_replayed_rows_must_match_the_capture():
    """A float32 batch was cast into a bf16 graph, [T, 1] broadcast to H; rows of another
    dtype, width or device are refused (the check is compares only on a good batch)."""
    class Replay:
        calls = 0

        def replay(self):
            Replay.calls += 1

    g = _buckets_only([1, 8])
    g.inputs = {b: torch.zeros(b, 4, dtype=torch.bfloat16) for b in (1, 8)}
    g.outputs = {b: torch.ones(b, 4) for b in (1, 8)}
    g.graphs = {b: Replay() for b in (1, 8)}
    for x, exc, match in ((torch.zeros(3, 4), TypeError, r"x.dtype=torch.float32"),
                          (torch.zeros(3, 1, dtype=torch.bfloat16), ValueError, r"x.shape"),
                          (torch.zeros(4, dtype=torch.bfloat16), ValueError, r"x.shape"),
                          (torch.zeros(3, 4, dtype=torch.bfloat16, device="meta"), ValueError,
                           r"x.device=meta: must be the captured graph's cpu"),
                          ([[0.0] * 4], TypeError, "must be a torch.Tensor")):
        with pytest.raises(exc, match=match):
            g(x)
    assert Replay.calls == 0
    x = torch.randn(3, 4).bfloat16()
    assert g(x).shape == (3, 4)
    assert torch.equal(g.inputs[8][:3], x)
    assert Replay.calls == 1
    for bad in (-1, 2.5):
        with pytest.raises((ValueError, TypeError), match="num_tokens="):
            g.bucket(bad)
