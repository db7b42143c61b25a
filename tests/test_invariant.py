"""Invariant mode: the same tokens give the same bits (``torch.equal``, no tolerance) through
EP sizes 1, 2, 3, 4 (gloo; NCCL on GPUs), through batches of other sizes, compositions and
orders, in both weight modes, bf16 and fp32; the float64 oracle shows the accuracy is kept; the
backends that cannot be invariant refuse with their reason.

Every token's logits, ids, weights, per-slot raw outputs and final output are compared: each
rank holds its own (uneven, one empty) share of one global token set, and the EP runs are
compared with one W = 1 run of the whole set in this process.
"""

from __future__ import annotations

import math

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig, dense_moe_reference
from rocm_moe import invariant as inv
from rocm_moe import synthetic as syn
from rocm_moe.distributed import launch
from tests.conftest import TOL, rel_err

E, K, H, I, SHARED_I = 12, 3, 24, 10, 6  # E = 12: divisible by W = 1, 2, 3, 4
SEED = 5
ROUTERS = {
    "qwen3": RouterConfig.qwen3_moe(E, K),
    "dsv3": RouterConfig.deepseek_v3(num_experts=E, top_k=K, n_group=4, topk_group=2,
                                     routed_scaling_factor=2.5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("experts", "combine")
# Tokens each rank holds at world size W (one rank empty at W >= 3; odd sizes).
SHARES = {1: (41,), 2: (33, 8), 3: (1, 0, 40), 4: (7, 33, 0, 1)}
FIELDS = ("logits", "weights", "ids", "raw", "out")

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _tokens(dtype, device="cpu", n=41) -> torch.Tensor:
    return (syn.tokens(SEED, 0, n, H) * 3).to(dtype).to(device)  # wide logits: real routing


def _layer(router: str, dtype, mode: str, dispatcher=None, experts=None, device="cpu",
           invariant=True) -> EPMoE:
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTERS[router],
                  dispatcher=dispatcher, experts=experts, weight_mode=mode,
                  shared_intermediate_size=SHARED_I, shared_expert_gate=True, dtype=dtype,
                  device=device, invariant=invariant)
    layer.reset_parameters(seed=SEED)
    if layer.e_score_correction_bias is not None:
        layer.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, E))
    return layer


def _run(layer: EPMoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-token quantity of one forward, as float64 / int64 on the CPU (exact)."""
    res = layer(x, return_raw=True)
    out = layer(x)  # the plain forward too: it must equal the return_raw one
    assert torch.equal(out, res.out)
    return dict(logits=layer.router_logits(x).double().cpu(),
                weights=res.topk_weights.double().cpu(), ids=res.topk_ids.long().cpu(),
                raw=res.raw.double().cpu(), out=res.out.double().cpu())


def _cases():
    return [(r, d, m) for r in ROUTERS for d in DTYPES for m in MODES]


def _assert_same(got: dict, want: dict, what: str) -> None:
    for f in FIELDS:
        assert torch.equal(got[f], want[f]), f"{what}: {f} differs"


# ---- building blocks ---------------------------------------------------------------------------
def test_worked_examples():
    assert torch.equal(inv.tree_sum(torch.tensor([[1., 2., 3.]])), torch.tensor([6.]))
    assert inv.stable_topk(torch.tensor([[1., 3., 3.]]), 2).tolist() == [[1, 2]]
    assert inv.linear_acc(torch.tensor([[1., 2.]]), torch.tensor([[3., 4.]])).tolist() == [[11.]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_building_blocks_do_not_depend_on_the_batch(dtype):
    """Each row's linear, SiLU and softmax bits are the same in any prefix of the batch (CPU
    BLAS and ATen's scalar tails make the plain ops fail this: the first assert shows it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g).to(dtype) * 4
    w = torch.randn(50, 40, generator=g).to(dtype)
    silu = torch.nn.functional.silu
    plain = silu(x.float())
    assert any(not torch.equal(silu(x[:n].float()), plain[:n]) for n in range(1, 300)), \
        "ATen's SiLU is position-independent here: the pointwise guard is untested"
    lin, act, sm = inv.linear_acc(x, w), inv.pointwise(silu, x.float()), inv.softmax(x.float())
    for n in (1, 2, 33, 64, 65, 299):
        assert torch.equal(inv.linear_acc(x[:n], w), lin[:n])
        assert torch.equal(inv.pointwise(silu, x[:n].float()), act[:n])
        assert torch.equal(inv.softmax(x[:n].float()), sm[:n])
    ref = x.double() @ w.double().T
    assert rel_err(lin, ref) < 1e-6


def test_pointwise_across_its_chunks():
    """Above ``POINTWISE_CHUNK`` elements the CPU calls go chunk by chunk: prefixes that end
    inside, at and past a chunk boundary give every element the same bits."""
    x = torch.randn(40000, generator=torch.Generator().manual_seed(2)) * 6
    silu = torch.nn.functional.silu
    full = inv.pointwise(silu, x)
    c = inv.POINTWISE_CHUNK
    for n in (1, 63, c - 1, c, c + 1, 2 * c + 5, 40000):
        assert torch.equal(inv.pointwise(silu, x[:n]), full[:n]), n
    y = x[7:7 + 39000].view(-1, 3)  # another start, another shape
    assert torch.equal(inv.pointwise(silu, y).flatten(), full[7:7 + 39000])


def test_stable_topk_breaks_ties_by_lower_index():
    t = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9]])
    assert inv.stable_topk(t, 2).tolist() == [[1, 2]]
    assert inv.stable_topk(t.repeat(70, 1), 3).tolist() == [[1, 2, 4]] * 70


