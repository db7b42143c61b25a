"""rocm_moe inside SGLang 0.5.23: SGLang's BaseDispatcher contract and Standard formats through
rocm_moe's dispatcher and experts step on 2 and 3 gloo ranks (uneven tokens, a rank with none,
both weight modes, float32 and bfloat16) against a float64 oracle; the plug-in as SGLang's own
loader applies it; the skipped all-reduce; signatures; diagnose and sanity on the layer; and, in
the same launch, a 3-layer model of SGLang's own TopK + FusedMoE / DeepEPMoE (model.py) served
with ROCM_MOE_SGLANG_COMM unset (the default), =torch, =mori (the MORI fake) and =symm (its CPU
refusal, and served on CPU ranks through tests/symm_shm.py)."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

from rocm_moe.distributed import launch
from rocm_moe.integrations import sglang as rs
from rocm_moe.placement import Placement
from tests_integrations import oracle64 as o

sglang = pytest.importorskip("sglang")
SEED = 5
CASES = [(mode, dt) for mode in ("experts", "combine") for dt in ("float32", "bfloat16")]


def topk_output(w, ids):
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    return StandardTopKOutput(topk_weights=w, topk_ids=ids, router_logits=None)


def _worker(info, shape: dict, tokens: list[int]) -> dict:
    from sglang.srt.layers.moe.token_dispatcher.base import BaseDispatcher

    from rocm_moe.comm.torch import TorchDispatcher

    E, H, I, K = shape["E"], shape["H"], shape["I"], shape["K"]
    W, r = info.world_size, info.rank
    placement = Placement.contiguous(E, W)
    out = {}
    for mode, dt in CASES:
        dtype = getattr(torch, dt)
        disp = rs.RocmMoEDispatcher(TorchDispatcher(placement, hidden_size=H, top_k=K,
                                                    dtype=dtype), weight_mode=mode,
                                    routed_scaling_factor=2.5)
        assert isinstance(disp, BaseDispatcher)
        w13, w2 = o.local_weights(SEED, placement.local_experts(r), H, I, dtype)
        x, w, ids = o.tokens(SEED, r, tokens[r], E, H, K, dtype)
        d = disp.dispatch(hidden_states=x, topk_output=topk_output(w, ids))
        fmt_ok = d.format.is_standard()
        ci = rs.run_experts(disp, d, w13, w2)
        y = disp.combine(combine_input=ci)
        ref = 2.5 * o.oracle(SEED, x, w, ids, H, I, dtype)
        out[f"{mode}-{dt}"] = dict(err=o.rel_err(y, ref) if tokens[r] else float(y.numel()),
                                   shape=list(y.shape), standard=fmt_ok,
                                   weighted=ci.weights_applied, R=d.hidden_states.shape[0])
    # Every token on rank 0's experts: the other ranks receive no row.
    for mode in ("experts", "combine"):
        disp = rs.RocmMoEDispatcher(TorchDispatcher(placement, hidden_size=H, top_k=K,
                                                    dtype=torch.float32), weight_mode=mode)
        w13, w2 = o.local_weights(SEED, placement.local_experts(r), H, I, torch.float32)
        x, w, _ = o.tokens(SEED, r, tokens[r], E, H, K, torch.float32)
        ids = o.ids_on_rank0(tokens[r], placement.num_local(0), K)
        d = disp.dispatch(x, topk_output(w, ids))
        y = disp.combine(rs.run_experts(disp, d, w13, w2))
        ref = o.oracle(SEED, x, w, ids, H, I, torch.float32)
        out[f"concentrated-{mode}"] = dict(
            err=o.rel_err(y, ref) if tokens[r] else float(y.numel()),
            received=d.hidden_states.shape[0])
    out["diagnose"] = _diagnose(info, shape)  # the same launch: each rank imports SGLang once
    from tests_integrations.sglang.model import rank_scenarios

    out["model"] = rank_scenarios(info)  # publishes SGLang's context and loads the plug-in
    return out


@functools.cache
def results(W: int) -> list[dict]:
    return launch(W, _worker, dict(o.SHAPE, E=6 if W == 3 else 8), o.TOKENS[W], timeout_s=600)


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize(("mode", "dt"), CASES, ids=[f"{m}-{d}" for m, d in CASES])
def test_dispatcher_and_experts_match_float64_oracle(W, mode, dt):
    res = results(W)
    for r, rank in enumerate(res):
        case = rank[f"{mode}-{dt}"]
        assert case["standard"]
        assert case["shape"] == [o.TOKENS[W][r], o.SHAPE["H"]]
        assert case["weighted"] == (mode == "experts")
        assert case["err"] <= o.TOL[getattr(torch, dt)], (r, case)
    print(f"W={W} {mode} {dt}: max rel err {max(x[f'{mode}-{dt}']['err'] for x in res):.2e}, "
          f"rows received {[x[f'{mode}-{dt}']['R'] for x in res]}")


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_ranks_that_receive_no_row(W, mode):
    res = [r[f"concentrated-{mode}"] for r in results(W)]
    assert all(r["received"] == 0 for r in res[1:]), res
    for r in res:
        assert r["err"] <= 1e-5, res


def _one_rank(mode="experts", K=3):
    from rocm_moe.comm.local import LocalDispatcher

    disp = rs.RocmMoEDispatcher(LocalDispatcher(Placement.contiguous(8, 1), hidden_size=64,
                                                top_k=K, dtype=torch.float32), weight_mode=mode)
    return disp, *o.local_weights(SEED, tuple(range(8)), 64, 32, torch.float32)


def test_combine_refuses_a_runner_output_without_handle():
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

    disp, _w13, _w2 = _one_rank()
    x, w, ids = o.tokens(SEED, 0, 5, 8, 64, 3, torch.float32)
    disp.dispatch(x, topk_output(w, ids))
    with pytest.raises(ValueError, match="handle"):
        disp.combine(StandardCombineInput(hidden_states=x))


@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_router_weight_on_input_k1_weighted_once_and_k3_refused(mode):
    from rocm_moe.comm.local import LocalDispatcher

    disp = rs.RocmMoEDispatcher(LocalDispatcher(Placement.contiguous(8, 1), hidden_size=64,
                                                top_k=1, dtype=torch.float32),
                                weight_mode=mode, apply_router_weight_on_input=True)
    _, w13, w2 = _one_rank()
    x, w, ids = o.tokens(SEED, 0, 33, 8, 64, 1, torch.float32)
    y = disp.combine(rs.run_experts(disp, disp.dispatch(x, topk_output(w, ids)), w13, w2))
    ref = o.oracle(SEED, x * w, torch.ones_like(w), ids, 64, 32, torch.float32)
    assert o.rel_err(y, ref) <= 1e-5
    disp3, _, _ = _one_rank(mode)
    disp3.apply_router_weight_on_input = True
    x, w, ids = o.tokens(SEED, 0, 5, 8, 64, 3, torch.float32)
    with pytest.raises(ValueError, match="apply_router_weight_on_input"):
        disp3.dispatch(x, topk_output(w, ids))


@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_capacity_sized_dispatch_bounds_the_experts(mode):
    """A capacity-sized dispatch (symm / MORI shape: R = capacity rows, rows past a [1] device
    count empty) hands the experts its row count and the host's estimate, so the Triton
    experts cost the rows received; the result is the oracle's."""
    from rocm_moe.experts.reference import ReferenceExperts
    from tests_integrations.capacity import CapacityLocal

    class Recording(ReferenceExperts):
        bounded_rows = True

        def __init__(self):
            super().__init__()
            self.bounds = []

        def _forward(self, *args, mode, num_rows=None, expected_rows=None):
            self.bounds.append((args[0].shape[0], num_rows, expected_rows))
            return super()._forward(*args, mode=mode)

    experts = Recording()
    disp = rs.RocmMoEDispatcher(CapacityLocal(Placement.contiguous(8, 1), hidden_size=64,
                                              top_k=3, dtype=torch.float32,
                                              max_tokens_per_rank=16),
                                experts=experts, weight_mode=mode)
    _, w13, w2 = _one_rank(mode)
    x, w, ids = o.tokens(SEED, 0, 5, 8, 64, 3, torch.float32)
    y = disp.combine(rs.run_experts(disp, disp.dispatch(x, topk_output(w, ids)), w13, w2))
    assert o.rel_err(y, o.oracle(SEED, x, w, ids, 64, 32, torch.float32)) <= 1e-5
    R, num_rows, expected = experts.bounds[-1]
    assert (R, expected) == (16, 5)
    assert num_rows.tolist() == [5]


