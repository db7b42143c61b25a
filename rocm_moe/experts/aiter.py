"""Expert compute through AITER's ``aiter.fused_moe.fused_moe`` on AMD GPUs.

NOT RUN ON MI300 HARDWARE BY THIS PROJECT: written against AITER's public source (e4048607,
aiter/fused_moe.py = FM, aiter/ops/shuffle.py) and tested on CPUs against a fake ``fused_moe``
that checks its arguments and computes with the reference (tests/fakes.py). ``rocm-moe sanity
--experts aiter`` is the check to run on a machine that has AITER.

The call: ``fused_moe(x [R, H], w13 [e, 2I, H], w2 [e, H, I], topk_weight [R, K + 1] float32,
topk_ids [R, K + 1] int32 GLOBAL, expert_mask=mask, num_local_tokens=None)``. AITER sorts over
``mask.numel()`` experts and maps a global id to its local weight row by the prefix sum of the
mask, skipping ids whose mask is 0; it returns the weighted sum over each row's local experts.

What the adapter does as vLLM's AITER path does, so that AITER reaches its tuned kernels:
- one always-masked slot is appended to every row (id of a masked expert, weight 0): under EP
  AITER looks its tuned configs up with ``topk - 1`` (FM ~2227, aiter#3377), so without it the
  lookup uses the wrong K;
- weights are shuffled into the layout tuned kernels read (``aiter.ops.shuffle.shuffle_weight``,
  tagged ``is_shuffled``; FM ~2438 warns of incorrect results otherwise). The layer owns
  unshuffled weights (every other backend reads them), so the shuffled copies are cached here
  per weight tensor and version: AITER's expert weights take twice the memory. Both weights
  are shuffled or neither (AITER treats both as shuffled when either is tagged, FM ~747): a
  pair where one is not a multiple of the shuffle tile (16 rows x 32 columns, tiny test
  shapes, I % 32 != 0) goes unshuffled: no tuned config exists for it.
- no rows (a rank that received nothing): no call (AITER has no guard for M = 0).

The mask is built by the placement module (``ExpertMap.to_expert_mask``), never taken from an
id map. Two conventions exist and AITER accepts both (it takes the expert count from the mask):
``mask_sentinel=True`` (default, vLLM's): [E + 1] with a trailing 0 slot, which gives empty
slots (id -1) and the appended slot a masked id, E, to point at; ``mask_sentinel=False``
(SGLang's MORI path): [E], where rows with id -1 are refused and the appended slot points at
the first expert of another rank (with a single rank, all experts local, no mask is passed).

Modes: "weighted" natively. "raw": K calls, each on one slot with weight 1.0 (exact), stacked to
[R, K, H]; masked and empty slots come back as zeros. ``forward_padded``: weighted over MORI's
whole receive buffer with the row count on the device (``num_local_tokens``), no host read.
"""

from __future__ import annotations

import weakref

import torch

from rocm_moe._checks import error_message
from rocm_moe._libs import rocm_library_missing
from rocm_moe.experts.base import Experts, check_expert_inputs
from rocm_moe.placement import ExpertMap
from rocm_moe.weighting import ExpertsOutput

AITER_DTYPES = (torch.bfloat16, torch.float16)
SHUFFLE_TILE = (16, 32)  # rows x columns that shuffle_weight's (16, 16) layout needs


def aiter_availability() -> str | None:
    return rocm_library_missing("aiter", "pip install from github.com/ROCm/aiter on ROCm")


def shuffleable(w: torch.Tensor) -> bool:
    return w.shape[-2] % SHUFFLE_TILE[0] == 0 and w.shape[-1] % SHUFFLE_TILE[1] == 0


