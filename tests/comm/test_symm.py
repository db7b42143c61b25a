"""SymmDispatcher: the torch backend's whole check catalogue on NCCL ranks (W = 2, 4; GPUs
with peer access), a captured CUDA graph of the whole EPMoE forward against the eager one and
the float64 oracle, and a peer that never arrives reported by rank. On CPUs only the
availability reason is checked (nothing else can run there)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig
from rocm_moe import synthetic as syn
from rocm_moe.comm.symm import SymmDispatcher
from rocm_moe.distributed import launch
from rocm_moe.experts.reference import dense_moe_reference
from tests.comm import test_torch as catalogue
from tests.conftest import TOL, rel_err

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
E, K, H, I = 16, 4, 128, 64  # Triton-sized for the graph checks


def _gpus(W: int):
    return [pytest.mark.gpu, pytest.mark.skipif(_GPUS < W, reason=f"needs {W} GPUs")]


def test_unavailable_reason_without_gpu():
    reason = SymmDispatcher.availability()
    if torch.cuda.is_available():
        assert reason is None or "triton" in reason or "symmetric" in reason
    else:
        assert "no CUDA/ROCm device" in reason
        with pytest.raises(ValueError, match="unavailable: no CUDA/ROCm device"):
            SymmDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.bfloat16, max_tokens_per_rank=8)


@pytest.fixture(scope="module", params=[pytest.param(W, id=f"nccl-W{W}", marks=_gpus(W))
                                        for W in (2, 4)])
def suite(request):
    W = request.param
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return W, seed, launch(W, catalogue._suite, seed, "symm", backend="nccl", timeout_s=180)


@pytest.mark.parametrize("check", list(catalogue.CHECKS))
def test_catalogue(suite, check):
    W, seed, results = suite
    for rank, res in enumerate(results):
        assert res[check]["ok"], f"W={W} rank={rank} seed={seed}\n{res[check]['value']}"


def _graph_worker(info, seed):
    from rocm_moe.experts.triton import TritonExperts
    from rocm_moe.graphs import GraphedEPMoE

    W, rank = info.world_size, info.rank
    out = {}
    for mode in ("experts", "combine"):
        disp = SymmDispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                              dtype=torch.bfloat16, max_tokens_per_rank=64)
        layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                      dispatcher=disp, experts=TritonExperts(), weight_mode=mode,
                      dtype=torch.bfloat16, shared_intermediate_size=32, device=info.device)
        layer.reset_parameters(seed=5)
        graphed = GraphedEPMoE(layer, buckets=(1, 8, 64))
        # Ranks differ in T (rank 0 has none in one step) and so in bucket.
        for step, T in enumerate((1, 0 if rank == 0 else 33, 5 + rank, 64)):
            x = syn.tokens(seed + step, rank, T, H).bfloat16().to(info.device)
            # Every rank makes the same calls (they are collective), whatever its T.
            eager = layer(x)
            replayed = graphed(x).clone()
            assert torch.equal(replayed, eager), (mode, T, (replayed - eager).abs().max())
            res = layer(x, return_raw=True)
            if T:
                y_ref, raw_ref = dense_moe_reference(
                    x.double(), res.topk_weights, res.topk_ids,
                    expert_weights=lambda g: syn.expert_weights(5, g, H, I))
                err = rel_err(eager, y_ref + layer.shared_experts.reference(x))
                assert err < TOL[torch.bfloat16], (mode, T, err)
                assert rel_err(res.raw, raw_ref) < TOL[torch.bfloat16], (mode, T)
                out[f"{mode}_T{T}"] = err
        for _ in range(20):  # bit-identical replays
            x = syn.tokens(seed, rank, 8, H).bfloat16().to(info.device)
            first = graphed(x).clone()
            assert torch.equal(graphed(x), first)
    return out


@pytest.mark.parametrize("W", [pytest.param(W, marks=_gpus(W)) for W in (2, 4)])
def test_graph_replay_equals_eager_and_oracle(W):
    launch(W, _graph_worker, 11, backend="nccl", timeout_s=300)


def _dead_peer_worker(info, seed):
    disp = SymmDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                          dtype=torch.bfloat16, max_tokens_per_rank=8, spin_limit=1 << 14)
    msg = "stayed away"  # rank 1 never dispatches, but keeps its memory mapped until the end
    if info.rank == 0:
        x = torch.randn(3, H, device=info.device).bfloat16()
        ids = torch.tensor([[0, 1, 8, 9]] * 3, device=info.device)
        disp.dispatch(x, torch.rand(3, K, device=info.device), ids)  # returns: no hang
        torch.cuda.synchronize()
        try:
            disp.check_peers()
        except RuntimeError as exc:
            msg = str(exc)
        else:
            msg = "a peer that never arrived was not reported"
    torch.distributed.barrier()
    return msg


@pytest.mark.gpu
@pytest.mark.skipif(_GPUS < 2, reason="needs 2 GPUs")
def test_peer_that_never_arrives_is_named():
    msgs = launch(2, _dead_peer_worker, 0, backend="nccl", timeout_s=120)
    assert "symm dispatcher peers=[1]" in msgs[0], msgs[0]
    assert "spin_limit=16384" in msgs[0]
