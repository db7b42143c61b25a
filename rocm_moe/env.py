"""Every environment variable rocm_moe reads: its name, what it changes, what holds while it is
unset, the page that documents it, and a check that reads it as its owner does (a bad value: the
owner's ValueError, naming the variable). ``rocm-moe info`` prints them with their values here,
and tests/test_env.py keeps this list, the source and the docs in step.

The owners keep reading their own variables (the constants beside them say which); this module
only lists them, so one place answers "what can I set, and is what I set valid?".

Worked example (the test asserts it): with ``ROCM_MOE_BF16_STREAM_MAX_SLOTS=eight`` set,
``problems()`` is one line naming that variable and the rule "must be an int >= 0".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from rocm_moe._checks import env_switch, env_tokens, error_message


@dataclass(frozen=True)
class Variable:
    name: str
    effect: str  # what setting it changes
    unset: str  # what holds while it is unset
    docs: str  # the page that documents it (a path in the repository)
    check: Callable[[], object]  # reads it as its owner does; a bad value raises ValueError


def _bf16_stream() -> int:
    from rocm_moe.experts.triton_small import bf16_stream_max_slots

    return bf16_stream_max_slots()


def _shared_stream() -> int:
    from rocm_moe.experts.triton_small import shared_stream_max_rows

    return shared_stream_max_rows()


def _fp8_small_slots() -> int:
    from rocm_moe.experts.triton_small_fp8 import max_slots

    return max_slots()


def _fp8_small_config() -> None:
    from rocm_moe.experts.triton_small_fp8 import check_env_config

    check_env_config()


def _fp8_table() -> int:
    from rocm_moe.experts.triton_fp8 import fp8_config_table

    return len(fp8_config_table())


def _gate_plan() -> dict:
    from rocm_moe._gate_triton import PLAN_ENV, _spec_fields

    return _spec_fields(os.environ.get(PLAN_ENV, ""))


def _rendezvous() -> float:
    from rocm_moe.distributed import _rendezvous_timeout

    return _rendezvous_timeout(None)


def _threads() -> int:
    from rocm_moe.distributed import _default_threads

    return _default_threads(1)


def _switch(name: str) -> Callable[[], bool]:
    return lambda: env_switch(name)


def _backend(name: str, kind: str) -> Callable[[], str | None]:
    """A backend name, checked against the registry (whether it runs depends on the machine
    the engine serves on: the plug-in checks that when it builds the layer)."""
    def check() -> str | None:
        from rocm_moe import backends

        value = os.environ.get(name) or None
        if value is not None and value not in backends.names(kind):
            raise ValueError(error_message(
                name, repr(value), f"known {kind} backends are {backends.names(kind)}",
                f"set {name} to one of them, or unset it for the fastest that runs here"))
        return value
    return check


def _weight_mode(name: str) -> Callable[[], str]:
    def check() -> str:
        from rocm_moe.weighting import resolve_weight_mode

        return resolve_weight_mode(os.environ.get(name) or "experts", field=name)
    return check


def _tokens(name: str) -> Callable[[], int | None]:
    """A token capacity (the engine also checks it against its largest CUDA-graph batch when it
    builds the dispatcher)."""
    return lambda: env_tokens(name, f"unset it or set e.g. {name}=4096")


def _eplb_policy() -> str:
    from rocm_moe.integrations.vllm import ENV_EPLB_POLICY, eplb_policy_choice

    return eplb_policy_choice(os.environ.get(ENV_EPLB_POLICY))


def _engine(engine: str) -> tuple[Variable, ...]:
    up = engine.upper()
    page = "docs/serving.md"
    return (
        Variable(f"ROCM_MOE_{up}", f"the {engine} plug-in replaces {engine}'s MoE layers "
                 "(1/true/on or 0/false/off)", "off", page, _switch(f"ROCM_MOE_{up}")),
        Variable(f"ROCM_MOE_{up}_COMM", "the dispatcher backend (local, torch, symm, mori)",
                 "the fastest that runs on the engine's devices", page,
                 _backend(f"ROCM_MOE_{up}_COMM", "comm")),
        Variable(f"ROCM_MOE_{up}_EXPERTS", "the experts backend (reference, triton, aiter)",
                 "the fastest that runs on the engine's devices", page,
                 _backend(f"ROCM_MOE_{up}_EXPERTS", "experts")),
        Variable(f"ROCM_MOE_{up}_WEIGHT_MODE", "who applies the routing weights "
                 "(experts or combine)", "experts", page,
                 _weight_mode(f"ROCM_MOE_{up}_WEIGHT_MODE")),
        Variable(f"ROCM_MOE_{up}_MAX_TOKENS", "the dispatcher's capacity in tokens per rank "
                 "(larger batches run in chunks)", f"{engine}'s token budget", page,
                 _tokens(f"ROCM_MOE_{up}_MAX_TOKENS")),
    )


EXPERTS_PAGE = "docs/experts.md"
VARIABLES: tuple[Variable, ...] = (
    *_engine("vllm"),
    Variable("ROCM_MOE_VLLM_EPLB_POLICY", "vLLM's EPLB rebalancing policy (rocm_moe or vllm)",
             "vllm", "docs/serving.md", _eplb_policy),
    *_engine("sglang"),
    Variable("ROCM_MOE_BF16_STREAM_MAX_SLOTS", "the most slots (rows x top_k) of a bf16/fp16 "
             "batch that the streaming decode kernels take", "64 on NVIDIA, 0 on ROCm",
             EXPERTS_PAGE, _bf16_stream),
    Variable("ROCM_MOE_FP8_SMALL_MAX_SLOTS", "the most slots of a block-FP8 batch that the "
             "streaming decode kernels take", "64 on NVIDIA, 0 on ROCm", EXPERTS_PAGE,
             _fp8_small_slots),
    Variable("ROCM_MOE_FP8_SMALL_CONFIG", "the streaming kernels' launch config (JSON, merged "
             "into the defaults; per slot count and per HxI shape)", "the measured defaults",
             EXPERTS_PAGE, _fp8_small_config),
    Variable("ROCM_MOE_SHARED_STREAM_MAX_ROWS", "the most rows of a batch whose dense shared "
             "experts run through the streaming kernels", "0: torch's GEMMs", EXPERTS_PAGE,
             _shared_stream),
    Variable("ROCM_MOE_FP8_CONFIGS", "a tuned block-FP8 launch table (a JSON file) read "
             "instead of the packaged one", "rocm_moe/experts/triton_fp8_configs.json",
             EXPERTS_PAGE, _fp8_table),
    Variable("ROCM_MOE_GATE_PLAN", "the fused gate GEMM's plan for every call (a spec such as "
             "'t64 e64 s8 pdl')", "the measured plans, else the rule", "docs/api.md",
             _gate_plan),
    Variable("ROCM_MOE_RENDEZVOUS_TIMEOUT_S", "seconds the ranks wait for each other at start",
             "120", "docs/failure-semantics.md", _rendezvous),
    Variable("ROCM_MOE_THREADS_PER_RANK", "intra-op threads of each CPU (gloo) rank",
             "the CPUs divided among the ranks", "docs/cli.md", _threads),
)
BY_NAME = {v.name: v for v in VARIABLES}


def settings() -> list[tuple[Variable, str | None, str | None]]:
    """(variable, its value here or None, what its owner says of that value: None where it is
    unset or accepted, else the owner's error, or why it could not be checked here)."""
    rows = []
    for var in VARIABLES:
        value, verdict = os.environ.get(var.name), None
        if value is not None:
            try:
                var.check()
            except ValueError as err:
                verdict = str(err)
            except ImportError as err:  # e.g. the gate plan's reader needs Triton
                verdict = f"not checked here ({err})"
        rows.append((var, value, verdict))
    return rows


def problems() -> list[str]:
    """One line per variable set here to a value its owner refuses (its ValueError)."""
    return [verdict for _, _, verdict in settings()
            if verdict is not None and not verdict.startswith("not checked")]
