"""Inputs an audit of the public surface (2026-12-08) found accepted silently, or failing deep
inside torch with an AttributeError / IndexError; each is now refused naming the field, the
value, the rule and a fix. (Dispatchers, the layer, experts, placement, the environment and the
CLI have theirs beside their other bad-input tests.)"""

from types import SimpleNamespace

import pytest
import torch

from rocm_moe import EPMoE, ExpertsOutput, RouterConfig, dense_moe_reference, route
from rocm_moe.families import family
from rocm_moe.weighting import weight_once

E, K, H, I = 4, 2, 8, 4


def _qwen3_config(**over):
    cfg = dict(model_type="qwen3_moe", num_experts=E, num_experts_per_tok=K,
               norm_topk_prob=True, hidden_size=H, moe_intermediate_size=I)
    return SimpleNamespace(**{**cfg, **over})


def test_route_needs_a_router_config_and_ids_for_raw_weights():
    logits = torch.randn(3, E)
    with pytest.raises(TypeError, match=r"config=dict: must be a RouterConfig"):
        route(logits, {"num_experts": E, "top_k": K})
    with pytest.raises(ValueError, match=r"forced_weights='raw': says how to weight "
                       r"forced_expert_ids, and none are given"):
        route(logits, RouterConfig.qwen3_moe(E, K), forced_weights="raw")


@pytest.mark.parametrize(("over", "exc", "match"), [
    (dict(num_experts_per_tok=None), TypeError, r"config.num_experts_per_tok=None: must be int"),
    (dict(norm_topk_prob="false"), TypeError, r"config.norm_topk_prob='false': must be bool"),
    (dict(num_experts=8.0), TypeError, r"config.num_experts=8.0: must be int"),
])
def test_hf_config_values_are_not_coerced(over, exc, match):
    """norm_topk_prob="false" became True through bool(); a missing or None key was an
    AttributeError / TypeError from deep inside."""
    with pytest.raises(exc, match=match):
        RouterConfig.from_hf_config(_qwen3_config(**over))


def test_hf_config_missing_key_named():
    cfg = _qwen3_config()
    del cfg.num_experts_per_tok
    with pytest.raises(ValueError, match=r"config.num_experts_per_tok=missing: the qwen3_moe "):
        family("qwen3_moe").router_kwargs(cfg)
    ds = SimpleNamespace(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, n_group=1, topk_group=1, routed_scaling_factor=None)
    with pytest.raises(TypeError, match=r"config.routed_scaling_factor=None: must be int or "
                       "float"):
        RouterConfig.from_hf_config(ds)


def test_weight_once_checks_ids_and_weights():
    raw = ExpertsOutput(out=torch.randn(3, K, H), weights_applied=False)
    w, ids = torch.rand(3, K), torch.tensor([[0, 1], [2, 3], [1, -1]])
    with pytest.raises(TypeError, match=r"topk_ids.dtype=torch.float32"):
        weight_once(raw, w, ids.float(), None)
    with pytest.raises(TypeError, match=r"topk_weights.dtype=torch.float16"):
        weight_once(raw, w.half(), ids, None)
    assert weight_once(raw, w, ids, None).shape == (3, H)


def test_reset_parameters_seed_is_an_int():
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K))
    for seed, exc in ((1.5, TypeError), ("a", TypeError), (-1, ValueError)):
        with pytest.raises(exc, match=f"seed={seed!r}" if exc is TypeError else "seed=-1"):
            layer.reset_parameters(seed)


def test_dense_moe_reference_checks_its_inputs():
    x, w = torch.randn(2, H), torch.rand(2, K)
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    for ids, exc, match in ((torch.tensor([[0, 9], [1, 2]]), ValueError, r"topk_ids.*9"),
                            (torch.tensor([[0, -3], [1, 2]]), ValueError, r"topk_ids.*-3"),
                            (torch.tensor([[0.0, 1.7], [1, 2]]), TypeError, "topk_ids.dtype")):
        with pytest.raises(exc, match=match):
            dense_moe_reference(x, w, ids, w13, w2)
    with pytest.raises(ValueError, match=r"topk_weights.shape=\[2, 1\]"):
        dense_moe_reference(x, w[:, :1], torch.tensor([[0, 1], [1, 2]]), w13, w2)
    y, raw = dense_moe_reference(x, w, torch.tensor([[0, -1], [1, 2]]), w13, w2)
    assert y.shape == (2, H)
    assert raw.shape == (2, K, H)


# ---- the second audit (2026-12-08): EPLB, formats, checkpoints, graphs, stacks, launch -------
def test_rebalance_num_nodes_checked_before_the_collectives():
    """num_nodes was checked after the group's load all-reduce, outside the refusal exchange
    (a peer waited in the table exchange); with a table given it was ignored."""
    from tests.test_eplb import _layer as eplb_layer

    layer = eplb_layer(R=4)
    before = layer.replicas
    for kw, exc, match in ((dict(num_nodes=3), ValueError, "num_nodes=3: must divide the EP "
                            "size 1"), (dict(num_nodes="x"), TypeError, "num_nodes='x'"),
                           (dict(phys_to_log=torch.arange(12) % 8, num_nodes=2), ValueError,
                            "num_nodes=2: places the balanced table, and phys_to_log is given")):
        with pytest.raises(exc, match=match):
            layer.rebalance(**kw)
        assert layer.replicas is before
    layer.rebalance()  # the balanced table of this rank's load


