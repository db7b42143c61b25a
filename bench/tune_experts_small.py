"""Tune the small-batch Triton experts path (rocm_moe/experts/triton_small.py) on this GPU;
prints a table and writes the JSON that ``triton_small.small_config`` reads.

For each format (bf16, block-FP8), shape (rocm_moe/benchmarks/experts.py's SHAPES) and token
count T: the gate/up kernel's candidates (per slot: GEMV and tl.dot tiles; per expert: tl.dot
tiles) are timed with the down kernel at its heuristic config, then, with the faster gate/up,
the down kernel's (per row: GEMV and tl.dot tiles; per slot and per expert: tl.dot tiles), each
on the whole stage (FP8 rows quantised in the gate/up kernel, as TritonFP8Experts runs the
path); the fastest is the entry for T x K slots. The grouped path (``path="grouped"``, today's
launches) is timed beside it.
Timer: ``triton.testing.do_bench`` (median; it clears the L2 cache before every call, so the
weights come from HBM as in a model's step, where 48-61 layers' weights pass through the L2
between two calls of a layer), or ``--timer graph`` (CUDA-graph replays without clearing).
The floor is the weight bytes of the experts the batch touches / the copy rate measured here.

Usage on the GPU machine:
  python3 bench/tune_experts_small.py OUT.json [--shapes qwen3 dsv3] [--formats bf16 fp8]
                                      [--tokens 1 4 16 64] [--timer cold|graph]
                                      [--base TABLE.json]
Copy OUT.json to rocm_moe/experts/triton_small_configs.json (``--base`` merges into an
existing table) to make the tuned entries the default on this device.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

from rocm_moe.benchmarks.experts import SHAPES, _routing, copy_rate
from rocm_moe.experts import triton_small as small
from rocm_moe.experts.fp8 import quantize_experts
from rocm_moe.experts.triton import TritonExperts
from rocm_moe.experts.triton_fp8 import TritonFP8Experts, _fp8_dot_native
from rocm_moe.quant import native_fp8_dtype

TIMERS = {"cold": lambda fn: do_bench(fn, rep=30, return_mode="median"),
          "graph": lambda fn: do_bench_cudagraph(fn, rep=30, return_mode="median")}


def _gemv(fp8: bool):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV kernels (per-slot gate/up,
    per-row down); one stage (their loads do not feed tl.dot, and Triton 3.9 compiled 1-3
    stages to the same registers)."""
    bks = (128,) if fp8 else (128, 256, 512)
    return [(bn, bk, w, 1) for bn, bk, w in itertools.product((8, 16, 32), bks, (4, 8))
            if bn * bk <= 8192 and not (w == 8 and bn * bk < 2048)]


