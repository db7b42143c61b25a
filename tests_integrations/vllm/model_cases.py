"""Rank-side cases of the served-model tests: the plug-in inside vLLM's own layer classes
(``FusedMoEFactory``: router, RoutedExperts, runner), with vLLM's parallel state up on gloo ranks
(TP = W with expert parallelism: vLLM's EP group is every rank), as vLLM builds a model:

    register() -> FusedMoEFactory per layer -> weights copied in -> process_weights_after_loading
    forward: h -> runner.forward(h, h @ gate_l) -> h + y   (a residual between the layers)

Each layer's output is checked against the float64 oracle at that layer's own input, with the
ids and weights vLLM's router picked (routing is vLLM's; the oracle checks the MoE)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from rocm_moe.comm import pool
from rocm_moe.integrations import vllm as rv
from tests_integrations import oracle64 as o

SEED = 5
E, K, H, I = 8, 3, 64, 32
CAP = 8  # ROCM_MOE_VLLM_MAX_TOKENS in the chunked cases
SIZES = [1, CAP, CAP * 7 // 2]  # 1, capacity, 3.5x capacity
LAYERS = 3
# DeepSeek-V3's router: sigmoid scores, grouped top-k with a correction bias (its
# routed_scaling_factor scales the top-k weights)
GROUPED = dict(use_grouped_topk=True, num_expert_group=2, topk_group=2, scoring_func="sigmoid",
               e_score_correction_bias=torch.zeros(E))


@contextmanager
def env(**values: str | None):
    """Environment variables set (None: unset) for the block, restored after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def vllm_config(W: int, **parallel):
    from vllm.config import ParallelConfig, VllmConfig

    return VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=W,
                                                     enable_expert_parallel=W > 1, **parallel))


def init_vllm(info):
    """vLLM's parallel state on this launch's gloo ranks; returns the base VllmConfig."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    cfg = vllm_config(info.world_size)
    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(info.world_size, info.rank, local_rank=info.rank,
                                        backend="gloo")
        ps.initialize_model_parallel(tensor_model_parallel_size=info.world_size)
    os.environ[rv.SWITCH] = "1"
    assert rv.register()
    return cfg


def gate(layer: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED * 100 + layer)
    return torch.randn(E, H, generator=g).to(dtype)


def local_experts(runner) -> tuple[int, ...]:
    emap = runner.routed_experts.expert_map
    if emap is None:
        return tuple(range(E))
    pairs = sorted((int(emap[g]), g) for g in range(E) if int(emap[g]) >= 0)
    return tuple(g for _, g in pairs)


def build_model(cfg, name: str, dtype=torch.float32, layers: int = LAYERS, **layer_kw):
    """``layers`` FusedMoE layers as a vLLM model builds them, weights loaded."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    runners = []
    with set_current_vllm_config(cfg):
        for i in range(layers):
            runners.append(FusedMoEFactory(
                num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                params_dtype=dtype, prefix=f"{name}.layers.{i}.mlp.experts", renormalize=True,
                **layer_kw))
        for i, runner in enumerate(runners):
            re = runner.routed_experts
            w13, w2 = o.local_weights(SEED + i, local_experts(runner), H, I, dtype)
            with torch.no_grad():
                re.w13_weight.copy_(w13)
                re.w2_weight.copy_(w2)
            re.quant_method.process_weights_after_loading(re)
    return runners


def forward(cfg, runners, x: torch.Tensor) -> list[tuple]:
    """The residual stack; per layer (input, logits, output)."""
    from vllm.forward_context import set_forward_context

    records, h = [], x
    with set_forward_context({}, cfg):
        for i, runner in enumerate(runners):
            logits = (h.float() @ gate(i, h.dtype).float().T).to(h.dtype)
            y = runner.forward(h, logits)
            records.append((h, logits, y))
            h = h + y
    return records


def worst_err(runners, records) -> float:
    worst = 0.0
    for i, (runner, (h, logits, y)) in enumerate(zip(runners, records, strict=True)):
        if h.shape[0] == 0:
            continue
        w, ids = runner.router.select_experts(hidden_states=h, router_logits=logits)
        ref = o.oracle(SEED + i, h, w.float(), ids, H, I, h.dtype)
        worst = max(worst, o.rel_err(y, ref))
    return worst


