"""Batches larger than the dispatcher's capacity run in chunks of at most max_tokens_per_rank:
ranks agree on the chunk count (a rank with fewer tokens joins with empty chunks, so nothing
deadlocks), the result is the float64 oracle's and, in invariant mode, the same bits as one big
batch; a refusal on one rank before the agreement reaches every rank; a captured batch above the
capacity is refused. Also: one dispatcher shared by many layers (``rocm_moe.comm.pool``), and
the one-batch-in-flight rule of buffer-holding backends."""

from __future__ import annotations

import math

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig, dense_moe_reference
from rocm_moe import synthetic as syn
from rocm_moe.comm import pool
from rocm_moe.comm.base import PeerRefusal
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch
from rocm_moe.weighting import ExpertsOutput
from tests.conftest import TOL, rel_err

E, K, H, I = 12, 3, 16, 8
CAP = 8
SEED = 11
ROUTER = RouterConfig.qwen3_moe(E, K)
# Tokens per rank: 1, the capacity, 3.5x the capacity (28) and none, spread over the ranks so
# that their chunk counts differ (1, 1, 4, 1 chunks).
SHARES = {1: (28,), 2: (28, 1), 3: (1, CAP, 28)}
CASES = [(W, i) for W, shares in SHARES.items() for i in range(len(shares))]


def _layer(dispatcher, mode="experts", invariant=False, dtype=torch.float32) -> EPMoE:
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER, dispatcher=dispatcher,
                  weight_mode=mode, dtype=dtype, invariant=invariant)
    layer.reset_parameters(seed=SEED)
    return layer


def _x(rank: int, n: int, dtype=torch.float32) -> torch.Tensor:
    return (syn.tokens(SEED, rank, n, H) * 3).to(dtype)


def _oracle(layer: EPMoE, x: torch.Tensor) -> torch.Tensor:
    r = layer.route_tokens(x)
    ew = lambda g: syn.expert_weights(SEED, g, H, I)  # noqa: E731
    return dense_moe_reference(x.double(), r.topk_weights, r.topk_ids, expert_weights=ew)[0]


def _chunk_worker(info, shares: tuple[int, ...]) -> dict:
    W, r = info.world_size, info.rank
    p = Placement.contiguous(E, W)
    out = {}
    for mode in ("experts", "combine"):
        capped = TorchDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32,
                                 max_tokens_per_rank=CAP)
        whole = TorchDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32)
        x = _x(r, shares[r])
        layer = _layer(capped, mode)
        y = layer(x)
        res = layer(x, return_raw=True)
        inv_c, inv_w = _layer(capped, mode, invariant=True), _layer(whole, mode, invariant=True)
        a, b = inv_c(x, return_raw=True), inv_w(x, return_raw=True)
        out[mode] = dict(
            chunks=capped.num_chunks(shares[r]), err=rel_err(y, _oracle(layer, x)),
            raw_err=rel_err(res.out, _oracle(layer, x)), shape=list(y.shape),
            invariant_equal=torch.equal(a.out, b.out) and torch.equal(a.raw, b.raw)
            and torch.equal(a.topk_ids, b.topk_ids))
    return out


def _group_worker(info, parts: tuple[str, ...]) -> dict:
    """This file's multi-rank checks, in order, on one launch per W (spawning the ranks costs
    more than the checks): ``chunks``, ``pool`` (one dispatcher for every layer), ``refusal``
    (last: a refusal leaves the group in step, but nothing after it relies on that)."""
    run = {"chunks": lambda: _chunk_worker(info, SHARES[info.world_size]),
           "pool": lambda: _pool_worker(info), "refusal": lambda: _refusal_worker(info)}
    return {part: run[part]() for part in parts}


PARTS = {1: ("chunks", "pool"), 2: ("chunks", "pool"), 3: ("chunks", "refusal")}


@pytest.fixture(scope="module")
def ranks():
    """``ranks(W)``: every rank's results of ``_group_worker`` at W, launched once."""
    done = {}

    def get(W: int) -> list[dict]:
        if W not in done:
            done[W] = launch(W, _group_worker, PARTS[W], backend="gloo", timeout_s=120)
        return done[W]

    return get


@pytest.mark.parametrize("W", sorted(SHARES))
def test_batches_above_capacity_run_in_agreed_chunks(W, ranks):
    shares = SHARES[W]
    results = [res["chunks"] for res in ranks(W)]
    want_chunks = max(max(1, math.ceil(n / CAP)) for n in shares)
    for r, res in enumerate(results):
        for mode, case in res.items():
            assert case["chunks"] == want_chunks, (r, mode, case)
            assert case["shape"] == [shares[r], H]
            assert case["err"] <= TOL[torch.float32], (r, mode, case)
            assert case["raw_err"] <= TOL[torch.float32], (r, mode, case)
            # Invariant mode: chunked == one big batch, bit for bit.
            assert case["invariant_equal"], (r, mode)


