"""bench experts' gpt-oss rows (bf16 and MXFP4 experts on the same values, each against its own
weight-read floor) at a tiny shape, float16 (Triton's interpreter on CPUs, compiled on GPUs),
with a fixed stand-in timer (no timing is asserted: the rows, floors and errors are)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rocm_moe.benchmarks import experts as bench
from tests.conftest import DEVICE

TINY = dict(E=4, W=1, rank=0, H=64, I=64, K=2)
CEIL = dict(copy_GBps=1000.0, matmul_TFLOPs=1e6)  # the weight reads bound the floor


def test_gpt_oss_rows(tmp_path):
    rows = bench.run_gpt_oss("gpt-oss-20b", TINY, CEIL, [1, 33], device=DEVICE.type,
                             timer=lambda call: 1e-3, dtype=torch.float16)
    assert [(r["format"], r["path"], r["rows"]) for r in rows] == [
        (f, p, R) for R in (1, 33) for f, p in (("bf16", "auto"), ("mxfp4", "auto"),
                                                 ("mxfp4", "w8"))]
    for bf16, *mxs in zip(rows[0::3], rows[1::3], rows[2::3], strict=True):
        assert bf16["rel_err"] < 5e-3  # the same values as the reference experts
        for mx in mxs:
            assert bf16["experts_touched"] == mx["experts_touched"]
            assert mx["rel_err"] < 5e-3
            assert mx["vs_bf16"] == pytest.approx(1.0)  # the same stand-in time
        # weight bytes: 2 B per value against 0.5 B + 1 B per 32
        touched, H, I, R = mx["experts_touched"], TINY["H"], TINY["I"], mx["rows"]
        for row, per_value in ((mx, 0.5 + 1 / 32), (bf16, 2.0)):
            assert row["floor_us"] == pytest.approx(
                (touched * 3 * H * I * per_value + 4 * R * H) / 1e12 * 1e6)
    assert bench._plot(rows, tmp_path / "p.png")


def test_cli_takes_the_gpt_oss_shapes_and_formats():
    from rocm_moe.cli import build_parser

    args = build_parser().parse_args(["bench", "experts", "--shapes", "gpt-oss-120b",
                                      "--formats", "mxfp4"])
    assert (args.shapes, args.formats) == (["gpt-oss-120b"], ["mxfp4"])
    default = build_parser().parse_args(["bench", "experts"])
    assert default.shapes == ["qwen3", "dsv3"]
    assert default.formats == ["bf16", "mxfp4"]
    assert bench.SHAPES["gpt-oss-120b"] == dict(E=128, W=1, rank=0, H=2880, I=2880, K=4,
                                                sizes=[1, 4, 16, 64, 256, 1024, 4096])


def test_gpt_oss_rows_skip_the_small_path():
    """The small path runs plain SwiGLU only: gpt-oss's rows time the grouped one."""
    rows = bench.run_gpt_oss("gpt-oss-20b", TINY, CEIL, [1], ("small", "grouped"),
                             device=DEVICE.type, timer=lambda call: 1e-3, dtype=torch.float16)
    assert [(r["format"], r["path"]) for r in rows] == [("bf16", "grouped"), ("mxfp4", "auto"),
                                                        ("mxfp4", "w8")]
