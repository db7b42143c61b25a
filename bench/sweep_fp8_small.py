"""Check and sweep the streaming block-FP8 small-batch experts (rocm_moe/experts/
triton_small_fp8.py) on this GPU, beside the grouped FP8 path; bench/gpu_fp8_decode.sh runs it.

1. check: T = 1, 8, 33, 64 (Qwen3-30B-A3B, and DeepSeek-V3's rank-local experts: rank 5 of 8,
   so most slots are other ranks' experts), ~10% of slots -1, both weight modes, float rows
   (quantised in the kernel) and FP8Rows, every sweep candidate's forms (row / slot gate/up and
   down) at T = 1 and 33: against the FP8 torch reference (float32; the tolerance of the GPU
   tests, 1e-2) and the float64 oracle ``fp8_dense_reference`` (W = 1); the CUDA-graph replay
   equals the eager call. Any failure: exit status 1 after the table of errors.
2. sweep: per shape and T, gate/up candidates (down at the default), then down candidates
   (with the best gate/up); the stage timed as a CUDA graph of ROT back-to-back calls on ROT
   different routings (different experts per call, so the weights come from HBM, not from
   the L2 of the call before), median of replays; the grouped path timed the same way; the
   floor: the bytes of the distinct local experts of each call / the copy rate measured here.
3. writes ENV_FILE (shell ``export`` lines: ROCM_MOE_FP8_SMALL_CONFIG with the best config per
   shape and slot bucket, ROCM_MOE_FP8_SMALL_MAX_SLOTS = the most Qwen3 slots where the best stream
   config beat the grouped path) for ``rocm-moe bench decode``.

Usage (GPU): python3 bench/sweep_fp8_small.py ENV_FILE [--skip-check] [--tokens 1 8 16 32 64]
"""

import argparse
import json
import statistics
import sys
import time

import torch

from rocm_moe import Placement
from rocm_moe.benchmarks.experts import SHAPES, copy_rate
from rocm_moe.experts import triton_small_fp8 as stream
from rocm_moe.experts.fp8 import FP8ReferenceExperts, fp8_dense_reference, quantize_experts
from rocm_moe.experts.triton_fp8 import TritonFP8Experts
from rocm_moe.oracle import rel_err
from rocm_moe.quant import native_fp8_dtype, quantize_rows

SMOKE = not torch.cuda.is_available()  # CPU (TRITON_INTERPRET=1): tiny shapes, eager timing
DEV = torch.device("cpu" if SMOKE else "cuda")
ROT = 2 if SMOKE else 16  # routings per graph
XDTYPE = torch.float16 if SMOKE else torch.bfloat16  # (the interpreter miscomputes bf16)
if SMOKE:
    SHAPES = {"qwen3": dict(E=16, W=1, rank=0, H=256, I=128, K=4),
              "dsv3": dict(E=16, W=4, rank=1, H=256, I=128, K=4)}


def _k(form, bn, bk, warps, stages=1, prefetch=False, split=1, preload=0):
    k = dict(FORM=form, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
             PREFETCH=prefetch)
    k = dict(k, SPLIT=split) if split > 1 else k
    return dict(k, PRELOAD=preload) if preload else k


# candidates: the default first (triton_small_fp8.DEFAULTS), then tiles / warps / stages /
# register prefetch / split-K (gate/up) / forms
GATE_UP = [_k("slot", 16, 512, 8), _k("slot", 16, 512, 8, prefetch=True),
           _k("slot", 16, 256, 4), _k("slot", 16, 256, 4, prefetch=True),
           _k("slot", 16, 512, 8, split=2), _k("slot", 16, 256, 4, split=4),
           _k("slot", 8, 512, 4), _k("slot", 32, 256, 8), _k("slot", 16, 512, 8, 3),
           _k("row", 16, 128, 8),
           # (session 13: the one-token FP8 experts at 1.62x their floor; more of the default's
           # neighbours: narrower and wider tiles with its 3-stage pipeline, a 4th stage)
           _k("slot", 8, 512, 4, 3), _k("slot", 32, 512, 8, 3), _k("slot", 16, 512, 8, 4)]
