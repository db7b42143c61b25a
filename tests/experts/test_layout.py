"""build_layout against a brute-force loop; every table and offset from one sort agrees."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, build_layout
from rocm_moe.experts.layout import max_padded_slots
from tests.conftest import DEVICE


def _random_ids(R, K, E, gen, empty_frac=0.1):
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(R)]) if R else \
        torch.empty(0, K, dtype=torch.int64)
    empty = torch.rand(R, K, generator=gen) < empty_frac
    return torch.where(empty, torch.full_like(ids, -1), ids)


GRID = [pytest.param(R, K, E, W, bs, id=f"R{R}_K{K}_E{E}_W{W}_bs{bs}")
        for (R, K, E, W) in [(0, 2, 8, 2), (1, 1, 4, 1), (33, 4, 16, 4), (511, 8, 64, 8),
                             (33, 2, 8, 1)]
        for bs in (1, 4, 16)]


@pytest.mark.parametrize(("R", "K", "E", "W", "bs"), GRID)
def test_layout_matches_brute_force(R, K, E, W, bs, gen):
    placement = Placement.contiguous(E, W)
    rank = W - 1
    emap = placement.expert_map(rank)
    e = emap.num_local
    ids = _random_ids(R, K, E, gen)
    weights = torch.rand(R, K, generator=gen)
    L = build_layout(ids.to(torch.int32), emap, topk_weights_RK=weights, block_size=bs)

    # Brute force: local slots per expert, in row order.
    per_expert = [[] for _ in range(e)]
    for r in range(R):
        for k in range(K):
            g = int(ids[r, k])
            if g >= 0 and int(emap.map_E[g]) >= 0:
                per_expert[int(emap.map_E[g])].append((r, k))
    counts = [len(s) for s in per_expert]
    assert L.tokens_per_expert.tolist() == counts
    assert L.expert_offsets.tolist() == [sum(counts[:j]) for j in range(e + 1)]
    padded = [-(-c // bs) * bs for c in counts]
    assert L.padded_offsets.tolist() == [sum(padded[:j]) for j in range(e + 1)]
    assert L.num_padded.tolist() == [sum(padded)]
    P = max_padded_slots(R * K, e, bs)
    assert L.sorted_slot_ids.shape == (P,)
    assert L.block_expert_ids.shape == (P // bs,)
    sentinel = R * K
    for j, slots in enumerate(per_expert):
        n = len(slots)
        start = L.padded_offsets[j].item()
        seg = L.sorted_slot_ids[start:start + padded[j]].tolist()
        assert seg == [r * K + k for r, k in slots] + [sentinel] * (padded[j] - n)
        assert L.block_expert_ids[start // bs:(start + padded[j]) // bs].tolist() == \
            [j] * (padded[j] // bs)
        assert L.expert_token_table[j].tolist() == [r for r, _ in slots] + [-1] * (R - n)
        assert L.expert_slot_table[j].tolist() == [k for _, k in slots] + [-1] * (R - n)
        assert L.expert_weight_table[j].tolist() == \
            [weights[r, k].item() for r, k in slots] + [0.0] * (R - n)
    assert L.sorted_slot_ids[sum(padded):].eq(sentinel).all()
    assert L.block_expert_ids[sum(padded) // bs:].eq(-1).all()
    assert L.expert_token_table.shape == (e, R)
    assert L.local_ids.tolist() == [[int(emap.map_E[g]) if g >= 0 else -1 for g in row]
                                    for row in ids.tolist()]


def test_all_slots_on_one_expert_and_none_local():
    emap = Placement.contiguous(8, 2).expert_map(0)
    ids = torch.tensor([[3, 5]] * 7, dtype=torch.int32)  # expert 3 local, 5 remote
    L = build_layout(ids, emap, block_size=4)
    assert L.tokens_per_expert.tolist() == [0, 0, 0, 7]
    assert L.padded_offsets.tolist() == [0, 0, 0, 0, 8]
    assert L.sorted_slot_ids[:8].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    none_local = build_layout(torch.tensor([[5, 6]], dtype=torch.int32), emap, block_size=4)
    assert none_local.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert none_local.num_padded.tolist() == [0]
    assert none_local.block_expert_ids.eq(-1).all()


def test_rejects_repeated_experts_and_non_bool_flags():
    p = Placement.contiguous(4, 1)
    ids = torch.tensor([[1, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"topk_ids\[0\]=\[1, 1\]: an expert may appear at most"):
        build_layout(ids, p.expert_map(0))
    build_layout(ids, p.expert_map(0), validate=False)  # (the experts' public call checked)
    for kw, match in ((dict(block_size=True), "block_size=True"),
                      (dict(tables="no"), "tables='no': must be a bool"),
                      (dict(validate=1), "validate=1: must be a bool")):
        with pytest.raises((ValueError, TypeError), match=match):
            build_layout(ids[1:], p.expert_map(0), **kw)


def test_rejects_mask_and_bad_block():
    p = Placement.contiguous(8, 2)
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="ExpertMask"):
        build_layout(ids, p.expert_mask(0, sentinel=True))
    with pytest.raises(ValueError, match="block_size=0"):
        build_layout(ids, p.expert_map(0), block_size=0)


FIELDS = ("local_ids", "tokens_per_expert", "expert_offsets", "padded_offsets", "sorted_slot_ids",
          "block_expert_ids", "num_padded")


@pytest.mark.parametrize(("R", "K", "E", "W", "bs"), [
    *GRID, pytest.param(500, 8, 128, 1, 64, id="many_chunks"),
    pytest.param(33, 3, 300, 1, 16, id="e300_sub64"),
    pytest.param(300, 8, 8, 1, 64, id="scan_steps"),  # 38 chunks, scan tiles of 16: 3 steps
    pytest.param(64, 4, 16, 2, 8, id="all_on_one")])
def test_triton_block_layout_equals_the_sort(R, K, E, W, bs, gen, monkeypatch):
    """tables=False (the Triton kernels; interpreter on CPUs) gives the sort's tensors exactly."""
    pytest.importorskip("triton")
    from rocm_moe._libs import triton_runs_on
    from rocm_moe.experts import layout

    if R == 300:
        monkeypatch.setattr(layout, "_SCAN_TILE", 16)

    emap = Placement.contiguous(E, W).expert_map(W - 1).to(DEVICE)
    ids = _random_ids(R, K, E - 1 if R == 64 else E, gen)
    if R == 64:
        ids[:, 0] = E - 1  # every row on the last local expert (still K distinct ids a row)
    ids = ids.to(torch.int32).to(DEVICE)
    assert triton_runs_on(ids.device)
    ref = build_layout(ids, emap, block_size=bs)
    fast = build_layout(ids, emap, block_size=bs, tables=False)
    for f in FIELDS:
        a, b = getattr(ref, f), getattr(fast, f)
        assert a.dtype == b.dtype, f
        assert torch.equal(a, b), f
    assert fast.expert_token_table is None
    assert fast.expert_weight_table is None


