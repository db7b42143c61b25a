"""TritonExperts on the expert variants (biases, gpt-oss's clamped SwiGLU, the routing weight on
the input) against the float64 oracle and the reference experts, by relative error: odd sizes,
-1 slots, another rank's experts masked out, both weight modes (interpreter on CPUs in float16,
whose bfloat16 Triton 3.9 miscomputes; compiled on GPUs, bfloat16 too)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import Placement, ReferenceExperts, oracle
from rocm_moe.experts.base import PLAIN, ExpertVariant
from rocm_moe.weighting import weight_once
from tests.conftest import DEVICE

pytest.importorskip("triton")

from rocm_moe.experts.triton import TritonExperts

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
OAI = ExpertVariant.gpt_oss(limit=0.6)  # a small limit: the clamps bite at these scales
VARIANTS = {
    "swiglu_oai_bias": OAI,
    "swiglu_oai_no_limit": ExpertVariant(activation="swiglu_oai", alpha=1.3, bias=True),
    "weights_on_input": ExpertVariant.llama4(),
    "bias_on_input": ExpertVariant(bias=True, weights_on_input=True),
}
# (R, K, E, W, H, I): one row, 33 rows, H and I off the 64-wide tiles, ranks masking experts
GRID = [pytest.param(*c, id="R{}_K{}_E{}_W{}_H{}_I{}".format(*c))
        for c in [(1, 1, 4, 1, 64, 32), (33, 4, 16, 2, 80, 48), (33, 2, 8, 4, 36, 20)]]


def _case(R, K, E, W, H, I, variant, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    p = Placement.contiguous(E, W)
    rank = W - 1  # the last rank: its experts are not the first ones
    emap = p.expert_map(rank)
    local = list(p.local_experts(rank))
    x = torch.randn(R, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(R)])
    ids[torch.rand(R, K, generator=g) < 0.15] = -1  # empty slots
    w = torch.rand(R, K, generator=g) + 0.1
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    b13 = (0.5 * torch.randn(E, 2 * I, generator=g)).to(dtype)
    b2 = (0.5 * torch.randn(E, H, generator=g)).to(dtype)
    dev = [t.to(DEVICE) for t in (x, ids.int(), w, w13[local], w2[local])] + [emap.to(DEVICE)]
    kw = dict(variant=variant)
    if variant.bias:
        kw.update(w13_bias=b13[local].to(DEVICE), w2_bias=b2[local].to(DEVICE))
    fetch = (lambda e: (w13[e], w2[e], b13[e], b2[e])) if variant.bias else \
        (lambda e: (w13[e], w2[e]))
    raw64 = oracle.dense_experts(x, ids, local, fetch, variant=variant, weights_RK=w)
    return dev, kw, raw64, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("R", "K", "E", "W", "H", "I"), GRID)
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
def test_variants_match_the_oracle(R, K, E, W, H, I, name, weight_mode, dtype):
    variant = VARIANTS[name]
    args, kw, raw64, w = _case(R, K, E, W, H, I, variant, dtype, seed=R * 7 + K + W)
    out = TritonExperts()(*args, weight_mode=weight_mode, **kw)
    ref = ReferenceExperts()(*args, weight_mode=weight_mode, **kw)
    assert out.weights_applied == ref.weights_applied == (weight_mode == "experts")
    assert out.weighted_inputs == ref.weighted_inputs
    on_input = variant.weights_on_input
    if weight_mode == "experts":
        want = oracle.summed(raw64) if on_input else oracle.weighted_sum(raw64, w)
    else:
        want = raw64
        local = args[5].local_ids(args[1]) >= 0
        assert out.out[~local].eq(0).all()  # other ranks' and empty slots: exact zeros
    assert oracle.rel_err(out.out, want) < TOL[dtype]
    assert oracle.rel_err(out.out, ref.out) < TOL[dtype]
    # the weighting module weights it exactly once, as it does the reference's output
    once = weight_once(out, args[2], args[1], args[5])
    assert oracle.rel_err(once, weight_once(ref, args[2], args[1], args[5])) < TOL[dtype]


@pytest.mark.parametrize("weight_mode", ["experts", "combine"])
def test_variant_is_computed_not_ignored(weight_mode):
    """The same call without the variant's parts gives something else (the test can fail)."""
    args, kw, _, _ = _case(33, 4, 16, 2, 80, 48, OAI, torch.float16, seed=5)
    out = TritonExperts()(*args, weight_mode=weight_mode, **kw)
    plain = TritonExperts()(*args, weight_mode=weight_mode)
    assert oracle.rel_err(out.out, plain.out) > 0.1
    no_clamp = ExpertVariant(activation="swiglu_oai", alpha=OAI.alpha, bias=True)
    assert oracle.rel_err(out.out, TritonExperts()(*args, weight_mode=weight_mode, **{
        **kw, "variant": no_clamp}).out) > 0.01


