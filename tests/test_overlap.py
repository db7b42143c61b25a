"""EPMoE(micro_batches=2): the micro-batch overlap schedule (``rocm_moe.overlap``). On gloo ranks (W
= 1-4) the schedule runs in order on the host: the result equals the un-split layer bit for bit
with experts whose rows do not depend on the batch (the fixed-order reference experts; the comm
backends sum each token's partials in rank order: torch, MORI's fakes) and the float64 oracle
always (the default reference experts' CPU GEMMs round differently for other row counts, so bits
differ there: 1e-5 at 33 tokens), for 1, 33 and 511 tokens spread unevenly over the ranks (one
rank with none), all tokens on one expert, both weight modes, return_raw, invariant mode and
shared experts, on the torch backend, on MORI's fakes (two ops, ``batches_in_flight=2``) and, at
W = 2, on the symm backend (two lanes; its kernels in Triton's interpreter over shared memory,
tests/symm_shm.py). Bad values are refused on every rank before any collective; ranks that
disagree on micro_batches are refused together at the first forward. The schedule itself (order,
at most two batches in flight, abandoning on failure) is checked in-process, and so is the
overlap report of ``rocm-moe bench layer --overlap``. On GPUs (W = 1, and 2 / 4 where there are
as many; skipped without CUDA): the two-stream run with the Triton experts on the torch (NCCL)
and symm backends equals micro_batches=1 bit for bit (both weight modes, return_raw, invariant
mode, shared experts) and the oracle, and the symm layer captures in a CUDA graph whose replay
equals its eager run."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig, dense_moe_reference, overlap
from rocm_moe import synthetic as syn
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.comm.mori import MoriDispatcher
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.weighting import ExpertsOutput
from tests.conftest import TOL, rel_err
from tests.fakes import FakeMori
from tests.symm_shm import ShmSymmDispatcher, shm_available

E, K, H, I, SHARED_I = 12, 3, 16, 8, 8
SEED = 5
ROUTER = RouterConfig.qwen3_moe(E, K)
# Tokens per rank, by W: 1, 33 and 511 tokens in all, split unevenly; the first case of every
# W > 1 leaves a rank with none (T = 1 split in two leaves a micro-batch empty on every rank).
TOKENS = {1: [(1,), (33,), (511,)],
          2: [(1, 0), (33, 0), (400, 111)],
          3: [(0, 1, 0), (20, 0, 13), (300, 11, 200)],
          4: [(1, 0, 0, 0), (0, 30, 2, 1), (250, 1, 0, 260)]}
MORI_W = (1, 2, 4)  # MORI's gpu_per_node must be a power of two dividing W
SHM_W = (2,)  # the symm backend on gloo ranks (tests/symm_shm.py): its kernels interpreted


def _layer(disp, micro_batches, mode="experts", **kw) -> EPMoE:
    """A layer with the fixed-order reference experts (a row's bits independent of the batch)
    unless ``experts=`` says otherwise."""
    kw.setdefault("experts", ReferenceExperts(invariant=True))
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER, dispatcher=disp,
                  weight_mode=mode, micro_batches=micro_batches, **kw)
    layer.reset_parameters(seed=SEED)
    return layer


def _oracle(layer: EPMoE, x, topk_weights, topk_ids):
    ew = lambda g: syn.expert_weights(SEED, g, H, I)  # noqa: E731
    y, raw = dense_moe_reference(x.double(), topk_weights, topk_ids, expert_weights=ew)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts.reference(x)
    return y, raw


def _compare(one: EPMoE, two: EPMoE, x, forced=None, *, raw: bool = True,
             bits: bool = True) -> dict:
    """micro_batches=2 against 1 (the same bits unless ``bits`` is False) and the oracle,
    weighted and (``raw``) raw outputs."""
    out = {}
    if forced is None:
        a, b = one(x), two(x)
        w, ids = one.route_tokens(x).topk_weights, one.route_tokens(x).topk_ids
    else:
        a, b = one.forward_routed(x, *forced), two.forward_routed(x, *forced)
        w, ids = forced
    y_ref, raw_ref = _oracle(one, x, w, ids)
    out["bits"] = torch.equal(a, b)
    out["shape"] = list(b.shape) == list(x.shape)
    out["err"] = rel_err(b, y_ref) if x.shape[0] else 0.0
    out["raw_err"] = 0.0
    if raw:  # (MORI has no raw return path)
        ra = one.forward_routed(x, w, ids, return_raw=True)
        rb = two.forward_routed(x, w, ids, return_raw=True)
        out["bits"] = out["bits"] and torch.equal(ra.out, rb.out) \
            and torch.equal(ra.raw, rb.raw) and torch.equal(ra.topk_ids, rb.topk_ids) \
            and torch.equal(ra.topk_weights, rb.topk_weights) \
            and ra.weighted_by == rb.weighted_by
        if x.shape[0]:
            out["err"] = max(out["err"], rel_err(rb.out, y_ref))
            out["raw_err"] = rel_err(rb.raw, raw_ref)
    if not bits:
        out["bits"] = True  # (not expected: the experts' GEMMs depend on the row count)
    return out


def _one_hot_routing(T: int):
    """Every token on experts 0, 1, 2 (rank 0's at every W here): one hot rank."""
    ids = torch.tensor([[0, 1, 2]], dtype=torch.int32).expand(T, K).contiguous()
    return torch.full((T, K), 1.0 / K), ids


def _dispatchers(info):
    W = info.world_size
    p = Placement.contiguous(E, W)
    out = {"torch": TorchDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32,
                                    max_tokens_per_rank=300)}
    if W in SHM_W and shm_available() is None:  # two lanes; kernels interpreted, shared memory
        out["symm"] = ShmSymmDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32,
                                        max_tokens_per_rank=40, batches_in_flight=2)
    if W in MORI_W:  # two ops; AsyncLL: each op's sends and receives split (MORI's ROCm form)
        for name, kernel in (("mori", "auto"), ("mori_asyncll", "AsyncLL")):
            out[name] = MoriDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32,
                                       max_tokens_per_rank=300, mori=FakeMori(),
                                       batches_in_flight=2, kernel_type=kernel)
    return out