def invariant_experts(runners) -> None:
    """The batch-invariant reference experts (``rocm_moe.invariant``) in every layer: BLAS
    picks kernels by row count, so the default reference experts' bits for a row depend on
    how many rows came with it, and chunking changes that."""
    from rocm_moe.experts.reference import ReferenceExperts

    for r in runners:
        r.routed_experts.quant_method.moe_kernel.fused_experts.experts = \
            ReferenceExperts().as_invariant()


def dispatchers(runners) -> list:
    return [r.routed_experts.quant_method.moe_kernel.prepare_finalize.dispatcher
            for r in runners]


def inputs(rank: int, step: int, dtype=torch.float32) -> torch.Tensor:
    """Step s: rank r brings SIZES[(s + r) % 3] tokens, so every step mixes chunk counts."""
    T = SIZES[(step + rank) % len(SIZES)]
    g = torch.Generator().manual_seed(SEED * 1000 + step * 10 + rank)
    return torch.randn(T, H, generator=g).to(dtype)


def serve_case(info, cfg, comm: str) -> dict:
    """A 3-layer model on ``comm`` at capacity CAP (larger batches chunk): the float64 oracle,
    one dispatcher for every layer; with comm=torch also bit-identity with the same model at
    vLLM's default capacity (one chunk), both on the batch-invariant reference experts."""
    pool.clear()
    with env(ROCM_MOE_VLLM_COMM=comm, ROCM_MOE_VLLM_MAX_TOKENS=str(CAP)):
        model = build_model(cfg, f"{comm}-chunked")
    shared = pool.shared_dispatchers()
    ds = dispatchers(model)
    out = dict(pool=len(shared), same=all(d is shared[0] for d in ds),
               backend=type(ds[0]).__name__, cap=ds[0].max_tokens_per_rank,
               budget=model[0].moe_config.max_num_tokens, err=[], bitwise=[], tokens=[])
    ref_model = None
    if comm == "torch":
        pool.clear()
        with env(ROCM_MOE_VLLM_COMM=comm, ROCM_MOE_VLLM_MAX_TOKENS=None):
            ref_model = build_model(cfg, f"{comm}-whole")
        invariant_experts(model)
        invariant_experts(ref_model)
        out["ref_cap"] = dispatchers(ref_model)[0].max_tokens_per_rank
    for step in range(len(SIZES)):
        x = inputs(info.rank, step)
        recs = forward(cfg, model, x)
        out["tokens"].append(x.shape[0])
        out["err"].append(worst_err(model, recs))
        if ref_model is not None:
            whole = forward(cfg, ref_model, x)
            out["bitwise"].append(all(torch.equal(a[2], b[2])
                                      for a, b in zip(recs, whole, strict=True)))
    pool.clear()
    return out


def with_fake_mori(fn):
    """``fn()`` with comm=mori served by the MORI fake (its contract: capacity, int32 ids,
    one batch per op, combine's own ids); the fake's op count in ``fn``'s result."""
    import rocm_moe.comm.mori as rm
    from tests.fakes import FakeMori

    fake = FakeMori()
    saved = (rm._import_mori, rm.MoriDispatcher.availability)
    rm._import_mori = lambda: fake
    rm.MoriDispatcher.availability = classmethod(lambda cls: None)
    try:
        out = fn()
        out["ops"] = fake.built
    finally:
        rm._import_mori, rm.MoriDispatcher.availability = saved
    return out


def mori_case(info, cfg) -> dict:
    """comm=mori through the MORI fake (its contract: capacity, int32 ids, one batch in flight,
    combine's own ids)."""
    return with_fake_mori(lambda: serve_case(info, cfg, "mori"))


