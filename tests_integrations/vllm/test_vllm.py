"""rocm_moe inside vLLM 0.33.0: vLLM's own FusedMoEKernel over rocm_moe's prepare/finalize and
experts on 2 and 3 gloo ranks (uneven tokens, a rank with none, both weight modes, float32 and
bfloat16) against a float64 oracle; the plug-in as vLLM instantiates it; vLLM's placements; the
signatures the adapter relies on; refusals; diagnose and sanity on the layer vLLM runs."""

from __future__ import annotations

import functools
import inspect
import os

import pytest
import torch

from rocm_moe.distributed import launch
from rocm_moe.integrations import vllm as rv
from tests_integrations import oracle64 as o
from tests_integrations.vllm import model_cases

vllm = pytest.importorskip("vllm")
SEED = 3
CASES = [(mode, dt) for mode in ("experts", "combine") for dt in ("float32", "bfloat16")]


def moe_config(E: int, K: int, H: int, I: int, W: int, rank: int, dtype, e: int):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    par = FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=W, ep_size=W, tp_rank=0,
                                 pcp_rank=0, dp_rank=rank, ep_rank=rank, sp_size=1,
                                 use_ep=W > 1, all2all_backend="allgather_reducescatter",
                                 enable_eplb=False)
    return FusedMoEConfig(num_experts=E, experts_per_token=K, hidden_dim=H, intermediate_size=I,
                          num_local_experts=e, num_logical_experts=E,
                          activation=MoEActivation.SILU, device="cpu",
                          routing_method=RoutingMethodType.Renormalize,
                          moe_parallel_config=par, in_dtype=dtype)


def vllm_expert_map(E: int, W: int, rank: int, strategy: str):
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    return determine_expert_map(W, rank, E, strategy)[1]


