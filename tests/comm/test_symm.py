"""SymmDispatcher: the torch backend's whole check catalogue on NCCL ranks (W = 2, 4; GPUs
with peer access) and on gloo ranks (W = 2: the same kernels in Triton's interpreter, the
buffers in shared memory of the ranks' processes, tests/symm_shm.py), a captured CUDA graph of
the whole EPMoE forward against the eager one and the float64 oracle, and a peer that never
arrives reported by rank."""

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
from tests.symm_shm import shm_available

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


_SHM = [pytest.mark.skipif(shm_available() is not None, reason=str(shm_available()))]


@pytest.fixture(scope="module", params=[
    *[pytest.param(("nccl", W), id=f"nccl-W{W}", marks=_gpus(W)) for W in (2, 4)],
    *[pytest.param(("gloo", W), id=f"shm-W{W}", marks=_SHM) for W in (2,)]])
def suite(request):
    backend, W = request.param
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return W, seed, launch(W, catalogue._suite, seed, "symm" if backend == "nccl" else
                           "symm-shm", backend=backend, timeout_s=600)


@pytest.mark.parametrize("check", list(catalogue.CHECKS))
def test_catalogue(suite, check):
    W, seed, results = suite
    if check not in results[0]:
        pytest.skip(f"{check}: run on GPUs only (catalogue.SHM_SKIPS)")
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


def _symm_class(backend: str):
    """The dispatcher a test's ranks build: SymmDispatcher on NCCL ranks, its shared-memory
    form (tests/symm_shm.py) on gloo ranks."""
    if backend == "nccl":
        return SymmDispatcher
    from tests.symm_shm import ShmSymmDispatcher

    return ShmSymmDispatcher


_DEAD_SPIN = {"nccl": 1 << 14, "gloo": 1 << 11}  # interpreted spins take about 1 ms each


def _dead_peer_worker(info, backend):
    disp = _symm_class(backend)(Placement.contiguous(E, info.world_size), hidden_size=H,
                                top_k=K, dtype=torch.bfloat16, max_tokens_per_rank=8,
                                spin_limit=_DEAD_SPIN[backend])
    msg = "stayed away"  # rank 1 never dispatches, but keeps its memory mapped until the end
    if info.rank == 0:
        x = torch.randn(3, H, device=info.device).bfloat16()
        ids = torch.tensor([[0, 1, 8, 9]] * 3, device=info.device)
        disp.dispatch(x, torch.rand(3, K, device=info.device), ids)  # returns: no hang
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        try:
            disp.check_peers()
        except RuntimeError as exc:
            msg = str(exc)
        else:
            msg = "a peer that never arrived was not reported"
    torch.distributed.barrier()
    return msg


@pytest.mark.parametrize("backend", [pytest.param("nccl", marks=_gpus(2)),
                                     pytest.param("gloo", id="shm", marks=_SHM)])
def test_peer_that_never_arrives_is_named(backend):
    msgs = launch(2, _dead_peer_worker, backend, backend=backend, timeout_s=120)
    assert "symm dispatcher peers=[1]" in msgs[0], msgs[0]
    assert f"spin_limit={_DEAD_SPIN[backend]}" in msgs[0]


# ---- W = 3 on CPU ranks: uneven ownership, a rank without tokens, repeated combines ---------
_UNEVEN = ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])  # 10 experts over 3 ranks, unevenly


def _versus_torch(ref, sym, x, w, ids, g) -> tuple:
    """One batch through the torch backend ``ref`` and the symm one ``sym`` with the same
    random raw outputs for the rows both receive: (symm's dispatch, R, checks that
    symm's rows, ids, weights, combine (twice: a batch may be combined again until the next
    dispatch) and combine_raw equal torch's bit for bit)."""
    from rocm_moe.weighting import ExpertsOutput

    K, H = ids.shape[1], x.shape[1]
    a, b = ref.dispatch(x, w, ids), sym.dispatch(x, w, ids)
    R = a.x.shape[0]
    y = torch.randn(R, K, H, generator=g).to(x.dtype)
    y_sym = torch.zeros(b.x.shape[0], K, H, dtype=x.dtype)
    y_sym[:R] = y
    raw_a, raw_b = (ExpertsOutput(out=t, weights_applied=False) for t in (y, y_sym))
    checks = dict(
        rows=torch.equal(b.x[:R], a.x), ids=torch.equal(b.topk_ids[:R], a.topk_ids),
        weights=torch.equal(b.topk_weights[:R], a.topk_weights),
        combine=torch.equal(sym.combine(raw_b, b.handle), ref.combine(raw_a, a.handle)),
        again=torch.equal(sym.combine(raw_b, b.handle), ref.combine(raw_a, a.handle)),
        raw=torch.equal(sym.combine_raw(raw_b, b.handle), ref.combine_raw(raw_a, a.handle)))
    return b, R, checks


