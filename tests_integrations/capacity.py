"""A one-rank dispatcher with the symm/MORI shape of a dispatch, which both framework suites use
to test their adapters' capacity-sized path on a CPU (where neither symm nor MORI runs)."""

from __future__ import annotations

import torch

from rocm_moe.comm.base import CombineHandle, DispatchResult
from rocm_moe.comm.local import LocalDispatcher


class CapacityLocal(LocalDispatcher):
    """The symm/MORI shape of a dispatch on one rank: R = capacity rows, views of one
    persistent buffer, rows past ``num_valid`` (a [1] device count) empty (ids -1), one batch
    in flight."""

    holds_batch = True

    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        T, cap = x_TH.shape[0], self.max_tokens_per_rank
        if not hasattr(self, "_buf"):
            self._buf = (x_TH.new_zeros(cap, x_TH.shape[1]),
                         torch.full((cap, self.top_k), -1, dtype=torch.int32),
                         torch.zeros(cap, self.top_k))
        x_R, ids_R, w_R = self._buf
        x_R.zero_()
        ids_R.fill_(-1)
        w_R.zero_()
        x_R[:T], ids_R[:T], w_R[:T] = x_TH, topk_ids_TK, topk_weights_TK
        handle = CombineHandle(**self.handle_fields(
            batch_id=batch_id, x_TH=x_TH, topk_weights_TK=topk_weights_TK,
            topk_ids_TK=topk_ids_TK, recv_topk_ids=ids_R, recv_topk_weights=w_R))
        return DispatchResult(x=x_R, topk_ids=ids_R, topk_weights=w_R, handle=handle,
                              num_valid=torch.full((1,), T, dtype=torch.int32))

    def _combine(self, y_RH, handle):
        return y_RH[:handle.num_tokens]