# ---- one rank: batch size, composition and order -------------------------------------------------
@pytest.mark.parametrize(("router", "dtype", "mode"), _cases(),
                         ids=[f"{r}-{d}-{m}" for r, d, m in _cases()])
def test_batches_of_any_size_order_and_composition(router, dtype, mode):
    layer = _layer(router, DTYPES[dtype], mode)
    x = _tokens(DTYPES[dtype])
    whole = _run(layer, x)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    shuffled = _run(layer, x[perm])
    _assert_same({f: v[perm.argsort()] for f, v in shuffled.items()}, whole, "permuted batch")
    start = 0
    for n in (1, 33, 7):  # other batch sizes; each token also meets other neighbours
        part = _run(layer, x[start:start + n])
        _assert_same(part, {f: v[start:start + n] for f, v in whole.items()}, f"batch of {n}")
        start += n
    other = _tokens(DTYPES[dtype], n=90)[50:]  # the same tokens among unrelated ones
    mixed = _run(layer, torch.cat([other[:5], x[:3], other]))
    _assert_same({f: v[5:8] for f, v in mixed.items()}, {f: v[:3] for f, v in whole.items()},
                 "tokens among others")
    # The other weight mode gives the same bits: the owner applies the weights in both.
    twin = _layer(router, DTYPES[dtype], "combine" if mode == "experts" else "experts")
    _assert_same(_run(twin, x), whole, "other weight mode")


def test_511_tokens_split_three_ways():
    layer = _layer("dsv3", torch.bfloat16, "combine")
    x = _tokens(torch.bfloat16, n=511)
    whole = _run(layer, x)
    for lo, hi in ((0, 255), (255, 256), (256, 511)):
        _assert_same(_run(layer, x[lo:hi]), {f: v[lo:hi] for f, v in whole.items()},
                     f"tokens {lo}:{hi} of 511")


def test_cli_run_invariant(capsys):
    from rocm_moe.cli import main

    assert main(["run", "--num-experts", "8", "--hidden", "32", "--intermediate", "16",
                 "--top-k", "2", "--world-size", "1", "--tokens", "33", "--iters", "1",
                 "--invariant"]) == 0
    out = capsys.readouterr().out
    assert "invariant, " in out
    assert "PASS" in out


@pytest.mark.parametrize(("router", "dtype"), [(r, d) for r in ROUTERS for d in DTYPES])
def test_accuracy_against_the_float64_oracle(router, dtype):
    layer = _layer(router, DTYPES[dtype], "experts")
    x = _tokens(DTYPES[dtype])
    res = layer(x, return_raw=True)
    y_ref, raw_ref = dense_moe_reference(
        x.double(), res.topk_weights, res.topk_ids,
        expert_weights=lambda g: syn.expert_weights(SEED, g, H, I))
    y_ref = y_ref + layer.shared_experts.reference(x)
    tol = TOL[DTYPES[dtype]]
    assert rel_err(res.out, y_ref) < tol
    assert rel_err(res.raw, raw_ref) < tol


def test_the_default_path_is_untouched():
    """invariant=False runs the library ops (the fast path), not the fixed-order ones."""
    layer = _layer("qwen3", torch.float32, "experts", invariant=False)
    x = _tokens(torch.float32)
    assert torch.equal(layer.router_logits(x), torch.nn.functional.linear(x, layer.gate.weight))
    assert type(layer.experts).__name__ == "ReferenceExperts"
    assert not layer.experts.invariant


def test_invariant_can_be_switched_on_and_off():
    """``layer.invariant = True`` on a built layer gives the bits of a layer built invariant;
    False gives the default path's bits back."""
    x = _tokens(torch.float32)
    plain = _layer("qwen3", torch.float32, "experts", invariant=False)
    want_plain = _run(plain, x)
    plain.invariant = True
    _assert_same(_run(plain, x), _run(_layer("qwen3", torch.float32, "experts"), x), "on")
    plain.invariant = False
    _assert_same(_run(plain, x), want_plain, "off again")


