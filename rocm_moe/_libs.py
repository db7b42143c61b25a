"""Whether an optional library imports here, probed once per process."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os


@functools.cache
def library_version(name: str) -> str | None:
    """Installed version of a library, or None if it cannot be imported."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        mod = importlib.import_module(name)
    except Exception:  # a broken install is reported as not importable
        return None
    return str(getattr(mod, "__version__", "installed"))


def triton_missing() -> str | None:
    """Why Triton kernels cannot run in this process (triton not installed), or None."""
    if library_version("triton") is None:
        return "triton is not installed (pip install 'rocm_moe[triton]')"
    return None


def triton_runs_on(device) -> bool:
    """Triton kernels can run on tensors of ``device``: a GPU with triton installed, or any
    device under Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run them on CPUs)."""
    if library_version("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def rocm_library_missing(name: str, install: str) -> str | None:
    """Why the ROCm-only library ``name`` cannot be used here (not installed, or this torch is
    not a ROCm build), or None. Probed with find_spec, without importing it."""
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed ({install})"
    import torch

    if torch.version.hip is None:
        return "this torch is not a ROCm build"
    return None


def import_engine(module: str, label: str, version: str):
    """The serving engine ``module`` (vllm, sglang) for ``rocm_moe.integrations.<module>``, or
    an ImportError saying how to install the release the adapter is checked against."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"rocm_moe.integrations.{module} needs {label}: pip install "
                          f"'rocm_moe[{module}]' (checked against {module}=={version})") from exc