def _equal_worker(info) -> dict:
    W, r = info.world_size, info.rank
    res = {}
    for name, disp in _dispatchers(info).items():
        for mode in ("experts", "combine"):
            one, two = _layer(disp, 1, mode), _layer(disp, 2, mode)
            raw = not name.startswith("mori")  # (MORI has no raw return path)
            # (MORI's fakes move rows in Python: 511 tokens on the torch backend only)
            for shares in dict(mori=TOKENS[W][:2], mori_asyncll=TOKENS[W][1:2],
                               symm=TOKENS[W][:2]).get(name, TOKENS[W]):
                T = shares[r]
                x = syn.tokens(SEED + T, r, T, H) * 3
                res[f"{name}_{mode}_T{sum(shares)}"] = _compare(one, two, x, raw=raw)
            if name != "mori_asyncll":
                T = TOKENS[W][1][r]
                res[f"{name}_{mode}_one_expert"] = _compare(
                    one, two, syn.tokens(SEED, r, T, H), forced=_one_hot_routing(T), raw=raw)
        if name == "mori_asyncll":  # every receive right after its send, op by op
            calls = [c for op in disp.ops for c in op.calls if c != "reset"]
            res["mori_asyncll_calls"] = dict(
                bits=all(a + "_recv" == b for a, b in zip(calls[::2], calls[1::2], strict=True)),
                shape=len(disp.ops) == 2 and all(op.calls for op in disp.ops), err=0.0,
                raw_err=0.0)
        if name == "symm":  # invariant mode: combine_raw's one push per micro-batch
            x = syn.tokens(SEED, r, TOKENS[W][1][r], H)
            res["symm_invariant"] = _compare(_layer(disp, 1, invariant=True),
                                             _layer(disp, 2, invariant=True), x)
        if name == "torch":  # invariant mode with shared experts; 3 micro-batches
            kw = dict(invariant=True, shared_intermediate_size=SHARED_I)
            x = syn.tokens(SEED, r, TOKENS[W][1][r], H)
            res["torch_invariant_shared"] = _compare(_layer(disp, 1, **kw), _layer(disp, 2, **kw),
                                                     x)
            res["torch_three"] = _compare(_layer(disp, 1), _layer(disp, 3), x)
            plain = dict(experts=ReferenceExperts())  # batch-dependent CPU GEMMs: the oracle
            res["torch_default_experts"] = _compare(_layer(disp, 1, **plain),
                                                    _layer(disp, 2, **plain), x, bits=False)
    return res