# ---- the plug-in as SGLang applies it -----------------------------------------------------------
def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("rocm_moe") == "rocm_moe.integrations.sglang:register"


class _Layer(torch.nn.Module):
    """The attributes of SGLang's FusedMoE that its forward_impl and our hooks read."""


def test_plugin_is_what_sglang_instantiates_and_the_reduction_is_skipped(monkeypatch):
    """SGLang's own loader runs the entry point and applies its hooks: create_moe_dispatcher
    then returns rocm_moe's dispatcher, run_moe_core runs rocm_moe's experts, and the real
    FusedMoE.forward_impl reaches no all-reduce."""
    import sglang.srt.plugins as plugins
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    monkeypatch.setenv(rs.SWITCH, "0")
    assert rs.register() is False
    monkeypatch.setenv(rs.SWITCH, "1")
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    plugins.load_plugins()
    from sglang.srt.layers.moe.fused_moe_triton import layer as L

    cfg = MoeRunnerConfig(num_experts=8, num_local_experts=8, hidden_size=64,
                          intermediate_size_per_partition=32, top_k=3,
                          params_dtype=torch.float32, num_fused_shared_experts=0,
                          routed_scaling_factor=2.5)
    qm = UnquantizedFusedMoEMethod.__new__(UnquantizedFusedMoEMethod)
    disp = L.create_moe_dispatcher(cfg, qm)
    assert type(disp) is rs.RocmMoEDispatcher
    with pytest.raises(ValueError, match="unquantised"):
        L.create_moe_dispatcher(cfg, object())

    layer = _Layer()
    w13, w2 = o.local_weights(SEED, tuple(range(8)), 64, 32, torch.float32)
    layer.w13_weight, layer.w2_weight = w13, w2
    layer.dispatcher, layer.moe_runner_config = disp, cfg
    layer.quant_method, layer._dwdp_bound = qm, False
    layer.reduce_results, layer.moe_tp_size, layer.moe_ep_size = True, 2, 2
    layer._dispatch_with_pre_quant = lambda h, t, p: L.FusedMoE._dispatch_with_pre_quant(
        layer, h, t, p)
    layer.run_moe_core = lambda dispatch_output: L.FusedMoE.run_moe_core(layer, dispatch_output)
    reduced = []
    monkeypatch.setattr(L, "tensor_model_parallel_all_reduce", lambda t: reduced.append(1) or t)
    monkeypatch.setattr(L, "use_symmetric_memory", lambda *a, **k: __import__(
        "contextlib").nullcontext())
    monkeypatch.setattr(L, "get_parallel", lambda: type("P", (), {"tp_group": None})())
    x, w, ids = o.tokens(SEED, 0, 33, 8, 64, 3, torch.float32)
    y = L.FusedMoE.forward_impl(layer, x, topk_output(w, ids))
    assert reduced == [], "the all-reduce after rocm_moe's combine must be skipped"
    assert layer.reduce_results is True  # restored
    # The layer's routed_scaling_factor (2.5) applied once, as SGLang's runner would (blocks
    # that scale their output themselves turn it off: test_deepseek.py).
    assert o.rel_err(y, 2.5 * o.oracle(SEED, x, w, ids, 64, 32, torch.float32)) <= 1e-5


