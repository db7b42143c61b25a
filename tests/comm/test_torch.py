"""Multi-rank dispatchers on spawned ranks: MORI's semantics, checked exactly.

TorchDispatcher on gloo (W = 2, 4) and NCCL (W = 2, GPUs); tests/comm/test_symm.py runs the
same checks on SymmDispatcher (``_suite(..., backend="symm")`` on GPUs, ``"symm-shm"`` on gloo
ranks: its kernels in Triton's interpreter over shared memory, tests/symm_shm.py).

Every rank builds ALL ranks' inputs from one seed, so each knows exactly what it must receive.
Inputs encode their sender (rank and token in the values) so a misrouted row is visible. One
launch per world size runs every check (spawning is slow); each check is its own pytest test.
"""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, ExpertsOutput, LocalDispatcher, Placement, RouterConfig, build_layout
from rocm_moe import synthetic as syn
from rocm_moe.comm.base import DispatchResult
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch
from rocm_moe.experts.reference import dense_moe_reference
from tests.dist_checks import collect_checks, run_checks

E, K, H, I = 16, 4, 8, 6
_BACKEND = ["torch"]  # set per spawned rank by _suite


def _dispatcher(placement: Placement, **kw):
    """The backend under test; symm needs a capacity (64 covers every case here)."""
    if _BACKEND[0] in ("symm", "symm-shm"):  # symm-shm: on CPU ranks (tests/symm_shm.py)
        from rocm_moe.comm.symm import SymmDispatcher
        from tests.symm_shm import ShmSymmDispatcher

        kw["max_tokens_per_rank"] = 64 if kw.get("max_tokens_per_rank") is None else \
            kw["max_tokens_per_rank"]
        cls = SymmDispatcher if _BACKEND[0] == "symm" else ShmSymmDispatcher
        return cls(placement, **kw)
    return TorchDispatcher(placement, **kw)


def _received(res: DispatchResult):
    """(x, ids, weights) of the R received rows (a capacity-sized result is cut at num_valid;
    its rows past R must have every id -1)."""
    if res.num_valid is None:
        return res.x, res.topk_ids, res.topk_weights
    n = int(res.num_valid)
    assert bool((res.topk_ids[n:] == -1).all()), "rows past num_valid must be empty"
    return res.x[:n], res.topk_ids[:n], res.topk_weights[:n]


