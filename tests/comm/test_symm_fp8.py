"""SymmFP8Dispatcher: FP8 rows on the symm backend's device-initiated transport.

On NCCL ranks (W = 2, 4; GPUs with peer access): the received FP8 bytes, scales, ids and
weights are bit-equal to the torch-fp8 backend's for the same batch (odd T, a rank with no
tokens, H with a partial 128-group, DeepSeek-V3's row), x is a zero-copy view of the symmetric
receive section, combine equals torch-fp8's bit for bit, the wire row is >= 1.8x smaller than
bf16's; FP8EPMoE with TritonFP8Experts over it, both weight modes and combine_raw, against the
float64 oracle of the dequantised model, captured in CUDA graphs (replay == eager, bit for
bit). On CPUs: the availability reason, the refusals (before any collective: no process group
exists there), the wire round trip through the packed row, and the byte counts.
"""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, RouterConfig
from rocm_moe import synthetic as syn
from rocm_moe.comm import rows
from rocm_moe.comm.symm import SymmDispatcher
from rocm_moe.comm.symm_fp8 import SymmFP8Dispatcher
from rocm_moe.comm.torch_fp8 import fp8_row_bytes
from rocm_moe.distributed import launch
from rocm_moe.quant import FP8Rows, quantize_rows
from tests.conftest import DEVICE, rel_err

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
E, K, H, I = 16, 4, 256, 128  # the layer checks (Triton FP8: I % 128 == 0)
# (H, K) of the bit-equality checks: whole groups, a partial group (200 = 128 + 72), DSV3's row
BIT_CASES = ((256, 4), (200, 4), (7168, 8))


def _gpus(W: int):
    return [pytest.mark.gpu, pytest.mark.skipif(_GPUS < W, reason=f"needs {W} GPUs")]


def _kw(**over):
    kw = dict(hidden_size=H, top_k=K, dtype=torch.bfloat16, max_tokens_per_rank=8)
    return {**kw, **over}


# ---- CPU ---------------------------------------------------------------------------------------
def test_unavailable_reason_without_gpu():
    reason = SymmFP8Dispatcher.availability()
    assert reason == SymmDispatcher.availability()
    if not torch.cuda.is_available():
        assert "no CUDA/ROCm device" in reason
        with pytest.raises(ValueError, match="comm backend='symm': unavailable: no CUDA/ROCm"):
            SymmFP8Dispatcher(Placement.contiguous(E, 1), **_kw())


@pytest.mark.parametrize(("over", "err", "match"), [
    (dict(fp8_dtype="e5m2"), ValueError, r"fp8_dtype='e5m2': must be one of \['e4m3fn'"),
    (dict(dtype=torch.float64), TypeError, r"dtype=torch.float64: must be one of .*Fix: pass "
     "torch.bfloat16"),
    (dict(dtype=torch.float8_e4m3fn), TypeError, r"dtype=torch.float8_e4m3fn: must be one of"),
], ids=["bad_fp8_name", "float64_rows", "fp8_rows"])
def test_refused_before_any_collective(over, err, match):
    """No process group exists here: a check that ran after the first collective (or after
    the availability check) would raise another error."""
    with pytest.raises(err, match=match):
        SymmFP8Dispatcher(Placement.contiguous(E, 2), **_kw(**over))


@pytest.mark.skipif(torch.version.hip is not None, reason="ROCm builds have e4m3fnuz")
def test_fnuz_refused_without_rocm():
    with pytest.raises(ValueError, match=r"fp8_dtype=e4m3fnuz: NVIDIA Triton has no e4m3fnuz.*"
                       r"Fix: pass fp8_dtype='e4m3fn'"):
        SymmFP8Dispatcher(Placement.contiguous(E, 2), fp8_dtype="e4m3fnuz", **_kw())


