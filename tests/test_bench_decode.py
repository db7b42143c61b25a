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