def _kernel_worker(info, shape: dict, tokens: list[int]) -> dict:
    """Every case on this rank (one launch per W: each rank imports vLLM once): vLLM's
    FusedMoEKernel.apply vs the float64 oracle, diagnose and sanity, then the served-model
    cases of test_serving.py (``model_cases.run``)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from rocm_moe.comm.torch import TorchDispatcher

    E, H, I, K = shape["E"], shape["H"], shape["I"], shape["K"]
    W, r = info.world_size, info.rank
    out = {}
    for strategy in ("linear", "round_robin"):
        placement = rv.vllm_placement(E, W, strategy)
        emap = vllm_expert_map(E, W, r, strategy)
        for mode, dt in CASES:
            dtype = getattr(torch, dt)
            disp = TorchDispatcher(placement, hidden_size=H, top_k=K, dtype=dtype)
            experts_here = placement.local_experts(r)
            kernel = rv.build_kernel(moe_config(E, K, H, I, W, r, dtype, len(experts_here)),
                                     dispatcher=disp, weight_mode=mode)
            w13, w2 = o.local_weights(SEED, experts_here, H, I, dtype)
            x, w, ids = o.tokens(SEED, r, tokens[r], E, H, K, dtype)
            y = kernel.apply(hidden_states=x, w1=w13, w2=w2, topk_weights=w, topk_ids=ids,
                             activation=MoEActivation.SILU, global_num_experts=E,
                             expert_map=emap, apply_router_weight_on_input=False)
            ref = o.oracle(SEED, x, w, ids, H, I, dtype)
            out[f"{strategy}-{mode}-{dt}"] = dict(
                err=o.rel_err(y, ref) if tokens[r] else float(y.numel()), T=tokens[r],
                shape=list(y.shape), pf=type(kernel.prepare_finalize).__name__,
                fx=type(kernel.fused_experts).__name__, reduced=kernel.output_is_reduced(),
                experts=list(experts_here))
    # Every token on rank 0's experts: the other ranks receive no row (vLLM then skips the
    # experts and hands finalize an empty [0, H], in either weight mode).
    placement = rv.vllm_placement(E, W, "linear")
    for mode in ("experts", "combine"):
        disp = TorchDispatcher(placement, hidden_size=H, top_k=K, dtype=torch.float32)
        kernel = rv.build_kernel(moe_config(E, K, H, I, W, r, torch.float32,
                                            placement.num_local(r)),
                                 dispatcher=disp, weight_mode=mode)
        w13, w2 = o.local_weights(SEED, placement.local_experts(r), H, I, torch.float32)
        x, w, _ = o.tokens(SEED, r, tokens[r], E, H, K, torch.float32)
        ids = o.ids_on_rank0(tokens[r], placement.num_local(0), K)
        d = disp.dispatch(x, w, ids)  # how many rows this rank receives, for the record
        y = kernel.apply(hidden_states=x, w1=w13, w2=w2, topk_weights=w, topk_ids=ids,
                         activation=MoEActivation.SILU, global_num_experts=E,
                         expert_map=vllm_expert_map(E, W, r, "linear"),
                         apply_router_weight_on_input=False)
        ref = o.oracle(SEED, x, w, ids, H, I, torch.float32)
        out[f"concentrated-{mode}"] = dict(
            err=o.rel_err(y, ref) if tokens[r] else float(y.numel()),
            received=d.x.shape[0])
    out["diagnose"] = _diagnose(info, shape)
    out["model"] = model_cases.run(info)  # test_serving.py: the served-model cases
    return out


@functools.cache
def kernel_results(W: int) -> list[dict]:
    return launch(W, _kernel_worker, o.SHAPE, o.TOKENS[W], timeout_s=600)


@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize(("mode", "dt"), CASES, ids=[f"{m}-{d}" for m, d in CASES])
def test_fused_moe_kernel_matches_float64_oracle(W, strategy, mode, dt):
    results = kernel_results(W)
    for r, res in enumerate(results):
        case = res[f"{strategy}-{mode}-{dt}"]
        assert case["pf"] == "RocmMoEPrepareAndFinalize"
        assert case["fx"] == "RocmMoEExperts"
        assert case["reduced"] is True
        assert case["shape"] == [o.TOKENS[W][r], o.SHAPE["H"]]
        assert case["experts"] == list(rv.vllm_placement(8, W, strategy).local_experts(r))
        assert case["err"] <= o.TOL[getattr(torch, dt)], (r, case)
    print(f"W={W} {strategy} {mode} {dt}: tokens {o.TOKENS[W]}, max rel err "
          f"{max(res[f'{strategy}-{mode}-{dt}']['err'] for res in results):.2e}")


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_ranks_that_receive_no_row(W, mode):
    res = [r[f"concentrated-{mode}"] for r in kernel_results(W)]
    assert all(r["received"] == 0 for r in res[1:]), res
    for r in res:
        assert r["err"] <= 1e-5, res


# ---- placements ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
@pytest.mark.parametrize(("E", "W"), [(8, 2), (8, 3), (33, 4), (1, 1), (511, 7), (16, 16)])
def test_vllm_placement_is_vllms(E, W, strategy):
    p = rv.vllm_placement(E, W, strategy)
    for r in range(W):
        m = vllm_expert_map(E, W, r, strategy)
        if m is None:
            assert W == 1
            assert p.local_experts(0) == tuple(range(E))
            continue
        assert torch.equal(p.expert_map(r).map_E, m), (E, W, r)


def test_aiter_mask_is_refused_as_expert_map():
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    _, _, mask = determine_expert_map(2, 0, 8, "linear", return_expert_mask=True)
    with pytest.raises(ValueError, match="vllm#49758"):
        rv.expert_map_from_vllm(mask, 0, 8)
    with pytest.raises(ValueError, match="0/1 expert_mask"):
        rv.expert_map_from_vllm(mask[:8], 0, 8)


# ---- one rank: refusals and the handle ----------------------------------------------------------
def _one_rank_kernel(mode="experts", dtype=torch.float32, K=3):
    from rocm_moe.comm.local import LocalDispatcher
    from rocm_moe.placement import Placement

    E, H, I = 8, 64, 32
    disp = LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K, dtype=dtype)
    kernel = rv.build_kernel(moe_config(E, K, H, I, 1, 0, dtype, E), dispatcher=disp,
                             weight_mode=mode)
    w13, w2 = o.local_weights(SEED, tuple(range(E)), H, I, dtype)
    return kernel, w13, w2


def _apply(kernel, x, w, ids, w13, w2, **kw):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    args = dict(hidden_states=x, w1=w13, w2=w2, topk_weights=w, topk_ids=ids,
                activation=MoEActivation.SILU, global_num_experts=8, expert_map=None,
                apply_router_weight_on_input=False)
    args.update(kw)
    return kernel.apply(**args)


def test_router_weight_on_input_k1_is_weighted_once_and_k3_refused():
    kernel, w13, w2 = _one_rank_kernel(K=1)
    x, w, ids = o.tokens(SEED, 0, 33, 8, 64, 1, torch.float32)
    y = _apply(kernel, x, w, ids, w13, w2, apply_router_weight_on_input=True)
    # The weight scales the input (Llama-4 style), and no output weight follows.
    xw = (x * w).float()
    ref = o.oracle(SEED, xw, torch.ones_like(w), ids, 64, 32, torch.float32)
    assert o.rel_err(y, ref) <= 1e-5
    kernel3, w13, w2 = _one_rank_kernel(K=3)
    x, w, ids = o.tokens(SEED, 0, 4, 8, 64, 3, torch.float32)
    with pytest.raises(ValueError, match="apply_router_weight_on_input"):
        _apply(kernel3, x, w, ids, w13, w2, apply_router_weight_on_input=True)


def test_routed_scaling_factor_is_not_applied():
    """vLLM scales after the kernel: the kernel's output is sum w * expert, unscaled."""
    for mode in ("experts", "combine"):
        kernel, w13, w2 = _one_rank_kernel(mode)
        x, w, ids = o.tokens(SEED, 0, 33, 8, 64, 3, torch.float32)
        y = _apply(kernel, x, w, ids, w13, w2)
        assert o.rel_err(y, o.oracle(SEED, x, w, ids, 64, 32, torch.float32)) <= 1e-5