def _case_inputs(case: str, W: int, seed: int):
    """Per-rank (x [T, H] float32, w [T, K] float32, ids [T, K] int64) for all W ranks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(W):
        T = {"random": 33, "zero_rank": 0 if r == 0 else 17, "one_rank": 9, "empty_slots": 11,
             "single": 1}[case]
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
            torch.empty(0, K, dtype=torch.int64)
        if case == "one_rank":  # every slot owned by the last rank
            e = E // W
            ids = torch.stack([torch.randperm(e, generator=g)[:K] + (W - 1) * e
                               for _ in range(T)])
        if case == "empty_slots" and T:
            ids[torch.rand(T, K, generator=g) < 0.3] = -1
            ids[0] = -1  # a token with no valid slot goes nowhere and combines to zeros
        # x encodes the sender: rank * 1000 + token in column 0.
        x = torch.randn(T, H, generator=g)
        x[:, 0] = r * 1000 + torch.arange(T)
        out.append((x, torch.rand(T, K, generator=g), ids))
    return out


def _expected_recv(inputs, placement: Placement, rank: int):
    xs, ws, ids = [], [], []
    for x, w, i in inputs:  # source rank order, then token order
        dest = placement.owner(i)
        keep = (dest == rank).any(1)
        xs.append(x[keep])
        ws.append(w[keep])
        ids.append(i[keep])
    return torch.cat(xs), torch.cat(ws), torch.cat(ids).to(torch.int32)


def _check_round_trip(disp, inputs, rank: int, dev: torch.device) -> None:
    p = disp.placement
    x, w, ids = inputs[rank]
    res = disp.dispatch(x.to(dev), w.to(dev), ids.to(dev))
    ex_x, ex_w, ex_ids = _expected_recv(inputs, p, rank)
    got_x, got_ids, got_w = _received(res)
    assert torch.equal(got_x.cpu(), ex_x), "received rows differ (order: source rank, token)"
    assert torch.equal(got_w.cpu(), ex_w)
    assert torch.equal(got_ids.cpu(), ex_ids), "ids must arrive global and unchanged"
    # identity experts, weighted: combine(dispatch(x)) == x * U
    U = torch.tensor([p.owner(row[row >= 0]).unique().numel() for row in ids])
    y = disp.combine(ExpertsOutput(out=res.x.clone(), weights_applied=True), res.handle)
    assert torch.equal(y.cpu(), x * U[:, None].float())
    # identity experts, raw, NaN in every slot they do not write
    local = disp.expert_map_on(dev).local_ids(res.topk_ids) >= 0
    raw = torch.full((res.num_received, K, H), float("nan"), device=dev)
    raw[local] = res.x[:, None, :].expand(-1, K, -1)[local]
    eo = ExpertsOutput(out=raw, weights_applied=False)
    y = disp.combine(eo, res.handle)
    w_valid = torch.where(ids >= 0, w, torch.zeros_like(w))
    torch.testing.assert_close(y.cpu(), x * w_valid.sum(1, keepdim=True), rtol=1e-6, atol=1e-4)
    back = disp.combine_raw(eo, res.handle)
    want = torch.where((ids >= 0)[..., None], x[:, None, :].expand(-1, K, -1), 0.0)
    assert torch.equal(back.cpu(), want)


def _check_cases(info, seed):
    W = info.world_size
    disp = _dispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                           dtype=torch.float32)
    for case in ("random", "zero_rank", "one_rank", "empty_slots", "single"):
        _check_round_trip(disp, _case_inputs(case, W, seed), info.rank, info.device)


def _check_expert_counts(info, seed):
    W = info.world_size
    p = Placement.contiguous(E, W)
    disp = _dispatcher(p, hidden_size=H, top_k=K, dtype=torch.float32)
    inputs = _case_inputs("random", W, seed)
    res = disp.dispatch(*(t.to(info.device) for t in inputs[info.rank]))
    counts = build_layout(_received(res)[1], disp.expert_map_on(info.device)).tokens_per_expert
    all_ids = torch.cat([i for _, _, i in inputs])
    want = [int((all_ids == g).sum()) for g in p.local_experts(info.rank)]
    assert counts.tolist() == want


def _check_iterations(info, seed):
    W = info.world_size
    disp = _dispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=64)
    cases = ["random", "single", "zero_rank", "empty_slots", "one_rank", "random"]
    for i, case in enumerate(cases):  # 6 batches of different sizes on one dispatcher
        _check_round_trip(disp, _case_inputs(case, W, seed + i), info.rank, info.device)


def _layer(mode, dtype, dispatcher, device):
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=dispatcher, weight_mode=mode, dtype=dtype,
                  shared_intermediate_size=5, device=device)
    layer.reset_parameters(seed=7)
    return layer


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _check_epmoe_matches_reference(info, seed):
    W, rank = info.world_size, info.rank
    for T in (0 if rank == 0 else 5, 33):
        x = syn.tokens(seed, rank, T, H).double().to(info.device)
        for mode in ("experts", "combine"):
            disp = _dispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                                   dtype=torch.float64)
            layer = _layer(mode, torch.float64, disp, info.device)
            single = _layer(mode, torch.float64, None, info.device)  # all experts, one process
            out = layer(x, return_raw=True)
            y_ref, raw_ref = dense_moe_reference(
                x, out.topk_weights, out.topk_ids,
                expert_weights=lambda g: syn.expert_weights(7, g, H, I))
            y_ref = y_ref + layer.shared_experts.reference(x)
            assert _max_diff(out.out, y_ref) < 1e-12
            assert _max_diff(out.raw, raw_ref) < 1e-12
            assert _max_diff(layer(x), single(x)) < 1e-12


def _check_bit_identical_repeats(info, seed):
    disp = _dispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                           dtype=torch.bfloat16)
    layer = _layer("combine", torch.bfloat16, disp, info.device)
    x = syn.tokens(seed, info.rank, 33, H).bfloat16().to(info.device)
    first = layer(x)
    for _ in range(19):
        assert torch.equal(layer(x), first)


BAD = {
    "ids_range": lambda x, w, i: (x, w, torch.full_like(i, E)),
    "ids_huge": lambda x, w, i: (x, w, torch.full_like(i, 2**40)),
    "ids_dup": lambda x, w, i: (x, w, torch.zeros_like(i)),
    "ids_float": lambda x, w, i: (x, w, i.float()),
    "w_nan": lambda x, w, i: (x, torch.full_like(w, float("nan")), i),
    "w_negative": lambda x, w, i: (x, -w, i),
    "w_dtype": lambda x, w, i: (x, w.double(), i),
    "x_dtype": lambda x, w, i: (x.double(), w, i),
    "x_hidden": lambda x, w, i: (x[:, :-1], w, i),
    "ids_shape": lambda x, w, i: (x, w, i[:, :-1]),
    "capacity": lambda x, w, i: (torch.cat([x, x]), torch.cat([w, w]), torch.cat([i, i])),
}


def _check_bad_input(info, seed):
    disp = _dispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=40)
    inputs = _case_inputs("random", info.world_size, seed)
    messages = {}
    for name, bad in BAD.items():
        try:
            disp.dispatch(*(t.to(info.device) for t in bad(*inputs[info.rank])))
        except (ValueError, TypeError) as exc:
            messages[name] = f"{type(exc).__name__}: {exc}"
        else:
            raise AssertionError(f"{name} was accepted")
    # No rank entered a collective: the group is still in step.
    _check_round_trip(disp, inputs, info.rank, info.device)
    return messages


def _check_config_mismatch(info, seed):
    try:
        _dispatcher(Placement.contiguous(E, info.world_size), hidden_size=H + info.rank,
                        top_k=K, dtype=torch.float32)
    except ValueError as exc:
        return str(exc)  # the test checks every rank's message
    raise AssertionError("mismatched hidden_size was accepted")


def _check_bad_argument_on_one_rank(info, seed):
    """One rank builds its dispatcher with a bad argument: it raises its own error and every
    other rank raises naming it (the agreement exchange carries the refusal), none waits."""
    failing = info.world_size - 1
    try:
        _dispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                    dtype=torch.float32, max_tokens_per_rank=0 if info.rank == failing else 40)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("the peers of a refusing rank built their dispatchers")


def _check_bad_timeout_on_one_rank_with_a_group(info, seed):
    """The same with ``group=`` and ``timeout=`` passed: the refusing rank still enters the
    timeout group's collective new_group with its peers (it skipped it: they hung there)."""
    import datetime

    import torch.distributed as dist

    if _BACKEND[0] != "torch":
        return "the torch backend's timeout"
    failing = info.world_size - 1
    timeout = datetime.timedelta(seconds=-1 if info.rank == failing else 60)
    try:
        TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                        dtype=torch.float32, group=dist.group.WORLD, timeout=timeout)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        assert ("timeout=datetime.timedelta(days=-1" in msg) if info.rank == failing else \
            (f"dispatcher arguments of rank(s)=[{failing}]" in msg), msg
        return msg
    raise AssertionError("the peers of a refusing rank built their dispatchers")