DOWN = [_k("row", 8, 256, 8), _k("row", 8, 256, 8, prefetch=True), _k("row", 16, 128, 8),
        _k("row", 8, 128, 4), _k("row", 8, 128, 4, prefetch=True), _k("slot", 32, 256, 4),
        _k("slot", 16, 512, 4),
        # PRELOAD: the first K steps' weights loaded before the wait for gate/up (PDL)
        _k("row", 8, 256, 8, preload=3), _k("row", 8, 256, 8, preload=2, prefetch=True),
        _k("row", 8, 128, 8, preload=4), _k("row", 4, 256, 4, preload=3),
        _k("slot", 16, 512, 4, preload=4), _k("slot", 32, 256, 4, preload=3)]


def _cfg(gate_up=None, down=None, act="fp8"):
    base = stream.stream_config(8)
    return dict(base, ACT=act, gate_up=dict(gate_up or base["gate_up"]),
                down=dict(down or base["down"]))


def _weights(shape, gen):
    emap = Placement.contiguous(shape["E"], shape["W"]).expert_map(shape["rank"]).to(DEV)
    e, H, I = emap.num_local, shape["H"], shape["I"]
    w13 = torch.randn(e, 2 * I, H, generator=gen, device=DEV) / H**0.5
    w2 = torch.randn(e, H, I, generator=gen, device=DEV) / I**0.5
    fw = quantize_experts(w13, w2, dtype=native_fp8_dtype(DEV))
    del w13, w2
    return fw, emap


def _routing(shape, T, gen, drop=0.0):
    x = torch.randn(T, shape["H"], generator=gen, device=DEV).to(XDTYPE)
    ids = torch.rand(T, shape["E"], generator=gen, device=DEV).topk(shape["K"], dim=1)
    ids = ids.indices.int()
    if drop:
        ids[torch.rand(ids.shape, generator=gen, device=DEV) < drop] = -1
    w = torch.rand(T, shape["K"], generator=gen, device=DEV)
    return x, ids, w


