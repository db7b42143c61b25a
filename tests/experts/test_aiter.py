"""AiterExperts against the reference, through a fused_moe fake that enforces AITER's contract."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, ReferenceExperts
from rocm_moe.experts.aiter import AiterExperts
from tests.conftest import rel_err
from tests.fakes import (
    ContractError,
    DeviceTensor,
    FakeFusedMoe,
    device_value,
    fake_shuffle_weight,
)

H, I = 32, 16
WEIGHT_MODE = {"weighted": "experts", "raw": "combine"}  # output form -> who weights
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _aiter(fake=None, cls=AiterExperts, **kw):
    """The adapter on the fakes of fused_moe and shuffle_weight."""
    return cls(fused_moe=fake or FakeFusedMoe(), shuffle_weight=fake_shuffle_weight, **kw)


def _inputs(R, K, E, dtype, gen, empty=0.0):
    x = torch.randn(R, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(R)]).to(torch.int32) \
        if R else torch.empty(0, K, dtype=torch.int32)
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
    aiter = _aiter(fake, mask_sentinel=sentinel)
    for mode in ("weighted", "raw"):
        ref = ReferenceExperts()(x, ids, w, w13, w2, emap, weight_mode=WEIGHT_MODE[mode])
        out = aiter(x, ids, w, w13, w2, emap, weight_mode=WEIGHT_MODE[mode])
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
        _aiter(mask_sentinel=False)(*args, weight_mode="experts")
    out = _aiter()(*args, weight_mode="experts")
    ref = ReferenceExperts()(*args, weight_mode="experts")
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
    ref = ReferenceExperts()(x, ids, w, w13, w2, emap, weight_mode="experts").out
    return _aiter(cls=cls)(x, ids, w, w13, w2, emap, weight_mode="experts").out, ref


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
    injected = _aiter()
    assert "computes in" in injected.supports(mode="raw", dtype=torch.float32,
                                              device=torch.device("cpu"))
    assert injected.supports(mode="raw", dtype=torch.bfloat16, device=torch.device("cpu")) is None


# ---- what AITER needs to reach its tuned kernels (issue 23, defects 6-8) ------------------------
class _NoMaskedSlot(AiterExperts):
    """Today's call before issue 23: the [R, K] slots only, unshuffled weights."""

    def _call(self, x, w13, w2, weights_RK, ids_RK, expert_map, num_rows=None):
        return self._fn()(x, w13, w2, weights_RK, ids_RK,
                          expert_mask=self.mask_for(expert_map, x.device))


def _tuned_case(gen, R=33, K=4, E=16, W=2, dtype=torch.bfloat16):
    """A shape tuned kernels serve (multiples of the shuffle tile): H = 64, I = 32."""
    emap = Placement.contiguous(E, W).expert_map(W - 1)
    e = emap.num_local
    x, ids, w = _inputs(R, K, E, dtype, gen)
    x = torch.randn(R, 64, generator=gen).to(dtype)
    w13 = (torch.randn(e, 64, 64, generator=gen) / 8).to(dtype)
    w2 = (torch.randn(e, 64, 32, generator=gen) / 6).to(dtype)
    return x, ids, w, w13, w2, emap


@pytest.mark.parametrize("sentinel", [True, False], ids=["sent1", "sent0"])
def test_masked_slot_appended_for_the_tuned_lookup(sentinel, gen):
    """Defect 6: AITER looks tuned configs up with topk - 1 under EP (aiter#3377)."""
    args = _tuned_case(gen)
    seen = []

    class Spy(FakeFusedMoe):
        def __call__(self, *a, **kw):
            seen.append((a[4], kw.get("expert_mask")))
            return super().__call__(*a, **kw)

    for mode in ("weighted", "raw"):
        out = _aiter(Spy(), mask_sentinel=sentinel)(*args, weight_mode=WEIGHT_MODE[mode])
        ref = ReferenceExperts()(*args, weight_mode=WEIGHT_MODE[mode])
        assert rel_err(out.out, ref.out) < 2e-2
    for ids, mask in seen:
        assert ids.shape[1] in (args[1].shape[1] + 1, 2)
        assert not bool(mask[ids[:, -1].long()].any()), "the appended slot is masked"
    with pytest.raises(ContractError, match="aiter#3377"):
        _aiter(cls=_NoMaskedSlot, mask_sentinel=sentinel)(*args, weight_mode="experts")


