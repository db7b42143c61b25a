"""diagnose names every planted bug class and its stage, on W = 1 and W = 2; clean is clean."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rocm_moe import EPMoE, RouterConfig, faults
from rocm_moe import synthetic as syn
from rocm_moe.cli import main
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.diagnose import diagnose
from rocm_moe.distributed import launch
from rocm_moe.faults import FAULTS, STAGES
from rocm_moe.placement import Placement

E, K, H, I = 16, 4, 32, 16
NEEDS_RANKS = {"dispatched_ids", "other_ranks_missing", "second_reduction"}  # no symptom at W=1


def _layer(weight_mode="experts", dispatcher=None, dtype=torch.float32):
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  weight_mode=weight_mode, dispatcher=dispatcher, dtype=dtype)
    layer.reset_parameters(seed=5)
    return layer


def _x(rank, seed, dtype=torch.float32):
    return syn.tokens(seed, rank, 2 * 9, H).reshape(2, 9, H).to(dtype)


def test_registry_entries_are_complete():
    for name, fault in FAULTS.items():
        assert fault.name == name
        assert fault.stage in STAGES
        assert fault.signature
        assert fault.fix
        assert fault.emulates
        assert callable(fault.inject)
        assert fault.one_rank == (name not in NEEDS_RANKS)


def test_plant_and_remove_leave_the_layer_bare():
    layer = _layer()
    dispatcher, experts = layer.dispatcher, layer.experts
    x = _x(0, 3)
    clean = layer(x)
    faults.plant(layer, "per_sequence_routing")
    assert faults.planted(layer) == "per_sequence_routing"
    assert not torch.equal(layer(x), clean)
    faults.plant(layer, "scalar_collapse")  # replaces the previous one
    assert faults.planted(layer) == "scalar_collapse"
    assert "route_tokens" not in vars(layer)
    assert faults.planted(copy.deepcopy(layer)) == "scalar_collapse"
    faults.plant(layer, None)
    assert layer.dispatcher is dispatcher
    assert layer.experts is experts
    assert torch.equal(layer(x), clean)
    with pytest.raises(ValueError, match="known faults"):
        faults.plant(layer, "typo")
    # the layer carries no fault code: faults plant from outside (issue 30)
    assert not hasattr(EPMoE, "fault")
    assert not hasattr(layer, "fault")


@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
@pytest.mark.parametrize("fault", [None, *FAULTS])
def test_single_rank(fault, weight_mode):
    layer = _layer(weight_mode)
    faults.plant(layer, fault)
    report = diagnose(layer, _x(0, int(torch.randint(0, 10**6, (1,)))))
    if fault is None or fault in NEEDS_RANKS:
        assert report.first_bad is None, report
        assert report.diagnosis is None
    else:
        assert report.diagnosis is not None, report
        assert report.diagnosis.bug == fault
        assert report.first_bad == FAULTS[fault].stage
        assert all(s.ok for s in report.stages[:[s.stage for s in report.stages]
                                              .index(report.first_bad)])


def test_bf16_weights_twice_and_clean():
    layer = _layer(dtype=torch.bfloat16)
    assert diagnose(layer, _x(0, 1, torch.bfloat16)).first_bad is None
    faults.plant(layer, "weights_twice")
    assert diagnose(layer, _x(0, 1, torch.bfloat16)).diagnosis.bug == "weights_twice"


def _two_ranks(info, seed):
    out = {}
    for fault in [None, *FAULTS]:
        disp = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H,
                               top_k=K, dtype=torch.float32)
        layer = _layer(dispatcher=disp)
        faults.plant(layer, fault)
        r = diagnose(layer, _x(info.rank, seed))
        out[str(fault)] = [r.first_bad, r.diagnosis.bug if r.diagnosis else None]
    return out


def test_two_ranks():
    seed = int(torch.randint(0, 10**6, (1,)))
    for rank, res in enumerate(launch(2, _two_ranks, seed, backend="gloo", timeout_s=120)):
        assert res["None"] == [None, None], (rank, seed)
        for fault in FAULTS:
            assert res[fault] == [FAULTS[fault].stage, fault], (rank, fault, seed, res[fault])


def test_cli_json_and_dump(capsys, tmp_path):
    small = ["--num-experts", "8", "--hidden", "32", "--intermediate", "16", "--top-k", "2",
             "--world-size", "1"]
    assert main(["diagnose", *small]) == 0
    assert "all stages clean" in capsys.readouterr().out
    dump = tmp_path / "stages"
    assert main(["diagnose", *small, "--inject", "scalar_collapse", "--json",
                 "--dump", str(dump)]) == 1
    report = json.loads(capsys.readouterr().out)[0]
    assert report["first_bad"] == "combine"
    assert report["diagnosis"]["bug"] == "scalar_collapse"
    from safetensors.torch import load_file

    tensors = load_file(f"{dump}.rank0.safetensors")
    assert {"topk_ids", "dispatched_x", "expert_out", "partials", "combined"} <= set(tensors)


def test_cli_names_the_bug(capsys):
    rc = main(["diagnose", "--world-size", "1", "--inject", "mask_as_map"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "first wrong stage: experts" in out
    assert "bug: mask_as_map" in out
    assert "fix:" in out


def test_cli_prints_the_int64_signature_with_its_example(capsys):
    assert main(["diagnose", "--world-size", "1", "--inject", "int64_as_int32"]) == 1
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "bug: int64_as_int32: received ids are [id0, 0, id1, 0, ...]" in out


@pytest.mark.parametrize("router", ["mixtral", "deepseek_v3"])
def test_cli_router_and_shared_experts(capsys, router):
    small = ["--num-experts", "8", "--hidden", "32", "--intermediate", "16", "--top-k", "2",
             "--world-size", "1", "--router", router, "--shared-intermediate", "8"]
    assert main(["diagnose", *small, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert [s["stage"] for s in report["stages"]] == list(STAGES)
    assert all(s["reference"] for s in report["stages"])
    assert "shared experts" in next(s for s in report["stages"] if s["stage"] == "output")["shares"]
    assert main(["sanity", *small]) == 0
    out = capsys.readouterr().out
    assert f"router={router}" in out
    assert "shared_experts" in out
    assert "16 passed, 0 failed" in out  # (router_config, raw_slots and input_unchanged too)
