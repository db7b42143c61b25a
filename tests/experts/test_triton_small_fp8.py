"""The streaming block-FP8 small-batch experts (``experts/triton_small_fp8.py``, issue 33 item 2)
against float64 oracles: the FP8 reference in float64 (the same activation and intermediate
quantisation) and, for float activations (ACT "float"), the dequantised model in float64; both
weight modes, per-slot and per-row forms of both kernels, float rows and FP8Rows, -1 slots,
experts outside the rank's map, zero-token experts, every token on one expert, capacity-sized
batches; the config's environment overrides and checks. Triton's interpreter on CPUs (float16
rows, small shapes, wide tiles: few programs), compiled on GPUs."""

from __future__ import annotations

import json

import pytest
import torch

from rocm_moe import Placement
from rocm_moe.experts import triton_small_fp8 as stream
from tests.conftest import DEVICE, rel_err
from tests.experts.test_triton_small import _fp8_case

pytest.importorskip("triton")
from rocm_moe._gate_triton import pdl_supported  # (needs triton)

GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float16
TOL = 5e-3 if not GPU else 1e-2


def _k(form, bn, bk, warps=4, prefetch=False):
    return dict(FORM=form, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1,
                PREFETCH=prefetch)


# (gate/up, down) forms: BLOCK_K 256 / 512 span several 128-groups (H = 200: a partial one),
# 128 loops over two (with and without the next step's weights prefetched). Wide tiles for the
# interpreter (few programs); on GPUs the defaults' widths (8-32): with the interpreter's
# 128-wide tiles (per-row [8, 128, 128]) these tests took 40-173 s each on an H100
# (bench/results/tests_gpu_b13d4a4_h100.txt, its slowest durations).
N = dict(slot=16, row=8, row_row=8) if GPU else dict(slot=128, row=128, row_row=32)  # BLOCK_N
FORMS = {"slot_row": (_k("slot", N["slot"], 256), _k("row", N["row"], 128, prefetch=True)),
         "row_slot": (_k("row", N["row"], 128, prefetch=True), _k("slot", N["slot"], 256)),
         "slot_slot": (_k("slot", N["slot"], 512), _k("slot", N["slot"], 128)),
         "row_row": (_k("row", N["row_row"], 256), _k("row", N["row"], 512))}


def _cfg(form: str, act: str = "fp8") -> dict:
    gu, dn = FORMS[form]
    return dict(kind="stream", ACT=act, gate_up=gu, down=dn)


def _ids(T, K, E, W, routing, gen) -> torch.Tensor:
    """[T, K] distinct ids per token, ~15% of slots -1 (slot [0, 0] kept, the last one -1);
    all_on_one: every
    token's slot 0 on the last rank's first expert."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if routing == "all_on_one":
        first = Placement.contiguous(E, W).local_experts(W - 1)[0]
        for t in range(T):
            row = ids[t]
            row[row == first] = row[0]
            row[0] = first
    drop = torch.rand(T, K, generator=gen) < 0.15
    drop[-1, -1] = True
    drop[0, 0] = False
    ids[drop] = -1
    return ids.to(torch.int32)


def _case(T, K, E, W, H, I, routing, gen):
    return _fp8_case(T, K, E, W, H, I, routing, gen, ids_of=_ids, x_scale=3.0)


def _run(x, ids, w, fw, emap, mode, cfg, **kw):
    return stream.stream_fp8_experts(
        x.to(DEVICE) if isinstance(x, torch.Tensor) else x, ids.to(DEVICE), w.to(DEVICE),
        fw.w13.to(DEVICE), fw.w2.to(DEVICE), emap.to(DEVICE), weighted=mode == "experts",
        out_dtype=torch.float32, config=cfg, **kw)


# (T, K, E, W, H, I, routing, form): T = 1 with most experts empty (every form); 33 rows on W = 2
# (the other rank's experts skipped) with H = 200 (a partial last group); every token on one
# expert
CASES = [pytest.param(*c, id="T{}_K{}_E{}_W{}_H{}_I{}_{}_{}".format(*c)) for c in
         [(1, 8, 16, 1, 128, 128, "random", f) for f in FORMS]
         + [(33, 2, 8, 2, 200, 128, "random", f) for f in ("slot_row", "row_slot")]
         + [(5, 3, 8, 1, 256, 256, "all_on_one", "row_row")]]


@pytest.mark.parametrize(("T", "K", "E", "W", "H", "I", "routing", "form"), CASES)
def test_matches_float64_fp8_reference(T, K, E, W, H, I, routing, form, gen):
    """Both weight modes against the FP8 reference computed in float64 (the same row and
    intermediate quantisation); raw non-local and -1 slots are exact zeros."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts

    x, ids, w, fw, emap = _case(T, K, E, W, H, I, routing, gen)
    local = emap.local_ids(ids) >= 0
    assert (~local).any()  # the case has slots to skip
    for mode in ("experts", "combine"):
        want = FP8ReferenceExperts()(x.double(), ids, w, fw.w13, fw.w2, emap, weight_mode=mode,
                                     out_dtype=torch.float64).out
        out = _run(x, ids, w, fw, emap, mode, _cfg(form))
        assert out.weights_applied == (mode == "experts")
        got = out.out.cpu()
        assert got.shape == want.shape
        assert got.dtype == torch.float32
        assert rel_err(got, want) < TOL, mode
        if mode == "combine":
            assert got[~local].eq(0).all()