def test_weights_shuffled_once_per_version(gen):
    """Defect 6: tuned kernels read pre-shuffled weights; the layer's stay unshuffled."""
    x, ids, w, w13, w2, emap = _tuned_case(gen)
    calls = []

    def shuffle(t, layout):
        calls.append(tuple(t.shape))
        return fake_shuffle_weight(t, layout)

    aiter = AiterExperts(fused_moe=FakeFusedMoe(), shuffle_weight=shuffle)
    for _ in range(2):
        out = aiter(x, ids, w, w13, w2, emap, weight_mode="experts")
    assert calls == [tuple(w13.shape), tuple(w2.shape)], "cached per tensor"
    w13.mul_(0.5)  # an in-place update (a checkpoint load) bumps the version
    out = aiter(x, ids, w, w13, w2, emap, weight_mode="experts")
    assert len(calls) == 3
    ref = ReferenceExperts()(x, ids, w, w13, w2, emap, weight_mode="experts")
    assert rel_err(out.out, ref.out) < 2e-2
    assert not getattr(w13, "is_shuffled", False)
    with pytest.raises(ContractError, match="not shuffled"):
        _aiter(shuffle=False)(x, ids, w, w13, w2, emap, weight_mode="experts")


@pytest.mark.parametrize(("Hs", "Is"), [(32, 24), (64, 40), (32, 16)],
                         ids=["H32_I24", "H64_I40", "H32_I16"])
def test_shuffle_both_or_neither(Hs, Is, gen):
    """Issue 32 item 7: AITER reads both weights as shuffled when either is tagged
    (``isShuffled = w1.is_shuffled or w2.is_shuffled``, aiter/fused_moe.py ~747 at e4048607).
    Here w13 [e, 2I, H] fits the shuffle tile and w2 [e, H, I] does not (I % 32 != 0): shuffling
    w13 alone made AITER read the plain w2 as shuffled. Both or neither."""
    emap = Placement.contiguous(8, 2).expert_map(1)
    x = torch.randn(33, Hs, generator=gen).bfloat16()
    _, ids, w = _inputs(33, 2, 8, torch.bfloat16, gen)
    w13 = (torch.randn(4, 2 * Is, Hs, generator=gen) / Hs**0.5).bfloat16()
    w2 = (torch.randn(4, Hs, Is, generator=gen) / Is**0.5).bfloat16()
    calls = []

    def shuffle(t, layout):
        calls.append(tuple(t.shape))
        return fake_shuffle_weight(t, layout)

    aiter = AiterExperts(fused_moe=FakeFusedMoe(), shuffle_weight=shuffle)
    out = aiter(x, ids, w, w13, w2, emap, weight_mode="experts")
    ref = ReferenceExperts()(x, ids, w, w13, w2, emap, weight_mode="experts")
    assert rel_err(out.out, ref.out) < 2e-2
    assert calls == [], "one of the pair does not fit the tile: neither is shuffled"
    with pytest.raises(ContractError, match="either"):  # the fake reads the pair as AITER does
        FakeFusedMoe()(x, fake_shuffle_weight(w13), w2, torch.cat([w, w[:, :1] * 0], 1),
                       torch.cat([ids, ids[:, :1] * 0 + 8], 1),
                       expert_mask=aiter.mask_for(emap, x.device))
    with pytest.raises(ValueError, match="is_shuffled"):  # a caller's half-shuffled pair
        aiter(x, ids, w, fake_shuffle_weight(w13), w2, emap, weight_mode="experts")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fnuz, torch.float32])
