"""Where the one-launch Triton router's bits leave the torch path's (issue 33 item 1), one stage at
a time, on a GPU: each row isolates one stage by a router config that leaves the others exact.

  stage              config                                      what differs if it differs
  sigmoid            E=32, K=32, sigmoid, no norm, scale 1        the sigmoid
  softmax E          E, K=min(E,32), softmax, no norm             the softmax's sum order
  norm K             sigmoid E=64, K, norm_topk_prob              the sum over K + division
  scale              sigmoid E=64, K=8, no norm, scale 2.5        the scaling
  grouped            DeepSeek-V3 (E=256, 8 groups, 4 kept, bias)  the group choice
  qwen3 / dsv3       the families                                 all of it

Logits are float32 (no ties: tied scores may legally order differently). A row is "same" when
its ids and weights are the same bits; "max ulp" is the largest distance in float32 ulps.
Also: torch's own sum over K on CUDA against two candidate orders (shuffle-down offsets 1, 2, 4
= adjacent pairs; and offsets BW/2 .. 1 = halves), counted in rows equal.

Usage on the GPU machine: python3 bench/router_bits.py [--rows 4096] | tee OUT/router_bits.txt
"""

from __future__ import annotations

import argparse

import torch

from rocm_moe.routing import RouterConfig, _route_torch


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.float().contiguous().view(torch.int32).long()
    ib = b.float().contiguous().view(torch.int32).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


def compare(name: str, config: RouterConfig, logits: torch.Tensor, bias=None) -> None:
    from rocm_moe._routing_triton import fused_route

    ref = _route_torch(logits, config, bias)
    got = fused_route(logits_TE=logits, config=config, bias_E=bias)
    same_ids = (ref.topk_ids == got.topk_ids).all(-1)
    same_w = (ref.topk_weights.view(torch.int32) == got.topk_weights.view(torch.int32)).all(-1)
    both = same_ids & same_w
    ids_ok = same_ids.all()
    diff = ulps(ref.topk_weights[same_ids], got.topk_weights[same_ids])
    print(f"{name:<26} {int(both.sum()):>6}/{logits.shape[0]:<6} ids equal "
          f"{int(same_ids.sum()):>6}   max ulp (rows with equal ids) {diff}"
          + ("" if ids_ok else "   (ids differ)"), flush=True)


def shuffle_sum(w: torch.Tensor, halves: bool) -> torch.Tensor:
    """The sum over the last dim (K) of w [N, K] in one of two warp orders, in float32 on the
    device: BW = largest power of two <= K lanes, lane l = w[l] + w[l + BW] (w[l] alone if
    l + BW >= K); then adjacent pairs (shuffle-down 1, 2, 4...) or halves (BW/2, ..., 1)."""
    K = w.shape[1]
    bw = 1 << (K.bit_length() - 1)
    lanes = w[:, :bw].clone()
    if K > bw:
        lanes[:, : K - bw] = lanes[:, : K - bw] + w[:, bw:]
    if halves:
        n = bw
        while n > 1:
            n //= 2
            lanes = lanes[:, :n] + lanes[:, n: 2 * n]
        return lanes[:, 0]
    while lanes.shape[1] > 1:
        lanes = lanes[:, 0::2] + lanes[:, 1::2]
    return lanes[:, 0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    T = args.rows
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    print(f"{name}, torch {torch.__version__}, rows {T}")

    def logits(E, scale=2.0):
        return torch.randn(T, E, device=dev, generator=g) * scale

    compare("sigmoid E=32 K=32", RouterConfig(num_experts=32, top_k=32, scoring="sigmoid",
                                              norm_topk_prob=False), logits(32))
    for E in (8, 16, 32, 64, 128, 256, 512):
        compare(f"softmax E={E} K={min(E, 32)}", RouterConfig(
            num_experts=E, top_k=min(E, 32), norm_topk_prob=False), logits(E))
    for K in (1, 2, 3, 4, 6, 8, 9, 16):
        compare(f"norm K={K} (sigmoid E=64)", RouterConfig(
            num_experts=64, top_k=K, scoring="sigmoid", norm_topk_prob=True), logits(64))
    compare("scale 2.5 (sigmoid E=64)", RouterConfig(
        num_experts=64, top_k=8, scoring="sigmoid", norm_topk_prob=False,
        routed_scaling_factor=2.5), logits(64))
    bias = torch.randn(256, device=dev, generator=g) * 0.1
    compare("grouped dsv3 no norm", RouterConfig(
        num_experts=256, top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
        norm_topk_prob=False), logits(256), bias)
    compare("deepseek-v3", RouterConfig.deepseek_v3(256, 8), logits(256), bias)
    compare("qwen3-30b-a3b (f32 logits)", RouterConfig.qwen3_moe(128, 8), logits(128))
    for K in (2, 3, 4, 6, 8, 9, 16):
        w = torch.rand(T, K, device=dev, generator=g)
        torch_sum = w.sum(-1)
        for halves in (False, True):
            same = (shuffle_sum(w, halves).view(torch.int32) == torch_sum.view(torch.int32))
            print(f"torch sum K={K:<3} vs {'halves' if halves else 'pairs ':<6} "
                  f"{int(same.sum()):>6}/{T}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
