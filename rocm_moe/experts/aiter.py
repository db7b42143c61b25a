"""Expert compute through AITER's ``aiter.fused_moe.fused_moe`` on AMD GPUs.

NOT RUN ON MI300 HARDWARE BY THIS PROJECT: written against AITER's public source
(aiter/fused_moe.py) and tested on CPUs against a fake ``fused_moe`` that checks its arguments
and computes with the reference (tests/fakes.py). ``rocm-moe sanity --experts aiter`` is the
check to run on a machine that has AITER.

The call: ``fused_moe(x [R, H], w13 [e, 2I, H], w2 [e, H, I], topk_weight [R, K] float32,
topk_ids [R, K] int32 GLOBAL, expert_mask=mask)``. AITER sorts over ``mask.numel()`` experts
and maps a global id to its local weight row by the prefix sum of the mask, skipping ids whose
mask is 0; it returns the weighted sum over each row's local experts.

The mask is built by the placement module (``ExpertMap.to_expert_mask``), never taken from an
id map. Two conventions exist and AITER accepts both (it takes the expert count from the mask):
``mask_sentinel=True`` (default, vLLM's): [E + 1] with a trailing 0 slot, which also gives empty
slots (id -1) a masked id, E, to point at; ``mask_sentinel=False`` (SGLang's MORI path): [E],
where rows with id -1 are refused.

Modes: "weighted" natively. "raw": K calls, each on one slot with weight 1.0 (exact), stacked to
[R, K, H]; masked and empty slots come back as zeros.
"""

from __future__ import annotations

import torch

from rocm_moe._checks import error_message
from rocm_moe._libs import rocm_library_missing
from rocm_moe.experts.base import Experts
from rocm_moe.placement import ExpertMap
from rocm_moe.weighting import ExpertsOutput

AITER_DTYPES = (torch.bfloat16, torch.float16)


def aiter_availability() -> str | None:
    return rocm_library_missing("aiter", "pip install from github.com/ROCm/aiter on ROCm")


class AiterExperts(Experts):
    """Args: ``mask_sentinel`` (see module docstring); ``fused_moe`` injects the function
    (tests use a contract-checking fake; default: ``aiter.fused_moe.fused_moe``)."""

    name = "aiter"

    @classmethod
    def availability(cls) -> str | None:
        return aiter_availability()

    def __init__(self, *, mask_sentinel: bool = True, fused_moe=None):
        self.mask_sentinel = mask_sentinel
        self._fused_moe = fused_moe
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def supports(self, *, mode, dtype, device) -> str | None:
        if self._fused_moe is None and (reason := aiter_availability()) is not None:
            return reason
        if dtype not in AITER_DTYPES:
            return f"AITER's fused_moe computes in {AITER_DTYPES}, not {dtype}"
        return None

    def _fn(self):
        if self._fused_moe is None:
            from aiter.fused_moe import fused_moe

            self._fused_moe = fused_moe
        return self._fused_moe

    def mask_for(self, expert_map: ExpertMap, device: torch.device) -> torch.Tensor:
        key = (id(expert_map), device)
        if key not in self._masks:
            mask = expert_map.to_expert_mask(sentinel=self.mask_sentinel).mask
            self._masks[key] = mask.to(device)
        return self._masks[key]

    def _global_ids(self, ids_RK: torch.Tensor, num_experts: int) -> torch.Tensor:
        if self.mask_sentinel:  # empty slots point at the sentinel expert E (mask 0)
            return torch.where(ids_RK >= 0, ids_RK, torch.full_like(ids_RK, num_experts))
        if ids_RK.numel() and bool((ids_RK < 0).any()):
            raise ValueError(error_message(
                "topk_ids", "contains -1", "without the sentinel slot AITER has no id for an "
                "empty slot", "use AiterExperts(mask_sentinel=True)"))
        return ids_RK

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode):
        fused_moe = self._fn()
        mask = self.mask_for(expert_map, x_RH.device)
        ids = self._global_ids(topk_ids_RK, expert_map.num_experts).to(torch.int32)
        x = x_RH.contiguous()
        if mode == "weighted":
            out = fused_moe(x, w13, w2, topk_weights_RK.float().contiguous(), ids.contiguous(),
                            expert_mask=mask)
            return ExpertsOutput(out=out, weights_applied=True)
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        raw = [fused_moe(x, w13, w2, ones, ids[:, k:k + 1].contiguous(), expert_mask=mask)
               for k in range(ids.shape[1])]
        return ExpertsOutput(out=torch.stack(raw, dim=1), weights_applied=False)