def _uneven_worker(info, seed):
    from rocm_moe.comm.torch import TorchDispatcher
    from tests.symm_shm import ShmSymmDispatcher

    p = Placement.from_lists(_UNEVEN, 10)
    kw = dict(hidden_size=24, top_k=3, dtype=torch.float16)  # K = 3: not a power of two
    ref, sym = TorchDispatcher(p, **kw), ShmSymmDispatcher(p, max_tokens_per_rank=13, **kw)
    out = {}
    for step, T in enumerate(([13, 0, 1], [2, 5, 0])[i][info.rank] for i in range(2)):
        g = torch.Generator().manual_seed(seed * 10 + step * 3 + info.rank)
        x = torch.randn(T, 24, generator=g).half()
        ids = torch.rand(T, 10, generator=g).topk(3, dim=1).indices.to(torch.int32)
        ids[torch.rand(T, 3, generator=g) < 0.2] = -1
        w = torch.rand(T, 3, generator=g)
        b, R, checks = _versus_torch(ref, sym, x, w, ids, g)
        out[f"step{step}"] = dict(
            checks, capacity=tuple(b.x.shape) == (3 * 13, 24), num_valid=int(b.num_valid) == R,
            contiguous=b.topk_ids.is_contiguous() and b.topk_weights.is_contiguous(),
            empty=bool((b.topk_ids[R:] == -1).all() and (b.topk_weights[R:] == 0).all()))
    return out


@pytest.mark.skipif(shm_available() is not None, reason=str(shm_available()))
def test_uneven_ranks_on_cpu_ranks():
    """W = 3 over shared memory: ranks owning 5, 2 and 3 experts, batches of 13 / 0 / 1 then
    2 / 5 / 0 tokens on one dispatcher (buffers reused), -1 slots: the received rows, ids and
    weights equal the torch backend's bit for bit (ids and weights contiguous), rows past R
    empty, combine (twice: a batch may be combined again until the next dispatch) and
    combine_raw equal torch's."""
    for rank, res in enumerate(launch(3, _uneven_worker, 5, backend="gloo", timeout_s=600)):
        for step, checks in res.items():
            assert all(checks.values()), (rank, step, checks)


# ---- W = 2 on CPU ranks: rows wider than a kernel block, unaligned rows, combine_raw in two
# rounds, stale handles ---------------------------------------------------------------------
def _refused(call) -> str:
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return "accepted"


def _edges_worker(info, seed):
    from rocm_moe.comm import symm
    from rocm_moe.comm.torch import TorchDispatcher
    from rocm_moe.weighting import ExpertsOutput
    from tests.symm_shm import ShmSymmDispatcher

    p, K, out = Placement.contiguous(8, 2), 3, {}
    # H = 20 fp16: 40-byte rows (not 16-byte aligned: the push kernels' ALIGNED=False form);
    # H = 2100: 1050 words, two pack_put blocks of 1024. K = 3 > W: combine_raw in 2 rounds.
    for H in (20, 2100):
        kw = dict(hidden_size=H, top_k=K, dtype=torch.float16)
        ref, sym = TorchDispatcher(p, **kw), ShmSymmDispatcher(p, max_tokens_per_rank=7, **kw)
        g = torch.Generator().manual_seed(seed + H + info.rank)
        T = (7, 2)[info.rank]
        x = torch.randn(T, H, generator=g).half()
        ids = torch.rand(T, 8, generator=g).topk(K, dim=1).indices.to(torch.int32)
        ids[0, 1] = -1
        w = torch.rand(T, K, generator=g)
        checks = _versus_torch(ref, sym, x, w, ids, g)[2]
        out[f"H{H}"] = dict(checks, aligned=sym._rows_aligned() == (H * 2 % 16 == 0))
    # Stale handles: refused once a later dispatch reused their lane (one lane, then two), or
    # once abandoned; before anything reads the lane.
    x, w, ids = torch.randn(2, 20).half(), torch.rand(2, K), torch.tensor([[0, 4, 7]] * 2)
    one = ShmSymmDispatcher(p, max_tokens_per_rank=7, hidden_size=20, top_k=K,
                            dtype=torch.float16)
    eo = ExpertsOutput(out=torch.zeros(14, 20, dtype=torch.float16), weights_applied=True)
    da = one.dispatch(x, w, ids)
    one.combine(eo, da.handle)
    one.combine(eo, one.dispatch(x, w, ids).handle)
    out["one_lane"] = _refused(lambda: one.combine(eo, da.handle))
    two = ShmSymmDispatcher(p, max_tokens_per_rank=7, hidden_size=20, top_k=K,
                            dtype=torch.float16, batches_in_flight=2)
    da, db = two.dispatch(x, w, ids), two.dispatch(x, w, ids)
    two.combine(eo, da.handle)
    dc = two.dispatch(x, w, ids)  # the lowest free lane: A's
    out["two_lanes"] = _refused(lambda: two.combine(eo, da.handle))
    two.combine(eo, db.handle)
    two.abandon(dc.handle, "test", RuntimeError("left"))
    out["abandoned"] = _refused(lambda: two.combine(eo, dc.handle))
    out["layout"] = symm.buffer_layout(2, 7, 20, K, torch.float16).total == one._buf.numel()
    return out


@pytest.mark.skipif(shm_available() is not None, reason=str(shm_available()))
def test_wide_and_unaligned_rows_raw_rounds_and_stale_handles_on_cpu_ranks():
    for rank, res in enumerate(launch(2, _edges_worker, 3, backend="gloo", timeout_s=600)):
        for case in ("H20", "H2100"):
            assert all(res[case].values()), (rank, case, res[case])
        for case in ("one_lane", "two_lanes", "abandoned"):
            assert "the symm backend's buffers hold batch(es)" in res[case], (rank, res[case])
        assert res["layout"], rank
