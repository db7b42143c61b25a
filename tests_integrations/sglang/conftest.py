"""Fixtures shared by the SGLang tests. Without a GPU, rocm_moe's Triton kernels (the symm
backend's, tests/symm_shm.py) run in Triton's interpreter, set before any kernel is defined
(spawned ranks inherit it)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_rank(monkeypatch):
    """SGLang's context for one EP rank with the plug-in loaded; a fresh dispatcher pool."""
    pytest.importorskip("sglang")
    from rocm_moe.comm import pool
    from rocm_moe.integrations import sglang as rs
    from tests_integrations.sglang import model as m

    for env in (rs.ENV_COMM, rs.ENV_EXPERTS, rs.ENV_WEIGHT_MODE):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(rs.ENV_MAX_TOKENS, str(m.CAP))
    m.publish(1, 0)
    m.load_plugin()
    pool.clear()
    yield
    pool.clear()
