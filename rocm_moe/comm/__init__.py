"""Dispatch/combine backends: base (contract), local (W = 1); torch and mori follow."""

from rocm_moe.comm.base import CombineHandle, Dispatcher, DispatchResult, weight_and_reduce
from rocm_moe.comm.local import LocalDispatcher

__all__ = ["CombineHandle", "DispatchResult", "Dispatcher", "LocalDispatcher",
           "weight_and_reduce"]
