"""Exactly-once weighting: the one place that applies routing weights to routed outputs.

Comm and experts backends are siblings that both import this module (neither imports the
other). An expert stage returns an ``ExpertsOutput`` that declares whether the weights are
already applied; every stage after it turns that into weighted [R, H] partials with
``weight_once``, which returns weighted outputs as they are and weights raw ones once:

    weight_mode="experts":  experts -> ExpertsOutput([R, H], weights_applied=True)
                            weight_once -> the same [R, H] (nothing applied again)
    weight_mode="combine":  experts -> ExpertsOutput([R, K, H], weights_applied=False)
                            weight_once -> sum_k w[r, k] * out[r, k] over the local slots

A backend may fuse the multiplication into its kernels (AITER's fused_moe, the Triton
experts' epilogue) only in weight_mode="experts", where its output says so.

Weights on the input (Llama 4, ``ExpertVariant.weights_on_input``): slot k of row r computes
expert(w[r, k] * x[r]) (``weight_inputs``, the one multiplication) and the slots are only
summed. Weighted [R, H] outputs say so as above; raw [R, K, H] ones carry
``weighted_inputs=True``, and ``weight_once`` then sums them with weight 1 (every combine path,
the owner's sum after ``combine_raw`` too), so no stage weights them a second time.

Worked example (a test asserts it): raw [1, 2, 1] = [[[2.], [3.]]], weights [[0.5, 0.25]],
ids [[0, 1]] on a rank owning expert 0 only -> [[1.]] (slot 1 belongs to another rank).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from rocm_moe._checks import check_integer, check_tensor, error_message
from rocm_moe._libs import library_version
from rocm_moe.placement import ExpertMap

WeightMode = Literal["experts", "combine"]  # who applies the routing weights
WEIGHT_MODES: tuple[WeightMode, ...] = ("experts", "combine")
# The experts' former vocabulary (``mode=``), which said what the experts return.
_OLD_MODES: dict[str, WeightMode] = {"weighted": "experts", "raw": "combine"}


@dataclass(frozen=True, kw_only=True, eq=False)
class ExpertsOutput:
    """An expert stage's result, declaring whether the routing weights are already applied."""

    out: torch.Tensor  # [R, H] when weights_applied, else [R, K, H]
    weights_applied: bool
    weighted_inputs: bool = False  # raw slots of routing-weighted inputs: summed, not weighted

    def __post_init__(self) -> None:
        if not isinstance(self.weights_applied, bool):  # "no" or 0 would be truthy / ambiguous
            raise TypeError(error_message(
                "ExpertsOutput.weights_applied", repr(self.weights_applied), "must be a bool",
                "pass True (the experts applied the routing weights) or False"))
        if not isinstance(self.weighted_inputs, bool):
            raise TypeError(error_message(
                "ExpertsOutput.weighted_inputs", repr(self.weighted_inputs), "must be a bool",
                "pass True (raw slots of routing-weighted inputs) or False"))
        if self.weighted_inputs and self.weights_applied:
            raise ValueError(error_message(
                "ExpertsOutput.weighted_inputs", True, "describes raw [R, K, H] slots "
                "(weights_applied=False); weighted [R, H] sums need no flag",
                "pass weights_applied=False with the raw slots, or weighted_inputs=False"))
        if not isinstance(self.out, torch.Tensor):
            raise TypeError(error_message("ExpertsOutput.out", type(self.out).__name__,
                                          "must be a torch.Tensor", "pass the experts' output"))
        want = 2 if self.weights_applied else 3
        if self.out.dim() != want:
            shape = "[R, H] (weighted)" if self.weights_applied else "[R, K, H] (raw)"
            raise ValueError(error_message(
                "ExpertsOutput.out.shape", list(self.out.shape), f"must be {shape}",
                "return [R, H] with weights_applied=True or [R, K, H] with False"))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of routed outputs run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_slots(topk_ids_RK: torch.Tensor, expert_map: ExpertMap | None) -> torch.Tensor:
    """[R, K] bool: slot k of row r is computed on this rank (its expert is in
    ``expert_map``); with ``expert_map=None``, every valid slot (id >= 0, on the owner of all
    the slots' results, after ``combine_raw``)."""
    if expert_map is None:
        return topk_ids_RK >= 0
    return expert_map.local_ids(topk_ids_RK) >= 0


def weight_once(
    expert_output: ExpertsOutput,
    topk_weights_RK: torch.Tensor,
    topk_ids_RK: torch.Tensor,
    expert_map: ExpertMap | None,
) -> torch.Tensor:
    """[R, H] partials of ``expert_output`` with the routing weights applied exactly once.

    Weighted outputs are returned as they are. Raw [R, K, H] outputs become
    sum_k w[r, k] * out[r, k] over the slots ``local_slots(topk_ids_RK, expert_map)`` selects,
    accumulated in ``accumulation_dtype`` in a fixed slot order and cast back to the output's
    dtype (``weighted_inputs``: with w = 1, the weights being in the slots' inputs already).
    Whatever a backend left in an unselected slot is never read.
    """
    if not isinstance(expert_output, ExpertsOutput):
        raise TypeError(error_message(
            "expert_output", type(expert_output).__name__, "must be an ExpertsOutput that "
            "declares whether the routing weights are applied",
            "wrap it: ExpertsOutput(out=y, weights_applied=False)"))
    _check_slots(expert_output, topk_weights_RK, topk_ids_RK)
    if expert_output.weights_applied:
        return expert_output.out
    if expert_output.weighted_inputs:  # the weights multiplied the inputs: sum only
        topk_weights_RK = torch.ones_like(topk_weights_RK)
    return _weighted_sum(expert_output.out, topk_weights_RK,
                         local_slots(topk_ids_RK, expert_map))


