"""Which rows-per-program / warps of the Triton routers give other bits than 1 row per program,
on this GPU (found 2026-12-07 by the GPU suite: 2 rows per program route every row of a grouped
router wrongly on an H100 with Triton 3.6; bench/results/router_rows_h100.txt). Since then
``_routing_triton._launch`` refuses rows = 2, which this script prints as "refused".

Usage on a GPU machine, from the repository root: python3 bench/router_rows.py
"""

import torch

from rocm_moe import RouterConfig
from rocm_moe._routing_triton import fused_route, splitk_route

CONFIGS = {
    "dsv3": RouterConfig.deepseek_v3(256, 8),
    "dsv3_nogroup": RouterConfig.deepseek_v3(256, 8, n_group=1, topk_group=1),
    "g3": RouterConfig.deepseek_v3(96, 5, n_group=3, topk_group=2),
    "qwen3": RouterConfig.qwen3_moe(128, 8),
}
T = 17


def route(kind, cfg, logits, part, bias, rows, warps):
    if kind == "fused_route":
        return fused_route(logits_TE=logits, config=cfg, bias_E=bias, rows=rows)
    out = torch.empty(part.shape[1:], device=part.device)
    return splitk_route(part_STE=part, logits_TE=out, config=cfg, bias_E=bias, rows=rows,
                        num_warps=warps)


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for name, cfg in CONFIGS.items():
        E = cfg.num_experts
        logits = torch.randn(T, E, generator=g).to(dev)
        part = torch.randn(3, T, E, generator=g).to(dev)
        bias = (torch.rand(E, generator=g) * 0.1).to(dev) if cfg.scoring == "sigmoid" else None
        for kind in ("fused_route", "splitk_route"):
            base = route(kind, cfg, logits, part, bias, 1, None)
            for rows in (2, 4, 8, 16):
                for warps in (None,) if kind == "fused_route" else (None, 1, 2, 4):
                    label = f"{name:13s} {kind:13s} rows={rows:2d} warps={warps}"
                    try:
                        r = route(kind, cfg, logits, part, bias, rows, warps)
                    except ValueError as exc:
                        print(f"{label} refused: {exc}", flush=True)
                        continue
                    torch.cuda.synchronize()
                    same = (r.topk_ids == base.topk_ids).all(1) & \
                        (r.topk_weights == base.topk_weights).all(1)
                    bad = (~same).nonzero().flatten().tolist()
                    print(f"{label} bad rows {bad}", flush=True)
                    if bad:
                        i = bad[0]
                        print("   ids", r.topk_ids[i].tolist(), "base", base.topk_ids[i].tolist(),
                              "w sum", float(r.topk_weights[i].sum()))


if __name__ == "__main__":
    main()
