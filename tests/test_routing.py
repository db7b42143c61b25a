"""route() against transformers 5's own router modules, plus router replay and bad input."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import RouterConfig, route

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.mixtral.configuration_mixtral import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402

H = 64
SIZES = [1, 33, 511]


def _hf_router(family: str, dtype: torch.dtype, **kw):
    torch.manual_seed(kw.pop("seed"))
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(hidden_size=H, num_experts=kw["E"], num_experts_per_tok=kw["K"],
                             norm_topk_prob=kw["norm"])
        router = Qwen3MoeTopKRouter(cfg)
    elif family == "mixtral":
        cfg = MixtralConfig(hidden_size=H, num_local_experts=kw["E"], num_experts_per_tok=kw["K"])
        router = MixtralTopKRouter(cfg)
    else:
        cfg = DeepseekV3Config(hidden_size=H, n_routed_experts=kw["E"], num_experts_per_tok=kw["K"],
                               n_group=kw["G"], topk_group=kw["TG"], norm_topk_prob=kw["norm"],
                               routed_scaling_factor=2.5)
        router = DeepseekV3TopkRouter(cfg)
        router.e_score_correction_bias.copy_(torch.rand(kw["E"]) * 0.1)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight))
    return cfg, router.to(dtype)


def _sorted_by_id(ids, w):
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(1, order), w.float().gather(1, order)


CASES = [
    pytest.param("qwen3_moe", dict(E=16, K=4, norm=True), id="qwen3_E16_K4_norm"),
    pytest.param("qwen3_moe", dict(E=16, K=4, norm=False), id="qwen3_E16_K4_nonorm"),
    pytest.param("mixtral", dict(E=8, K=2), id="mixtral_E8_K2"),
    pytest.param("deepseek_v3", dict(E=32, K=4, G=4, TG=2, norm=True), id="dsv3_E32_K4_G4_TG2"),
    pytest.param("deepseek_v3", dict(E=32, K=6, G=8, TG=3, norm=False), id="dsv3_E32_K6_nonorm"),
]


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize(("family", "kw"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_router(family, kw, T, dtype):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    cfg, router = _hf_router(family, dtype, seed=seed, **kw)
    x = torch.randn(T, H, dtype=dtype)
    logits, hf_w, hf_ids = router(x)
    ours = route(logits, RouterConfig.from_hf_config(cfg),
                 e_score_correction_bias=getattr(router, "e_score_correction_bias", None))
    assert ours.topk_ids.dtype == torch.int32
    assert ours.topk_weights.dtype == torch.float32
    ids_a, w_a = _sorted_by_id(ours.topk_ids, ours.topk_weights)
    ids_b, w_b = _sorted_by_id(hf_ids, hf_w)
    assert torch.equal(ids_a, ids_b), f"seed={seed}"
    # transformers casts Qwen3's weights back to the logits dtype; ours stay float32.
    atol = 1e-6 if hf_w.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(w_a, w_b, atol=atol, rtol=0, msg=f"seed={seed}")


def test_unforced_ids_ordered_by_score_and_worked_example():
    logits = torch.tensor([[0.0, 0.0, torch.log(torch.tensor(2.0)).item()]])
    r = route(logits, RouterConfig(num_experts=3, top_k=1, norm_topk_prob=False))
    assert r.topk_ids.tolist() == [[2]]
    torch.testing.assert_close(r.topk_weights, torch.tensor([[0.5]]))
    r = route(torch.randn(33, 16), RouterConfig.qwen3_moe(16, 4, norm_topk_prob=False))
    assert bool((r.topk_weights[:, :-1] >= r.topk_weights[:, 1:]).all())


def test_bsh_input_is_routed_per_token():
    cfg = RouterConfig.qwen3_moe(16, 4)
    logits = torch.randn(3, 7, 16)
    r = route(logits, cfg)
    assert r.topk_ids.shape == (21, 4)
    per_row = [route(logits[b, s][None], cfg) for b in range(3) for s in range(7)]
    assert torch.equal(r.topk_ids, torch.cat([p.topk_ids for p in per_row]))
    # Tokens of one sequence route differently: nothing is pooled over the sequence.
    assert len({tuple(row) for row in r.topk_ids.tolist()}) > 1


@pytest.mark.parametrize(
    "cfg",
    [RouterConfig.qwen3_moe(16, 4), RouterConfig.qwen3_moe(16, 4, norm_topk_prob=False),
     RouterConfig.deepseek_v3(32, 4, n_group=4, topk_group=2)],
    ids=["softmax_norm", "softmax_raw", "dsv3"],
)
@pytest.mark.parametrize("ids_dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_replay_of_own_choice_reproduces_weights(cfg, ids_dtype):
    logits = torch.randn(33, cfg.num_experts)
    bias = torch.rand(cfg.num_experts) * 0.1 if cfg.scoring == "sigmoid" else None
    free = route(logits, cfg, e_score_correction_bias=bias)
    forced = route(logits, cfg, e_score_correction_bias=bias,
                   forced_expert_ids=free.topk_ids.to(ids_dtype))
    assert torch.equal(forced.topk_ids, free.topk_ids)
    assert torch.equal(forced.topk_weights, free.topk_weights)


def test_forced_weights_derived_and_raw():
    cfg = RouterConfig.deepseek_v3(32, 4, n_group=4, topk_group=2)
    logits = torch.randn(5, 32)
    forced = torch.tensor([[0, 9, 17, 31]] * 5)  # ignores the group limit: replay is replay
    s = logits.sigmoid().gather(1, forced)
    raw = route(logits, cfg, forced_expert_ids=forced, forced_weights="raw")
    torch.testing.assert_close(raw.topk_weights, s)
    derived = route(logits, cfg, forced_expert_ids=forced)
    torch.testing.assert_close(derived.topk_weights, s / (s.sum(-1, keepdim=True) + 1e-20) * 2.5)
    assert raw.topk_ids.tolist() == forced.tolist()


@pytest.mark.parametrize(
    ("forced", "exc", "match"),
    [
        (torch.zeros(5, 3, dtype=torch.int64), ValueError, r"forced_expert_ids.shape.*\[5, 2\]"),
        (torch.tensor([[0, 16]] * 5), ValueError, r"contains 16.*\[0, 16\)"),
        (torch.tensor([[0, 2**40]] * 5), ValueError, r"contains 1099511627776"),
        (torch.tensor([[-1, 3]] * 5), ValueError, r"contains -1"),
        (torch.tensor([[3, 3]] * 5), ValueError, r"forced_expert_ids\[0\].*at most once"),
        (torch.zeros(5, 2), TypeError, r"integer dtype"),
        ([[0, 1]] * 5, TypeError, r"torch.Tensor"),
    ],
    ids=["shape", "range_E", "range_huge", "negative", "duplicate", "float_ids", "list"],
)
def test_forced_ids_rejected(forced, exc, match):
    with pytest.raises(exc, match=match):
        route(torch.randn(5, 16), RouterConfig.qwen3_moe(16, 2), forced_expert_ids=forced)


@pytest.mark.parametrize(
    ("logits", "exc", "match"),
    [
        (torch.randn(4, 15), ValueError, r"router_logits.shape.*E = num_experts = 16"),
        (torch.randn(16), ValueError, r"router_logits.shape"),
        (torch.randint(0, 3, (4, 16)), TypeError, r"router_logits.dtype"),
    ],
    ids=["wrong_E", "1d", "int_logits"],
)
def test_bad_logits(logits, exc, match):
    with pytest.raises(exc, match=match):
        route(logits, RouterConfig.qwen3_moe(16, 2))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(num_experts=8, top_k=9), "top_k"),
        (dict(num_experts=8, top_k=2, scoring="relu"), "scoring"),
        (dict(num_experts=30, top_k=2, scoring="sigmoid", n_group=4), "n_group"),
        (dict(num_experts=32, top_k=2, scoring="sigmoid", n_group=4, topk_group=5), "topk_group"),
        (dict(num_experts=32, top_k=9, scoring="sigmoid", n_group=4, topk_group=1), "topk_group"),
        (dict(num_experts=32, top_k=2, n_group=4), "sigmoid"),
    ],
    ids=["topk_gt_E", "scoring", "groups_divide", "topk_group_gt_groups", "kept_lt_topk",
         "grouped_softmax"],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kw)


def test_bias_only_for_sigmoid():
    with pytest.raises(ValueError, match="only sigmoid routers"):
        route(torch.randn(2, 8), RouterConfig.mixtral(8, 2), e_score_correction_bias=torch.zeros(8))


# ---- non-finite values: refused by name where validation is on ----------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_non_finite_logits_refused(bad):  # (-inf masks an expert: tests/test_reliability_34.py)
    logits = torch.randn(4, 16)
    logits[2, 5] = bad
    with pytest.raises(ValueError, match=rf"router_logits=contains {bad} at \[2, 5\]: must be "
                       "finite"):
        route(logits, RouterConfig.qwen3_moe(16, 2))
    w = route(logits, RouterConfig.qwen3_moe(16, 2), validate=False).topk_weights
    assert w.shape == (4, 2)  # the hot path skips the check (and its host read)


def test_nan_bias_refused():
    """A NaN bias sent every token to its expert with finite outputs and no error."""
    bias = torch.zeros(32)
    bias[7] = NAN
    with pytest.raises(ValueError, match=r"e_score_correction_bias=contains nan at \[7\]"):
        route(torch.randn(4, 32), RouterConfig.deepseek_v3(32, 4, n_group=4, topk_group=2),
              e_score_correction_bias=bias)


@pytest.mark.parametrize("factor", [NAN, INF, -1.0, 0.0, "2.5", True],
                         ids=["nan", "inf", "negative", "zero", "str", "bool"])
def test_bad_routed_scaling_factor(factor):
    with pytest.raises(ValueError, match=r"RouterConfig.routed_scaling_factor=.*finite number"):
        RouterConfig.deepseek_v3(32, 4, n_group=4, topk_group=2, routed_scaling_factor=factor)


@pytest.mark.parametrize(
    "kw",
    [dict(num_experts=8, top_k=2.0), dict(num_experts="8", top_k=2),
     dict(num_experts=8, top_k=True), dict(num_experts=8, top_k=2, norm_topk_prob="yes")],
    ids=["topk_float", "E_str", "topk_bool", "norm_str"],
)
def test_config_types(kw):
    with pytest.raises(TypeError, match=r"^RouterConfig\.\w+=.*: must be an? (int|bool)"):
        RouterConfig(**kw)
