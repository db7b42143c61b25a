"""Placement, ExpertMap and ExpertMask: ownership and the two conventions kept apart."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import ExpertMap, ExpertMask, Placement
from rocm_moe.placement import require_expert_map


@pytest.mark.parametrize(("E", "W"), [(8, 1), (8, 2), (256, 8), (12, 4)], ids=str)
def test_contiguous(E, W):
    p = Placement.contiguous(E, W)
    e = E // W
    assert p.world_size == W
    assert p.is_contiguous
    ids = torch.arange(E)
    assert p.owner(ids).tolist() == [g // e for g in range(E)]
    for d in range(W):
        assert p.local_experts(d) == tuple(range(d * e, (d + 1) * e))
        m = p.expert_map(d).map_E
        assert m.dtype == torch.int32
        assert m.tolist() == [g - d * e if g // e == d else -1 for g in range(E)]
        assert p.local_to_global(p.global_to_local(ids, d)[d * e:(d + 1) * e], d).tolist() == \
            list(range(d * e, (d + 1) * e))


def test_deepseek_rank5_mask_matches_seed_000():
    # EP8, 256 experts: rank 5 owns 160..191; vLLM's mask has a trailing sentinel slot.
    mask = Placement.contiguous(256, 8).expert_mask(5, sentinel=True)
    assert mask.mask.shape == (257,)
    assert mask.has_sentinel
    assert mask.mask.nonzero().flatten().tolist() == list(range(160, 192))
    assert mask.to_expert_map(5).map_E.tolist() == Placement.contiguous(256, 8).expert_map(5) \
        .map_E.tolist()
    no_sentinel = Placement.contiguous(256, 8).expert_mask(5, sentinel=False)
    assert no_sentinel.mask.shape == (256,)
    assert not no_sentinel.has_sentinel


def test_owner_of_empty_slot_is_minus_one():
    p = Placement.contiguous(8, 2)
    assert p.owner(torch.tensor([[-1, 5]])).tolist() == [[-1, 1]]
    assert p.global_to_local(torch.tensor([[-1, 5, 1]]), 1).tolist() == [[-1, 1, -1]]


def test_non_contiguous_placement():
    p = Placement.from_lists([[0, 5, 2], [1, 3, 4]], num_experts=6)
    assert not p.is_contiguous
    assert p.owner(torch.arange(6)).tolist() == [0, 1, 0, 1, 1, 0]
    assert p.expert_map(0).map_E.tolist() == [0, -1, 2, -1, -1, 1]
    # Local ids out of global order cannot be an AITER mask (AITER uses a prefix sum).
    with pytest.raises(ValueError, match="increase with the global id"):
        p.expert_mask(0, sentinel=True)
    assert p.expert_mask(1, sentinel=False).mask.tolist() == [0, 1, 0, 1, 1, 0]


@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        (lambda: Placement.contiguous(10, 4), ValueError, "E divisible by W"),
        (lambda: Placement.from_lists([[0, 1], [1, 2]], 3), ValueError, "exactly one rank"),
        (lambda: Placement.contiguous(8, 2).expert_map(2), ValueError, r"rank=2.*\[0, 2\)"),
        # A 0/1 mask passed as an id map is recognised.
        (lambda: ExpertMap(torch.tensor([0, 0, 1, 1], dtype=torch.int32), 1), ValueError,
         "looks like a 0/1 expert_mask"),
        # An id map passed as a mask is recognised.
        (lambda: ExpertMask(torch.tensor([-1, -1, 0, 1], dtype=torch.int32), 4), ValueError,
         "looks like an expert_map"),
        (lambda: ExpertMap(torch.tensor([-1, 0, 1]), 0), TypeError, "int32"),
        (lambda: ExpertMask(torch.tensor([0, 1, 1], dtype=torch.int32), 4), ValueError,
         r"\[E=4\] or \[E \+ 1=5\]"),
        (lambda: ExpertMask(torch.tensor([0, 1, 1], dtype=torch.int32), 2), ValueError,
         "sentinel slot must be 0"),
        (lambda: require_expert_map("m", Placement.contiguous(4, 2).expert_mask(0, sentinel=False)),
         TypeError, "ExpertMask is AITER's 0/1 ownership mask"),
        (lambda: require_expert_map("m", torch.tensor([0, 1], dtype=torch.int32)), TypeError,
         "raw tensors are ambiguous"),
    ],
    ids=["indivisible", "double_owner", "bad_rank", "mask_as_map", "map_as_mask", "map_dtype",
         "mask_len", "sentinel", "require_map_mask", "require_map_tensor"],
)
def test_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_ids_and_ranks_checked_not_truncated():
    """Float ids were truncated (owner([[1.7, 5.2]]) gave [[0, 1]]), -5 read as an empty slot,
    an id >= E an IndexError, a float or bool rank taken as an int."""
    p = Placement.contiguous(8, 2)
    for call, exc, match in (
            (lambda: p.owner(torch.tensor([[1.7, 5.2]])), TypeError, r"topk_ids.dtype"),
            (lambda: p.owner(torch.tensor([[1, -5]])), ValueError, r"topk_ids.*-5"),
            (lambda: p.owner(torch.tensor([[1, 8]])), ValueError, r"topk_ids.*8"),
            (lambda: p.global_to_local(torch.tensor([[9]]), 0), ValueError, r"topk_ids"),
            (lambda: p.local_to_global(torch.tensor([0.7, 3.9]), 1), TypeError, "local_ids"),
            (lambda: p.expert_map(0).local_ids(torch.tensor([[1.5]])), TypeError, "topk_ids"),
            (lambda: p.expert_map(True), TypeError, "rank=True: must be an int"),
            (lambda: p.expert_map(1.0), TypeError, "rank=1.0: must be an int"),
            (lambda: ExpertMap(p.expert_map(0).map_E, rank=-7), ValueError, "ExpertMap.rank"),
            (lambda: ExpertMap(p.expert_map(0).map_E, rank="x"), TypeError, "ExpertMap.rank"),
            (lambda: ExpertMask(torch.ones(4, dtype=torch.int32), num_experts="4"), TypeError,
             "ExpertMask.num_experts"),
            (lambda: p.expert_mask(0, sentinel="no"), TypeError, "sentinel='no'")):
        with pytest.raises(exc, match=match):
            call()
    assert p.owner(torch.tensor([[1, -1, 7]])).tolist() == [[0, -1, 1]]