def _refusal_worker(info) -> dict:
    """Bad micro_batches on every rank (no collective: the test's launch would hang on a rank
    that waited in one); a one-batch MORI dispatcher; ranks that disagree."""
    W = info.world_size
    p = Placement.contiguous(E, W)
    disp = TorchDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32)
    seen = {}
    for bad in (0, -1, 2.0, True, "2", None):
        try:
            _layer(disp, bad)
        except (TypeError, ValueError) as exc:
            seen[repr(bad)] = f"{type(exc).__name__}: {exc}"
    if W in MORI_W:
        one_lane = MoriDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32,
                                  max_tokens_per_rank=8, mori=FakeMori())
        try:
            _layer(one_lane, 2)
        except ValueError as exc:
            seen["mori_one_lane"] = str(exc)
        try:
            MoriDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32,
                           max_tokens_per_rank=8, mori=FakeMori(), batches_in_flight=0)
        except ValueError as exc:
            seen["batches_in_flight"] = str(exc)
    layer = _layer(disp, 2 if info.rank == 0 else 1)
    try:
        layer(syn.tokens(SEED, info.rank, 3, H))
    except ValueError as exc:
        seen["disagree"] = str(exc)
    return seen


def _worker(info) -> dict:
    return dict(equal=_equal_worker(info), refusals=_refusal_worker(info))


@pytest.fixture(scope="module")
def ranks():
    done = {}

    def get(W: int) -> list[dict]:
        if W not in done:
            done[W] = launch(W, _worker, backend="gloo", timeout_s=120)
        return done[W]

    return get


@pytest.mark.parametrize("W", sorted(TOKENS))
def test_two_micro_batches_equal_the_unsplit_layer_and_the_oracle(W, ranks):
    for r, res in enumerate(ranks(W)):
        cases = res["equal"]
        symm = 7 if W in SHM_W and shm_available() is None else 0  # 2 modes x 3 cases + 1
        assert len(cases) == (20 if W in MORI_W else 11) + symm, sorted(cases)
        for case, got in cases.items():
            assert got["bits"], (W, r, case)
            assert got["shape"], (W, r, case)
            assert got["err"] <= TOL[torch.float32], (W, r, case, got)
            assert got["raw_err"] <= TOL[torch.float32], (W, r, case, got)


@pytest.mark.parametrize("W", sorted(TOKENS))
def test_bad_micro_batches_refused_on_every_rank(W, ranks):
    for r, res in enumerate(ranks(W)):
        seen = res["refusals"]
        for bad in ("0", "-1"):
            assert seen[bad].startswith("ValueError: micro_batches="), (r, seen[bad])
            assert "must be >= 1" in seen[bad]
            assert "Fix:" in seen[bad]
        for bad in ("2.0", "True", "'2'", "None"):
            assert seen[bad].startswith("TypeError: micro_batches="), (r, seen[bad])
        if W in MORI_W:
            assert "batches_in_flight=2" in seen["mori_one_lane"], seen["mori_one_lane"]
            assert seen["batches_in_flight"].startswith("batches_in_flight=0")
        if W > 1:
            assert "micro_batches by rank" in seen["disagree"], seen["disagree"]
        else:
            assert "disagree" not in seen


# ---- the schedule, in-process ------------------------------------------------------------
def test_split_gives_every_rank_the_same_piece_count():
    assert overlap.split(0, None, 1, 2) == [(0, 0), (0, 0)]
    assert overlap.split(1, None, 1, 2) == [(0, 1), (1, 1)]
    assert overlap.split(33, None, 1, 2) == [(0, 17), (17, 33)]
    assert overlap.split(3, 8, 2, 2) == [(0, 2), (2, 3), (3, 3), (3, 3)]  # a peer has 2 chunks
    assert overlap.split(511, 300, 2, 2) == [(0, 150), (150, 300), (300, 406), (406, 511)]


