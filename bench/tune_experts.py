"""Tune the Triton experts' launch configs on this GPU; prints and writes a JSON table.

For each benchmark shape and size (rocm_moe/benchmarks/experts.py) and each BLOCK_M candidate
around the batch's mean slots per local expert: build the layout once, then time the gate/up
GEMM and the down GEMM separately over (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates
(median of ``triton.testing.do_bench``, which clears the L2 cache before every call: in the
stage each kernel finds its weights cold, e.g. at 1 token the down GEMM's 25 MB follow the
gate/up GEMM's 50 MB; replayed alone they stay in the 50 MB L2, and the small-size tune of
2026-11-23, timed that way, credits the down GEMM with 4.4 TB/s, more than HBM gives;
``--timer graph`` times CUDA-graph replays without clearing, as that tune did). Each kernel
keeps its fastest tile; the BLOCK_M with the smallest sum of the two wins. ``--timer stage``
times the whole stage per candidate instead (CUDA-graph replays, the benchmark's own measure;
for the launch-bound smallest sizes, where the cold timer's L2 clearing costs more than the
kernels: 29 us for the 1-token gate/up GEMM that takes 21 us in the stage). The entry is keyed
by (device, H x I, bucket of mean slots per local expert), the form
``rocm_moe.experts.triton.block_config`` reads.

Usage on the GPU machine:
  python3 bench/tune_experts.py OUT.json [--min-rows N] [--max-rows N] [--base TABLE.json]
                                [--no-tma] [--timer cold|graph|stage] [--verbose]
(sizes outside [min, max] are skipped; --base is a table to start from, its other entries kept;
the kernels load as TritonExperts does by default, through tensor descriptors where
``tma_supported``, unless --no-tma).
"""

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

from rocm_moe.benchmarks.experts import SHAPES, _case
from rocm_moe.experts import triton as tx
from rocm_moe.experts.layout import build_layout

# (BLOCK_N, BLOCK_K, num_warps, num_stages): memory-bound sizes stream weights with narrow
# tiles and deep K; compute-bound ones want wide tiles (2 x 128 x 128 fp32 accumulators are
# the most the gate/up kernel holds at 8 warps).
SMALL = [(bn, bk, 4, ns) for bn in (16, 32, 64, 128) for bk in (64, 128, 256, 512)
         for ns in (2, 3, 4) if bn * bk <= 16384]
LARGE = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5),
         (256, 64, 8, 3), (256, 64, 8, 4), (128, 128, 8, 3), (256, 32, 8, 4)]


def _block_ms(mean: float) -> list[int]:
    if mean <= 4:
        return [16]
    if mean <= 16:
        return [16, 32]
    if mean <= 64:
        return [32, 64]
    return [64, 128]


TIMERS = {"cold": lambda fn: do_bench(fn, rep=20, return_mode="median"),
          "graph": lambda fn: do_bench_cudagraph(fn, rep=20, return_mode="median")}
TIMERS["stage"] = TIMERS["graph"]  # what is replayed differs (tune_size)


def _kcfg(bn: int, bk: int, nw: int, ns: int) -> dict:
    return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)


def _best(launch, candidates, timer: str, verbose: bool) -> tuple[float, dict] | None:
    best = None
    for cand in candidates:
        kcfg = _kcfg(*cand)
        try:
            launch(kcfg)  # compile before timing
            t = TIMERS[timer](lambda kcfg=kcfg: launch(kcfg))
        except Exception as exc:  # out of shared memory / registers and the like
            print("  skip", kcfg, type(exc).__name__, flush=True)
            continue
        if verbose:
            print(f"    {launch.__name__} {t * 1e3:9.1f} us {kcfg}", flush=True)
        if best is None or t < best[0]:
            best = (t, kcfg)
    return best


