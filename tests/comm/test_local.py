"""The dispatcher contract on the world-size-1 backend: handles, weighting, bad input."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import ExpertsOutput, LocalDispatcher, Placement

H = 8


def _disp(cap=None):
    return LocalDispatcher(Placement.contiguous(4, 1), max_tokens_per_rank=cap)


def _batch(T=5, K=2):
    ids = torch.stack([torch.randperm(4)[:K] for _ in range(T)])
    return torch.randn(T, H), torch.rand(T, K), ids


def test_round_trip_weighted_and_raw():
    d = _disp()
    x, w, ids = _batch()
    res = d.dispatch(x, w, ids)
    assert res.topk_ids.dtype == torch.int32
    assert res.num_received == 5
    assert torch.equal(res.handle.topk_ids, ids.to(torch.int32))
    y = d.combine(ExpertsOutput(out=res.x, weights_applied=True), res.handle)
    assert torch.equal(y, x)  # one destination rank: combine(dispatch(x)) == x * U, U = 1
    raw = res.x[:, None, :].expand(5, 2, H).contiguous()
    y_raw = d.combine(ExpertsOutput(out=raw, weights_applied=False), res.handle)
    torch.testing.assert_close(y_raw, x * w.sum(1, keepdim=True))
    back = d.combine_raw(ExpertsOutput(out=raw, weights_applied=False), res.handle)
    assert torch.equal(back, raw)


def test_handle_of_other_batch_or_dispatcher_rejected():
    d, other = _disp(), _disp()
    x, w, ids = _batch(5)
    r5 = d.dispatch(x, w, ids)
    r3 = d.dispatch(*(_batch(3)))
    with pytest.raises(ValueError, match=r"R=3.*another batch.*mori#475"):
        d.combine(ExpertsOutput(out=r5.x, weights_applied=True), r3.handle)
    with pytest.raises(ValueError, match="handle returned by this dispatcher"):
        other.combine(ExpertsOutput(out=r5.x, weights_applied=True), r5.handle)
    with pytest.raises(TypeError, match="must be an ExpertsOutput"):
        d.combine(r5.x, r5.handle)
    with pytest.raises(ValueError, match="combine_raw needs raw"):
        d.combine_raw(ExpertsOutput(out=r5.x, weights_applied=True), r5.handle)
    with pytest.raises(TypeError, match="dispatched dtype"):
        d.combine(ExpertsOutput(out=r5.x.double(), weights_applied=True), r5.handle)


BAD = [
    (dict(x=torch.randn(5, H, 1)), ValueError, r"x.shape"),
    (dict(x=torch.randint(0, 2, (5, H))), TypeError, r"x.dtype"),
    (dict(ids=torch.zeros(4, 2, dtype=torch.int64)), ValueError, r"topk_ids.shape.*\[5, \*\]"),
    (dict(ids=torch.zeros(5, 2)), TypeError, "integer dtype"),
    (dict(ids=torch.tensor([[0, 4]] * 5)), ValueError, r"contains 4.*\[0, 4\)"),
    (dict(ids=torch.tensor([[0, 2**33]] * 5)), ValueError, "contains 8589934592"),
    (dict(ids=torch.tensor([[0, -2]] * 5)), ValueError, "contains -2"),
    (dict(ids=torch.tensor([[1, 1]] * 5)), ValueError, "at most once"),
    (dict(w=torch.rand(5, 3)), ValueError, r"topk_weights.shape"),
    (dict(w=torch.rand(5, 2, dtype=torch.bfloat16)), TypeError, r"topk_weights.dtype"),
    (dict(w=torch.tensor([[0.5, float("nan")]] * 5)), ValueError, "finite"),
    (dict(w=torch.tensor([[0.5, float("inf")]] * 5)), ValueError, "finite"),
    (dict(w=torch.tensor([[0.5, -1.0]] * 5)), ValueError, ">= 0"),
]


@pytest.mark.parametrize(("change", "exc", "match"), BAD,
                         ids=["x_3d", "x_int", "ids_rows", "ids_float", "ids_E", "ids_huge",
                              "ids_neg", "ids_dup", "w_shape", "w_bf16", "w_nan", "w_inf",
                              "w_neg"])
def test_bad_input(change, exc, match):
    args = dict(x=torch.randn(5, H), w=torch.rand(5, 2), ids=torch.tensor([[0, 1]] * 5))
    args.update(change)
    with pytest.raises(exc, match=match):
        _disp().dispatch(args["x"], args["w"], args["ids"])


def test_capacity_and_minus_one_slots():
    d = _disp(cap=4)
    with pytest.raises(ValueError, match=r"x.shape\[0\]=5.*max_tokens_per_rank=4.*mori#356"):
        d.dispatch(*_batch(5))
    res = d.dispatch(torch.randn(2, H), torch.rand(2, 2), torch.tensor([[-1, 2], [-1, -1]]))
    assert res.topk_ids.tolist() == [[-1, 2], [-1, -1]]
    with pytest.raises(ValueError, match="world_size"):
        LocalDispatcher(Placement.contiguous(4, 2))


@pytest.mark.parametrize(("kw", "exc", "match"), [
    (dict(hidden_size=-4), ValueError, r"hidden_size=-4: must be >= 1"),
    (dict(hidden_size=16.5), TypeError, r"hidden_size=16.5: must be an int"),
    (dict(top_k=0), ValueError, r"top_k=0: must be >= 1"),
    (dict(top_k=True), TypeError, r"top_k=True: must be an int"),
    (dict(dtype="bfloat16"), TypeError, r"dtype='bfloat16': must be a floating torch.dtype"),
    (dict(dtype=torch.int32), TypeError, r"dtype=torch.int32: must be a floating"),
    (dict(max_tokens_per_rank=2.5), TypeError, r"max_tokens_per_rank=2.5: must be an int"),
    (dict(max_tokens_per_rank=0), ValueError, r"max_tokens_per_rank=0: must be >= 1"),
])
def test_shape_arguments_checked(kw, exc, match):
    """Every dispatcher's shape arguments (``comm.base.check_dispatcher_args``): a wrong one is
    named when the dispatcher is built, not an AttributeError in a later batch."""
    with pytest.raises(exc, match=match):
        LocalDispatcher(Placement.contiguous(8, 1), **kw)