def symm_case(info, cfg) -> dict:
    """comm=symm on CPU ranks: what the adapter hands the pool (max_tokens_per_rank = vLLM's
    budget), and the refusal a user sees (symm's own reason, naming the variable)."""
    import rocm_moe.comm.symm as rsy

    seen: dict = {}
    real = pool.shared_dispatcher

    def record(name, placement, **kw):
        seen.update(kw, name=name, W=placement.world_size)
        raise RuntimeError("recorded")

    pool.clear()
    saved = rsy.SymmDispatcher.availability
    rsy.SymmDispatcher.availability = classmethod(lambda cls: None)
    pool.shared_dispatcher = record
    try:
        with env(ROCM_MOE_VLLM_COMM="symm", ROCM_MOE_VLLM_MAX_TOKENS=None):
            try:
                build_model(cfg, "symm-args", layers=1)
            except RuntimeError as exc:
                seen["stopped"] = str(exc)
    finally:
        pool.shared_dispatcher = real
        rsy.SymmDispatcher.availability = saved
    out = dict(kw={k: v for k, v in seen.items() if k in ("name", "W", "max_tokens_per_rank",
                                                            "hidden_size", "top_k", "stopped")})
    out["budget"] = vllm_config(info.world_size).scheduler_config.max_num_batched_tokens
    for what in ("build", "pool"):  # the adapter's refusal, and symm's own constructor's
        try:
            with env(ROCM_MOE_VLLM_COMM="symm"):
                if what == "build":
                    build_model(cfg, "symm-refused", layers=1)
                else:
                    real("symm", rv.vllm_placement(E, info.world_size), group=seen["group"],
                         rank=seen["rank"], **{k: seen[k] for k in ("hidden_size", "top_k",
                                                                     "dtype",
                                                                     "max_tokens_per_rank")})
            out[what] = "built"
        except Exception as exc:  # the test checks its type: ValueError, not TypeError
            out[what] = f"{type(exc).__name__}: {exc}"
    return out


def with_shm_symm(fn):
    """``fn()`` with comm=symm served for real on CPU ranks: SymmDispatcher with its symmetric
    buffer in shared memory and its kernels interpreted (tests/symm_shm.py), reached by name
    through the plug-in; the symmetric buffers allocated in ``fn``'s result."""
    from tests.symm_shm import as_symm_backend, shm_available

    if (reason := shm_available()) is not None:
        return dict(skipped=reason)
    with as_symm_backend() as maps:
        out = fn()
    out["buffers"] = len(maps)
    return out


def shm_symm_case(info, cfg) -> dict:
    """comm=symm served on CPU ranks (``with_shm_symm``): the same 3-layer chunked model as the
    torch and MORI cases."""
    return with_shm_symm(lambda: serve_case(info, cfg, "symm"))


def placement_case(info) -> dict:
    """Placement as vLLM resolves it: round_robin requested without expert groups falls back
    to linear (the batch runs); with expert groups it stays round_robin (torch comm runs it,
    MORI is refused at construction)."""
    out = {}
    grouped = GROUPED
    for label, kw in (("flat", {}), ("grouped", grouped)):
        pool.clear()
        cfg = vllm_config(info.world_size, expert_placement_strategy="round_robin")
        with env(ROCM_MOE_VLLM_COMM="torch", ROCM_MOE_VLLM_MAX_TOKENS=None):
            model = build_model(cfg, f"rr-{label}", layers=1, **kw)
        recs = forward(cfg, model, inputs(info.rank, 0))
        out[label] = dict(resolved=model[0].expert_placement_strategy,
                          experts=list(local_experts(model[0])),
                          placement=list(dispatchers(model)[0].placement.local_experts(
                              info.rank)),
                          err=worst_err(model, recs))
    pool.clear()
    import rocm_moe.comm.mori as rm

    saved = rm.MoriDispatcher.availability
    rm.MoriDispatcher.availability = classmethod(lambda cls: None)
    try:
        cfg = vllm_config(info.world_size, expert_placement_strategy="round_robin")
        with env(ROCM_MOE_VLLM_COMM="mori"):
            build_model(cfg, "rr-mori", layers=1, **grouped)
        out["mori"] = "built"
    except ValueError as exc:
        out["mori"] = str(exc)
    finally:
        rm.MoriDispatcher.availability = saved
    pool.clear()
    return out


def scaling_case(info, cfg) -> dict:
    """routed_scaling_factor is vLLM's to apply (DeepSeek's grouped router scales the top-k
    weights, or the runner the output): the layer's output is s times the unscaled layer's,
    never s**2 or 1; and the oracle at vLLM's (scaled) weights matches."""
    pool.clear()
    x = inputs(info.rank, 1)
    with env(ROCM_MOE_VLLM_COMM="torch", ROCM_MOE_VLLM_MAX_TOKENS=None):
        plain = build_model(cfg, "scale-1", layers=1, **GROUPED)
        on_w = build_model(cfg, "scale-w", layers=1, routed_scaling_factor=2.5, **GROUPED)
        on_out = build_model(cfg, "scale-out", layers=1, routed_scaling_factor=2.5,
                             apply_routed_scale_to_output=True, **GROUPED)
    y1 = forward(cfg, plain, x)[0][2]
    out = {}
    for label, model in (("weights", on_w), ("output", on_out)):
        recs = forward(cfg, model, x)
        out[label] = o.rel_err(recs[0][2], 2.5 * y1.double())
        if label == "weights":  # the oracle at the router's scaled weights
            out["weights-oracle"] = worst_err(model, recs)
    pool.clear()
    return out


