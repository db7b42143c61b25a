"""A small Qwen3-MoE-shaped model built from SGLang's own classes, and its float64 oracle.

Each layer is what ``qwen3_moe.py``'s ``Qwen3MoeSparseMoeBlock`` builds: a router gate, SGLang's
``TopK(top_k=K, renormalize=True)`` and the MoE class ``get_moe_impl_class`` returns (FusedMoE,
or DeepEPMoE under ``--moe-a2a-backend mori`` with MORI EPv1), with the expert weights loaded
through the layer's own ``weight_loader`` (gate ``w1``, up ``w3``, down ``w2``, global expert
ids) and then ``process_weights_after_loading``. Layers are joined by a residual:
``h = h + moe_l(h)``. The oracle recomputes everything in float64 from the seeds: the router
(softmax, top-k, renormalised), the SwiGLU experts and the routed scaling factor.

    publish(W, rank)          SGLang's runtime context for EP rank ``rank`` of ``W`` (CPU)
    load_plugin()             ROCM_MOE_SGLANG=1 and SGLang's own plug-in loader
    build(spec, layer_cls=..) [Layer]; forward(layers, x) -> [T, H]; oracle(spec, x) float64
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tests_integrations import oracle64 as o


@dataclass(frozen=True)
class Spec:
    E: int = 6
    H: int = 64
    I: int = 32
    K: int = 2
    layers: int = 3
    seed: int = 11
    scale: tuple[float | None, ...] = (None, 2.5, None)  # routed_scaling_factor per layer


def publish(W: int, rank: int, *, a2a: str = "mori", **server_args) -> None:
    """SGLang's runtime context as its launcher publishes it for one EP rank on the CPU: with
    ``W`` > 1 the layout rocm_moe needs (attention DP over every rank, ``--moe-a2a-backend
    mori``; ``a2a="none"``: SGLang's default EP layout, tokens replicated), the MoE EP group
    the gloo WORLD."""
    import torch.distributed as dist
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, reset_context
    from sglang.srt.runtime_context import publish as publish_context
    from sglang.srt.server_args import ServerArgs

    if W > 1:
        layout = dict(attn_dp_size=W, moe_a2a_backend="mori") if a2a == "mori" else {}
        server_args = dict(tp_size=W, ep_size=W, **layout, **server_args)
    reset_context()
    publish_context(ServerArgs(model_path="dummy", device="cpu", **server_args), role="test",
                    ranks=SpawnRanks(world_rank=rank, dp_rank=None))
    initialize_moe_config()
    groups = dict(tp_group=SimpleNamespace(rank_in_group=rank, world_size=W, device_group=None))
    if W > 1:
        world = dist.group.WORLD
        groups["moe_ep_group"] = SimpleNamespace(rank_in_group=rank, world_size=W,
                                                 cpu_group=world, device_group=world)
    get_parallel().override_permanently(**groups)


def load_plugin() -> None:
    import sglang.srt.plugins as plugins

    os.environ["ROCM_MOE_SGLANG"] = "1"
    plugins._plugins_loaded = False
    plugins.load_plugins()


def gate(spec: Spec, layer: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed * 100 + layer)
    return torch.randn(spec.E, spec.H, generator=g) / spec.H ** 0.5


def expert(spec: Spec, layer: int, g: int):
    """(w13 [2I, H], w2 [H, I]) float32 of layer ``layer``'s global expert ``g``."""
    return o.expert_weights(spec.seed * 100 + layer, g, spec.H, spec.I, torch.float32)


def load_experts(moe, spec: Spec, layer: int) -> None:
    """Layer ``layer``'s global experts into SGLang's MoE layer ``moe`` as a checkpoint loads
    them: through its own ``weight_loader``, gate ``w1``, up ``w3``, down ``w2``."""
    for g in range(spec.E):
        w13, w2 = expert(spec, layer, g)
        moe.weight_loader(moe.w13_weight, w13[:spec.I], "w13_weight", "w1", g)
        moe.weight_loader(moe.w13_weight, w13[spec.I:], "w13_weight", "w3", g)
        moe.weight_loader(moe.w2_weight, w2, "w2_weight", "w2", g)


def build(spec: Spec, layer_cls=(), topk_kw: dict | None = None,
          **moe_kw) -> list[SimpleNamespace]:
    """The model's layers, weights loaded as SGLang loads a checkpoint; ``layer_cls``: the MoE
    class of each layer in turn (default: what ``get_moe_impl_class`` returns); ``topk_kw``:
    TopK's routing arguments (default: renormalised softmax)."""
    from sglang.srt.layers.moe.ep_moe.layer import get_moe_impl_class
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.moe.utils import RoutingMethodType

    classes = tuple(layer_cls) or (get_moe_impl_class(None),)
    layers = []
    for n in range(spec.layers):
        cls = classes[n % len(classes)]
        topk = TopK(top_k=spec.K, use_grouped_topk=False, layer_id=n,
                    **(topk_kw or dict(renormalize=True)))
        moe = cls(num_experts=spec.E, top_k=spec.K, layer_id=n, hidden_size=spec.H,
                  intermediate_size=spec.I, params_dtype=torch.float32,
                  routing_method_type=RoutingMethodType.Renormalize,
                  routed_scaling_factor=spec.scale[n], **moe_kw)
        topk.bind_runner_backend(moe.runner_backend, routing_method_type=moe.routing_method_type)
        load_experts(moe, spec, n)
        loaded = (moe.w13_weight.detach().clone(), moe.w2_weight.detach().clone())
        moe.quant_method.process_weights_after_loading(moe)
        layers.append(SimpleNamespace(gate=gate(spec, n), topk=topk, moe=moe, loaded=loaded))
    return layers


def build_gpt_oss(p: dict, *, E: int, K: int, **moe_kw) -> SimpleNamespace:
    """gpt-oss's MoE layer as SGLang's ``models/gpt_oss.py`` builds it (TopK renormalised,
    ``FusedMoE(activation="silu", gemm1_alpha=1.702, gemm1_clamp_limit=7.0, with_bias=True,
    use_weight_loader_fused=True)``), the experts ``p`` (``variants64.expert_params``) written
    as gpt-oss's checkpoint holds them and loaded as its ``load_weights`` loads them (each fused
    tensor through the layer's weight loader, weights transposed, biases as they are).
    ``loaded``: the tensors as SGLang's loader left them, before process_weights_after_loading."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.topk import TopK

    from tests_integrations import variants64 as v64

    H, I = p["w13"].shape[2], p["w2"].shape[2]
    topk = TopK(top_k=K, renormalize=True, layer_id=0)
    moe = FusedMoE(num_experts=E, top_k=K, layer_id=0, hidden_size=H, intermediate_size=I,
                   params_dtype=p["w13"].dtype, activation="silu", gemm1_alpha=1.702,
                   gemm1_clamp_limit=7.0, with_bias=True, use_weight_loader_fused=True,
                   **moe_kw)
    topk.bind_runner_backend(moe.runner_backend)
    ck = v64.gpt_oss_checkpoint(p)
    if not moe_kw.get("gate_up_interleaved", True):  # a split-layout checkpoint
        ck.update(gate_up_proj=p["w13"].transpose(1, 2).contiguous(), gate_up_proj_bias=p["b13"])
    # EP: this rank's experts of the fused tensors (SGLang's fused loader copies the whole
    # tensor it is given; gpt_oss.py slices [ep_rank * e, (ep_rank + 1) * e) before it)
    e = moe.w13_weight.shape[0]
    lo = moe.moe_ep_rank * e
    for param_name, weight_name, shard in FusedMoE.make_expert_params_mapping_fused(
            "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        name = param_name.split(".")[-1]
        w = ck[weight_name.split(".")[-1]][lo:lo + e]
        w = w if "bias" in name else w.transpose(-2, -1)
        param = getattr(moe, name)
        param.weight_loader(param, w, name, shard_id=shard)  # gpt_oss.py's call
    loaded = dict(w13=moe.w13_weight.detach().clone(), b13=moe.w13_weight_bias.detach().clone(),
                  w2=moe.w2_weight.detach().clone(), b2=moe.w2_weight_bias.detach().clone())
    moe.quant_method.process_weights_after_loading(moe)
    g = torch.Generator().manual_seed(E * 7 + K)
    return SimpleNamespace(gate=torch.randn(E, H, generator=g) / H ** 0.5, topk=topk, moe=moe,
                           loaded=loaded)


def forward_one(layer, x: torch.Tensor):
    """One MoE layer (no residual): (y [T, H], its routing weights [T, K], ids [T, K])."""
    out = layer.topk(x, x @ layer.gate.T) if x.shape[0] else \
        layer.topk.empty_topk_output(x.device)
    return as_the_block(layer, layer.moe(x, out)), out.topk_weights, out.topk_ids


def as_the_block(layer, y: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output ``y`` as SGLang's model block leaves it: where the layer did not
    apply its routed_scaling_factor (rocm_moe's dispatcher scales the weights, as SGLang's
    runner scales the output, except for the blocks that scale it themselves:
    ``rocm_moe.integrations.sglang.SELF_SCALING_BLOCKS``, test_deepseek.py), the block does.
    These Qwen3-style blocks never turn the dispatcher's scaling off, so this is the identity
    for them: a factor applied twice or never fails their oracle."""
    factor = layer.moe.moe_runner_config.routed_scaling_factor
    if factor in (None, 1.0) or getattr(layer.moe.dispatcher, "routed_scaling_factor",
                                        None) not in (None, 1.0):
        return y
    return y * factor


def forward(layers, x: torch.Tensor) -> torch.Tensor:
    """The model blocks' forward per layer (routing, the MoE layer, ``as_the_block``), with a
    residual between layers."""
    h = x
    for layer in layers:
        if h.shape[0]:
            out = layer.topk(h, h @ layer.gate.T)
        else:
            out = layer.topk.empty_topk_output(h.device)
        h = h + as_the_block(layer, layer.moe(h, out))
    return h


def oracle(spec: Spec, x: torch.Tensor) -> torch.Tensor:
    """[T, H] float64 of the same model from the seeds."""
    h = x.double()
    for n in range(spec.layers):
        p = torch.softmax(h @ gate(spec, n).double().T, dim=-1)
        w, ids = p.topk(spec.K, dim=-1)
        w = w / w.sum(-1, keepdim=True) * (spec.scale[n] or 1.0)
        y = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for k in range(spec.K):
                w13, w2 = (a.double() for a in expert(spec, n, int(ids[t, k])))
                a = w13 @ h[t]
                y[t] += w[t, k] * (w2 @ (torch.nn.functional.silu(a[:spec.I]) * a[spec.I:]))
        h = h + y
    return h


def tokens(spec: Spec, rank: int, T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed * 1000 + rank * 7 + T)
    return torch.randn(T, spec.H, generator=g)


# ---- the decode-graph contract --------------------------------------------------------------
class HostRead(AssertionError):
    """A tensor was read on the host inside the adapter's path under (simulated) capture."""


_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


class CaptureGuard:
    """Simulated CUDA-graph capture on the CPU: ``torch.cuda.is_available`` and
    ``is_current_stream_capturing`` answer True, and every host read of a tensor
    (``Tensor.item/tolist/cpu/numpy``, ``bool()/int()/float()`` of a tensor) raises
    ``HostRead`` while the guard is on. The backends' own kernels (the shared dispatcher's
    ``_dispatch`` / ``_combine`` and the experts) are outside the adapter: on the GPU they are
    device code with their own capture tests, so the guard is off while they run."""

    def __init__(self, monkeypatch, layers):
        self.on, self.mp = False, monkeypatch
        for name in _READS:
            monkeypatch.setattr(torch.Tensor, name, self._guarded(getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        rd = layers[0].moe.dispatcher
        for name in ("_dispatch", "_combine"):
            monkeypatch.setattr(rd.dispatcher, name, self._outside(getattr(rd.dispatcher, name)))
        for layer in layers:
            monkeypatch.setattr(layer.moe.dispatcher, "experts",
                                self._outside(layer.moe.dispatcher.experts))

    def _guarded(self, read):
        def guarded(t, *a, **kw):
            if self.on:
                raise HostRead(f"Tensor.{read.__name__} under capture")
            return read(t, *a, **kw)
        return guarded

    def _outside(self, fn):
        def outside(*a, **kw):
            on, self.on = self.on, False
            try:
                return fn(*a, **kw)
            finally:
                self.on = on
        return outside

    def forward(self, layers, x):
        """``forward`` with the routing eager (SGLang's TopK is not the adapter) and each MoE
        layer's call under the guard."""
        h = x
        for layer in layers:
            out = layer.topk(h, h @ layer.gate.T) if h.shape[0] else \
                layer.topk.empty_topk_output(h.device)
            self.on = True
            try:
                y = layer.moe(h, out)
            finally:
                self.on = False
            h = h + as_the_block(layer, y)
        return h


class _Patch:
    """A small monkeypatch for spawned ranks (pytest's fixture lives in the parent)."""

    def __init__(self):
        self.undo = []

    def setattr(self, obj, name, value):
        self.undo.append((obj, name, vars(obj).get(name, _Missing)))
        setattr(obj, name, value)

    def undo_all(self):
        for obj, name, old in reversed(self.undo):
            if old is _Missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.undo.clear()


class _Missing:
    pass


# ---- what each spawned rank runs ----------------------------------------------------------
CAP = 8
SIZES = (1, CAP, CAP * 7 // 2)  # 1, max_tokens_per_rank, 3.5 x max_tokens_per_rank


def _fake_mori():
    import rocm_moe.comm.mori as rm
    from tests.fakes import FakeMori

    fake = FakeMori()
    rm._import_mori = lambda: fake
    rm.MoriDispatcher.availability = classmethod(lambda cls: None)


def _model(spec, comm: str | None, cap: int):
    from sglang.srt.layers.moe.ep_moe.layer import DeepEPMoE
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    from rocm_moe.comm import pool

    pool.clear()
    os.environ.pop("ROCM_MOE_SGLANG_COMM", None)
    if comm:
        os.environ["ROCM_MOE_SGLANG_COMM"] = comm
    os.environ["ROCM_MOE_SGLANG_MAX_TOKENS"] = str(cap)
    return build(spec, (FusedMoE, DeepEPMoE))


def _sharing(layers) -> dict:
    from rocm_moe.comm import pool

    shared = pool.shared_dispatchers()
    return dict(pooled=len(shared), backend=shared[0].name,
                cap=shared[0].max_tokens_per_rank,
                all_share=all(layer.moe.dispatcher.dispatcher is shared[0] for layer in layers),
                classes=[type(layer.moe).__name__ for layer in layers],
                as_loaded=all(torch.equal(layer.moe.w13_weight, layer.loaded[0])
                              and torch.equal(layer.moe.w2_weight, layer.loaded[1])
                              for layer in layers))


def _served(spec, r: int, comm: str | None, layers, maps: list | None) -> dict:
    """The 3-layer model on ``comm`` at capacity CAP: its sharing, the float64 oracle at every
    size, chunked against one batch; ``maps``: the symmetric buffers allocated (symm)."""
    res = _sharing(layers)
    if maps is not None:
        res["buffers"] = len(maps)  # before the one-batch model below allocates its own
    for j in range(len(SIZES)):  # every rank a different size each round
        x = tokens(spec, r, SIZES[(j + r) % len(SIZES)])
        res[f"T={x.shape[0]}"] = o.rel_err(forward(layers, x), oracle(spec, x))
    x = tokens(spec, r, SIZES[-1])
    chunked = forward(layers, x)
    if comm == "mori":
        guard = CaptureGuard(_Patch(), layers)
        try:
            xs = tokens(spec, r, CAP - r)
            res["captured_equal"] = torch.equal(guard.forward(layers, xs),
                                                forward(layers, xs))
            try:
                guard.forward(layers, tokens(spec, r, CAP + 1))
            except ValueError as e:
                res["captured_over_cap"] = str(e)
        finally:
            guard.mp.undo_all()
    one = forward(_model(spec, comm, 64), x)
    res["chunks_bitwise"] = torch.equal(chunked, one)
    res["chunks_err"] = o.rel_err(chunked, one.double())
    return res


def rank_scenarios(info) -> dict:
    """Every multi-rank check of the SGLang model on one rank (one SGLang import per rank)."""
    from rocm_moe import backends
    from tests.symm_shm import served_as, shm_available

    W, r = info.world_size, info.rank
    spec = Spec()
    _fake_mori()
    publish(W, r)
    load_plugin()
    out: dict = {}
    for comm in (None, "torch", "mori", "symm"):
        label = {None: "default", "symm": "symm_shm"}.get(comm, comm)
        if comm == "symm" and (reason := shm_available()) is not None:
            out[label] = dict(skipped=reason)
            continue
        with served_as(comm) as maps:  # symm served for real on CPU ranks: tests/symm_shm.py
            try:
                layers = _model(spec, comm, CAP)
            except ValueError as e:  # MORI at W = 3: a power-of-two EP size only
                out[label] = dict(refused=str(e))
                continue
            out[label] = _served(spec, r, comm, layers, maps)
    seen = {}
    real = backends.make_dispatcher

    def spy(name, placement, rank, **kw):
        seen.update(kw)
        return real(name, placement, rank, **kw)

    backends.make_dispatcher = spy
    try:
        _model(spec, "symm", CAP)
    except (ValueError, TypeError) as e:
        out["symm"] = dict(error=type(e).__name__, message=str(e),
                           max_tokens_per_rank=seen.get("max_tokens_per_rank"))
    finally:
        backends.make_dispatcher = real
    out["gpt_oss"] = gpt_oss_scenario(info)
    out["tbo"] = tbo_scenario(info)
    return out


def gpt_oss_scenario(info) -> dict:
    """SGLang's gpt-oss layer (``build_gpt_oss``) on this EP rank, comm torch: the float64
    oracle of the checkpoint's experts at SGLang's routing, batches of every size."""
    from rocm_moe.comm import pool
    from tests_integrations import variants64 as v64

    pool.clear()
    os.environ["ROCM_MOE_SGLANG_COMM"] = "torch"
    os.environ["ROCM_MOE_SGLANG_MAX_TOKENS"] = str(CAP)
    E, K = (6 if info.world_size == 3 else 8), 2  # SGLang splits the experts evenly
    p = v64.expert_params(29, E, 64, 32, torch.float32)
    # every rank loads the whole checkpoint; SGLang's loader keeps this rank's experts
    layer = build_gpt_oss(p, E=E, K=K)
    out = dict(err=[], variant="gpt_oss" if layer.moe.dispatcher.variant
               == rs_variant() else "other")
    for j in range(len(SIZES)):
        x = tokens(Spec(), info.rank, SIZES[(j + info.rank) % len(SIZES)])
        y, w, ids = forward_one(layer, x)
        out["err"].append(o.rel_err(y, v64.oracle(x, w, ids, p)))
    os.environ.pop("ROCM_MOE_SGLANG_COMM", None)
    pool.clear()
    return out


def rs_variant():
    from rocm_moe.integrations import sglang as rs

    return rs.ExpertVariant.gpt_oss(alpha=1.702, limit=7.0)


# ---- SGLang's two-batch overlap (--enable-two-batch-overlap) ------------------------------------
def tbo_operations(spec: Spec, layers, strategy: str) -> list:
    """The operations of SGLang's TBO strategy for Qwen3-MoE layers (``batch_overlap/
    operations_strategy.py``: ``_compute_moe_qwen3_prefill``, yields after op_dispatch_a and
    op_combine_a, delta 0; ``_compute_moe_qwen3_decode``, yields also before op_dispatch_a and
    after the layer, delta 2) without the attention: per layer, SGLang's own
    ``Qwen3MoeSparseMoeBlock.op_gate / op_select_experts / op_dispatch_a / op_dispatch_b /
    op_experts / op_combine_a / op_combine_b / op_output`` bound to that layer's gate, TopK
    and MoE, between a prologue that puts the layer input in the state and an epilogue that
    adds the residual."""
    from sglang.srt.batch_overlap.operations import YieldOperation
    from sglang.srt.models.qwen3_moe import Qwen3MoeSparseMoeBlock as Block

    ops = []
    for n, layer in enumerate(layers):
        gate = layer.gate
        block = SimpleNamespace(layer_id=n, ep_size=layer.moe.moe_ep_size, topk=layer.topk,
                                experts=layer.moe, gate=lambda h, g=gate: (h @ g.T, None))

        def begin(state, hidden_states, forward_batch, tbo_subbatch_index):
            state.update(dict(hidden_states_mlp_input=hidden_states, residual=hidden_states,
                              forward_batch=forward_batch,
                              tbo_subbatch_index=tbo_subbatch_index))

        def end(state):
            h = state.pop("residual") + state.pop("hidden_states_mlp_output")
            out = dict(hidden_states=h, forward_batch=state.pop("forward_batch"),
                       tbo_subbatch_index=state.pop("tbo_subbatch_index"))
            state.clear([])
            return out

        bound = {name: _bind(getattr(Block, name), block, name)
                 for name in ("op_gate", "op_select_experts", "op_dispatch_a", "op_dispatch_b",
                              "op_experts", "op_combine_a", "op_combine_b", "op_output")}
        y = YieldOperation
        if strategy == "prefill":
            ops += [begin, bound["op_gate"], bound["op_select_experts"], bound["op_dispatch_a"],
                    y(), bound["op_dispatch_b"], bound["op_experts"], bound["op_combine_a"],
                    y(), bound["op_combine_b"], bound["op_output"], end]
        else:
            ops += [begin, bound["op_gate"], bound["op_select_experts"], y(),
                    bound["op_dispatch_a"], y(), bound["op_dispatch_b"], bound["op_experts"],
                    bound["op_combine_a"], y(), bound["op_combine_b"], bound["op_output"], end,
                    y()]
    return ops


def _bind(fn, block, name: str):
    def op(state):
        return fn(block, state)

    op.__name__ = name
    return op


def _forward_batch(T: int):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    class _Padding:
        @staticmethod
        def is_max_len():
            return False

    return SimpleNamespace(forward_mode=ForwardMode.EXTEND, moe_num_token_non_padded=None,
                           global_dp_buffer_len=T, tbo_padded_len=T,
                           global_num_tokens_cpu=None, dp_padding_mode=_Padding())


def run_tbo(spec: Spec, layers, x: torch.Tensor, split: int, strategy: str, log: list):
    """``x`` as SGLang's TBO runs it: two sub-batches (cut at ``split``) through
    ``execute_overlapped_operations`` (SGLang's own stage executor) with the strategy's
    delta; the dispatcher's dispatch / combine calls are logged as (op, sub-batch)."""
    from sglang.srt.batch_overlap.operations import execute_overlapped_operations
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    ops = tbo_operations(spec, layers, strategy)
    for layer in layers:
        for op in ("dispatch_a", "combine_a"):
            real = layer.moe.dispatcher.__class__.__dict__[op].__get__(layer.moe.dispatcher)

            def logged(*a, _real=real, _op=op, tbo_subbatch_index=None, **kw):
                log.append(f"{_op[0].upper()}{tbo_subbatch_index}")
                return _real(*a, tbo_subbatch_index=tbo_subbatch_index, **kw)

            setattr(layer.moe.dispatcher, op, logged)
    parts = [x[:split], x[split:]]
    inputs = [dict(hidden_states=p, forward_batch=_forward_batch(p.shape[0]),
                   tbo_subbatch_index=i) for i, p in enumerate(parts)]
    with forward_context(ForwardContext(attn_backend=None)):
        outs = execute_overlapped_operations(inputs, [ops, ops],
                                             [0, 0 if strategy == "prefill" else 2])
    return torch.cat([o_["hidden_states"] for o_ in outs])


def tbo_scenario(info) -> dict:
    """A 3-layer model built with ``--enable-two-batch-overlap`` (SGLang's MoE flag
    ``tbo_enabled``) on comm torch and MORI (the fake, W = 2), run as SGLang's TBO runs it,
    prefill and decode strategies: equal to the same model's one-batch forward (to float32
    rounding: the router GEMM of a sub-batch) and to the float64 oracle. At W = 2 also comm
    symm served on CPU ranks (tests/symm_shm.py), two lanes of its one buffer."""
    from sglang.srt.runtime_context import get_flags

    from tests.symm_shm import served_as, shm_available

    W, r = info.world_size, info.rank
    spec = Spec()
    out: dict = {}
    get_flags().moe.tbo_enabled = True
    try:
        for comm in ("torch", "mori", "symm") if W == 2 else ("torch",):
            if comm == "symm" and shm_available() is not None:
                continue
            with served_as(comm) as maps:
                layers = _model(spec, comm, 64)
                rd = layers[0].moe.dispatcher
                res = dict(lanes=rd.dispatcher.batches_in_flight,
                           holds=rd.dispatcher.holds_batch)
                T, split = ((9, 1), (33, 17), (2, 1))[r % 3]
                x = tokens(spec, r, T)
                for strategy in ("prefill", "decode"):
                    log: list = []
                    y = run_tbo(spec, layers, x, split, strategy, log)
                    res[strategy] = dict(order=log[:4], err=o.rel_err(y, oracle(spec, x)),
                                         vs_one=o.rel_err(y, forward(layers, x).double()))
                if maps is not None:
                    res["buffers"] = len(maps)
                out[comm] = res
    finally:
        get_flags().moe.tbo_enabled = False
        os.environ.pop("ROCM_MOE_SGLANG_COMM", None)
    return out
