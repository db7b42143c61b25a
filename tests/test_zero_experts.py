"""Zero-computation experts (LongCat-Flash) with ``return_raw`` and the sanity suite: a zero
slot's raw output is the token itself, the router's own ids and weights come back, and
``run_sanity`` probes the routed experts only (the block is tests/test_families_longcat.py's)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import rel_err

pytest.importorskip("transformers")

from tests.test_families_longcat import E_R, K, _layer, _tokens, _with_config


def test_return_raw_gives_the_token_as_a_zero_experts_raw_output():
    """return_raw with zero experts: a zero slot's raw output is the token, the router's own
    ids / weights come back, out = forward's output = sum_k w_k raw_k."""
    block, u = _with_config(3)
    layer = _layer(block)
    x = _tokens(33, u)
    with torch.no_grad():
        y = layer(x)
        r = layer(x, return_raw=True)
        *_, ids_ref = block.router(x)
    assert torch.equal(r.out, y)
    assert torch.equal(r.topk_ids.long().sort(1).values, ids_ref.long().sort(1).values)
    zero = r.topk_ids >= E_R
    assert zero.any()
    assert (~zero).any()
    assert torch.equal(r.raw[zero], x[:, None, :].expand(-1, K, -1)[zero])
    assert r.weighted_by == "combine"
    summed = (r.topk_weights[..., None].double() * r.raw.double()).sum(1)
    assert rel_err(summed, y) <= 1e-6


def test_sanity_suite_runs_on_the_routed_experts():
    from rocm_moe.sanity import run_sanity

    block, _ = _with_config(2)
    rows = run_sanity(_layer(block))
    ran = [r for r in rows if r.skipped is None]
    assert any(r.check == "single_expert" and r.cases == E_R for r in ran)
    assert all(r.max_rel_err <= r.tolerance for r in ran), rows
