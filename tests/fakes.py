"""Fakes of MORI's EpDispatchCombineOp and AITER's fused_moe that ENFORCE their documented
contracts, so that the adapters can be tested on CPUs (vLLM tests its MORI path the same way).

They compute what the real libraries compute (per their source, see ../shared/UPSTREAM.md and
notes/dataflow.md) and raise where the real library would silently misbehave, so a test fails
when an adapter passes int64 ids, the dispatched ids to combine, an id map as the mask, too many
tokens, or skips the reset.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rocm_moe.experts.base import swiglu_expert


class ContractError(AssertionError):
    """The caller broke a rule the real library does not check (it would misbehave silently)."""


class FakeMoriOp:
    """MORI's EpDispatchCombineOp over a gloo group, CPU tensors, same return values.

    Enforced (from MORI's source and tests):
    - ids are int32 (the binding reads an int32 pointer), weights float32, x in data_type;
    - T <= max_num_inp_token_per_rank (MORI would corrupt memory, mori#356);
    - a token is sent once per unique destination rank (e // num_experts_per_rank), with its
      full [K] global ids and weights; slots < 0 are skipped;
    - received rows come back in an arbitrary order (here: shuffled), in buffers of
      world_size * max tokens rows whose unused rows hold NaN; total_recv [1] int32;
    - combine gets this rank's OWN [T, K] ids (row count and values checked, mori#475), sums one
      partial per unique destination rank and never applies weights;
    - reset between iterations (or combine(..., call_reset=True)).
    """

    def __init__(self, config: dict, group=None):
        self.cfg = config
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.state = "ready"
        self.calls: list[str] = []
        self._gen = torch.Generator().manual_seed(1234 + self.rank)

    def _owner(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.long() // self.cfg["num_experts_per_rank"]

    def dispatch(self, input, weights, scales, indices, *args, **kwargs):
        self.calls.append("dispatch")
        c = self.cfg
        if self.state != "ready":
            raise ContractError(f"dispatch while the op is '{self.state}': reset() first")
        if indices.dtype != torch.int32:
            raise ContractError(f"indices must be int32, got {indices.dtype} (read as int32)")
        if weights.dtype != torch.float32:
            raise ContractError(f"weights must be float32, got {weights.dtype}")
        if input.dtype != c["data_type"]:
            raise ContractError(f"input dtype {input.dtype} != config {c['data_type']}")
        T, K = indices.shape
        if T > c["max_num_inp_token_per_rank"]:
            raise ContractError(f"{T} tokens > max_num_inp_token_per_rank: MORI would corrupt")
        if K != c["num_experts_per_token"] or input.shape != (T, c["hidden_dim"]):
            raise ContractError(f"shapes {tuple(input.shape)} / {tuple(indices.shape)} != config")
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, (input, weights, indices), group=self.group)
        rows = []  # (source rank, source token) delivered here, once per unique destination
        for src, (_, _, ids) in enumerate(everyone):
            for t in range(ids.shape[0]):
                valid = ids[t][ids[t] >= 0]
                if (self._owner(valid) == self.rank).any():
                    rows.append((src, t))
        order = torch.randperm(len(rows), generator=self._gen).tolist()
        rows = [rows[i] for i in order]
        max_recv = c["world_size"] * c["max_num_inp_token_per_rank"]
        out = torch.full((max_recv, c["hidden_dim"]), float("nan"), dtype=input.dtype)
        out_w = torch.full((max_recv, K), float("nan"))
        out_i = torch.full((max_recv, K), -7, dtype=torch.int32)
        for r, (src, t) in enumerate(rows):
            out[r], out_w[r], out_i[r] = everyone[src][0][t], everyone[src][1][t], \
                everyone[src][2][t]
        self._rows, self._own_ids, self._T = rows, indices.clone(), T
        self.state = "dispatched"
        total = torch.tensor([len(rows)], dtype=torch.int32)
        return out, out_w, None, out_i, total

    def combine(self, input, weights, indices, *args, call_reset=False, **kwargs):
        self.calls.append("combine")
        if self.state != "dispatched":
            raise ContractError(f"combine while the op is '{self.state}'")
        if indices.shape[0] != self._T:
            raise ContractError(f"combine got {indices.shape[0]} id rows, this rank dispatched "
                                f"{self._T}: pass the rank's own ids, not the dispatched ones")
        if indices.dtype != torch.int32 or not torch.equal(indices, self._own_ids):
            raise ContractError("combine ids differ from the ids this rank dispatched")
        R = len(self._rows)
        if input.shape[0] < R or input.dtype != self.cfg["data_type"]:
            raise ContractError(f"combine input {tuple(input.shape)} {input.dtype}: need >= {R} "
                                f"rows in {self.cfg['data_type']}")
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, (input[:R].clone(), self._rows), group=self.group)
        acc = torch.zeros(self._T, self.cfg["hidden_dim"], dtype=torch.float32)
        for partials, rows in everyone:  # a plain sum: MORI's combine never weights
            for r, (src, t) in enumerate(rows):
                if src == self.rank:
                    acc[t] += partials[r].float()
        out = torch.full((self.cfg["max_num_inp_token_per_rank"], self.cfg["hidden_dim"]),
                         float("nan"), dtype=input.dtype)
        out[:self._T] = acc.to(input.dtype)
        self.state = "ready" if call_reset else "combined"
        return out, None

    def reset(self):
        self.calls.append("reset")
        self.state = "ready"


class FakeFusedMoe:
    """AITER's fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=...).

    Enforced: x in bf16/fp16 (CPU tests may use float32, see ``allow_float32``), w1 [e, 2I, H],
    w2 [e, H, I] in x's dtype, topk_weight float32 [M, K], topk_ids int32 [M, K] (global ids in
    [0, mask.numel())), expert_mask int32 of 0/1 only (an id map with -1 or local ids is
    refused) with mask.sum() == e. Computes like AITER: local row = prefix sum of the mask,
    masked slots skipped, weighted sum in float32, output in x's dtype.
    """

    def __init__(self, *, allow_float32: bool = True):
        self.allow_float32 = allow_float32
        self.calls = 0

    def __call__(self, hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None, **kw):
        self.calls += 1
        x, dtypes = hidden_states, (torch.bfloat16, torch.float16)
        if x.dtype not in dtypes + ((torch.float32,) if self.allow_float32 else ()):
            raise ContractError(f"fused_moe computes in bf16/fp16, got {x.dtype}")
        M, H = x.shape
        e, I2, _ = w1.shape
        if w1.shape != (e, I2, H) or w2.shape != (e, H, I2 // 2) or w1.dtype != x.dtype:
            raise ContractError(f"weights {tuple(w1.shape)} / {tuple(w2.shape)} for x {(M, H)}")
        if topk_ids.dtype != torch.int32:
            raise ContractError(f"topk_ids must be int32, got {topk_ids.dtype} (aiter#5255)")
        if topk_weight.dtype != torch.float32 or topk_weight.shape != topk_ids.shape:
            raise ContractError("topk_weight must be float32 [M, K]")
        if expert_mask is None or expert_mask.dtype != torch.int32 or expert_mask.dim() != 1:
            raise ContractError("expert_mask must be a 1-D int32 tensor under EP")
        if not bool(((expert_mask == 0) | (expert_mask == 1)).all()):
            raise ContractError("expert_mask holds values other than 0/1: an expert_map (local "
                                "id or -1) was passed as the mask (vllm#49758)")
        if int(expert_mask.sum()) != e:
            raise ContractError(f"mask marks {int(expert_mask.sum())} local experts, w1 has {e}")
        if topk_ids.numel() and (int(topk_ids.min()) < 0
                                 or int(topk_ids.max()) >= expert_mask.numel()):
            raise ContractError("topk_ids must be global ids in [0, mask.numel())")
        local = torch.cumsum(expert_mask, 0) - 1  # AITER: local row by prefix sum
        ids = topk_ids.long()
        out = torch.zeros(M, H, dtype=torch.float32)
        for k in range(ids.shape[1]):
            for g in ids[:, k].unique().tolist():
                if int(expert_mask[g]) == 0:
                    continue
                rows = (ids[:, k] == g).nonzero().flatten()
                j = int(local[g])
                y = swiglu_expert(x[rows].float(), w1[j].float(), w2[j].float())
                out[rows] += topk_weight[rows, k, None] * y
        return out.to(x.dtype)