def _expect_refusal(call, own: bool, own_match: str, failing: int) -> str:
    """``call()`` must raise: this rank's own error if ``own``, else PeerRefusal naming the
    failing rank."""
    from rocm_moe.comm.base import PeerRefusal

    caught = None
    try:
        call()
    except (ValueError, TypeError) as exc:
        caught = exc
    if caught is None:
        raise AssertionError("the batch was accepted")
    msg = str(caught)
    if own:
        assert not isinstance(caught, PeerRefusal), msg
        assert own_match in msg, msg
    else:
        assert isinstance(caught, PeerRefusal), repr(caught)
        assert f"rank(s) [{failing}] of the EP group refused" in msg, msg
        assert f"Fix: read rank {failing}'s error" in msg, msg
    return f"{type(caught).__name__}: {msg}"


def _check_refusal_on_one_rank_reaches_every_rank(info, seed):
    """A refusal on one rank (a batch over capacity, a NaN token) is a refusal on every rank,
    before any payload moves; the group stays in step for the next batch."""
    if _BACKEND[0] != "torch":
        return "the torch backend's contract"
    W, rank, dev = info.world_size, info.rank, info.device
    failing = W - 1
    disp = _dispatcher(Placement.contiguous(E, W), hidden_size=H, top_k=K,
                       dtype=torch.float32, max_tokens_per_rank=40)
    inputs = _case_inputs("random", W, seed)
    x, w, ids = (t.to(dev) for t in inputs[rank])
    big = (torch.cat([x, x]), torch.cat([w, w]), torch.cat([ids, ids])) if rank == failing \
        else (x, w, ids)
    msgs = [_expect_refusal(lambda: disp.dispatch(*big), rank == failing,
                            "exceeds max_tokens_per_rank=40", failing)]
    _check_round_trip(disp, inputs, rank, dev)
    layer = _layer("experts", torch.float32, _dispatcher(
        Placement.contiguous(E, W), hidden_size=H, top_k=K, dtype=torch.float32), dev)
    tokens = syn.tokens(seed, rank, 5, H).float().to(dev)
    bad = tokens.clone()
    bad[2, 1] = float("nan")
    msgs.append(_expect_refusal(lambda: layer(bad if rank == failing else tokens),
                                rank == failing, "hidden_states=contains nan", failing))
    assert layer(tokens).shape == (5, H)  # still in step
    return msgs