def tune_size(shape: dict, rows: int, gen: torch.Generator, tma: bool, timer: str,
              verbose: bool = False, base: dict | None = None) -> dict:
    """The best entry for this size. ``timer`` "stage": every candidate times the whole stage
    (CUDA-graph replays, as the benchmark does): gate/up candidates with ``base``'s down tile
    (or the first candidate), then down candidates with the best gate/up tile."""
    x, ids, w, w13, w2, emap = _case(shape, rows, gen)
    R, K, H, I = rows, shape["K"], shape["H"], shape["I"]
    mean = int((emap.local_ids(ids) >= 0).sum()) / emap.num_local  # local slots per expert
    space = SMALL if mean <= 64 else LARGE
    wv = w.contiguous().view(-1)
    results = []
    if timer == "stage":
        for bm in _block_ms(mean):
            cfg = dict(BLOCK_M=bm, gate_up=None,
                       down=dict((base or {}).get("down") or _kcfg(*space[0])))

            def stage(c, part, cfg=cfg):
                tri = tx.TritonExperts(config={**cfg, part: c}, tma=tma)
                tri(x, ids, w, w13, w2, emap, weight_mode="experts", validate=False)

            def gate_up(c):
                stage(c, "gate_up")

            def down(c):
                stage(c, "down")

            gu = _best(gate_up, space, timer, verbose)
            cfg["gate_up"] = gu and gu[1]
            dn = gu and _best(down, space, timer, verbose)
            if dn:
                print(f"  BLOCK_M={bm}: stage {dn[0] * 1e3:.1f} us, gate_up {gu[1]}, "
                      f"down {dn[1]}", flush=True)
                results.append((dn[0], dict(cfg, down=dn[1])))
        return min(results, key=lambda r: r[0])[1]
    for bm in _block_ms(mean):
        layout = build_layout(ids, emap, block_size=bm, tables=False)
        P = layout.sorted_slot_ids.numel()
        inter = torch.randn(P, I, device="cuda").to(x.dtype)
        out = torch.empty(R * K, H, dtype=x.dtype, device="cuda")

        def gate_up(c, inter=inter, layout=layout):
            tx.launch_gate_up(x, w13, inter, layout, c, tma=tma)

        def down(c, inter=inter, out=out, layout=layout):
            tx.launch_down(inter, w2, out, layout, wv, c, weighted=True, tma=tma)

        gu = _best(gate_up, space, timer, verbose)
        dn = _best(down, space, timer, verbose)
        print(f"  BLOCK_M={bm}: gate_up {gu}, down {dn}", flush=True)
        if gu and dn:
            results.append((gu[0] + dn[0], dict(BLOCK_M=bm, gate_up=gu[1], down=dn[1])))
    return min(results, key=lambda r: r[0])[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--min-rows", type=int, default=0)
    p.add_argument("--max-rows", type=int, default=1 << 30)
    p.add_argument("--base", help="table to start from (its other entries are kept)")
    p.add_argument("--no-tma", action="store_true", help="pointer loads only")
    p.add_argument("--timer", choices=list(TIMERS), default="cold",
                   help="cold: each kernel, L2 cleared before every call (default); graph: "
                   "each kernel, replays; stage: the whole stage, replays")
    p.add_argument("--verbose", action="store_true", help="print every candidate's time")
    args = p.parse_args(argv)
    tma = not args.no_tma and tx.tma_supported(torch.device("cuda"))
    dev = torch.cuda.get_device_name()
    table: dict = json.loads(Path(args.base).read_text()) if args.base else {}
    table.setdefault(dev, {})
    gen = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        key = f"{shape['H']}x{shape['I']}"
        for R in shape["sizes"]:
            if not args.min_rows <= R <= args.max_rows:
                continue
            bucket = tx._bucket(R * shape["K"] / (shape["E"] // shape["W"]))  # block_config's
            print(name, R, "bucket", bucket, flush=True)
            entries = table[dev].setdefault(key, {})
            entries[bucket] = tune_size(shape, R, gen, tma, args.timer, args.verbose,
                                        entries.get(bucket))
            with open(args.out, "w") as fh:  # after every size: a cut-off run keeps what it found
                json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()