# ---- diagnose and sanity ------------------------------------------------------------------------
def _diagnose(info, shape) -> dict:
    from rocm_moe.comm.torch import TorchDispatcher
    from rocm_moe.diagnose import diagnose
    from rocm_moe.routing import RouterConfig
    from rocm_moe.sanity import run_sanity

    E, H, I, K = shape["E"], shape["H"], shape["I"], shape["K"]
    W, r = info.world_size, info.rank
    placement = Placement.contiguous(E, W)
    layer = _Layer()
    layer.dispatcher = rs.RocmMoEDispatcher(TorchDispatcher(placement, hidden_size=H, top_k=K,
                                                            dtype=torch.float32))
    w13, w2 = o.local_weights(SEED, placement.local_experts(r), H, I, torch.float32)
    layer.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
    rl = rs.rocm_layer(layer, router=RouterConfig.qwen3_moe(num_experts=E, top_k=K))
    assert rl.w13 is layer.w13_weight
    x = o.tokens(SEED, r, [7, 0, 33][r], E, H, K, torch.float32)[0]
    ew = functools.partial(o.expert_weights, SEED, H=H, I=I, dtype=torch.float32)
    report = diagnose(rl, x, expert_weights=ew)
    rows = run_sanity(rl, experts=[0, E - 1], expert_weights=ew)
    return dict(first_bad=report.first_bad, worst=max(s.rel_err for s in report.stages),
                sanity_failed=[(s.check, s.weight_mode) for s in rows if not s.passed])


@pytest.mark.parametrize("W", [2, 3])
def test_diagnose_and_sanity_on_the_layer_sglang_runs(W):
    for r, res in enumerate(results(W)):
        d = res["diagnose"]
        assert d["first_bad"] is None, (r, d)
        assert d["sanity_failed"] == [], (r, d)
    print(f"W={W}: diagnose clean on every rank, worst stage rel err "
          f"{max(res['diagnose']['worst'] for res in results(W)):.2e}; sanity passed")


# ---- what the adapter relies on -----------------------------------------------------------------
def _params(obj) -> list[str]:
    return list(inspect.signature(obj).parameters)


def test_sglang_version_is_the_pinned_one():
    assert sglang.__version__ == rs.SGLANG_VERSION


