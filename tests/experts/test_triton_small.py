"""The small-batch path of the Triton experts (``experts/triton_small.py``, issue 33 item 2)
against float64 oracles: bf16/fp16 and block-FP8, both weight modes, per-slot and per-expert
gate/up, -1 slots, experts outside the rank's map, zero-token experts, every token on one
expert, duplicated experts across tokens, capacity-sized batches (``num_rows``). Triton's
interpreter on CPUs (float16, small shapes, wide tiles: few programs), compiled on GPUs."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, ReferenceExperts
from rocm_moe.experts import triton_small as small
from rocm_moe.experts.triton import TritonExperts
from tests.conftest import DEVICE, rel_err

pytest.importorskip("triton")

GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float16
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}[DTYPE]
# (T, K, E, W, H, I, routing); W > 1: the inputs of the last rank (the others' experts are
# skipped). Routings: random; all_on_one (every token on one expert); shared (every token
# picks K of the same K + 1 experts: each expert in many tokens' slots).
CASES = [pytest.param(*c, id="T{}_K{}_E{}_W{}_H{}_I{}_{}".format(*c)) for c in
         [(1, 1, 4, 1, 64, 32, "random"), (1, 8, 16, 2, 64, 32, "random"),
          (2, 2, 8, 1, 80, 48, "shared"), (7, 8, 16, 1, 40, 32, "all_on_one"),
          (33, 2, 8, 2, 64, 32, "random"),
          (33, 2, 8, 1, 64, 32, "all_on_one")]]


FORMS = ["gemv", "dot", "slot", "expert"]  # per slot (gate/up) and per row (down) on the
# vector units or via tl.dot; per slot via tl.dot with the down into per-slot rows; per local
# expert (the per-slot forms run up to PER_SLOT_MAX_SLOTS)
CROSSED = {"gemv": "expert", "dot": "slot", "slot": "row", "expert": "row"}  # T = 2's down
# bf16 / fp16 through the streaming kernels of triton_small_fp8 (float weights): the default
# for up to BF16_STREAM_MAX_SLOTS slots (gate/up per slot, down per row) and the other forms
# (gate/up per row, down per slot: the weighted sum a third launch)
BF16_FORMS = [*FORMS, "stream", "stream_rows"]


def _stream_config(form: str) -> dict:
    from rocm_moe.experts.triton_small_fp8 import BF16_DEFAULTS

    cfg = {**BF16_DEFAULTS["8"]}
    if not GPU:  # (wide tiles for the interpreter)
        cfg["gate_up"] = dict(cfg["gate_up"], BLOCK_N=32, BLOCK_K=128, num_warps=4)
        cfg["down"] = dict(cfg["down"], BLOCK_N=32, BLOCK_K=128, num_warps=4)
    if form == "stream_rows":
        cfg["gate_up"] = dict(cfg["gate_up"], FORM="row", PREFETCH=True)
        cfg["down"] = dict(cfg["down"], FORM="slot")
    return cfg


def _config(form: str, *, fp8: bool = False, down_form: str | None = None) -> dict:
    """The launch config of ``form`` (FORMS, or the bf16 stream forms of BF16_FORMS), the
    down's FORM ``down_form`` if given. Off-GPU: wide tiles for the interpreter (few
    programs); the kernels' logic is the same."""
    if form.startswith("stream"):
        return _stream_config(form)
    cfg = small.small_config(10**6 if form == "expert" else 1, fp8=fp8)
    if not GPU:
        bk = 128 if fp8 else 32
        cfg["gate_up"] = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, CHUNK=16, num_warps=4,
                              num_stages=1)
        cfg["down"] = dict(cfg["gate_up"], BLOCK_N=128 if fp8 else 64)
    cfg["gate_up"]["DOT"] = form != "gemv"
    cfg["down"]["DOT"] = form != "gemv"
    cfg["down"]["FORM"] = down_form or {"gemv": "row", "dot": "row"}.get(form, form)
    return cfg


