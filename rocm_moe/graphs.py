"""CUDA-graph capture of a whole EPMoE forward, one graph per token bucket (what serving engines
do for decode).

A forward is capturable when every stage keeps its sizes on the device: the symm comm backend
(rocm_moe.comm.symm) with the Triton experts (or AITER's), the router and shared experts. The
torch backend reads its split sizes on the host and the reference experts index by host
counts, so they cannot be captured (``torch.cuda.graph`` raises).

Every rank of the EP group must capture and replay together: the graphs hold the barriers of
dispatch and combine. A rank may use another bucket than its peers (MORI's semantics: T differs
per rank), so long as all of them replay once per step.

    graphed = GraphedEPMoE(layer, buckets=(1, 2, 4, 8, 16, 32, 64, 128))   # collective
    y = graphed(x)          # x [T, H] with T <= 128: copied into the smallest bucket >= T,
                            # padded with zero rows, replayed; y [T, H] (a view, valid until
                            # the next call)
"""

from __future__ import annotations

import bisect
import numbers

import torch

from rocm_moe._checks import check_integer_value, check_tensor, describe, error_message


def _check_capturable(layer) -> torch.Tensor:
    """``layer`` is an EPMoE-like module (``hidden_size``, ``parameters()``, callable: an EPMoE
    or a ``model.MoEStack``) on a CUDA device; returns its first parameter."""
    if not (callable(layer) and hasattr(layer, "parameters")
            and isinstance(getattr(layer, "hidden_size", None), int)):
        raise TypeError(error_message(
            "layer", describe(layer), "must be a MoE layer (EPMoE, or a model.MoEStack): "
            "callable, with hidden_size and parameters()", "pass the layer to capture"))
    p = next(iter(layer.parameters()), None)
    if p is None or p.device.type != "cuda":
        raise ValueError(error_message(
            "layer device", None if p is None else p.device, "CUDA graphs capture GPU work only",
            "move the layer to a GPU (layer.cuda()), or run it eagerly on the CPU"))
    return p


def _check_buckets(buckets) -> list[int]:
    """Token counts: a non-empty sequence of ints >= 1 (sorted, duplicates dropped)."""
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
        raise TypeError(error_message("buckets", repr(buckets), "must be a sequence of ints",
                                      "pass e.g. (1, 2, 4, ..., 128)"))
    buckets = list(buckets)
    bad = [b for b in buckets if isinstance(b, bool) or not isinstance(b, numbers.Integral)]
    if bad:
        raise TypeError(error_message("buckets", buckets, f"must be ints (got {bad[0]!r})",
                                      "pass token counts, e.g. (1, 2, 4, ..., 128)"))
    if not buckets or min(buckets) < 1:
        raise ValueError(error_message("buckets", buckets, "must be token counts >= 1",
                                       "pass e.g. (1, 2, 4, ..., 128)"))
    return sorted({int(b) for b in buckets})


class GraphedEPMoE:
    """CUDA graphs of ``layer.forward`` for fixed token counts; ``__call__`` replays the
    smallest bucket that holds the batch. Capture is collective over the layer's EP group.

    Padding rows are zeros: they are routed and computed like any token (their outputs are
    dropped), so a bucket costs what its size costs. ``warmup`` eager calls per bucket come
    first (they compile the Triton kernels, which capture cannot do).
    """

    def __init__(self, layer, buckets=(1, 2, 4, 8, 16, 32, 64, 128), *, warmup: int = 2):
        self.buckets = _check_buckets(buckets)
        p = _check_capturable(layer)
        check_integer_value("warmup", warmup, minimum=0)
        self.layer = layer
        self.inputs, self.outputs, self.graphs = {}, {}, {}
        stream = torch.cuda.Stream(p.device)
        stream.wait_stream(torch.cuda.current_stream(p.device))
        with torch.cuda.stream(stream):
            for T in self.buckets:  # eager first: Triton compiles outside any capture
                x = torch.zeros(T, layer.hidden_size, dtype=p.dtype, device=p.device)
                for _ in range(warmup):
                    layer(x)
                self.inputs[T] = x
        torch.cuda.current_stream(p.device).wait_stream(stream)
        pool = None
        for T in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[T] = layer(self.inputs[T])
            pool = g.pool()
            self.graphs[T] = g

    def bucket(self, num_tokens: int) -> int:
        check_integer_value("num_tokens", num_tokens, minimum=0)  # (0: a rank with no tokens)
        return self._bucket(num_tokens)

    def _bucket(self, num_tokens: int) -> int:
        i = bisect.bisect_left(self.buckets, num_tokens)
        if i == len(self.buckets):
            raise ValueError(error_message(
                "x.shape[0]", num_tokens, f"exceeds the largest captured bucket "
                f"{self.buckets[-1]}", "capture a larger bucket or run the layer eagerly"))
        return self.buckets[i]

    def __call__(self, x_TH: torch.Tensor) -> torch.Tensor:
        static = self.inputs[self.buckets[-1]]
        if not (isinstance(x_TH, torch.Tensor) and x_TH.dim() == 2  # (a replay's host cost:
                and x_TH.shape[1] == static.shape[1] and x_TH.dtype == static.dtype  # these
                and x_TH.device == static.device):  # compares; the messages only on a miss)
            _refuse_rows(x_TH, static)
        T = x_TH.shape[0]
        B = self._bucket(T)
        static = self.inputs[B]
        static[:T].copy_(x_TH)
        static[T:].zero_()
        self.graphs[B].replay()
        return self.outputs[B][:T]


def _refuse_rows(x_TH: object, static: torch.Tensor) -> None:
    """The error for rows a captured graph cannot take (``GraphedEPMoE.__call__``)."""
    check_tensor("x", x_TH, shape=(None, static.shape[1]), dtypes=(static.dtype,),
                 fix=f"pass [T, {static.shape[1]}] {static.dtype} rows on {static.device} "
                 "(the captured graph copies them as they are)")
    raise ValueError(error_message("x.device", x_TH.device, f"must be the captured graph's "
                                   f"{static.device}", "move the rows there"))
