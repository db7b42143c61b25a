"""Fault injection: plant one known MoE integration bug in an EPMoE, to see its signature.

``layer.fault = "weights_twice"`` (or ``rocm-moe diagnose --inject weights_twice``) makes the
layer misbehave the way real pipelines did; ``layer.fault = None`` (the default) costs one
attribute check per stage. Each entry emulates the bug at the stage where it happens upstream:

| fault | stage | emulates |
|---|---|---|
| per_sequence_routing | route | experts chosen from the sequence mean, not per token (seed 004) |
| int64_as_int32 | dispatch | an int64 id buffer read as int32 (aiter#5255, MORI's binding) |
| capacity_overflow | dispatch | tokens past max_num_inp_token_per_rank overwritten (mori#356) |
| mask_as_map | experts | AITER's 0/1 expert_mask used as vLLM's expert_map (vllm#49758) |
| map_as_mask | experts | vLLM's expert_map (local id / -1) passed as AITER's mask (ATOM#887) |
| weights_twice | combine | experts weighted, combine weighted again (output ~ w^2) |
| weights_never | combine | raw expert outputs summed unweighted (output ~ sum of outputs) |
| dispatched_ids | combine | combine given the dispatched ids, not the rank's own (mori#475) |
| other_ranks_missing | combine | only this rank's local experts summed (vllm#37529) |
| second_reduction | combine | an all-reduce after combine on replicated tokens (sglang#34887) |
| scalar_collapse | combine | a [1, H] row read as a scalar (seed 004) |
"""

from __future__ import annotations

import torch

from rocm_moe._checks import error_message
from rocm_moe.experts.base import swiglu_expert

FAULTS = {
    "per_sequence_routing": "route", "int64_as_int32": "dispatch",
    "capacity_overflow": "dispatch", "mask_as_map": "experts", "map_as_mask": "experts",
    "weights_twice": "combine", "weights_never": "combine", "dispatched_ids": "combine",
    "other_ranks_missing": "combine", "second_reduction": "combine",
    "scalar_collapse": "combine",
}


def check_fault(fault: str | None) -> None:
    if fault is not None and fault not in FAULTS:
        raise ValueError(error_message("fault", repr(fault), f"known faults are {list(FAULTS)}",
                                       "pick one, or None for a correct pipeline"))


def per_sequence_hidden(hidden_states: torch.Tensor) -> torch.Tensor:
    """[B, S, H] -> every token replaced by its sequence's mean (routing input only)."""
    if hidden_states.dim() != 3:
        return hidden_states
    return hidden_states.mean(dim=1, keepdim=True).expand_as(hidden_states)


def int64_read_as_int32(topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """The first K int32 words of an int64 [T, K] buffer: [id0, 0, id1, 0, ...] (little end)."""
    K = topk_ids_TK.shape[1]
    return topk_ids_TK.long().contiguous().view(torch.int32)[:, :K].contiguous()


def capacity(num_tokens: int) -> int:
    """The capacity the capacity_overflow fault assumes: half the batch (at least 1)."""
    return max(1, num_tokens // 2)


def overflow_tokens(x_TH: torch.Tensor) -> torch.Tensor:
    """Rows past the capacity overwritten (here with zeros), as a silent overflow leaves them."""
    x = x_TH.clone()
    x[capacity(x.shape[0]):] = 0
    return x


def confused_map(map_E: torch.Tensor, fault: str) -> torch.Tensor:
    """The [E] local-id map a confused pipeline effectively uses (-1 = skipped).

    mask_as_map: the 0/1 mask read as local ids: every expert maps to local 0 or 1.
    map_as_mask: the id map read as a mask: entries != 0 count as local, and the local id is
    AITER's prefix sum over that mask (local expert 0 is dropped, remote ones are computed).
    """
    e = int((map_E >= 0).sum())
    if fault == "mask_as_map":
        return (map_E >= 0).long().clamp(max=max(e - 1, 0))
    owned = map_E != 0
    local = torch.cumsum(owned.long(), 0) - 1
    return torch.where(owned, local.clamp(max=max(e - 1, 0)), torch.full_like(local, -1))


def experts_with_map(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, map_E, *, weighted: bool):
    """The reference SwiGLU experts under an arbitrary (possibly wrong) local-id map."""
    acc = torch.float64 if x_RH.dtype == torch.float64 else torch.float32
    R, K = topk_ids_RK.shape
    local = torch.where(topk_ids_RK >= 0, map_E.to(x_RH.device)[topk_ids_RK.long().clamp(min=0)],
                        torch.full_like(topk_ids_RK, -1, dtype=torch.long))
    out = x_RH.new_zeros((R, x_RH.shape[1]) if weighted else (R, K, x_RH.shape[1]), dtype=acc)
    for j in local.unique().tolist():
        if j < 0:
            continue
        r, k = torch.where(local == j)
        y = swiglu_expert(x_RH[r].to(acc), w13[j].to(acc), w2[j].to(acc))
        if weighted:
            out.index_put_((r,), y * topk_weights_RK[r, k, None].to(acc), accumulate=True)
        else:
            out[r, k] = y
    return out.to(x_RH.dtype)