def test_one_rank_chunks_without_a_collective():
    disp = LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=CAP)
    assert [disp.num_chunks(n) for n in (0, 1, CAP, CAP + 1, 28)] == [1, 1, 1, 2, 4]
    layer, x = _layer(disp), _x(0, 28)
    assert rel_err(layer(x), _oracle(layer, x)) <= TOL[torch.float32]
    whole = _layer(LocalDispatcher(Placement.contiguous(E, 1)), invariant=True)
    assert torch.equal(_layer(disp, invariant=True)(x), whole(x))


@pytest.mark.parametrize("bad", [-1, 2.0, True, None])
def test_num_chunks_refuses_a_bad_count(bad):
    disp = LocalDispatcher(Placement.contiguous(E, 1), max_tokens_per_rank=CAP)
    with pytest.raises((TypeError, ValueError), match="num_tokens"):
        disp.num_chunks(bad)


def test_a_captured_batch_above_capacity_is_refused(monkeypatch):
    W = 2  # a 2-rank placement on a dispatcher that never runs a collective here
    disp = LocalDispatcher(Placement.contiguous(E, 1), max_tokens_per_rank=CAP)
    monkeypatch.setattr(type(disp), "world_size", property(lambda self: W))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert disp.num_chunks(CAP) == 1  # no collective under capture
    with pytest.raises(ValueError, match="captured batch must fit"):
        disp.num_chunks(CAP + 1)


def _refusal_worker(info) -> str:
    p = Placement.contiguous(E, info.world_size)
    disp = TorchDispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32,
                           max_tokens_per_rank=CAP)
    layer = _layer(disp)
    x = _x(info.rank, 28)
    if info.rank == 1:
        x[3, 0] = float("nan")  # refused before the chunk-count agreement
    try:
        layer(x)
    except PeerRefusal as exc:
        return "peer: " + str(exc)
    except ValueError as exc:
        return "own: " + str(exc)
    return "ran"


def test_a_refusal_before_the_agreement_reaches_every_rank(ranks):
    msgs = [res["refusal"] for res in ranks(3)]
    assert msgs[1].startswith("own: "), msgs
    assert "hidden_states" in msgs[1], msgs
    for r in (0, 2):
        assert msgs[r].startswith("peer: "), msgs
        assert "[1]" in msgs[r], msgs


# ---- one dispatcher for every layer --------------------------------------------------------
def _pool_worker(info) -> dict:
    pool.clear()
    p = Placement.contiguous(E, info.world_size)
    name = "torch" if info.world_size > 1 else "local"
    get = lambda: pool.shared_dispatcher(  # noqa: E731
        name, p, hidden_size=H, top_k=K, dtype=torch.float32, max_tokens_per_rank=CAP,
        rank=info.rank)
    layers = [_layer(get()) for _ in range(4)]
    for j, layer in enumerate(layers):  # each its own weights
        layer.reset_parameters(seed=SEED + j)
    x = _x(info.rank, 19)
    h, ref = x.clone(), x.double()
    for j, layer in enumerate(layers):
        h = h + layer(h)
        r = layer.route_tokens(ref.float())
        ew = lambda g, j=j: syn.expert_weights(SEED + j, g, H, I)  # noqa: E731
        ref = ref + dense_moe_reference(ref, r.topk_weights, r.topk_ids, expert_weights=ew)[0]
    return dict(n=len(pool.shared_dispatchers()),
                same=all(la.dispatcher is layers[0].dispatcher for la in layers),
                other_slot=pool.shared_dispatcher(
                    name, p, hidden_size=H, top_k=K, dtype=torch.float32,
                    max_tokens_per_rank=CAP, rank=info.rank, slot=1) is not layers[0].dispatcher,
                err=rel_err(h, ref))


@pytest.mark.parametrize("W", [1, 2])
def test_layers_share_one_dispatcher(W, ranks):
    for res in (r["pool"] for r in ranks(W)):
        assert res["n"] == 1, res
        assert res["same"], res
        assert res["other_slot"], res
        assert res["err"] <= 10 * TOL[torch.float32], res


def test_shared_dispatcher_refuses_bad_arguments():
    p = Placement.contiguous(E, 1)
    with pytest.raises(TypeError, match="placement"):
        pool.shared_dispatcher("local", "p", hidden_size=H, top_k=K, dtype=torch.float32,
                               max_tokens_per_rank=CAP)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        pool.shared_dispatcher("local", p, hidden_size=H, top_k=K, dtype=torch.float32,
                               max_tokens_per_rank=0)
    with pytest.raises(TypeError, match="slot"):
        pool.shared_dispatcher("local", p, hidden_size=H, top_k=K, dtype=torch.float32,
                               max_tokens_per_rank=CAP, slot="1")
    with pytest.raises(ValueError, match="comm backend"):
        pool.shared_dispatcher("nccl", p, hidden_size=H, top_k=K, dtype=torch.float32,
                               max_tokens_per_rank=CAP)


