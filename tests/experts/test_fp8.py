"""FP8 experts (reference and Triton) against float64 oracles of the FP8 model.

Two oracles: ``fp8_dense_reference`` with the activations quantised as the experts do (then
float64 GEMMs: the backends must match it to float32 rounding, plus the rare FP8 rounding flip
of an intermediate computed in float32), and the dequantised model in float64 (no activation
quantisation: the FP8 pipeline's own error, a few percent). Triton runs in the interpreter on
CPUs (slow: a small grid) and compiled on GPUs (bfloat16 outputs, larger shapes).
"""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement
from rocm_moe.experts.fp8 import FP8ReferenceExperts, fp8_dense_reference, quantize_experts
from rocm_moe.quant import FP8Rows, quantize_rows, quantize_weight_blocks
from tests.conftest import DEVICE, rel_err

FORMATS = ["e4m3fn", "e4m3fnuz"]
GRID = [pytest.param(R, K, E, W, H, I, id=f"R{R}_K{K}_E{E}_W{W}_H{H}_I{I}")
        for R, K, E, W, H, I in [(1, 1, 4, 1, 128, 128), (33, 4, 16, 2, 200, 256),
                                 (511, 8, 32, 4, 72, 128)]]
ORACLE_TOL = 2e-3  # vs the oracle with the same activation quantisation
MODEL_TOL = 6e-2  # vs the dequantised float64 model (FP8 activations: ~4% rms)


def _model_tol(R: int) -> float:
    """A statistical bound: one row of 128 values can land at 6-7% (seen: 6.3%)."""
    return MODEL_TOL if R >= 16 else 1.2e-1


def _case(R, K, E, W, H, I, gen, *, fmt="e4m3fn", zero_expert=True, device=DEVICE):
    """Inputs on the last rank of W, its first local expert given no tokens (zero_expert)."""
    p = Placement.contiguous(E, W)
    rank = W - 1
    emap = p.expert_map(rank)
    x = torch.randn(R, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(R)])
    if R > 1:  # (the single row keeps its slot)
        ids[torch.rand(R, K, generator=gen) < 0.1] = -1
    if zero_expert and emap.num_local > 1 and R > 1:
        ids[ids == p.local_experts(rank)[0]] = -1
    w = torch.rand(R, K, generator=gen)
    local = list(p.local_experts(rank))
    big = E * 3 * I * H > 10**8  # GPU shapes: only the local experts (no oracle needs them)
    n = len(local) if big else E
    W13 = (torch.randn(n, 2 * I, H, generator=gen) / H**0.5).to(device if big else "cpu")
    W2 = (torch.randn(n, H, I, generator=gen) / I**0.5).to(device if big else "cpu")
    fw = quantize_experts(W13, W2, dtype=fmt)
    head = [x.to(device), ids.to(torch.int32).to(device), w.to(device)]
    if big:
        return [*head, fw.w13, fw.w2, emap.to(device)], None
    return [*head, fw.w13[local].to(device), fw.w2[local].to(device), emap.to(device)], fw


def _oracles(args, fw):
    x, ids, w = (t.cpu() for t in args[:3])
    mask = (args[5].local_ids(args[1]) >= 0).cpu()  # only this rank's slots
    w = torch.where(mask, w, 0.0)
    ids = torch.where(mask, ids, -1)
    return (fp8_dense_reference(x, w, ids, fw.w13, fw.w2),
            fp8_dense_reference(x, w, ids, fw.w13, fw.w2, quantize_activations=False))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("R", "K", "E", "W", "H", "I"), GRID)
