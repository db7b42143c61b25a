"""A served model through the plug-in (issue 27): every comm setting, one dispatcher for all
layers, any batch size, the decode-graph contract, and the layers the plug-in must refuse.

Multi-rank cases run inside the one launch per W that test_vllm.py makes (each rank imports vLLM
once; ``model_cases.run``): vLLM's own layer classes on gloo ranks, W = 2 and 3, comm=torch,
comm=mori through the MORI fake (W = 2: MORI needs a power-of-two group), comm=symm's CPU
contract (the real backend refuses CPU ranks) and comm=symm served on CPU ranks
(tests/symm_shm.py: the symm backend with its buffer in shared memory, kernels interpreted).
One-rank cases run here, in the test process."""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rocm_moe.comm import pool
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.experts.base import Experts
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.integrations import vllm as rv
from rocm_moe.weighting import ExpertsOutput
from tests_integrations import oracle64 as o
from tests_integrations.capacity import CapacityLocal
from tests_integrations.vllm import model_cases as mc
from tests_integrations.vllm.test_vllm import kernel_results

vllm = pytest.importorskip("vllm")
E, K, H, I = mc.E, mc.K, mc.H, mc.I
BUDGET = 64  # vLLM's max_num_batched_tokens in the one-rank cases
SEED = 11


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    for env in (rv.ENV_COMM, rv.ENV_EXPERTS, rv.ENV_WEIGHT_MODE, rv.ENV_MAX_TOKENS):
        monkeypatch.delenv(env, raising=False)
    pool.clear()
    yield
    pool.clear()


# ---- W = 2, 3 on gloo ranks through vLLM's layers ----------------------------------------------
def model(W: int) -> list[dict]:
    return [r["model"] for r in kernel_results(W)]


@pytest.mark.parametrize("W", [2, 3])
def test_torch_comm_model_matches_oracle_chunked_and_bitwise(W):
    """3 layers with a residual, capacity 8, steps where the ranks bring 1, 8 and 28 tokens
    (ranks with fewer chunks join with empty ones): float64 oracle per layer, ONE dispatcher
    for all layers, and the same bits as the model at vLLM's default capacity (one chunk; on
    the batch-invariant reference experts, torch comm)."""
    for r, res in enumerate(model(W)):
        t = res["torch"]
        assert (t["pool"], t["same"], t["backend"], t["cap"]) == (1, True, "TorchDispatcher",
                                                                  mc.CAP), (r, t)
        assert t["ref_cap"] == t["budget"] > mc.CAP, t  # default capacity: vLLM's budget
        assert sorted(t["tokens"]) == sorted(mc.SIZES), t
        assert max(t["err"]) <= 1e-5, (r, t)
        assert t["bitwise"] == [True] * len(mc.SIZES), (r, t)


def test_mori_model_through_the_fake_matches_oracle():
    for r, res in enumerate(model(2)):
        m = res["mori"]
        assert (m["pool"], m["same"], m["backend"], m["cap"]) == (1, True, "MoriDispatcher",
                                                                  mc.CAP), (r, m)
        assert m["ops"] == 1, m  # one MORI op for the whole model
        assert sorted(m["tokens"]) == sorted(mc.SIZES), m
        assert max(m["err"]) <= 1e-5, (r, m)


def test_symm_gets_vllms_budget_and_a_clean_refusal_on_cpu():
    for res in model(2):
        s = res["symm"]
        assert (s["kw"]["name"], s["kw"]["W"]) == ("symm", 2), s
        assert s["kw"]["max_tokens_per_rank"] == s["budget"], s  # the crash of issue 27
        assert (s["kw"]["hidden_size"], s["kw"]["top_k"]) == (H, K), s
        assert s["build"].startswith("ValueError: ROCM_MOE_VLLM_COMM='symm': unavailable"), s
        assert "no CUDA/ROCm device" in s["build"], s
        assert s["pool"].startswith("ValueError: "), s
        assert "no CUDA/ROCm device" in s["pool"], s


@pytest.mark.parametrize("W", [2, 3])
def test_symm_model_matches_oracle_on_cpu_ranks(W):
    """comm=symm through vLLM's layers at W = 2 and 3: SymmDispatcher with its buffer in shared
    memory of the ranks and its kernels in Triton's interpreter (tests/symm_shm.py), the same
    3-layer model chunked at capacity 8 as the torch and MORI cases; ONE dispatcher and ONE
    symmetric buffer for every layer."""
    for r, res in enumerate(model(W)):
        s = res["symm_shm"]
        if "skipped" in s:
            pytest.skip(s["skipped"])
        assert (s["pool"], s["same"], s["backend"], s["cap"]) == (1, True, "ShmSymmDispatcher",
                                                                  mc.CAP), (r, s)
        assert s["buffers"] == 1, s  # one symmetric buffer for the whole model
        assert sorted(s["tokens"]) == sorted(mc.SIZES), s
        assert max(s["err"]) <= 1e-5, (r, s)


