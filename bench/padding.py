"""Rows the grouped GEMMs compute vs real local slots, for the benchmark's random routing.

Each local expert's slots are padded to a multiple of BLOCK_M, so a block of the gate/up and
down GEMMs may hold sentinel rows; this counts them for the experts benchmark's shapes, with
the routing ``bench/profile_experts.py`` profiles (``rocm_moe.benchmarks.experts._case`` drawn
from a generator seeded 0 per case: the input rows, then torch.rand(rows, E).topk(K)). CPU only.

Usage: python3 bench/padding.py
"""

import torch

from rocm_moe import Placement
from rocm_moe.benchmarks.experts import SHAPES


def main() -> None:
    for name, s in SHAPES.items():
        emap = Placement.contiguous(s["E"], s["W"]).expert_map(s["rank"])
        for rows in s["sizes"]:
            gen = torch.Generator().manual_seed(0)
            torch.randn(rows, s["H"], generator=gen)  # _case draws the input rows first
            ids = torch.rand(rows, s["E"], generator=gen).topk(s["K"], dim=1).indices.int()
            loc = emap.local_ids(ids)
            counts = torch.bincount(loc[loc >= 0].long(), minlength=emap.num_local)
            real = int(counts.sum())
            for bm in (16, 32, 64, 128):
                computed = int(((counts + bm - 1) // bm * bm).sum())
                print(f"{name} rows={rows} BLOCK_M={bm}: real {real}, computed {computed}, "
                      f"padding {100 * (computed / real - 1):.1f}%")


if __name__ == "__main__":
    main()