def test_reference_matches_float64_oracles(R, K, E, W, H, I, fmt, gen):
    args, fw = _case(R, K, E, W, H, I, gen, fmt=fmt, device="cpu")
    y_q, y_model = _oracles(args, fw)
    out = FP8ReferenceExperts()(*args, weight_mode="experts")
    assert out.weights_applied
    assert out.out.dtype == torch.float32
    assert rel_err(out.out, y_q) < ORACLE_TOL
    assert 5e-3 < rel_err(out.out, y_model) < _model_tol(R)  # FP8 activations cost accuracy
    raw = FP8ReferenceExperts()(*args, weight_mode="combine")
    assert not raw.weights_applied
    assert raw.out.shape == (R, K, H)
    local = args[5].local_ids(args[1]) >= 0
    assert raw.out[~local].eq(0).all()
    y_raw = (raw.out.double() * args[2].double()[..., None] * local[..., None]).sum(1)
    assert rel_err(y_raw, y_q) < ORACLE_TOL
    # float64 outputs: float64 GEMMs, the oracle to its own rounding
    out64 = FP8ReferenceExperts()(*args, weight_mode="experts", out_dtype=torch.float64)
    assert rel_err(out64.out, y_q) < 1e-12


def test_fp8_rows_input_needs_no_dequantise_and_matches(gen):
    args, _fw = _case(33, 4, 16, 2, 200, 256, gen, device="cpu")
    rows = quantize_rows(args[0])
    a = FP8ReferenceExperts()(rows, *args[1:], weight_mode="experts")
    b = FP8ReferenceExperts()(*args, weight_mode="experts")
    assert a.out.dtype == torch.float32  # the rows' source dtype
    assert torch.equal(a.out, b.out)
    anonymous = FP8Rows(rows.q, rows.scale)  # source unknown: bfloat16
    c = FP8ReferenceExperts()(anonymous, *args[1:], weight_mode="experts")
    assert c.out.dtype == torch.bfloat16
    assert torch.equal(c.out, b.out.bfloat16())


def test_converted_fnuz_weights_give_the_same_model(gen):
    args, fw = _case(33, 4, 16, 2, 200, 256, gen, device="cpu")
    fnuz = [args[3].to_format("e4m3fnuz"), args[4].to_format("e4m3fnuz")]
    assert torch.equal(fnuz[0].dequantize(), args[3].dequantize())
    out = FP8ReferenceExperts()(*args[:3], *fnuz, args[5], weight_mode="experts").out
    y_q, y_model = _oracles(args[:3] + fnuz + args[5:], fw.to_format("e4m3fnuz"))
    assert rel_err(out, y_q) < ORACLE_TOL  # fnuz activations, as on MI300
    _, y_model_fn = _oracles(args, fw)
    assert torch.equal(y_model, y_model_fn)  # one dequantised model
    assert rel_err(out, y_model) < MODEL_TOL


def test_contract_checks(gen):
    args, _fw = _case(5, 2, 8, 1, 128, 128, gen, device="cpu")
    x, ids, w, w13, w2, emap = args
    ref = FP8ReferenceExperts()
    with pytest.raises(TypeError, match=r"w13=Tensor.*must be a quant.BlockFP8Weight"):
        ref(x, ids, w, w13.dequantize(torch.float32), w2, emap, weight_mode="experts")
    with pytest.raises(ValueError, match=r"w2.dtype / device.*must match w13's"):
        ref(x, ids, w, w13, w2.to_format("e4m3fnuz"), emap, weight_mode="experts")
    with pytest.raises(ValueError, match=r"x.dtype=torch.float8_e4m3fnuz: must be the weights'"):
        ref(quantize_rows(x, dtype="e4m3fnuz"), ids, w, w13, w2, emap, weight_mode="experts")
    with pytest.raises(ValueError, match=r"x.shape\[1\]=64: must be H=128"):
        ref(x[:, :64].contiguous(), ids, w, w13, w2, emap, weight_mode="experts")
    odd = [quantize_weight_blocks(torch.randn(8, 2 * 96, 128)),
           quantize_weight_blocks(torch.randn(8, 128, 96))]
    with pytest.raises(ValueError, match=r"w13.shape\[1\]=192: must be 2I with I a multiple"):
        ref(x, ids, w, *odd, emap, weight_mode="experts")
    with pytest.raises(ValueError, match="topk_ids"):
        ref(x, ids + 100, w, w13, w2, emap, weight_mode="experts")


# ---- Triton ------------------------------------------------------------------------------------
triton = pytest.importorskip("triton")

from rocm_moe.experts.triton_fp8 import (  # noqa: E402
    TritonFP8Experts,
    fp8_block_config,
    quantize_rows_triton,
)

