"""``rocm-moe bench layer --redundant-experts R --rebalance`` (issue 29 item 5): the expert work
per rank and per expert, the layer before and after a rebalance in one run, on gloo; its
parse-time refusals; the helpers' worked examples."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rocm_moe.benchmarks.layer import eplb_effects, expert_work
from rocm_moe.cli import main


class _OneRank:
    """Just what ``expert_work`` reads of a layer: its dispatcher and replica mapping."""

    class dispatcher:
        world_size = 2
        placement = type("P", (), {"num_experts": 4})()

    @staticmethod
    def to_physical(ids):
        return ids


def test_expert_work_worked_example(monkeypatch):
    # one process stands for both ranks: the all-reduce doubles its counts
    monkeypatch.setattr("torch.distributed.all_reduce", lambda t, group=None: t.mul_(2))
    work = expert_work(_OneRank(), torch.tensor([[0, 1], [0, 2]]), group=None)
    assert work["per_expert"] == [4, 2, 2, 0]
    assert work["per_rank"] == [6, 2]
    assert work["rank_max_mean"] == 1.5


def test_eplb_effects_worked_example():
    rows = [dict(comm="torch", tokens=8, skew=skew, mode="experts", eplb=eplb,
                 **{"work max/mean": w, "eager us": t})
            for skew, eplb, w, t in (("uniform", "before", 1.0, 100.0),
                                     ("zipf", "before", 2.0, 200.0),
                                     ("zipf", "after", 1.05, 110.0))]
    line = next(x for x in eplb_effects(rows) if "zipf" in x)
    assert line == ("torch T=8 zipf experts: work max/mean 2.00 -> 1.05, eager 200.0 -> 110.0 "
                    "us (after / before 0.55x); after / uniform 1.10x")


@pytest.mark.parametrize(("argv", "match"), [
    (["--rebalance"], "--rebalance needs --redundant-experts"),
    (["--world-size", "2", "--redundant-experts", "3", "--num-experts", "8"],
     r"E \+ R = 11 must be divisible by the 2 ranks"),
    (["--redundant-experts", "-1"], "redundant-experts"),
])
def test_refused_while_parsing(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "layer", *argv])
    assert exc.value.code == 2


    assert re.search(match, capsys.readouterr().err)


def test_bench_layer_rebalance_on_gloo(tmp_path):
    rc = main(["bench", "layer", "--world-size", "2", "--tokens", "64", "--hidden", "32",
               "--num-experts", "16", "--intermediate", "16", "--top-k", "4", "--warmup", "0",
               "--iters", "1", "--skew", "uniform", "zipf", "--zipf-tau", "1.5",
               "--dtype", "float32", "--redundant-experts", "4", "--rebalance",
               "--out", str(tmp_path), "--name", "eplb"])
    assert rc == 0
    rows = json.loads((tmp_path / "eplb.json").read_text())["summary"]
    assert [(r["skew"], r["eplb"]) for r in rows] == [
        ("uniform", "before"), ("uniform", "after"), ("zipf", "before"), ("zipf", "after")]
    for r in rows:
        assert sum(r["work per rank"]) == 2 * 64 * 4  # every (token, slot) of both ranks
        assert r["work max/mean"] >= 1
        assert r["eager us"] > 0
    zipf_before, zipf_after = rows[2], rows[3]
    assert zipf_before["work max/mean"] > 1.2  # the hot experts load one rank more ...
    assert zipf_after["work max/mean"] < zipf_before["work max/mean"]  # ... until rebalanced