def test_fake_shuffle_is_aiters_permutation(dtype):
    """Issue 32 item 8: AITER's shuffle_weight (aiter/ops/shuffle.py ~192 at e4048607, layout
    (16, 16)) cuts [N, K] into 16-row x 32-column tiles and inside a tile puts packs of
    P = 16 bytes / element size columns outermost, then the 16 rows, then the P columns of a
    pack: out, read in order, holds w[16 tn + n, 32 tk + P pk + j] for (tn, tk, pk, n, j).
    Checked element by element, the rows and the columns each numbered in the dtype's bits."""
    N, K = 32, 64
    P = 16 // dtype.itemsize
    order = [(16 * tn + n, 32 * tk + P * pk + j)
             for tn in range(N // 16) for tk in range(K // 32) for pk in range(32 // P)
             for n in range(16) for j in range(P)]
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
    rows = torch.arange(N)[:, None].expand(N, K)
    cols = torch.arange(K)[None, :].expand(N, K)
    got = [fake_shuffle_weight(t.to(bits)[None].contiguous().view(dtype))
           for t in (rows, cols)]
    assert all(g.is_shuffled for g in got)
    seen = list(zip(*(g.view(bits).flatten().tolist() for g in got), strict=True))
    assert seen == order


def test_fake_quant_type_is_zero_based():
    """Issue 32 item 8: AITER's QuantType comes from csrc/include/aiter_enum.h (No = 0 ...
    per_1x128 = 4); the public fused_moe takes the enum (it passes ``quant_type.value`` on to
    the custom op, FM ~545), so an int is an AttributeError there."""
    from tests.fakes import FakeQuantType

    assert FakeQuantType.No.value == 0
    assert FakeQuantType.per_1x128.value == 4
    assert FakeQuantType.per_1024x128.value == 7
    assert FakeQuantType(4) is FakeQuantType.per_1x128
    with pytest.raises(AttributeError, match="value"):
        FakeFusedMoe()(torch.zeros(1, H).half(), torch.zeros(1, 2 * I, H).half(),
                       torch.zeros(1, H, I).half(), torch.ones(1, 1), torch.zeros(1, 1).int(),
                       quant_type=0)


@pytest.mark.parametrize("mode", ["weighted", "raw"])
def test_no_rows_no_call(mode, gen):
    """Defect 7: a rank that received nothing must not call fused_moe with M = 0."""
    x, ids, w, w13, w2, emap = _tuned_case(gen, R=0)
    fake = FakeFusedMoe()
    out = _aiter(fake)(x, ids, w, w13, w2, emap, weight_mode=WEIGHT_MODE[mode])
    assert fake.calls == 0
    assert out.out.shape == ((0, 64) if mode == "weighted" else (0, 4, 64))
    with pytest.raises(ContractError, match="M = 0"):
        fake(x, w13, w2, w, ids, expert_mask=_aiter().mask_for(emap, x.device))


def test_forward_padded_reads_no_count_on_the_host(gen):
    """Defect 8: AITER's num_local_tokens keeps MORI's row count on the device."""
    x, ids, w, w13, w2, emap = _tuned_case(gen, R=40)
    stale = ids.clone()
    stale[25:] = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # rows past the count: stale
    n = torch.tensor([25], dtype=torch.int32).as_subclass(DeviceTensor)
    out = _aiter().forward_padded(x, stale, w, w13, w2, emap, num_rows=n)
    ref = ReferenceExperts()(x[:25], ids[:25], w[:25], w13, w2, emap, weight_mode="experts").out
    assert rel_err(out[:25], ref) < 2e-2
    assert not out[25:].any(), "rows past the count are not computed"
    with pytest.raises(ContractError, match="host read"):
        int(n[0])
    assert int(device_value(n)[0]) == 25
    with pytest.raises(ValueError, match="mask_sentinel=True"):
        _aiter(mask_sentinel=False).forward_padded(x, ids, w, w13, w2, emap, num_rows=n)


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
        ref = ReferenceExperts()(*args, weight_mode=WEIGHT_MODE[mode]).out
        out = AiterExperts()(*args, weight_mode=WEIGHT_MODE[mode]).out
        assert rel_err(out, ref) < 2e-2