TRITON_GRID = GRID[:2] if DEVICE.type == "cpu" else [
    *GRID, pytest.param(4096, 8, 256, 8, 7168, 2048, id="R4096_K8_E256_W8_H7168_I2048"),
    pytest.param(1024, 8, 128, 8, 2048, 768, id="R1024_K8_E128_W8_H2048_I768")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("R", "K", "E", "W", "H", "I"), TRITON_GRID)
def test_triton_matches_reference_and_oracle(R, K, E, W, H, I, fmt, gen):
    _skip_fnuz_on_nvidia(fmt)
    args, fw = _case(R, K, E, W, H, I, gen, fmt=fmt)
    small = R * H < 10**6  # the float64 oracles of the big shapes take minutes on a CPU
    y_q, y_model = _oracles(args, fw) if small else (None, None)
    out_dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    for mode in ("experts", "combine"):
        out = TritonFP8Experts(path="grouped")(*args, weight_mode=mode, out_dtype=out_dtype)
        ref = FP8ReferenceExperts()(*args, weight_mode=mode)
        assert out.out.dtype == out_dtype
        assert out.out.shape == ref.out.shape
        tol = 1e-2 if out_dtype == torch.bfloat16 else ORACLE_TOL
        assert rel_err(out.out, ref.out) < tol, mode
        if mode == "combine":
            local = args[5].local_ids(args[1]) >= 0
            assert out.out[~local].eq(0).all()
        elif small:
            assert rel_err(out.out.cpu(), y_q) < tol  # (the oracles are on the CPU)
            assert rel_err(out.out.cpu(), y_model) < _model_tol(R)


def _skip_fnuz_on_nvidia(fmt: str) -> None:
    if fmt == "e4m3fnuz" and DEVICE.type == "cuda" and torch.version.hip is None:
        pytest.skip("NVIDIA Triton has no e4m3fnuz type (test_fnuz_refused_on_nvidia)")


def test_fnuz_refused_on_nvidia(gen):
    if not (DEVICE.type == "cuda" and torch.version.hip is None):
        pytest.skip("NVIDIA GPUs only")
    args, _ = _case(5, 2, 8, 1, 128, 128, gen, fmt="e4m3fnuz")
    with pytest.raises(ValueError, match=r"no e4m3fnuz type.*Fix: convert them"):
        TritonFP8Experts()(*args, weight_mode="experts")


@pytest.mark.parametrize("upcast", [True, False], ids=["upcast", "fp8_dot"])
def test_triton_upcast_and_fp8_dot_agree(upcast, gen):
    args, _ = _case(33, 4, 16, 2, 200, 256, gen)
    ref = FP8ReferenceExperts()(*args, weight_mode="experts")
    out = TritonFP8Experts(upcast=upcast, path="grouped")(*args, weight_mode="experts",
                                                          out_dtype=torch.float32)
    assert rel_err(out.out, ref.out) < ORACLE_TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_row_quantiser_is_the_reference(fmt, gen):
    _skip_fnuz_on_nvidia(fmt)
    x = torch.randn(9, 300, generator=gen).to(DEVICE) * 50
    a, b = quantize_rows_triton(x, torch.float8_e4m3fn if fmt == "e4m3fn"
                                else torch.float8_e4m3fnuz), quantize_rows(x, dtype=fmt)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8))


def test_triton_worked_example():
    H = I = 128
    x = torch.zeros(1, H)
    x[0, 0] = 1
    w13 = torch.cat([torch.eye(I) * 4, torch.eye(I) * 4])[None]
    w2 = torch.eye(H, I)[None]
    emap = Placement.contiguous(1, 1).expert_map(0).to(DEVICE)
    out = TritonFP8Experts()(x.to(DEVICE), torch.tensor([[0]], dtype=torch.int32).to(DEVICE),
                             torch.tensor([[0.5]]).to(DEVICE),
                             quantize_weight_blocks(w13).to(DEVICE),
                             quantize_weight_blocks(w2).to(DEVICE), emap,
                             weight_mode="experts").out
    expect = 0.5 * torch.nn.functional.silu(torch.tensor(4.0)) * 4
    assert abs(out[0, 0].item() - expect.item()) < 1e-5
    assert out[0, 1:].abs().max().item() == 0


