"""ReferenceExperts against the dense float64 oracle, restricted to one rank's experts."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, ReferenceExperts, dense_moe_reference
from tests.conftest import TOL, rel_err

H, I = 32, 16
GRID = [pytest.param(R, K, E, W, dt, id=f"R{R}_K{K}_E{E}_W{W}_{str(dt)[6:]}")
        for R, K, E, W in [(1, 1, 4, 1), (33, 4, 16, 2), (511, 8, 32, 4)]
        for dt in (torch.float64, torch.float32, torch.bfloat16)]


def _inputs(R, K, E, dtype, gen):
    x = torch.randn(R, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(R)]).to(torch.int32)
    w = torch.rand(R, K, generator=gen)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    return x, ids, w, w13, w2


@pytest.mark.parametrize(("R", "K", "E", "W", "dtype"), GRID)
def test_local_slots_match_oracle(R, K, E, W, dtype, gen):
    x, ids, w, w13, w2 = _inputs(R, K, E, dtype, gen)
    rank = W - 1
    emap = Placement.contiguous(E, W).expert_map(rank)
    local = list(Placement.contiguous(E, W).local_experts(rank))
    _, raw_ref = dense_moe_reference(x, w, ids, w13, w2)
    is_local = emap.local_ids(ids) >= 0
    raw_ref = raw_ref * is_local[..., None]
    weighted_ref = (raw_ref * w.double()[..., None]).sum(1)

    exp = ReferenceExperts()
    out = exp(x, ids, w, w13[local], w2[local], emap, weight_mode="experts")
    assert out.weights_applied
    assert out.out.shape == (R, H)
    assert out.out.dtype == dtype
    assert rel_err(out.out, weighted_ref) < TOL[dtype]
    raw = exp(x, ids, w, w13[local], w2[local], emap, weight_mode="combine")
    assert not raw.weights_applied
    assert raw.out.shape == (R, K, H)
    assert rel_err(raw.out, raw_ref) < TOL[dtype]
    assert raw.out[~is_local].eq(0).all()  # non-local slots are exact zeros


def test_rows_with_no_local_slot_are_zero_and_zero_rows_ok():
    emap = Placement.contiguous(8, 2).expert_map(0)
    x = torch.randn(3, H)
    w13, w2 = torch.randn(4, 2 * I, H), torch.randn(4, H, I)
    ids = torch.tensor([[4, 5], [6, -1], [-1, -1]], dtype=torch.int32)
    out = ReferenceExperts()(x, ids, torch.rand(3, 2), w13, w2, emap, weight_mode="experts")
    assert out.out.eq(0).all()
    empty = ReferenceExperts()(x[:0], ids[:0], torch.rand(0, 2), w13, w2, emap,
                               weight_mode="combine")
    assert empty.out.shape == (0, 2, H)


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (dict(ids=torch.zeros(3, 2, dtype=torch.int64)), TypeError, r"topk_ids.dtype.*int32"),
        (dict(w=torch.rand(3, 2, dtype=torch.float64)), TypeError, r"topk_weights.dtype"),
        (dict(w13=torch.randn(3, 2 * I, H)), ValueError, r"w13.shape.*\[4, \*, 32\]"),
        (dict(w2=torch.randn(4, H, I + 1)), ValueError, r"w2.shape"),
        (dict(ids=torch.tensor([[0, 8]] * 3, dtype=torch.int32)), ValueError, r"contains 8"),
        (dict(w=torch.tensor([[0.5, float("nan")]] * 3)), ValueError, "must be finite"),
        (dict(w=torch.tensor([[0.5, -0.1]] * 3)), ValueError, ">= 0"),
        (dict(emap="mask"), TypeError, "ExpertMask is AITER"),
        (dict(mode="sum"), ValueError, "weight_mode='sum'"),
        (dict(x=torch.randn(3, H, dtype=torch.float64)), TypeError, r"w13.dtype"),
        (dict(ids=torch.tensor([[1, 1]] * 3, dtype=torch.int32)), ValueError,
         r"topk_ids\[0\]=\[1, 1\]: an expert may appear at most once"),
    ],
    ids=["ids_int64", "w_f64", "w13_shape", "w2_shape", "id_range", "nan", "negative", "mask",
         "mode", "dtype_mismatch", "duplicate_in_row"],
)
def test_bad_input(change, exc, match):
    p = Placement.contiguous(8, 2)
    args = dict(x=torch.randn(3, H), ids=torch.zeros(3, 2, dtype=torch.int32) + torch.tensor(
        [0, 1], dtype=torch.int32), w=torch.rand(3, 2), w13=torch.randn(4, 2 * I, H),
        w2=torch.randn(4, H, I), emap=p.expert_map(0), mode="combine")
    args.update(change)
    if args["emap"] == "mask":
        args["emap"] = p.expert_mask(0, sentinel=True)
    with pytest.raises(exc, match=match):
        ReferenceExperts()(args["x"], args["ids"], args["w"], args["w13"], args["w2"],
                           args["emap"], weight_mode=args["mode"])


def test_mode_flags_are_bools():
    """A truthy string must not switch a mode on (``invariant="no"`` ran the invariant path)."""
    from rocm_moe.experts.triton import TritonExperts
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts

    for make, match in ((lambda: ReferenceExperts(invariant="no"), "invariant='no'"),
                        (lambda: TritonExperts(invariant=1), "invariant=1"),
                        (lambda: TritonExperts(tma="yes"), "tma='yes': must be True, False or"),
                        (lambda: TritonFP8Experts(precise="no"), "precise='no': must be a bool"),
                        (lambda: TritonFP8Experts(upcast=0), "upcast=0: must be True, False")):
        with pytest.raises(TypeError, match=match):
            make()


@pytest.mark.parametrize(("config", "match"), [
    ("fast", r"config='fast': must be a dict"),
    ({"BLOCK_M": 16}, r"config\['gate_up'\]=None: must be a dict"),
    ({"BLOCK_M": 24, "gate_up": {"BLOCK_N": 32, "BLOCK_K": 64},
      "down": {"BLOCK_N": 32, "BLOCK_K": 64}}, r"config\['BLOCK_M'\]=24: must be a power of two"),
    ({"BLOCK_M": 16, "persistant": True, "gate_up": {}, "down": {}},
     r"config\['persistant'\]=True: is not a key"),
    ({"BLOCK_M": 16, "gate_up": {"BLOCK_N": 32, "BLOCK_K": 64, "num_warp": 4},
      "down": {"BLOCK_N": 32, "BLOCK_K": 64}}, r"config\['gate_up'\]\['num_warp'\]=4: is not"),
    ({"BLOCK_M": 16, "gate_up": {"BLOCK_N": 32, "BLOCK_K": 64},
      "down": {"BLOCK_N": 32, "BLOCK_K": 64, "num_stages": 0}}, r"\['num_stages'\]=0"),
])
def test_triton_config_checked_when_built(config, match):
    from rocm_moe.experts.triton import TritonExperts, block_config

    with pytest.raises(ValueError, match=match):
        TritonExperts(config=config)
    assert TritonExperts(config=block_config(8, 128)).config["BLOCK_M"] == 16
