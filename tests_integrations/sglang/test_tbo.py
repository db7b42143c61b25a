"""SGLang's two-batch overlap (``--enable-two-batch-overlap``, issue 28 item 2) over the plug-in,
on gloo ranks.

Under TBO SGLang runs each layer as staged operations (``srt/batch_overlap/operations.py``,
``execute_overlapped_operations``) with the strategies of ``operations_strategy.py``: the MoE
block's ``op_dispatch_a`` / ``op_dispatch_b`` / ``op_experts`` / ``op_combine_a`` /
``op_combine_b`` call the layer dispatcher's ``dispatch_a`` / ``dispatch_b`` / ``combine_a`` /
``combine_b`` with ``tbo_subbatch_index``, a yield to the other sub-batch between halves. The
plug-in's ``RocmMoEDispatcher`` has that staged API (the collective in the _a half, each
sub-batch's handle in its own dispatch output) and a buffer-holding dispatcher is built with
``batches_in_flight=2`` when SGLang's ``tbo_enabled`` flag is on.

The W = 2, 3 cases (``model.tbo_scenario``, in test_sglang.py's launch) run SGLang's own stage
executor and its own ``Qwen3MoeSparseMoeBlock.op_*`` methods on a 3-layer model (attention left
out: SGLang's TBO attention backend needs a GPU), prefill (delta 0) and decode (delta 2)
strategies, comm torch, MORI (the fake) and, at W = 2, symm served on CPU ranks
(tests/symm_shm.py)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.integrations import sglang as rs
from rocm_moe.placement import Placement
from tests.symm_shm import shm_available
from tests_integrations import oracle64 as o

pytest.importorskip("sglang")
from tests_integrations.sglang.test_sglang import results, topk_output


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("strategy", ["prefill", "decode"])
def test_two_sub_batches_equal_one_batch(W, strategy):
    order = {"prefill": ["D0", "D1", "C0", "C1"],  # both sub-batches in flight
             "decode": ["D0", "C0", "D1", "C1"]}[strategy]  # delta 2: one after the other
    for r, res in enumerate(results(W)):
        for comm, case in res["model"]["tbo"].items():
            c = case[strategy]
            assert c["order"] == order, (r, comm, c)
            assert c["err"] <= 1e-5, (r, comm, c)
            # the router GEMM of a sub-batch rounds differently from the whole batch's
            assert c["vs_one"] <= 1e-6, (r, comm, c)
    want = {"torch", "mori", "symm"} if W == 2 else {"torch"}
    if W == 2 and shm_available() is not None:
        want.discard("symm")  # (tests/symm_shm.py: the symm backend on CPU ranks)
    assert set(results(W)[0]["model"]["tbo"]) == want


def test_buffer_holding_dispatcher_gets_a_lane_per_sub_batch():
    for res in results(2):
        t = res["model"]["tbo"]
        assert (t["mori"]["holds"], t["mori"]["lanes"]) == (True, 2), t
        assert (t["torch"]["holds"], t["torch"]["lanes"]) == (False, 1), t
        if "symm" in t:  # two lanes of one symmetric buffer
            assert (t["symm"]["holds"], t["symm"]["lanes"], t["symm"]["buffers"]) == \
                (True, 2, 1), t


def _disp():
    from rocm_moe.comm.local import LocalDispatcher

    return rs.RocmMoEDispatcher(LocalDispatcher(Placement.contiguous(8, 1), hidden_size=64,
                                                top_k=3, dtype=torch.float32))


def test_staged_halves_interleave_and_equal_dispatch_combine():
    """The calls SGLang's operations make, two sub-batches interleaved on one rank, equal the
    oracle of each (the staged API itself; the executor runs in the W = 2, 3 cases)."""
    disp = _disp()
    w13, w2 = o.local_weights(5, tuple(range(8)), 64, 32, torch.float32)
    xs = [o.tokens(5, i, T, 8, 64, 3, torch.float32) for i, T in enumerate((1, 33))]
    for i, (x, w, ids) in enumerate(xs):
        disp.dispatch_a(hidden_states=x, topk_output=topk_output(w, ids), tbo_subbatch_index=i)
    d = [disp.dispatch_b(tbo_subbatch_index=i) for i in (0, 1)]
    for i in (0, 1):
        disp.combine_a(combine_input=rs.run_experts(disp, d[i], w13, w2), tbo_subbatch_index=i)
    for i, (x, w, ids) in enumerate(xs):
        y = disp.combine_b(tbo_subbatch_index=i)
        assert o.rel_err(y, o.oracle(5, x, w, ids, 64, 32, torch.float32)) <= 1e-5


def test_halves_out_of_order_are_refused():
    disp = _disp()
    x, w, ids = o.tokens(5, 0, 4, 8, 64, 3, torch.float32)
    with pytest.raises(ValueError, match=r"dispatch_b\(tbo_subbatch_index=1\)"):
        disp.dispatch_b(tbo_subbatch_index=1)
    disp.dispatch_a(hidden_states=x, topk_output=topk_output(w, ids), tbo_subbatch_index=0)
    with pytest.raises(ValueError, match=r"dispatch_a\(tbo_subbatch_index=0\)=called twice"):
        disp.dispatch_a(hidden_states=x, topk_output=topk_output(w, ids),
                        tbo_subbatch_index=0)
    with pytest.raises(ValueError, match=r"combine_b\(tbo_subbatch_index=0\)"):
        disp.combine_b(tbo_subbatch_index=0)
