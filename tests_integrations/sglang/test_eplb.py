"""The plug-in under SGLang's EPLB (issue 29): redundant experts, SGLang's expert-location
metadata and logical -> physical dispatch, the recorder counts rocm_moe's dispatcher reports in
MORI's place, SGLang's weight move and in-place metadata update, on 2 gloo ranks
(eplb_model.py); and the metadata as rocm_moe's ReplicatedPlacement."""

from __future__ import annotations

import functools

import pytest
import torch

from rocm_moe.distributed import launch
from rocm_moe.integrations import sglang as rs
from rocm_moe.replicas import ReplicatedPlacement
from tests_integrations.sglang import eplb_model as em

sglang = pytest.importorskip("sglang")
R = 2  # E = 6 logical, P = 8 physical over 2 ranks


def _worker(info, R: int) -> dict:
    return em.run(info, R)


@functools.cache
def results(W: int) -> list[dict]:
    return launch(W, _worker, R, timeout_s=600)


def test_eplb_model_matches_oracle_before_and_after_sglangs_weight_move():
    res = results(2)
    initial = ReplicatedPlacement.initial(em.SPEC.E, R, 2).phys_to_log.tolist()  # the worker's
    for r, out in enumerate(res):
        assert out["P"] == em.SPEC.E + R
        assert out["placement"] == initial
        assert out["err_before"] <= 1e-5, (r, out)
        assert out["err_after"] <= 1e-5, (r, out)
        assert out["calls"] == em.SPEC.layers  # one recorder call per layer's dispatch
        assert out["counted"] == out["expected"]  # every (token, slot) once, on its owner
        assert out["moved"] > 0
        assert out["placement_after"] == out["new"]
    before, after = res[0]["heaviest"]
    assert max(after) < max(before), res[0]["heaviest"]
    print(f"W=2 R={R}: heaviest rank load {before} -> {after}, {res[0]['moved']} slots "
          f"changed, errors {res[0]['err_before']:.1e} / {res[0]['err_after']:.1e}")


def test_replicas_from_sglang_metadata():
    from types import SimpleNamespace

    meta = SimpleNamespace(physical_to_logical_map_cpu=torch.tensor([[0, 1, 2, 3, 0, 1]]),
                           ep_size=2, num_logical_experts=4)
    placement = rs.replicas_from_sglang(0, meta)
    assert placement.logical_experts(1) == (3, 0, 1)
    assert placement.replica_count.tolist() == [2, 2, 1, 1]


def test_sglang_recorder_hooks_the_adapter_calls_exist():
    """record_expert_distribution follows moriep's recorder rule with SGLang's own pieces."""
    import inspect

    import sglang.srt.layers.moe.token_dispatcher.moriep as moriep

    assert list(inspect.signature(moriep._record_local_expert_count).parameters) == \
        ["local_expert_count"]
    assert callable(moriep.get_global_expert_distribution_recorder)
    assert hasattr(moriep.get_global_expert_distribution_recorder(), "recording")
    assert isinstance(moriep._ExpertDistributionRecorderNoop, type)
