"""Moved to ``rocm_moe.experts.layout`` (only the expert backends use it); kept importable."""

from rocm_moe.experts.layout import RoutingLayout, build_layout, max_padded_slots

__all__ = ["RoutingLayout", "build_layout", "max_padded_slots"]
