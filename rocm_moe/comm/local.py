"""World size 1: every expert is local, dispatch and combine move nothing.

R = T and the received rows are the input rows in order; combine returns the single partial of
each token (already reduced over all K slots by the combine stage or the experts).
"""

from __future__ import annotations

import torch

from rocm_moe._checks import error_message
from rocm_moe.comm.base import CombineHandle, Dispatcher, DispatchResult, check_dispatcher_args
from rocm_moe.placement import Placement
from rocm_moe.quant import quantize_rows_on_owner


class LocalDispatcher(Dispatcher):
    """``fp8_dtype``: the wire format (``comm.wire``): None, the rows as they are; an FP8
    encoding, the rows quantised per 1x128 group (``quant.FP8Rows``, as the other transports
    deliver them to the FP8 experts)."""

    name = "local"

    def __init__(self, placement: Placement, rank: int = 0, *,
                 fp8_dtype: str | torch.dtype | None = None, **kw):
        check_dispatcher_args(**{k: kw.get(k) for k in ("hidden_size", "top_k", "dtype",
                                                         "max_tokens_per_rank")})
        self._set_wire(fp8_dtype, kw.get("dtype"))
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
        x = x_TH if self.fp8_dtype is None else quantize_rows_on_owner(x_TH, self.fp8_dtype)
        return DispatchResult(x=x, topk_ids=topk_ids_TK, topk_weights=topk_weights_TK,
                              handle=handle)

    def _combine(self, y_RH, handle):
        return y_RH

    def _combine_raw(self, raw_RKH, handle):
        return raw_RKH
