"""A dispatcher that reads the host refuses a dispatch under CUDA-graph capture before anything
is captured, naming the backend, the rule and the fix (engines capture their decode graphs at
start-up: without this the torch backend, or MORI without capacity_sized, died on a raw CUDA
error); graph-safe ones (local, MORI capacity_sized) go on. Capture is simulated on CPU ranks
(torch.cuda's two queries patched): no GPU here."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.comm.mori import MoriDispatcher
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch
from tests.fakes import FakeMori

E, H, K = 8, 64, 2


def _capturing(on: bool):
    torch.cuda.is_available = lambda: on
    torch.cuda.is_current_stream_capturing = lambda: on


def _try(d) -> str:
    x = torch.randn(3, H)
    ids = torch.tensor([[0, 5], [1, 2], [7, -1]], dtype=torch.int32)
    w = torch.rand(3, K)
    try:
        d.dispatch(x, w, ids)
    except ValueError as e:
        return str(e)
    return "ran"


def _worker(info) -> dict:
    p = Placement.contiguous(E, info.world_size)
    kw = dict(hidden_size=H, top_k=K, dtype=torch.float32, max_tokens_per_rank=8)
    disps = {"torch": TorchDispatcher(p, **kw),
             "mori": MoriDispatcher(p, mori=FakeMori(), **kw),
             "mori-capacity": MoriDispatcher(p, mori=FakeMori(), capacity_sized=True, **kw)}
    out = {}
    saved = torch.cuda.is_available, torch.cuda.is_current_stream_capturing
    try:
        _capturing(True)
        for name, d in disps.items():
            out[name] = d.capture_unsupported_reason(), _try(d)
    finally:
        torch.cuda.is_available, torch.cuda.is_current_stream_capturing = saved
    out["torch-eager"] = _try(disps["torch"])  # the refusal left nothing behind
    return out


@pytest.fixture(scope="module")
def results():
    return launch(2, _worker, backend="gloo", timeout_s=120)


def test_host_reading_backends_refuse_under_capture(results):
    for r in results:
        for name in ("torch", "mori"):
            why, msg = r[name]
            assert why, name
            assert msg != "ran", name
            assert f"comm={name}" in msg
            assert "CUDA-graph capture" in msg
            assert "symm" in msg
            assert "--enforce-eager" in msg
            assert "--disable-cuda-graph" in msg
        assert "host" in r["torch"][0]
        assert "capacity_sized" in r["mori"][0]
        assert r["torch-eager"] == "ran"


def test_graph_safe_backends_go_on_under_capture(results, monkeypatch):
    for r in results:
        assert list(r["mori-capacity"]) == [None, "ran"]
    d = LocalDispatcher(Placement.contiguous(E, 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert d.capture_unsupported_reason() is None
    assert _try(d) == "ran"