def _unbuilt(hidden: int, top_k: int, dtype=torch.bfloat16) -> SymmFP8Dispatcher:
    """The dispatcher's wire hooks without its symmetric buffers (CPU: those need GPUs)."""
    d = object.__new__(SymmFP8Dispatcher)
    d.hidden_size, d.top_k, d.dtype, d.fp8_dtype = hidden, top_k, dtype, torch.float8_e4m3fn
    return d


@pytest.mark.parametrize("hidden", [128, 200, 7168])
def test_wire_round_trip_through_the_packed_row(hidden, gen):
    """The payload packed into the torch backend's row ([payload words | ids | weights | pad],
    ``rows.pack_rows``), then read back through ``_from_wire``'s views (as the symm receive
    section's payload words are): the quantiser's bits, zero copy."""
    T, k = 33, 3
    d = _unbuilt(hidden, k)
    x = (torch.randn(T, hidden, generator=gen) * 30).bfloat16()
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    w = torch.rand(T, k, generator=gen)
    payload = d._to_wire(x)
    P, wire_dtype = d._wire_format()
    assert payload.shape == (T, P)
    assert payload.dtype == wire_dtype == torch.uint8
    csum = torch.arange(1, T + 1)[None]  # W = 1: every token goes to rank 0, in order
    recv, _ = rows.pack_rows(payload, ids, w, csum, T, impl="torch")
    assert recv.shape[1] == rows.row_words(P, torch.uint8, k)
    p_R, ids_R, w_R = rows.unpack(recv, P, torch.uint8, k)
    got = d._from_wire(p_R)
    want = quantize_rows(x, dtype=torch.float8_e4m3fn)
    assert isinstance(got, FP8Rows)
    assert got.source_dtype == torch.bfloat16
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale.view(torch.int32), want.scale.view(torch.int32))
    assert torch.equal(ids_R, ids)
    assert torch.equal(w_R, w)
    base = recv.data_ptr()
    assert got.scale.data_ptr() == base
    assert got.q.data_ptr() == base + 4 * -(-hidden // 128)
    assert rel_err(got.dequantize(), x) < 5e-2  # FP8 of Gaussian rows: a few per cent


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("hidden", [128, 130, 200])  # 130: a 2-byte pad
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_quantize_to_wire_is_pack_of_quantize(hidden, dtype, fmt, gen):
    """The GPU path (one launch writing the payload in place) gives torch-fp8's bytes, pad
    included (Triton's interpreter here: float16/float32 only, it miscomputes bfloat16)."""
    pytest.importorskip("triton")
    from rocm_moe.comm.torch_fp8 import pack_fp8, quantize_to_wire
    from rocm_moe.quant import fp8_dtype

    if fmt == "e4m3fnuz" and DEVICE.type == "cuda" and torch.version.hip is None:
        pytest.skip("NVIDIA Triton has no e4m3fnuz type (test_fnuz_refused_without_rocm)")
    x = (torch.randn(33, hidden, generator=gen) * 50).to(dtype).to(DEVICE)
    x[3] = 0  # an all-zero row: the smallest scale
    got = quantize_to_wire(x, fp8_dtype(fmt))
    want = pack_fp8(quantize_rows(x, dtype=fmt))
    assert got.shape == want.shape == (33, fp8_row_bytes(hidden))
    assert torch.equal(got, want)
    assert quantize_to_wire(x[:0], fp8_dtype(fmt)).shape == (0, fp8_row_bytes(hidden))


def test_wire_bytes_and_the_bench_line():
    from rocm_moe.benchmarks.comm import _wire_row_bytes, fp8_line

    wire = _wire_row_bytes(7168, torch.bfloat16, 8, ["symm", "symm-fp8"])
    assert wire == {"torch": 14400, "symm": 14404, "symm-fp8": 7460}  # symm: + token index
    assert 4 * rows.row_words(*_unbuilt(7168, 8)._wire_format(), 8) == 7456
    assert wire["symm"] / wire["symm-fp8"] >= 1.8
    line = fp8_line("symm", wire, [{"tokens": 4096, "symm dispatch us": 900.0,
                                    "symm-fp8 dispatch us": 500.0}])
    assert line == ("dispatch row on the wire: symm 14404 B, symm-fp8 7460 B (1.93x fewer); "
                    "dispatch time symm / symm-fp8 per tokens/rank: 4096: 1.80x")
    assert fp8_row_bytes(200) == 208


def _same_rows(a, b, R: int) -> bool:
    """b's first R received rows (capacity-sized, symm) are a's (torch backend), bit for bit."""
    if isinstance(a.x, FP8Rows):
        return torch.equal(b.x.q[:R].view(torch.uint8), a.x.q.view(torch.uint8)) and \
            torch.equal(b.x.scale[:R].view(torch.int32), a.x.scale.view(torch.int32))
    return torch.equal(b.x[:R].view(torch.int16), a.x.view(torch.int16))


def _interpreted_worker(info, seed):
    from rocm_moe.comm.torch import TorchDispatcher
    from rocm_moe.comm.torch_fp8 import TorchFP8Dispatcher
    from rocm_moe.weighting import ExpertsOutput
    from tests.symm_shm import ShmSymmDispatcher

    out = {}
    for fp8, hidden in ((True, 256), (True, 200), (False, 200)):
        kw = dict(hidden_size=hidden, top_k=3, dtype=torch.float16)  # K = 3: not a power of 2
        p = Placement.contiguous(E, 1)
        ref = (TorchFP8Dispatcher if fp8 else TorchDispatcher)(p, **kw)
        sym = ShmSymmDispatcher(p, max_tokens_per_rank=40, fp8_dtype="e4m3fn" if fp8 else None,
                                **kw)
        for T in (33, 0, 5):  # buffers reused; rows past R marked empty each time
            x, w, ids = _batch(seed + T, 0, T, hidden, 3, "cpu")
            a, b = ref.dispatch(x.half(), w, ids), sym.dispatch(x.half(), w, ids)
            R = a.x.shape[0]
            storage = b.x.q if isinstance(b.x, FP8Rows) else b.x
            y = torch.randn(R, hidden).half()
            y_sym = torch.zeros(40, hidden, dtype=torch.float16)
            y_sym[:R] = y
            out[f"{sym.name}_H{hidden}_T{T}"] = dict(
                num_valid=int(b.num_valid) == R, capacity_rows=tuple(b.x.shape) == (40, hidden),
                rows=_same_rows(a, b, R), ids=torch.equal(b.topk_ids[:R], a.topk_ids),
                weights=torch.equal(b.topk_weights[:R], a.topk_weights),
                empty_ids=bool((b.topk_ids[R:] == -1).all()),
                empty_weights=bool((b.topk_weights[R:] == 0).all()),
                zero_copy=storage.untyped_storage().data_ptr() ==
                sym._buf.untyped_storage().data_ptr(),
                combine=torch.equal(
                    sym.combine(ExpertsOutput(out=y_sym, weights_applied=True), b.handle),
                    ref.combine(ExpertsOutput(out=y, weights_applied=True), a.handle)))
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels for real")
def test_dispatch_kernels_in_the_interpreter_at_W1():
    """The symm dispatch and combine kernels run (interpreted, tests/symm_shm.py) on FP8 and
    float16 payloads: the received rows, bit for bit the torch backends', zero copy, every row
    past R empty (ids -1 and weights 0: K = 3 caught the scrub leaving the last weight of
    those rows), and combine equal to the torch backends'."""
    pytest.importorskip("triton")
    [res] = launch(1, _interpreted_worker, 7, backend="gloo", timeout_s=120)
    assert len(res) == 9
    for case, checks in res.items():
        assert all(checks.values()), (case, checks)


# ---- GPUs --------------------------------------------------------------------------------------
def _batch(seed: int, rank: int, T: int, hidden: int, k: int, device):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = (torch.randn(T, hidden, generator=g) * (rank + 1)).bfloat16()
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32)
    ids[torch.rand(T, k, generator=g) < 0.2] = -1  # empty slots
    w = torch.rand(T, k, generator=g)
    return x.to(device), w.to(device), ids.to(device)


