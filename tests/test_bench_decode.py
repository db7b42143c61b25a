"""rocm-moe bench decode (issue 33, item 5): a CPU smoke run of a tiny shape writes its JSON
with every column; bad flags are refused before a rank starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = ["--num-experts", "8", "--hidden", "64", "--intermediate", "32", "--top-k", "2"]


def _bench(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "rocm_moe.cli", "bench", "decode", *TINY,
                           "--out", str(tmp_path), *args], capture_output=True, text=True,
                          timeout=300, env=_cpu_env())


def _cpu_env():
    import os

    return dict(os.environ, CUDA_VISIBLE_DEVICES="")


def test_smoke_run_writes_every_column(tmp_path):
    r = _bench("--tokens", "1", "3", "--name", "d", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "d.json").read_text())
    rows = data["summary"]
    assert [row["T"] for row in rows] == [1, 3]
    for row in rows:
        for col in ("layer us", "experts us", "router us", "layer / experts", "cap / first"):
            assert row[col] > 0, col
        assert row["experts floor us"] is None  # no copy rate without a GPU


@pytest.mark.parametrize(("args", "match"), [
    (["--tokens", "0"], "--tokens"),
    (["--format", "fp8", "--dtype", "float16"], "--format fp8"),
    (["--max-tokens-per-rank", "8", "16"], "--comm local"),
    (["--inner", "0"], "--inner"),
    (["--batches", "21"], "--batches"),  # more than the graph's 20 calls
    (["--batches", "0"], "--batches"),
])
def test_bad_flags_refused(args, match, tmp_path):
    r = _bench(*args, tmp_path=tmp_path)
    assert r.returncode == 2, r.stdout
    assert match in r.stderr
    assert "starting" not in r.stderr  # refused before a rank starts


def test_experts_paths_give_a_row_set_each(tmp_path):
    """--experts-path small grouped: one row per (path, T), the path in each row (on GPUs the
    Triton experts take that path; a CPU smoke run has the reference experts)."""
    r = _bench("--tokens", "1", "--experts-path", "small", "grouped", "--name", "p",
               tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "p.json").read_text())["summary"]
    assert [(row["path"], row["T"]) for row in rows] == [("small", 1), ("grouped", 1)]
    assert all(row["cap / first"] == 1.0 for row in rows)


def test_batches_cycle_through_the_graph_calls(monkeypatch):
    """--batches N: the timed calls take the N batches in turn (each its own routing), so a
    graph of --inner calls reads other experts' weights call after call."""
    import torch

    from rocm_moe.benchmarks import decode

    seen = []

    class Layer:
        weight_mode = "experts"

        class dispatcher:
            @staticmethod
            def expert_map_on(dev):
                return None

        def route_tokens(self, x):
            seen.append(("route", int(x[0, 0])))
            return type("R", (), dict(topk_ids=x[:, :1].long(), topk_weights=x[:, :1]))()

        def __call__(self, x):
            seen.append(("layer", int(x[0, 0])))

        def experts(self, x, ids, w, *rest, **kw):
            assert int(ids[0, 0]) == int(x[0, 0])  # the batch's own routing
            seen.append(("experts", int(x[0, 0])))

        def expert_weights(self):
            return ()

    def timer(fn, device, inner):
        return lambda: [fn() for _ in range(inner)] and 1e-6

    monkeypatch.setattr(decode, "_timer", timer)
    xs = [torch.full((1, 4), float(i)) for i in range(3)]
    times, ids = decode._time_case(Layer(), xs, dict(inner=5, warmup=0, iters=1))
    assert [int(i[0, 0]) for i in ids] == [0, 1, 2]
    assert set(times) == {"layer", "router", "experts"}
    for kind in ("layer", "experts"):
        assert [b for k, b in seen if k == kind] == [0, 1, 2, 0, 1], kind
