"""vLLM runs on the CPU here: its platform must be chosen before it is first imported (spawned
ranks inherit the environment)."""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