def _check_slots(expert_output: ExpertsOutput, topk_weights_RK, topk_ids_RK) -> None:
    """Weights and ids are [R, K] tensors of one shape, and a raw output's [R, K] leads with it
    (an extra id slot would be silently ignored, a [R, 1] weight broadcast or an IndexError)."""
    for field, t in (("topk_weights", topk_weights_RK), ("topk_ids", topk_ids_RK)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(error_message(
                f"{field}.shape", list(t.shape) if isinstance(t, torch.Tensor) else repr(t),
                "must be a 2-D [R, K] tensor", "pass the dispatched rows' weights and ids"))
    check_integer("topk_ids", topk_ids_RK)
    check_tensor("topk_weights", topk_weights_RK, dtypes=(torch.float32,),
                 fix="pass the router's float32 weights")
    want = tuple(topk_ids_RK.shape)
    if not expert_output.weights_applied:
        want = tuple(expert_output.out.shape[:2])
        if tuple(topk_ids_RK.shape) != want:
            raise ValueError(error_message(
                "topk_ids.shape", list(topk_ids_RK.shape), f"must be the raw output's [R, K] = "
                f"{list(want)}", "pass the ids of the rows and slots the experts computed"))
    if tuple(topk_weights_RK.shape) != want:
        raise ValueError(error_message(
            "topk_weights.shape", list(topk_weights_RK.shape), f"must be the ids' [R, K] = "
            f"{list(want)}", "pass one weight per slot (no broadcasting)"))


def _weighted_sum(raw_RKH: torch.Tensor, topk_weights_RK: torch.Tensor,
                  local_RK: torch.Tensor) -> torch.Tensor:
    """[R, H]: sum over k (in order) of w[r, k] * raw[r, k] where ``local_RK``, accumulated in
    ``accumulation_dtype``. One Triton kernel on GPUs (``rocm_moe._weighting_triton``), K torch
    passes elsewhere."""
    R, K, H = raw_RKH.shape
    if raw_RKH.is_cuda and raw_RKH.dtype != torch.float64 and library_version("triton") \
            and raw_RKH.stride(2) == 1 and R:
        from rocm_moe._weighting_triton import weighted_slot_sum_kernel

        out = raw_RKH.new_empty(R, H)
        weighted_slot_sum_kernel[(R, -(-H // 1024))](
            raw_RKH, raw_RKH.stride(0), raw_RKH.stride(1), topk_weights_RK.float().contiguous(),
            local_RK.to(torch.int8).contiguous(), out, H, K_TOPK=K, BLOCK_H=1024)
        return out
    acc = accumulation_dtype(raw_RKH.dtype)
    w_RK = topk_weights_RK.to(acc)
    out = raw_RKH.new_zeros(R, H, dtype=acc)
    zero = out.new_zeros(())
    for k in range(K):
        # where(), not a zero weight: whatever a backend left in a non-local slot is never read.
        out += torch.where(local_RK[:, k, None], raw_RKH[:, k].to(acc) * w_RK[:, k, None], zero)
    return out.to(raw_RKH.dtype)


def weight_inputs(x_NH: torch.Tensor, topk_weights_N: torch.Tensor) -> torch.Tensor:
    """[N, H] inputs of N (row, slot) pairs scaled by their routing weights (weights on the
    input), in x's dtype: the only multiplication of those weights for such experts."""
    return (x_NH * topk_weights_N.to(x_NH.dtype)[:, None])


def weight_and_reduce(
    raw_RKH: torch.Tensor, topk_weights_RK: torch.Tensor, local_RK: torch.Tensor
) -> torch.Tensor:
    """Deprecated: ``weight_once(ExpertsOutput(out=raw, weights_applied=False), w, ids,
    expert_map)`` computes the same [R, H] from the ids instead of a hand-made mask."""
    warnings.warn("rocm_moe.comm.weight_and_reduce is deprecated; use "
                  "rocm_moe.weighting.weight_once", DeprecationWarning, stacklevel=2)
    return _weighted_sum(raw_RKH, topk_weights_RK, local_RK)


def resolve_weight_mode(
    weight_mode: str | None, old_mode: str | None = None, *, field: str = "weight_mode"
) -> WeightMode:
    """The weight mode of a call that may still use the experts' old ``mode=`` keyword
    ("weighted" = "experts", "raw" = "combine"; deprecated, warns)."""
    if old_mode is not None:
        if weight_mode is not None:
            raise TypeError(error_message("mode", repr(old_mode), "cannot be passed together "
                                          f"with weight_mode={weight_mode!r}",
                                          "pass weight_mode only"))
        if old_mode not in _OLD_MODES:
            raise ValueError(error_message("mode", repr(old_mode), "must be 'weighted' or 'raw'",
                                           "pass weight_mode='experts' or 'combine' instead"))
        weight_mode = _OLD_MODES[old_mode]
        warnings.warn(f"mode={old_mode!r} is deprecated; use weight_mode={weight_mode!r} "
                      "(who applies the routing weights)", DeprecationWarning, stacklevel=3)
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(error_message(field, repr(weight_mode),
                                       "must be 'experts' or 'combine'", "pick one"))
    return weight_mode
