"""Benchmarks runnable as `rocm-moe bench NAME` (scripts in bench/ call the same code)."""
