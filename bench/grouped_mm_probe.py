"""Issue 31 probe: is torch._grouped_mm (CUTLASS's persistent, warp-specialised sm_90 grouped
GEMM) faster than the Triton experts' GEMMs at the compute-bound sizes, and by how much once the
rows it needs contiguous are gathered and the outputs summed back?

The Triton experts gather each block's rows inside the gate/up GEMM and weight + sum the slots in
the down epilogue and one sum kernel; at Qwen3 4096 tokens their two GEMMs run at 366-389 TFLOP/s
(bench/results/profile_experts_h100_scan_layout.txt) against a dense bf16 matmul's ~700, and the
stage is 1.93x its floor. ``torch._grouped_mm`` takes [rows, H] contiguous per expert (``offs``:
each expert's end row) and [e, H, N] weights, so a backend on it pays a row gather, a separate
SiLU * up pass and a gather-sum back: this probe times the two GEMMs alone and that whole
pipeline (``grouped_mm_experts``), beside the Triton experts and the floor of the same run.

Per case (shape:rows): floor = max(bytes / copy rate, flops / 8192^3 bf16 matmul rate), as
``rocm-moe bench experts``; every time a CUDA-graph replay median; TFLOP/s of each GEMM; the
pipeline's relative error against the reference experts (bf16 near 1e-2 at worst).

Usage on a GPU (sm_90 for CUTLASS's kernel; elsewhere torch runs a per-group loop):
    python3 bench/grouped_mm_probe.py [qwen3:4096 qwen3:16384 dsv3:8192 ...]
Not used by the package: a measurement for a backend, nothing else imports it but its CPU test
(``grouped_mm_experts`` against the reference, tests/experts/test_grouped_mm_probe.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocm_moe.experts.layout import build_layout

DEFAULT = ["qwen3:1024", "qwen3:4096", "qwen3:16384", "dsv3:1024", "dsv3:8192"]


def grouped_mm_experts(x, ids, w, w13, w2, emap):
    """The weighted experts stage [R, H] through two ``torch._grouped_mm`` calls: the local
    slots sorted by expert (``build_layout``, block 1), their rows gathered, gate/up GEMM (bf16
    out), SiLU(gate) * up, down GEMM, then each row's slots weighted and summed in float32.
    Graph-capturable: no host read (rows past the local slots are computed on clamped
    indices and dropped into a trash row)."""
    R, K = ids.shape
    N, I = R * K, w2.shape[2]
    lay = build_layout(ids, emap, block_size=1, tables=False, validate=False)
    slots = lay.sorted_slot_ids.long()  # [N]: local slots by expert, then the sentinel N
    offs = lay.expert_offsets[1:]  # [e] int32: each expert's end row
    xs = x.index_select(0, (slots // K).clamp_(max=max(R - 1, 0)))
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [N, 2I]
    a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [N, H]
    ys = torch.zeros(N + 1, x.shape[1], dtype=torch.float32, device=x.device)
    ys.index_copy_(0, slots, y.float())  # unused rows (sentinel N) land in the trash row
    return (ys[:N].view(R, K, -1) * w.unsqueeze(-1)).sum(1).to(x.dtype)


def _case(name: str, rows: int):
    from rocm_moe.benchmarks.experts import SHAPES, _routing

    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    x, ids, w, emap = _routing(shape, rows, gen)
    e, H, I = emap.num_local, shape["H"], shape["I"]
    g = torch.Generator(device="cuda").manual_seed(1)  # weights drawn on the GPU (DSV3: 1.4 G)
    w13 = (torch.randn(e, 2 * I, H, generator=g, device="cuda") / H**0.5).bfloat16()
    w2 = (torch.randn(e, H, I, generator=g, device="cuda") / I**0.5).bfloat16()
    return x, ids, w, w13, w2, emap


def probe(case: str, ceil: dict) -> None:
    from triton.testing import do_bench_cudagraph

    from rocm_moe.experts.reference import ReferenceExperts
    from rocm_moe.experts.triton import TritonExperts

    name, rows = case.split(":")
    x, ids, w, w13, w2, emap = _case(name, int(rows))
    R, K = ids.shape
    H, I = x.shape[1], w2.shape[2]
    loc = emap.local_ids(ids)
    pairs = int((loc >= 0).sum())
    touched = int(loc[loc >= 0].unique().numel())
    flops1, flops2 = 2 * pairs * H * 2 * I, 2 * pairs * I * H
    nbytes = touched * 3 * H * I * 2 + 2 * R * H * 2
    floor = max(nbytes / (ceil["copy_GBps"] * 1e9),
                (flops1 + flops2) / (ceil["matmul_TFLOPs"] * 1e12))

    def us(call) -> float:
        return do_bench_cudagraph(call, rep=100, return_mode="median") * 1e3

    ref = ReferenceExperts()(x, ids, w, w13, w2, emap, weight_mode="experts",
                             validate=False).out.double()
    tri = TritonExperts()

    def triton_call():
        return tri(x, ids, w, w13, w2, emap, weight_mode="experts", validate=False)

    out_g = grouped_mm_experts(x, ids, w, w13, w2, emap)
    err_g = ((out_g.double() - ref).norm() / ref.norm()).item()
    err_t = ((triton_call().out.double() - ref).norm() / ref.norm()).item()
    t_tri = us(triton_call)
    t_full = us(lambda: grouped_mm_experts(x, ids, w, w13, w2, emap))
    # the two GEMMs alone, on rows already gathered (the layout and gather outside the timing)
    lay = build_layout(ids, emap, block_size=1, tables=False, validate=False)
    slots = lay.sorted_slot_ids.long()
    offs = lay.expert_offsets[1:]
    xs = x.index_select(0, (slots // K).clamp_(max=R - 1))
    a = torch.randn(xs.shape[0], I, device="cuda").bfloat16()
    w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)
    t1 = us(lambda: torch._grouped_mm(xs, w13t, offs=offs))
    t2 = us(lambda: torch._grouped_mm(a, w2t, offs=offs))
    print(f"{case:12s} pairs {pairs:6d}  floor {floor * 1e6:8.1f} us | triton {t_tri:8.1f} us "
          f"({t_tri / (floor * 1e6):.2f}x, err {err_t:.1e}) | grouped_mm pipeline "
          f"{t_full:8.1f} us ({t_full / (floor * 1e6):.2f}x, err {err_g:.1e}) | GEMMs alone: "
          f"gate/up {t1:7.1f} us {flops1 / t1 / 1e6:5.0f} TFLOP/s, down {t2:7.1f} us "
          f"{flops2 / t2 / 1e6:5.0f} TFLOP/s, sum {t1 + t2:8.1f} us "
          f"({(t1 + t2) / (floor * 1e6):.2f}x)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", default=DEFAULT, help="shape:rows (shapes of "
                    "rocm-moe bench experts: qwen3, dsv3)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (the CPU test runs grouped_mm_experts against the reference)")
        return 2
    from rocm_moe.benchmarks.experts import ceilings

    ceil = ceilings()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy "
          f"{ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s "
          f"(measured)", flush=True)
    for case in args.cases:
        probe(case, ceil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
