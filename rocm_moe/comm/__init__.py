"""Dispatch/combine backends: base (contract), local (W = 1); torch and mori follow."""

from rocm_moe.comm.base import CombineHandle, Dispatcher, DispatchResult
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.weighting import weight_and_reduce  # deprecated: rocm_moe.weighting.weight_once

__all__ = ["CombineHandle", "DispatchResult", "Dispatcher", "LocalDispatcher",
           "weight_and_reduce"]
