"""Test environments for the serving-engine adapters: one uv virtual environment per framework,
each with its exact pin (the framework brings its own torch, so neither can share the main test
environment, torch 2.13 CPU).

    nox -s vllm sglang       # both (CI runs this, see README's test command)
    nox -s vllm -- -k oracle # pytest arguments after --

Each session installs ``<framework>==<pin>`` and rocm_moe (editable, with its entry points) into
``.nox/<session>`` with uv and runs ``tests_integrations/<framework>`` on the CPU. uv keeps its
download cache (``UV_CACHE_DIR``, default ``~/.cache/uv``), so a second run on the same machine
installs from disk. PyPI's torch for these pins is the CUDA build (about 3 GB of downloads per
environment: the PyTorch CPU index is not reachable from CI's machines); it runs on the CPU.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True

PINS = {"vllm": "vllm==0.33.0", "sglang": "sglang==0.5.23"}
PYTHON = "3.11"


def _session(session: nox.Session, framework: str) -> None:
    # One resolution: the pin decides torch; rocm_moe's own requirements (torch>=2.4, numpy,
    # rich) fit beside it.
    session.install(PINS[framework], "pytest>=8", "-e", ".")
    session.run("python", "-c", f"import {framework}, torch; print('{framework}', "
                f"{framework}.__version__, 'torch', torch.__version__)")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                f"tests_integrations/{framework}", *session.posargs,
                env={"VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": "."})


@nox.session(python=PYTHON)
def vllm(session: nox.Session) -> None:
    """rocm_moe as vLLM's MoE backend, against vllm==0.33.0."""
    _session(session, "vllm")


@nox.session(python=PYTHON)
def sglang(session: nox.Session) -> None:
    """rocm_moe as SGLang's MoE dispatcher and experts, against sglang==0.5.23."""
    _session(session, "sglang")