@pytest.mark.parametrize(("split", "form"), [(2, "slot_row"), (3, "row_slot")])
def test_split_k_matches_the_reference(split, form, gen):
    """Split-K gate/up (partials summed and SiLU'd by the down kernel as it loads them), H = 384
    in 128-wide steps: 2 splits of 256 / 128 columns, or 3 of 128; both weight modes;
    deterministic (a second call gives the same bits)."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts

    x, ids, w, fw, emap = _case(3, 4, 8, 1, 384, 128, "random", gen)
    cfg = _cfg(form)
    cfg["gate_up"] = dict(cfg["gate_up"], BLOCK_K=128, SPLIT=split)
    for mode in ("experts", "combine"):
        want = FP8ReferenceExperts()(x.double(), ids, w, fw.w13, fw.w2, emap,
                                     weight_mode=mode, out_dtype=torch.float64).out
        got = _run(x, ids, w, fw, emap, mode, cfg).out
        assert rel_err(got.cpu(), want) < TOL, mode
    assert torch.equal(got, _run(x, ids, w, fw, emap, mode, cfg).out)


@pytest.mark.parametrize(("down_form", "I"), [("row", 384), ("slot", 384), ("row", 200)])
def test_preloaded_down_steps_give_the_same_bits(down_form, I, gen, monkeypatch):
    """Down PRELOAD 1-4 (the first K steps' weights loaded before the wait for gate/up): the
    bits of PRELOAD 0, with and without PREFETCH, FP8 and bf16-style float weights, both weight
    modes, and the launch given the PRELOAD asked for; I = 384 in 128-wide steps (3: PRELOAD 4
    reaches past I, 2 leaves one step to the loop), I = 200 (a partial last step)."""
    from rocm_moe.experts import _triton_small_fp8 as kernels

    real, seen = kernels._stream_down_kernel, []

    class Spy:  # records each down launch's PRELOAD
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(kw.get("PRELOAD"))
                return real[grid](*a, **kw)
            return launch
    monkeypatch.setattr(kernels, "_stream_down_kernel", Spy())
    x, ids, w, fw, emap = _case(3, 4, 8, 2, 256, 384, "random", gen)
    w13, w2 = fw.w13.weight.to(DTYPE) * 0.01, fw.w2.weight.to(DTYPE) * 0.01  # [e, 2I, H] ...
    float_w = (torch.cat([w13[:, :I], w13[:, 384:384 + I]], 1).contiguous(),
               w2[:, :, :I].contiguous())  # (I < 384: the first I gate, up and down columns)

    def run(weights, mode, pre, prefetch):
        cfg = _cfg("slot_row")
        cfg["down"] = dict(_k(down_form, N[down_form], 128, prefetch=prefetch), PRELOAD=pre)
        if weights == "fp8":
            return _run(x, ids, w, fw, emap, mode, cfg).out
        return stream.stream_fp8_experts(
            x.to(DTYPE).to(DEVICE), ids.to(DEVICE), w.to(DEVICE),
            *(t.to(DEVICE) for t in float_w), emap.to(DEVICE),
            weighted=mode == "experts", out_dtype=torch.float32, config=cfg).out
    for weights in ("fp8", "float") if I % 128 == 0 else ("float",):  # (FP8: 128-blocks)
        for mode in ("experts", "combine"):
            want = run(weights, mode, 0, False)
            assert want.abs().sum() > 0
            for pre, prefetch in ((1, False), (2, True), (3, False), (4, False), (4, True)):
                assert torch.equal(run(weights, mode, pre, prefetch), want), \
                    (weights, mode, pre, prefetch)
                assert seen[-1] == pre


@pytest.mark.parametrize("form", ["slot_row", "row_slot"])
def test_fp8_rows_give_the_bits_of_float_rows(form, gen):
    """FP8Rows (quantised before) and float rows (quantised per 1x128 group in the gate/up
    kernel): the same output bits (H = 200: a partial group)."""
    from rocm_moe.quant import quantize_rows

    x, ids, w, fw, emap = _case(3, 2, 8, 1, 200, 128, "random", gen)
    rows = quantize_rows(x.to(DEVICE), dtype=fw.w13.dtype)
    for mode in ("experts", "combine"):
        a = _run(rows, ids, w, fw, emap, mode, _cfg(form)).out
        b = _run(x, ids, w, fw, emap, mode, _cfg(form)).out
        assert torch.equal(a, b), mode


def test_float_activations_match_the_dequantised_model(gen):
    """ACT "float" (w8a16: only the weights FP8) against the float64 oracle of the dequantised
    model, tighter than the w8a8 contract can be."""
    from rocm_moe.experts.fp8 import fp8_dense_reference

    x, ids, w, fw, emap = _case(4, 4, 8, 1, 256, 128, "random", gen)
    want = fp8_dense_reference(x, w, ids, fw.w13, fw.w2, quantize_activations=False)
    for form in ("slot_row", "row_slot"):
        got = _run(x, ids, w, fw, emap, "experts", _cfg(form, act="float")).out.cpu()
        assert rel_err(got, want) < 1e-4, form
    quantised = _run(x, ids, w, fw, emap, "experts", _cfg("slot_row")).out.cpu()
    assert rel_err(quantised, want) > 1e-3  # (the w8a8 rows' error, for comparison)


@pytest.mark.parametrize("form", ["slot_row", "row_slot"])
def test_zero_token_experts_and_nothing_local(form, gen):
    """A batch whose slots are all -1 or another rank's: zeros in both modes."""
    x, ids, w, fw, emap = _case(3, 2, 8, 2, 128, 128, "random", gen)
    ids[:] = -1
    ids[1, 0] = 0  # rank 0's expert; this is rank 1
    for mode in ("experts", "combine"):
        got = _run(x, ids, w, fw, emap, mode, _cfg(form)).out
        assert got.eq(0).all(), mode


@pytest.mark.parametrize("form", ["slot_row", "row_slot"])
def test_bounded_rows(form, gen):
    """A capacity-sized batch (num_rows on the device, grids sized by expected_rows): the rows
    below the count as the reference's; raw rows past it zeros."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts

    cap, n = 6, 4
    x, ids, w, fw, emap = _case(cap, 2, 8, 1, 128, 128, "random", gen)
    ids[n:] = -1
    num_rows = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    for mode in ("experts", "combine"):
        want = FP8ReferenceExperts()(x.double(), ids, w, fw.w13, fw.w2, emap, weight_mode=mode,
                                     out_dtype=torch.float64).out[:n]
        got = _run(x, ids, w, fw, emap, mode, _cfg(form), num_rows=num_rows,
                   expected_rows=2).out.cpu()
        assert rel_err(got[:n], want) < TOL, mode
        if mode == "combine":
            assert got[n:].eq(0).all()


def test_worked_example_and_defaults():
    cfg = stream.stream_config(8)
    assert cfg["gate_up"]["FORM"] == "slot"
    assert cfg["down"]["FORM"] == "row"
    assert stream.check_config(cfg) is cfg
    dsv3 = stream.stream_config(8, hidden=7168, inter=2048)  # TUNED: its own one-token down
    assert (dsv3["down"]["FORM"], dsv3["gate_up"]) == ("slot", cfg["gate_up"])
    assert stream.stream_config(64, hidden=7168, inter=2048) == stream.DEFAULTS["64"]


def test_environment_overrides(monkeypatch):
    """ROCM_MOE_FP8_SMALL_CONFIG: one partial config for every size, by slot buckets, or by
    shape; ROCM_MOE_FP8_SMALL_MAX_SLOTS: the auto limit."""
    monkeypatch.setenv(stream.CONFIG_ENV, json.dumps({"gate_up": {"BLOCK_N": 8}}))
    cfg = stream.stream_config(64)
    assert cfg["gate_up"]["BLOCK_N"] == 8
    assert cfg["down"] == stream.DEFAULTS["64"]["down"]
    table = {"8": {"ACT": "float"}, "64": {"down": {"FORM": "slot"}}}
    monkeypatch.setenv(stream.CONFIG_ENV, json.dumps(table))
    assert stream.stream_config(8)["ACT"] == "float"
    assert stream.stream_config(9)["down"]["FORM"] == "slot"
    assert stream.stream_config(10**4)["ACT"] == "fp8"  # (the largest bucket's)
    by_shape = {"2048x768": {"8": {"down": {"BLOCK_N": 4}}}, "7168x2048": {"gate_up": {"SPLIT": 2}}}
    monkeypatch.setenv(stream.CONFIG_ENV, json.dumps(by_shape))
    assert stream.stream_config(8, hidden=2048, inter=768)["down"]["BLOCK_N"] == 4
    assert stream.stream_config(8, hidden=7168, inter=2048)["gate_up"]["SPLIT"] == 2
    assert stream.stream_config(8, hidden=64, inter=128) == stream.DEFAULTS["8"]  # another
    monkeypatch.setenv(stream.CONFIG_ENV, json.dumps({"PDL": True}))
    assert stream.stream_config(8) == dict(stream.DEFAULTS["8"], PDL=True)
    monkeypatch.setenv(stream.MAX_SLOTS_ENV, "16")
    assert stream.max_slots() == 16
    monkeypatch.delenv(stream.MAX_SLOTS_ENV)
    assert stream.max_slots() == stream.FP8_SMALL_MAX_SLOTS


@pytest.mark.parametrize(("env", "match"), [
    ("{", "must be JSON"), ("[1]", "must be a JSON object"),
    ('{"gate_up": {"BLOCK_K": 64}}', r"gate_up\.BLOCK_K"),
    ('{"down": {"BLOCK_N": 48}}', r"down\.BLOCK_N"),
    ('{"down": {"FORM": "expert"}}', r"down\.FORM"), ('{"ACT": "fp4"}', "ACT"),
    ('{"8": {"gate_up": {"num_warps": 3}}}', "num_warps"),
    ('{"down": {"PREFETCH": 1}}', r"down\.PREFETCH"),
    ('{"down": {"PRELOAD": 5}}', r"down\.PRELOAD"), ('{"down": {"PRELOAD": true}}', "PRELOAD"),
    ('{"gate_up": {"PRELOAD": 1}}', r"gate_up\.PRELOAD"),
    ('{"gate_up": {"SPLIT": 0}}', r"gate_up\.SPLIT"), ('{"down": {"SPLIT": 2}}', r"down\.SPLIT"),
    ('{"PDL": 1}', r"config\.PDL"), ('{"pdl": true}', r"config\.pdl=True: is not a key"),
    ('{"down": {"PDL": true}}', r"config\.down\.PDL=True: is not a key"),
    ('{"8": 5}', "must hold configs as JSON objects"),
    ('{"gate_up": 5}', r"CONFIG\.gate_up=5: must be a JSON object")])
def test_bad_config_refused(monkeypatch, env, match):
    monkeypatch.setenv(stream.CONFIG_ENV, env)
    with pytest.raises(ValueError, match=match):
        stream.stream_config(8)
    with pytest.raises(ValueError, match=match):
        stream.check_env_config()


def test_check_env_config_reads_every_entry(monkeypatch):
    """``check_env_config`` (rocm-moe info) checks each shape's and each slot count's entry,
    also those ``stream_config`` of one batch would not pick."""
    monkeypatch.setenv(stream.CONFIG_ENV, json.dumps(
        {"2048x768": {"8": {"down": {"BLOCK_N": 8}}, "512": {"down": {"BLOCK_K": 3}}}}))
    assert stream.stream_config(8, hidden=2048, inter=768)["down"]["BLOCK_N"] == 8
    with pytest.raises(ValueError, match=r"down\.BLOCK_K=3"):
        stream.check_env_config()
    monkeypatch.setenv(stream.CONFIG_ENV, json.dumps({"64": {"ACT": "float"}}))
    stream.check_env_config()


def test_bad_max_slots_refused(monkeypatch):
    monkeypatch.setenv(stream.MAX_SLOTS_ENV, "-1")
    with pytest.raises(ValueError, match=stream.MAX_SLOTS_ENV):
        stream.max_slots()


def test_auto_takes_the_stream_path_by_size(monkeypatch, gen):
    """TritonFP8Experts(path="auto") runs the streaming kernels up to small_max_slots slots
    (float rows unquantised: no quantise launch) and the grouped path above."""
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts

    assert TritonFP8Experts().small_max_slots == stream.max_slots()
    calls = []
    real = stream.stream_fp8_experts
    monkeypatch.setattr(stream, "stream_fp8_experts",
                        lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    x, ids, w, fw, emap = _case(3, 2, 8, 1, 128, 128, "random", gen)
    args = [t.to(DEVICE) for t in (x, ids, w)] + [fw.w13.to(DEVICE), fw.w2.to(DEVICE),
                                                  emap.to(DEVICE)]
    experts = TritonFP8Experts(small_max_slots=6)
    assert experts.quantizes_rows(3, 2, None, None)
    experts(*args, weight_mode="experts")
    assert calls == [(3, 2)]
    TritonFP8Experts(small_max_slots=5)(*args, weight_mode="experts")
    assert calls == [(3, 2)]  # 6 slots > 5: grouped


# ---- GPU only -----------------------------------------------------------------------------

@pytest.mark.skipif(not GPU, reason="needs a GPU (compiled kernels, graphs)")
@pytest.mark.parametrize("T", [1, 8, 33])
def test_gpu_qwen3_shape_every_form_and_graph_replay(T, gen):
    """Qwen3-30B-A3B's experts in block-FP8 (E=128, H=2048, I=768, K=8, -1 slots): the default
    config, split-K, prefetch, down preload and the row / slot forms agree with the FP8
    reference in both weight modes; a CUDA-graph replay gives the eager call's bits."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts

    E, H, I, K = 128, 2048, 768, 8
    x, ids, w, fw, emap = _case(T, K, E, 1, H, I, "random", gen)
    default = stream.stream_config(T * K)
    cfgs = [default, dict(default, gate_up=dict(default["gate_up"], SPLIT=2, PREFETCH=True)),
            dict(default, gate_up=_k("row", 16, 128, 8), down=_k("slot", 32, 256, 4)),
            dict(default, down=dict(default["down"], PRELOAD=3))]
    args = [t.to(DEVICE) for t in (x, ids, w)] + [fw.w13.to(DEVICE), fw.w2.to(DEVICE),
                                                  emap.to(DEVICE)]
    for mode in ("experts", "combine"):
        want = FP8ReferenceExperts()(*args, weight_mode=mode, out_dtype=torch.float32).out
        outs = []
        for cfg in cfgs:
            got = stream.stream_fp8_experts(*args, weighted=mode == "experts",
                                            out_dtype=torch.bfloat16, config=cfg).out
            assert rel_err(got, want) < 1e-2, (mode, cfg)
            outs.append(got)
        assert torch.equal(outs[-1], outs[0]), mode  # (PRELOAD: the default's bits)

    def call():
        return stream.stream_fp8_experts(*args, weighted=True, out_dtype=torch.bfloat16).out

    eager = call().clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.skipif(not GPU or not pdl_supported(DEVICE),
                    reason="needs an NVIDIA GPU of compute capability 9.0+ (programmatic "
                           "dependent launch)")
def test_gpu_pdl_launches_give_the_same_bits(gen):
    """PDL (the down kernel a programmatic dependent of the gate/up kernel, which is one of
    whatever ran before it): the bits of the plain launches in every form, both weight modes,
    W = 1 and a rank of 4 (a token without a local slot; capacity-sized rows), eager and in a
    CUDA graph of back-to-back calls on other routings, behind the gate + router launched
    with PDL too (as a decode layer runs them)."""
    from rocm_moe._gate_triton import gate_route, plan_from_spec
    from rocm_moe.routing import RouterConfig

    # T = 8 passed as well (bench/results/tests_gpu_79f34e3_h100.txt), 78 s of compiles
    T, E, H, I, K = 1, 128, 2048, 768, 8
    cases = [_case(T, K, E, 1, H, I, "random", gen) for _ in range(3)]
    fw, emap = cases[0][3], cases[0][4]
    w13, w2, em = fw.w13.to(DEVICE), fw.w2.to(DEVICE), emap.to(DEVICE)
    # EP: the last of 4 ranks (32 local experts, other ranks' slots and -1 skipped), a token
    # with no local slot (no down program reaches the loop's wait), capacity-sized rows
    x4, ids4, w4, fw4, emap4 = _case(6, K, E, 4, H, I, "random", gen)
    ep = [(x4[:1], ids4[:1], w4[:1], None),
          (x4[:1], torch.randperm(E // 4, generator=gen)[:K].view(1, K).to(torch.int32),
           w4[:1], None),
          (x4, torch.where(torch.arange(6)[:, None] < 4, ids4, -1), w4,
           torch.tensor([4], dtype=torch.int32, device=DEVICE))]
    default = stream.stream_config(T * K)
    cfgs = [default, dict(default, gate_up=dict(default["gate_up"], SPLIT=2, PREFETCH=True)),
            dict(default, gate_up=_k("row", 16, 128, 8), down=_k("slot", 32, 256, 4)),
            dict(default, down=dict(default["down"], PRELOAD=3))]
    runs = [(x, ids, w, None, (w13, w2, em)) for x, ids, w, _, _ in cases] + \
        [(x, ids, w, n, (fw4.w13.to(DEVICE), fw4.w2.to(DEVICE), emap4.to(DEVICE)))
         for x, ids, w, n in ep]
    for mode in ("experts", "combine"):
        for cfg in cfgs:
            for x, ids, w, n, experts in runs:
                args = (x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), *experts)
                bound = {} if n is None else dict(num_rows=n, expected_rows=2)
                plain, pdl = (stream.stream_fp8_experts(
                    *args, weighted=mode == "experts", out_dtype=torch.bfloat16, config=c,
                    **bound).out for c in (dict(cfg, PDL=False), dict(cfg, PDL=True)))
                rows = slice(None) if n is None else slice(0, 4)  # (rows past num_rows: unset)
                assert torch.equal(plain[rows], pdl[rows]), (mode, cfg, n)
    # a decode step's chain: gate GEMM -> router -> gate/up -> down, all PDL, in one graph
    gate = torch.randn(E, H, generator=gen).to(torch.bfloat16).to(DEVICE)
    router = RouterConfig(num_experts=E, top_k=K, scoring="softmax", norm_topk_prob=True)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    plans = {pdl: plan_from_spec("pdl" if pdl else "auto", T, E, H, ieee_fp32=False, sms=sms,
                                 amd=False) for pdl in (False, True)}
    xs = [c[0].to(torch.bfloat16).to(DEVICE) for c in cases]

    def step(x, pdl):
        r, _ = gate_route(x_TH=x, weight_EH=gate, config=router, plan=plans[pdl])
        return stream.stream_fp8_experts(x, r.topk_ids, r.topk_weights, w13, w2, em,
                                         weighted=True, out_dtype=torch.bfloat16,
                                         config=dict(default, PDL=pdl)).out
    eager = [step(x, False).clone() for x in xs]
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = [step(x, True) for x in xs]
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager, strict=True):
        assert torch.equal(got, want)
