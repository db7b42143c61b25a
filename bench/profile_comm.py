"""Where the time of one dispatch and one combine goes (torch.profiler on rank 0, 2 GPUs).

Usage on a 2-GPU machine: python3 bench/profile_comm.py [tokens]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from rocm_moe import ExpertsOutput, Placement
from rocm_moe.benchmarks.comm import _routing
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch


def _worker(info, T):
    H, E, K = 7168, 256, 8
    disp = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                           dtype=torch.bfloat16)
    x = torch.randn(T, H, device=info.device, dtype=torch.bfloat16)
    ids, w = _routing(T, E, K, info.rank, info.device)
    for _ in range(5):
        res = disp.dispatch(x, w, ids, validate=False)
        y = disp.combine(ExpertsOutput(out=res.x.contiguous(), weights_applied=True), res.handle)
    torch.cuda.synchronize()
    eo = ExpertsOutput(out=res.x.contiguous(), weights_applied=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            res = disp.dispatch(x, w, ids, validate=False)
            torch.cuda.synchronize()
            y = disp.combine(eo, res.handle)
            torch.cuda.synchronize()
    del y
    if info.rank == 0:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                        max_name_column_width=48))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12,
                                        max_name_column_width=48))
    return 0


if __name__ == "__main__":
    launch(2, _worker, int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