def test_finalize_refuses_ids_that_prepare_did_not_return():
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceNoOP,
    )

    kernel, _w13, _w2 = _one_rank_kernel()
    pf = kernel.prepare_finalize
    x, w, ids = o.tokens(SEED, 0, 5, 8, 64, 3, torch.float32)
    a1, _, _, rids, rw = pf.prepare(x, w, ids, 8, None, False, FUSED_MOE_UNQUANTIZED_CONFIG,
                                    False)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="vllm#52639"):
        pf.finalize(out, torch.zeros_like(a1), rw, rids.clone(), False,
                    TopKWeightAndReduceNoOP())
    # Another batch's handle (a stale tensor of the same shape) is refused by the dispatcher.
    _, _, _, rids2, _ = pf.prepare(x, w, ids, 8, None, False, FUSED_MOE_UNQUANTIZED_CONFIG,
                                   False)
    pf.finalize(out, torch.zeros_like(a1), rw, rids2, False, TopKWeightAndReduceNoOP())
    assert torch.equal(out, torch.zeros_like(out))


def test_quantised_and_mismatched_map_are_refused():
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    kernel, w13, w2 = _one_rank_kernel()
    x, w, ids = o.tokens(SEED, 0, 5, 8, 64, 3, torch.float32)
    q = FusedMoEQuantConfig.make(quant_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="unquantised"):
        kernel.prepare_finalize.prepare(x, w, ids, 8, None, False, q, False)
    bad = torch.full((8,), -1, dtype=torch.int32)
    bad[4:] = torch.arange(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="expert_map"):
        _apply(kernel, x, w, ids, w13, w2, expert_map=bad)


