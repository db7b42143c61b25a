"""rocm_moe.weighting: the one place routing weights are applied, and its deprecated spellings."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import ExpertsOutput, Placement, ReferenceExperts
from rocm_moe.weighting import accumulation_dtype, local_slots, weight_once

H = 8


def test_worked_example():
    """The module docstring's example: slot 1's expert lives on another rank."""
    emap = Placement.contiguous(2, 2).expert_map(0)
    raw = ExpertsOutput(out=torch.tensor([[[2.0], [3.0]]]), weights_applied=False)
    out = weight_once(raw, torch.tensor([[0.5, 0.25]]), torch.tensor([[0, 1]]), emap)
    assert out.tolist() == [[1.0]]


def test_weighted_output_is_returned_as_is():
    y = torch.randn(3, H)
    eo = ExpertsOutput(out=y, weights_applied=True)
    assert weight_once(eo, torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32), None) is y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fixed_order_local_slots_only(dtype):
    emap = Placement.contiguous(6, 2).expert_map(1)  # experts 3, 4, 5
    ids = torch.tensor([[3, 0, 5], [-1, 4, 1], [2, 1, 0], [5, 4, 3]])
    raw = torch.randn(4, 3, H).to(dtype)
    raw[0, 1] = float("nan")  # a non-local slot is never read
    w = torch.rand(4, 3)
    local = local_slots(ids, emap)
    assert local.tolist() == [[True, False, True], [False, True, False], [False] * 3, [True] * 3]
    out = weight_once(ExpertsOutput(out=raw, weights_applied=False), w, ids, emap)
    ref = (raw.double().nan_to_num() * (w * local).double()[..., None]).sum(1)
    assert out.dtype == dtype
    assert accumulation_dtype(dtype) == (torch.float64 if dtype == torch.float64
                                         else torch.float32)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2 if dtype == torch.bfloat16
                               else 1e-6, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(out, weight_once(ExpertsOutput(out=raw, weights_applied=False), w, ids,
                                        emap))


def test_no_map_weights_every_valid_slot():
    ids = torch.tensor([[0, -1], [1, 0]])
    raw = torch.ones(2, 2, H)
    out = weight_once(ExpertsOutput(out=raw, weights_applied=False),
                      torch.tensor([[0.5, 0.7], [0.25, 0.5]]), ids, None)
    assert out[:, 0].tolist() == [0.5, 0.75]


def test_undeclared_output_refused():
    with pytest.raises(TypeError, match="must be an ExpertsOutput"):
        weight_once(torch.zeros(1, 2, H), torch.rand(1, 2), torch.zeros(1, 2), None)


# ---- the former spellings keep working, with a DeprecationWarning ------------------------------
def test_weight_and_reduce_is_deprecated_and_equal():
    from rocm_moe.comm import weight_and_reduce
    from rocm_moe.comm.base import weight_and_reduce as from_base

    assert from_base is weight_and_reduce
    raw, w = torch.randn(4, 3, H), torch.rand(4, 3)
    ids = torch.tensor([[0, 5, 2]] * 4)
    emap = Placement.contiguous(6, 2).expert_map(0)
    with pytest.warns(DeprecationWarning, match="weight_once"):
        old = weight_and_reduce(raw, w, local_slots(ids, emap))
    assert torch.equal(old, weight_once(ExpertsOutput(out=raw, weights_applied=False), w, ids,
                                        emap))


@pytest.mark.parametrize(("old", "new"), [("weighted", "experts"), ("raw", "combine")])
def test_experts_mode_keyword_is_deprecated_and_equal(old, new):
    emap = Placement.contiguous(4, 1).expert_map(0)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(5, H, generator=g), torch.tensor([[0, 3]] * 5, dtype=torch.int32),
            torch.rand(5, 2, generator=g), torch.randn(4, 6, H, generator=g),
            torch.randn(4, H, 3, generator=g), emap)
    with pytest.warns(DeprecationWarning, match=f"weight_mode='{new}'"):
        out = ReferenceExperts()(*args, mode=old)
    ref = ReferenceExperts()(*args, weight_mode=new)
    assert out.weights_applied == ref.weights_applied == (new == "experts")
    assert torch.equal(out.out, ref.out)
    with pytest.raises(TypeError, match="weight_mode only"):
        ReferenceExperts()(*args, mode=old, weight_mode=new)


def test_old_import_paths():
    from rocm_moe.experts import ExpertsOutput as from_experts
    from rocm_moe.experts.base import ExpertsOutput as from_base
    from rocm_moe.experts.base import accumulation_dtype as acc_from_base

    assert from_experts is from_base is ExpertsOutput
    assert acc_from_base is accumulation_dtype