def _stages(log: list, fail: str | None = None):
    def stage(name):
        def call(i, *args):
            log.append(f"{name}{i}")
            if fail == f"{name}{i}":
                raise RuntimeError(fail)
            return f"{name}{i}"
        return call

    return overlap.Stages(dispatch=stage("D"), experts=stage("E"), combine=stage("C"),
                          abandon=lambda d, where, exc: log.append(f"abandon {d} at {where}"))


def test_pipeline_order_keeps_two_batches_in_flight():
    log: list = []
    out, after = overlap.run(3, _stages(log), device=torch.device("cpu"), overlap=True,
                             after=lambda: log.append("shared") or "s")
    # E(i + 1) before C(i); the comm calls in the order D0 D1 C0 D2 C1 C2
    assert log == ["D0", "E0", "D1", "E1", "C0", "D2", "E2", "C1", "C2", "shared"]
    assert out == ["C0", "C1", "C2"]
    assert after == "s"
    log.clear()
    overlap.run(2, _stages(log), device=torch.device("cpu"), overlap=False)
    assert log == ["D0", "E0", "C0", "D1", "E1", "C1"]  # micro_batches=1: one in flight


@pytest.mark.parametrize(("fail", "abandoned"), [
    ("E0", ["abandon D0 at experts"]),
    ("D1", ["abandon D0 at experts"]),
    ("E1", ["abandon D0 at experts", "abandon D1 at experts"]),
    ("C0", ["abandon D0 at combine", "abandon D1 at experts"]),
    ("C1", ["abandon D1 at combine"]),
    ("D0", []),
])
def test_pipeline_abandons_every_batch_in_flight(fail, abandoned):
    log: list = []
    with pytest.raises(RuntimeError, match=fail):
        overlap.run(2, _stages(log, fail), device=torch.device("cpu"), overlap=True)
    assert [e for e in log if e.startswith("abandon")] == abandoned


