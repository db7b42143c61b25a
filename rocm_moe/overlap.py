"""Micro-batch overlap: the schedule behind ``EPMoE(micro_batches=n)``.

The layer splits its tokens into pieces (``split``: micro-batches inside the dispatcher's
capacity chunks); every piece runs dispatch (D) -> experts (E) -> combine (C). ``run`` with
``overlap=True`` pipelines them, so one piece's communication runs while another's experts
compute:

    host issues:        D0 E0 | D1 E1 C0 | D2 E2 C1 | ... | C(n-1) | after()
    comm (side stream): D0  D1  [wait E0] C0  D2  [wait E1] C1 ...  C(n-1)
    compute (caller's):   [wait D0] E0  [wait D1] E1  [wait D2] E2 ...  after() (shared experts)

E(i + 1) is issued before C(i), so a backend that reads the host inside combine (the torch
backend's combine_raw) or dispatch (its split sizes) blocks the host only while the experts
already issued keep the GPU busy.

At most two pieces are dispatched and not yet combined at once (a dispatcher whose results are
views of its buffers needs ``batches_in_flight=2``), and every rank issues the same comm calls in
the same order on one stream (the symm backend's barriers pair up by order). Every rank runs the
same number of pieces whatever its token count: a piece may hold no tokens (T = 1 split in two),
so no rank waits alone in a collective.

On CUDA the comm calls run on one side stream per device (high priority, so its kernels are
scheduled first when both streams have work):
- the side stream waits for the caller's stream before D0 (the routed inputs);
- E(i) waits for an event recorded after D(i), C(i) for one recorded after E(i);
- every piece's dispatch result and experts' output stays referenced until the caller's stream
  has waited for the side stream at the end (``after`` runs before that join, overlapping the
  last combine): a tensor made on one stream and read on the other is freed only then, so the
  caching allocator cannot give its memory to the next allocation of its stream while the other
  stream still reads it (the experts' output of piece i, freed on the host right after C(i) is
  issued, would otherwise be E(i+1)'s workspace while C(i) sends it); eagerly, such tensors and
  the results are also marked with ``record_stream`` (not under capture, where the allocator
  defers those events and the join already orders every use).

No host synchronisation is added, so a CUDA graph captures the layer: the side stream forks from
the capturing stream and joins it again (the graph holds both). Backends that read the host
inside dispatch (the torch backend's split sizes) block only until the side stream gets there.

Without CUDA (gloo ranks on CPUs) the same calls run in the same order on the host: the
schedule, the lanes and the empty pieces are tested there, the overlap itself only on GPUs.
``overlap=False`` is the layer's plain loop (D C per piece, one batch in flight).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import torch

from rocm_moe._checks import check_integer_value, error_message

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def check_micro_batches(value: object) -> int:
    """``micro_batches`` of a layer: an int >= 1 (TypeError / ValueError naming the fix)."""
    check_integer_value("micro_batches", value, minimum=1,
                        fix="pass 1 (no split) or 2 (two micro-batches whose communication "
                        "overlaps the other's experts)")
    return value


def split(num_tokens: int, chunk: int | None, num_chunks: int, micro_batches: int
          ) -> list[tuple[int, int]]:
    """[start, stop) token ranges of the pieces: ``num_chunks`` chunks of ``chunk`` tokens (the
    last takes the rest; ``chunk`` None: one chunk of all), each split into ``micro_batches``
    pieces as even as can be (the first ones one token longer). Always ``num_chunks *
    micro_batches`` pieces, so every rank runs the same count; a piece may be empty.

    >>> split(5, None, 1, 2)
    [(0, 3), (3, 5)]
    >>> split(1, None, 1, 2)
    [(0, 1), (1, 1)]
    >>> split(10, 4, 3, 2)
    [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 10)]
    """
    assert chunk is not None or num_chunks == 1, "no capacity: one chunk"
    out = []
    for c in range(num_chunks):
        lo, hi = (0, num_tokens) if chunk is None else \
            (min(num_tokens, c * chunk), min(num_tokens, (c + 1) * chunk))
        n, m = hi - lo, micro_batches
        starts = [lo + i * (n // m) + min(i, n % m) for i in range(m + 1)]
        out += list(itertools.pairwise(starts))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stages:
    """A piece's three stages and the clean-up of a piece left between dispatch and combine.

    ``dispatch(i)`` -> DispatchResult; ``experts(i, d)`` -> ExpertsOutput; ``combine(i, d, eo)``
    -> the piece's result (any object of tensors: tuples, dataclasses, None);
    ``abandon(d, stage, exc)`` (``Dispatcher.abandon`` of ``d.handle``)."""

    dispatch: Callable[[int], Any]
    experts: Callable[[int, Any], Any]
    combine: Callable[[int, Any, Any], Any]
    abandon: Callable[[Any, str, BaseException], None]


def run(num_pieces: int, stages: Stages, *, device: torch.device, overlap: bool,
        after: Callable[[], Any] | None = None) -> tuple[list, Any]:
    """(every piece's combine result in piece order, ``after()``'s result or None).

    ``overlap=False``: D C of each piece in turn (one batch in flight). ``overlap=True``: the
    pipeline of the module docstring (two in flight; two CUDA streams on a CUDA ``device``).
    A stage that raises abandons every piece dispatched and not combined, then re-raises."""
    if not overlap:
        out = [_one_piece(i, stages) for i in range(num_pieces)]
        return out, (after() if after is not None else None)
    streams = _Streams(device) if device.type == "cuda" else None
    return _pipeline(num_pieces, stages, streams, after)


def _one_piece(i: int, stages: Stages):
    d = stages.dispatch(i)
    stage = "experts"
    try:  # a rank leaving here strands its peers in combine: the dispatcher records it
        eo = stages.experts(i, d)
        stage = "combine"
        return stages.combine(i, d, eo)
    except BaseException as exc:
        stages.abandon(d, stage, exc)
        raise


def _pipeline(n: int, stages: Stages, streams: _Streams | None, after):
    out: list = [None] * n
    held: dict[int, Any] = {}  # piece -> DispatchResult, dispatched and not combined
    done: dict[int, Any] = {}  # piece -> ExpertsOutput, not combined yet
    alive: list = []  # every DispatchResult and ExpertsOutput, until the join (docstring)
    ctx = streams or _Host()
    where = (0, "dispatch")  # the piece and stage running, for the abandon below

    def dispatch_and_compute(i: int) -> None:
        nonlocal where
        where = (i, "dispatch")
        with ctx.comm():
            held[i] = stages.dispatch(i)
        ctx.dispatched(held[i])
        where = (i, "experts")
        with ctx.compute():
            done[i] = stages.experts(i, held[i])
        ctx.computed(done[i])
        alive.extend((held[i], done[i]))

    try:
        ctx.fork()
        dispatch_and_compute(0)
        for i in range(n):
            if i + 1 < n:  # the next piece's dispatch and experts before this one's combine
                dispatch_and_compute(i + 1)
            where = (i, "combine")
            with ctx.comm(after_compute=True):
                out[i] = stages.combine(i, held[i], done.pop(i))
            del held[i]
            ctx.combined(out[i])
        extra = after() if after is not None else None
    except BaseException as exc:
        for j, d in held.items():  # the piece that raised, and the other one in flight
            stages.abandon(d, where[1] if j == where[0] else "experts", exc)
        raise
    finally:
        ctx.join()
        alive.clear()  # (after the join: see the module docstring)
    return out, extra


class _Host:
    """The pipeline's calls in order on the host (no CUDA)."""

    def fork(self) -> None: ...

    def join(self) -> None: ...

    def comm(self, *, after_compute: bool = False):
        return contextlib.nullcontext()

    def compute(self):
        return contextlib.nullcontext()

    def dispatched(self, d) -> None: ...

    computed = combined = dispatched


