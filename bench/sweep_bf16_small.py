"""Issue 33: the bf16 small-batch experts on this GPU, three ways side by side: the streaming
kernels with bf16 weights (``triton_small_fp8.BF16_DEFAULTS`` and candidate tiles), the tl.dot
forms of ``triton_small`` (its heuristic config: three launches at one token) and the grouped
path. bench/gpu_session11.sh runs it (its step 5).

1. check, per shape at T = 1 and 8 (10% of slots -1): every candidate against the float64
   oracle (``ReferenceExperts``) in both weight modes, tolerance 2e-2 (the GPU tests'); PDL on
   and off give the same bits; a failure exits 1 after the table.
2. times, per shape and T: the stage (gate/up + down, weighted) as a CUDA graph of ROT calls
   on ROT routings (different experts per call: weights from HBM, not the L2), median of
   replays; the floor: the bytes of the distinct local experts of each call / the copy rate
   measured here. Gate/up candidates with the default down, then down candidates with the
   best gate/up.

Usage (GPU): python3 bench/sweep_bf16_small.py [--tokens 1 2 4 8] [--json FILE]
"""

import argparse
import json
import statistics
import sys

import torch

from rocm_moe import Placement, ReferenceExperts
from rocm_moe.benchmarks.experts import SHAPES, copy_rate
from rocm_moe.experts import triton_small as small
from rocm_moe.experts.triton import TritonExperts
from rocm_moe.experts.triton_small_fp8 import BF16_DEFAULTS, _pick
from rocm_moe.oracle import rel_err

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sweep_fp8_small import _graph_us, _k, _short

SMOKE = not torch.cuda.is_available()  # CPU (TRITON_INTERPRET=1): tiny shapes, eager timing
DEV = torch.device("cpu" if SMOKE else "cuda")
ROT = 2 if SMOKE else 16
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # (the interpreter miscomputes bf16)
if SMOKE:
    SHAPES = {"qwen3": dict(E=16, W=1, rank=0, H=256, I=128, K=4),
              "dsv3": dict(E=16, W=4, rank=1, H=256, I=128, K=4)}


def _cfg(gate_up=None, down=None, pdl=True, slots=8):
    base = _pick(BF16_DEFAULTS, slots)  # (the batch's bucket)
    return dict(base, PDL=pdl, gate_up=dict(gate_up or base["gate_up"]),
                down=dict(down or base["down"]))


GATE_UP = [BF16_DEFAULTS["8"]["gate_up"], _k("slot", 16, 128, 4), _k("slot", 16, 512, 8),
           _k("slot", 8, 256, 4), _k("slot", 32, 128, 8), _k("slot", 16, 256, 8, 3, True),
           _k("slot", 16, 256, 8, split=2), _k("row", 16, 128, 8)]
DOWN = [BF16_DEFAULTS["8"]["down"], _k("row", 8, 128, 8, prefetch=True), _k("row", 8, 256, 8),
        _k("row", 16, 128, 8), _k("row", 4, 256, 4), _k("slot", 32, 128, 4),
        _k("slot", 16, 256, 4),
        # PRELOAD: the first K steps' weights loaded before the wait for gate/up (PDL)
        _k("row", 8, 256, 8, preload=3), _k("row", 8, 256, 8, preload=2, prefetch=True),
        _k("row", 8, 128, 8, preload=4), _k("row", 4, 256, 4, preload=3),
        _k("row", 8, 128, 8, preload=3), _k("slot", 32, 256, 4, preload=3)]


def _weights(shape, gen):
    emap = Placement.contiguous(shape["E"], shape["W"]).expert_map(shape["rank"]).to(DEV)
    e, H, I = emap.num_local, shape["H"], shape["I"]
    w13 = (torch.randn(e, 2 * I, H, generator=gen, device=DEV) / H**0.5).to(DTYPE)
    w2 = (torch.randn(e, H, I, generator=gen, device=DEV) / I**0.5).to(DTYPE)
    return w13, w2, emap


def _routing(shape, T, gen, drop=0.0):
    x = torch.randn(T, shape["H"], generator=gen, device=DEV).to(DTYPE)
    ids = torch.rand(T, shape["E"], generator=gen, device=DEV).topk(shape["K"], dim=1)
    ids = ids.indices.int()
    if drop:
        ids[torch.rand(ids.shape, generator=gen, device=DEV) < drop] = -1
    return x, ids, torch.rand(T, shape["K"], generator=gen, device=DEV)


def _calls(cases, w13, w2, emap, how):
    """``how``: a stream config, "dot" (the tl.dot forms' heuristic) or "grouped"."""
    if how == "grouped":
        g = TritonExperts(path="grouped")
        return [lambda c=c: g(*c, w13, w2, emap, weight_mode="experts", validate=False)
                for c in cases]
    R, K = cases[0][1].shape
    cfg = small.small_config(R * K, fp8=False) if how == "dot" else how
    return [lambda c=c: small.small_experts(*c, w13, w2, emap, weighted=True, config=cfg)
            for c in cases]