# ---- the plug-in as vLLM instantiates it --------------------------------------------------------
def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("rocm_moe") == "rocm_moe.integrations.vllm:register"


def test_plugin_is_what_vllm_instantiates(monkeypatch):
    """vLLM's own plugin loader runs the entry point; constructing vLLM's unquantised method
    then yields rocm_moe's, whose kernel after weight loading is rocm_moe's."""
    import vllm.plugins
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    monkeypatch.setenv(rv.SWITCH, "0")
    assert rv.register() is False
    monkeypatch.setenv(rv.SWITCH, "1")
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False, raising=False)
    vllm.plugins.load_general_plugins()
    try:
        assert op_registry_oot.get("UnquantizedFusedMoEMethod") is rv.RocmMoEFusedMoEMethod
        with set_current_vllm_config(VllmConfig()):
            method = UnquantizedFusedMoEMethod(moe_config(8, 3, 64, 32, 1, 0, torch.float32, 8))
        assert type(method) is rv.RocmMoEFusedMoEMethod
        layer = torch.nn.Module()
        method.create_weights(layer, 8, 64, 32, torch.float32)
        w13, w2 = o.local_weights(SEED, tuple(range(8)), 64, 32, torch.float32)
        with torch.no_grad():
            layer.w13_weight.copy_(w13)
            layer.w2_weight.copy_(w2)
        method.process_weights_after_loading(layer)
        pf, fx = method.moe_kernel.prepare_finalize, method.moe_kernel.fused_experts
        assert type(pf) is rv.RocmMoEPrepareAndFinalize
        assert type(fx) is rv.RocmMoEExperts
        # One rank, no EP: a TP-sharded layer's output is partial, so vLLM must reduce it.
        assert method.moe_kernel.output_is_reduced() is False
        x, w, ids = o.tokens(SEED, 0, 33, 8, 64, 3, torch.float32)
        layer.activation = __import__(
            "vllm.model_executor.layers.fused_moe.activation",
            fromlist=["MoEActivation"]).MoEActivation.SILU
        layer.apply_router_weight_on_input, layer.global_num_experts = False, 8
        layer.expert_map = None
        y = method.forward_native(layer, x, w, ids, None, None)
        assert o.rel_err(y, o.oracle(SEED, x, w, ids, 64, 32, torch.float32)) <= 1e-5
    finally:
        op_registry_oot.pop("UnquantizedFusedMoEMethod", None)


# ---- diagnose and sanity on the layer vLLM runs -------------------------------------------------
def _diagnose(info, shape) -> dict:
    from rocm_moe.comm.torch import TorchDispatcher
    from rocm_moe.diagnose import diagnose
    from rocm_moe.routing import RouterConfig
    from rocm_moe.sanity import run_sanity

    E, H, I, K = shape["E"], shape["H"], shape["I"], shape["K"]
    W, r = info.world_size, info.rank
    placement = rv.vllm_placement(E, W, "linear")
    disp = TorchDispatcher(placement, hidden_size=H, top_k=K, dtype=torch.float32)
    method = torch.nn.Module()  # stands for the vLLM layer: its weights and quant_method
    kernel = rv.build_kernel(moe_config(E, K, H, I, W, r, torch.float32,
                                        placement.num_local(r)), dispatcher=disp)
    w13, w2 = o.local_weights(SEED, placement.local_experts(r), H, I, torch.float32)
    method.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
    method.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
    method.quant_method = type("Q", (), {"moe_kernel": kernel})()
    router = RouterConfig.qwen3_moe(num_experts=E, top_k=K)
    layer = rv.rocm_layer(method, router=router)
    assert layer.w13 is method.w13_weight  # the very weights vLLM runs
    x = o.tokens(SEED, r, [7, 0, 33][r], E, H, K, torch.float32)[0]
    ew = functools.partial(o.expert_weights, SEED, H=H, I=I, dtype=torch.float32)
    report = diagnose(layer, x, expert_weights=ew)
    rows = run_sanity(layer, experts=[0, E - 1], expert_weights=ew)
    return dict(first_bad=report.first_bad,
                worst=max(s.rel_err for s in report.stages),
                sanity_failed=[(s.check, s.weight_mode) for s in rows if not s.passed])


