"""Rows the grouped GEMMs compute vs real local slots, for the benchmark's random routing.

Each local expert's slots are padded to a multiple of BLOCK_M, so a block of the gate/up and
down GEMMs may hold sentinel rows; this counts them for the experts benchmark's shapes, with
the routing ``bench/profile_experts.py`` profiles (``rocm_moe.benchmarks.experts._routing``, the
first draws of ``_case``, from a generator seeded 0 per case). CPU only.

Usage: python3 bench/padding.py
"""

import torch

from rocm_moe.benchmarks.experts import SHAPES, _routing


def main() -> None:
    for name, s in SHAPES.items():
        for rows in s["sizes"]:
            _, ids, _, emap = _routing(s, rows, torch.Generator().manual_seed(0), device="cpu")
            loc = emap.local_ids(ids)
            counts = torch.bincount(loc[loc >= 0].long(), minlength=emap.num_local)
            real = int(counts.sum())
            for bm in (16, 32, 64, 128):
                computed = int(((counts + bm - 1) // bm * bm).sum())
                print(f"{name} rows={rows} BLOCK_M={bm}: real {real}, computed {computed}, "
                      f"padding {100 * (computed / real - 1):.1f}%")


if __name__ == "__main__":
    main()