def check(name, shape, w13, w2, emap, gen, failures):
    for T in (1, 8):
        x, ids, w = _routing(shape, T, gen, drop=0.1)
        for mode in ("experts", "combine"):
            want = ReferenceExperts()(x.double(), ids, w, w13.double(), w2.double(), emap,
                                      weight_mode=mode).out
            for cfg in [_cfg(gu) for gu in GATE_UP] + [_cfg(None, dn) for dn in DOWN[1:]]:
                kw = dict(weighted=mode == "experts", config=cfg)
                got = small.small_experts(x, ids, w, w13, w2, emap, **kw).out
                plain = small.small_experts(x, ids, w, w13, w2, emap,
                                            **dict(kw, config=dict(cfg, PDL=False))).out
                err = rel_err(got, want)
                if not err < 2e-2 or not torch.equal(got, plain):
                    failures.append(f"{name} T={T} {mode} {_short(cfg['gate_up'])} "
                                    f"{_short(cfg['down'])}: rel err {err:.2e}, PDL bits "
                                    f"{'equal' if torch.equal(got, plain) else 'DIFFER'}")


def sweep_case(name, shape, T, w13, w2, emap, rate, gen, down_only=False) -> dict:
    cases = [_routing(shape, T, gen) for _ in range(ROT)]
    touched = []
    for _, ids, _ in cases:
        loc = emap.local_ids(ids)
        touched.append(loc[loc >= 0].unique().numel())
    per_expert = (w13.numel() + w2.numel()) * 2 / emap.num_local
    floor = statistics.mean(touched) * per_expert / rate * 1e6
    slots = T * shape["K"]

    def cfg_of(gu=None, dn=None, pdl=True):
        return _cfg(gu, dn, pdl, slots)
    res = {json.dumps(cfg_of(gu)): _graph_us(_calls(cases, w13, w2, emap, cfg_of(gu)))
           for gu in ([None] if down_only else GATE_UP)}
    best_gu = json.loads(min(res, key=res.get))["gate_up"]
    for dn in DOWN[1:]:
        res[json.dumps(cfg_of(best_gu, dn))] = _graph_us(
            _calls(cases, w13, w2, emap, cfg_of(best_gu, dn)))
    if json.dumps(cfg_of()) not in res:
        res[json.dumps(cfg_of())] = _graph_us(_calls(cases, w13, w2, emap, cfg_of()))
    default = res[json.dumps(cfg_of())]
    best = min(res, key=res.get)
    nopdl = _graph_us(_calls(cases, w13, w2, emap, cfg_of(pdl=False)))
    dot = _graph_us(_calls(cases, w13, w2, emap, "dot"))
    grouped = _graph_us(_calls(cases, w13, w2, emap, "grouped"))
    cfg = json.loads(best)
    print(f"{name:5} T={T:3}  floor {floor:6.1f} us  stream default {default:6.1f} "
          f"({default / floor:4.2f}; PDL off {nopdl:6.1f})  best {res[best]:6.1f} "
          f"({res[best] / floor:4.2f}: {_short(cfg['gate_up'])} + {_short(cfg['down'])})  "
          f"tl.dot forms {dot:6.1f} ({dot / floor:4.2f})  grouped {grouped:6.1f} "
          f"({grouped / floor:4.2f})", flush=True)
    return dict(shape=name, T=T, slots=T * shape["K"], floor=floor, stream_default=default,
                stream_default_nopdl=nopdl, best=res[best], best_config=cfg, dot=dot,
                grouped=grouped, tried=len(res))


def _device() -> str:
    return "cpu (TRITON_INTERPRET=1 smoke)" if SMOKE else torch.cuda.get_device_name()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["qwen3", "dsv3"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--json")
    ap.add_argument("--down-only", action="store_true",
                    help="gate/up at the bucket's default; time the down candidates only")
    args = ap.parse_args()
    rate = 1e11 if SMOKE else copy_rate() * 1e9
    print(f"{_device()}, torch {torch.__version__}; copy rate "
          f"{rate / 1e12:.2f} TB/s; stage = gate/up + down (weighted), graph of {ROT} calls "
          f"on {ROT} routings; stream default {json.dumps(BF16_DEFAULTS['8'])}", flush=True)
    gen = torch.Generator(device=DEV).manual_seed(0)
    failures, rows = [], []
    for name in args.shapes:
        shape = SHAPES[name]
        w13, w2, emap = _weights(shape, gen)
        check(name, shape, w13, w2, emap, gen, failures)
        rows += [sweep_case(name, shape, T, w13, w2, emap, rate, gen, args.down_only)
                 for T in args.tokens]
        del w13, w2
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=_device(), copy_TBps=rate / 1e12,
                           rows=rows, failures=failures), f, indent=1)
    if failures:
        print(f"FAILED ({len(failures)}):", *failures, sep="\n  ")
        return 1
    print("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