@pytest.mark.parametrize("W", [2, 3])
def test_diagnose_and_sanity_on_the_layer_vllm_runs(W):
    for r, res in enumerate(kernel_results(W)):
        d = res["diagnose"]
        assert d["first_bad"] is None, (r, d)
        assert d["sanity_failed"] == [], (r, d)
    print(f"W={W}: diagnose clean on every rank, worst stage rel err "
          f"{max(res['diagnose']['worst'] for res in kernel_results(W)):.2e}; sanity passed")


# ---- what the adapter relies on -----------------------------------------------------------------
def _params(obj) -> list[str]:
    return list(inspect.signature(obj).parameters)


def test_vllm_version_is_the_pinned_one():
    assert vllm.__version__ == rv.VLLM_VERSION


def test_signatures_the_adapter_relies_on():
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.custom_op import CustomOp
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    pf = mk.FusedMoEPrepareAndFinalizeModular
    assert _params(pf.prepare) == ["self", "a1", "topk_weights", "topk_ids", "num_experts",
                                   "expert_map", "apply_router_weight_on_input",
                                   "quant_config", "defer_input_quant"]
    assert _params(pf.finalize) == ["self", "output", "fused_expert_output", "topk_weights",
                                    "topk_ids", "apply_router_weight_on_input",
                                    "weight_and_reduce_impl"]
    fx = mk.FusedMoEExpertsModular
    assert _params(fx.apply) == ["self", "output", "hidden_states", "w1", "w2", "topk_weights",
                                 "topk_ids", "activation", "global_num_experts", "expert_map",
                                 "a1q_scale", "a2_scale", "workspace13", "workspace2",
                                 "expert_tokens_meta", "apply_router_weight_on_input"]
    assert _params(fx.workspace_shapes) == ["self", "M", "N", "K", "topk", "global_num_experts",
                                            "local_num_experts", "expert_tokens_meta",
                                            "activation"]
    assert _params(fx.__init__) == ["self", "moe_config", "quant_config", "max_num_tokens",
                                    "num_dispatchers"]
    abstract = set(pf.__abstractmethods__) | set(fx.__abstractmethods__)
    assert abstract <= {"activation_format", "topk_indices_dtype", "max_num_tokens_per_rank",
                        "num_dispatchers", "output_is_reduced", "prepare", "finalize",
                        "workspace_shapes", "finalize_weight_and_reduce_impl", "apply",
                        "_supports_current_device", "_supports_no_act_and_mul",
                        "_supports_quant_scheme", "_supports_activation",
                        "_supports_parallel_config"}, abstract
    assert _params(mk.FusedMoEKernel.apply)[:10] == [
        "self", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation",
        "global_num_experts", "expert_map", "apply_router_weight_on_input"]
    assert _params(determine_expert_map)[:4] == ["ep_size", "ep_rank", "global_num_experts",
                                                 "expert_placement_strategy"]
    assert _params(UnquantizedFusedMoEMethod._init_moe_kernel) == ["self", "layer"]
    assert _params(UnquantizedFusedMoEMethod.forward_native) == [
        "self", "layer", "x", "topk_weights", "topk_ids", "shared_experts",
        "shared_experts_input"]
    assert "register_oot" in vars(CustomOp)
    # The modular kernel hands finalize the very ids tensor prepare returned.
    src = inspect.getsource(mk.FusedMoEKernelModularImpl._prepare)
    assert "topk_ids if _expert_topk_ids is None else _expert_topk_ids" in src
    assert os.environ.get("VLLM_TARGET_DEVICE") == "cpu"
