"""FP8 accuracy (issue 18): per-layer relative error of the FP8 pipeline (FP8 weights with
128x128 block scales, activations quantised per 1x128 group, bfloat16 in and out) against
the bf16 pipeline and against float64 references, on random weights and on a tiny
DeepSeek-V3-shaped checkpoint saved in FP8.

    python bench/fp8_accuracy.py [--experts reference|triton] [--json PATH]

Columns (relative Frobenius error of the layer output over T tokens):
    fp8 vs deq64    FP8 pipeline vs the float64 dequantised model (activation quantisation +
                    bf16 rounding: the FP8 kernels' own error)
    fp8 vs bf16     FP8 pipeline vs the bf16 pipeline on the original (unquantised) weights
    bf16 vs f64     bf16 pipeline vs the float64 model on the original weights
    fp8 vs f64      FP8 pipeline vs the float64 model on the original weights (all FP8 error)
    deq64 vs f64    the weight quantisation alone (float64 both)
The checkpoint has no original weights: its bf16 pipeline runs on the dequantised weights.
Runs on a CPU (reference experts) or a GPU (--experts triton).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocm_moe import EPMoE, RouterConfig, dense_moe_reference
from rocm_moe.experts.fp8 import FP8ReferenceExperts, fp8_dense_reference

CASES = {  # name: (E, H, I, K, T, router)
    "qwen3-like E32 H1024 I384 K8": (32, 1024, 384, 8, 256, "qwen3"),
    "dsv3-like E32 H1792 I512 K8": (32, 1792, 512, 8, 128, "dsv3"),
    "odd H E8 H200 I128 K2": (8, 200, 128, 2, 33, "qwen3"),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _experts(name: str):
    if name == "triton":
        from rocm_moe.experts.triton_fp8 import TritonFP8Experts

        return TritonFP8Experts()
    return FP8ReferenceExperts()


def random_case(E, H, I, K, T, router, experts, device) -> dict:
    rc = RouterConfig.qwen3_moe(E, K) if router == "qwen3" else \
        RouterConfig.deepseek_v3(E, K, n_group=4, topk_group=2)
    kw = dict(hidden_size=H, intermediate_size=I, router=rc, device=device)
    bf16 = EPMoE(**kw, dtype=torch.bfloat16)
    fp8 = EPMoE(**kw, experts=_experts(experts), weight_format="block_fp8", dtype=torch.bfloat16)
    f32 = EPMoE(**kw, dtype=torch.float32)  # the original weights, unrounded
    for layer in (bf16, fp8, f32):
        layer.reset_parameters(seed=1)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        r = bf16.route_tokens(x.bfloat16())  # one routing for all (same gate weights)
        ids, w = r.topk_ids, r.topk_weights
        y_fp8 = fp8(x.bfloat16(), forced_expert_ids=ids)
        y_bf16 = bf16(x.bfloat16(), forced_expert_ids=ids)
        y64, _ = dense_moe_reference(x.bfloat16(), w, ids, f32.w13, f32.w2)
        w13, w2 = fp8.expert_weights()
        deq = fp8_dense_reference(x.bfloat16(), w, ids, w13, w2, quantize_activations=False)
    return {"fp8 vs deq64": rel(y_fp8, deq), "fp8 vs bf16": rel(y_fp8, y_bf16),
            "bf16 vs f64": rel(y_bf16, y64), "fp8 vs f64": rel(y_fp8, y64),
            "deq64 vs f64": rel(deq, y64)}


def checkpoint_case(experts, device) -> dict:
    from rocm_moe.integrations import hf
    from rocm_moe.placement import Placement
    from tests.test_fp8_checkpoint import E, H, save_fp8_deepseek_v3

    with tempfile.TemporaryDirectory() as d:
        save_fp8_deepseek_v3(Path(d))
        w = hf.load_moe_layer(d, 1, Placement.contiguous(E, 1), 0)
    fp8 = hf.build_layer(w, experts=_experts(experts), dtype=torch.bfloat16, device=device)
    w13, w2 = fp8.expert_weights()
    bf16 = EPMoE(hidden_size=H, intermediate_size=w.intermediate_size, router=w.router,
                 shared_intermediate_size=w.shared_w2.shape[1], dtype=torch.bfloat16,
                 device=device)
    with torch.no_grad():
        bf16.gate.weight.copy_(fp8.gate.weight)
        bf16.e_score_correction_bias.copy_(fp8.e_score_correction_bias)
        bf16.load_experts(w13.dequantize(torch.float32), w2.dequantize(torch.float32))
        bf16.shared_experts.load_state_dict(fp8.shared_experts.state_dict())
        x = torch.randn(64, H, generator=torch.Generator().manual_seed(3)).bfloat16().to(device)
        out = fp8(x, return_raw=True)
        shared = fp8.shared_experts.reference(x)
        deq = fp8_dense_reference(x, out.topk_weights, out.topk_ids, w13, w2,
                                  quantize_activations=False) + shared
        y_bf16 = bf16(x)
    return {"fp8 vs deq64": rel(out.out, deq), "fp8 vs bf16": rel(out.out, y_bf16),
            "bf16 vs f64": rel(y_bf16, deq)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", choices=["reference", "triton"], default="reference")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = {name: random_case(*c, args.experts, device) for name, c in CASES.items()}
    rows["tiny FP8 DeepSeek-V3 checkpoint (layer 1, +shared)"] = checkpoint_case(args.experts,
                                                                                   device)
    cols = ["fp8 vs deq64", "fp8 vs bf16", "bf16 vs f64", "fp8 vs f64", "deq64 vs f64"]
    print(f"experts={args.experts} on {device}; relative error of the layer output")
    print("| case | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2e}" if c in r else "-" for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(experts=args.experts, device=device,
                                                   rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