def _refusal(call, *args) -> str:
    try:
        call(*args)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return "not refused"


def _bits_worker(info, seed):
    from rocm_moe.comm.torch_fp8 import TorchFP8Dispatcher
    from rocm_moe.weighting import ExpertsOutput

    W, rank, dev = info.world_size, info.rank, info.device
    T = [33, 0, 1, 511][rank]  # odd sizes; rank 1 sends nothing
    p = Placement.contiguous(E, W)
    out = {}
    for hidden, k in BIT_CASES:
        kw = dict(hidden_size=hidden, top_k=k, dtype=torch.bfloat16)
        ref = TorchFP8Dispatcher(p, **kw)
        sym = SymmFP8Dispatcher(p, max_tokens_per_rank=511, **kw)
        x, w, ids = _batch(seed, rank, T, hidden, k, dev)
        if (hidden, k) == BIT_CASES[0]:  # refused on every rank before any kernel runs
            big = _batch(seed, rank, 512, hidden, k, dev)
            out["too_many_tokens"] = _refusal(sym.dispatch, *big)
            out["float32_rows"] = _refusal(sym.dispatch, x.float(), w, ids)
        a, b = ref.dispatch(x, w, ids), sym.dispatch(x, w, ids)
        R = a.x.shape[0]
        case = f"H{hidden}_K{k}"
        out[f"{case}_R"] = R
        out[f"{case}_num_valid"] = int(b.num_valid) == R
        out[f"{case}_q"] = torch.equal(b.x.q[:R].view(torch.uint8), a.x.q.view(torch.uint8))
        out[f"{case}_scale"] = torch.equal(b.x.scale[:R].view(torch.int32),
                                           a.x.scale.view(torch.int32))
        out[f"{case}_meta"] = torch.equal(b.topk_ids[:R], a.topk_ids) and \
            torch.equal(b.topk_weights[:R], a.topk_weights) and bool((b.topk_ids[R:] == -1).all())
        storage = sym._buf.untyped_storage().data_ptr()
        out[f"{case}_zero_copy"] = b.x.q.untyped_storage().data_ptr() == storage and \
            b.x.scale.untyped_storage().data_ptr() == storage
        # combine: each received row's dequantised value back, summed per token in rank order
        ya = ref.combine(ExpertsOutput(out=a.x.dequantize(torch.bfloat16), weights_applied=True),
                         a.handle)
        yb = sym.combine(ExpertsOutput(out=b.x.dequantize(torch.bfloat16), weights_applied=True),
                         b.handle)
        out[f"{case}_combine"] = torch.equal(ya, yb)
        out[f"{case}_row_bytes"] = 4 * sym.row_words  # the payload, padded (ids etc. apart)
        if (hidden, k) == BIT_CASES[-1]:  # the bf16 symm dispatch of the same batch
            bf = SymmDispatcher(p, max_tokens_per_rank=511, **kw)
            c = bf.dispatch(x, w, ids)
            out["bf16_row_bytes"] = 4 * bf.row_words
            out["bf16_recv_bytes"] = bf._lane_bytes["recv"]
            out["fp8_recv_bytes"] = sym._lane_bytes["recv"]
            out["fp8_vs_bf16_rows"] = rel_err(b.x.dequantize()[:R], c.x[:R]) if R else 0.0
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("W", [pytest.param(W, marks=_gpus(W)) for W in (2, 4)])
def test_received_bits_equal_torch_fp8(W):
    results = launch(W, _bits_worker, 3, backend="nccl", timeout_s=240)
    for rank, r in enumerate(results):
        bad = [k for k, v in r.items() if v is False]
        assert not bad, (W, rank, bad, r)
        assert "x.shape[0]=512: exceeds max_tokens_per_rank=511" in r["too_many_tokens"], r
        assert "x.dtype=torch.float32: must be one of (torch.bfloat16)" in r["float32_rows"], r
        assert r["fp8_vs_bf16_rows"] < 5e-2, (rank, r)
        # the byte count: DeepSeek-V3's payload row (H = 7168; its 8 ids, 8 weights and token
        # index travel to sections of their own) and the receive section
        assert (r["H7168_K8_row_bytes"], r["bf16_row_bytes"]) == (7392, 14336), r
        assert r["bf16_recv_bytes"] / r["fp8_recv_bytes"] >= 1.8, r
    assert sum(r["H256_K4_R"] for r in results) > 0  # rows moved (rank 1 sent none)


