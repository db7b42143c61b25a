"""EPMoE: the expert-parallel MoE block.

    x [T, H] --route--> (topk_weights [T, K] f32, topk_ids [T, K] i32, global)
             --dispatch--> rows [R, H] + their global ids/weights   (to the experts' owners)
             --experts--> weighted [R, H]  or  raw [R, K, H]          (local experts only)
             --combine--> y [T, H]                                    (summed on the owner)
             + shared experts (optional, dense)

Weights are applied exactly once. ``weight_mode="experts"``: the experts weight and reduce their
local slots (AITER's fused_moe); combine only sums (MORI). ``weight_mode="combine"``: the experts
return raw per-slot outputs and the combine stage weights them. With ``return_raw=True`` the raw
[T, K, H] outputs travel back to the owner, which weights and sums them itself; the layer reports
which stage applied the weights in ``MoEOutput.weighted_by``. Both modes give the same result up
to the rounding of the partials (tests compare each with a float64 oracle). ``rocm_moe.weighting``
is the one place that applies the weights.

``invariant=True`` makes a token's router logits, top-k ids and weights, every slot's expert
output and the final sum the same bits whatever the EP size, the batch and the token's place in
it: fixed-order arithmetic (``rocm_moe.invariant``), every slot's raw output back to the owner
(``combine_raw``), summed there in slot order in float32, shared experts added last
(notes/invariance.md).

``micro_batches=2`` splits the tokens in two micro-batches whose dispatch / experts / combine
interleave (``rocm_moe.overlap``): on GPUs one micro-batch's communication runs on a side stream
while the other's experts compute; the result is the un-split layer's (see ``EPMoE``).

Test machinery stays outside: ``rocm_moe.faults`` plants a known bug by wrapping the layer's
stages (``faults.plant(layer, "weights_twice")``; the layer has no fault code or property) and
``rocm_moe.diagnose`` taps their tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rocm_moe import invariant as inv
from rocm_moe import overlap, synthetic
from rocm_moe._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_finite,
    check_id_range,
    check_integer,
    check_integer_value,
    check_routing_rows,
    check_tensor,
    describe,
    error_message,
)
from rocm_moe.comm.base import Dispatcher
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.experts.base import (
    PLAIN,
    Experts,
    ExpertVariant,
    expert_biases,
    output_form,
    swiglu_expert,
    variant_kwargs,
    variant_refusal,
)
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.experts.triton_small import stream_swiglu
from rocm_moe.formats.base import WeightFormat, check_format_options, format_class
from rocm_moe.placement import Placement
from rocm_moe.replicas import ReplicaChoice, ReplicatedPlacement, check_choice
from rocm_moe.routing import (
    RouterConfig,
    RoutingResult,
    check_fused_gate,
    gate_route,
    gate_route_unsupported,
    route,
)
from rocm_moe.weighting import ExpertsOutput, WeightMode, resolve_weight_mode, weight_once


@dataclass(frozen=True, kw_only=True, eq=False)
class MoEOutput:
    """Result of a forward with ``return_raw=True``; leading dims follow the input."""

    out: torch.Tensor  # [T, H] or [B, S, H]: routed + shared output
    raw: torch.Tensor  # [T, K, H] or [B, S, K, H]: unweighted output of each slot, 0 if empty
    topk_weights: torch.Tensor  # [T, K] float32
    topk_ids: torch.Tensor  # [T, K] int32
    weighted_by: WeightMode  # the stage that applied the routing weights


@dataclass(frozen=True, kw_only=True, eq=False)
class _ZeroSlots:
    """A routing's zero-computation slots (``EPMoE._split_zero_experts``)."""

    routing: RoutingResult  # the router's own [T, K] weights and ids (ids >= E_r included)
    zero_TK: torch.Tensor  # [T, K] bool: the slot went to a zero-computation expert
    identity_T1: torch.Tensor  # [T, 1] float32: the sum of those slots' weights