def test_quantised_load_needs_the_same_experts_in_w13_and_w2():
    """An FP8 EPLB layer took w13 [E] with w2 [P] and read w2's rows as logical experts."""
    layer = EPMoE(hidden_size=128, intermediate_size=128, router=RouterConfig.qwen3_moe(8, 2),
                  weight_format="block_fp8", num_redundant_experts=4)
    w13, w2 = torch.randn(8, 256, 128) / 11, torch.randn(12, 128, 128) / 11
    with pytest.raises(ValueError, match=r"w13.shape\[0\], w2.shape\[0\]=\(8, 12\): must be "
                       "equal"):
        layer.load_experts(w13, w2)
    with pytest.raises(ValueError, match=r"\(8, 3\)"):
        layer.load_experts(w13, w2[:3])
    layer.load_experts(w13, w2[:8])


def test_stack_layers_are_distinct_and_alike():
    from rocm_moe.model import MoEStack

    router = RouterConfig.qwen3_moe(4, 2)
    a = EPMoE(hidden_size=8, intermediate_size=4, router=router)
    b = EPMoE(hidden_size=8, intermediate_size=4, router=router, dispatcher=a.dispatcher,
              dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layers\[1\]=the same EPMoE as an earlier entry"):
        MoEStack([a, a])
    with pytest.raises(ValueError, match=r"layers\[1\].dtype=torch.float64: must be layer 0's"):
        MoEStack([a, b])


@pytest.mark.parametrize(("kw", "exc", "match"), [
    (dict(world_size=True), TypeError, "world_size=True: must be an int"),
    (dict(world_size=2.0), TypeError, "world_size=2.0: must be an int"),
    (dict(threads_per_rank=0), ValueError, "threads_per_rank=0: must be >= 1"),
    (dict(timeout_s=-1), ValueError, "timeout_s=-1: must be a finite number"),
    (dict(grace_s="x"), ValueError, "grace_s='x'"),
    (dict(worker=42), TypeError, "worker=42: must be callable")])
def test_launch_arguments_checked_before_any_rank_starts(kw, exc, match):
    from rocm_moe.distributed import launch
    from tests.dist_checks import collect_checks  # (any module-level callable)

    args = dict(world_size=1, worker=collect_checks) | kw
    world, worker = args.pop("world_size"), args.pop("worker")
    with pytest.raises(exc, match=match):
        launch(world, worker, **args)


def test_fp8_conversion_and_dequantisation_check_their_arguments():
    """convert_fp8 never looked at the scale (junk came back unchanged in the same encoding);
    dequantize(torch.int8) wrapped 448 to -64."""
    from rocm_moe.quant import convert_fp8, quantize_rows, quantize_weight_blocks

    w = quantize_weight_blocks(torch.randn(128, 128))
    for scale in ("junk", w.scale_inv.double(), w.scale_inv[0]):
        with pytest.raises(TypeError, match="scale="):
            convert_fp8(w.weight, scale, w.weight.dtype)
    rows = quantize_rows(torch.randn(3, 128))
    for obj in (w, rows):
        for dtype in (torch.int8, "float32", torch.float8_e4m3fn):
            with pytest.raises(TypeError, match="dtype="):
                obj.dequantize(dtype)
    assert rows.dequantize(torch.float32).dtype == torch.float32


def test_eplb_helpers_and_sanity_check_their_inputs():
    from rocm_moe.eplb_balance import max_over_mean
    from rocm_moe.replicas import ReplicatedPlacement
    from rocm_moe.sanity import _experts_to_try
    from tests.test_eplb import _layer as eplb_layer

    rp = ReplicatedPlacement.initial(8, 4, 2)  # E, R, W: P = 12
    with pytest.raises(ValueError, match=r"physical_load_P=.*must be a \[P=12\]"):
        rp.rank_load(torch.ones(6))
    for loads in ([float("nan"), 1.0], [-1.0, 1.0]):  # (both read as balanced, 1.0)
        with pytest.raises(ValueError, match=r"loads_W=.*must be finite, real loads >= 0"):
            max_over_mean(torch.tensor(loads))
    assert float(max_over_mean(torch.tensor([1.0, 3.0]))) == 1.5
    layer = eplb_layer(R=4)
    with pytest.raises(TypeError, match=r"topk_ids.dtype=torch.float32"):
        layer.to_physical(torch.tensor([[1.7, 2.0]]))
    for experts in ([], [99], 3, [1, 1]):
        with pytest.raises(ValueError, match="experts="):
            _experts_to_try(experts, 8)
    assert _experts_to_try(None, 3) == [0, 1, 2]


def test_init_from_env_checks_its_arguments_before_the_rendezvous(monkeypatch):
    """backend="glooo" failed an assert after the rendezvous; rendezvous_timeout_s=-5 gave a
    misleading RendezvousTimeout."""
    from rocm_moe.distributed import init_from_env

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, value)
    for kw, match in ((dict(backend="glooo"), "backend='glooo'"),
                      (dict(rendezvous_timeout_s=-5), "rendezvous_timeout_s=-5"),
                      (dict(timeout_s="x"), "timeout_s='x'")):
        with pytest.raises(ValueError, match=match):
            init_from_env(**kw)
