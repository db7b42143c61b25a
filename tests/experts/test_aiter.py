"""AiterExperts against the reference, through a fused_moe fake that enforces AITER's contract."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, ReferenceExperts
from rocm_moe.experts.aiter import AiterExperts
from tests.conftest import rel_err
from tests.fakes import ContractError, FakeFusedMoe

H, I = 32, 16
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _inputs(R, K, E, dtype, gen, empty=0.0):
    x = torch.randn(R, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(R)]).to(torch.int32)
    ids[torch.rand(R, K, generator=gen) < empty] = -1
    w = torch.rand(R, K, generator=gen)
    return x, ids, w


GRID = [pytest.param(R, K, E, W, dt, s, id=f"R{R}_K{K}_E{E}_W{W}_{str(dt)[6:]}_sent{int(s)}")
        for R, K, E, W in [(1, 1, 4, 1), (33, 4, 16, 2), (511, 8, 32, 4)]
        for dt in (torch.float16, torch.bfloat16) for s in (True, False)]


@pytest.mark.parametrize(("R", "K", "E", "W", "dtype", "sentinel"), GRID)
def test_matches_reference_both_modes(R, K, E, W, dtype, sentinel, gen):
    p = Placement.contiguous(E, W)
    emap = p.expert_map(W - 1)
    e = emap.num_local
    x, ids, w = _inputs(R, K, E, dtype, gen, empty=0.2 if sentinel else 0.0)
    w13 = (torch.randn(e, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    w2 = (torch.randn(e, H, I, generator=gen) / I**0.5).to(dtype)
    fake = FakeFusedMoe()
    aiter = AiterExperts(mask_sentinel=sentinel, fused_moe=fake)
    for mode in ("weighted", "raw"):
        ref = ReferenceExperts()(x, ids, w, w13, w2, emap, mode=mode)
        out = aiter(x, ids, w, w13, w2, emap, mode=mode)
        assert out.weights_applied == (mode == "weighted")
        assert out.out.shape == ref.out.shape
        assert rel_err(out.out, ref.out) < TOL[dtype]
    assert fake.calls == 1 + K  # weighted: one call; raw: one call per slot
    mask = aiter.mask_for(emap, x.device)
    assert mask.numel() == E + int(sentinel)
    assert mask.nonzero().flatten().tolist() == list(p.local_experts(W - 1))


def test_empty_slots_need_the_sentinel():
    emap = Placement.contiguous(8, 2).expert_map(0)
    ids = torch.tensor([[0, -1]], dtype=torch.int32)
    args = (torch.randn(1, H).half(), ids, torch.rand(1, 2), torch.randn(4, 2 * I, H).half(),
            torch.randn(4, H, I).half(), emap)
    with pytest.raises(ValueError, match="mask_sentinel=True"):
        AiterExperts(mask_sentinel=False, fused_moe=FakeFusedMoe())(*args, mode="weighted")
    out = AiterExperts(fused_moe=FakeFusedMoe())(*args, mode="weighted")
    ref = ReferenceExperts()(*args, mode="weighted")
    assert rel_err(out.out, ref.out) < 5e-3


class _MapAsMask(AiterExperts):
    """Broken on purpose: hands vLLM's expert_map (local id or -1) to AITER as the mask."""

    def mask_for(self, expert_map, device):
        return expert_map.map_E.to(device)


class _Int64Ids(AiterExperts):
    """Broken on purpose: int64 ids (AITER would read them as int32)."""

    def _global_ids(self, ids_RK, num_experts):
        return _Int64Tensor(super()._global_ids(ids_RK, num_experts))


class _Int64Tensor(torch.Tensor):
    def to(self, *args, **kwargs):  # ignores the adapter's int32 cast, as a reinterpret would
        return torch.Tensor.to(self, torch.int64)


class _LocalIds(AiterExperts):
    """Broken on purpose: passes local ids where AITER wants global ones."""

    def _global_ids(self, ids_RK, num_experts):
        return torch.where(ids_RK >= 4, ids_RK - 4, ids_RK)  # rank 1 of E=8, W=2


def _broken_case(cls):
    emap = Placement.contiguous(8, 2).expert_map(1)
    gen = torch.Generator().manual_seed(0)
    x, ids, w = _inputs(9, 2, 8, torch.float16, gen)
    w13 = (torch.randn(4, 2 * I, H, generator=gen) / H**0.5).half()
    w2 = (torch.randn(4, H, I, generator=gen) / I**0.5).half()
    ref = ReferenceExperts()(x, ids, w, w13, w2, emap, mode="weighted").out
    return cls(fused_moe=FakeFusedMoe())(x, ids, w, w13, w2, emap, mode="weighted").out, ref


def test_fake_catches_map_as_mask():
    with pytest.raises(ContractError, match=r"expert_map .* was passed as the mask"):
        _broken_case(_MapAsMask)


def test_fake_catches_int64_ids():
    with pytest.raises(ContractError, match="int32"):
        _broken_case(_Int64Ids)


def test_local_ids_give_wrong_results():
    out, ref = _broken_case(_LocalIds)
    assert rel_err(out, ref) > 0.1


def test_supports_reasons():
    real = AiterExperts()
    reason = real.supports(mode="weighted", dtype=torch.bfloat16, device=torch.device("cpu"))
    try:
        import aiter  # noqa: F401
    except ImportError:
        assert "aiter is not installed" in reason
    injected = AiterExperts(fused_moe=FakeFusedMoe())
    assert "computes in" in injected.supports(mode="raw", dtype=torch.float32,
                                              device=torch.device("cpu"))
    assert injected.supports(mode="raw", dtype=torch.bfloat16, device=torch.device("cpu")) is None


@pytest.mark.gpu
def test_real_aiter_matches_reference():
    pytest.importorskip("aiter")
    if not torch.cuda.is_available() or torch.version.hip is None:
        pytest.skip("needs a ROCm GPU")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    p = Placement.contiguous(32, 4)
    emap = p.expert_map(2)
    x, ids, w = _inputs(511, 8, 32, torch.bfloat16, gen)
    w13 = (torch.randn(8, 2 * 128, 256, generator=gen) / 16).bfloat16()
    w2 = (torch.randn(8, 256, 128, generator=gen) / 11).bfloat16()
    x = torch.randn(511, 256, generator=gen).bfloat16()
    args = [t.to(dev) for t in (x, ids, w, w13, w2)] + [emap.to(dev)]
    for mode in ("weighted", "raw"):
        ref = ReferenceExperts()(*args, mode=mode).out
        out = AiterExperts()(*args, mode=mode).out
        assert rel_err(out, ref) < 2e-2
