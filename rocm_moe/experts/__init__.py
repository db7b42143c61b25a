"""Expert backends: base (contract), reference (torch); triton and aiter follow."""

from rocm_moe.experts.base import Experts, ExpertsOutput, swiglu_expert
from rocm_moe.experts.reference import ReferenceExperts, dense_moe_reference

__all__ = ["Experts", "ExpertsOutput", "ReferenceExperts", "dense_moe_reference",
           "swiglu_expert"]
