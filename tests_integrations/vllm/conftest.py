"""vLLM runs on the CPU here: its platform must be chosen before it is first imported (spawned
ranks inherit the environment). Without a GPU, rocm_moe's Triton kernels (the symm backend's,
tests/symm_shm.py) run in Triton's interpreter, set before any kernel is defined."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