def _ids(T, K, E, W, routing, gen) -> torch.Tensor:
    """[T, K] ids: random distinct experts per token, ~15% of slots -1 (never a whole batch);
    all_on_one: every token's slot 0 on the last rank's first expert; shared: every token
    picks from the same K + 1 experts (each expert in many tokens' slots)."""
    if routing == "shared":
        pool = torch.randperm(E, generator=gen)[:K + 1]
        ids = torch.stack([pool[torch.randperm(K + 1, generator=gen)[:K]] for _ in range(T)])
    elif routing == "all_on_one":
        L = Placement.contiguous(E, W).local_experts(W - 1)[0]
        others = torch.tensor([g for g in range(E) if g != L])
        ids = torch.stack([torch.cat([torch.tensor([L]), others[torch.randperm(
            E - 1, generator=gen)[:K - 1]]]) for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    drop = torch.rand(T, K, generator=gen) < 0.15
    drop[0, 0] = False
    ids[drop] = -1
    return ids.to(torch.int32)


def _case(T, K, E, W, H, I, routing, gen):
    emap = Placement.contiguous(E, W).expert_map(W - 1)
    e = emap.num_local
    x = torch.randn(T, H, generator=gen)
    w = torch.rand(T, K, generator=gen)
    w13 = torch.randn(e, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(e, H, I, generator=gen) / I**0.5
    ids = _ids(T, K, E, W, routing, gen)
    x, w13, w2 = (t.to(DTYPE) for t in (x, w13, w2))
    return [x, ids, w, w13, w2, emap]


def _dev(args):
    return [a.to(DEVICE) for a in args]


def _oracle(args, mode):
    """ReferenceExperts in float64 on the same (rounded) inputs."""
    x, ids, w, w13, w2, emap = args
    return ReferenceExperts()(x.double(), ids, w, w13.double(), w2.double(), emap,
                              weight_mode=mode).out


@pytest.mark.parametrize(("T", "K", "E", "W", "H", "I", "routing"), CASES)
@pytest.mark.parametrize("form", BF16_FORMS)
def test_matches_float64_oracle(T, K, E, W, H, I, routing, form, gen):
    """Both weight modes; T = 2 crosses the kernels' forms (CROSSED)."""
    args = _case(T, K, E, W, H, I, routing, gen)
    local = args[5].local_ids(args[1]) >= 0
    for mode in ("experts", "combine"):
        want = _oracle(args, mode)
        cfg = _config(form, down_form=CROSSED.get(form) if T == 2 else None)
        tma = form in ("slot", "expert")  # weights through tensor descriptors ("dot": pointers)
        out = small.small_experts(*_dev(args), weighted=mode == "experts", config=cfg, tma=tma)
        assert out.weights_applied == (mode == "experts")
        assert out.out.shape == want.shape
        assert out.out.dtype == DTYPE
        got = out.out.cpu()
        if local.any():
            assert rel_err(got, want) < TOL, mode
        else:
            assert got.eq(0).all()
        if mode == "combine":
            assert got[~local].eq(0).all()  # non-local and empty slots: exact zeros


@pytest.mark.parametrize("form", BF16_FORMS)
def test_zero_token_experts_and_nothing_local(form, gen):
    """A batch whose slots are all -1 or other ranks' experts: zeros, and no stale values."""
    args = _case(5, 2, 8, 2, 64, 32, "random", gen)
    args[1] = torch.where(args[5].local_ids(args[1]) >= 0, -1, args[1]).to(torch.int32)
    for weighted in (True, False):
        out = small.small_experts(*_dev(args), weighted=weighted, config=_config(form))
        assert out.out.eq(0).all()


@pytest.mark.parametrize("form", BF16_FORMS)
def test_bounded_rows(form, gen):
    """A capacity-sized batch (num_rows on the device): rows past the count are never read
    (NaN there), raw rows past it stay zeros, and a grid sized for fewer rows than arrive
    (expected_rows too small) still covers every row."""
    cap, n = 9, 5
    args = _case(cap, 2, 8, 2, 64, 32, "random", gen)
    args[0][n:] = float("nan")
    args[1][n:] = -1
    clean = [args[0].nan_to_num(0.0), *args[1:]]
    num_rows = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    for mode in ("experts", "combine"):
        want = _oracle(clean, mode)[:n]
        for expected in (None, 1, n, cap):
            out = small.small_experts(*_dev(args), weighted=mode == "experts",
                                      num_rows=num_rows, expected_rows=expected,
                                      config=_config(form)).out.cpu()
            assert not out[:n].isnan().any()
            assert rel_err(out[:n], want) < TOL, (mode, expected)
            if mode == "combine":
                assert out[n:].eq(0).all()


def test_auto_path_by_size_and_forced(monkeypatch, gen):
    """TritonExperts takes the small path for small batches (auto), the grouped one above
    small_max_slots, either when forced; both agree with the oracle."""
    calls = []
    real = small.small_experts

    def spy(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(small, "small_experts", spy)
    args = _dev(_case(3, 2, 8, 1, 64, 32, "random", gen))
    want = _oracle([a.cpu() if isinstance(a, torch.Tensor) else a for a in args], "experts")
    for experts, taken in ((TritonExperts(), True), (TritonExperts(small_max_slots=5), False),
                           (TritonExperts(path="small", small_max_slots=0), True),
                           (TritonExperts(path="grouped"), False),
                           (TritonExperts(config={"BLOCK_M": 16, "gate_up": dict(
                               BLOCK_N=32, BLOCK_K=32), "down": dict(BLOCK_N=32, BLOCK_K=32)}),
                            False)):
        calls.clear()
        out = experts(*args, weight_mode="experts").out
        assert bool(calls) == taken, experts.__dict__
        assert rel_err(out.cpu(), want) < TOL


def test_bf16_default_streams_up_to_its_slots(monkeypatch, gen):
    """Without a config, bf16 / fp16 batches of at most BF16_STREAM_MAX_SLOTS slots run the
    streaming kernels (float weights), larger ones the tl.dot forms; both match the oracle."""
    from rocm_moe.experts import triton_small_fp8 as stream

    assert small.BF16_STREAM_MAX_SLOTS == (64 if torch.version.hip is None else 0)
    calls = []
    real = stream.stream_fp8_experts
    monkeypatch.setattr(stream, "stream_fp8_experts",
                        lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    args = _case(3, 2, 8, 1, 64, 32, "random", gen)
    for limit, taken in ((6, True), (5, False)):
        monkeypatch.setattr(small, "BF16_STREAM_MAX_SLOTS", limit)
        calls.clear()
        for mode in ("experts", "combine"):
            out = small.small_experts(*_dev(args), weighted=mode == "experts").out
            assert rel_err(out.cpu(), _oracle(args, mode)) < TOL, (limit, mode)
        assert calls == ([(3, 2)] * 2 if taken else []), limit
    # a tuned table entry for the device and shape is taken over the streaming default
    monkeypatch.setattr(small, "BF16_STREAM_MAX_SLOTS", 6)
    table = {"": {"64x32": {"bf16": {"8": _config("dot")}}}}
    monkeypatch.setattr(small, "_table", lambda: table)
    calls.clear()
    out = small.small_experts(*_dev(args), weighted=True).out
    assert calls == []
    assert rel_err(out.cpu(), _oracle(args, "experts")) < TOL
    monkeypatch.setattr(small, "_table", lambda: {})
    monkeypatch.setenv(small.BF16_STREAM_ENV, "0")  # the environment's limit first
    monkeypatch.setattr(small, "BF16_STREAM_MAX_SLOTS", 6)
    calls.clear()
    small.small_experts(*_dev(args), weighted=True)
    assert calls == []
    for bad in ("-1", "8.0", "all"):
        monkeypatch.setenv(small.BF16_STREAM_ENV, bad)
        with pytest.raises(ValueError, match=small.BF16_STREAM_ENV):
            small.small_experts(*_dev(args), weighted=True)


def test_fp8_sibling_keeps_the_path():
    """EPMoE(weight_format="block_fp8", experts=TritonExperts(path=...)) runs the FP8 sibling
    with the same path choice."""
    fp8 = TritonExperts(path="small", small_max_slots=7).for_weight_format("block_fp8")
    assert (fp8.name, fp8.path, fp8.small_max_slots) == ("triton", "small", 7)
    assert TritonExperts().for_weight_format("block_fp8").path == "auto"


def test_choose_path_worked_example():
    assert small.choose_path("auto", rows=1, top_k=8) == "small"
    assert small.choose_path("auto", rows=8, top_k=8) == "small"
    assert small.choose_path("auto", rows=9, top_k=8) == "grouped"
    assert small.choose_path("auto", rows=9, top_k=8, max_slots=512) == "small"
    assert small.choose_path("grouped", rows=1, top_k=8) == "grouped"
    assert small.choose_path("small", rows=10**5, top_k=8) == "small"
    assert small.choose_path("auto", rows=2, top_k=8, max_slots=8) == "grouped"


def test_tuned_table_entries_are_taken(monkeypatch):
    """small_config takes bench/tune_experts_small.py's entry of the device and H x I for the
    smallest tuned slot count >= the batch's (the largest above them), else its heuristic."""
    tiles = dict(BLOCK_M=16, BLOCK_N=8, BLOCK_K=64, CHUNK=32, num_warps=2, num_stages=1)
    one = dict(per_slot=True, gate_up=tiles, down=dict(tiles, FORM="slot"))
    many = dict(one, per_slot=False)
    monkeypatch.setattr(small, "_table", lambda: {"dev": {"64x32": {"bf16": {"8": one,
                                                                             "64": many}}}})
    kw = dict(hidden=64, inter=32, device_name="dev")
    assert small.small_config(3, fp8=False, **kw) == one
    assert small.small_config(9, fp8=False, **kw) == many
    assert small.small_config(10**4, fp8=False, **kw) == many
    assert small.small_config(3, fp8=True, **kw) == small.small_config(3, fp8=True)
    assert small.small_config(3, fp8=False, hidden=64, inter=48, device_name="dev") == \
        small.small_config(3, fp8=False)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(path="fast"), "path"), (dict(path=None), "path"),
    (dict(small_max_slots=-1), "small_max_slots"), (dict(small_max_slots=True), "small_max_slots"),
    (dict(small_max_slots=8.0), "small_max_slots"),
    (dict(path="small", invariant=True), "invariant"),
])
def test_bad_path_arguments_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TritonExperts(**kwargs)


def test_invariant_and_variants_keep_the_grouped_path():
    from rocm_moe.experts.base import ExpertVariant

    inv = TritonExperts(path="small").as_invariant()
    assert not small.takes_small_path(inv, 1, 8, None, None)
    assert small.takes_small_path(TritonExperts(), 1, 8, None, None)
    assert not small.takes_small_path(TritonExperts(), 1, 8, None, None, ExpertVariant.llama4())
    with pytest.raises(ValueError, match="plain SwiGLU"):
        small.takes_small_path(TritonExperts(path="small"), 1, 8, None, None,
                               ExpertVariant.llama4())
    # a capacity-sized batch is judged by the rows expected, not the capacity
    assert small.takes_small_path(TritonExperts(), 4096, 8, torch.ones(1), 2)
    assert not small.takes_small_path(TritonExperts(), 4096, 8, torch.ones(1), None)


# ---- FP8 -------------------------------------------------------------------------------------

# (T, K, E, W, H, I, routing, form)
FP8_CASES = [pytest.param(*c, id="T{}_K{}_E{}_W{}_H{}_I{}_{}_{}".format(*c)) for c in
             [(1, 8, 16, 1, 128, 128, "random", "gemv"), (1, 8, 16, 1, 128, 128, "random", "dot"),
              (1, 8, 16, 1, 128, 128, "random", "slot"),
              (1, 8, 16, 1, 128, 128, "random", "expert"),
              (2, 2, 8, 2, 200, 128, "shared", "gemv"), (2, 2, 8, 2, 200, 128, "shared", "slot"),
              (7, 2, 4, 1, 128, 256, "shared", "expert")]]


def _fp8_case(T, K, E, W, H, I, routing, gen, *, ids_of=None, x_scale: float = 1.0):
    """(x [T, H], ids [T, K], w [T, K], block-FP8 experts, expert map) of the last rank;
    ``ids_of``: the routing's ids (default ``_ids``), ``x_scale``: the rows' spread."""
    from rocm_moe.experts.fp8 import quantize_experts
    from rocm_moe.quant import native_fp8_dtype

    emap = Placement.contiguous(E, W).expert_map(W - 1)
    e = emap.num_local
    fw = quantize_experts(torch.randn(e, 2 * I, H, generator=gen) / H**0.5,
                          torch.randn(e, H, I, generator=gen) / I**0.5,
                          dtype=native_fp8_dtype(DEVICE))
    x = (torch.randn(T, H, generator=gen) * x_scale).to(DTYPE)
    w = torch.rand(T, K, generator=gen)
    ids = (ids_of or _ids)(T, K, E, W, routing, gen)
    return x, ids, w, fw, emap


@pytest.mark.parametrize(("T", "K", "E", "W", "H", "I", "routing", "form"), FP8_CASES)
def test_fp8_matches_reference(T, K, E, W, H, I, routing, form, gen):
    """Against the FP8 torch reference (the same activation and intermediate quantisation,
    float32 GEMMs); per-expert gate/up through tl.dot (upcast to float16 off-GPU)."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts

    x, ids, w, fw, emap = _fp8_case(T, K, E, W, H, I, routing, gen)
    local = emap.local_ids(ids) >= 0
    for mode in ("experts", "combine"):
        want = FP8ReferenceExperts()(x.float(), ids, w, fw.w13, fw.w2, emap,
                                     weight_mode=mode).out.to(DTYPE).double()
        experts = TritonFP8Experts(path="small")
        rows = experts.quantize(x.to(DEVICE), fw.w13.dtype)
        out = small.small_fp8_experts(
            rows, ids.to(DEVICE), w.to(DEVICE), fw.w13.to(DEVICE), fw.w2.to(DEVICE),
            emap.to(DEVICE), weighted=mode == "experts", out_dtype=DTYPE, upcast=not GPU,
            precise=False, config=_config(form, fp8=True))
        got = out.out.cpu()
        assert got.dtype == DTYPE
        assert rel_err(got, want) < TOL, mode
        if mode == "combine":
            assert got[~local].eq(0).all()


@pytest.mark.parametrize("form", FORMS)
def test_fp8_float_rows_quantised_in_kernel_match_quantised_rows(form, gen):
    """Float rows into the small FP8 path are quantised per 1x128 group by the gate/up kernel
    (no launch of their own) exactly as quant.quantize_rows does: the same output bits as with
    the rows quantised first (H = 200: a partial last group)."""
    x, ids, w, fw, emap = _fp8_case(3, 2, 8, 1, 200, 128, "random", gen)
    x = x * 7  # (groups of different ranges)
    dev = [t.to(DEVICE) for t in (ids, w)] + [fw.w13.to(DEVICE), fw.w2.to(DEVICE),
                                              emap.to(DEVICE)]
    rows = _quantize(x.to(DEVICE), fw.w13.dtype)
    for weighted in (True, False):
        kw = dict(weighted=weighted, out_dtype=DTYPE, upcast=not GPU, precise=False,
                  config=_config(form, fp8=True))
        a = small.small_fp8_experts(rows, *dev, **kw).out
        b = small.small_fp8_experts(x.to(DEVICE), *dev, **kw).out
        assert torch.equal(a, b), weighted


def _quantize(x, dtype):
    """The Triton FP8 experts' own row quantiser (a kernel; quant.quantize_rows's bits)."""
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts

    return TritonFP8Experts().quantize(x, dtype)


def test_fp8_small_path_has_no_quantise_launch(monkeypatch, gen):
    """TritonFP8Experts hands float rows to the small path unquantised (its gate/up kernel
    quantises them); the grouped path still quantises them first."""
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts

    def refuse(*args):
        raise AssertionError("rows quantised before the experts")

    monkeypatch.setattr(TritonFP8Experts, "quantize", refuse)
    x, ids, w, fw, emap = _fp8_case(2, 2, 4, 1, 128, 128, "random", gen)
    args = [t.to(DEVICE) for t in (x, ids, w)] + [fw.w13.to(DEVICE), fw.w2.to(DEVICE),
                                                   emap.to(DEVICE)]
    assert TritonFP8Experts(path="small")(*args, weight_mode="experts").out.shape == (2, 128)
    with pytest.raises(AssertionError, match="quantised before"):
        TritonFP8Experts(path="grouped")(*args, weight_mode="experts")


def test_fp8_auto_path_and_bounded_rows(gen):
    """TritonFP8Experts (auto, small up to 64 slots) on a capacity-sized batch: the small
    path's rows agree with the grouped path's and with the reference; raw rows past the count
    are zeros. (By default "auto" takes the FP8 small path up to max_slots() slots: 64,
    where an H100 timed the streaming kernels ahead of the grouped path.)"""
    from rocm_moe.experts import triton_small, triton_small_fp8
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts as F8

    limit = triton_small_fp8.max_slots()
    assert F8().small_max_slots == limit
    assert not triton_small.takes_small_path(F8(), limit + 1, 1, None, None)
    assert triton_small.takes_small_path(F8(), max(limit, 1), 1, None, None) == (limit > 0)
    from rocm_moe.experts.fp8 import FP8ReferenceExperts
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts

    cap, n = 6, 3
    x, ids, w, fw, emap = _fp8_case(cap, 2, 8, 2, 128, 128, "random", gen)
    ids[n:] = -1
    num_rows = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    dev = [t.to(DEVICE) for t in (x, ids, w)] + [fw.w13.to(DEVICE), fw.w2.to(DEVICE),
                                                  emap.to(DEVICE)]
    for mode in ("experts", "combine"):
        want = FP8ReferenceExperts()(x.float(), ids, w, fw.w13, fw.w2, emap,
                                     weight_mode=mode).out[:n].double()
        got = TritonFP8Experts(small_max_slots=64)(*dev, weight_mode=mode, num_rows=num_rows,
                                                   expected_rows=n).out.cpu()
        assert rel_err(got[:n], want) < TOL, mode
        if mode == "combine":
            assert got[n:].eq(0).all()


# ---- GPU only -----------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not GPU, reason="needs a GPU (compiled kernels, bf16, graphs)")


@gpu_only
@pytest.mark.parametrize("T", [1, 8, 64])
def test_gpu_qwen3_shape_small_equals_grouped(T, gen):
    """Qwen3-30B-A3B's experts (E=128, H=2048, I=768, K=8) in bf16: the small path and the
    grouped path agree with the float64 oracle; the small path replays from a CUDA graph."""
    E, H, I, K = 128, 2048, 768, 8
    emap = Placement.contiguous(E, 1).expert_map(0).to(DEVICE)
    x = torch.randn(T, H, generator=gen).bfloat16().to(DEVICE)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.int().to(DEVICE)
    w = torch.rand(T, K, generator=gen).to(DEVICE)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16().to(DEVICE)
    w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16().to(DEVICE)
    args = (x, ids, w, w13, w2, emap)
    for mode in ("experts", "combine"):
        want = ReferenceExperts()(x.double(), ids, w, w13.double(), w2.double(), emap,
                                  weight_mode=mode).out
        for path in ("small", "grouped"):
            out = TritonExperts(path=path)(*args, weight_mode=mode).out
            assert rel_err(out, want) < 2e-2, (mode, path)
        # the streaming kernels with float weights, each bucket's tiles, PDL on and off (the
        # same bits: PDL only moves the launches)
        from rocm_moe.experts.triton_small_fp8 import BF16_DEFAULTS

        # (and the first down K steps preloaded before the wait: the same bits again)
        for cfg in BF16_DEFAULTS.values():
            pre = dict(cfg, down=dict(cfg["down"], PRELOAD=3))
            got = [small.small_experts(*args, weighted=mode == "experts", config=c).out
                   for c in (dict(cfg, PDL=True), dict(cfg, PDL=False), pre)]
            assert rel_err(got[0], want) < 2e-2, (mode, cfg)
            assert torch.equal(got[0], got[1]), (mode, cfg)
            assert torch.equal(got[0], got[2]), (mode, cfg)
    experts = TritonExperts(path="small")
    eager = experts(*args, weight_mode="experts", validate=False).out.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = experts(*args, weight_mode="experts", validate=False).out
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)  # deterministic: no atomics, fixed slot order


@gpu_only
@pytest.mark.parametrize("T", [1, 8, 64])
def test_gpu_qwen3_shape_fp8_small_equals_grouped(T, gen):
    """Qwen3's experts in block-FP8 (native FP8 dots): the small and the grouped paths agree
    with the FP8 torch reference in both weight modes; the small path replays from a graph."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts, quantize_experts
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts
    from rocm_moe.quant import native_fp8_dtype

    E, H, I, K = 128, 2048, 768, 8
    emap = Placement.contiguous(E, 1).expert_map(0).to(DEVICE)
    x = torch.randn(T, H, generator=gen).bfloat16().to(DEVICE)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.int().to(DEVICE)
    w = torch.rand(T, K, generator=gen).to(DEVICE)
    fw = quantize_experts((torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(DEVICE),
                          (torch.randn(E, H, I, generator=gen) / I**0.5).to(DEVICE),
                          dtype=native_fp8_dtype(DEVICE))
    args = (x, ids, w, fw.w13, fw.w2, emap)
    for mode in ("experts", "combine"):
        want = FP8ReferenceExperts()(*args, weight_mode=mode, out_dtype=torch.float32).out
        for path in ("small", "grouped"):
            out = TritonFP8Experts(path=path)(*args, weight_mode=mode).out
            assert rel_err(out, want) < 1e-2, (mode, path)
    experts = TritonFP8Experts(path="small")
    eager = experts(*args, weight_mode="experts", validate=False).out.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = experts(*args, weight_mode="experts", validate=False).out
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


# ---- the shared experts' streaming SwiGLU (stream_swiglu) ---------------------------------

def test_shared_stream_rows_from_the_environment(monkeypatch):
    """ROCM_MOE_SHARED_STREAM_MAX_ROWS: an int >= 0 (else a ValueError naming it); default
    SHARED_STREAM_MAX_ROWS; with 0, rows over the limit, float32 rows, 3-D rows or autograd on
    any of the three tensors, stream_swiglu declines (None: the layer runs torch's SwiGLU)."""
    monkeypatch.delenv(small.SHARED_STREAM_ENV, raising=False)
    assert small.shared_stream_max_rows() == small.SHARED_STREAM_MAX_ROWS
    monkeypatch.setenv(small.SHARED_STREAM_ENV, "8")
    assert small.shared_stream_max_rows() == 8
    w13 = torch.randn(256, 64, dtype=DTYPE, device=DEVICE)
    w2 = torch.randn(64, 128, dtype=DTYPE, device=DEVICE)
    x = torch.randn(9, 64, dtype=DTYPE, device=DEVICE)
    assert small.stream_swiglu(x, w13, w2) is None  # 9 rows > 8
    assert small.stream_swiglu(x[:2].float(), w13.float(), w2.float()) is None
    assert small.stream_swiglu(x[None, :2], w13, w2) is None
    with torch.enable_grad():
        assert small.stream_swiglu(x[:2], w13, w2.requires_grad_()) is None
    monkeypatch.setenv(small.SHARED_STREAM_ENV, "0")
    assert small.stream_swiglu(x[:2], w13, w2.detach()) is None
    for bad in ("-1", "eight", "1.5"):
        monkeypatch.setenv(small.SHARED_STREAM_ENV, bad)
        with pytest.raises(ValueError, match=small.SHARED_STREAM_ENV):
            small.shared_stream_max_rows()


@pytest.mark.parametrize(("T", "H", "I"), [(1, 200, 96), (3, 64, 160), (33, 128, 128)])
def test_shared_stream_matches_float64(T, H, I, monkeypatch, gen):
    """stream_swiglu against swiglu_expert in float64 (fp16 rows and weights here; odd H and
    I, a non-contiguous x; 33 rows: the 64-slot bucket's tiles); weights that do not fit x: a
    ValueError naming them. (On GPUs the bf16 case and the layer's use are tested below.)"""
    from rocm_moe.experts.base import swiglu_expert

    monkeypatch.setenv(small.SHARED_STREAM_ENV, "64")
    w13 = (torch.randn(2 * I, H, generator=gen) / H**0.5).to(DTYPE).to(DEVICE)
    w2 = (torch.randn(H, I, generator=gen) / I**0.5).to(DTYPE).to(DEVICE)
    x = torch.randn(H, T, generator=gen).to(DTYPE).to(DEVICE).T  # (non-contiguous)
    got = small.stream_swiglu(x, w13, w2)
    assert got.shape == (T, H)
    assert got.dtype == DTYPE
    want = swiglu_expert(x.double(), w13.double(), w2.double())
    assert rel_err(got, want) < 5e-3
    with pytest.raises(ValueError, match="w13 must be"):
        small.stream_swiglu(x, w13[:, :-1].contiguous(), w2)


@gpu_only
@pytest.mark.parametrize("T", [1, 8, 33])
def test_gpu_shared_experts_stream(T, monkeypatch, gen):
    """DeepSeek-V3's shared expert (H = 7168, I = 2048) and an odd one (H = 200, I = 96, gated)
    in bf16: SharedExperts.forward takes the streaming SwiGLU (counted), matches the float64
    reference within bf16 rounding, and a CUDA-graph replay gives the eager call's bits; a
    graph captured before any eager call takes torch's path (nothing made during capture)."""
    from rocm_moe.layer import SharedExperts

    monkeypatch.setenv(small.SHARED_STREAM_ENV, "64")
    monkeypatch.setattr(small, "_ONE_EXPERT", {})
    calls, real = [], small.stream_swiglu

    def spy(*args):  # (whether the layer's call took the streaming kernels)
        y = real(*args)
        calls.append(y is not None)
        return y
    monkeypatch.setattr("rocm_moe.layer.stream_swiglu", spy)
    for H, I, gated in ((7168, 2048, False), (200, 96, True)):
        s = SharedExperts(H, I, gated=gated, dtype=torch.bfloat16, device=DEVICE)
        with torch.no_grad():
            s.w13.copy_(torch.randn(2 * I, H, generator=gen) / H**0.5)
            s.w2.copy_(torch.randn(H, I, generator=gen) / I**0.5)
            if gated:
                s.gate.weight.copy_(torch.randn(1, H, generator=gen) / H**0.5)
            x = torch.randn(T, H, generator=gen).bfloat16().to(DEVICE)
            if not small._ONE_EXPERT:  # (the first case: capture before any eager call)
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    assert small.stream_swiglu(x, s.w13, s.w2) is None
                    s(x)
                assert not small._ONE_EXPERT
            calls.clear()
            got = s(x)
            assert calls == [True]
            assert small._ONE_EXPERT
            assert rel_err(got, s.reference(x)) < 1e-2, (H, T)
            eager = got.clone()
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                captured = s(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, eager)