@pytest.mark.parametrize("W", [2, 3])
def test_placement_is_the_one_vllm_resolved(W):
    """round_robin requested: without expert groups vLLM falls back to linear and the batch
    runs (it used to be refused with a fix the user could not apply); with expert groups it
    stays round_robin, torch comm runs it, MORI refuses it at construction."""
    for r, res in enumerate(model(W)):
        p = res["placement"]
        assert p["flat"]["resolved"] == "linear", p
        assert p["grouped"]["resolved"] == "round_robin", p
        assert p["grouped"]["experts"] == list(range(r, E, W)), p
        for case in ("flat", "grouped"):
            assert p[case]["experts"] == p[case]["placement"], p
            assert p[case]["err"] <= 1e-5, p
        assert "ROCM_MOE_VLLM_COMM=mori" in p["mori"], p
        assert "not contiguous" in p["mori"], p


def test_routed_scaling_is_vllms():
    for res in model(2):
        s = res["scaling"]
        assert max(s["weights"], s["output"]) <= 1e-6, s
        assert s["weights-oracle"] <= 1e-5, s


@pytest.mark.parametrize("W", [2, 3])
def test_gelu_refused_when_vllm_builds_the_layer(W):
    for res in model(W):
        assert res["gelu"].startswith("activation=gelu: rocm_moe experts compute silu"), res


# ---- one rank, in this process ------------------------------------------------------------------
def moe_config(dtype=torch.float32, *, num_experts: int = E, top_k: int = K, hidden: int = H,
               inter: int = I, **kw):
    """vLLM's FusedMoEConfig of one EP rank (vLLM's fields in ``kw`` override the defaults)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    eplb = kw.pop("enable_eplb", False)
    dp = kw.pop("dp_size", 1)
    par = FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=dp, ep_size=1, tp_rank=0,
                                 pcp_rank=0, dp_rank=0, ep_rank=0, sp_size=1, use_ep=False,
                                 all2all_backend="allgather_reducescatter", enable_eplb=eplb)
    args = dict(num_experts=num_experts, experts_per_token=top_k, hidden_dim=hidden,
                intermediate_size=inter, num_local_experts=num_experts,
                num_logical_experts=num_experts, activation=MoEActivation.SILU,
                device="cpu", routing_method=RoutingMethodType.Renormalize,
                moe_parallel_config=par, in_dtype=dtype, max_num_tokens=BUDGET)
    args.update(kw)
    return FusedMoEConfig(**args)


@functools.cache
def _vllm_config():
    from vllm.config import VllmConfig

    return VllmConfig()


def method_for(moe):
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(_vllm_config()):
        return rv.RocmMoEFusedMoEMethod(moe)


def one_rank_layer(seed: int, dtype=torch.float32, **kw):
    """(method, layer) as vLLM leaves them after loading: weights in, kernel built."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    method = method_for(moe_config(dtype, **kw))
    layer = torch.nn.Module()
    method.create_weights(layer, E, H, I, dtype)
    w13, w2 = o.local_weights(seed, tuple(range(E)), H, I, dtype)
    with torch.no_grad():
        layer.w13_weight.copy_(w13)
        layer.w2_weight.copy_(w2)
    layer.activation, layer.apply_router_weight_on_input = MoEActivation.SILU, False
    layer.global_num_experts, layer.expert_map = E, None
    method.process_weights_after_loading(layer)
    return method, layer


def routing(T: int, layer: int):
    _, w, ids = o.tokens(SEED + layer, 0, T, E, H, K, torch.float32)
    return w, ids


def run_stack(layers, x):
    """The residual stack: per layer (input, weights, ids, output)."""
    recs, h = [], x
    for i, (method, layer) in enumerate(layers):
        w, ids = routing(h.shape[0], i)
        y = method.apply(layer, h, w, ids, None, None)
        recs.append((h, w, ids, y))
        h = h + y
    return recs