class _FakeStream:
    """Stands for a CUDA stream: logs what runs on it and the events it records and waits."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.n = name, log, 0

    def record_event(self):
        self.n += 1
        ev = f"{self.name}{self.n}"
        self.log.append(f"{self.name}: record {ev}")
        return ev

    def wait_event(self, ev):
        self.log.append(f"{self.name}: wait {ev}")

    def wait_stream(self, other):
        self.log.append(f"{self.name}: wait stream {other.name}")


def test_pipeline_events_on_two_streams(monkeypatch):
    """The CUDA wiring with fake streams: E(i) waits for the event after D(i) (not after the
    combine issued since), C(i) for the one after E(i) (not E(i + 1)), fork and join."""
    import contextlib

    log: list = []
    main, side = _FakeStream("main", log), _FakeStream("side", log)
    current = [main]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(overlap, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device, priority: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def stage(name):
        return lambda i, *args: log.append(f"{current[-1].name}: {name}{i}")

    stages = overlap.Stages(dispatch=stage("D"), experts=stage("E"), combine=stage("C"),
                            abandon=lambda *a: pytest.fail("nothing raised"))
    overlap.run(3, stages, device=torch.device("cuda", 0), overlap=True,
                after=lambda: log.append(f"{current[-1].name}: shared"))
    assert log == [
        "side: wait stream main",  # fork: the routed inputs
        "side: D0", "side: record side1", "main: wait side1", "main: E0", "main: record main1",
        "side: D1", "side: record side2", "main: wait side2", "main: E1", "main: record main2",
        "side: wait main1", "side: C0",
        "side: D2", "side: record side3", "main: wait side3", "main: E2", "main: record main3",
        "side: wait main2", "side: C1",
        "side: wait main3", "side: C2",
        "main: shared", "main: wait stream side"]  # join


class _Holding(LocalDispatcher):
    """Results are views of its buffers (as symm and MORI), ``batches_in_flight`` of them."""

    holds_batch = True

    def __init__(self, *args, batches_in_flight: int = 1, **kw):
        self._set_batches_in_flight(batches_in_flight)
        super().__init__(*args, **kw)


def _holding(n: int) -> _Holding:
    return _Holding(Placement.contiguous(E, 1), hidden_size=H, top_k=K, dtype=torch.float32,
                    batches_in_flight=n)


def test_two_lanes_hold_two_batches_and_refuse_a_third():
    d = _holding(2)
    x, (w, ids) = syn.tokens(SEED, 0, 4, H), _one_hot_routing(4)
    first, second = d.dispatch(x, w, ids), d.dispatch(x, w, ids)
    with pytest.raises(ValueError, match=r"dispatched but not combined.*batches_in_flight=2"):
        d.dispatch(x, w, ids)
    d.combine(ExpertsOutput(out=first.x, weights_applied=True), first.handle)
    third = d.dispatch(x, w, ids)  # lane 0 is free again
    assert d._lanes == [third.handle.batch_id, second.handle.batch_id]
    d.abandon(second.handle, "experts", RuntimeError("boom"))
    assert d._lanes == [third.handle.batch_id, None]


def test_layer_refuses_a_one_batch_dispatcher_and_keeps_the_pool_safety():
    with pytest.raises(ValueError, match=r"micro_batches=2.*batches_in_flight=2"):
        _layer(_holding(1), 2)
    layer = _layer(_holding(1), 1)
    with pytest.raises(ValueError, match="micro_batches=2"):
        layer.micro_batches = 2
    # Two lanes: another layer's batch left un-combined leaves one lane; the layer's second
    # micro-batch is refused (not written over the held rows), its first is abandoned.
    d = _holding(2)
    layer = _layer(d, 2)
    x = syn.tokens(SEED, 0, 6, H)
    held = d.dispatch(x, *_one_hot_routing(6))
    with pytest.raises(ValueError, match="dispatched but not combined"):
        layer(x)
    assert d._lanes == [held.handle.batch_id, None]
    d.combine(ExpertsOutput(out=held.x, weights_applied=True), held.handle)
    assert torch.equal(layer(x), _layer(d, 1)(x))


def test_bad_values_name_the_field_the_rule_and_the_fix():
    with pytest.raises(ValueError, match=r"micro_batches=0: must be >= 1\. Fix: pass 1"):
        _layer(None, 0)
    with pytest.raises(TypeError, match=r"micro_batches=1\.5: must be an int"):
        _layer(None, 1.5)
    layer = _layer(None, 2)
    with pytest.raises(TypeError, match="micro_batches"):
        layer.micro_batches = "2"
    assert layer.micro_batches == 2


# ---- rocm-moe bench layer --overlap ---------------------------------------------------------
def test_overlap_report_efficiency():
    from rocm_moe.benchmarks.layer import overlap_report

    key = dict(comm="symm", tokens=4096, skew="uniform", eplb="-")
    base = dict(key, mode="experts", **{"route us": 20.0, "dispatch us": 300.0,
                                        "experts us": 500.0, "combine us": 300.0,
                                        "eager us": 1200.0})
    split = dict(key, mode="overlap", **{"eager us": 660.0, "split == unsplit": True})
    (line,) = overlap_report([base, split])
    assert "comm 600.0 us, experts 500.0 us" in line
    assert "un-split 1200.0 us, micro_batches=2 660.0 us (0.55x)" in line
    assert "efficiency 1.10x max(comm, experts)" in line
    assert line.endswith("split == unsplit: True")


def test_bench_layer_overlap_smoke(tmp_path, capsys):
    import json

    from rocm_moe.cli import main

    # (test_cli's tiny bench shape, which also runs where the 2 ranks get GPUs)
    rc = main(["bench", "layer", "--world-size", "2", "--tokens", "1", "33", "--hidden", "64",
               "--num-experts", "8", "--intermediate", "32", "--top-k", "2", "--warmup", "0",
               "--iters", "1", "--dtype", "float32", "--comm", "torch", "--overlap",
               "--out", str(tmp_path),
               "--name", "ov"])
    assert rc == 0
    rows = json.loads((tmp_path / "ov.json").read_text())["summary"]
    assert [(r["tokens"], r["mode"]) for r in rows] == [
        (1, "experts"), (1, "overlap"), (33, "experts"), (33, "overlap")]
    assert all(isinstance(r["split == unsplit"], bool) for r in rows if r["mode"] == "overlap")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("overlap:")]
    assert len(lines) == 2, lines
    assert all("efficiency" in ln and "eager stages route" in ln for ln in lines)


# ---- GPU: two streams, bits and a CUDA graph -------------------------------------------
_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
GH, GI, GE, GK = 128, 64, 16, 4  # Triton-sized
GPU_T = (96, 130)  # + 5 per rank; both halves past the small-batch experts path (64 slots)


def _gpu_worker(info) -> dict:
    from rocm_moe.comm.symm import SymmDispatcher
    from rocm_moe.experts.triton import TritonExperts
    from rocm_moe.graphs import GraphedEPMoE

    W, r = info.world_size, info.rank
    router = RouterConfig.qwen3_moe(GE, GK)
    p = Placement.contiguous(GE, W)
    kw = dict(hidden_size=GH, top_k=GK, dtype=torch.bfloat16, max_tokens_per_rank=256)
    comms = {"torch": TorchDispatcher(p, **kw),
             "symm": SymmDispatcher(p, **kw, batches_in_flight=2)}
    out = {}
    for name, disp in comms.items():
        for mode, invariant in (("experts", False), ("combine", False), ("experts", True)):
            layers = []
            for mb in (1, 2):
                layer = EPMoE(hidden_size=GH, intermediate_size=GI, router=router,
                              dispatcher=disp, experts=TritonExperts(), weight_mode=mode,
                              dtype=torch.bfloat16, shared_intermediate_size=32,
                              device=info.device, invariant=invariant, micro_batches=mb)
                layer.reset_parameters(seed=7)
                layers.append(layer)
            for T0 in GPU_T:
                T = T0 + 5 * r
                x = syn.tokens(SEED, r, T, GH).bfloat16().to(info.device)
                a, b = layers[0](x), layers[1](x)
                ra = layers[0](x, return_raw=True)
                rb = layers[1](x, return_raw=True)
                torch.cuda.synchronize()
                key = f"{name}_{mode}{'_invariant' if invariant else ''}_T{T0}"
                y_ref, _ = dense_moe_reference(
                    x.double(), rb.topk_weights, rb.topk_ids,
                    expert_weights=lambda g: syn.expert_weights(7, g, GH, GI))
                y_ref = y_ref + layers[1].shared_experts.reference(x)
                out[key] = dict(bits=torch.equal(a, b) and torch.equal(ra.raw, rb.raw),
                                err=rel_err(b, y_ref))
            if name == "symm":  # the 2-micro-batch layer in a graph: replay == eager
                graphed = GraphedEPMoE(layers[1], buckets=(max(GPU_T) + 5 * (W - 1),))
                for T0 in GPU_T:  # (collective: every rank replays, then runs eagerly)
                    x = syn.tokens(SEED, r, T0 + 5 * r, GH).bfloat16().to(info.device)
                    replay = graphed(x).clone()
                    out[f"graph_{mode}{'_invariant' if invariant else ''}_T{T0}"] = dict(
                        bits=torch.equal(replay, layers[1](x)), err=0.0)
    return out


@pytest.mark.parametrize("W", [pytest.param(W, marks=[pytest.mark.gpu, pytest.mark.skipif(
    _GPUS < W, reason=f"needs {W} GPU(s)")]) for W in (1, 2, 4)])
def test_gpu_two_streams_equal_one_and_capture(W):
    for r, res in enumerate(launch(W, _gpu_worker, backend="nccl", timeout_s=300)):
        assert len(res) == 2 * 3 * len(GPU_T) + 3 * len(GPU_T), sorted(res)
        for case, got in res.items():
            assert got["bits"], (r, case)
            assert got["err"] <= TOL[torch.bfloat16], (r, case, got)