def _gather_experts(layer):
    """Every rank's FP8 experts, all E of them (contiguous placement), for the oracle."""
    import torch.distributed as dist

    from rocm_moe.quant import BlockFP8Weight

    def gather(t):
        flat = (t.view(torch.uint8) if t.dtype != torch.float32 else t).contiguous()
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        return torch.cat(parts).view(t.dtype)

    return (BlockFP8Weight(gather(layer.w13_fp8), gather(layer.w13_scale_inv)),
            BlockFP8Weight(gather(layer.w2_fp8), gather(layer.w2_scale_inv)))


def _layer_worker(info, seed):
    from rocm_moe.experts.fp8 import fp8_dense_reference
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts
    from rocm_moe.graphs import GraphedEPMoE
    from rocm_moe.layer_fp8 import FP8_TOLERANCE, FP8EPMoE

    W, rank = info.world_size, info.rank
    out = {}
    for mode in ("experts", "combine"):
        disp = SymmFP8Dispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                                 dtype=torch.bfloat16, max_tokens_per_rank=64)
        layer = FP8EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                         dispatcher=disp, experts=TritonFP8Experts(), weight_mode=mode,
                         dtype=torch.bfloat16, shared_intermediate_size=32, device=info.device)
        layer.reset_parameters(seed=5)
        w13, w2 = (w.to("cpu") for w in _gather_experts(layer))  # CPU oracles, as test_fp8's
        graphed = GraphedEPMoE(layer, buckets=(1, 8, 64))
        # Ranks differ in T (rank 0 has none in one step) and so in bucket.
        for step, T in enumerate((1, 0 if rank == 0 else 33, 5 + rank, 64)):
            x = syn.tokens(seed + step, rank, T, H).bfloat16().to(info.device)
            eager = layer(x)  # every rank makes the same (collective) calls, whatever its T
            replayed = graphed(x).clone()
            assert torch.equal(replayed, eager), (mode, T, (replayed - eager).abs().max())
            res = layer(x, return_raw=True)  # combine_raw over the symm-fp8 rows
            if T:
                shared = layer.shared_experts.reference(x).cpu()
                route = (x.cpu(), res.topk_weights.cpu(), res.topk_ids.cpu(), w13, w2)
                y_q = fp8_dense_reference(*route) + shared
                y_m = fp8_dense_reference(*route, quantize_activations=False) + shared
                for name, y in (("eager", eager), ("raw_path", res.out)):
                    err_q, err_m = rel_err(y.cpu(), y_q), rel_err(y.cpu(), y_m)
                    assert err_q < 2e-2, (mode, name, T, err_q)
                    assert err_m < FP8_TOLERANCE, (mode, name, T, err_m)
                    out[f"{mode}_{name}_T{T}"] = [err_q, err_m]
        for _ in range(20):  # bit-identical replays
            x = syn.tokens(seed, rank, 8, H).bfloat16().to(info.device)
            first = graphed(x).clone()
            assert torch.equal(graphed(x), first)
    return out


@pytest.mark.parametrize("W", [pytest.param(W, marks=_gpus(W)) for W in (2, 4)])
def test_fp8_layer_graph_replay_equals_eager_and_oracle(W):
    results = launch(W, _layer_worker, 11, backend="nccl", timeout_s=300)
    assert all(results), results