@pytest.mark.parametrize("T", [1, mc.CAP, mc.CAP * 7 // 2], ids=["T1", "T_cap", "T_3.5cap"])
def test_one_rank_model_chunks_shares_and_is_bitwise(T, monkeypatch):
    monkeypatch.setenv(rv.ENV_MAX_TOKENS, str(mc.CAP))
    chunked = [one_rank_layer(SEED + i) for i in range(mc.LAYERS)]
    shared = pool.shared_dispatchers()
    assert len(shared) == 1
    assert all(m.moe_kernel.prepare_finalize.dispatcher is shared[0] for m, _ in chunked)
    # vLLM's runner gathers every DP rank's tokens itself (naive dispatch/combine, which would
    # count rocm_moe's complete outputs W times) unless the method says it owns the kernel
    assert all(m.supports_internal_mk for m, _ in chunked)
    assert shared[0].max_tokens_per_rank == mc.CAP
    assert shared[0].name == "local"
    monkeypatch.delenv(rv.ENV_MAX_TOKENS)
    whole = [one_rank_layer(SEED + i) for i in range(mc.LAYERS)]
    assert whole[0][0].moe_kernel.prepare_finalize.dispatcher.max_tokens_per_rank == BUDGET
    for method, _ in chunked + whole:  # batch-invariant experts: see model_cases
        method.moe_kernel.fused_experts.experts = ReferenceExperts().as_invariant()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    a, b = run_stack(chunked, x), run_stack(whole, x)
    for i, ((h, w, ids, y), (_, _, _, y_whole)) in enumerate(zip(a, b, strict=True)):
        assert o.rel_err(y, o.oracle(SEED + i, h, w, ids, H, I, torch.float32)) <= 1e-5
        assert torch.equal(y, y_whole), i


# ---- the decode-graph contract ------------------------------------------------------------------
_SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
          "equal", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
          "bincount", "repeat_interleave"}


class HostReadGuard(TorchFunctionMode):
    """Raises on every torch call that reads a tensor's values on the host (a GPU sync, illegal
    inside CUDA-graph capture): .item(), bool(t), int(t), .tolist(), .cpu(), torch.equal,
    nonzero, boolean-mask indexing, ... (``.to(device)`` is let through: on a CPU it cannot
    tell a copy to the host from a no-op move to the tensor's own device.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        bool_index = name == "__getitem__" and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in _SYNCS or bool_index:
            raise AssertionError(f"host read under CUDA-graph capture: {name}")
        return func(*args, **kwargs)


@contextmanager
def capturing(monkeypatch):
    """What the adapter sees inside vLLM's graph capture, on a CPU: the stream captures, and
    any host read raises."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with HostReadGuard():
            yield


class DenseExperts(Experts):
    """Every local expert on every row, masked (no host read: what a graph-safe experts backend
    such as Triton or AITER does with the rows, in plain torch)."""

    name = "dense-test"

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode):
        local_RK = expert_map.local_ids(topk_ids_RK)
        R, K_ = topk_ids_RK.shape
        weighted = mode == "weighted"
        out = x_RH.new_zeros((R, x_RH.shape[1]) if weighted else (R, K_, x_RH.shape[1]))
        half = w13.shape[1] // 2
        for j in range(w13.shape[0]):
            h = x_RH @ w13[j].T
            y = (torch.nn.functional.silu(h[:, :half]) * h[:, half:]) @ w2[j].T
            sel = (local_RK == j).to(x_RH.dtype)
            if weighted:
                out = out + (sel * topk_weights_RK.to(x_RH.dtype)).sum(-1, keepdim=True) * y
            else:
                out = out + sel[..., None] * y[:, None, :]
        return ExpertsOutput(out=out, weights_applied=weighted)


class BoundedDenseExperts(DenseExperts):
    """DenseExperts that take the capacity-sized row bound and record what they were given."""

    bounded_rows = True

    def __init__(self):
        self.bounds = []

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode,
                 num_rows=None, expected_rows=None):
        self.bounds.append((x_RH.shape[0], num_rows, expected_rows))
        return super()._forward(x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map,
                                mode=mode)


@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_captured_capacity_sized_batch_bounds_the_experts(mode, monkeypatch):
    """Under capture a capacity-sized dispatch hands all R rows on: the experts get its device
    row count and the host's estimate (so the Triton experts cost the rows received); eager
    batches are cut to the rows received and get no bound."""
    monkeypatch.setenv(rv.ENV_WEIGHT_MODE, mode)
    method, layer = one_rank_layer(SEED)
    fx = method.moe_kernel.fused_experts
    fx.experts = BoundedDenseExperts()
    disp = CapacityLocal(rv.vllm_placement(E, 1), hidden_size=H, top_k=K,
                         dtype=torch.float32, max_tokens_per_rank=mc.CAP)
    method.moe_kernel.impl.prepare_finalize = rv.build_kernel(
        method.moe, dispatcher=disp, experts=fx.experts, weight_mode=mode).prepare_finalize
    rv.ready_kernel(method.moe_kernel, None, E, "cpu")
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    w, ids = routing(3, 0)
    with capturing(monkeypatch):
        y = method.apply(layer, x, w, ids, None, None)
    assert o.rel_err(y, o.oracle(SEED, x, w, ids, H, I, torch.float32)) <= 1e-5
    R, num_rows, expected = fx.experts.bounds[-1]
    assert (R, expected) == (mc.CAP, 3)
    assert num_rows.tolist() == [3]
    method.apply(layer, x, w, ids, None, None)  # eager: 3 rows, no bound
    assert fx.experts.bounds[-1] == (3, None, None)


