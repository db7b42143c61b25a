"""The parts of the vLLM and SGLang adapters that need neither engine (the adapters themselves
are tested against the pinned engines in tests_integrations/, see noxfile.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rocm_moe.integrations import sglang as rs
from rocm_moe.integrations import vllm as rv


@pytest.mark.parametrize(("E", "W", "sizes"), [(8, 3, [3, 3, 2]), (33, 4, [9, 8, 8, 8]),
                                               (1, 1, [1]), (511, 2, [256, 255])])
def test_linear_placement_puts_the_remainder_on_the_first_ranks(E, W, sizes):
    p = rv.vllm_placement(E, W, "linear")
    assert [p.num_local(r) for r in range(W)] == sizes
    flat = [g for r in range(W) for g in p.local_experts(r)]
    assert flat == list(range(E))  # contiguous, in rank order


def test_round_robin_placement():
    p = rv.vllm_placement(8, 3, "round_robin")
    assert [p.local_experts(r) for r in range(3)] == [(0, 3, 6), (1, 4, 7), (2, 5)]
    assert p.expert_map(1).map_E.tolist() == [-1, 0, -1, -1, 1, -1, -1, 2]


def test_bad_placement_arguments_are_refused():
    with pytest.raises(ValueError, match="'linear' or 'round_robin'"):
        rv.vllm_placement(8, 2, "random")
    with pytest.raises(ValueError, match="ep_size <= num_experts"):
        rv.vllm_placement(2, 4)


def test_expert_map_from_vllm():
    assert rv.expert_map_from_vllm(None, 0, 4).map_E.tolist() == [0, 1, 2, 3]
    m = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)
    assert rv.expert_map_from_vllm(m, 1, 4).num_local == 2
    mask = torch.tensor([0, 0, 1, 1, 0], dtype=torch.int32)  # AITER's, with its sentinel
    with pytest.raises(ValueError, match="vllm#49758"):
        rv.expert_map_from_vllm(mask, 1, 4)


@pytest.mark.parametrize("module", [rv, rs])
def test_switch_off_does_nothing(module, monkeypatch):
    monkeypatch.delenv(module.SWITCH, raising=False)
    assert module.register() is False


@pytest.mark.parametrize(("module", "name", "engine"),
                         [(rv, "RocmMoEExperts", "vllm"), (rs, "RocmMoEDispatcher", "sglang")])
def test_missing_engine_names_the_install(module, name, engine):
    if importlib.util.find_spec(engine) is not None:
        pytest.skip(f"{engine} is installed here")
    with pytest.raises(ImportError, match=rf"rocm_moe\[{engine}\]"):
        getattr(module, name)
    with pytest.raises(AttributeError):
        module.NoSuchThing  # noqa: B018
