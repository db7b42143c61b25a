"""MoriFP8Dispatcher: FP8 rows through MORI's FP8 types, on spawned gloo ranks (W = 1, 2, 3)
driving the fake ``mori`` (tests/fakes.py), which enforces MORI's FP8 contract (scale_dim /
scale_type_size, the build's one FP8 encoding, scales moved with their rows).

The strongest checks: the rows and scales MORI delivers are, byte for byte, those the torch-fp8
backend delivers for the same batch; and an FP8EPMoE over it equals, bit for bit, the same layer
over the bf16 MORI dispatcher whose experts quantise on arrival (reference and AITER experts),
both checked against the float64 oracles.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rocm_moe import ExpertsOutput, Placement, RouterConfig, synthetic
from rocm_moe.comm.mori import MoriDispatcher, heap_bytes, mori_config
from rocm_moe.comm.mori_fp8 import MoriFP8Dispatcher, mori_row_bytes
from rocm_moe.comm.torch_fp8 import TorchFP8Dispatcher
from rocm_moe.distributed import launch
from rocm_moe.experts.aiter_fp8 import AiterFP8Experts
from rocm_moe.experts.fp8 import FP8ReferenceExperts, fp8_dense_reference
from rocm_moe.layer_fp8 import FP8_TOLERANCE, FP8EPMoE
from rocm_moe.quant import FP8Rows, quantize_rows, quantize_weight_blocks
from tests.conftest import rel_err
from tests.dist_checks import collect_checks, run_checks
from tests.fakes import (
    ContractError,
    FakeFusedMoe,
    FakeMori,
    FakeQuantType,
    KernelType,
    _op_bytes,
    fake_mori_op,
    fake_shuffle_weight,
)

E, K, H, I, CAP = 12, 3, 384, 128, 40  # H/128 = 3 scales per row
FNUZ, FN = torch.float8_e4m3fnuz, torch.float8_e4m3fn
ARCH_FP8 = {"gfx942": FNUZ, "gfx950": FN}
AITER_TOL = 1e-2  # against the float64 oracle of AITER's arithmetic (bf16 output)
# Float32 reference experts against the same arithmetic in float64: the two can round an
# intermediate value to neighbouring FP8 codes when it sits on a rounding boundary, which moves
# a rank's output by up to ~1.4e-4 (1 of 80 random draws; typically 3e-7). The exact check is
# the bit equality with the bf16-MORI layer.
FP8_ORACLE_TOL = 1e-3


# ---- pure logic ---------------------------------------------------------------------------------
def test_config_carries_the_fp8_fields():
    cfg = mori_config(Placement.contiguous(256, 8), 5, hidden_size=7168, top_k=8,
                      dtype=torch.bfloat16, max_tokens_per_rank=4096, fp8_dtype=FNUZ)
    assert (cfg["data_type"], cfg["scale_dim"], cfg["scale_type_size"]) == (FNUZ, 56, 4)
    assert (cfg["hidden_dim"], cfg["max_token_type_size"]) == (7168, 2)  # combine: bf16


@pytest.mark.parametrize(("W", "kernel_type", "gpn"),
                         [(8, "auto", None), (16, "auto", 8), (16, "InterNodeV1LL", 8),
                          (8, "AsyncLL", None), (8, "InterNode", None)],
                         ids=["intra_EP8", "v1_EP16", "v1ll_EP16", "asyncll_EP8", "inter_EP8"])
def test_heap_bytes_with_scales_match_the_fake(W, kernel_type, gpn):
    from types import SimpleNamespace

    def cfg(fp8):
        return mori_config(Placement.contiguous(32 * W, W), 0, hidden_size=7168, top_k=8,
                           dtype=torch.bfloat16, max_tokens_per_rank=4096,
                           kernel_type=kernel_type, gpu_per_node=gpn, fp8_dtype=fp8)

    c = cfg(FNUZ)
    fake = SimpleNamespace(**{**c, "kernel_type": getattr(KernelType, c["kernel_type"])})
    assert heap_bytes(c) == _op_bytes(fake)
    # two scale buffers of W * T * 56 * 4 bytes, plus 224 bytes in every staging slot
    assert heap_bytes(c) - heap_bytes(cfg(None)) >= 2 * W * 4096 * 56 * 4


def test_row_bytes():
    bf16, fp8 = mori_row_bytes(7168, 8, fp8=False), mori_row_bytes(7168, 8, fp8=True)
    assert (bf16, fp8) == (14404, 7460)
    assert bf16 / fp8 > 1.9


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(hidden_size=200), ValueError, r"hidden_size=200: must be a multiple of 128"),
        (dict(dtype=torch.float16), ValueError, r"dtype=torch.float16: .*no MORI kernel"),
        (dict(dtype=FNUZ), ValueError, r"dtype=torch.float8_e4m3fnuz"),
        (dict(fp8_dtype=torch.float8_e5m2), ValueError, r"fp8_dtype=torch.float8_e5m2: MORI"),
        (dict(fp8_dtype="e5m2"), ValueError, r"fp8_dtype='e5m2'"),
    ],
    ids=["H200", "fp16", "fp8_layer_dtype", "e5m2", "e5m2_name"],
)
def test_refused_before_any_collective(kw, exc, match):
    """Refused without a process group (so before join_group, the hosts' all-gather and MORI)."""
    mori = FakeMori()
    args = dict(hidden_size=H, top_k=K, dtype=torch.bfloat16, max_tokens_per_rank=CAP,
                fp8_dtype=FNUZ, mori=mori)
    with pytest.raises(exc, match=match):
        MoriFP8Dispatcher(Placement.contiguous(E, 2), **{**args, **kw})
    assert mori.built == 0


def test_mori_config_refuses_fp8_it_cannot_carry():
    p = Placement.contiguous(E, 2)
    kw = dict(top_k=K, dtype=torch.bfloat16, max_tokens_per_rank=CAP)
    with pytest.raises(ValueError, match="multiple of 128"):
        mori_config(p, 0, hidden_size=200, fp8_dtype=FNUZ, **kw)
    with pytest.raises(ValueError, match="fp8_ocp / fp8_fnuz"):
        mori_config(p, 0, hidden_size=H, fp8_dtype=torch.float8_e5m2, **kw)


def test_the_cli_fp8_form_of_mori():
    """``rocm-moe run --comm mori --fp8-dispatch`` builds the mori backend's dispatcher with
    ``fp8_dtype`` and the CLI's arguments (cli/spec.py); it runs as "mori-fp8"."""
    import inspect

    from rocm_moe import backends
    from rocm_moe.cli.spec import FP8_COMM

    found = backends.BACKENDS["comm:mori"].load()
    assert found is MoriDispatcher
    assert FP8_COMM["mori"] == MoriFP8Dispatcher.name == "mori-fp8"
    inspect.signature(found).bind(Placement.contiguous(E, 2), fp8_dtype=FNUZ, hidden_size=H,
                                  top_k=K, dtype=torch.bfloat16, max_tokens_per_rank=CAP)


# ---- multi-rank, through the fakes --------------------------------------------------------------
def _disp(info, arch, cls=MoriFP8Dispatcher, dtype=torch.bfloat16, **kw):
    """W = 3 runs as three one-GPU nodes (MORI needs a power-of-two gpu_per_node dividing W):
    the InterNodeV1 kernel, whose combine reads the ids it is given."""
    p = Placement.contiguous(E, info.world_size)
    if info.world_size == 3:
        kw.setdefault("gpu_per_node", 1)
    if cls is not MoriDispatcher:
        kw.setdefault("fp8_dtype", ARCH_FP8[arch])
    kw.setdefault("mori", FakeMori(arch=arch))
    return cls(p, hidden_size=H, top_k=K, dtype=dtype, max_tokens_per_rank=CAP, **kw)


def _batch(rank, T, seed, *, only_rank0=False, empty=0.2):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    experts = E // 3 if only_rank0 else E  # W <= 3: experts < E/3 belong to rank 0
    ids = torch.stack([torch.randperm(experts, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    if T:
        ids[torch.rand(T, K, generator=g) < empty] = -1
    x = (torch.randn(T, H, generator=g) * torch.rand(1, H, generator=g) * 4).bfloat16()
    return x, torch.rand(T, K, generator=g), ids


def _batches(info):
    """(T, only_rank0): odd sizes, a rank with no tokens in each batch, ranks receiving none."""
    r = info.rank
    return [((33, 1, 0)[r % 3], False), ((1, 0, 33)[r % 3], False), ((0, 33, 1)[r % 3], False),
            ((5, 3, 7)[r % 3], True)]


def _signature(rows: FP8Rows, ids, w) -> list[bytes]:
    """Each received row as bytes (ids, weights, scales, FP8 values), sorted: arrival order
    differs between backends (MORI's is arbitrary), the set must not."""
    parts = [ids.to(torch.int32).contiguous().view(torch.uint8),
             w.contiguous().view(torch.uint8), rows.scale.contiguous().view(torch.uint8),
             rows.q.contiguous().view(torch.uint8)]
    return sorted(bytes(row.tolist()) for row in torch.cat(parts, dim=1))


def _check_rows_and_scales_equal_torch_fp8(info, arch, seed):
    mori = _disp(info, arch)
    torch_fp8 = TorchFP8Dispatcher(Placement.contiguous(E, info.world_size), hidden_size=H,
                                   top_k=K, dtype=torch.bfloat16, fp8_dtype=ARCH_FP8[arch],
                                   group=dist.group.WORLD)
    received = []
    for i, (T, only_rank0) in enumerate(_batches(info)):
        x, w, ids = _batch(info.rank, T, seed + i, only_rank0=only_rank0)
        dm, dt = mori.dispatch(x, w, ids), torch_fp8.dispatch(x, w, ids)
        assert isinstance(dm.x, FP8Rows)
        assert dm.x.dtype == ARCH_FP8[arch]
        assert dm.x.source_dtype == torch.bfloat16
        assert _signature(dm.x, dm.topk_ids, dm.topk_weights) == \
            _signature(dt.x, dt.topk_ids, dt.topk_weights), f"batch {i}"
        if dm.x.shape[0]:  # views of MORI's persistent buffers, not copies
            assert dm.x.q.data_ptr() == mori.op._x.data_ptr()
            assert dm.x.scale.data_ptr() == mori.op._s.data_ptr()
        # combine stays bf16: the identity round trip sums one partial per unique owner
        y_R = dm.x.dequantize(torch.bfloat16)
        U = torch.tensor([mori.placement.owner(r[r >= 0]).unique().numel() for r in ids])
        y = mori.combine(ExpertsOutput(out=y_R, weights_applied=True), dm.handle)
        want = (quantize_rows(x, dtype=ARCH_FP8[arch]).dequantize(torch.bfloat16).float()
                * U[:, None]).bfloat16()
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, want), f"batch {i}"
        torch_fp8.combine(ExpertsOutput(out=dt.x.dequantize(torch.bfloat16),
                                        weights_applied=True), dt.handle)
        received.append(dm.x.shape[0])
    assert mori.op.calls.count("dispatch") == len(received)
    return received


def _check_every_kernel_type_moves_the_scales(info, arch, seed):
    """AsyncLL (split-phase), InterNodeV1LL and InterNode carry the scales too (MORI copies them
    in every kernel family: low_latency_async.cpp, internode_v1.cpp, internode.hpp)."""
    torch_fp8 = TorchFP8Dispatcher(Placement.contiguous(E, info.world_size), hidden_size=H,
                                   top_k=K, dtype=torch.bfloat16, fp8_dtype=ARCH_FP8[arch],
                                   group=dist.group.WORLD)
    W = info.world_size
    for i, kt in enumerate(("AsyncLL", "InterNodeV1LL", "InterNode")):
        if kt == "InterNode" and W & (W - 1):
            continue  # it puts rank r on node r // 8 (issue 32 item 5): one node of W ranks only
        d = _disp(info, arch, kernel_type=kt, gpu_per_node=W if kt == "InterNode" else 1)
        x, w, ids = _batch(info.rank, (9, 1, 0)[(info.rank + i) % 3], seed + i)
        dm, dt = d.dispatch(x, w, ids), torch_fp8.dispatch(x, w, ids)
        assert _signature(dm.x, dm.topk_ids, dm.topk_weights) == \
            _signature(dt.x, dt.topk_ids, dt.topk_weights), kt
        d.combine(ExpertsOutput(out=dm.x.dequantize(torch.bfloat16), weights_applied=True),
                  dm.handle)
        torch_fp8.combine(ExpertsOutput(out=dt.x.dequantize(torch.bfloat16),
                                        weights_applied=True), dt.handle)
        assert ("dispatch_recv" in d.op.calls) == (kt == "AsyncLL")


def _aiter(fp8):
    fake = FakeFusedMoe(fp8_dtype=fp8, asm_stage1=lambda M: M % 2 == 1)  # both stage-1 paths
    return AiterFP8Experts(fused_moe=fake, shuffle_weight=fake_shuffle_weight, fp8_dtype=fp8,
                           quant_type=FakeQuantType.per_1x128, stage1_probe=fake.stage1_is_asm)


def _layer(disp, experts, fp8, dtype, seed):
    layer = FP8EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                     dispatcher=disp, experts=experts, fp8_dtype=fp8, dtype=dtype)
    layer.reset_parameters(seed)
    return layer


def _global_fp8_weights(seed, fp8, dtype):
    """Every expert's weights as FP8EPMoE quantises them (in the layer dtype first)."""
    ws = [synthetic.expert_weights(seed, g, H, I) for g in range(E)]
    return (quantize_weight_blocks(torch.stack([a for a, _ in ws]).to(dtype), dtype=fp8),
            quantize_weight_blocks(torch.stack([b for _, b in ws]).to(dtype), dtype=fp8))


def _aiter_oracle(x, w_TK, ids_TK, w13, w2):
    """Float64 oracle of AITER's per_1x128 arithmetic over all E experts: rows quantised per
    1x128, dequantised GEMMs, the intermediate rounded to bf16 then requantised."""
    fp8 = w13.dtype
    a = quantize_rows(x, dtype=fp8).dequantize()
    y = torch.zeros(x.shape, dtype=torch.float64)
    for g in ids_TK[ids_TK >= 0].unique().tolist():
        t, k = torch.where(ids_TK == g)
        gate, up = (a[t] @ w13[g].dequantize().T).chunk(2, dim=-1)
        h = quantize_rows((torch.nn.functional.silu(gate) * up).bfloat16(), dtype=fp8)
        y.index_add_(0, t, (h.dequantize() @ w2[g].dequantize().T) * w_TK[t, k, None].double())
    return y


def _end_to_end(info, arch, seed, experts, dtype):
    """FP8EPMoE over mori-fp8 == over bf16 mori (experts quantising on arrival), both modes,
    and the float64 oracles; {mode: errors}. Every collective runs before any assertion (a rank
    failing half-way would leave its peers' collectives unpaired)."""
    fp8 = ARCH_FP8[arch]
    name = "e4m3fnuz" if fp8 == FNUZ else "e4m3fn"
    T = (33, 0, 1)[info.rank % 3]  # rank 1 has no tokens
    x = (torch.randn(T, H, generator=torch.Generator().manual_seed(seed + info.rank)) * 2
         ).to(dtype)
    fp8_layer = _layer(_disp(info, arch, dtype=dtype), experts(fp8), name, dtype, 3)
    plain = _layer(_disp(info, arch, cls=MoriDispatcher, dtype=dtype), experts(fp8), name,
                   dtype, 3)
    w13, w2 = _global_fp8_weights(3, fp8, dtype)
    out, ys = {}, {}
    for mode in ("experts", "combine"):
        fp8_layer.weight_mode = plain.weight_mode = mode
        ys[mode] = fp8_layer(x), plain(x)
        world = [None] * info.world_size  # the model error over every rank's tokens (below)
        r = fp8_layer.route_tokens(x)
        model = fp8_dense_reference(x, r.topk_weights, r.topk_ids, w13, w2,
                                    quantize_activations=False)
        dist.all_gather_object(world, (ys[mode][0].double(), model))
        y = ys[mode][0]
        # against the dequantised model: over every rank's tokens (one token's error exceeds
        # FP8_TOLERANCE for ~1% of random draws, mean 4.4%; 34 tokens' does not)
        errs = {"model": rel_err(torch.cat([a for a, _ in world]),
                                 torch.cat([b for _, b in world]))}
        if isinstance(fp8_layer.experts, AiterFP8Experts):
            errs["aiter_oracle"] = rel_err(y, _aiter_oracle(x, r.topk_weights, r.topk_ids,
                                                           w13, w2))
        else:
            errs["fp8_oracle"] = rel_err(y, fp8_dense_reference(x, r.topk_weights,
                                                                r.topk_ids, w13, w2))
        out[mode] = errs
    for mode, (y, y_plain) in ys.items():
        errs = out[mode]
        assert y.dtype == dtype
        assert torch.equal(y, y_plain), (mode, rel_err(y, y_plain))
        assert errs.get("aiter_oracle", 0) < AITER_TOL, (mode, errs)
        assert errs.get("fp8_oracle", 0) < FP8_ORACLE_TOL, (mode, errs)
        assert errs["model"] < FP8_TOLERANCE, (mode, errs)
    return out


def _check_layer_reference_experts(info, arch, seed):
    return _end_to_end(info, arch, seed, lambda fp8: FP8ReferenceExperts(), torch.float32)


def _check_layer_aiter_fp8_experts(info, arch, seed):
    return _end_to_end(info, arch, seed, _aiter, torch.bfloat16)


def _check_capacity_sized_reads_nothing_on_the_host(info, arch, seed):
    """capacity_sized: FP8Rows over MORI's whole receive buffers, the row count left on the
    device (the fake's counter raises on a host read); an FP8EPMoE on it (validate=False)
    equals the default dispatch's, bit for bit."""
    fp8 = ARCH_FP8[arch]
    name = "e4m3fnuz" if fp8 == FNUZ else "e4m3fn"
    strict = _disp(info, arch, dtype=torch.float32, capacity_sized=True,
                   mori=FakeMori(arch=arch, no_host_reads=True))
    plain = _disp(info, arch, dtype=torch.float32)
    layers = [FP8EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                       dispatcher=d, fp8_dtype=name, dtype=torch.float32, validate=False)
              for d in (strict, plain)]
    for layer in layers:
        layer.reset_parameters(3)
    x, w, ids = _batch(info.rank, 7, seed)
    shapes = []
    for disp in (strict, plain):  # both ops see the same batches: the fake orders rows alike
        d = disp.dispatch(x.float(), w, ids, validate=False)
        shapes.append((type(d.x), d.x.shape[0], d.num_valid is None))
        disp.combine(ExpertsOutput(out=d.x.dequantize(torch.float32), weights_applied=True),
                     d.handle)
    outs = []  # every collective first, the assertions after
    for i, T in enumerate((17, 0 if info.rank else 5, CAP)):
        x = synthetic.tokens(seed + i, info.rank, T, H)
        for mode in ("experts", "combine"):
            for layer in layers:
                layer.weight_mode = mode
            outs.append((T, mode, *(layer(x) for layer in layers)))
    assert shapes[0] == (FP8Rows, info.world_size * CAP, False), shapes
    for T, mode, a, b in outs:
        assert torch.equal(a, b), (T, mode, rel_err(a, b))


def _check_bad_batches_refused_before_mori(info, arch, seed):
    d = _disp(info, arch)
    msgs = {}
    for name, x in (("fp16", torch.zeros(3, H, dtype=torch.float16)),
                    ("already_fp8", torch.zeros(3, H).to(ARCH_FP8[arch])),
                    ("over_capacity", torch.zeros(CAP + 1, H, dtype=torch.bfloat16))):
        _, w, ids = _batch(info.rank, x.shape[0], seed, empty=0.0)
        try:
            d.dispatch(x, w, ids)
        except (ValueError, TypeError) as exc:
            msgs[name] = str(exc)
    assert set(msgs) == {"fp16", "already_fp8", "over_capacity"}, msgs
    assert d.op.calls == [], "refused before MORI ran"
    return msgs


def _check_fake_enforces_the_fp8_contract(info, arch, seed):
    """Wrong calls fail in the fake as they would misbehave in MORI (module docstring)."""
    fp8 = ARCH_FP8[arch]
    p = Placement.contiguous(E, info.world_size)
    kw = dict(hidden_size=H, top_k=K, dtype=torch.bfloat16, max_tokens_per_rank=CAP)
    cfg = mori_config(p, info.rank, fp8_dtype=fp8, gpu_per_node=1, **kw)
    x, w, ids = _batch(info.rank, 5, seed, empty=0.0)
    rows = quantize_rows(x, dtype=fp8)
    ids = ids.int()
    errors = {}
    cases = {
        "scales_with_scale_dim_0": (mori_config(p, info.rank, gpu_per_node=1, **kw),
                                    rows.scale),
        "scale_type_size_1": ({**cfg, "scale_type_size": 1}, rows.scale),
        "transposed_scales": (cfg, rows.scale.t().contiguous()),
        "strided_scales": (cfg, torch.zeros(5, 6)[:, ::2]),
        "float64_scales": (cfg, rows.scale.double()),
    }
    for name, (c, scales) in cases.items():
        op = fake_mori_op(c, arch=arch)
        try:
            op.dispatch(rows.q, w, scales, ids)
        except ContractError as exc:
            errors[name] = str(exc)
    other = FN if fp8 == FNUZ else FNUZ  # the encoding this build has no kernel for
    try:
        fake_mori_op(cfg, arch=arch).dispatch(rows.q.view(other), w, rows.scale, ids)
    except RuntimeError as exc:
        errors["other_encoding"] = str(exc)
    assert set(errors) == {*cases, "other_encoding"}, errors
    op = fake_mori_op(cfg, arch=arch)  # the right call: scales come back with their rows
    _, _, out_s, _, _ = op.dispatch(rows.q, w, rows.scale, ids)
    assert out_s.dtype == torch.float32
    assert out_s.shape[1] == H // 128
    return errors


def _check_ranks_disagreeing_on_the_encoding_refused(info, arch, seed):
    if info.world_size == 1:
        return "needs 2 ranks"
    mori = FakeMori(arch=arch)
    try:
        MoriFP8Dispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                          dtype=torch.bfloat16, max_tokens_per_rank=CAP, mori=mori,
                          fp8_dtype=FNUZ if info.rank == 0 else FN, gpu_per_node=1)
    except ValueError as exc:
        assert mori.built == 0
        return str(exc)
    raise AssertionError("ranks with different FP8 encodings were accepted")


