"""Every (comm x experts) pair through EPMoE against the float64 oracle.

A new backend joins the whole matrix with one line in ``COMM`` or ``EXPERTS``. Each available
pair runs both weight modes and ``return_raw`` (where the comm backend supports it) on awkward
sizes (T = 1, 33 tokens per rank, K = 3, shared experts on), in the first dtype its experts
accept (float32, else float16 or bfloat16: the Triton experts run in Triton's interpreter on
CPUs). A pair whose backend cannot run here is skipped with the backend's own reason
(``availability()``). Multi-rank backends run on spawned ranks, one launch per world size for
all their pairs (spawning is the slow part).
"""

from __future__ import annotations

import traceback

import pytest
import torch

from rocm_moe import EPMoE, RouterConfig, dense_moe_reference
from rocm_moe import synthetic as syn
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.comm.mori import MoriDispatcher
from rocm_moe.comm.symm import SymmDispatcher
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import WorkerInfo, launch
from rocm_moe.experts.aiter import AiterExperts
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.experts.triton import TritonExperts
from rocm_moe.placement import Placement
from tests.conftest import DEVICE, TOL, rel_err

# name: (dispatcher class, world size). Every class takes (placement, hidden_size=, top_k=,
# dtype=, max_tokens_per_rank=) and answers availability().
COMM = {
    "local": (LocalDispatcher, 1),
    "torch": (TorchDispatcher, 2),
    "mori": (MoriDispatcher, 2),
    "symm": (SymmDispatcher, 2),
}
# name: experts class (built with no arguments).
EXPERTS = {
    "reference": ReferenceExperts,
    "triton": TritonExperts,
    "aiter": AiterExperts,
}

E, K, H, I, SHARED_I = 8, 3, 16, 8, 5
TOKENS = (1, 33)
SEED = 11
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype(experts_name: str) -> torch.dtype | None:
    """The first dtype the experts accept in both modes on this device, or None."""
    exp = EXPERTS[experts_name]()
    for dtype in DTYPES:
        if all(exp.supports(mode=m, dtype=dtype, device=DEVICE) is None
               for m in ("weighted", "raw")):
            return dtype
    return None


def _why_not(comm: str, experts: str) -> str | None:
    cls, W = COMM[comm]
    reason = cls.availability() or EXPERTS[experts].availability()
    if reason is None and _dtype(experts) is None:
        reason = f"experts={experts} accepts none of {DTYPES} on {DEVICE}"
    if reason is None and W > 1 and DEVICE.type == "cuda" and torch.cuda.device_count() < W:
        reason = f"needs {W} GPUs"
    return reason


def _check_pair(info: WorkerInfo, comm: str, experts: str) -> list[str]:
    """Every case of one pair on this rank; the failures (empty: all passed)."""
    cls, W = COMM[comm]
    dtype = _dtype(experts)
    disp = cls(Placement.contiguous(E, W), hidden_size=H, top_k=K, dtype=dtype,
               max_tokens_per_rank=64)
    failures = []
    for mode in ("experts", "combine"):
        layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                      dispatcher=disp, experts=EXPERTS[experts](), weight_mode=mode,
                      shared_intermediate_size=SHARED_I, dtype=dtype, device=info.device)
        layer.reset_parameters(seed=SEED)
        for T in TOKENS:
            x = syn.tokens(SEED, info.rank, T, H).to(dtype).to(info.device)
            r = layer.route_tokens(x)
            y_ref, raw_ref = dense_moe_reference(
                x, r.topk_weights, r.topk_ids,
                expert_weights=lambda g: syn.expert_weights(SEED, g, H, I))
            y_ref = y_ref + layer.shared_experts.reference(x)
            errs = {"out": rel_err(layer(x), y_ref)}
            if disp.raw_unsupported_reason() is None:
                out = layer(x, return_raw=True)
                errs.update(raw=rel_err(out.raw, raw_ref), raw_out=rel_err(out.out, y_ref))
                if out.weighted_by != "combine":
                    failures.append(f"{mode} T={T}: weighted_by={out.weighted_by}")
            failures += [f"{mode} T={T} {name}: rel err {e:.2e} > {TOL[dtype]:.0e} ({dtype})"
                         for name, e in errs.items() if not e <= TOL[dtype]]
    return failures


def _run_pairs(info: WorkerInfo, pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out = {}
    for comm, experts in pairs:
        try:
            out[f"{comm}/{experts}"] = _check_pair(info, comm, experts)
        except Exception:
            out[f"{comm}/{experts}"] = [traceback.format_exc()]
    return out


_RUNS: dict[int, list[dict]] = {}  # world size -> per-rank results of all its pairs


def _results(world_size: int) -> list[dict]:
    if world_size not in _RUNS:
        pairs = [(c, x) for c in COMM for x in EXPERTS
                 if COMM[c][1] == world_size and _why_not(c, x) is None]
        if world_size == 1:
            _RUNS[1] = [_run_pairs(WorkerInfo(0, 1, DEVICE, "none"), pairs)]
        else:
            _RUNS[world_size] = launch(world_size, _run_pairs, pairs, timeout_s=120)
    return _RUNS[world_size]


@pytest.mark.parametrize("experts", EXPERTS)
@pytest.mark.parametrize("comm", COMM)
def test_epmoe_matches_float64_oracle(comm, experts):
    reason = _why_not(comm, experts)
    if reason is not None:
        pytest.skip(reason)
    for rank, res in enumerate(_results(COMM[comm][1])):
        failures = res[f"{comm}/{experts}"]
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def test_backend_registry_answers_availability():
    """The CLI's registry asks each class; the matrix covers every registered backend."""
    from rocm_moe import backends

    for b in backends.BACKENDS.values():
        reason = b.availability()
        assert reason is None or isinstance(reason, str)
        assert reason == b.load().availability()
        assert b.name in (COMM if b.kind == "comm" else EXPERTS)
