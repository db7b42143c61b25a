"""The single-token single-expert sanity suite: does a pipeline compute each expert exactly?

For a layer (any comm/experts backend mix, either weight mode) it checks, against each expert's
MLP computed independently in float64 from the layer's own weights:

- ``single_expert``: one token routed to expert g alone with weight 1 gives expert_g(x);
- ``half_weight``: weight 0.5 gives exactly half (weights applied once, not twice or never);
- ``raw_unweighted``: return_raw gives expert_g(x) unweighted, and the output beside it is
  still weighted once;
- ``topk_sum``: K distinct experts with random weights give sum_k w_k expert_k(x);
- ``modes_agree``: weight_mode "experts" and "combine" give the same output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocm_moe.experts.base import swiglu_expert
from rocm_moe.layer import EPMoE

# Relative error allowed against a float64 oracle, by compute dtype.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class SanityRow:
    check: str
    weight_mode: str
    cases: int
    max_rel_err: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel_err <= self.tolerance


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    return (a - e).norm().item() / denom if denom else (a - e).norm().item()


def run_sanity(layer: EPMoE, *, seed: int = 0, experts: list[int] | None = None) -> list[SanityRow]:
    """Run the suite on ``layer`` (its experts, its weights, its device) in both weight modes.

    ``experts`` limits which global experts are tried one by one (default: all local ones).
    The layer's weight_mode is restored afterwards.
    """
    dev, dtype = layer.w13.device, layer.w13.dtype
    gen = torch.Generator().manual_seed(seed)
    H = layer.hidden_size
    local = list(layer.local_experts)
    tried = experts if experts is not None else local
    tol = TOLERANCE[dtype]

    def mlp(g: int, x: torch.Tensor) -> torch.Tensor:
        j = local.index(g)
        return swiglu_expert(x.double(), layer.w13[j].double(), layer.w2[j].double())

    x = torch.randn(1, H, generator=gen).to(dtype).to(dev)
    # The dense shared experts are added to every output; take them out of it.
    shared = layer.shared_experts.reference(x) if layer.shared_experts is not None else 0.0
    K = min(layer.router.top_k, len(local))
    ids_K = torch.tensor(local)[torch.randperm(len(local), generator=gen)[:K]]
    w_K = torch.rand(K, generator=gen) + 0.1
    saved_mode, rows, outs = layer.weight_mode, [], {}
    try:
        for mode in ("experts", "combine"):
            layer.weight_mode = mode
            errs: dict[str, list[float]] = {"single_expert": [], "half_weight": [],
                                            "raw_unweighted": []}
            for g in tried:
                ids = torch.tensor([[g]], dtype=torch.int32, device=dev)
                ref = mlp(g, x)
                one = layer.forward_routed(x, torch.ones(1, 1, device=dev), ids)
                errs["single_expert"].append(rel_err(one - shared, ref))
                half_w = torch.full((1, 1), 0.5, device=dev)
                # Through the weight mode's own path (return_raw would force raw experts).
                half = layer.forward_routed(x, half_w, ids)
                errs["half_weight"].append(rel_err(half - shared, 0.5 * ref))
                raw = layer.forward_routed(x, half_w, ids, return_raw=True)
                errs["raw_unweighted"].append(max(rel_err(raw.raw[:, 0], ref),
                                                  rel_err(raw.out - shared, 0.5 * ref)))
            y = layer.forward_routed(x, w_K[None].to(dev), ids_K[None].int().to(dev))
            y = y - shared
            ref = sum(w * mlp(int(g), x) for w, g in zip(w_K.tolist(), ids_K.tolist(),
                                                          strict=True))
            outs[mode] = y
            for check, e in errs.items():
                rows.append(SanityRow(check, mode, len(e), max(e, default=0.0), tol))
            rows.append(SanityRow("topk_sum", mode, 1, rel_err(y, ref), tol))
    finally:
        layer.weight_mode = saved_mode
    rows.append(SanityRow("modes_agree", "both", 1, rel_err(outs["experts"], outs["combine"]),
                          tol))
    return rows
