"""Tune the Triton FP8 experts' launch configs on this GPU, in one command (issues 18, 31).

For every shape and size at once: whole-stage CUDA-graph replays (median, the benchmark's own
measure) of the heuristic config, then of each GATE_UP candidate (BLOCK_M, gate/up tiles and
the launch variants: tensor descriptors, scales loaded a step ahead, gate and up in one
256-wide dot, persistent tile loops; down at the
heuristic's tiles for that BLOCK_M) on every size, then of each DOWN candidate with each
size's best gate/up.
Every candidate's output is checked against the FP8 torch reference (same quantisation) before
it is timed; a wrong one is reported as WRONG and makes the run exit 1 at the end (a variant
that does not compile or launch is reported and skipped). The best config per size is run once
more with ``precise=True`` and float32 output (tolerance PRECISE_TOL: the variant's arithmetic,
not the tensor core's reduced-precision accumulation, is what it checks).

Prints one row per candidate (us, TFLOP/s, time / floor, the floor's FP8 rate: torch._scaled_mm
measured in the same run) and the best per size; writes ``--table`` in the form
``experts.triton_fp8.fp8_block_config`` reads (device name -> "HxI" -> bucket of mean slots
per expert; merged into ``--base``, by default the packaged table), and ``--json`` with every
row. The kernels read another table with ROCM_MOE_FP8_CONFIGS=TABLE.json.

Usage on the GPU machine (the packaged table: --table rocm_moe/experts/triton_fp8_configs.json):
  python3 bench/tune_experts_fp8.py --table OUT/triton_fp8_configs.json --json OUT/tune.json \\
      [--shapes qwen3 dsv3] [--sizes N ...] [--budget-s S] [--rep-ms MS]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rocm_moe.benchmarks.experts import SHAPES, _routing
from rocm_moe.benchmarks.experts_fp8 import ceilings, expert_weights
from rocm_moe.experts.fp8 import FP8ReferenceExperts, quantize_experts
from rocm_moe.experts.triton import _bucket
from rocm_moe.experts.triton_fp8 import (
    CONFIG_FILE,
    TritonFP8Experts,
    check_config,
    fp8_block_config,
)
from rocm_moe.quant import native_fp8_dtype

DEFAULT_SIZES = {"qwen3": [4096, 16384], "dsv3": [8192]}  # the compute-bound sizes (issue 31)
WRONG_TOL = 1e-2  # bf16 output vs the FP8 reference (the GPU test's tolerance)
PRECISE_TOL = 1e-3  # precise=True, float32 output (measured 2-3e-4 on an H100)
GATE_UP_SHARE = 0.65  # of the time budget, for the gate/up candidates (the down ones: the rest)


def _kernel(bn: int, warps: int, stages: int, *, desc: bool = True, ahead: bool = True,
            fused: bool = False) -> dict:
    k = dict(BLOCK_N=bn, BLOCK_K=128, num_warps=warps, num_stages=stages)
    k.update({f: True for f, on in (("desc", desc and not fused), ("ahead", ahead),
                                    ("fused", fused)) if on})
    return k


# (BLOCK_M, gate/up kernel, top-level variant keys), most promising first (a time budget cuts
# the tail). Registers: the gate/up tile holds two BLOCK_M x 128 float32 accumulators (255
# registers at 128 x 8 warps, none spilled on sm_90: one program per SM); shared memory: 48 KiB
# a stage at BLOCK_M 128 (4 stages fit the H100's 227 KiB), 40 KiB at 64 (4 warps x 2 stages:
# two programs per SM, whose MMAs, rescaling and epilogues interleave).
GATE_UP = [
    (128, _kernel(128, 8, 3), {}),
    (128, _kernel(128, 8, 3, fused=True), {}),
    (64, _kernel(128, 4, 2), {}),
    (64, _kernel(128, 4, 2, fused=True), {}),
    (128, _kernel(128, 8, 3, desc=False), {}),
    (128, _kernel(128, 8, 3, ahead=False), {}),
    (128, _kernel(128, 8, 4), {}),
    (64, _kernel(128, 4, 2), {"persistent": True, "programs_per_sm": 2}),
    (64, _kernel(128, 8, 3), {}),
    (128, _kernel(128, 8, 2), {}),
    (64, _kernel(128, 4, 3), {}),
    (128, _kernel(128, 8, 3), {"persistent": True, "programs_per_sm": 1}),
    (64, _kernel(128, 8, 5), {}),
]
# the heuristic's down tiles at each BLOCK_M (``fp8_block_config``), for the gate/up pass
HEURISTIC_DOWN = {64: _kernel(128, 4, 4, desc=False, ahead=False),
                  128: _kernel(128, 8, 4, desc=False, ahead=False)}
# down kernels with the best gate/up (BLOCK_N 256: two weight-scale blocks, the outer-product
# scale; 4 warps x 2-3 stages at 128 x 128: two programs per SM)
DOWN = [
    _kernel(128, 8, 4),
    _kernel(256, 8, 3),
    _kernel(128, 4, 2),
    _kernel(128, 8, 4, ahead=False),
    _kernel(128, 8, 3),
    _kernel(128, 4, 3),
    _kernel(256, 8, 2),
    _kernel(128, 8, 2),
    _kernel(64, 4, 3),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _label(cfg: dict) -> str:
    def k(c):
        flags = "".join(f for f, on in (("d", c.get("desc")), ("a", c.get("ahead")),
                                         ("f", c.get("fused"))) if on)
        return f"{c['BLOCK_N']}w{c['num_warps']}s{c['num_stages']}{flags}"
    top = ("P" if cfg.get("persistent") else "") + str(cfg.get("programs_per_sm", ""))
    return f"M{cfg['BLOCK_M']} gu {k(cfg['gate_up'])} dn {k(cfg['down'])} {top}".rstrip()
    # (e.g. "M128 gu 128w8s3da dn 256w8s3da PF": descriptors, scales ahead, persistent, flat)


class Case:
    """One shape and size: inputs, FP8 weights, the reference output, flops and the floor."""

    def __init__(self, name: str, R: int, ceil: dict, gen: torch.Generator):
        shape = SHAPES[name]
        self.name, self.R, self.shape = name, R, shape
        x, ids, w, emap = _routing(shape, R, gen)
        e, H, I = emap.num_local, shape["H"], shape["I"]
        fw = quantize_experts(*expert_weights(e, H, I, gen, x.device),
                              dtype=native_fp8_dtype("cuda"))
        self.args = (x, ids, w, fw.w13, fw.w2, emap)
        loc = emap.local_ids(ids)
        touched = int(loc[loc >= 0].unique().numel())
        self.flops = 2 * 3 * H * I * int((loc >= 0).sum())
        self.floor = max(touched * (fw.nbytes // e) / (ceil["copy_GBps"] * 1e9),
                         self.flops / (ceil["fp8_matmul_TFLOPs"] * 1e12))
        self.ref = FP8ReferenceExperts()(*self.args, weight_mode="experts", validate=False,
                                         out_dtype=torch.float32).out
        self.heuristic = fp8_block_config(R * shape["K"], e, num_experts=shape["E"])
        self.key = (f"{H}x{I}", _bucket(R * shape["K"] / shape["E"]))

    def run(self, cfg: dict, *, precise: bool = False, out_dtype=None):
        ex = TritonFP8Experts(config=cfg, precise=precise, path="grouped")
        return ex(*self.args, weight_mode="experts", validate=False, out_dtype=out_dtype).out


def measure(case: Case, cfg: dict, rep_ms: int) -> dict:
    """One candidate: checked against the reference, then timed. ``status``: ok, WRONG (its
    error over WRONG_TOL) or the exception that stopped it."""
    from triton.testing import do_bench_cudagraph

    row = dict(shape=case.name, rows=case.R, label=_label(cfg), config=cfg)
    try:
        check_config(cfg)
        err = _rel(case.run(cfg), case.ref)
        row["rel_err"] = err
        if not err < WRONG_TOL:  # (NaN too)
            return dict(row, status="WRONG")
        t = do_bench_cudagraph(lambda: case.run(cfg), rep=rep_ms, return_mode="median") / 1e3
    except Exception as exc:  # does not compile or launch (out of resources, ...)
        return dict(row, status=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    return dict(row, status="ok", us=t * 1e6, TFLOPs=case.flops / t / 1e12,
                over_floor=t / case.floor)


def _print(row: dict, ceil: dict) -> None:
    if row["status"] != "ok":
        print(f"  {row['shape']:5} {row['rows']:6} {row['label']:44} {row['status']}",
              flush=True)
        return
    print(f"  {row['shape']:5} {row['rows']:6} {row['label']:44} {row['us']:9.1f} "
          f"{row['TFLOPs']:8.1f} {row['over_floor']:7.2f} {ceil['fp8_matmul_TFLOPs']:7.0f} "
          f"{row['rel_err']:.1e}", flush=True)


def tune(cases: list[Case], ceil: dict, rep_ms: int, deadline: float) -> list[list[dict]]:
    """Every case's rows: the heuristic, each GATE_UP candidate on every case (its down tiles
    the heuristic's for its BLOCK_M; compiled once), then each DOWN candidate with each case's
    best gate/up. No gate/up candidate starts after GATE_UP_SHARE of the time to ``deadline``,
    no down candidate after it (the rest are skipped, and said so)."""
    rows = [[measure(c, c.heuristic, rep_ms)] for c in cases]
    for r in rows:
        _print(r[-1], ceil)

    def best(r: list[dict]) -> dict:
        ok = [x for x in r if x["status"] == "ok"]
        return min(ok, key=lambda x: x["us"]) if ok else r[0]

    start = time.monotonic()
    gate_up_deadline = start + GATE_UP_SHARE * (deadline - start)

    def late(until: float) -> bool:
        if time.monotonic() > until:
            print("  (time budget spent: the remaining candidates skipped)", flush=True)
            return True
        return False

    for block_m, gu, top in GATE_UP:
        if late(gate_up_deadline):
            break
        cfg = dict(BLOCK_M=block_m, gate_up=gu, down=HEURISTIC_DOWN[block_m], **top)
        for c, r in zip(cases, rows, strict=True):
            r.append(measure(c, cfg, rep_ms))
            _print(r[-1], ceil)
    bases = [best(r)["config"] for r in rows]
    for dn in DOWN:
        if late(deadline):
            break
        for c, r, base in zip(cases, rows, bases, strict=True):
            r.append(measure(c, dict(base, down=dn), rep_ms))
            _print(r[-1], ceil)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, required=True, help="the config table to write")
    p.add_argument("--base", type=Path, default=Path(CONFIG_FILE),
                   help="a table whose other entries are kept (default: the packaged one)")
    p.add_argument("--json", type=Path, default=None, help="every candidate's row")
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SIZES), choices=["qwen3", "dsv3"])
    p.add_argument("--sizes", nargs="+", type=int, default=None)
    p.add_argument("--rep-ms", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="start no candidate after this many seconds (the rest are skipped)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a GPU (torch.cuda.is_available() is False)")
    gen = torch.Generator().manual_seed(0)
    t0 = time.monotonic()
    ceil = ceilings()
    device = torch.cuda.get_device_name()
    print(f"# {device}: copy {ceil['copy_GBps']:.0f} GB/s, FP8 torch._scaled_mm "
          f"{ceil['fp8_matmul_TFLOPs']:.0f} TFLOP/s, measured now "
          f"({', '.join(f'{k[18:]} {v:.0f}' for k, v in ceil.items() if k[18:] and v)})",
          flush=True)
    print(f"  {'shape':5} {'rows':>6} {'config':44} {'us':>9} {'TFLOP/s':>8} {'t/floor':>7} "
          f"{'ceiling':>7} rel err", flush=True)
    cases = [Case(n, R, ceil, gen) for n in a.shapes for R in (a.sizes or DEFAULT_SIZES[n])]
    table = json.loads(a.base.read_text()) if a.base.exists() else {}
    all_rows, bests, wrong = [], [], False
    for case, rows in zip(cases, tune(cases, ceil, a.rep_ms, t0 + a.budget_s), strict=True):
        wrong |= any(r["status"] == "WRONG" for r in rows)
        ok = [r for r in rows if r["status"] == "ok"]
        best = min(ok, key=lambda r: r["us"]) if ok else rows[0]
        precise = None
        if best["status"] == "ok":
            precise = _rel(case.run(best["config"], precise=True, out_dtype=torch.float32),
                           case.ref)
            if precise < PRECISE_TOL:
                table.setdefault(device, {}).setdefault(case.key[0], {})[case.key[1]] = \
                    best["config"]
            else:
                wrong = True
        bests.append((case, best, rows[0], precise))
        all_rows += rows
    print("# best per size (heuristic -> best; precise: precise=True float32 vs reference)")
    for case, best, heur, precise in bests:
        if best["status"] != "ok":
            print(f"  {case.name} {case.R}: no candidate ran ({best['status']})")
            continue
        h = f"{heur['us']:.1f} us ({heur['over_floor']:.2f})" if heur["status"] == "ok" \
            else heur["status"]
        print(f"  {case.name} {case.R}: {h} -> {best['us']:.1f} us, {best['TFLOPs']:.0f} "
              f"TFLOP/s, time/floor {best['over_floor']:.2f}, precise err {precise:.1e}: "
              f"{best['label']}", flush=True)
    a.table.parent.mkdir(parents=True, exist_ok=True)
    a.table.write_text(json.dumps(table, indent=1) + "\n")
    print(f"table: {a.table}")
    if a.json:
        a.json.write_text(json.dumps(dict(device=device, ceilings=ceil, rows=all_rows),
                                     indent=1, default=str))
    if wrong:
        print("FAILED: a candidate's output is wrong (WRONG rows above, or a precise error "
              f"over {PRECISE_TOL})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
