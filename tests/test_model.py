"""A model's worth of MoE layers on one dispatcher (``rocm_moe.model.MoEStack``): every layer
against the float64 oracle on CPUs (gloo, W = 1 and 2; the symm backend at W = 2 over shared
memory, one buffer for all layers, a batch above the capacity in chunks), and on GPUs the
whole N-layer stack captured in one CUDA graph per bucket over symm + Triton: replay == eager
bit for bit, one symmetric allocation whatever N, prefill batches above the capacity in
chunks."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, RouterConfig, dense_moe_reference
from rocm_moe import synthetic as syn
from rocm_moe.comm import pool
from rocm_moe.distributed import launch
from rocm_moe.model import MoEStack
from tests.conftest import TOL, rel_err
from tests.symm_shm import shm_available

E, K, H, I, N, CAP, SEED = 16, 4, 128, 64, 8, 64, 7
ROUTER = RouterConfig.qwen3_moe(E, K)
_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _layer_errors(stack: MoEStack, x: torch.Tensor) -> list[float]:
    """Each layer's output on the stack's own hidden states against the float64 oracle."""
    errs, h = [], x
    for j, layer in enumerate(stack.layers):
        n = stack.norm(h)
        y = layer(n)
        r = layer.route_tokens(n)
        ew = lambda g, j=j: syn.expert_weights(SEED + j, g, H, I)  # noqa: E731
        ref = dense_moe_reference(n.double().cpu(), r.topk_weights.cpu(), r.topk_ids.cpu(),
                                  expert_weights=ew)[0]
        errs.append(rel_err(y.cpu(), ref))
        h = h + y
    assert torch.isfinite(h).all()
    return errs


def _stack(info, comm: str, experts=None, dtype=torch.float32) -> MoEStack:
    pool.clear()
    p = Placement.contiguous(E, info.world_size)
    disp = pool.shared_dispatcher(comm, p, hidden_size=H, top_k=K, dtype=dtype,
                                  max_tokens_per_rank=CAP, rank=info.rank)
    return MoEStack.build(N, hidden_size=H, intermediate_size=I, router=ROUTER,
                          dispatcher=disp, experts=experts, dtype=dtype, device=info.device,
                          seed=SEED)


def _cpu_worker(info) -> dict:
    stack = _stack(info, "local" if info.world_size == 1 else "torch")
    x = syn.tokens(SEED, info.rank, [33, 1][info.rank] if info.world_size > 1 else 511, H)
    return dict(errs=_layer_errors(stack, x), pooled=len(pool.shared_dispatchers()),
                out=list(stack(x).shape))


@pytest.mark.parametrize("W", [1, 2])
def test_stack_of_layers_on_one_dispatcher_matches_the_oracle(W):
    for res in launch(W, _cpu_worker, backend="gloo"):
        assert res["pooled"] == 1
        assert max(res["errs"]) <= TOL[torch.float32], res["errs"]


def _shm_worker(info) -> dict:
    """The symm backend on CPU ranks (tests/symm_shm.py: its kernels interpreted over shared
    memory), reached by name through the pool as an engine reaches it: one buffer for N
    layers, every layer against the oracle, a prefill batch above the capacity in chunks (the
    rank without tokens joins with empty ones)."""
    from tests.symm_shm import as_symm_backend

    with as_symm_backend() as maps:
        stack = _stack(info, "symm")
        x = syn.tokens(SEED, info.rank, [9, 1][info.rank], H)
        big = syn.tokens(SEED + 1, info.rank, [CAP + 5, 0][info.rank], H)  # 2 chunks, 1 empty
        return dict(errs=_layer_errors(stack, x), prefill_errs=_layer_errors(stack, big),
                    allocations=len(maps), pooled=len(pool.shared_dispatchers()),
                    name=type(stack.layers[0].dispatcher).__name__)


@pytest.mark.skipif(shm_available() is not None, reason=str(shm_available()))
def test_stack_over_symm_on_cpu_ranks_shares_one_buffer():
    for res in launch(2, _shm_worker, backend="gloo", timeout_s=600):
        assert res["name"] == "ShmSymmDispatcher", res
        assert res["allocations"] == 1, res  # one buffer for N layers
        assert res["pooled"] == 1, res
        assert max(res["errs"]) <= TOL[torch.float32], res["errs"]
        assert max(res["prefill_errs"]) <= TOL[torch.float32], res["prefill_errs"]


def test_stack_refuses_layers_on_different_dispatchers():
    from rocm_moe import EPMoE

    a, b = (EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER) for _ in range(2))
    with pytest.raises(ValueError, match="borrows layer 0's dispatcher"):
        MoEStack([a, b])
    with pytest.raises(TypeError, match="non-empty list of EPMoE"):
        MoEStack([])
    with pytest.raises(TypeError, match="num_layers"):
        MoEStack.build(2.0, hidden_size=H, intermediate_size=I, router=ROUTER,
                       dispatcher=a.dispatcher)


# ---- GPUs: the whole stack in one CUDA graph ------------------------------------------------
def _gpu_worker(info) -> dict:
    from rocm_moe import backends
    from rocm_moe.comm import symm
    from rocm_moe.graphs import GraphedEPMoE

    allocations = []
    real = symm.SymmDispatcher._allocate

    def counting(self):
        allocations.append(id(self))
        real(self)

    symm.SymmDispatcher._allocate = counting
    torch.manual_seed(SEED)
    stack = _stack(info, "symm", backends.make_experts("triton"), torch.bfloat16)
    for la in stack.layers:
        la.validate = False
    T = [1, 33, 64][info.rank % 3]
    x = (syn.tokens(SEED, info.rank, T, H) * 3).to(torch.bfloat16).to(info.device)
    eager = stack(x)
    graphed = GraphedEPMoE(stack, buckets=(1, 33, 64))
    replays = [graphed(x).clone() for _ in range(3)]
    assert torch.isfinite(eager).all()
    big = (syn.tokens(SEED + 1, info.rank, int(3.5 * CAP), H)).to(torch.bfloat16).to(info.device)
    torch.cuda.synchronize()
    return dict(equal=all(torch.equal(r, eager) for r in replays), allocations=len(allocations),
                pooled=len(pool.shared_dispatchers()), errs=_layer_errors(stack, x),
                prefill_errs=_layer_errors(stack, big))


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1, 2])
def test_stack_in_one_cuda_graph_replays_eager_bits(W):
    if _GPUS < W:
        pytest.skip(f"needs {W} GPU(s), {_GPUS} here")
    if backends_reason := _symm_triton_reason():
        pytest.skip(backends_reason)
    for res in launch(W, _gpu_worker, backend="nccl", timeout_s=300):
        assert res["equal"], res
        assert res["allocations"] == 1, res  # one symmetric buffer for N layers
        assert res["pooled"] == 1, res
        assert max(res["errs"]) <= TOL[torch.bfloat16], res["errs"]
        assert max(res["prefill_errs"]) <= TOL[torch.bfloat16], res["prefill_errs"]


def _symm_triton_reason() -> str | None:
    from rocm_moe import backends

    return backends.BACKENDS["comm:symm"].availability() or \
        backends.BACKENDS["experts:triton"].availability()


# ---- rocm-moe bench model -------------------------------------------------------------------
_TINY = ["--num-experts", "8", "--hidden", "32", "--intermediate", "16", "--top-k", "2",
         "--layers", "3", "--iters", "2", "--warmup", "1", "--dtype", "float32", "--device", "cpu"]


def test_bench_model_on_cpu_ranks(tmp_path, capsys):
    import json

    from rocm_moe.cli import main

    assert main(["bench", "model", *_TINY, "--tokens", "1", "9", "--world-size", "2",
                 "--out", str(tmp_path), "--name", "m"]) == 0
    out = capsys.readouterr().out
    assert "3 MoE layers on one torch dispatcher" in out
    assert "1 dispatcher(s) for 3 layers" in out
    rows = json.loads((tmp_path / "m.json").read_text())["summary"]
    assert [r["T/rank"] for r in rows] == [1, 9]
    assert all(r["stack of 3 us"] > 0 and r["per layer us"] > 0 for r in rows)


@pytest.mark.parametrize(("flags", "message"), [
    (["--layers", "0"], "argument --layers: value='0': must be an integer >= 1"),
    (["--tokens", "0"], "argument --tokens: value='0': must be an integer >= 1"),
    (["--tokens", "9", "--max-tokens-per-rank", "4"], "a captured batch must fit"),
    (["--comm", "local", "--world-size", "2", "--experts", "reference"],
     "--comm local runs one rank"),
])
def test_bench_model_refuses_bad_flags(flags, message, capsys):
    from rocm_moe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "model", *_TINY, *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