def _dot(fp8: bool):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the tl.dot kernels (per expert)."""
    bks = (128,) if fp8 else (64, 128)
    return list(itertools.product((16, 32, 64), bks, (4,), (2, 3, 4)))


def _tiles(c, dot: bool, block_m=16):
    bn, bk, w, s = c
    return dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, CHUNK=128, num_warps=w, num_stages=s,
                DOT=dot)


def _candidates(per_x: bool, fp8: bool) -> list[dict]:
    """A kernel's candidates: per slot / per row, GEMVs and tl.dot tiles; per expert, tl.dot
    tiles."""
    dots = [_tiles(c, True) for c in _dot(fp8)]
    return [_tiles(c, False) for c in _gemv(fp8)] + dots if per_x else dots


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: TRITON_INTERPRET=1 smoke)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _case(shape: dict, T: int, fp8: bool, gen: torch.Generator):
    x, ids, w, emap = _routing(shape, T, gen, device=DEVICE)
    e, H, I = emap.num_local, shape["H"], shape["I"]
    w13 = torch.randn(e, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(e, H, I, generator=gen) / I**0.5
    x = x.to(DTYPE)
    if fp8:
        fw = quantize_experts(w13.to(DEVICE), w2.to(DEVICE), dtype=native_fp8_dtype(DEVICE))
        return x, ids, w, fw.w13, fw.w2, emap, fw.nbytes // e
    w13, w2 = w13.to(DTYPE).to(DEVICE), w2.to(DTYPE).to(DEVICE)
    return x, ids, w, w13, w2, emap, 2 * 3 * H * I * w13.element_size()


def _stage(case, fp8: bool, cfg: dict | None):
    """A call of the whole stage: the small path with ``cfg``, or (None) the grouped path."""
    x, ids, w, w13, w2, emap, _ = case
    if cfg is None:
        experts = (TritonFP8Experts if fp8 else TritonExperts)(path="grouped")
        return lambda: experts(x, ids, w, w13, w2, emap, weight_mode="experts", validate=False)
    if not fp8:
        return lambda: small.small_experts(x, ids, w, w13, w2, emap, weighted=True, config=cfg)
    upcast = not _fp8_dot_native(x.device, w13.dtype)
    return lambda: small.small_fp8_experts(x, ids, w, w13, w2, emap, weighted=True,
                                           out_dtype=x.dtype, upcast=upcast, precise=False,
                                           config=cfg)


def _best(case, fp8, timer, base: dict, key: str, candidates: list[dict]):
    """The fastest of ``candidates`` for ``base[key]`` (the rest of ``base`` kept): (us, cfg)."""
    best = (float("inf"), None)
    for cand in candidates:
        cfg = {**base, key: cand}
        try:
            us = timer(_stage(case, fp8, cfg)) * 1e3
        except Exception as exc:  # (a tile the compiler refuses: skipped, said)
            print(f"  skip {key} {cand}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        best = min(best, (us, cfg), key=lambda t: t[0])
    return best


def tune(shape_name: str, T: int, fp8: bool, timer, rate: float, gen) -> dict:
    shape = SHAPES[shape_name]
    case = _case(shape, T, fp8, gen)
    ids, emap, per_expert_bytes = case[1], case[5], case[6]
    loc = emap.local_ids(ids)
    floor_us = loc[loc >= 0].unique().numel() * per_expert_bytes / rate * 1e6
    slots = T * shape["K"]
    gate_up = {}  # per slot / per expert -> (us, cfg), the down at the heuristic's
    for per_slot in (True, False):
        base = small.small_config(1 if per_slot else 10**6, fp8=fp8)
        gate_up[per_slot] = _best(case, fp8, timer, base, "gate_up", _candidates(per_slot, fp8))
    _, base = min(gate_up.values(), key=lambda t: t[0])
    down = {form: _best(case, fp8, timer, base, "down",
                        [dict(c, FORM=form) for c in _candidates(form == "row", fp8)])
            for form in small.DOWN_FORMS}  # with the faster gate/up
    us, cfg = min(down.values(), key=lambda t: t[0])
    forms = {**{f"gate_up per {'slot' if k else 'expert'}": v[0] for k, v in gate_up.items()},
             **{f"down per {f}": v[0] for f, v in down.items()}}
    grouped_us = timer(_stage(case, fp8, None)) * 1e3
    default_us = timer(_stage(case, fp8, small.small_config(slots, fp8=fp8))) * 1e3
    row = dict(shape=shape_name, format="fp8" if fp8 else "bf16", tokens=T, slots=slots,
               best_us=us, heuristic_us=default_us, grouped_us=grouped_us, floor_us=floor_us,
               best_over_floor=us / floor_us, config=cfg, forms=forms)
    print(f"{shape_name} {row['format']} T={T}: best {us:.1f} us ({us / floor_us:.2f}x floor "
          f"{floor_us:.1f}), heuristic {default_us:.1f}, grouped {grouped_us:.1f}; "
          f"forms {row['forms']}; {cfg}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--shapes", nargs="+", default=["qwen3"], choices=list(SHAPES))
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64],
                    help="T; a batch takes the entry of the smallest tuned T x K >= its slots")
    ap.add_argument("--timer", choices=list(TIMERS), default="cold")
    ap.add_argument("--base", type=Path, default=None)
    args = ap.parse_args()
    timer = TIMERS[args.timer]
    rate = copy_rate() * 1e9
    device = torch.cuda.get_device_name()
    table = json.loads(args.base.read_text()) if args.base else {}
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, fmt, T in itertools.product(args.shapes, args.formats, args.tokens):
        row = tune(name, T, fmt == "fp8", timer, rate, gen)
        rows.append(row)
        shape = SHAPES[name]
        bucket = str(1 << max(0, (row["slots"] - 1).bit_length()))
        table.setdefault(device, {}).setdefault(f"{shape['H']}x{shape['I']}", {}).setdefault(
            fmt, {})[bucket] = row["config"]
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True))
    args.out.with_suffix(".rows.json").write_text(json.dumps(dict(
        device=device, copy_GBps=rate / 1e9, timer=args.timer, rows=rows), indent=1))
    print(f"table: {args.out}; rows: {args.out.with_suffix('.rows.json')}")


if __name__ == "__main__":
    main()
