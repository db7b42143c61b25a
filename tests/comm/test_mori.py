"""MoriDispatcher: pure config logic, and the adapter driving a fake op that enforces MORI's
contract on spawned gloo ranks (W = 2, 4), with AITER's fake for the experts."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, ExpertsOutput, Placement, RouterConfig, route
from rocm_moe import synthetic as syn
from rocm_moe.comm.mori import MoriDispatcher, mori_config
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch
from rocm_moe.experts.aiter import AiterExperts
from rocm_moe.experts.reference import dense_moe_reference
from tests.dist_checks import collect_checks, run_checks
from tests.fakes import ContractError, FakeFusedMoe, FakeMoriOp

E, K, H, I, CAP = 16, 4, 8, 6, 40


# ---- pure logic ---------------------------------------------------------------------------------
def test_config_deepseek_ep8():
    cfg = mori_config(Placement.contiguous(256, 8), 5, hidden_size=7168, top_k=8,
                      dtype=torch.bfloat16, max_tokens_per_rank=4096)
    assert cfg == dict(data_type=torch.bfloat16, rank=5, world_size=8, hidden_dim=7168,
                       scale_dim=0, scale_type_size=1, max_token_type_size=4,
                       max_num_inp_token_per_rank=4096, num_experts_per_rank=32,
                       num_experts_per_token=8, kernel_type="IntraNode", gpu_per_node=8)
    across = mori_config(Placement.contiguous(256, 16), 0, hidden_size=7168, top_k=8,
                         dtype=torch.bfloat16, max_tokens_per_rank=128)
    assert across["kernel_type"] == "InterNodeV1"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(placement=Placement.from_lists([[0, 3], [1, 2]], 4)), "non-contiguous"),
        (dict(dtype=torch.float16), "dtype"),
        (dict(max_tokens_per_rank=None), "max_tokens_per_rank"),
        (dict(kernel_type="Fast"), "kernel_type"),
    ],
    ids=["placement", "dtype", "capacity", "kernel"],
)
def test_config_errors(kw, match):
    args = dict(placement=Placement.contiguous(4, 2), hidden_size=8, top_k=2,
                dtype=torch.bfloat16, max_tokens_per_rank=16)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        mori_config(args.pop("placement"), 0, **args)


# ---- multi-rank, through the fakes --------------------------------------------------------------
def _mori(info, cls=MoriDispatcher, dtype=torch.float32):
    p = Placement.contiguous(E, info.world_size)
    cfg = mori_config(p, info.rank, hidden_size=H, top_k=K, dtype=dtype, max_tokens_per_rank=CAP)
    return cls(p, hidden_size=H, top_k=K, dtype=dtype, max_tokens_per_rank=CAP,
               op=FakeMoriOp(cfg))


def _batch(rank, T, seed, empty=0.2):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    if T:
        ids[torch.rand(T, K, generator=g) < empty] = -1
    x = torch.randn(T, H, generator=g)
    return x, torch.rand(T, K, generator=g), ids


def _check_identity_round_trip(info, seed):
    d = _mori(info)
    for i, T in enumerate([33, 0 if info.rank == 0 else 7, 1, 40, 12, 33]):  # 6 batches
        x, w, ids = _batch(info.rank, T, seed + i)
        res = d.dispatch(x, w, ids)
        assert not res.x.isnan().any(), "only the delivered rows are exposed"
        local = d.expert_map.local_ids(res.topk_ids) >= 0
        assert bool(local.any(1).all()), "every delivered row has a local expert"
        U = torch.tensor([d.placement.owner(r[r >= 0]).unique().numel() for r in ids])
        y = d.combine(ExpertsOutput(out=res.x.clone(), weights_applied=True), res.handle)
        assert torch.equal(y, x * U[:, None].float())
    assert d.op.calls.count("dispatch") == 6


def _check_layer_matches_torch_backend(info, seed):
    x = syn.tokens(seed, info.rank, 29, H)
    for mode in ("experts", "combine"):
        outs = []
        for disp in (_mori(info), TorchDispatcher(Placement.contiguous(E, info.world_size),
                                                  hidden_size=H, top_k=K, dtype=torch.float32)):
            layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                          dispatcher=disp, weight_mode=mode)
            layer.reset_parameters(seed=3)
            outs.append(layer(x))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def _check_mori_aiter_pipeline(info, seed):
    """MORI + AITER as vLLM/SGLang pair them, against the float64 oracle, both weight modes."""
    x = syn.tokens(seed, info.rank, 31, H).bfloat16()
    for mode in ("experts", "combine"):
        layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                      dispatcher=_mori(info, dtype=torch.bfloat16),
                      experts=AiterExperts(fused_moe=FakeFusedMoe()), weight_mode=mode,
                      dtype=torch.bfloat16)
        layer.reset_parameters(seed=3)
        y = layer(x)
        routing = route(layer.gate(x), layer.router)  # the layer's routing, for the oracle
        ref, _ = dense_moe_reference(x, routing.topk_weights, routing.topk_ids, expert_weights=(
            lambda g: tuple(t.bfloat16() for t in syn.expert_weights(3, g, H, I))))
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, (mode, err)


def _check_return_raw_refused_before_any_collective(info, seed):
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=_mori(info))
    try:
        layer(syn.tokens(seed, info.rank, 5, H), return_raw=True)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("return_raw was accepted")
    assert "one summed row per token" in message
    assert layer.dispatcher.op.calls == [], "refused before MORI ran"


class _DispatchedIdsToCombine(MoriDispatcher):
    def _combine(self, y_RH, handle):  # the bug of mori#475 / vllm#52639
        out, _ = self.op.combine(y_RH, None, handle.recv_topk_ids, call_reset=True)
        return out[:handle.num_tokens]


class _Int64Ids(MoriDispatcher):
    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        return super()._dispatch(x_TH, topk_weights_TK, topk_ids_TK.long(), batch_id)


class _NoReset(MoriDispatcher):
    def _combine(self, y_RH, handle):
        out, _ = self.op.combine(y_RH, None, handle.topk_ids, call_reset=False)
        self._in_flight = None
        return out[:handle.num_tokens]


def _expect_contract_error(info, seed, cls, batches=1):
    d = _mori(info, cls=cls)
    try:
        for i in range(batches):
            x, w, ids = _batch(info.rank, 9, seed + i, empty=0.0)
            res = d.dispatch(x, w, ids)
            d.combine(ExpertsOutput(out=res.x.clone(), weights_applied=True), res.handle)
    except ContractError as exc:
        return str(exc)
    raise AssertionError(f"{cls.__name__} passed the fake")


def _check_fake_catches_dispatched_ids(info, seed):
    return _expect_contract_error(info, seed, _DispatchedIdsToCombine)


def _check_fake_catches_int64_ids(info, seed):
    return _expect_contract_error(info, seed, _Int64Ids)


def _check_fake_catches_missing_reset(info, seed):
    return _expect_contract_error(info, seed, _NoReset, batches=2)


def _check_adapter_guards(info, seed):
    d = _mori(info)
    msgs = {}
    x, w, ids = _batch(info.rank, CAP + 1, seed)
    try:
        d.dispatch(x, w, ids)
    except ValueError as exc:
        msgs["capacity"] = str(exc)
    assert d.op.calls == [], "capacity refused before MORI ran"
    x, w, ids = _batch(info.rank, 5, seed)
    first = d.dispatch(x, w, ids)
    try:
        d.dispatch(x, w, ids)
    except ValueError as exc:
        msgs["two_in_flight"] = str(exc)
    d.combine(ExpertsOutput(out=first.x.clone(), weights_applied=True), first.handle)
    second = d.dispatch(x, w, ids)
    try:
        d.combine(ExpertsOutput(out=second.x.clone(), weights_applied=True), first.handle)
    except ValueError as exc:
        msgs["stale_handle"] = str(exc)
    d.combine(ExpertsOutput(out=second.x.clone(), weights_applied=True), second.handle)
    return msgs


def _check_sanity_suite_on_fakes(info, seed):
    """What `rocm-moe sanity --comm mori --experts aiter` checks on MI300, on the fakes."""
    from rocm_moe.sanity import run_sanity

    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=_mori(info, dtype=torch.bfloat16),
                  experts=AiterExperts(fused_moe=FakeFusedMoe()), dtype=torch.bfloat16)
    layer.reset_parameters(seed=3)
    rows = run_sanity(layer, seed=seed % 1000, expert_weights=lambda g: tuple(
        t.bfloat16() for t in syn.expert_weights(3, g, H, I)))
    failed = [r for r in rows if not r.passed]
    assert not failed, failed
    assert {r.check for r in rows} >= {"single_expert", "half_weight", "raw_unweighted",
                                       "topk_sum", "modes_agree", "comm_identity"}


CHECKS = collect_checks(globals(), skip=())


def _suite(info, seed):
    return run_checks(CHECKS, info, seed)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"gloo-W{w}")
def suite(request):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return seed, launch(request.param, _suite, seed, backend="gloo", timeout_s=60)


@pytest.mark.parametrize("check", list(CHECKS))
def test_mori_adapter(suite, check):
    seed, results = suite
    for rank, res in enumerate(results):
        assert res[check]["ok"], f"rank={rank} seed={seed}\n{res[check]['value']}"


def test_fake_messages(suite):
    _, results = suite
    for res in results:
        assert "not the dispatched ones" in res["fake_catches_dispatched_ids"]["value"]
        assert "int32" in res["fake_catches_int64_ids"]["value"]
        assert "reset() first" in res["fake_catches_missing_reset"]["value"]
        guards = res["adapter_guards"]["value"]
        assert "mori#356" in guards["capacity"]
        assert "still in MORI" in guards["two_in_flight"]
        assert "wrong rows" in guards["stale_handle"]


@pytest.mark.gpu
def test_real_mori_is_importable_on_rocm():
    pytest.importorskip("mori")
    if torch.version.hip is None:
        pytest.skip("needs ROCm")
    from rocm_moe.comm.mori import build_mori_op  # noqa: F401  (run: rocm-moe sanity --comm mori)