def test_worked_example_swiglu_oai():
    """One row x = e_0, K = 1, weight 0.5, gate = 2 and up = 3 on hidden dim 0, alpha = limit
    = 1, down = identity, no biases: 0.5 * (1 + 1) * 1 * sigmoid(1) = 0.7310... on dim 0."""
    H = I = 16
    x = torch.zeros(1, H, dtype=torch.float16)
    x[0, 0] = 1
    w13 = torch.zeros(1, 2 * I, H, dtype=torch.float16)
    w13[0, 0, 0], w13[0, I, 0] = 2, 3
    w2 = torch.eye(H, I, dtype=torch.float16)[None]
    v = ExpertVariant(activation="swiglu_oai", alpha=1.0, limit=1.0, bias=True)
    zeros = dict(w13_bias=torch.zeros(1, 2 * I, dtype=torch.float16).to(DEVICE),
                 w2_bias=torch.zeros(1, H, dtype=torch.float16).to(DEVICE))
    out = TritonExperts()(*[t.to(DEVICE) for t in (x, torch.tensor([[0]], dtype=torch.int32),
                                                   torch.tensor([[0.5]]), w13, w2)],
                          Placement.contiguous(1, 1).expert_map(0).to(DEVICE),
                          weight_mode="experts", variant=v, **zeros).out
    assert out[0, 0].item() == pytest.approx(0.5 * 2 / (1 + 2.718281828 ** -1), rel=1e-3)
    assert out[0, 1:].abs().max().item() == 0


def test_triton_runs_every_variant():
    for variant in (PLAIN, *VARIANTS.values()):
        assert TritonExperts().variant_unsupported_reason(variant) is None
        assert TritonExperts().as_invariant().variant_unsupported_reason(variant) is None


@pytest.mark.parametrize("name", ["swiglu_oai_bias", "weights_on_input"])
def test_bounded_rows_with_a_variant(name):
    """A capacity-sized batch (rows past num_rows empty), persistent launches: the rows
    received match the oracle."""
    variant = VARIANTS[name]
    args, kw, raw64, w = _case(33, 2, 8, 2, 64, 32, variant, torch.float16, seed=9)
    n = 20
    args[1][n:] = -1
    raw64[n:] = 0
    num_rows = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    out = TritonExperts()(*args, weight_mode="experts", num_rows=num_rows, expected_rows=n, **kw)
    want = oracle.summed(raw64) if variant.weights_on_input else oracle.weighted_sum(raw64, w)
    assert oracle.rel_err(out.out[:n], want[:n]) < TOL[torch.float16]


def test_invariant_triton_runs_a_variant_batch_invariantly():
    """TritonExperts(invariant=True) with gpt-oss's variant: a row's output has the same bits
    in a batch of 33 and in one of its first 5 rows."""
    args, kw, raw64, w = _case(33, 4, 16, 2, 80, 48, OAI, torch.float16, seed=3)
    whole = TritonExperts(invariant=True)(*args, weight_mode="experts", **kw).out
    part = TritonExperts(invariant=True)(*[t[:5] for t in args[:3]], *args[3:],
                                         weight_mode="experts", **kw).out
    assert torch.equal(whole[:5], part)
    assert oracle.rel_err(whole, oracle.weighted_sum(raw64, w)) < TOL[torch.float16]
