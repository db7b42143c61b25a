"""The layer a command builds on every rank, as a small typed spec, and its command-line arguments.

``add_layer_args`` declares the arguments that sanity, run and diagnose share; ``layer_spec``
turns them (and a command's own fields) into a ``LayerSpec``, the backends asked for checked
before any rank starts. A backend not asked for is chosen on each rank from the device that rank
runs on (``spec.on_rank(info)``: ``backends.default_experts`` / ``default_comm``), so ranks
spawned on the CPUs of a GPU host get CPU backends. A rank builds its layer with
``spec.build(info, dtype)``; checks regenerate expert weights with ``spec.expert_weights``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from rocm_moe import backends, synthetic
from rocm_moe._checks import error_message
from rocm_moe.cli import argtypes, ranks
from rocm_moe.distributed import WorkerInfo
from rocm_moe.layer import EPMoE
from rocm_moe.placement import Placement
from rocm_moe.routing import RouterConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One EPMoE per rank: synthetic weights (``seed``) or a checkpoint's MoE layer."""

    num_experts: int  # E
    hidden_size: int  # H
    intermediate_size: int  # I
    top_k: int  # K
    dtype: str = "auto"  # a DTYPES name, or auto: bfloat16 on a GPU, float32 on a CPU
    weight_mode: str = "experts"  # who applies the routing weights: "experts" or "combine"
    comm: str | None = None  # comm backend (backends.names("comm")); None: the rank's default
    experts: str | None = None  # experts backend (backends.names("experts")); None: the default
    comm_why: str = "--comm"  # why this comm backend: the flag, or the default's reason
    experts_why: str = "--experts"  # why these experts: the flag, or the default's reason
    shared_intermediate_size: int | None = None  # dense shared experts (synthetic weights)
    seed: int = 0  # synthetic weights and tokens
    checkpoint: str | None = None  # a safetensors checkpoint directory instead of synthetic
    layer: int = 1  # the checkpoint's MoE layer
    max_tokens_per_rank: int = 16  # the dispatcher's capacity
    router: str = "qwen3"  # the synthetic layer's router family (ROUTERS)
    invariant: bool = False  # EPMoE(invariant=True): the same bits whatever W and the batch
    fp8_dispatch: bool = False  # an FP8 checkpoint's rows dispatched in FP8 (FP8_COMM)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":  # bf16 GEMMs are the norm on GPUs; a CPU runs float32 faster
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def shape(self) -> str:
        return (f"E={self.num_experts} H={self.hidden_size} I={self.intermediate_size} "
                f"K={self.top_k}")

    @property
    def comm_name(self) -> str:
        """The dispatcher that runs: ``comm``, or its FP8 form with ``fp8_dispatch``."""
        if self.comm is None:
            return "default"
        return FP8_COMM[self.comm] if self.fp8_dispatch and self.comm in FP8_COMM \
            else self.comm

    @property
    def backends_chosen(self) -> str:
        """Which backends run and why, e.g. ``comm=local (one rank), experts=triton (default
        on GPUs)`` (after ``on_rank``)."""
        return (f"comm={self.comm_name} ({self.comm_why}), "
                f"experts={self.experts} ({self.experts_why})")

    def on_rank(self, info: WorkerInfo) -> LayerSpec:
        """This spec with the backends not asked for chosen from ``info.device``, the device this
        rank runs on (not from whether the host has a GPU), each with its reason."""
        spec = self
        if spec.experts is None:
            name, why = backends.default_experts(info.device, dtype=self.torch_dtype(info.device))
            reason = _variant_refusal(spec, name)
            if reason is not None:  # e.g. gpt-oss's clamped SwiGLU on a GPU: the reference
                name, why = "reference", f"default: {name} cannot run them ({reason})"
            spec = replace(spec, experts=name, experts_why=why)
        if spec.comm is None:
            name, why = backends.default_comm(info.world_size, info.device, ranks.multi_host())
            spec = replace(spec, comm=name, comm_why=why)
        if spec.fp8_dispatch:
            check_fp8_comm(spec.comm)
        return spec

    @property
    def router_name(self) -> str:
        """The router family that runs: ``router``, or the checkpoint's (its config's)."""
        return "the checkpoint's" if self.checkpoint else self.router

    @property
    def weights_source(self) -> str:
        if self.checkpoint:
            return f"{self.checkpoint} layer {self.layer}"
        return f"synthetic seed {self.seed}"

    def build(self, info: WorkerInfo, dtype: torch.dtype) -> EPMoE:
        """This rank's layer, holding only its experts (default backends: ``on_rank``'s)."""
        if self.comm is None or self.experts is None:
            return self.on_rank(info).build(info, dtype)
        placement = Placement.contiguous(self.num_experts, info.world_size)
        kw = dict(hidden_size=self.hidden_size, top_k=self.top_k, dtype=dtype,
                  max_tokens_per_rank=self.max_tokens_per_rank)
        if self.fp8_dispatch:  # in the encoding the layer converts its FP8 experts to
            from rocm_moe.quant import native_fp8_dtype

            kw["fp8_dtype"] = native_fp8_dtype(info.device)  # (the transport's wire format)
        dispatcher = backends.make_dispatcher(self.comm, placement, info.rank, **kw)
        experts = backends.make_experts(self.experts)
        if self.checkpoint:
            from rocm_moe.integrations import hf

            weights = hf.load_moe_layer(self.checkpoint, self.layer, placement, info.rank)
            return hf.build_layer(weights, dispatcher=dispatcher, experts=experts,
                                  weight_mode=self.weight_mode, dtype=dtype, device=info.device,
                                  invariant=self.invariant)
        layer = EPMoE(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                      router=router_config(self.router, self.num_experts, self.top_k),
                      dispatcher=dispatcher, experts=experts, weight_mode=self.weight_mode,
                      shared_intermediate_size=self.shared_intermediate_size, dtype=dtype,
                      device=info.device, invariant=self.invariant)
        layer.reset_parameters(seed=self.seed)
        if layer.e_score_correction_bias is not None:  # a bias that matters, as trained ones do
            g = torch.Generator().manual_seed(self.seed * 7919 + 3)
            layer.e_score_correction_bias.copy_(0.1 * torch.randn(self.num_experts, generator=g))
        return layer

    def expert_weights(self, dtype: torch.dtype) -> Callable[[int], tuple]:
        """``g -> (w13 [2I, H], w2 [H, I])``: expert g's weights as the layer holds them
        (rounded to ``dtype``), synthetic or read from the checkpoint on demand; a family with
        expert biases (gpt-oss) appends (w13_bias [2I], w2_bias [H])."""
        if self.checkpoint:
            from rocm_moe.integrations import hf

            read = hf.expert_reader(self.checkpoint, self.layer)
        else:
            def read(g: int):
                return synthetic.expert_weights(self.seed, g, self.hidden_size,
                                                self.intermediate_size)

        def weights(g: int):  # (w13, w2), with (w13_bias, w2_bias) for a biased family
            return tuple(w.to(dtype) for w in read(g))
        return weights