def test_signatures_the_adapter_relies_on():
    from sglang.srt.layers.moe.fused_moe_triton import layer as L
    from sglang.srt.layers.moe.token_dispatcher.base import BaseDispatcher
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    assert set(BaseDispatcher.__abstractmethods__) == {"dispatch", "combine"}
    assert _params(BaseDispatcher.dispatch) == ["self", "hidden_states", "topk_output"]
    assert _params(BaseDispatcher.combine) == ["self", "combine_input"]
    assert StandardTopKOutput._fields == ("topk_weights", "topk_ids", "router_logits")
    assert _params(L.create_moe_dispatcher) == ["moe_runner_config", "quant_method"]
    assert _params(L.FusedMoE.run_moe_core) == ["self", "dispatch_output"]
    assert _params(L.FusedMoE.forward_impl)[:3] == ["self", "hidden_states", "topk_output"]
    src = inspect.getsource(L.FusedMoE.forward_impl)
    assert "self.dispatcher.combine(combine_input=combine_input)" in src
    assert "if self.reduce_results and (self.moe_tp_size > 1 or self.moe_ep_size > 1):" in src
    assert _params(HookRegistry.register)[:4] == ["target", "hook", "hook_type", "source"]
    assert HookType.AROUND.value == "around"


# ---- the model on W ranks (model.rank_scenarios) ----------------------------------------------
COMMS = ["default", "torch", "mori", "symm_shm"]  # symm_shm: symm served on CPU ranks
BACKEND = {"default": "torch", "symm_shm": "symm"}  # the backend each setting builds


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("comm", COMMS)
def test_model_on_every_comm_setting_matches_float64_oracle(W, comm):
    """Batches of 1, max_tokens_per_rank (8) and 3.5 x max_tokens_per_rank (28), each rank a
    different size in each round (uneven chunk counts), through 3 layers that share ONE
    dispatcher of the named backend (unset: torch, the fastest on CPU ranks) with SGLang's
    routed_scaling_factor 2.5 on layer 1 applied once, weights as loaded. symm_shm: comm=symm
    served for real, the symm backend with its buffer in shared memory of the ranks and its
    kernels in Triton's interpreter (tests/symm_shm.py), ONE symmetric buffer for the model."""
    from tests_integrations.sglang.model import CAP, SIZES

    if comm == "mori" and W == 3:
        for rank in results(W):
            assert "power of two" in rank["model"][comm]["refused"]
        pytest.skip("MORI takes power-of-two EP sizes only (refused with the reason: checked)")
    for r, rank in enumerate(results(W)):
        res = rank["model"][comm]
        if "skipped" in res:
            pytest.skip(res["skipped"])
        assert res["pooled"] == 1, (r, res)
        assert res["all_share"], (r, res)
        assert res["backend"] == BACKEND.get(comm, comm)
        if comm == "symm_shm":
            assert res["buffers"] == 1, (r, res)
        assert res["cap"] == CAP
        assert res["classes"] == ["FusedMoE", "DeepEPMoE", "FusedMoE"]
        assert res["as_loaded"]
        for T in SIZES:
            assert res[f"T={T}"] <= 1e-5, (r, T, res)
        # Chunked (4 chunks of <= 8) against one batch of 28: the same to float32 rounding.
        # Not bitwise on the CPU: the reference experts' matmul of a row depends on how many
        # rows it runs with (torch's CPU GEMM vs GEMV paths), not on the chunking.
        assert res["chunks_err"] <= 1e-6, (r, res)
    print(f"W={W} {comm}: worst rel err {max(x['model'][comm]['T=28'] for x in results(W)):.1e}"
          f", chunks bitwise: {[x['model'][comm]['chunks_bitwise'] for x in results(W)]}")


def test_model_decode_graph_path_reads_nothing_on_the_host():
    """Under (simulated) capture, batches within max_tokens_per_rank on MORI (W = 2) run
    without a host read or collective in the adapter's path and give the eager result; a batch
    past it is refused with the reason before anything runs. (The torch backend reads split
    sizes on the host by design; one rank: test_model.py.)"""
    for rank in results(2):
        res = rank["model"]["mori"]
        assert res["captured_equal"], res
        assert "a captured batch must fit" in res["captured_over_cap"]


@pytest.mark.parametrize("W", [2, 3])
def test_symm_gets_max_tokens_per_rank_and_a_clean_refusal_on_cpu(W):
    """symm runs only on GPUs (not lent with SGLang installed): on CPU ranks the adapter must
    pass SGLang's budget as max_tokens_per_rank and get symm's own 'no CUDA' refusal, not a
    TypeError."""
    for rank in results(W):
        res = rank["model"]["symm"]
        assert res["error"] == "ValueError", res
        assert "no CUDA/ROCm device" in res["message"]
        assert res["max_tokens_per_rank"] == 8
