"""vLLM's dual-batch overlap (``--enable-dbo``, issue 28 item 2) over the plug-in, on gloo ranks.

vLLM's DBO runs each step as two micro-batches, each in its own thread inside a
``UBatchContext`` (``vllm/v1/worker/ubatching.py``, driven by ``UBatchWrapper._run_ubatches``
in ``v1/worker/gpu_ubatch_wrapper.py``); the threads hand the CPU to each other where a
prepare / finalize yields. The plug-in's prepare / finalize do vLLM's own hand-off around their
collective (``dbo_yield_and_switch_from_compute_to_comm`` / ``dbo_switch_to_compute_sync``, as
its DeepEP-HT and naive DP/EP prepare/finalize do; ``supports_dbo`` True), carry each
micro-batch's handle on its own ids (nothing on the dispatcher), and a dispatcher that holds
its batch in buffers (MORI, symm) is built with ``batches_in_flight=2``.

On the CPU, vLLM's config turns DBO off ("not supported on CPU"): the cases set the flag back
after construction, and run vLLM's real ``make_ubatch_contexts`` / ``UBatchContext`` threads
with its CUDA streams and events stubbed (``model_cases.cpu_streams``: one device queue, so the
thread hand-offs are what is tested; the stream overlap itself needs a GPU). Cases run in
test_vllm.py's launch (``model_cases.dbo_case``)."""

from __future__ import annotations

import pytest

from tests_integrations.vllm.test_vllm import kernel_results

vllm = pytest.importorskip("vllm")


@pytest.mark.parametrize("W", [2, 3])
def test_two_micro_batches_equal_one_batch_on_torch_comm(W):
    for r, res in enumerate(kernel_results(W)):
        d = res["model"]["dbo"]["torch"]
        assert d["micro_batches"] == 2, d  # read from vLLM's config at construction
        assert d["order"] == ["D0", "D1", "C0", "C1"], d  # both micro-batches in flight
        assert d["bitwise"], (r, d)  # the batch-invariant reference experts
        assert d["err"] <= 1e-5, (r, d)


def test_two_micro_batches_on_a_dispatcher_that_holds_its_batch():
    """MORI (through the fake) holds the received rows in its buffers: built with two lanes
    (one MORI op each) under DBO; with one it would refuse the second micro-batch's
    dispatch."""
    for r, res in enumerate(kernel_results(2)):
        d = res["model"]["dbo"]["mori"]
        assert (d["holds"], d["lanes"], d["ops"]) == (True, 2, 2), d
        assert d["order"] == ["D0", "D1", "C0", "C1"], d
        assert d["bitwise"], (r, d)
        assert d["err"] <= 1e-5, (r, d)


def test_two_micro_batches_on_symm_served_on_cpu_ranks():
    """symm (tests/symm_shm.py: the real backend, its buffer in shared memory, its kernels
    interpreted) holds the received rows in its buffer: two lanes of ONE symmetric buffer under
    DBO, both micro-batches in flight, the same bits as one batch."""
    for r, res in enumerate(kernel_results(2)):
        d = res["model"]["dbo"]["symm"]
        if "skipped" in d:
            pytest.skip(d["skipped"])
        assert (d["holds"], d["lanes"], d["buffers"]) == (True, 2, 1), d
        assert d["order"] == ["D0", "D1", "C0", "C1"], d
        assert d["bitwise"], (r, d)
        assert d["err"] <= 1e-5, (r, d)


def test_lanes_follow_vllms_micro_batch_count():
    from rocm_moe.integrations import vllm as rv

    assert rv._lanes("mori", 2) == dict(batches_in_flight=2)
    assert rv._lanes("symm", 2) == dict(batches_in_flight=2)
    assert rv._lanes("torch", 2) == {}  # nothing held between dispatch and combine
    assert rv._lanes("mori", 1) == {}


def test_prepare_finalize_declares_dbo_without_async():
    """supports_dbo True lets vLLM's modular kernel run the plug-in under DBO (it asserts it);
    supports_async stays False (True would also move vLLM's shared experts into the kernel)."""
    from rocm_moe.comm.local import LocalDispatcher
    from rocm_moe.integrations import vllm as rv
    from rocm_moe.placement import Placement

    pf = rv.RocmMoEPrepareAndFinalize(LocalDispatcher(Placement.contiguous(8, 1)))
    assert pf.supports_dbo() is True
    assert pf.supports_async() is False
