"""Fixtures shared by the SGLang tests."""

import pytest


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