CHECKS = collect_checks(globals())


def _suite(info, arch, seed):
    return run_checks({n: (lambda i, s, f=f: f(i, arch, s)) for n, f in CHECKS.items()},
                      info, seed)


@pytest.fixture(scope="module", params=[(1, "gfx950"), (2, "gfx942"), (3, "gfx942")],
                ids=lambda p: f"gloo-W{p[0]}-{p[1]}")
def suite(request):
    W, arch = request.param
    seed = int(torch.randint(0, 2**20, (1,)))
    return seed, launch(W, _suite, arch, seed, backend="gloo", timeout_s=120)


@pytest.mark.parametrize("check", list(CHECKS))
def test_mori_fp8(suite, check):
    seed, results = suite
    for rank, res in enumerate(results):
        assert res[check]["ok"], f"rank={rank} seed={seed}\n{res[check]['value']}"


def test_messages(suite):
    _, results = suite
    for res in results:
        bad = res["bad_batches_refused_before_mori"]["value"]
        assert "x.dtype=torch.float16" in bad["fp16"]
        assert "mori#356" in bad["over_capacity"]
        fake = res["fake_enforces_the_fp8_contract"]["value"]
        assert "scale_dim=0" in fake["scales_with_scale_dim_0"]
        assert "raw bytes per token" in fake["scale_type_size_1"]
        assert "hipModuleGetFunction" in fake["other_encoding"]
        enc = res["ranks_disagreeing_on_the_encoding_refused"]["value"]
        assert enc == "needs 2 ranks" or "fp8_dtype by rank" in enc
    received = [res["rows_and_scales_equal_torch_fp8"]["value"] for res in results]
    assert sum(map(sum, received)) > 0
    if len(results) > 1:  # the batch routed to rank 0 only: the other ranks received nothing
        assert all(r[3] == 0 for r in received[1:])
        assert received[0][3] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 33, 511])