def gelu_case(cfg) -> str:
    try:
        build_model(cfg, "gelu", layers=1, activation="gelu")
    except ValueError as exc:
        return str(exc)
    return "built"


def gpt_oss_case(info, cfg) -> dict:
    """gpt-oss's MoE layer as vLLM's model builds it (``FusedMoEFactory(activation=
    "swigluoai", has_bias=True, routed_experts_cls=GptOssRoutedExperts)``), its checkpoint
    tensors loaded through vLLM's own gpt-oss weight loader (the streamed per-expert path,
    ``GptOssRoutedExperts.weight_loader``, which keeps the interleaved gate/up rows): the
    float64 oracle on the checkpoint's semantics, and vLLM's ``SwigluOAIAndMul.forward_native``
    composed on the weights vLLM loaded (before the plug-in de-interleaves them)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.activation import SwigluOAIAndMul
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory
    from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts

    from tests_integrations import variants64 as v64

    pool.clear()
    p = v64.expert_params(SEED, E, H, I, torch.float32)
    ck = v64.gpt_oss_checkpoint(p)
    with env(ROCM_MOE_VLLM_COMM="torch", ROCM_MOE_VLLM_MAX_TOKENS=None), \
            set_current_vllm_config(cfg):
        runner = FusedMoEFactory(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                                 params_dtype=torch.float32, renormalize=True, has_bias=True,
                                 prefix="gpt-oss.layers.0.mlp.experts", activation="swigluoai",
                                 routed_experts_cls=GptOssRoutedExperts)
        re = runner.routed_experts
        for name, key, shard in (("w13_weight", "gate_up_proj", "gpt_oss_w13"),
                                 ("w13_bias", "gate_up_proj_bias", "gpt_oss_w13"),
                                 ("w2_weight", "down_proj", "gpt_oss_w2"),
                                 ("w2_bias", "down_proj_bias", "gpt_oss_w2")):
            param = getattr(re, name)
            for g in range(E):
                re.weight_loader(param, ck[key][g], name, shard, g)
        here = local_experts(runner)
        loaded = dict(w13=re.w13_weight.detach().clone(), b13=re.w13_bias.detach().clone(),
                      w2=re.w2_weight.detach().clone(), b2=re.w2_bias.detach().clone())
        re.quant_method.process_weights_after_loading(re)
        op = SwigluOAIAndMul(1.702, 7.0)  # vLLM's own op (a CustomOp: built in the config)
    out = dict(activation=re.activation.value, err=[], engine_err=[],
               variant="gpt_oss" if re.quant_method.moe_kernel.fused_experts.variant
               == rv.ExpertVariant.gpt_oss(alpha=1.702, limit=7.0) else "other")
    for step in range(len(SIZES)):
        h = inputs(info.rank, step)
        _, logits, y = forward(cfg, [runner], h)[0]
        w, ids = runner.router.select_experts(hidden_states=h, router_logits=logits)
        out["err"].append(o.rel_err(y, v64.oracle(h, w.float(), ids, p)))
        # vLLM's own op on the rows vLLM's loader left for this rank's experts equals the
        # oracle's part for those experts (the oracle is the engine's semantics)
        local_ids = torch.where(torch.isin(ids, torch.tensor(here, dtype=ids.dtype)), ids, -1)
        engine = torch.zeros(h.shape[0], H, dtype=torch.float64)
        for t, k in (local_ids >= 0).nonzero().tolist():
            j = here.index(int(ids[t, k]))
            a = h[t].double() @ loaded["w13"][j].double().T + loaded["b13"][j].double()
            e_out = op.forward_native(a[None])[0] @ loaded["w2"][j].double().T
            engine[t] += float(w[t, k]) * (e_out + loaded["b2"][j].double())
        out["engine_err"].append(o.rel_err(engine, v64.oracle(h, w.float(), local_ids, p)))
    pool.clear()
    return out


def llama4_case(info, cfg) -> dict:
    """Llama 4's routed experts as vLLM builds them (``FusedMoEFactory(top_k=1,
    custom_routing_function=Llama4MoE.custom_routing_function, apply_router_weight_on_input=
    True, renormalize=False)``): the sigmoid of the top-1 logit scales the token before the
    expert (vLLM's rounding: ``x * w.to(x.dtype)``), the float64 oracle at vLLM's ids."""
    from vllm.model_executor.models.llama4 import Llama4MoE

    pool.clear()
    with env(ROCM_MOE_VLLM_COMM="torch", ROCM_MOE_VLLM_MAX_TOKENS=None):
        runners = build_llama4(cfg, Llama4MoE.custom_routing_function)
    out = dict(err=[], top_k=runners[0].routed_experts.top_k)
    for step in range(len(SIZES)):
        h = inputs(info.rank, step)
        _, logits, y = forward(cfg, runners, h)[0]
        w, ids = runners[0].router.select_experts(hidden_states=h, router_logits=logits)
        ref = o.oracle(SEED, h * w.to(h.dtype), torch.ones_like(w), ids, H, I, h.dtype)
        out["err"].append(o.rel_err(y, ref) if h.shape[0] else 0.0)
        # Llama 4's router: the sigmoid of the top-1 logit (vLLM's custom routing function)
        assert torch.allclose(w.float(), torch.sigmoid(logits.float().max(-1).values)[:, None])
    pool.clear()
    return out


def build_llama4(cfg, routing):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    with set_current_vllm_config(cfg):
        runner = FusedMoEFactory(num_experts=E, top_k=1, hidden_size=H, intermediate_size=I,
                                 params_dtype=torch.float32, prefix="llama4.layers.0.experts",
                                 renormalize=False, custom_routing_function=routing,
                                 apply_router_weight_on_input=True)
        re = runner.routed_experts
        w13, w2 = o.local_weights(SEED, local_experts(runner), H, I, torch.float32)
        with torch.no_grad():
            re.w13_weight.copy_(w13)
            re.w2_weight.copy_(w2)
        re.quant_method.process_weights_after_loading(re)
    return [runner]


# ---- vLLM's dual-batch overlap (--enable-dbo) ---------------------------------------------------
class _Stub:
    """A CUDA stream or event of vLLM's ubatch contexts on the CPU: record / wait do nothing
    (one device queue), so the CPU hand-offs between the micro-batch threads are what runs."""

    def __init__(self, *a, **kw):
        pass

    def record(self, *a):
        pass

    def wait_event(self, *a):
        pass


@contextmanager
def cpu_streams():
    """vLLM's ``ubatching`` with its streams and events stubbed (``_Stub``) and the current
    stream a thread-local (vLLM's ``current_stream`` is one on CUDA as well)."""
    import threading

    from vllm.v1.worker import ubatching

    tls = threading.local()
    saved = (ubatching.current_stream, torch.cuda.set_stream, ubatching.torch.Event)
    ubatching.current_stream = lambda: getattr(tls, "stream", None)
    torch.cuda.set_stream = lambda stream: setattr(tls, "stream", stream)
    ubatching.torch.Event = _Stub
    try:
        yield
    finally:
        ubatching.current_stream, torch.cuda.set_stream, ubatching.torch.Event = saved


def run_ubatched(cfg, runners, x: torch.Tensor, split: int) -> torch.Tensor:
    """The residual stack as vLLM's ``UBatchWrapper._run_ubatches`` runs a DBO step
    (v1/worker/gpu_ubatch_wrapper.py): the batch cut at ``split`` into two micro-batches, each
    run by its own thread inside its ``UBatchContext`` (``make_ubatch_contexts``, one forward
    context each), the threads released by the ready barrier and the first context's event;
    vLLM's own yields (here: the adapter's prepare / finalize hand-offs) interleave them. The
    outputs are concatenated in micro-batch order."""
    import threading

    from vllm.forward_context import create_forward_context
    from vllm.v1.worker.ubatching import make_ubatch_contexts

    slices = [x[:split], x[split:]]
    barrier = threading.Barrier(len(slices) + 1)
    with cpu_streams():
        ctxs = make_ubatch_contexts(
            num_micro_batches=len(slices), compute_stream=_Stub(), comm_stream=_Stub(),
            forward_contexts=[create_forward_context(None, cfg) for _ in slices],
            ready_barrier=barrier, token_offsets=[0, split])
        results: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []

        def ubatch(ctx, h):
            try:
                with ctx:
                    for i, runner in enumerate(runners):
                        h = h + runner.forward(h, row_logits(h, i))
                results[ctx.id] = h
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                raise

        threads = [threading.Thread(target=ubatch, args=(c, s))
                   for c, s in zip(ctxs, slices, strict=True)]
        for t in threads:
            t.start()
        barrier.wait()
        ctxs[0].cpu_wait_event.set()
        for t in threads:
            t.join(timeout=300)
    if errors:
        raise errors[0]
    return torch.cat([results[0], results[1]])


def row_logits(h: torch.Tensor, layer: int) -> torch.Tensor:
    """The router logits one row at a time (a 1-row GEMM each), so a token's logits are the
    same bits in a micro-batch as in the whole batch (BLAS picks kernels by row count)."""
    g = gate(layer, h.dtype).float()
    rows = [h[t:t + 1].float() @ g.T for t in range(h.shape[0])]
    return (torch.cat(rows) if rows else h.new_zeros(0, E).float()).to(h.dtype)


def _log_order(disp, log: list) -> None:
    """Record (op, micro-batch) of every dispatch and combine of ``disp`` (DBO's interleave)."""
    from vllm.v1.worker.ubatching import dbo_current_ubatch_id

    for op in ("dispatch", "combine"):
        real = getattr(disp, op)

        def logged(*a, _real=real, _op=op, **kw):
            log.append(f"{_op[0].upper()}{dbo_current_ubatch_id()}")
            return _real(*a, **kw)

        setattr(disp, op, logged)


def dbo_case(info, comm: str) -> dict:
    """A 3-layer model built with ``--enable-dbo`` (``ParallelConfig(enable_dbo=True)``) on
    ``comm``: each rank's batch run as vLLM's two DBO micro-batches (``run_ubatched``; the
    ranks split at different points, a micro-batch of 1 token) equals the same batch in one
    forward, bit for bit on the batch-invariant reference experts, and the float64 oracle;
    the dispatcher holds both micro-batches at once (D0 D1 before C0)."""
    cfg = vllm_config(info.world_size, enable_dbo=True)
    # vLLM's CPU platform switches DBO off in the config ("not supported on CPU"); the layer
    # is built as on a GPU host, where the flag stays on
    cfg.parallel_config.enable_dbo = True
    pool.clear()
    with env(ROCM_MOE_VLLM_COMM=comm, ROCM_MOE_VLLM_MAX_TOKENS=None):
        model = build_model(cfg, f"dbo-{comm}")
    invariant_experts(model)
    disp = dispatchers(model)[0]
    out = dict(lanes=getattr(disp, "batches_in_flight", 1), holds=disp.holds_batch,
               micro_batches=model[0].routed_experts.quant_method.micro_batches)
    order: list[str] = []
    _log_order(disp, order)
    T, split = ((9, 1), (33, 17), (2, 1))[info.rank % 3]  # a 1-token micro-batch, uneven
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(SEED + info.rank))
    y = run_ubatched(cfg, model, x, split)
    out["order"] = order[:4]
    order.clear()
    with set_forward_context_for(cfg):
        h = x
        recs = []
        for i, runner in enumerate(model):
            logits = row_logits(h, i)
            yi = runner.forward(h, logits)
            recs.append((h, logits, yi))
            h = h + yi
    out["bitwise"] = torch.equal(y, h)
    out["err"] = worst_err(model, recs)
    out["split"] = [split, x.shape[0] - split]
    pool.clear()
    return out


@contextmanager
def set_forward_context_for(cfg):
    from vllm.forward_context import set_forward_context

    with set_forward_context({}, cfg):
        yield


def run(info) -> dict:
    """Every served-model case on this rank (one vLLM import per rank)."""
    cfg = init_vllm(info)
    out = dict(torch=serve_case(info, cfg, "torch"), placement=placement_case(info),
               gelu=gelu_case(cfg),
               variants=dict(gpt_oss=gpt_oss_case(info, cfg), llama4=llama4_case(info, cfg)))
    out["dbo"] = dict(torch=dbo_case(info, "torch"))
    out["symm_shm"] = shm_symm_case(info, cfg)
    if info.world_size == 2:  # MORI needs a power-of-two group
        out.update(mori=mori_case(info, cfg), symm=symm_case(info, cfg),
                   scaling=scaling_case(info, cfg))
        out["dbo"]["mori"] = with_fake_mori(lambda: dbo_case(info, "mori"))
        out["dbo"]["symm"] = with_shm_symm(lambda: dbo_case(info, "symm"))
    return out