def test_fp8_block_config():
    assert fp8_block_config(8, 8)["BLOCK_M"] == 16
    assert fp8_block_config(256 * 32, 32)["BLOCK_M"] == 128
    # DeepSeek-V3 rank-local, 1024 rows: 32 slots per expert expected, not 256
    assert fp8_block_config(1024 * 8, 32, num_experts=256)["BLOCK_M"] == 64
    for m in (1, 40, 100, 1000):
        cfg = fp8_block_config(m * 8, 8)
        assert cfg["gate_up"]["BLOCK_N"] == 128
        assert 128 % cfg["down"]["BLOCK_N"] == 0


# ---- benchmark ---------------------------------------------------------------------------------
def test_bench_without_a_gpu_says_so(capsys, tmp_path):
    from rocm_moe.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    with pytest.raises(SystemExit):
        main(["bench", "experts-fp8", "--out", str(tmp_path)])
    assert "needs a GPU" in capsys.readouterr().err


def test_bench_case_runs_in_the_interpreter(monkeypatch):
    """The benchmark's per-size code (inputs, floor, both backends, errors) on a tiny shape,
    with the GPU-only parts stood in for: a CPU, one call instead of graph replays."""
    import triton.testing

    from rocm_moe.benchmarks import experts as be
    from rocm_moe.benchmarks import experts_fp8 as b

    if DEVICE.type == "cuda":
        pytest.skip("the GPU runs the real benchmark")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **k: (fn(), 1.0)[1])
    monkeypatch.setattr(b, "_routing", lambda s, R, g: be._routing(s, R, g, device="cpu"))
    shape = dict(E=16, W=2, rank=1, H=256, I=128, K=4)
    # (bf16=False: the bf16 Triton experts refuse Triton's interpreter, which miscomputes
    # bfloat16; the GPU runs of the benchmark time them)
    (row,) = b.run_shape("tiny", shape, dict(copy_GBps=1000.0, fp8_matmul_TFLOPs=100.0), [5],
                         bf16=False)
    assert row["time_us"] == 1000.0
    per_expert = 3 * 256 * 128 + 4 * (2 * 2 + 2 * 1)  # FP8 weights + scales of one expert
    assert row["floor_us"] == pytest.approx(max(
        row["experts_touched"] * per_expert / 1e12 * 1e6,
        2 * 3 * 256 * 128 * row["local_pairs"] / 100e12 * 1e6))
    assert row["rel_err_vs_fp8_reference"] < 1e-2  # bfloat16 output


def test_bench_timed_calls_cycle_through_the_routings(monkeypatch):
    """batches=3: the timed calls take three routings in turn (so the experts' weights come
    from HBM on a GPU), and the floor counts their mean touched experts and pairs."""
    import triton.testing

    from rocm_moe.benchmarks import experts as be
    from rocm_moe.benchmarks import experts_fp8 as b

    if DEVICE.type == "cuda":
        pytest.skip("the GPU runs the real benchmark")
    seen = []

    class Spy(b.TritonFP8Experts):
        def __call__(self, x, ids, *args, **kwargs):
            seen.append(ids.data_ptr())
            return super().__call__(x, ids, *args, **kwargs)

    def bench(fn, **kw):
        seen.clear()
        for _ in range(4):
            fn()
        return 1.0

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", bench)
    monkeypatch.setattr(b, "_routing", lambda s, R, g: be._routing(s, R, g, device="cpu"))
    monkeypatch.setattr(b, "TritonFP8Experts", Spy)
    shape = dict(E=16, W=1, rank=0, H=256, I=128, K=2)
    (row,) = b.run_shape("tiny", shape, dict(copy_GBps=1.0, fp8_matmul_TFLOPs=1e6), [1],
                         bf16=False, batches=3)
    assert len(set(seen[:3])) == 3  # three routings in turn
    assert seen[3] == seen[0]
    per_expert = 3 * 256 * 128 + 4 * (2 * 2 + 2 * 1)
    assert row["floor_us"] == pytest.approx(row["experts_touched"] * per_expert / 1e9 * 1e6)
    assert row["local_pairs"] == 2  # one token, two slots, every expert local