class _Streams:
    """The caller's stream (compute) and the device's side stream (comm), with the events
    between them (see the module docstring): pieces are dispatched, computed and combined in
    piece order, so each kind of event is a queue."""

    def __init__(self, device: torch.device):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device=device, priority=-1)
        self.main = torch.cuda.current_stream(device)
        self.side = _SIDE_STREAMS[device]
        if self.side == self.main:
            raise ValueError(error_message(
                "current stream", self.main, "is the micro-batch overlap's own side stream",
                "call the layer from another stream (the default one)"))
        # Events after D(i) and after E(i), each waited for once, in piece order.
        self._dispatched: list[torch.cuda.Event] = []
        self._computed: list[torch.cuda.Event] = []

    def fork(self) -> None:
        self.side.wait_stream(self.main)  # the routed inputs, made on the caller's stream

    def join(self) -> None:
        self.main.wait_stream(self.side)  # the outputs; reads of the caller's tensors

    def comm(self, *, after_compute: bool = False):
        if after_compute:  # C(i) waits for E(i) only, not for E(i + 1) issued since
            self.side.wait_event(self._computed.pop(0))
        return torch.cuda.stream(self.side)

    def dispatched(self, d) -> None:
        self._dispatched.append(self.side.record_event())
        _record(d, self.main)  # rows made on the side stream, read by the experts

    @contextlib.contextmanager
    def compute(self):
        self.main.wait_event(self._dispatched.pop(0))  # E(i) after D(i), not after C(i-1)
        yield

    def computed(self, eo) -> None:
        self._computed.append(self.main.record_event())
        _record(eo, self.side)  # the experts' output, read by combine

    def combined(self, out) -> None:
        _record(out, self.main)  # the piece's result, read by the caller after the join


def _record(obj, stream) -> None:
    """``record_stream(stream)`` on every CUDA tensor inside ``obj`` (tensors, tuples, lists,
    dicts and dataclasses of them); nothing while a CUDA graph is being captured."""
    if torch.cuda.is_current_stream_capturing():
        return
    _record_all(obj, stream)


def _record_all(obj, stream) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _record_all(o, stream)
    elif isinstance(obj, dict):
        for o in obj.values():
            _record_all(o, stream)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _record_all(getattr(obj, f.name), stream)
