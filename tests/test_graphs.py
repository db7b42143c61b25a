"""GraphedEPMoE: bucket choice and refusals on any machine (capture and replay against the
eager forward are GPU tests: tests/comm/test_symm.py)."""

from __future__ import annotations

import pytest

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