def test_comm_memory_is_one_buffer_whatever_the_layer_count():
    # DeepSeek-V3 at EP 8, 4096 tokens per rank: symm's buffer is W * cap rows in (payload,
    # ids, weights, token) and 2 * W * cap partials back; MORI's heap share per the op's own
    # layout (comm.mori.heap_bytes).
    symm = pool.comm_bytes("symm", 8, 4096, 7168, 8, torch.bfloat16)
    assert 2 * 8 * 4096 * 7168 * 2 < symm < 4 * 8 * 4096 * 7168 * 2
    assert pool.comm_bytes("torch", 8, 4096, 7168, 8) == 0
    mori = pool.comm_bytes("mori", 8, 4096, 7168, 8, num_experts=256)
    assert 0.8e9 < mori < 1.2e9  # comm.mori.heap_bytes' docstring: about 1.0 GB


# ---- one batch in flight on buffer-holding backends ----------------------------------------
class _Holding(LocalDispatcher):
    holds_batch = True  # as symm and MORI: results are views of the dispatcher's buffers


def test_a_second_dispatch_before_combine_is_refused():
    d = _Holding(Placement.contiguous(E, 1), hidden_size=H, top_k=K, dtype=torch.float32)
    x = _x(0, 5)
    w = torch.full((5, K), 1.0 / K)
    ids = torch.tensor([[0, 1, 2]] * 5, dtype=torch.int32)
    first = d.dispatch(x, w, ids)
    with pytest.raises(ValueError, match="dispatched but not combined"):
        d.dispatch(x, w, ids)
    d.combine(ExpertsOutput(out=first.x, weights_applied=True), first.handle)
    second = d.dispatch(x, w, ids)  # combined: free again
    d.abandon(second.handle, "experts", RuntimeError("boom"))
    third = d.dispatch(x, w, ids)  # abandoned: free again
    d.combine_raw(ExpertsOutput(out=third.x[:, None].expand(-1, K, -1).contiguous(),
                                weights_applied=False), third.handle)
    d.dispatch(x, w, ids)


# ---- the engines' defaults ------------------------------------------------------------------
def test_fastest_backends_follow_the_rank_device(monkeypatch):
    from rocm_moe import backends

    cpu = torch.device("cpu")
    assert pool.fastest_comm(1, cpu)[0] == "local"
    assert pool.fastest_comm(4, cpu)[0] == "torch"
    assert pool.fastest_experts(cpu)[0] == "reference"
    # A ROCm GPU with MORI and AITER installed: both preferred (availability faked here).
    monkeypatch.setattr(type(backends.BACKENDS["comm:mori"]), "availability",
                        lambda self: None if self.name in ("mori", "aiter") else "absent")
    gpu = torch.device("cuda", 0)
    assert pool.fastest_comm(8, gpu)[0] == "mori"
    assert pool.fastest_experts(gpu)[0] == "aiter"
    assert pool.fastest_comm(1, gpu)[0] == "local"
    # A model MORI cannot place (60 experts on 8 ranks, Qwen1.5-MoE): the next fastest, why said.
    from rocm_moe.integrations import vllm as rv

    monkeypatch.setattr(pool, "_one_host", lambda group: True)
    refusal = rv._mori_refusal(60, 8, "linear")
    assert "num_experts=60" in refusal
    assert rv._mori_refusal(64, 8, "linear") is None
    assert "round_robin" in rv._mori_refusal(64, 8, "round_robin")
    name, why = pool.fastest_comm(8, gpu, mori_refusal=refusal)
    assert name != "mori"
    assert f"not mori: {refusal}" in why


def test_num_chunks_from_the_callers_group_maximum(monkeypatch):
    disp = LocalDispatcher(Placement.contiguous(E, 1), max_tokens_per_rank=CAP)
    monkeypatch.setattr(type(disp), "world_size", property(lambda self: 2))
    monkeypatch.setattr(type(disp), "_agree_max", lambda self, v: pytest.fail("a collective"))
    assert disp.num_chunks(1, group_max_tokens=28) == 4  # a peer has 28 tokens: 4 chunks
    assert disp.num_chunks(0, group_max_tokens=0) == 1
    with pytest.raises(ValueError, match="group_max_tokens"):
        disp.num_chunks(9, group_max_tokens=8)  # below this rank's own count