def test_bench_costs_line():
    from rocm_moe.benchmarks.layer import invariant_costs

    rows = [dict(comm="torch", tokens=8, skew="uniform", mode=m, **{"eager us": t})
            for m, t in (("experts", 100.0), ("invariant", 120.0))]
    assert invariant_costs(rows) == ["torch T=8 uniform: invariant 1.20x experts (eager: 120.0 "
                                     "vs 100.0 us)"]


def test_refusals():
    from rocm_moe.experts.aiter import AiterExperts
    from tests.fakes import FakeFusedMoe, fake_shuffle_weight

    aiter = AiterExperts(fused_moe=FakeFusedMoe(), shuffle_weight=fake_shuffle_weight)
    with pytest.raises(ValueError, match=r"experts=aiter.*cannot run invariant=True.*split-K"):
        _layer("qwen3", torch.bfloat16, "experts", experts=aiter)
    with pytest.raises(TypeError, match="invariant"):
        _layer("qwen3", torch.float32, "experts", invariant=1)


# ---- EP sizes 1, 2, 3, 4 on gloo -----------------------------------------------------------------
def _ep_worker(info, cases, comm: str, experts: str):
    from rocm_moe import backends

    W, rank = info.world_size, info.rank
    share = SHARES[W]
    lo = sum(share[:rank])
    results = []
    for router, dtype, mode in cases:
        dt = DTYPES[dtype]
        disp = backends.make_dispatcher(comm, Placement.contiguous(E, W), rank, hidden_size=H,
                                        top_k=K, dtype=dt, max_tokens_per_rank=64)
        layer = _layer(router, dt, mode, dispatcher=disp,
                       experts=backends.make_experts(experts), device=info.device)
        x = _tokens(dt, info.device)[lo:lo + share[rank]]
        got = _run(layer, x)
        results.append({f: v.tolist() for f, v in got.items()})
        if comm == "symm":  # captured, zero-padded to a 64-token bucket: the same bits again
            from rocm_moe.graphs import GraphedEPMoE

            replayed = GraphedEPMoE(layer, buckets=(64,))(x).double().cpu()
            results[-1]["graph_equal"] = bool(torch.equal(replayed, got["out"]))
    refusal = None
    if comm == "torch" and W == 2 and info.backend == "gloo":  # (the fake MORI runs on CPUs)
        from rocm_moe.comm.mori import MoriDispatcher
        from tests.fakes import FakeMori

        mori = MoriDispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                              dtype=torch.float32, max_tokens_per_rank=8, mori=FakeMori())
        try:
            _layer("qwen3", torch.float32, "experts", dispatcher=mori)
        except ValueError as err:
            refusal = str(err)
    return dict(results=results, refusal=refusal)


def _check_ep(W: int, comm: str, experts: str, cases, device="cpu", backend="gloo") -> None:
    out = launch(W, _ep_worker, cases, comm, experts, backend=backend, timeout_s=600)
    share = SHARES[W]
    for i, (router, dtype, mode) in enumerate(cases):
        layer = _layer(router, DTYPES[dtype], mode, device=device,
                       experts=_experts(experts))
        whole = _run(layer, _tokens(DTYPES[dtype], device))
        for rank in range(W):
            lo = sum(share[:rank])
            got = out[rank]["results"][i]
            got = {f: torch.tensor(got[f], dtype=whole[f].dtype).reshape(
                (share[rank], *whole[f].shape[1:])) for f in FIELDS}
            what = f"{comm}+{experts} W={W} rank={rank} {router} {dtype} {mode}"
            assert out[rank]["results"][i].get("graph_equal", True), f"{what}: graph replay"
            _assert_same(got, {f: v[lo:lo + share[rank]] for f, v in whole.items()}, what)
    if comm == "torch" and W == 2 and backend == "gloo":
        for r in out:
            assert "arrive" in (r["refusal"] or "")
            assert "comm=mori" in r["refusal"]


def _experts(name: str):
    from rocm_moe import backends

    return backends.make_experts(name)


@pytest.mark.parametrize("W", [2, 3, 4], ids=lambda w: f"gloo-W{w}")
def test_ep_sizes_give_the_same_bits(W):
    _check_ep(W, "torch", "reference", _cases())


# ---- Triton experts (interpreter on CPUs) --------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below cover it")
def test_triton_experts_batch_invariant_in_the_interpreter():
    from rocm_moe.experts.triton import TritonExperts

    if (reason := TritonExperts.availability()) is not None:
        pytest.skip(reason)
    layer = _layer("qwen3", torch.float16, "experts", experts=TritonExperts())
    x = _tokens(torch.float16, n=20)
    whole = _run(layer, x)
    for lo, n in ((0, 1), (1, 12), (13, 7)):
        _assert_same(_run(layer, x[lo:lo + n]), {f: v[lo:lo + n] for f, v in whole.items()},
                     f"triton batch of {n}")
    flipped = _run(layer, x.flip(0))
    _assert_same({f: v.flip(0) for f, v in flipped.items()}, whole, "triton reversed batch")


