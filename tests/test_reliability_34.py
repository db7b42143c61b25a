"""Issue 34, library part: every public surface refuses bad input clearly (FP8 weights, the
invariant flag, non-SiLU models, weighting, diagnose and sanity, graphs, placement)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import ExpertsOutput, Placement
from rocm_moe.weighting import weight_once

H = 8


# ---- weighting ------------------------------------------------------------------------------


def test_weights_applied_must_be_a_bool():
    with pytest.raises(TypeError, match=r"weights_applied.*must be a bool"):
        ExpertsOutput(out=torch.zeros(1, H), weights_applied="no")


def test_weight_once_refuses_an_extra_id_slot():
    raw = ExpertsOutput(out=torch.ones(2, 2, H), weights_applied=False)
    ids = torch.tensor([[0, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"topk_ids.shape.*\[2, 2\]"):
        weight_once(raw, torch.rand(2, 3), ids, Placement.contiguous(2, 1).expert_map(0))


def test_weight_once_refuses_broadcast_weights():
    raw = ExpertsOutput(out=torch.ones(2, 2, H), weights_applied=False)
    with pytest.raises(ValueError, match=r"topk_weights\.shape"):
        weight_once(raw, torch.rand(2, 1), torch.tensor([[0, 1], [1, 0]]), None)