class AiterExperts(Experts):
    """Args: ``mask_sentinel`` (see module docstring); ``fused_moe`` and ``shuffle_weight``
    inject the functions (tests use contract-checking fakes; default: AITER's);
    ``shuffle=False`` passes weights as they are (AITER then skips its tuned kernels' layout:
    only for weights already shuffled by the caller, tagged ``is_shuffled``)."""

    name = "aiter"

    @classmethod
    def availability(cls) -> str | None:
        return aiter_availability()

    def __init__(self, *, mask_sentinel: bool = True, fused_moe=None, shuffle_weight=None,
                 shuffle: bool = True):
        self.mask_sentinel = mask_sentinel
        self._fused_moe = fused_moe
        self._shuffle_weight = shuffle_weight
        self.shuffle = shuffle
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._shuffled: dict[int, tuple] = {}  # id -> (weakref, version, shuffled copy)

    def invariant_unsupported_reason(self) -> str | None:
        return ("AITER's fused_moe chooses its kernels, tiles and split-K by the batch's token "
                "count (and sums a token's slots inside its kernels), so a token's bits depend "
                "on the batch it came in")

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

    def _masked_id(self, expert_map: ExpertMap) -> int | None:
        """A global id whose mask is 0 (the appended slot's), None when every expert is local
        and there is no sentinel."""
        if self.mask_sentinel:
            return expert_map.num_experts
        others = (expert_map.map_E < 0).nonzero()
        return int(others[0, 0]) if others.numel() else None

    def shuffled_pair(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple:
        """(w13, w2) both shuffled or both as they are: AITER reads both weights as shuffled
        when either is tagged ``is_shuffled`` (FM ~747), so a pair where only one fits the
        shuffle tile (I % 32 != 0 with H % 32 == 0) goes unshuffled (no tuned kernel serves it),
        and a caller's half-shuffled pair is refused."""
        tags = (getattr(w13, "is_shuffled", False), getattr(w2, "is_shuffled", False))
        if any(tags):
            if not all(tags):
                raise ValueError(error_message(
                    "w13.is_shuffled / w2.is_shuffled", tags, "AITER reads both weights as "
                    "shuffled when either is tagged (aiter/fused_moe.py), so the plain one "
                    "would be misread", "pass both shuffled (aiter.ops.shuffle.shuffle_weight) "
                    "or both plain (the adapter shuffles them)"))
            return w13, w2
        if not self.shuffle or not (shuffleable(w13) and shuffleable(w2)):
            return w13, w2
        return self.shuffled(w13), self.shuffled(w2)

    def shuffled(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` in the layout AITER's tuned kernels read, cached per tensor and version (one
        of a pair: use ``shuffled_pair``)."""
        if not self.shuffle or getattr(w, "is_shuffled", False) or not shuffleable(w):
            return w
        ref, version, out = self._shuffled.get(id(w), (None, -1, None))
        if ref is None or ref() is not w or version != w._version:  # new tensor or new values
            if self._shuffle_weight is None:
                from aiter.ops.shuffle import shuffle_weight

                self._shuffle_weight = shuffle_weight
            out = self._shuffle_weight(w, layout=(16, 16))
            self._shuffled[id(w)] = (weakref.ref(w), w._version, out)
        return out

    def _global_ids(self, ids_RK: torch.Tensor, num_experts: int) -> torch.Tensor:
        if self.mask_sentinel:  # empty slots point at the sentinel expert E (mask 0)
            return torch.where(ids_RK >= 0, ids_RK, torch.full_like(ids_RK, num_experts))
        if ids_RK.numel() and bool((ids_RK < 0).any()):
            raise ValueError(error_message(
                "topk_ids", "contains -1", "without the sentinel slot AITER has no id for an "
                "empty slot", "use AiterExperts(mask_sentinel=True)"))
        return ids_RK

    def _call(self, x, w13, w2, weights_RK, ids_RK, expert_map, num_rows=None, **extra):
        """fused_moe on [R, K] slots plus the appended masked slot (``extra``: more keyword
        arguments for fused_moe, e.g. the FP8 quant type and scales)."""
        masked = self._masked_id(expert_map)
        kw = dict(extra) if num_rows is None else dict(extra, num_local_tokens=num_rows)
        if masked is None:  # one rank, no sentinel: not an EP call at all
            return self._fn()(x, w13, w2, weights_RK, ids_RK, **kw)
        R = ids_RK.shape[0]
        ids = torch.cat([ids_RK, ids_RK.new_full((R, 1), masked)], 1)
        w = torch.cat([weights_RK, weights_RK.new_zeros(R, 1)], 1)
        return self._fn()(x, w13, w2, w, ids, expert_mask=self.mask_for(expert_map, x.device),
                          **kw)

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode):
        R, K = topk_ids_RK.shape
        H = x_RH.shape[1]
        if R == 0:  # AITER has no guard for M = 0
            shape = (0, H) if mode == "weighted" else (0, K, H)
            return ExpertsOutput(out=x_RH.new_zeros(shape), weights_applied=mode == "weighted")
        ids = self._global_ids(topk_ids_RK, expert_map.num_experts).to(torch.int32)
        x, (w13, w2) = x_RH.contiguous(), self.shuffled_pair(w13, w2)
        if mode == "weighted":
            out = self._call(x, w13, w2, topk_weights_RK.float().contiguous(), ids.contiguous(),
                             expert_map)
            return ExpertsOutput(out=out, weights_applied=True)
        ones = torch.ones(R, 1, dtype=torch.float32, device=x.device)
        raw = [self._call(x, w13, w2, ones, ids[:, k:k + 1].contiguous(), expert_map)
               for k in range(K)]
        return ExpertsOutput(out=torch.stack(raw, dim=1), weights_applied=False)

    def forward_padded(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2,
                       expert_map: ExpertMap, *, num_rows: torch.Tensor) -> torch.Tensor:
        """Weighted [R_max, H] over the first ``num_rows[0]`` rows (a [1] int32 device tensor,
        AITER's ``num_local_tokens``; later rows are not computed), with no host read: for
        MORI's whole receive buffer (``MoriDispatcher(capacity_sized=True)``, whose rows past
        the count have ids -1; ``rocm_moe.comm.mori.forward_padded``). Empty slots (-1) need
        ``mask_sentinel=True``."""
        check_expert_inputs(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                            mode="weighted", validate=False)
        reason = self.supports(mode="weighted", dtype=x_RH.dtype, device=x_RH.device)
        if reason is not None or not self.mask_sentinel:
            raise ValueError(error_message(
                "experts=aiter, forward_padded", "refused", reason or "needs "
                "mask_sentinel=True (empty slots cannot be refused without a host read)",
                "use AiterExperts(mask_sentinel=True) in bf16/fp16 with AITER installed"))
        ids = self._global_ids(topk_ids_RK, expert_map.num_experts).to(torch.int32)
        return self._call(x_RH.contiguous(), *self.shuffled_pair(w13, w2),
                          topk_weights_RK.float().contiguous(), ids.contiguous(), expert_map,
                          num_rows=num_rows)
