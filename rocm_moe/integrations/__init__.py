"""Adapters between rocm_moe and other frameworks.

- ``hf``: transformers models and safetensors checkpoints (``pip install -e '.[hf]'``).
- ``vllm``: rocm_moe as vLLM's MoE kernel (``[vllm]``, plug-in behind ``ROCM_MOE_VLLM=1``).
- ``sglang``: rocm_moe as SGLang's MoE dispatcher and experts (``[sglang]``, plug-in behind
  ``ROCM_MOE_SGLANG=1``).

Each adapter imports its framework inside the functions that need it, so importing rocm_moe
never requires one.
"""