class Trace:
    """Optional per-stage timings: ``times[stage]`` in seconds, device-synchronised, summed over
    the forwards traced (stages: route, dispatch, experts, combine, shared). The stage tensors
    are ``rocm_moe.faults.StageRecord``'s (what ``diagnose`` reads)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, device: torch.device):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def _stage(trace: Trace | None, name: str, device: torch.device):
    return trace.stage(name, device) if trace is not None else contextlib.nullcontext()


class SharedExperts(nn.Module):
    """Dense SwiGLU added to every token (DeepSeek-V3), optionally gated by sigmoid(x @ g)
    (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, gated: bool, dtype, device):
        super().__init__()
        check_bool("gated", gated)
        kw = dict(dtype=dtype, device=device)
        self.w13 = nn.Parameter(torch.empty(2 * intermediate_size, hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(hidden_size, intermediate_size, **kw))
        self.gate = nn.Linear(hidden_size, 1, bias=False, **kw) if gated else None
        self._one_expert: dict = {}  # device -> ExpertMap of one expert (forward_invariant)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        y = stream_swiglu(x_TH, self.w13, self.w2)  # (decode-sized batches on NVIDIA)
        if y is None:
            y = swiglu_expert(x_TH, self.w13, self.w2)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x_TH)) * y
        return y

    def forward_invariant(self, x_TH: torch.Tensor, experts: Experts | None = None):
        """The same with fixed reduction orders: a row's bits do not depend on the other rows.
        The SwiGLU runs as one expert that every row goes to, on ``experts`` (an invariant
        backend: the Triton experts' fixed tiles on GPUs) where it supports the call, else
        through ``invariant.swiglu`` (the same arithmetic as the invariant reference experts);
        the gate's logit is accumulated in float32, its sigmoid times y rounded once."""
        x = x_TH
        if experts is not None and experts.supports(mode="raw", dtype=x.dtype,
                                                    device=x.device) is None:
            if x.device not in self._one_expert:  # (host reads once per device)
                self._one_expert[x.device] = Placement.contiguous(1, 1).expert_map(0).to(x.device)
            T = x.shape[0]
            y = experts(x, torch.zeros(T, 1, dtype=torch.int32, device=x.device),
                        torch.ones(T, 1, dtype=torch.float32, device=x.device), self.w13[None],
                        self.w2[None], self._one_expert[x.device], weight_mode="combine",
                        validate=False).out[:, 0]
        else:
            y = inv.swiglu(x_TH, self.w13, self.w2)
        if self.gate is not None:
            g = inv.pointwise(torch.sigmoid, inv.linear_acc(x_TH, self.gate.weight))
            y = (g * y.to(g.dtype)).to(x_TH.dtype)
        return y

    @torch.no_grad()
    def reference(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The same in float64, for checks."""
        x = x_TH.double()
        y = swiglu_expert(x, self.w13.double(), self.w2.double())
        if self.gate is not None:
            y = torch.sigmoid(x @ self.gate.weight.double().T) * y
        return y


def _check_call(*, return_raw: object, trace: object, **tensors: object) -> None:
    """A forward's options: ``return_raw`` a bool, ``trace`` a Trace or None, and no routing
    tensor a meta tensor (it holds no data to route by)."""
    if not isinstance(return_raw, bool):
        raise TypeError(error_message("return_raw", repr(return_raw), "must be a bool",
                                      "pass True or False"))
    if trace is not None and not isinstance(trace, Trace):
        raise TypeError(error_message("trace", repr(trace), "must be a rocm_moe.layer.Trace or "
                                      "None", "pass trace=Trace() and read trace.times"))
    for field, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_meta:
            raise ValueError(error_message(f"{field}.device", t.device, "holds no data (a meta "
                                           "tensor)", "materialise it on the layer's device"))


def _rebalance_refusal(num_nodes: object, experts_per_round: object, world_size: int,
                       phys_to_log) -> Exception | None:
    """``rebalance``'s own arguments' error, or None (it joins the table exchange, so a rank
    refusing them is named by its peers instead of leaving them in a collective):
    ``experts_per_round`` an int >= 1; ``num_nodes`` an int >= 1 dividing the EP size, and
    only with a table to compute (a given ``phys_to_log`` is not balanced: it would be
    ignored)."""
    try:
        check_integer_value("experts_per_round", experts_per_round, minimum=1,
                            fix="pass how many experts the group moves per round")
        check_integer_value("num_nodes", num_nodes, minimum=1, fix="pass 1 for one node")
        if phys_to_log is not None and num_nodes != 1:
            raise ValueError(error_message(
                "num_nodes", num_nodes, "places the balanced table, and phys_to_log is given "
                "(it would be ignored)", "leave num_nodes out, or pass phys_to_log=None"))
        if world_size % num_nodes:
            raise ValueError(error_message("num_nodes", num_nodes, f"must divide the EP size "
                                           f"{world_size} (every node has the same ranks)",
                                           "pass the number of nodes the EP group spans"))
    except (ValueError, TypeError) as exc:
        return exc
    return None


def _check_parts(*, dispatcher, experts, expert_variant, device) -> None:
    """The layer's parts are objects, not names: ``experts="triton"`` would otherwise fail at
    the first forward with an AttributeError."""
    for field, value, cls, fix in (
            ("dispatcher", dispatcher, Dispatcher, "build one, e.g. LocalDispatcher("
             "Placement.contiguous(E, 1)), or leave it None (one rank)"),
            ("experts", experts, Experts, "pass an instance, e.g. TritonExperts() (by name: "
             "rocm_moe.backends.make_experts('triton'))"),
            ("expert_variant", expert_variant, ExpertVariant, "pass an ExpertVariant(...), "
             "e.g. the family's (rocm_moe.families)")):
        if value is not None and not isinstance(value, cls):
            raise TypeError(error_message(field, repr(value), f"must be an instance of "
                                          f"{cls.__name__} or None", fix))
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(error_message("device", repr(device), f"is not a torch device "
                                           f"({err})", "pass e.g. 'cuda', 'cuda:1' or 'cpu'")) \
                from None


def _check_sizes(**sizes: int | None) -> None:
    """Every size is an int >= 1 (``None`` passes: an optional part left out)."""
    for field, value in sizes.items():
        if value is not None:
            check_integer_value(field, value, minimum=1, fix="take it from the model config")


def _eplb_placement(E: int, world: int, num_redundant: int | None,
                    given: ReplicatedPlacement | None) -> ReplicatedPlacement | None:
    """The layer's first replica placement, or None (no EPLB); checks the two arguments."""
    if num_redundant is not None:
        check_integer_value("num_redundant_experts", num_redundant, minimum=0,
                            fix="pass R >= 0 redundant experts, or None for no EPLB")
    if given is None:
        return None if num_redundant is None else \
            ReplicatedPlacement.initial(E, num_redundant, world)
    if not isinstance(given, ReplicatedPlacement):
        raise TypeError(error_message(
            "replica_placement", type(given).__name__, "must be a ReplicatedPlacement",
            "build it with ReplicatedPlacement(phys_to_log, world_size, num_experts)"))
    if given.num_experts != E or given.world_size != world:
        raise ValueError(error_message(
            "replica_placement (E, W)", (given.num_experts, given.world_size),
            f"must match the router's E={E} and the dispatcher's W={world}",
            "build it for this layer's experts and EP group"))
    if num_redundant is not None and given.num_redundant != num_redundant:
        raise ValueError(error_message(
            "num_redundant_experts", num_redundant, f"must equal replica_placement's R = P - E "
            f"= {given.num_redundant}", "leave num_redundant_experts out"))
    return given


def _check_physical_dispatcher(disp: Dispatcher, replicas: ReplicatedPlacement) -> None:
    """With EPLB the dispatcher moves physical ids: its placement must be the contiguous one
    of P = E + R experts."""
    P, W, got = replicas.num_physical, replicas.world_size, disp.placement
    if got != replicas.physical:
        raise ValueError(error_message(
            "dispatcher.placement", f"{got.num_experts} experts over {got.world_size} ranks"
            f"{'' if got.is_contiguous else ' (not contiguous)'}",
            f"with EPLB it must be the contiguous placement of the P = E + R = {P} physical "
            "experts (the dispatcher moves physical ids)",
            f"build the dispatcher with Placement.contiguous({P}, {W})"))


def _experts_for_format(experts: Experts, weights_cls: type[WeightFormat]) -> Experts:
    """The experts backend that computes ``weights_cls``'s format: ``experts`` itself, or its
    kernel for that format (``Experts.for_weight_format``: the FP8 backend of the same name for
    block-FP8), else a ValueError naming both."""
    name = weights_cls.name
    if name in getattr(experts, "weight_formats", ("dense",)):
        return experts
    other = experts.for_weight_format(name) if hasattr(experts, "for_weight_format") else None
    if other is None:
        computes = list(getattr(experts, "weight_formats", ("dense",)))
        raise ValueError(error_message(
            "experts", getattr(experts, "name", type(experts).__name__),
            f"computes {computes} expert weights, not weight_format={name!r}",
            "pick an experts backend that computes it (rocm-moe info; block_fp8: reference, "
            "triton, aiter)"))
    return other


class EPMoE(nn.Module):
    """Expert-parallel MoE block: route -> dispatch -> experts -> combine (+ shared experts).

    Args:
        hidden_size: H.  intermediate_size: I of each routed expert.
        router: RouterConfig (E, K, scoring, grouping, normalisation).
        dispatcher: comm backend; default LocalDispatcher (one rank owning every expert). Its
            placement and rank decide the local experts: this module holds only their weights,
            ``w13`` [e, 2I, H] (gate then up) and ``w2`` [e, H, I].
        experts: expert backend; default ReferenceExperts. For a quantised ``weight_format``
            a float backend's kernel for it is taken (``Experts.for_weight_format``: the FP8
            backend of the same name for block-FP8).
        weight_format: how the routed experts are held (``rocm_moe.formats``): "dense" (float
            parameters ``w13`` / ``w2`` in ``dtype``), "block_fp8" (FP8 with 128x128 block
            scales, buffers ``w13_fp8`` / ``w13_scale_inv`` / ``w2_fp8`` / ``w2_scale_inv``;
            ``w13`` / ``w2`` stay as empty [0, ...] parameters that carry the compute dtype),
            "mxfp4", or a ``formats.WeightFormat`` class. ``weights`` gives them as a format
            object, ``expert_bytes`` their memory.
        format_options: the format's options (block_fp8: ``fp8_dtype`` "e4m3fn" or
            "e4m3fnuz"); None: its defaults.
        weight_mode: "experts" or "combine" (see the module docstring).
        shared_intermediate_size: I of the shared experts (all of them fused), or None.
        shared_expert_gate: sigmoid gate on the shared output (Qwen2-MoE).
        invariant: bit-identical results per token whatever the EP size, batch size and
            composition and the token's position (see the module docstring); the backends must
            support it (ValueError with the reason otherwise: AITER, MORI). The routing weights
            are then applied on the owner whatever ``weight_mode`` says.
        fused_router: on GPUs (default), the router after the gate GEMM in one Triton launch
            (``routing.route(fused=True)``: the torch path's bits on tie-free scores, ties to
            the lower id); the torch path runs where it cannot (CPUs, invariant mode, router
            replay, gpt-oss / Llama 4 scoring). False: always the torch path.
        fused_gate: the gate GEMM in Triton too, read as stored, with the router
            (``routing.gate_route``: two launches, float32 products): "float32" for routers
            whose gate GEMM is float32 (DeepSeek-V3, Kimi K2, GLM-4.5), "all", "off"; None:
            ``routing.FUSED_GATE_DEFAULT``. Only with ``fused_router``, on GPUs, outside
            autograd, invariant mode and router replay (``routing.gate_route_unsupported``).
        expert_variant: what each routed expert computes (``experts.base.ExpertVariant``:
            biases ``w13_bias`` [e, 2I] / ``w2_bias`` [e, H], gpt-oss's activation, weights on
            the input); None: plain SwiGLU. ``router.gate_bias`` gives the gate a bias.
        validate: run the value checks (finite hidden states, router logits and bias, id
            ranges, weights), which read tensors on the host; skipped under CUDA graph capture.
            ``validate=False`` is the hot path: no host read, and a NaN then propagates.
        num_redundant_experts: R >= 0 turns on expert-parallel load balancing (EPLB,
            notes/eplb.md): the ranks hold P = E + R physical experts, copies of the E logical
            ones (``replicas``, a ``ReplicatedPlacement``; initially
            ``ReplicatedPlacement.initial``), the dispatcher must be built over
            ``Placement.contiguous(E + R, W)``, each (token, slot) goes to one replica of its
            expert (chosen on the device), the load is counted (``expert_load``) and
            ``rebalance`` moves experts between ranks. None (default): no EPLB.
        replica_placement: an explicit first ``ReplicatedPlacement`` (an engine's map); it sets
            R (``num_redundant_experts`` may then be left out, or must agree).
        load_window: forwards the EPLB load counters sum over (a ring of that many steps).
        replica_choice: how a (token, slot) picks one of its expert's replicas (on the
            device): "spread" (default) over all of them evenly, or "local": a replica on the
            token's rank where there is one, else on its node (``replica_nodes``), else any
            (fewer rows travel, a less even load: ``rocm_moe.replicas``).
        replica_nodes: with replica_choice="local", the node index of every EP rank.
        micro_batches: 1 (default), or n >= 2 micro-batches per forward whose communication
            overlaps the other micro-batch's experts (``rocm_moe.overlap``: the comm calls on a
            side CUDA stream, no host synchronisation added, so the layer still captures in a
            CUDA graph; on CPUs the same schedule runs in order). Every rank runs n
            micro-batches per capacity chunk, empty ones included, and all ranks must set the
            same n (checked at the first forward). A dispatcher whose results are views of its
            buffers (symm, MORI) must hold two batches: build it with ``batches_in_flight=2``.
            The result is the un-split layer's: the same bits where a row's expert output does
            not depend on the rows beside it (invariant mode; ``ReferenceExperts(invariant=
            True)``; the Triton experts' tiles on GPUs, which tests/test_overlap.py checks there)
            since every comm backend sums a token's partials alone, in a fixed order; within
            the float64 oracle's tolerance always (the default reference experts' CPU GEMMs
            round differently for another row count).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        router: RouterConfig,
        dispatcher: Dispatcher | None = None,
        experts: Experts | None = None,
        weight_mode: WeightMode = "experts",
        shared_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        validate: bool = True,
        invariant: bool = False,
        fused_router: bool = True,
        fused_gate: str | None = None,
        expert_variant: ExpertVariant | None = None,
        num_redundant_experts: int | None = None,
        replica_placement: ReplicatedPlacement | None = None,
        load_window: int = 64,
        replica_choice: str = "spread",
        replica_nodes: tuple[int, ...] | None = None,
        weight_format: str | type[WeightFormat] = "dense",
        format_options: dict | None = None,
        micro_batches: int = 1,
    ):
        super().__init__()
        overlap.check_micro_batches(micro_batches)
        resolve_weight_mode(weight_mode)  # validates it
        self._weights_cls = format_class(weight_format)
        self._format_options = check_format_options(self._weights_cls, format_options)
        _check_sizes(hidden_size=hidden_size, intermediate_size=intermediate_size,
                     shared_intermediate_size=shared_intermediate_size or None)
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise TypeError(error_message("dtype", dtype, f"must be one of {FLOAT_DTYPES}",
                                          "pass torch.bfloat16, torch.float16 or torch.float32"))
        if not isinstance(router, RouterConfig):
            raise TypeError(error_message("router", type(router).__name__,
                                          "must be a RouterConfig", "use RouterConfig.qwen3_moe()"))
        _check_parts(dispatcher=dispatcher, experts=experts, expert_variant=expert_variant,
                     device=device)
        check_bool("shared_expert_gate", shared_expert_gate)
        if shared_expert_gate and not shared_intermediate_size:
            raise ValueError(error_message(
                "shared_expert_gate", True, "gates the shared experts, and the layer has none",
                "pass shared_intermediate_size too, or leave the gate off"))
        world = dispatcher.world_size if isinstance(dispatcher, Dispatcher) else 1
        E_r = router.routed_experts  # the experts that compute; zero experts are not placed
        if router.zero_experts and (num_redundant_experts or replica_placement is not None):
            raise ValueError(error_message(
                "num_redundant_experts / replica_placement", "with router.zero_experts",
                "EPLB replicas are not implemented for routers with zero-computation experts",
                "serve this model without EPLB replicas"))
        self._replicas = _eplb_placement(E_r, world, num_redundant_experts, replica_placement)
        P = E_r if self._replicas is None else self._replicas.num_physical
        self.dispatcher = dispatcher or LocalDispatcher(Placement.contiguous(P, 1))
        if self._replicas is not None:
            _check_physical_dispatcher(self.dispatcher, self._replicas)
        elif replica_nodes is not None or replica_choice != "spread" or load_window != 64:
            raise ValueError(error_message(
                "replica_nodes / replica_choice / load_window",
                (replica_nodes, replica_choice, load_window),
                "only mean something with EPLB (replicas)",
                "pass num_redundant_experts=R too, or leave them out"))
        elif self.dispatcher.placement.num_experts != E_r:
            raise ValueError(error_message(
                "dispatcher.placement.num_experts", self.dispatcher.placement.num_experts,
                f"must equal router.num_experts - router.zero_experts={E_r} (the routed "
                "experts)", "build both from one E"))
        declared = {"hidden_size": hidden_size, "top_k": router.top_k, "dtype": dtype}
        for field, want in declared.items():
            got = getattr(self.dispatcher, field)
            if got is not None and got != want:
                raise ValueError(error_message(
                    f"dispatcher.{field}", got, f"must match the layer's {field}={want}",
                    "build the dispatcher and the layer from one config"))
        self.experts = _experts_for_format(experts or ReferenceExperts(), self._weights_cls)
        self._invariant, self._invariant_agreed = False, False
        self.invariant = invariant  # (the setter checks it and swaps in invariant experts)
        self.micro_batches = micro_batches  # (the setter checks the dispatcher can hold them)
        self.router = router
        self.weight_mode: WeightMode = weight_mode
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        if not isinstance(validate, bool):
            raise TypeError(error_message("validate", repr(validate), "must be a bool",
                                          "pass True (check inputs) or False (hot path)"))
        self.validate = validate
        check_bool("fused_router", fused_router)
        self.fused_router = fused_router
        self.fused_gate = check_fused_gate(fused_gate)
        self._gate_f32: tuple[tuple, torch.Tensor] | None = None  # (key, float32 gate weight)
        check_integer_value("load_window", load_window, minimum=1,
                            fix="pass the number of forwards the EPLB load is summed over")
        E, H, I = router.num_experts, hidden_size, intermediate_size
        e = self.dispatcher.placement.num_local(self.dispatcher.rank)
        kw = dict(dtype=dtype, device=device)
        self.gate = nn.Linear(H, E, bias=router.gate_bias, **kw)
        self.expert_variant = PLAIN if expert_variant is None else expert_variant
        if self._replicas is not None and getattr(self.expert_variant, "bias", False):
            raise ValueError(error_message(
                "num_redundant_experts / replica_placement", "with expert biases",
                "a rebalance moves w13 / w2 between ranks but not the expert biases (the "
                "moved experts would run with another expert's bias)",
                "serve this model without EPLB replicas"))
        self.w13_bias, self.w2_bias = expert_biases(self.expert_variant, e, H, I, **kw)
        if router.scoring == "sigmoid" or router.choice_bias:  # (the choice bias)
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(E, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None
        self.w13 = nn.Parameter(torch.empty(e, 2 * I, H, **kw))
        self.w2 = nn.Parameter(torch.empty(e, H, I, **kw))
        self.shared_experts = None
        if shared_intermediate_size:
            self.shared_experts = SharedExperts(H, shared_intermediate_size,
                                                gated=shared_expert_gate, **kw)
        self._choice: ReplicaChoice | None = None
        self._load = None
        if self._replicas is not None:
            from rocm_moe.eplb import ExpertLoad

            dev = self.gate.weight.device
            nodes = self._replicas.check_nodes(replica_nodes)
            check_choice(replica_choice, nodes)
            self._choice = ReplicaChoice(self._replicas, self.dispatcher.rank, dev,
                                         choice=replica_choice, nodes=nodes)
            self._load = ExpertLoad(E, self._replicas.num_physical, load_window, dev)
        self.reset_parameters()

    @property
    def invariant(self) -> bool:
        """Invariant mode (see the module docstring). Settable: True swaps in the experts
        backend's invariant variant (``Experts.as_invariant``; ValueError with the reason where
        the experts or the dispatcher cannot run it), False restores the backend it replaced."""
        return self._invariant

    @invariant.setter
    def invariant(self, value: bool) -> None:
        check_bool("invariant", value)
        if value == self._invariant:
            return
        if value:
            self._check_invariant_comm()
            invariant_experts = self.experts.as_invariant()  # ValueError with its reason if none
            self._plain_experts, self._experts = self.experts, invariant_experts
        else:
            if self._plain_experts is not None:  # None: the user set other experts since
                self._experts = self._plain_experts
            self._plain_experts = None
        self._invariant = value
        self._invariant_agreed = False  # the group checks it again at the next forward

    @property
    def micro_batches(self) -> int:
        """Micro-batches per forward (see the class docstring). Settable; every rank of the
        group must hold the same value (checked at the next forward)."""
        return self._micro_batches

    @micro_batches.setter
    def micro_batches(self, value: int) -> None:
        overlap.check_micro_batches(value)
        self._micro_batches = value
        self._check_micro_batch_comm()
        self._invariant_agreed = False  # the group checks it again at the next forward

    def _check_micro_batch_comm(self) -> None:
        """Two micro-batches are dispatched and not combined at once: a dispatcher whose results
        are views of its buffers must hold two (the dispatcher may be swapped after the
        setter ran, so ``_refuse_unsupported`` checks again)."""
        disp = self.dispatcher
        if self._micro_batches > 1 and disp.holds_batch and disp.batches_in_flight < 2:
            raise ValueError(error_message(
                "micro_batches", self._micro_batches, f"the {disp.name} dispatcher holds "
                f"batches_in_flight={disp.batches_in_flight} batch (its received rows are views "
                "of its buffers) and the overlap dispatches the next micro-batch before the "
                "last one is combined", "build the dispatcher with batches_in_flight=2 (one "
                "more receive buffer), or micro_batches=1"))

    @property
    def experts(self) -> Experts:
        """The experts backend. Settable; while ``invariant`` is True it must be an invariant
        backend (``experts.as_invariant()``), else ValueError, and turning invariant off then
        keeps the experts set since instead of restoring the ones invariant replaced."""
        return self._experts

    @experts.setter
    def experts(self, value: Experts) -> None:
        if getattr(self, "_invariant", False) and getattr(value, "invariant", False) is not True:
            raise ValueError(error_message(
                "experts", getattr(value, "name", type(value).__name__),
                "must be an invariant backend while layer.invariant is True (its sums would "
                "depend on the batch)",
                "assign experts.as_invariant(), or set layer.invariant = False first"))
        current = getattr(self, "_experts", None)
        if getattr(value, "inner", value) is not getattr(current, "inner", current):
            self._plain_experts = None  # the user's choice, which invariant=False keeps
        self._experts = value

    def _agree_invariant(self) -> None:
        """Every rank of the group runs invariant mode or none does (the owner-side raw sums
        of one rank paired with another's weighted combine return garbage), and every rank the
        same ``micro_batches`` (else dispatches pair with another rank's combines): one
        collective at the first forward and at the first after either changes, never per
        forward."""
        if self._invariant_agreed:
            return
        disp, group = self.dispatcher, getattr(self.dispatcher, "group", None)
        if disp.world_size > 1 and group is not None and torch.distributed.is_initialized() \
                and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            everyone: list = [None] * disp.world_size
            torch.distributed.all_gather_object(everyone, (self.invariant, self.micro_batches),
                                                group=group)
            for j, (field, fix) in enumerate((
                    ("invariant", "set layer.invariant to the same value on every rank before "
                     "the forward"),
                    ("micro_batches", "build every rank's layer with the same micro_batches"))):
                values = {r: v[j] for r, v in enumerate(everyone)}
                if len(set(values.values())) > 1:
                    rule = "every rank of the EP group must run invariant mode, or none" \
                        if field == "invariant" else "every rank of the EP group must split " \
                        "its tokens into the same number of micro-batches"
                    raise ValueError(error_message(f"{field} by rank", values, rule, fix))
        self._invariant_agreed = True

    def _check_invariant_comm(self) -> None:
        if (reason := self.dispatcher.invariant_unsupported_reason()) is not None:
            raise ValueError(error_message(
                "invariant", True, f"comm={self.dispatcher.name} cannot run it: {reason}",
                "use the local, torch or symm comm backend, or invariant=False"))

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, E] gate logits of [T, H] tokens (in float32 where the router asks for it)."""
        if self.invariant:  # accumulated in float32 in a fixed order, rounded once
            logits = inv.linear_acc(x_TH, self.gate.weight)
            if self.gate.bias is not None:
                logits = logits + self.gate.bias.float()
            return logits if self.router.logits_in_float32 else logits.to(x_TH.dtype)
        if self.router.logits_in_float32:
            return F.linear(x_TH.float(), self._gate_weight_f32(),
                            None if self.gate.bias is None else self.gate.bias.float())
        return self.gate(x_TH)

    def _gate_weight_f32(self) -> torch.Tensor:
        """The gate weight in float32, cast once per weight version (a float32 router's GEMM
        cast the [E, H] weight every call: on DeepSeek-V3 a 3.7 MB read and 7.3 MB write per
        layer and step). Kept while the weight is unchanged (same storage, same in-place
        version); with autograd recording a trainable weight it is cast each call, as before."""
        w = self.gate.weight
        if w.dtype == torch.float32 or (torch.is_grad_enabled() and w.requires_grad):
            return w.float()
        key = (w.data_ptr(), w._version, w.device, tuple(w.shape))
        if self._gate_f32 is None or self._gate_f32[0] != key:
            self._gate_f32 = (key, w.detach().float())
        return self._gate_f32[1]

    @property
    def local_experts(self) -> tuple[int, ...]:
        """The (logical) expert of each local weight row: the placement's local experts, or
        with EPLB the logical expert each local physical expert holds (a replica's twin
        rows hold the same expert)."""
        if self._replicas is not None:
            return self._replicas.logical_experts(self.dispatcher.rank)
        return self.dispatcher.placement.local_experts(self.dispatcher.rank)

    # ---- expert-parallel load balancing (notes/eplb.md) --------------------------------------
    @property
    def replicas(self) -> ReplicatedPlacement | None:
        """The current replica placement (EPLB), or None (a layer without EPLB)."""
        return self._replicas

    def _require_eplb(self, what: str) -> None:
        if self._replicas is None:
            raise ValueError(error_message(
                what, "called on a layer without EPLB", "it needs replicated experts",
                "build the layer with EPMoE(..., num_redundant_experts=R), R >= 0"))

    def _eplb_group(self):
        """The EP group (None on one rank) and its collective timeout in seconds."""
        disp = self.dispatcher
        if disp.world_size == 1:
            return None, None
        timeout = getattr(disp, "timeout", None)
        return disp.group, (timeout.total_seconds() if timeout is not None else None)

    def expert_load(self, *, scope: str = "group"):
        """The EPLB load over the last ``load_window`` forwards (``eplb.LoadReport``: [E]
        logical, [P] physical, [W] per-rank (token, slot) counts). ``scope="group"`` sums every
        rank's (a collective: every rank calls it); ``"rank"``: this rank's tokens only."""
        self._require_eplb("expert_load")
        if scope not in ("group", "rank"):
            raise ValueError(error_message("scope", repr(scope), "must be 'group' or 'rank'",
                                           "pass scope='group' (collective) or 'rank'"))
        group = self._eplb_group()[0] if scope == "group" else None
        report = self._load.report(self._replicas, group=group)
        return report if group is not None or scope == "rank" else \
            dataclasses.replace(report, scope="group")

    def reset_expert_load(self) -> None:
        """Empty the EPLB load window (e.g. before measuring a new workload)."""
        self._require_eplb("reset_expert_load")
        self._load.reset()

    def to_physical(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] logical ids -> the physical ids this rank's forward dispatches them to (the
        same tensor without EPLB); -1 stays -1. Device ops only."""
        return topk_ids_TK if self._choice is None else self._choice.to_physical(topk_ids_TK)

    def _expert_tensors(self) -> list[torch.Tensor]:
        """Every [e, ...] per-expert tensor the experts read (float w13/w2, or an FP8 layer's
        weights and block scales), as tensors to copy into in place."""
        out: list[torch.Tensor] = list(self.weights.tensors().values())
        out += [b for b in (getattr(self, "w13_bias", None), getattr(self, "w2_bias", None))
                if isinstance(b, torch.Tensor)]  # (an expert variant's per-expert biases)
        return [t.data if isinstance(t, nn.Parameter) else t for t in out]

    @torch.no_grad()
    def rebalance(self, phys_to_log: torch.Tensor | None = None, *, num_nodes: int = 1,
                  experts_per_round: int = 1):
        """Move to a new replica placement between forwards; collective: every rank of the EP
        group calls it with the same ``phys_to_log`` [P] (int, logical id of each physical
        expert; None: ``eplb_balance.rebalance`` of the group's ``expert_load`` over
        ``num_nodes`` nodes). The ranks exchange the table (a bad or differing one is refused
        on every rank before any weight moves), send the experts that change owner
        (``experts_per_round`` experts of the group at a time) into a staging buffer, agree
        that every rank succeeded, and only then swap weights and placement on every rank
        (``eplb.RebalanceResult``). A rank failing in the move is named on the others
        (``PeerFailure``); every rank then keeps its old placement and weights."""
        from rocm_moe import eplb

        self._require_eplb("rebalance")
        old, rank = self._replicas, self.dispatcher.rank
        group, timeout_s = self._eplb_group()
        bad = _rebalance_refusal(num_nodes, experts_per_round, old.world_size, phys_to_log)
        load = self.expert_load(scope="group") if phys_to_log is None else None  # (collective)
        try:  # a rank's error joins the table exchange: its peers raise too, none waits
            if bad is not None:
                raise bad
            if phys_to_log is None:
                phys_to_log = self._balanced_placement(load, num_nodes)
            mine: ReplicatedPlacement | Exception = ReplicatedPlacement(
                phys_to_log, old.world_size, old.num_experts)
            eplb.plan_move(old, mine)  # (checks the sizes)
        except (ValueError, TypeError) as exc:
            mine = exc
        if group is not None:
            new = eplb.agree_placement(mine, rank, group, timeout_s)
        elif isinstance(mine, Exception):
            raise mine
        else:
            new = mine
        plan = eplb.plan_move(old, new)
        tensors = self._expert_tensors()
        staged = eplb.move_weights(tensors, plan, rank, group,
                                   experts_per_round=experts_per_round, timeout_s=timeout_s)
        eplb.commit(tensors, staged, plan, rank)  # every rank succeeded: swap
        self._replicas = new
        self._choice.update(new)
        self._load.restart_physical()
        expert_bytes = sum(t[0].nbytes for t in tensors)
        return eplb.RebalanceResult(
            placement=new, moved=sum(t.src_rank != t.dst_rank for t in plan),
            copied=sum(t.src_rank == t.dst_rank for t in plan),
            received_bytes=expert_bytes * sum(t.dst_rank == rank != t.src_rank for t in plan))

    def _balanced_placement(self, load, num_nodes: int) -> torch.Tensor:
        """``eplb_balance.rebalance`` of the group's logical ``load`` (the same on every
        rank)."""
        try:
            from rocm_moe.eplb_balance import rebalance as balance
        except ImportError as exc:
            raise ValueError(error_message(
                "phys_to_log", None, f"no balancing algorithm to compute it ({exc})",
                "pass the new phys_to_log [P] yourself")) from exc
        r = self._replicas
        return balance(load.logical, num_physical=r.num_physical, num_ranks=r.world_size,
                       num_nodes=num_nodes, num_groups=self.router.n_group)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, *, draws_on: torch.device | None = None) -> None:
        """Synthetic weights from ``rocm_moe.synthetic``: expert g's weights depend only on
        (seed, g), so any rank (or a single-process reference) can regenerate them.
        ``draws_on``: the experts' and shared experts' draws made by that device's generator
        (other numbers than the CPU's default draws, which references reproduce; for
        benchmarks that only time: DeepSeek-V3's 256 experts are 11G CPU draws)."""
        check_integer_value("seed", seed, minimum=0, fix="pass a seed >= 0 (the same on every "
                            "rank: expert g's weights depend only on (seed, g))")
        if draws_on is not None and not isinstance(draws_on, torch.device):
            raise TypeError(error_message("draws_on", repr(draws_on),
                                          "must be a torch.device or None",
                                          "pass torch.device('cuda', i), or leave it out"))
        E, H, I = self.router.num_experts, self.hidden_size, self.intermediate_size
        e = len(self.local_experts)
        if self.w13.shape[0] != e:  # a quantised format dropped the float weights
            kw = dict(dtype=self.w13.dtype, device=self.w13.device)
            self.w13 = nn.Parameter(torch.empty(e, 2 * I, H, **kw))
            self.w2 = nn.Parameter(torch.empty(e, H, I, **kw))
        self.gate.weight.copy_(synthetic.gate_weight(seed, E, H))
        if self.gate.bias is not None:
            self.gate.bias.zero_()
        for j, g in enumerate(self.local_experts):
            w13, w2 = synthetic.expert_weights(seed, g, H, I, draws_on)
            self.w13[j].copy_(w13)
            self.w2[j].copy_(w2)
        if self.shared_experts is not None:
            s = self.shared_experts
            w13, w2, gate = synthetic.shared_weights(seed, H, s.w2.shape[1], draws_on)
            s.w13.copy_(w13)
            s.w2.copy_(w2)
            if s.gate is not None:
                s.gate.weight.copy_(gate)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()
        if not self._weights_cls.trainable:  # quantised: the synthetic weights in the format
            self.load_experts(self.w13.detach(), self.w2.detach())

    @torch.no_grad()
    def load_experts(self, w13, w2=None) -> None:
        """Load routed experts from global [E, 2I, H] / [E, H, I] (this rank's slice is taken)
        or local [e, 2I, H] / [e, H, I] weights: float tensors (quantised to the layer's
        format), the format's own pieces (block_fp8: ``quant.BlockFP8Weight``, converted to
        the layer's encoding), or one ``formats.WeightFormat`` object (``w2`` None)."""
        if isinstance(w13, WeightFormat):
            if w2 is not None:
                raise TypeError(error_message(
                    "w2", describe(w2), "must be None when w13 is a WeightFormat (it holds both)",
                    "pass layer.load_experts(weights)"))
            w13, w2 = w13.expert_args()
        if not self._weights_cls.trainable:
            return self._load_quantised(w13, w2)
        E, e = self.router.routed_experts, self.w13.shape[0]
        for name, src, dst in (("w13", w13, self.w13), ("w2", w2, self.w2)):
            check_tensor(name, src, shape=(None, *dst.shape[1:]), dtypes=FLOAT_DTYPES,
                         fix=f"pass float weights; integer ones would be cast silently "
                         f"(convert on purpose with {name}.to({dst.dtype}))")
            if src.shape[0] == E and (e != E or self._replicas is not None):
                src = src[list(self.local_experts)]  # (EPLB: [E] rows are the logical ones)
            elif src.shape[0] != e:
                raise ValueError(error_message(
                    f"{name}.shape[0]", src.shape[0], f"must be E={E} (global) or e={e} (local)",
                    "pass all experts or this rank's experts in local order"))
            check_finite(name, src, "load the experts' weights again")
            dst.copy_(src)

    def _load_quantised(self, w13, w2) -> None:
        """``load_experts`` of a quantised format: this rank's experts selected, quantised (or
        converted) to the layer's format, checked and registered as buffers; the float
        parameters shrink to [0, ...] dtype carriers."""
        E, e = self.router.routed_experts, len(self.local_experts)
        H, I = self.hidden_size, self.intermediate_size
        cls = self._weights_cls
        for name, src, shape in (("w13", w13, (2 * I, H)), ("w2", w2, (H, I))):
            if not hasattr(src, "shape") or len(src.shape) != 3 \
                    or tuple(src.shape[1:]) != shape:
                raise ValueError(error_message(
                    name, describe(src), f"must be [E or e, {shape[0]}, {shape[1]}]",
                    f"pass the experts' weights (float, or {cls.name}'s own)"))
        n = w13.shape[0]
        if w2.shape[0] != n:  # (one of them [E], the other [e] or [P]: rows would be mixed)
            raise ValueError(error_message(
                "w13.shape[0], w2.shape[0]", (n, w2.shape[0]), "must be equal (the same experts)",
                f"pass both for all E={E} experts or both for this rank's e={e}"))
        if n == E and (e != E or self._replicas is not None):
            idx = torch.tensor(self.local_experts, dtype=torch.long, device=w13.device)
            w13, w2 = w13[idx], w2[idx]  # (EPLB: [E] rows are the logical ones)
        elif n != e:
            raise ValueError(error_message(
                "w13.shape[0]", n, f"must be E={E} (global) or e={e} (local)",
                "pass all experts or this rank's experts in local order"))
        weights = cls.quantize(w13, w2, **self._format_options)
        weights.check_values("weights")
        weights = weights.to(self.gate.weight.device)
        if weights.shape() != (e, H, I):
            raise ValueError(error_message(
                f"{cls.name} weights (e, H, I)", weights.shape(), f"must be ({e}, {H}, {I})",
                "pass this layer's experts"))
        for name, t in weights.tensors().items():
            self.register_buffer(name, t.contiguous())
        kw = dict(dtype=self.w13.dtype, device=self.w13.device)
        self.w13 = nn.Parameter(torch.empty(0, 2 * I, H, **kw))  # dtype carriers only
        self.w2 = nn.Parameter(torch.empty(0, H, I, **kw))

    @property
    def weight_format(self) -> str:
        """The routed experts' format (``rocm_moe.formats``): "dense", "block_fp8", ..."""
        return self._weights_cls.name

    @property
    def format_options(self) -> dict:
        return dict(self._format_options)

    @property
    def weights(self) -> WeightFormat:
        """This rank's routed experts as a format object (views of the layer's tensors)."""
        cls = self._weights_cls
        return cls.from_tensors({n: getattr(self, n) for n in cls.tensor_names},
                                **self._format_options)

    @property
    def expert_bytes(self) -> int:
        """Bytes of this rank's routed experts in their format (scales included)."""
        return self.weights.nbytes

    @property
    def fp8_dtype(self) -> torch.dtype | None:
        """The FP8 encoding of the routed experts (block-FP8 formats), else None."""
        return getattr(self.weights, "fp8_dtype", None)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` / ``.cuda()`` move a quantised format's buffers; a dtype cast
        (``.to(bf16)``, ``.half()``) leaves them as they are (torch counts float8 as floating
        and would cast them, and their float32 scales, too)."""
        cls = getattr(self, "_weights_cls", None)
        if cls is None or cls.trainable:
            return super()._apply(fn, recurse)
        held = {n: self._buffers.pop(n) for n in cls.tensor_names if n in self._buffers}
        try:
            out = super()._apply(fn, recurse)
        finally:
            if held:
                device = fn(torch.empty(0, device=next(iter(held.values())).device)).device
                for n, t in held.items():
                    self._buffers[n] = t.to(device)
        return out

    def expert_weights(self) -> tuple:
        """(w13, w2) as the experts backend takes them (a quantised format's own pieces)."""
        if self._weights_cls.trainable:
            return self.w13, self.w2
        return self.weights.expert_args()

    def _format_refusal(self) -> str | None:
        """Why the experts backend cannot compute the layer's weight format here, or None."""
        experts = self.experts
        if self._weights_cls.name in getattr(experts, "weight_formats", ("dense",)) and \
                not hasattr(experts, "weight_format_unsupported_reason"):
            return None
        return self.weights.supports(getattr(experts, "inner", experts))

    def route_tokens(
        self, hidden_states: torch.Tensor, *, forced_expert_ids: torch.Tensor | None = None
    ) -> RoutingResult:
        """[T, H] or [B, S, H] tokens -> their [T, K] routing (``forced_expert_ids`` [T, K],
        or [B, S, K] for [B, S, H] tokens, replays a routing, see ``routing.route``)."""
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        if forced_expert_ids is None and not self.invariant and self.fused_router and \
                gate_route_unsupported(x_TH, self.gate.weight, self.router, mode=self.fused_gate,
                                       gate_bias_E=self.gate.bias) is None:
            return gate_route(x_TH, self.gate.weight, self.router, validate=self.validate,
                              e_score_correction_bias=self.e_score_correction_bias)
        logits_TE = self.router_logits(x_TH)
        lead = hidden_states.shape[:-1]  # [B, S, E] logits take [B, S, K] (or [T, K]) replays
        return route(logits_TE.reshape(*lead, self.router.num_experts), self.router,
                     e_score_correction_bias=self.e_score_correction_bias,
                     forced_expert_ids=forced_expert_ids, validate=self.validate,
                     invariant=self.invariant, fused=self.fused_router)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        forced_expert_ids: torch.Tensor | None = None,
        return_raw: bool = False,
        trace: Trace | None = None,
    ) -> torch.Tensor | MoEOutput:
        """hidden_states [T, H] or [B, S, H] -> same shape (or MoEOutput with return_raw).

        ``forced_expert_ids`` [T, K] / [B, S, K] replays a routing (see ``routing.route``).
        """
        self._agree_invariant()
        with self._refusals_shared():
            _check_call(return_raw=return_raw, trace=trace,
                        forced_expert_ids=forced_expert_ids)
            x_TH = self._flatten(hidden_states)
            with _stage(trace, "route", x_TH.device):
                routing = self.route_tokens(hidden_states, forced_expert_ids=forced_expert_ids)
            routing, zero = self._split_zero_experts(routing)
        out = self._run(hidden_states, x_TH, routing, return_raw, trace)
        return self._add_identity(out, x_TH, zero)

    def _split_zero_experts(self, routing: RoutingResult):
        """LongCat-Flash's zero-computation experts (ids >= E_r = ``router.routed_experts``):
        -> (the routing with those slots emptied: id -1, weight 0; ``_ZeroSlots`` for
        ``_add_identity``), or (routing, None) without zero experts."""
        if not self.router.zero_experts:
            return routing, None
        w_TK, ids_TK = routing.topk_weights, routing.topk_ids
        zero_TK = ids_TK >= self.router.routed_experts
        w_zero_TK = torch.where(zero_TK, w_TK, torch.zeros_like(w_TK)).float()
        identity_T = inv.tree_sum(w_zero_TK) if self.invariant else w_zero_TK.sum(-1)
        routed = RoutingResult(topk_weights=w_TK.masked_fill(zero_TK, 0.0),
                               topk_ids=ids_TK.masked_fill(zero_TK, -1))
        return routed, _ZeroSlots(routing=routing, zero_TK=zero_TK,
                                  identity_T1=identity_T.unsqueeze(-1))

    @staticmethod
    def _add_identity(out, x_TH: torch.Tensor, zero: _ZeroSlots | None):
        """out + x * identity weight, as transformers' LongcatFlashMoE adds it: the float32
        product cast to the output's dtype, added after the experts' output. With
        ``return_raw``: a zero-computation slot's raw (unweighted) output is the token itself,
        and the MoEOutput carries the router's own ids and weights."""
        if zero is None:
            return out
        raw = None
        if isinstance(out, MoEOutput):
            raw, out = out, out.out
        y_TH = out.reshape(x_TH.shape) + (x_TH * zero.identity_T1).to(out.dtype)
        y = y_TH.reshape(out.shape)
        if raw is None:
            return y
        K = zero.zero_TK.shape[1]
        raw_TKH = raw.raw.reshape(x_TH.shape[0], K, x_TH.shape[1])
        raw_TKH = torch.where(zero.zero_TK[..., None], x_TH[:, None, :].to(raw_TKH.dtype),
                              raw_TKH)
        return dataclasses.replace(raw, out=y, raw=raw_TKH.reshape(raw.raw.shape),
                                   topk_weights=zero.routing.topk_weights,
                                   topk_ids=zero.routing.topk_ids)

    @contextlib.contextmanager
    def _refusals_shared(self):
        """A refusal before dispatch (a bad input, a NaN) reaches every rank of the group through
        the dispatcher, so the other ranks raise too instead of waiting in dispatch."""
        try:
            yield
        except (ValueError, TypeError):
            self.dispatcher.share_refusal()
            raise

    def forward_routed(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        return_raw: bool = False,
        trace: Trace | None = None,
    ) -> torch.Tensor | MoEOutput:
        """Skip the router: the caller's [T, K] float32 weights and [T, K] global ids (a
        framework's own router, or a sanity test). Validated like dispatch inputs."""
        self._agree_invariant()
        with self._refusals_shared():
            _check_call(return_raw=return_raw, trace=trace, topk_weights=topk_weights,
                        topk_ids=topk_ids)
            x_TH = self._flatten(hidden_states)
            check_routing_rows(topk_weights, topk_ids, x_TH.shape[0], self.router.top_k)
            # logical ids [0, E) with replicas, not [0, P); with zero experts [0, E_r + Z)
            if self._replicas is not None or self.router.zero_experts:
                check_tensor("topk_ids", topk_ids, shape=(x_TH.shape[0], self.router.top_k),
                             fix="pass [T, K] logical expert ids; pad unused slots with -1")
                check_integer("topk_ids", topk_ids)
                if self.validate:
                    check_id_range("topk_ids", topk_ids, self.router.num_experts,
                                   allow_minus_one=True)
            routing, zero = self._split_zero_experts(
                RoutingResult(topk_weights=topk_weights, topk_ids=topk_ids))
        out = self._run(hidden_states, x_TH, routing, return_raw, trace)
        return self._add_identity(out, x_TH, zero)

    def _flatten(self, hidden_states: torch.Tensor) -> torch.Tensor:
        check_tensor("hidden_states", hidden_states, dtypes=FLOAT_DTYPES)
        H = self.hidden_size
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != H:
            raise ValueError(error_message(
                "hidden_states.shape", list(hidden_states.shape),
                f"must be [T, H] or [B, S, H] with H={H}", "pass the MoE block's input"))
        if hidden_states.is_meta:
            raise ValueError(error_message(
                "hidden_states.device", hidden_states.device, "holds no data (a meta tensor)",
                "materialise it on the layer's device"))
        if hidden_states.dtype != self.w13.dtype:
            raise TypeError(error_message(
                "hidden_states.dtype", hidden_states.dtype,
                f"must equal the layer's dtype {self.w13.dtype}",
                f"cast the input or the layer (layer.to({hidden_states.dtype}))"))
        if self.validate:  # before the router, so a NaN token is not blamed on the router
            check_finite("hidden_states", hidden_states,
                         "find the earlier layer that produced it (validate=False skips this)")
        return hidden_states.reshape(-1, H)

    def _refuse_unsupported(self, weight_mode: WeightMode, return_raw: bool, x_TH) -> None:
        """Every refusal happens here, before the first collective, identically on all ranks."""
        disp = self.dispatcher
        if self.invariant:  # (the dispatcher may have been swapped since invariant was set)
            self._check_invariant_comm()
        self._check_micro_batch_comm()
        reason = self.experts.supports(mode=output_form(weight_mode), dtype=x_TH.dtype,
                                       device=x_TH.device)
        if reason is None and return_raw:
            reason = disp.raw_unsupported_reason()
        reason = reason or variant_refusal(self.experts, self.expert_variant, weight_mode)
        if reason is None and (fmt := self._format_refusal()) is not None:
            raise ValueError(error_message(
                "weight_format", self.weight_format,
                f"experts={self.experts.name} cannot compute it: {fmt}",
                "use an experts backend that computes it (rocm-moe info), or load the "
                "weights in another format"))
        if reason is not None:
            raise ValueError(error_message(
                "return_raw / weight_mode", (return_raw, self.weight_mode),
                f"comm={disp.name} experts={self.experts.name} cannot run it: {reason}",
                "use backends that support it (rocm-moe info), or weight_mode='experts'"))

    def _run(self, hidden_states, x_TH, routing: RoutingResult, return_raw: bool, trace):
        """dispatch -> experts -> combine (+ shared experts) of routed tokens, in pieces: chunks
        of at most the dispatcher's ``max_tokens_per_rank`` tokens (``Dispatcher.num_chunks``:
        every rank runs the group's largest chunk count, a rank with fewer tokens joins with
        empty chunks), each split into ``micro_batches`` micro-batches that ``overlap.run``
        pipelines (one in turn where micro_batches is 1)."""
        disp = self.dispatcher
        raw_path = return_raw or self.invariant  # invariant: the owner sums in slot order
        weight_mode = "combine" if raw_path else self.weight_mode
        self._refuse_unsupported(weight_mode, raw_path, x_TH)
        logical = routing
        if self._replicas is not None:  # each (token, slot) to one replica, on the device
            phys_TK = self._choice.to_physical(routing.topk_ids)
            self._load.record(routing.topk_ids, phys_TK)
            routing = RoutingResult(topk_weights=routing.topk_weights, topk_ids=phys_TK)
        T, dev = x_TH.shape[0], x_TH.device
        w_TK, ids_TK = routing.topk_weights, routing.topk_ids
        n = disp.num_chunks(T)
        pieces = overlap.split(T, disp.max_tokens_per_rank if n > 1 else None, n,
                               self.micro_batches)
        if self.micro_batches > 1 and self.validate:
            with self._refusals_shared():  # every piece's values, before the first dispatch
                for lo, hi in pieces:
                    disp.check_dispatch_inputs(x_TH[lo:hi], w_TK[lo:hi], ids_TK[lo:hi])
        stages = overlap.Stages(
            dispatch=lambda i: self._dispatch_piece(x_TH, w_TK, ids_TK, pieces[i], trace),
            experts=lambda i, d: self._experts_piece(d, pieces[i], dev, weight_mode, trace),
            combine=lambda i, d, eo: self._combine_piece(d, eo, w_TK, ids_TK, pieces[i],
                                                         raw_path, trace),
            abandon=lambda d, stage, exc: disp.abandon(d.handle, stage, exc))
        after = None if self.shared_experts is None else (lambda: self._shared(x_TH, trace))
        parts, shared = overlap.run(len(pieces), stages, device=dev,
                                    overlap=self.micro_batches > 1, after=after)
        y_TH, raw_TKH, own_ids_TK, own_w_TK = (  # the pieces in token order
            None if getattr(parts[0], f) is None else
            getattr(parts[0], f) if len(parts) == 1 else torch.cat([getattr(p, f) for p in parts])
            for f in ("y", "raw", "topk_ids", "topk_weights"))
        if shared is not None:
            y_TH = y_TH + shared
        out = y_TH.reshape(hidden_states.shape)
        if not return_raw:
            return out
        lead, K = hidden_states.shape[:-1], own_ids_TK.shape[1]
        if self._replicas is not None:  # the caller's logical ids, not the replicas'
            own_ids_TK = logical.topk_ids.to(torch.int32)
        return MoEOutput(out=out, raw=raw_TKH.reshape(*lead, K, self.hidden_size),
                         topk_weights=own_w_TK, topk_ids=own_ids_TK,
                         weighted_by="experts" if parts[0].weights_applied else "combine")

    def _shared(self, x_TH, trace):
        with _stage(trace, "shared", x_TH.device):
            if self.invariant:
                return self.shared_experts.forward_invariant(x_TH, self.experts)
            return self.shared_experts(x_TH)

    # ---- one piece (at most max_tokens_per_rank tokens): dispatch -> experts -> combine -----
    def _dispatch_piece(self, x_TH, topk_weights_TK, topk_ids_TK, piece, trace):
        lo, hi = piece
        with _stage(trace, "dispatch", x_TH.device):
            return self.dispatcher.dispatch(x_TH[lo:hi], topk_weights_TK[lo:hi],
                                            topk_ids_TK[lo:hi], validate=self.validate)

    def _experts_piece(self, d, piece, dev, weight_mode: WeightMode, trace) -> ExpertsOutput:
        disp = self.dispatcher
        with _stage(trace, "experts", dev):
            return self.experts(d.x, d.topk_ids, d.topk_weights, *self.expert_weights(),
                                disp.expert_map_on(dev), weight_mode=weight_mode,
                                validate=False, **d.row_bound(piece[1] - piece[0],
                                                              disp.world_size),
                                **variant_kwargs(self.expert_variant, self.w13_bias,
                                                 self.w2_bias))

    def _combine_piece(self, d, eo: ExpertsOutput, topk_weights_TK, topk_ids_TK, piece,
                       raw_path: bool, trace) -> _PieceOut:
        lo, hi = piece
        disp, raw_TKH = self.dispatcher, None
        with _stage(trace, "combine", topk_ids_TK.device):
            if raw_path:  # raw [T, K, H] back on the owner, which weights its slots once
                raw_TKH = disp.combine_raw(eo, d.handle)
                y_TH = weight_once(ExpertsOutput(out=raw_TKH, weights_applied=False,
                                                 weighted_inputs=eo.weighted_inputs),
                                   topk_weights_TK[lo:hi], topk_ids_TK[lo:hi], None)
            else:
                y_TH = disp.combine(eo, d.handle)
        return _PieceOut(y=y_TH, raw=raw_TKH, topk_ids=d.handle.topk_ids,
                         topk_weights=d.handle.topk_weights, weights_applied=eo.weights_applied)


@dataclass(frozen=True, kw_only=True, eq=False)
class _PieceOut:
    """One piece's result (``EPMoE._combine_piece``)."""

    y: torch.Tensor  # [T, H]
    raw: torch.Tensor | None  # [T, K, H] on the raw path
    topk_ids: torch.Tensor  # [T, K] int32: the rank's own ids
    topk_weights: torch.Tensor  # [T, K] float32
    weights_applied: bool  # the experts applied the routing weights