# ---- GPUs: Triton experts on the torch (NCCL) and symm backends ---------------------------------
GPU_CASES = [(r, "bf16", m) for r in ROUTERS for m in MODES]


@pytest.mark.gpu
@pytest.mark.parametrize("comm", ["torch", "symm"])
@pytest.mark.parametrize("W", [1, 2, 4], ids=lambda w: f"nccl-W{w}")
def test_gpu_ep_sizes_give_the_same_bits(W, comm):
    if _GPUS < W:
        pytest.skip(f"needs {W} GPUs")
    _check_ep(W, comm, "triton", GPU_CASES, device="cuda", backend="nccl")
    if comm == "torch":  # fp32: the reference experts (fixed-order Triton GEMMs; no TF32)
        _check_ep(W, comm, "reference", [(r, "fp32", "experts") for r in ROUTERS],
                  device="cuda", backend="nccl")


@pytest.mark.gpu
@pytest.mark.skipif(_GPUS < 1, reason="needs a GPU")
def test_gpu_batches_of_any_size_and_the_fp32_path():
    """Triton experts in bf16; fp32 on GPUs through the reference experts' fixed-order GEMMs
    (the Triton experts refuse fp32: TF32)."""
    from rocm_moe.experts.reference import ReferenceExperts
    from rocm_moe.experts.triton import TritonExperts

    for dtype, experts in ((torch.bfloat16, TritonExperts()),
                           (torch.float32, ReferenceExperts())):
        layer = _layer("qwen3", dtype, "experts", experts=experts, device="cuda")
        x = _tokens(dtype, "cuda", n=300)
        whole = _run(layer, x)
        for lo, n in ((0, 1), (1, 33), (34, 200)):
            _assert_same(_run(layer, x[lo:lo + n]), {f: v[lo:lo + n] for f, v in whole.items()},
                         f"{dtype} batch of {n}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernel for real")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear_kernel_in_the_interpreter(dtype):
    """The GPU path of ``linear_acc`` (the Triton kernel) in Triton's interpreter: its worked
    example, the float64 reference, and each row the same in any prefix of the batch."""
    from rocm_moe._libs import triton_missing

    if (reason := triton_missing()) is not None:
        pytest.skip(reason)
    one = inv._linear_triton(torch.tensor([[1., 2.]], dtype=dtype),
                             torch.tensor([[3., 4.]], dtype=dtype))
    assert one.tolist() == [[11.]]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70, 80, generator=g).to(dtype)  # 3 row tiles, 2 column tiles, 2 D chunks
    w = torch.randn(65, 80, generator=g).to(dtype)
    full = inv._linear_triton(x, w)
    assert full.dtype == torch.float32
    assert rel_err(full, x.double() @ w.double().T) < 1e-6
    for n in (1, 31, 33):
        assert torch.equal(inv._linear_triton(x[:n], w), full[:n])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernel for real")
def test_softmax_kernel_in_the_interpreter():
    """The GPU softmax (one Triton program per row) in the interpreter: its worked example, the
    float64 softmax, and each row the same in any prefix of the batch."""
    from rocm_moe._libs import triton_missing

    if (reason := triton_missing()) is not None:
        pytest.skip(reason)
    half = inv._softmax_triton(torch.tensor([[0.0, math.log(3.0)]]))
    assert torch.allclose(half, torch.tensor([[0.25, 0.75]]))
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(4)) * 5  # E not a power of 2
    full = inv._softmax_triton(x)
    assert rel_err(full, x.double().softmax(-1)) < 1e-6
    for n in (1, 17, 39):
        assert torch.equal(inv._softmax_triton(x[:n]), full[:n])


def test_bench_layer_invariant_on_cpu_ranks(tmp_path, capsys):
    """``rocm-moe bench layer --invariant`` on two gloo ranks: the mode runs beside the default
    on the same layer and its cost line is printed and saved."""
    import json

    from rocm_moe.cli import main

    assert main(["bench", "layer", "--world-size", "2", "--num-experts", "8", "--hidden", "32",
                 "--intermediate", "16", "--top-k", "2", "--tokens", "5", "--iters", "1",
                 "--warmup", "0", "--comm", "torch", "--invariant", "--out", str(tmp_path),
                 "--name", "inv"]) == 0
    assert "torch T=5 uniform: invariant " in capsys.readouterr().out
    summary = json.loads((tmp_path / "inv.json").read_text())["summary"]
    assert [r["mode"] for r in summary] == ["experts", "invariant"]