@pytest.mark.parametrize("shape", ["local", "capacity-sized"])
@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_no_host_read_under_capture(shape, mode, monkeypatch):
    """The adapter's path for a batch within capacity (chunk decision, prepare, experts step,
    finalize) reads nothing on the host while a graph is captured; the harness does catch the
    one host read the eager path makes on a capacity-sized dispatch."""
    monkeypatch.setenv(rv.ENV_WEIGHT_MODE, mode)
    method, layer = one_rank_layer(SEED)
    fx = method.moe_kernel.fused_experts
    fx.experts = DenseExperts()
    if shape == "capacity-sized":
        disp = CapacityLocal(rv.vllm_placement(E, 1), hidden_size=H, top_k=K,
                             dtype=torch.float32, max_tokens_per_rank=mc.CAP)
        pf = rv.build_kernel(method.moe, dispatcher=disp, experts=fx.experts,
                             weight_mode=mode).prepare_finalize
        method.moe_kernel.impl.prepare_finalize = pf
        rv.ready_kernel(method.moe_kernel, None, E, "cpu")  # as at construction
    for T in (1, mc.CAP):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        w, ids = routing(T, 0)
        with capturing(monkeypatch):
            y = method.apply(layer, x, w, ids, None, None)
        assert o.rel_err(y, o.oracle(SEED, x, w, ids, H, I, torch.float32)) <= 1e-5
    if shape == "capacity-sized":  # eager: one read of the received-row count
        with HostReadGuard(), pytest.raises(AssertionError, match="host read"):
            method.apply(layer, x, w, ids, None, None)
        method.moe_kernel.prepare_finalize.dispatcher._uncombined = None  # the abandoned batch


def test_capture_past_capacity_is_refused_before_anything_is_captured(monkeypatch):
    monkeypatch.setenv(rv.ENV_MAX_TOKENS, str(mc.CAP))
    method, layer = one_rank_layer(SEED)
    disp = method.moe_kernel.prepare_finalize.dispatcher
    x = torch.randn(mc.CAP + 1, H)
    w, ids = routing(mc.CAP + 1, 0)
    # one rank: chunks are a host computation, so even a captured batch may chunk
    assert rv.chunk_count(disp, mc.CAP + 1, BUDGET) == 2

    class Two(LocalDispatcher):  # the same rule on a group (no agreement inside a graph)
        @property
        def world_size(self):
            return 2

    two = Two(rv.vllm_placement(E, 1), hidden_size=H, top_k=K, dtype=torch.float32,
              max_tokens_per_rank=mc.CAP)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with pytest.raises(ValueError, match="ROCM_MOE_VLLM_MAX_TOKENS"):
            rv.chunk_count(two, mc.CAP + 1, BUDGET)
        assert rv.chunk_count(two, mc.CAP, BUDGET) == 1
    y = method.apply(layer, x, w, ids, None, None)
    assert o.rel_err(y, o.oracle(SEED, x, w, ids, H, I, torch.float32)) <= 1e-5


# ---- refusals at construction -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(activation="gelu"), "activation=gelu"),
        (dict(swiglu_limit=7.0), "swiglu_limit=7.0"),
        (dict(swiglu_alpha=1.702), "swiglu_alpha"),
        (dict(swiglu_beta=1.0), "swiglu_beta"),
        (dict(activation_situ_beta=0.5), "activation_situ_beta"),
    ],
    ids=["gelu", "swiglu_limit", "swiglu_alpha", "swiglu_beta", "situ"],
)
def test_layers_it_would_not_compute_are_refused_at_construction(kw, match):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    if "activation" in kw:
        kw["activation"] = MoEActivation.from_str(kw["activation"])
    with pytest.raises(ValueError, match=match):
        method_for(moe_config(**kw))


def test_data_parallel_without_expert_parallel_refused_at_construction():
    """--data-parallel-size 2 without --enable-expert-parallel: vLLM slices every expert over
    the DP x TP ranks and gathers the tokens itself; rocm_moe would return a partial sum."""
    with pytest.raises(ValueError, match=r"--data-parallel-size=2.*--enable-expert-parallel"):
        method_for(moe_config(dp_size=2))