ROUTERS = ("qwen3", "mixtral", "deepseek_v3")  # --router: the synthetic layer's router family

# --fp8-dispatch: the comm backends that carry FP8 rows (their wire format, ``fp8_dtype``, a
# parameter of the transport's one dispatcher class: comm.wire) and the name they run under;
# the rows are FP8Rows, which only the FP8 experts of an FP8 checkpoint's layer consume.
FP8_COMM = {"torch": "torch-fp8", "symm": "symm-fp8", "mori": "mori-fp8"}


def router_config(name: str, num_experts: int, top_k: int) -> RouterConfig:
    """The router of family ``name`` (ROUTERS) for E experts and top-k K. DeepSeek-V3 gets the
    most groups (of 8, 4, 2) that hold >= 2 experts each and the fewest kept groups that hold
    K experts, so group selection matters; its scaling factor is the model's 2.5."""
    if name == "qwen3":
        return RouterConfig.qwen3_moe(num_experts, top_k)
    if name == "mixtral":
        return RouterConfig.mixtral(num_experts, top_k)
    if name != "deepseek_v3":
        raise ValueError(error_message("router", repr(name), f"must be one of {ROUTERS}",
                                       "pick one"))
    for groups in (8, 4, 2):
        per = num_experts // groups
        if num_experts % groups == 0 and per >= 2 and -(-top_k // per) < groups:
            return RouterConfig.deepseek_v3(num_experts, top_k, n_group=groups,
                                            topk_group=max(1, -(-top_k // per)))
    return RouterConfig.deepseek_v3(num_experts, top_k, n_group=1, topk_group=1)


def add_router_args(p: argparse.ArgumentParser) -> None:
    """--router and --shared-intermediate: the synthetic layer's router family and shared
    experts (sanity and diagnose; run declares its own --shared-intermediate)."""
    p.add_argument("--router", choices=ROUTERS, default="qwen3", action=argtypes.Given,
                   help="router family of the synthetic layer (default qwen3)")
    p.add_argument("--shared-intermediate", type=argtypes.shared_intermediate, default=None,
                   action=argtypes.Given,
                   help="add dense shared experts of this intermediate size (default: none)")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --layer: a checkpoint's MoE layer instead of synthetic weights (run,
    sanity, diagnose; sanity and diagnose then check the router against its config)."""
    p.add_argument("--checkpoint", type=argtypes.existing_dir, default=None,
                   help="a safetensors checkpoint directory (a family of rocm_moe.families: "
                   "Qwen2/3-MoE, Mixtral, DeepSeek-V3, gpt-oss, ...): its MoE layer instead of "
                   "random weights; E, H, I, K come from it")
    p.add_argument("--layer", type=argtypes.nonnegative_int, default=1, action=argtypes.Given,
                   help="the checkpoint's MoE layer index (with --checkpoint only)")


def _variant_refusal(spec: LayerSpec, experts: str) -> str | None:
    """Why the ``experts`` backend cannot compute the checkpoint's experts (an expert variant
    such as gpt-oss's), or None (no checkpoint, or it can)."""
    cfg = hf_config(spec)
    if cfg is None:
        return None
    from rocm_moe.families import family

    variant = family(cfg.model_type).expert_variant(cfg)
    return backends.make_experts(experts).variant_unsupported_reason(variant)


def hf_config(spec: LayerSpec):
    """The checkpoint's transformers config (the router's source), None without one."""
    if not spec.checkpoint:
        return None
    from rocm_moe.integrations import hf

    return hf.Checkpoint(spec.checkpoint).config()


def checkpoint_shape(spec: LayerSpec) -> LayerSpec:
    """``spec`` with E, H, I, K taken from its checkpoint's config (unchanged without one); E
    counts the routed experts (LongCat-Flash's zero-computation ones are not placed)."""
    if not spec.checkpoint:
        return spec
    from rocm_moe.families import family
    from rocm_moe.integrations import hf

    cfg = hf.Checkpoint(spec.checkpoint).config()
    router = RouterConfig.from_hf_config(cfg)
    return replace(spec, num_experts=router.routed_experts, top_k=router.top_k,
                   hidden_size=family(cfg.model_type).hidden_size(cfg),
                   intermediate_size=family(cfg.model_type).intermediate_size(cfg))


def add_layer_args(p: argparse.ArgumentParser, *, E: int, H: int, I: int, K: int) -> None:
    """The arguments of a LayerSpec, the ranks and the device, with these shape defaults."""
    p.add_argument("--num-experts", type=argtypes.positive_int, default=E,
                   action=argtypes.Given,
                   help="E, routed experts")
    p.add_argument("--hidden", type=argtypes.positive_int, default=H, action=argtypes.Given,
                   help="H, hidden size")
    p.add_argument("--intermediate", type=argtypes.positive_int, default=I,
                   action=argtypes.Given,
                   help="I, per-expert intermediate size")
    p.add_argument("--top-k", type=argtypes.positive_int, default=K, action=argtypes.Given,
                   help="K, experts per token")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU per rank where there are enough, else CPUs), cpu (CPU ranks, "
                   "gloo, even on a GPU host), cuda (a GPU per rank, NCCL), cuda:N (one rank)")
    p.add_argument("--comm", default=None, metavar="NAME",
                   help=f"comm backend: {', '.join(backends.names('comm'))}; default, per the "
                   "device each rank runs on: local for one rank, symm for GPUs of one host "
                   "(CUDA-graph capturable), torch across hosts and on CPUs")
    p.add_argument("--world-size", type=argtypes.positive_int, default=None,
                   help="EP ranks to spawn (gloo on CPU, NCCL one per GPU); default: torchrun's, "
                   "else one per GPU, else 2 on a CPU")
    p.add_argument("--experts", default=None, metavar="NAME",
                   help=f"experts backend: {', '.join(backends.names('experts'))}; default, per "
                   "the device each rank runs on: triton on GPUs (bf16/fp16), else reference")
    p.add_argument("--seed", type=argtypes.seed_int, default=0)
    p.add_argument("--invariant", action="store_true",
                   help="invariant mode: each token's output the same bits whatever the EP "
                   "size and the batch (notes/invariance.md; not on aiter or mori)")


def check_writable(flag: str, path: str) -> None:
    """An output file can be written, checked before the run rather than after it."""
    try:
        argtypes.writable_file(path)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def check_memory(spec: LayerSpec, world_size: int, device_name: str, tokens: int) -> None:
    """``ranks.check_host_memory`` for ``spec``'s shape and dtype (auto: float32 on a CPU)."""
    from rocm_moe.cli import ranks

    ranks.check_host_memory(world_size, device_name, tokens, num_experts=spec.num_experts,
                            hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, top_k=spec.top_k,
                            dtype=spec.torch_dtype(torch.device("cpu")),
                            shared_intermediate_size=spec.shared_intermediate_size)


def check_device(name: str, world_size: int = 1) -> None:
    """``--device`` names a device this machine has (auto always does): one for a single rank,
    cpu or one GPU per rank for several."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(error_message("--device", name, f"is not a torch device ({exc})",
                                       "pass auto, cpu, cuda or cuda:N")) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(error_message("--device", name, "this machine has no GPU "
                                       "(torch.cuda.is_available() is False)",
                                       "pass --device cpu or auto"))
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(error_message("--device", name, f"this machine has "
                                       f"{torch.cuda.device_count()} GPU(s)",
                                       "pass an existing cuda:N"))
    if world_size > 1 and dev.type == "cuda" and not ranks.under_torchrun():
        if dev.index is not None:
            raise ValueError(error_message(
                "--device", name, f"names one GPU; {world_size} spawned ranks take one GPU each",
                "pass --device cuda (or auto), or --world-size 1"))
        if torch.cuda.device_count() < world_size:
            raise ValueError(error_message(
                "--device", name, f"{world_size} ranks need a GPU each, this machine has "
                f"{torch.cuda.device_count()}", "lower --world-size, or pass --device cpu"))


# Flags that set what a checkpoint's config sets: refused with --checkpoint (they were ignored).
CHECKPOINT_SETS = ("--num-experts", "--hidden", "--intermediate", "--top-k", "--router",
                   "--shared-intermediate")


def check_layer_args(args: argparse.Namespace, world_size: int) -> None:
    """``add_layer_args``'s arguments, checked before any rank starts."""
    check_device(args.device, world_size)
    if getattr(args, "checkpoint", None):
        for flag in CHECKPOINT_SETS:
            if flag in argtypes.given(args):
                raise ValueError(error_message(
                    flag, getattr(args, flag[2:].replace("-", "_")), "cannot be given with "
                    "--checkpoint: the checkpoint's config sets the layer's shape, router and "
                    "shared experts (the flag would be ignored)",
                    f"drop {flag}, or drop --checkpoint to run synthetic weights"))
        return  # E, H, I, K come from the checkpoint's config (checked by its loader)
    if "--layer" in argtypes.given(args):
        raise ValueError(error_message(
            "--layer", args.layer, "picks a layer of a checkpoint, and none is given (the "
            "synthetic layer would run and the flag be ignored)",
            "pass --checkpoint DIR too, or drop --layer"))
    if args.top_k > args.num_experts:
        raise ValueError(error_message("--top-k", args.top_k,
                                       f"must be <= --num-experts={args.num_experts}",
                                       "pick fewer experts per token"))
    if args.num_experts % world_size:
        raise ValueError(error_message(
            "--num-experts", args.num_experts, f"must be divisible by the world size "
            f"{world_size} (each rank owns E / W experts)",
            "choose --world-size dividing --num-experts, or another --num-experts"))


def layer_spec(args: argparse.Namespace, world_size: int, **fields) -> LayerSpec:
    """The LayerSpec of ``add_layer_args``'s arguments plus a command's own ``fields``. A backend
    asked for (--comm, --experts) that is unknown or cannot run here raises the ValueError here,
    before any rank is started; one not asked for is left None, for each rank to choose from its
    own device (``LayerSpec.on_rank``)."""
    check_layer_args(args, world_size)
    spec = LayerSpec(num_experts=args.num_experts, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, top_k=args.top_k, dtype=args.dtype,
                     comm=args.comm, experts=args.experts, seed=args.seed,
                     invariant=getattr(args, "invariant", False), **fields)
    if spec.experts is not None:
        backends.require("experts", spec.experts)
    if spec.comm is not None:
        backends.require("comm", spec.comm)
    if spec.fp8_dispatch:
        check_fp8_dispatch(spec, world_size)
    if spec.invariant and spec.checkpoint:
        check_invariant_checkpoint(spec)
    return checkpoint_shape(spec)


def check_invariant_checkpoint(spec: LayerSpec) -> None:
    """``--invariant`` needs experts with an invariant variant: an FP8 checkpoint's layer has
    none (its ranks refused it after spawning, each loading the checkpoint first)."""
    from rocm_moe.integrations import hf

    if hf.is_fp8_layer(spec.checkpoint, spec.layer):
        raise ValueError(error_message(
            "--invariant", f"with --checkpoint {spec.checkpoint} layer {spec.layer}", "an FP8 "
            "layer cannot run it: the FP8 experts have no batch-invariant variant (their row "
            "quantisation and GEMMs run in batch-dependent tiles)",
            "drop --invariant, or dequantise the checkpoint to bfloat16 and run that"))


def check_fp8_comm(comm: str) -> None:
    """The comm backend of ``--fp8-dispatch`` has an FP8 form (FP8_COMM)."""
    if comm not in FP8_COMM:
        raise ValueError(error_message(
            "--comm", comm, f"has no FP8 dispatch with --fp8-dispatch (those that do: "
            f"{sorted(FP8_COMM)}; one rank, local, sends nothing)",
            "pass --comm torch (or symm on GPUs) with --world-size 2 or more"))


def check_fp8_dispatch(spec: LayerSpec, world_size: int) -> None:
    """``--fp8-dispatch`` needs an FP8 checkpoint's layer and a comm backend with an FP8 form
    (checked here when known before the ranks start: asked for, or local for one rank)."""
    if not spec.checkpoint:
        raise ValueError(error_message(
            "--fp8-dispatch", "without --checkpoint", "FP8 rows are consumed only by the FP8 "
            "experts of an FP8 checkpoint's layer", "pass --checkpoint DIR of an FP8 checkpoint"))
    if spec.comm is not None or world_size == 1:
        check_fp8_comm(spec.comm or "local")
    from rocm_moe.integrations import hf

    if not hf.is_fp8_layer(spec.checkpoint, spec.layer):
        raise ValueError(error_message(
            "--fp8-dispatch", f"{spec.checkpoint} layer {spec.layer}", "its experts are not "
            "FP8 (no weight_scale_inv beside them): the rows would be quantised for experts "
            "that cannot read them", "drop --fp8-dispatch"))
