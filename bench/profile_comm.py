"""Where the time of a dispatch and a combine goes, on 2 GPUs (rank 0 prints).

1. a step-by-step breakdown of dispatch (device-synchronised after each step, median of 20),
   beside the uninstrumented call, for each token count given;
2. torch.profiler tables of 3 dispatch + combine calls at the last token count.

Usage on a 2-GPU machine: python3 bench/profile_comm.py [tokens ...]
"""

import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from rocm_moe import ExpertsOutput, Placement
from rocm_moe.benchmarks.comm import _routing
from rocm_moe.comm import rows
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch

H, E, K = 7168, 256, 8


def _steps(disp, x, w, ids):
    """The dispatch steps of TorchDispatcher._dispatch, one by one, synchronised."""
    T, W, dev = x.shape[0], disp.world_size, x.device
    times = {}

    def mark(name, t0):
        torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
        return time.perf_counter()

    torch.cuda.synchronize()
    t = time.perf_counter()
    dest1 = disp._dest1_on(dev)[ids + 1]
    send_WT = torch.zeros(W + 1, T, dtype=torch.int64, device=dev)
    send_WT.scatter_(0, dest1.T, 1)
    csum = send_WT[1:].cumsum(1)
    counts = csum[:, -1].contiguous()
    t = mark("owner+scatter+cumsum", t)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=disp.group)
    t = mark("counts a2a", t)
    send, _ = rows.pack_rows(x, ids, w, csum, T * min(W, K))
    t = mark("pack+positions (triton)", t)
    sc, rc = (tuple(c) for c in torch.stack([counts, recv_counts]).tolist())
    t = mark("host read", t)
    recv = send.new_empty(sum(rc), send.shape[1])
    dist.all_to_all_single(recv, send[:sum(sc)], list(rc), list(sc), group=disp.group)
    t = mark("payload a2a", t)
    return times


def _worker(info, tokens):
    disp = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                           dtype=torch.bfloat16)
    report = []
    for T in tokens:
        x = torch.randn(T, H, device=info.device, dtype=torch.bfloat16)
        ids, w = _routing(T, E, K, info.rank, info.device)
        steps, whole, noop = [], [], []
        for i in range(25):
            dist.barrier()
            steps.append(_steps(disp, x, w, ids))
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            disp.dispatch(x, w, ids, validate=False)
            torch.cuda.synchronize()
            whole.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.cuda.synchronize()
            noop.append(time.perf_counter() - t0)
            if i < 5:
                steps.pop(), whole.pop(), noop.pop()
        med = {k: statistics.median(s[k] for s in steps) * 1e6 for k in steps[0]}
        report.append((T, med, statistics.median(whole) * 1e6, statistics.median(noop) * 1e6))
    if info.rank == 0:
        for T, med, whole, noop in report:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in med.items())
            print(f"T={T}: whole dispatch {whole:.0f} us; steps (us, each synchronised): "
                  f"{parts}; sum {sum(med.values()):.0f}; bare synchronize {noop:.0f}")
    T = tokens[-1]
    x = torch.randn(T, H, device=info.device, dtype=torch.bfloat16)
    ids, w = _routing(T, E, K, info.rank, info.device)
    res = disp.dispatch(x, w, ids, validate=False)
    eo = ExpertsOutput(out=res.x.contiguous(), weights_applied=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            res = disp.dispatch(x, w, ids, validate=False)
            disp.combine(eo, res.handle)
            torch.cuda.synchronize()
    if info.rank == 0:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10,
                                        max_name_column_width=40))
    return 0


if __name__ == "__main__":
    launch(2, _worker, [int(t) for t in sys.argv[1:]] or [128, 4096])