@pytest.mark.parametrize("hidden", [384, 7168])
def test_owner_quantiser_on_the_gpu_is_the_torch_one(T, hidden):
    """The GPU path of the owner-side quantisation (one Triton launch) gives the bytes the
    CPU path gives, in the device's encoding (e4m3fn on NVIDIA, e4m3fnuz on MI300)."""
    from rocm_moe.comm.mori_fp8 import quantize_on_owner
    from rocm_moe.quant import native_fp8_dtype

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    fp8 = native_fp8_dtype("cuda")
    g = torch.Generator().manual_seed(T * hidden)
    x = (torch.randn(T, hidden, generator=g) * torch.rand(1, hidden, generator=g) * 8).bfloat16()
    x[0, :128] = 0  # an all-zero group
    got = quantize_on_owner(x.cuda(), fp8)
    want = quantize_rows(x, dtype=fp8)
    assert got.q.is_cuda
    assert torch.equal(got.q.cpu().view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale.cpu(), want.scale)


@pytest.mark.gpu
def test_real_mori_fp8_round_trip():
    """On an MI300 / MI350 with MORI (one process, W = 1): rows and scales back from MORI's
    buffers equal what went in (``rocm-moe sanity`` covers W > 1)."""
    pytest.importorskip("mori")
    if torch.version.hip is None or not torch.cuda.is_available():
        pytest.skip("needs ROCm and MORI")
    from rocm_moe.distributed import launch as _launch

    _launch(1, _real_round_trip, backend="nccl", timeout_s=120)


def _real_round_trip(info):
    d = MoriFP8Dispatcher(Placement.contiguous(8, 1), hidden_size=7168, top_k=8,
                          dtype=torch.bfloat16, max_tokens_per_rank=64)
    x = torch.randn(33, 7168, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(8)[:8] for _ in range(33)]).cuda()
    w = torch.rand(33, 8, device="cuda")
    res = d.dispatch(x, w, ids)
    want = quantize_rows(x.cpu(), dtype=d.fp8_dtype)
    got = _signature(FP8Rows(res.x.q.cpu(), res.x.scale.cpu()), res.topk_ids.cpu(),
                     res.topk_weights.cpu())
    assert got == _signature(want, ids.cpu(), w.cpu())
    d.combine(ExpertsOutput(out=res.x.dequantize(torch.bfloat16), weights_applied=True),
              res.handle)
