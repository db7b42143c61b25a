"""Issue 33: which copy rate is the weight-read floor's? Four measurements of one 1 GiB
device-to-device copy (bytes read + written / time, median): ``copy_`` eager (do_bench: the
experts benchmarks' ``copy_rate``), ``copy_`` replayed from a CUDA graph of 4 (the decode
benchmark's until 2026-12-07: a memcpy node), an elementwise kernel (``torch.neg``) both ways;
and a read-only rate: ``torch.sum`` over the same GiB (bytes read / time), what the experts'
weight streaming does.

Usage (GPU): python3 bench/copy_rate_probe.py
"""

import statistics

import torch

from rocm_moe.benchmarks.decode import _timer


def graph_us(fn, inner=4, iters=20) -> float:
    """us per call of fn replayed from a CUDA graph of ``inner`` calls, median of ``iters``
    replays after 3: the decode benchmark's timer (``benchmarks.decode._timer``)."""
    timer = _timer(fn, torch.device("cuda"), inner)
    return statistics.median([timer() for _ in range(iters + 3)][3:]) * 1e6


def main() -> None:
    from triton.testing import do_bench

    n = 2**29  # 1 GiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    out = torch.empty((), device="cuda", dtype=torch.float32)
    rw, r = 2 * a.nbytes, a.nbytes
    rows = [
        ("copy_ eager (do_bench)", rw, do_bench(lambda: b.copy_(a), return_mode="median") * 1e3),
        ("copy_ graph of 4", rw, graph_us(lambda: b.copy_(a))),
        ("neg eager (do_bench)", rw,
         do_bench(lambda: torch.neg(a, out=b), return_mode="median") * 1e3),
        ("neg graph of 4", rw, graph_us(lambda: torch.neg(a, out=b))),
        ("sum graph of 4 (read only)", r,
         graph_us(lambda: torch.sum(a, 0, dtype=torch.float32, out=out))),
    ]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, nbytes, us in rows:
        print(f"{name:30} {us:9.1f} us  {nbytes / us / 1e6:6.2f} TB/s")


if __name__ == "__main__":
    main()