@pytest.mark.parametrize("N", [0, 1, 7, 64, 100])
@pytest.mark.parametrize("e", [0, 1, 3, 40])
def test_max_padded_slots_is_the_worst_case(N, e):
    """Worst case: min(N, e) experts with one slot each, the rest of the slots on expert 0."""
    bs = 16
    if e == 0:
        assert max_padded_slots(N, e, bs) == bs * (N // bs)
        return
    busy = min(N, e)
    counts = [N - busy + 1] + [1] * (busy - 1) if busy else []
    need = sum(-(-c // bs) * bs for c in counts)
    assert need == max_padded_slots(N, e, bs)


@pytest.mark.parametrize(
    ("ids", "weights", "exc", "match"),
    [
        (torch.zeros(2, 2), None, TypeError, r"topk_ids.dtype=torch.float32: expert ids must "
         "have an integer dtype"),
        (torch.tensor([[0, -2]]), None, ValueError, r"topk_ids=contains -2: .*or be -1"),
        (torch.tensor([[0, 8]]), None, ValueError, r"topk_ids=contains 8: .*\[0, 8\)"),
        (torch.tensor([[0, 1]]), torch.rand(2, 1), ValueError, r"topk_weights.shape=\[2, 1\]: "
         r"must be \[1, 2\]"),
        (torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.int32), TypeError,
         r"topk_weights.dtype"),
    ],
    ids=["float_ids", "minus_two", "id_ge_E", "weights_shape", "int_weights"],
)
def test_rejects_bad_ids_and_weights(ids, weights, exc, match):
    with pytest.raises(exc, match=match):
        build_layout(ids, Placement.contiguous(8, 2).expert_map(1), topk_weights_RK=weights)