def _graph_us(fns, iters=10) -> float:
    """us per call: a graph of the calls ``fns`` back to back, median of ``iters`` replays."""
    if SMOKE:
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) * 1e6 / len(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    times = []
    for _ in range(iters + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    return statistics.median(times[2:])


def _short(k: dict | None) -> str:
    if k is None:
        return "default"
    return (f"{k['FORM']}/{k['BLOCK_N']}x{k['BLOCK_K']}/w{k['num_warps']}/s{k['num_stages']}"
            f"{'/prefetch' if k.get('PREFETCH') else ''}"
            f"{'/pre' + str(k['PRELOAD']) if k.get('PRELOAD') else ''}"
            f"{'/split' + str(k['SPLIT']) if k.get('SPLIT', 1) > 1 else ''}")


def check(failures: list) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    print("check: rel err (ACT fp8 vs the FP8 torch reference, tolerance 1e-2; vs the float64 "
          "oracle with / without activation quantisation; ACT float the same)")
    for name in ("qwen3", "dsv3"):
        shape = SHAPES[name]
        fw, emap = _weights(shape, gen)
        for T in (1, 3) if SMOKE else (1, 8, 33, 64):
            x, ids, w = _routing(shape, T, gen, drop=0.1)
            n = max(len(GATE_UP), len(DOWN))  # every candidate once (weighted, as swept);
            pairs = [(GATE_UP[i % len(GATE_UP)], DOWN[i % len(DOWN)]) for i in range(n)]
            for mode in ("experts", "combine"):  # raw: the default and row gate/up + slot down
                forms = [(None, None)]
                if T in (1, 33) or SMOKE:
                    forms += pairs if mode == "experts" else [(GATE_UP[-1], DOWN[-1])]
                ref = FP8ReferenceExperts()(x, ids, w, fw.w13, fw.w2, emap, weight_mode=mode,
                                            out_dtype=torch.float32).out.double()
                oq = on = None
                if shape["W"] == 1 and mode == "experts":
                    oq = fp8_dense_reference(x, w, ids, fw.w13, fw.w2)
                    on = fp8_dense_reference(x, w, ids, fw.w13, fw.w2,
                                             quantize_activations=False)
                for gu, dn in forms:
                    for act in ("fp8", "float") if gu is None else ("fp8",):
                        for rows in (x, quantize_rows(x, dtype=fw.w13.dtype)) \
                                if act == "fp8" and gu is None else (x,):
                            got = stream.stream_fp8_experts(
                                rows, ids, w, fw.w13, fw.w2, emap, weighted=mode == "experts",
                                out_dtype=XDTYPE,
                                config=_cfg(gu, dn, act)).out.double()
                            e_ref = rel_err(got, ref)
                            tag = (f"{name} T={T} {mode} ACT={act} "
                                   f"{'FP8Rows' if rows is not x else 'float rows'} "
                                   f"gate_up={_short(gu)} down={_short(dn)}")
                            extra = "" if oq is None else \
                                f" oracle(q) {rel_err(got, oq):.2e} oracle(float) " \
                                f"{rel_err(got, on):.2e}"
                            if act == "fp8" and not e_ref < 1e-2:
                                failures.append(f"{tag}: {e_ref:.2e}")
                            if mode == "combine":
                                local = emap.local_ids(ids) >= 0
                                if not got[~local].eq(0).all():
                                    failures.append(f"{tag}: non-local slots not zero")
                            if gu is None or T == 1:
                                print(f"  {tag}: ref {e_ref:.2e}{extra}", flush=True)
                if oq is not None:  # the grouped path's, for comparison
                    grp = TritonFP8Experts(path="grouped")(x, ids, w, fw.w13, fw.w2, emap,
                                                           weight_mode=mode).out.double()
                    print(f"  {name} T={T} grouped: ref {rel_err(grp, ref):.2e} oracle(q) "
                          f"{rel_err(grp, oq):.2e} oracle(float) {rel_err(grp, on):.2e}")
            if SMOKE:
                continue
            ex = TritonFP8Experts(path="small")
            eager = ex(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts").out.clone()
            g = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                cap = ex(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts",
                         validate=False).out
            g.replay()
            torch.cuda.synchronize()
            if not torch.equal(cap, eager):
                failures.append(f"{name} T={T}: graph replay differs from the eager call")
        del fw
        torch.cuda.empty_cache()


def _stage(cases, fw, emap, cfg):
    """The stage's calls on ``cases``: the stream path with ``cfg``, or (None) grouped."""
    if cfg is None:
        grouped = TritonFP8Experts(path="grouped")
        return [lambda c=c: grouped(c[0], c[1], c[2], fw.w13, fw.w2, emap,
                                    weight_mode="experts", validate=False) for c in cases]
    return [lambda c=c: stream.stream_fp8_experts(
        c[0], c[1], c[2], fw.w13, fw.w2, emap, weighted=True, out_dtype=XDTYPE,
        config=cfg) for c in cases]


def _timed(cases, fw, emap, cfg) -> float:
    try:
        return _graph_us(_stage(cases, fw, emap, cfg))
    except Exception as exc:  # (a tile the compiler refuses: said, skipped)
        print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
        return float("inf")


def _sweep_case(name, T, fw, emap, rate, gen, down_only=False) -> dict:
    shape = SHAPES[name]
    cases = [_routing(shape, T, gen) for _ in range(ROT)]
    touched = []
    for _, ids, _ in cases:
        loc = emap.local_ids(ids)
        touched.append(loc[loc >= 0].unique().numel())
    floor = statistics.mean(touched) * fw.nbytes / emap.num_local / rate * 1e6
    base = stream.stream_config(T * shape["K"], hidden=shape["H"], inter=shape["I"])
    if down_only:  # gate/up at the bucket's default (TUNED included)
        res = {json.dumps(base): _timed(cases, fw, emap, base)}
    else:
        res = {json.dumps(_cfg(gu)): _timed(cases, fw, emap, _cfg(gu)) for gu in GATE_UP}
    best_gu = json.loads(min(res, key=res.get))["gate_up"]
    for dn in DOWN if down_only else DOWN[1:]:
        c = dict(base, down=dn, gate_up=best_gu) if down_only else _cfg(best_gu, dn)
        res[json.dumps(c)] = _timed(cases, fw, emap, c)
    default = res[json.dumps(base)] if down_only else None  # (JSON: null)
    best = min(res, key=res.get)
    g_us = _graph_us(_stage(cases, fw, emap, None))
    us, cfg = res[best], json.loads(best)
    per = floor or float("nan")  # (no local expert in any routing: no floor)
    shown = "   -   " if default is None else f"{default:7.1f}"
    print(f"{name:5} T={T:3}  default {shown} us  best {us:7.1f} us  floor {floor:6.1f}  "
          f"ratio {us / per:5.2f}  grouped {g_us:7.1f} ({g_us / per:5.2f})  "
          f"gate_up {_short(cfg['gate_up'])}  down {_short(cfg['down'])}  [{len(res)} configs]",
          flush=True)
    return dict(shape=name, T=T, slots=T * shape["K"], us=us, default=default, floor=floor,
                grouped=g_us, config=cfg, tried=len(res))


def sweep(names, tokens, rate, down_only=False) -> list:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name in names:
        fw, emap = _weights(SHAPES[name], gen)
        rows += [_sweep_case(name, T, fw, emap, rate, gen, down_only) for T in tokens]
        del fw
        torch.cuda.empty_cache()
    return rows


def _device() -> str:
    return "cpu (TRITON_INTERPRET=1 smoke)" if SMOKE else torch.cuda.get_device_name()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("env_file")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=["qwen3", "dsv3"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 16, 32, 64])
    ap.add_argument("--down-only", action="store_true",
                    help="gate/up at the bucket's default; time the down candidates only")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    print(f"{_device()}, torch {torch.__version__}")
    failures = []
    if not args.skip_check:
        try:
            check(failures)
        except Exception as exc:  # said and counted; the sweep still runs
            import traceback

            traceback.print_exc()
            failures.append(f"check raised {type(exc).__name__}: {exc}")
    rate = 1e11 if SMOKE else copy_rate() * 1e9
    print(f"copy rate {rate / 1e12:.2f} TB/s; stage = gate/up + down (weighted), graph of "
          f"{ROT} calls on {ROT} routings; defaults {json.dumps(stream.stream_config(8))}")
    rows = sweep(args.shapes, args.tokens, rate, args.down_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=_device(), copy_TBps=rate / 1e12, rows=rows,
                           failures=failures), f, indent=1)
    table = {}  # "HxI" -> the batch's slots -> the best config
    for r in rows:
        shape = SHAPES[r["shape"]]
        table.setdefault(f"{shape['H']}x{shape['I']}", {})[str(r["slots"])] = r["config"]
    wins = [r["slots"] for r in rows if r["shape"] == "qwen3" and r["us"] < r["grouped"]]
    limit = 0
    for r in sorted((r for r in rows if r["shape"] == "qwen3"), key=lambda r: r["slots"]):
        if r["us"] >= r["grouped"]:
            break
        limit = r["slots"]
    with open(args.env_file, "w") as f:
        f.write(f"export {stream.CONFIG_ENV}='{json.dumps(table)}'\n")
        f.write(f"export {stream.MAX_SLOTS_ENV}={limit}\n")
    print(f"stream ahead of grouped (qwen3) at slots {wins}; env for bench decode "
          f"({args.env_file}):")
    with open(args.env_file) as f:
        print(f.read(), end="")
    with open(args.env_file + ".rows.json", "w") as f:
        json.dump(dict(device=_device(), copy_TBps=rate / 1e12, rows=rows),
                  f, indent=1)
    if failures:
        print(f"FAILED ({len(failures)}):", *failures, sep="\n  ")
        return 1
    print("check passed" if not args.skip_check else "check skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
