"""Adapters between rocm_moe and other frameworks.

- ``hf``: transformers models and safetensors checkpoints (``pip install -e '.[hf]'``).

Serving-engine executors (vLLM, SGLang) are meant to live here beside it. Each adapter imports
its framework inside the functions that need it, so importing rocm_moe never requires one.
"""
