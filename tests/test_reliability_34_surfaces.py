"""Issue 34, "beyond the list": the public surfaces added in the session before (comm.pool, the
model stack, bench model, route(fused=True), chunked batches) tried with malformed and unusual
inputs. Each test failed before its fix (a silent wrong value, an internal crash, a refusal
after work, a peer left waiting)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig
from rocm_moe.comm.local import LocalDispatcher

E, H, I, K, CAP = 8, 16, 8, 2, 8


def _disp(cap: int | None = CAP) -> LocalDispatcher:
    return LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=cap)


def _layer() -> EPMoE:
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=_disp(), dtype=torch.float32)
    layer.reset_parameters(seed=0)
    return layer


# ---- forward_routed of a batch above capacity (chunks) -----------------------------------------


@pytest.mark.parametrize("rows", [24, 16, 19], ids=["more_ids", "fewer_ids", "one_short"])
def test_routed_rows_checked_against_the_whole_batch(rows):
    """20 tokens at capacity 8 run in 3 chunks: routing for 24 or 16 tokens was refused by the
    last chunk's dispatch ("topk_ids.shape=[8, 2]: must be [4, 2]"), after two chunks had run
    and naming a chunk the caller never made; now refused first, naming T=20."""
    layer = _layer()
    x = torch.randn(20, H)
    r = layer.route_tokens(torch.randn(rows, H))
    with pytest.raises(ValueError, match=rf"^topk_weights\.shape=\[{rows}, 2\]: must be "
                       r"\[20, 2\]") as err:
        layer.forward_routed(x, r.topk_weights, r.topk_ids)
    assert "Fix: pass [T=20, K=2]" in str(err.value)


# ---- route(fused=...) ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["fused", "invariant", "validate"])
@pytest.mark.parametrize("value", ["no", 1, None], ids=["str", "int", "none"])
def test_route_flags_must_be_bools(field, value):
    """route(fused="no") was taken as True (the Triton router on GPUs; silently ignored on
    CPUs), and so were invariant="no" and validate="no"; EPMoE(fused_router=) already refused
    it."""
    from rocm_moe.routing import route

    with pytest.raises(TypeError, match=rf"^{field}={value!r}: must be a bool"):
        route(torch.randn(3, E), RouterConfig.qwen3_moe(E, K), **{field: value})
