"""The scaling model (rocm_moe.benchmarks.scaling) on the committed 4x H100 results."""

import json
import math
from pathlib import Path

import pytest

from rocm_moe.benchmarks import scaling

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.fixture(scope="module")
def measured():
    return (json.loads((RESULTS / "comm_4xh100.json").read_text()),
            json.loads((RESULTS / "experts_h100.json").read_text()))


def test_hit_probabilities_by_counting():
    # 1 part: every token hits it; E parts of one expert: K of E
    assert scaling._p_hit(1) == 1.0
    assert scaling._p_hit(scaling.E) == pytest.approx(scaling.K / scaling.E)
    # 2 parts of 128: 1 - C(128, 8) / C(256, 8)
    assert scaling._p_hit(2) == pytest.approx(1 - math.comb(128, 8) / math.comb(256, 8))


def test_the_model_reproduces_the_4_gpu_runs(measured):
    comm, _ = measured
    for r in scaling.intra_check(comm):  # the fit uses the ends; the middle points are checks
        assert 0.75 < r["model_over_measured"] < 1.25, r
    rc = scaling.routing_check(comm)
    assert rc["model"] == pytest.approx(rc["measured"], rel=0.03)


def test_predictions_behave(measured):
    _, experts = measured
    h100, mi300x = scaling.machines(RESULTS, 50.0, 0.8, 15.0, dict(
        intra_GBps=307.0, hbm_GBps=5300.0, bf16_TFLOPs=1307.0))
    for m in (h100, mi300x):
        rows = {(N, T): scaling.predict(m, N, T, experts)
                for N in (8, 16, 32, 64) for T in (128, 4096)}
        for (N, _), r in rows.items():
            assert r["two-stage tokens/s/GPU"] >= r["flat tokens/s/GPU"]
            if N == 8:  # one node: nothing crosses, both dispatches are the same
                assert r["flat_inter_MB"] == r["two_stage_inter_MB"] == 0
        # the network makes EP16's large batches slower per GPU than EP8's
        assert rows[16, 4096]["flat tokens/s/GPU"] < rows[8, 4096]["flat tokens/s/GPU"]
        # fewer local experts: less weight traffic per token at small batches
        assert rows[64, 128]["experts_us"] < rows[8, 128]["experts_us"]


def test_scaling_command(tmp_path, capsys):
    from rocm_moe.cli import main

    assert main(["bench", "scaling", "--json", str(tmp_path / "s.json")]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert {r["EP"] for r in data["rows"]} == {4, 8, 16, 32, 64}
    assert "MI300X" in capsys.readouterr().out