CHECKS = collect_checks(globals(), skip=("round_trip",))


# Interpreted kernels (symm-shm) take about half a second a forward: 20 repeats of the layer
# there add 10 s of CI for what the GPU runs of the same check cover.
SHM_SKIPS = ("bit_identical_repeats",)


def _suite(info, seed, backend="torch"):
    _BACKEND[0] = backend
    skip = SHM_SKIPS if backend == "symm-shm" else ()
    return run_checks({k: v for k, v in CHECKS.items() if k not in skip}, info, seed)


_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module", params=[
    pytest.param(("gloo", 2), id="gloo-W2"),
    pytest.param(("gloo", 4), id="gloo-W4"),
    pytest.param(("nccl", 2), id="nccl-W2", marks=[
        pytest.mark.gpu, pytest.mark.skipif(_GPUS < 2, reason="needs 2 GPUs")]),
])
def suite(request):
    backend, W = request.param
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return W, seed, launch(W, _suite, seed, backend=backend, timeout_s=60)


@pytest.mark.parametrize("check", [c for c in CHECKS if c not in (
    "bad_input", "config_mismatch", "bad_argument_on_one_rank")])
def test_check(suite, check):
    W, seed, results = suite
    for rank, res in enumerate(results):
        assert res[check]["ok"], f"W={W} rank={rank} seed={seed}\n{res[check]['value']}"


def test_bad_input_same_error_on_every_rank(suite):
    _, seed, results = suite
    for rank, res in enumerate(results):
        assert res["bad_input"]["ok"], f"rank={rank} seed={seed}\n{res['bad_input']['value']}"
    # Same error type, field and rule everywhere (the quoted values are each rank's own data).
    keys = [{n: m.split("=", 1)[0] for n, m in res["bad_input"]["value"].items()}
            for res in results]
    assert all(k == keys[0] for k in keys)
    for res in results:
        msgs = res["bad_input"]["value"]
        assert "contains 16" in msgs["ids_range"]
        assert "contains 1099511627776" in msgs["ids_huge"]
        assert "at most once" in msgs["ids_dup"]
        assert msgs["ids_float"].startswith("TypeError: topk_ids.dtype")
        assert "finite" in msgs["w_nan"]
        assert ">= 0" in msgs["w_negative"]
        assert msgs["w_dtype"].startswith("TypeError: topk_weights.dtype")
        assert msgs["x_dtype"].startswith("TypeError: x.dtype")
        assert "x.shape" in msgs["x_hidden"]
        assert "topk_ids.shape" in msgs["ids_shape"]
        assert "max_tokens_per_rank=40" in msgs["capacity"]


def test_config_mismatch_fails_on_every_rank(suite):
    for res in suite[2]:
        assert res["config_mismatch"]["ok"], res["config_mismatch"]["value"]
        assert "dispatcher hidden_size by rank" in res["config_mismatch"]["value"]
        assert "every rank of the EP group" in res["config_mismatch"]["value"]


def test_bad_argument_on_one_rank_fails_every_rank(suite):
    W = suite[0]
    for rank, res in enumerate(suite[2]):
        msg = res["bad_argument_on_one_rank"]["value"]
        assert res["bad_argument_on_one_rank"]["ok"], msg
        if rank == W - 1:
            assert msg.startswith("max_tokens_per_rank=0: must be >= 1"), msg
        else:
            assert f"dispatcher arguments of rank(s)=[{W - 1}]: were refused there" in msg, msg
            assert "max_tokens_per_rank=0" in msg, msg


def test_torch_dispatcher_needs_a_group():
    with pytest.raises(ValueError, match="init_process_group"):
        TorchDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K, dtype=torch.float32)


def test_local_dispatcher_unaffected():
    assert LocalDispatcher(Placement.contiguous(E, 1)).world_size == 1
