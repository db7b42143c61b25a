"""World size 1: every expert is local, dispatch and combine move nothing.

R = T and the received rows are the input rows in order; combine returns the single partial of
each token (already reduced over all K slots by the combine stage or the experts).
"""

from __future__ import annotations

from rocm_moe._checks import error_message
from rocm_moe.comm.base import CombineHandle, Dispatcher, DispatchResult
from rocm_moe.placement import Placement


class LocalDispatcher(Dispatcher):
    name = "local"

    def __init__(self, placement: Placement, rank: int = 0, **kw):
        super().__init__(placement, rank, **kw)
        if placement.world_size != 1:
            raise ValueError(error_message(
                "placement.world_size", placement.world_size, "the local backend serves one rank",
                "use the torch backend (rocm_moe.comm.torch) for W > 1"))

    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        handle = CombineHandle(**self.handle_fields(
            batch_id=batch_id, x_TH=x_TH, topk_weights_TK=topk_weights_TK,
            topk_ids_TK=topk_ids_TK, recv_topk_ids=topk_ids_TK,
            recv_topk_weights=topk_weights_TK))
        return DispatchResult(x=x_TH, topk_ids=topk_ids_TK, topk_weights=topk_weights_TK,
                              handle=handle)

    def _combine(self, y_RH, handle):
        return y_RH

    def _combine_raw(self, raw_RKH, handle):
        return raw_RKH