def test_fused_shared_experts_refused_at_create_weights():
    method = method_for(moe_config())
    layer = torch.nn.Module()
    layer.expert_map_manager = type("M", (), {"num_fused_shared_experts": 1})()
    with pytest.raises(ValueError, match="num_fused_shared_experts=1"):
        method.create_weights(layer, E, H, I, torch.float32)


def test_no_rounding_and_weights_left_as_loaded(monkeypatch):
    """vLLM's ROCm path pads the weights in process_weights_after_loading
    (VLLM_ROCM_MOE_PADDING) and backends round sizes up; the plug-in does neither, and refuses
    weights something else padded, transposed or packed."""
    from vllm.platforms import current_platform

    method = method_for(moe_config())
    assert method.maybe_roundup_sizes(H, I, torch.bfloat16, None) == (H, I)
    monkeypatch.setenv("VLLM_ROCM_MOE_PADDING", "1")
    monkeypatch.setattr(type(current_platform), "is_rocm", lambda self=None: True,
                        raising=False)
    method, layer = one_rank_layer(SEED)
    w13, w2 = o.local_weights(SEED, tuple(range(E)), H, I, torch.float32)
    ptr = layer.w13_weight.data_ptr()
    method.process_weights_after_loading(layer)  # again: nothing moves
    assert layer.w13_weight.data_ptr() == ptr
    assert torch.equal(layer.w13_weight, w13)
    assert torch.equal(layer.w2_weight, w2)
    assert layer.w13_weight.is_contiguous()
    assert layer.w2_weight.is_contiguous()
    for bad in (torch.nn.functional.pad(w13, (0, 16)),  # hidden padded
                w2.transpose(1, 2).contiguous().transpose(1, 2)):  # transposed storage
        name = "w13_weight" if bad.shape[-1] != I else "w2_weight"
        setattr(layer, name, torch.nn.Parameter(bad, requires_grad=False))
        with pytest.raises(ValueError, match=f"layer.{name}"):
            method.process_weights_after_loading(layer)
        setattr(layer, name, torch.nn.Parameter(w13 if name == "w13_weight" else w2,
                                                requires_grad=False))


def test_eplb_is_claimed():  # (the EPLB cases: test_eplb.py)
    assert method_for(moe_config(enable_eplb=True)).supports_eplb is True


# ---- the switches -------------------------------------------------------------------------------
@pytest.mark.parametrize(("env", "value", "match"), [
    (rv.ENV_COMM, "nccl", r"ROCM_MOE_VLLM_COMM='nccl': known comm backends"),
    (rv.ENV_EXPERTS, "cutlass", r"ROCM_MOE_VLLM_EXPERTS='cutlass': known experts backends"),
    (rv.ENV_MAX_TOKENS, "lots", r"ROCM_MOE_VLLM_MAX_TOKENS='lots': must be an integer"),
    (rv.ENV_MAX_TOKENS, "0", r"ROCM_MOE_VLLM_MAX_TOKENS='0'"),
])
def test_bad_switch_values_are_refused_naming_the_variable(env, value, match, monkeypatch):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=match):
        one_rank_layer(SEED)


def test_max_tokens_below_the_graph_sizes_is_refused(monkeypatch):
    monkeypatch.setenv(rv.ENV_MAX_TOKENS, "16")
    with pytest.raises(ValueError, match="largest CUDA-graph size 32"):
        one_rank_layer(SEED, max_capture_size=32)
    assert rv.max_tokens_per_rank(moe_config(max_capture_size=16)) == 16


def test_symm_named_on_a_cpu_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setenv(rv.ENV_COMM, "symm")
    with pytest.raises(ValueError, match=r"ROCM_MOE_VLLM_COMM='symm': unavailable here: no "
                       r"CUDA/ROCm device"):
        rv.comm_name(2, "cpu")


def test_defaults_are_the_fastest_here_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="rocm_moe")
    pool._LOGGED.discard("vllm-experts")
    assert rv.comm_name(1, "cpu") == "local"
    assert rv.comm_name(2, "cpu") == "torch"  # CPU ranks: symm and MORI need GPUs
    assert rv.experts_name("cpu") == "reference"
    assert rv.experts_name("cpu") == "reference"
    logged = [r.getMessage() for r in caplog.records if "vllm experts backend" in r.getMessage()]
    assert len(logged) == 1, logged
    assert "'reference'" in logged[0], logged
    method, _ = one_rank_layer(SEED)
    assert type(method.moe_kernel.fused_experts.experts).__name__ == "ReferenceExperts"
