"""rocm_moe: expert-parallel Mixture-of-Experts, with routing weights applied exactly once.

Shape legend, used in names (``x_TH``, ``topk_ids_TK``) and docstrings throughout:

    T  tokens on this rank            H  hidden size
    B  batch, S  sequence (T = B*S)   I  intermediate size of one expert
    E  global (routed) experts        e  experts local to this rank
    K  experts per token (top-k)      R  rows received by this rank after dispatch
    W  world size (EP ranks)          P  padded slot count of a block-aligned layout

Ids are global expert ids in [0, E) unless named local; -1 marks an empty slot.
"""

from rocm_moe.comm import CombineHandle, Dispatcher, DispatchResult, LocalDispatcher
from rocm_moe.experts import Experts, ExpertsOutput, ReferenceExperts, dense_moe_reference
from rocm_moe.experts.layout import RoutingLayout, build_layout
from rocm_moe.layer import EPMoE, MoEOutput, SharedExperts, Trace
from rocm_moe.placement import ExpertMap, ExpertMask, Placement
from rocm_moe.replicas import ReplicatedPlacement
from rocm_moe.routing import RouterConfig, RoutingResult, route

__version__ = "0.1.0"

__all__ = [
    "CombineHandle", "DispatchResult", "Dispatcher", "EPMoE", "ExpertMap", "ExpertMask",
    "Experts", "ExpertsOutput", "LocalDispatcher", "MoEOutput", "Placement",
    "ReferenceExperts", "ReplicatedPlacement", "RouterConfig", "RoutingLayout",
    "RoutingResult", "SharedExperts", "Trace", "build_layout", "dense_moe_reference", "route",
]
