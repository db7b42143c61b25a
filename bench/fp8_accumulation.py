"""Triton FP8 experts' accumulation on a GPU: relative error against the FP8 torch reference
(same quantisation) and the float64 oracle of the same quantised model, for the default FP8
``tl.dot`` (sm_90: the tensor core's reduced-precision accumulator over each 128-wide K step),
``precise=True`` (promoted to float32 every MMA) and ``upcast=True`` (float16 MMAs), with
float32 and bfloat16 outputs, and each one's whole-stage time (CUDA-graph replay, median).

Usage on the GPU machine: python3 bench/fp8_accumulation.py | tee OUT.txt
"""
import torch
from triton.testing import do_bench_cudagraph

from rocm_moe.benchmarks.experts import SHAPES, _routing
from rocm_moe.experts.fp8 import FP8ReferenceExperts, fp8_dense_reference, quantize_experts
from rocm_moe.experts.triton_fp8 import TritonFP8Experts
from rocm_moe.quant import native_fp8_dtype


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


gen = torch.Generator().manual_seed(0)
dt = native_fp8_dtype("cuda")
for name, sizes in (("qwen3", (1, 64, 1024, 4096)), ("dsv3", (128, 8192))):
    shape = SHAPES[name]
    for R in sizes:
        x, ids, w, emap = _routing(shape, R, gen)
        e, H, I = emap.num_local, shape["H"], shape["I"]
        w13 = (torch.randn(e, 2 * I, H, generator=gen) / H**0.5).cuda()
        w2 = (torch.randn(e, H, I, generator=gen) / I**0.5).cuda()
        fw = quantize_experts(w13, w2, dtype=dt)
        loc = emap.local_ids(ids)
        ref = FP8ReferenceExperts()(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts",
                                    validate=False, out_dtype=torch.float32).out
        lid = torch.where(loc >= 0, loc, -1)
        wl = torch.where(loc >= 0, w, 0.0)
        yq = fp8_dense_reference(x, wl, lid, fw.w13, fw.w2) if R <= 1024 else None
        line = f"{name} R={R} x={x.dtype}"
        if yq is not None:
            line += f" ref-vs-f64 {rel(ref, yq):.1e}"
        for label, ex in (("default", TritonFP8Experts()),
                          ("precise", TritonFP8Experts(precise=True)),
                          ("upcast", TritonFP8Experts(upcast=True))):
            for od in (torch.float32, torch.bfloat16):
                out = ex(x, ids, w, fw.w13, fw.w2, emap, weight_mode="experts",
                         validate=False, out_dtype=od).out
                line += f" | {label}/{str(od)[6:]} vs ref {rel(out, ref):.1e}"
                if yq is not None:
                    line += f" vs f64 {rel(out, yq):.1e}"
            t = do_bench_cudagraph(lambda ex=ex, a=(x, ids, w, fw.w13, fw.w2, emap): ex(
                *a, weight_mode="experts", validate=False), rep=100, return_mode="median")
            line += f" {t * 1e3:.1f}us"
        print(line, flush=True)
        torch.cuda.empty_cache()
