"""Issue 34, library part: every public surface refuses bad input clearly (FP8 weights, the
invariant flag, non-SiLU models, weighting, diagnose and sanity, graphs, placement)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import ExpertsOutput, Placement, faults
from rocm_moe.weighting import weight_once

H = 8


# ---- weighting ------------------------------------------------------------------------------


def test_weights_applied_must_be_a_bool():
    with pytest.raises(TypeError, match=r"weights_applied.*must be a bool"):
        ExpertsOutput(out=torch.zeros(1, H), weights_applied="no")


def test_weight_once_refuses_an_extra_id_slot():
    raw = ExpertsOutput(out=torch.ones(2, 2, H), weights_applied=False)
    ids = torch.tensor([[0, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"topk_ids.shape.*\[2, 2\]"):
        weight_once(raw, torch.rand(2, 3), ids, Placement.contiguous(2, 1).expert_map(0))


def test_weight_once_refuses_broadcast_weights():
    raw = ExpertsOutput(out=torch.ones(2, 2, H), weights_applied=False)
    with pytest.raises(ValueError, match=r"topk_weights\.shape"):
        weight_once(raw, torch.rand(2, 1), torch.tensor([[0, 1], [1, 0]]), None)


# ---- FP8 weights are value-checked where they enter -------------------------------------------

FP8_H, FP8_I = 128, 128


def _fp8_layer(**kw):
    from rocm_moe import RouterConfig
    from rocm_moe.layer_fp8 import FP8EPMoE

    return FP8EPMoE(hidden_size=FP8_H, intermediate_size=FP8_I,
                    router=RouterConfig(num_experts=4, top_k=2), **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0],
                         ids=["nan", "inf", "zero", "negative"])
def test_fp8_load_refuses_bad_block_scales(bad):
    from rocm_moe.quant import BlockFP8Weight

    layer = _fp8_layer()
    w13, w2 = layer.expert_weights()
    scale = w13.scale_inv.clone()
    scale[1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"w13\.scale_inv.*finite and > 0"):
        layer.load_experts(BlockFP8Weight(w13.weight.clone(), scale), w2)


def test_fp8_load_refuses_float_weights_holding_nan():
    layer = _fp8_layer()
    w13 = torch.randn(4, 2 * FP8_I, FP8_H)
    w13[2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"^w=contains nan.*must be finite"):
        layer.load_experts(w13, torch.randn(4, FP8_H, FP8_I))


def test_fp8_load_refuses_nan_codes():
    from rocm_moe.quant import BlockFP8Weight

    layer = _fp8_layer()
    w13, w2 = layer.expert_weights()
    q = w13.weight.clone()
    q.view(torch.uint8)[0, 0, 0] = 0x7F  # e4m3fn NaN
    with pytest.raises(ValueError, match=r"w13\.weight=contains NaN"):
        layer.load_experts(BlockFP8Weight(q, w13.scale_inv), w2)


def test_quantize_weight_blocks_refuses_inf():
    from rocm_moe.quant import quantize_weight_blocks

    w = torch.randn(128, 128)
    w[5, 6] = float("inf")
    with pytest.raises(ValueError, match=r"^w=contains inf at \[5, 6\]"):
        quantize_weight_blocks(w)


def _edit_checkpoint(directory, edit) -> None:
    """Apply ``edit(tensors)`` to every shard of a checkpoint (and drop what it drops from the
    index)."""
    import json

    from safetensors.torch import load_file, save_file

    from rocm_moe.integrations import hf

    index = json.loads((directory / hf.INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(directory / shard)
        edit(tensors)
        save_file(tensors, directory / shard, metadata={"format": "pt"})
    kept = {}
    for shard in sorted(set(index["weight_map"].values())):
        kept.update(dict.fromkeys(load_file(directory / shard), shard))
    index["weight_map"] = kept
    (directory / hf.INDEX).write_text(json.dumps(index))


SCALE3 = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"


@pytest.mark.parametrize("bad", [0.0, -0.5], ids=["zero", "negative"])
def test_fp8_checkpoint_refuses_zero_or_negative_scales(tmp_path, bad):
    pytest.importorskip("transformers")
    from rocm_moe.integrations import hf
    from tests.test_fp8_checkpoint import E, save_fp8_deepseek_v3

    save_fp8_deepseek_v3(tmp_path)

    def edit(t):
        if SCALE3 in t:
            t[SCALE3][0, 0] = bad
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj\.weight\.scale_inv.*> 0"):
        hf.load_moe_layer(tmp_path, 1, Placement.contiguous(E, 1), 0)


@pytest.mark.parametrize("which", ["some", "all"])
def test_fp8_checkpoint_missing_scales(tmp_path, which):
    pytest.importorskip("transformers")
    from rocm_moe.integrations import hf
    from tests.test_fp8_checkpoint import E, save_fp8_deepseek_v3

    save_fp8_deepseek_v3(tmp_path)

    def edit(t):
        for name in list(t):
            if name.endswith("_scale_inv") and (which == "all" or ".experts.0." in name):
                del t[name]
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        hf.load_moe_layer(tmp_path, 1, Placement.contiguous(E, 1), 0)


# ---- the invariant flag is kept and checked on every path --------------------------------------


def _layer(**kw):
    from rocm_moe import EPMoE, RouterConfig

    return EPMoE(hidden_size=16, intermediate_size=32, router=RouterConfig.qwen3_moe(8, 2), **kw)


def test_fp8_checkpoint_builder_keeps_invariant():
    from rocm_moe.integrations import hf

    fp8 = _fp8_layer()
    w13, w2 = fp8.expert_weights()
    weights = hf.MoELayerWeights(router=fp8.router, hidden_size=FP8_H, intermediate_size=FP8_I,
                                 gate=fp8.gate.weight.detach(), e_score_correction_bias=None,
                                 w13=w13, w2=w2)
    assert not hf.build_layer(weights, dtype=torch.float32).invariant
    with pytest.raises(ValueError, match="an FP8 layer cannot run it"):
        hf.build_layer(weights, dtype=torch.float32, invariant=True)


def test_swapping_experts_of_an_invariant_layer_is_checked():
    from rocm_moe import ReferenceExperts

    layer = _layer(invariant=True)
    with pytest.raises(ValueError, match="must be an invariant backend"):
        layer.experts = ReferenceExperts()
    assert layer.experts.invariant
    mine = ReferenceExperts(invariant=True)
    layer.experts = mine  # an invariant backend is accepted
    layer.invariant = False
    assert layer.experts is mine  # the user's choice is kept, not the one invariant replaced


def test_turning_invariant_off_restores_the_replaced_experts():
    layer = _layer()
    plain = layer.experts
    layer.invariant = True
    assert layer.experts is not plain
    assert layer.experts.invariant
    faults.plant(layer, "weights_twice")  # (it wraps the experts: not a user's swap)
    faults.plant(layer, None)
    layer.invariant = False
    assert layer.experts is plain


def _invariant_by_rank_worker(info):
    from rocm_moe import EPMoE, RouterConfig
    from rocm_moe.comm.torch import TorchDispatcher

    disp = TorchDispatcher(Placement.contiguous(8, info.world_size), hidden_size=16, top_k=2,
                           dtype=torch.float32)
    layer = EPMoE(hidden_size=16, intermediate_size=32, router=RouterConfig.qwen3_moe(8, 2),
                  dispatcher=disp, invariant=info.rank == 0)
    layer(torch.randn(3, 16))
    return "ran"


def test_ranks_must_agree_on_invariant():
    from rocm_moe.distributed import launch

    with pytest.raises(ValueError, match=r"invariant by rank=\{0: True, 1: False\}"):
        launch(2, _invariant_by_rank_worker, backend="gloo", timeout_s=60)


# ---- a non-SiLU model is refused, never run as SwiGLU ------------------------------------------


@pytest.fixture(scope="module")
def gelu_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, tie_word_embeddings=False,
        intermediate_size=48, moe_intermediate_size=16, num_experts=8, mlp_only_layers=[],
        hidden_act="gelu")
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    directory = tmp_path_factory.mktemp("gelu")
    model.save_pretrained(directory)
    return model, directory


def test_gelu_checkpoint_is_refused(gelu_model):
    from rocm_moe.integrations import hf

    with pytest.raises(ValueError, match=r"config\.hidden_act='gelu'.*SwiGLU"):
        hf.load_moe_layer(gelu_model[1], 0, Placement.contiguous(8, 1), 0)


def test_gelu_model_refused_by_replace_moe_blocks(gelu_model):
    from rocm_moe import LocalDispatcher
    from rocm_moe.integrations import hf

    with pytest.raises(ValueError, match=r"config\.hidden_act='gelu'"):
        hf.replace_moe_blocks(gelu_model[0], lambda: LocalDispatcher(Placement.contiguous(8, 1)))


def test_gelu_model_refused_by_the_experts_implementation(gelu_model):
    from rocm_moe.integrations import hf

    model = gelu_model[0]
    hf.register()
    model.set_experts_implementation("rocm_moe")
    try:
        with pytest.raises(ValueError, match=r"act_fn=GELUActivation.*SwiGLU"), torch.no_grad():
            model(torch.randint(0, 96, (1, 5)))
    finally:
        model.set_experts_implementation("eager")


# ---- diagnose and sanity: every layer, every input, and their blind spots ----------------------


def _small_fp8_layer():
    return _fp8_layer(shared_intermediate_size=128)


def test_sanity_runs_on_an_fp8_layer():
    from rocm_moe.sanity import run_sanity

    rows = run_sanity(_small_fp8_layer())
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_diagnose_runs_on_an_fp8_layer():
    from rocm_moe.diagnose import diagnose

    report = diagnose(_small_fp8_layer(), torch.randn(7, FP8_H))
    assert report.first_bad is None, report.stages


def test_diagnose_runs_on_an_invariant_layer():
    from rocm_moe.diagnose import diagnose

    report = diagnose(_layer(invariant=True, shared_intermediate_size=8), torch.randn(7, 16))
    assert report.first_bad is None, report.stages


def test_diagnose_checks_its_arguments_before_the_work(tmp_path):
    from rocm_moe.diagnose import diagnose

    layer = _layer()
    calls = []
    layer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"^dump=.*cannot be written"):
        diagnose(layer, torch.randn(3, 16), dump=str(tmp_path / "missing" / "d"))
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^hidden_states=contains nan at \[1, 2\]"):
        diagnose(layer, x)
    with pytest.raises(TypeError, match=r"must be a rocm_moe\.EPMoE"):
        diagnose(torch.nn.Linear(16, 16), torch.randn(3, 16))
    assert not calls
    diagnose(layer, torch.randn(3, 16), dump=str(tmp_path / "d"))
    assert (tmp_path / "d.rank0.safetensors").exists()


class _InPlaceExperts:
    """fused_moe's inplace=True: the (right) weighted output written over the input rows."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x_RH, *args, **kwargs):
        eo = self.inner(x_RH, *args, **kwargs)
        if eo.weights_applied:
            x_RH.copy_(eo.out)
            return ExpertsOutput(out=x_RH, weights_applied=True)
        return eo


def test_diagnose_names_experts_writing_into_their_input():
    from rocm_moe.diagnose import diagnose

    layer = _layer(shared_intermediate_size=8)
    layer.experts = _InPlaceExperts(layer.experts)
    x = torch.randn(6, 16)
    x0 = x.clone()
    report = diagnose(layer, x)
    assert torch.equal(x, x0)  # the caller's input is never changed
    assert report.first_bad == "experts"
    assert report.diagnosis.bug == "experts_in_place"


def test_sanity_checks_its_input_is_unchanged():
    from rocm_moe.sanity import run_sanity

    layer = _layer()
    layer.experts = _InPlaceExperts(layer.experts)
    rows = {(r.check, r.weight_mode): r for r in run_sanity(layer)}
    assert not rows["input_unchanged", "both"].passed


def test_diagnose_and_sanity_check_the_router_config_against_the_model():
    transformers = pytest.importorskip("transformers")
    from rocm_moe import RouterConfig
    from rocm_moe.diagnose import diagnose
    from rocm_moe.sanity import run_sanity

    cfg = transformers.DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    right = RouterConfig.from_hf_config(cfg)
    wrong = RouterConfig(**{**vars(right), "routed_scaling_factor": 1.0})
    from rocm_moe import EPMoE

    layer = EPMoE(hidden_size=16, intermediate_size=32, router=wrong)
    report = diagnose(layer, torch.randn(5, 16), hf_config=cfg)
    assert report.first_bad == "config"
    assert "routed_scaling_factor: layer 1.0, model 2.5" in report.stages[0].note
    rows = run_sanity(layer, hf_config=cfg)
    assert rows[0].check == "router_config"
    assert not rows[0].passed
    layer_ok = EPMoE(hidden_size=16, intermediate_size=32, router=right)
    assert diagnose(layer_ok, torch.randn(5, 16), hf_config=cfg).first_bad is None


def test_diagnose_has_a_stage_for_code_after_combine():
    from rocm_moe import EPMoE
    from rocm_moe.diagnose import diagnose

    class ScaledTwice(EPMoE):
        def _run(self, *args):
            out = super()._run(*args)
            return out * 2.5 if torch.is_tensor(out) else out

    from rocm_moe import RouterConfig

    layer = ScaledTwice(hidden_size=16, intermediate_size=32,
                        router=RouterConfig.qwen3_moe(8, 2))
    assert diagnose(layer, torch.randn(5, 16)).first_bad == "post_combine"


def test_diagnose_judges_the_shared_experts_gate():
    from rocm_moe.diagnose import diagnose
    from rocm_moe.layer import SharedExperts

    class NoSigmoid(SharedExperts):
        def forward(self, x_TH):
            from rocm_moe.experts.base import swiglu_expert

            return self.gate(x_TH) * swiglu_expert(x_TH, self.w13, self.w2)

    layer = _layer(shared_intermediate_size=8, shared_expert_gate=True)
    layer.shared_experts.__class__ = NoSigmoid
    report = diagnose(layer, torch.randn(5, 16))
    assert report.first_bad == "shared"


def test_sanity_reference_is_independent_of_swiglu_expert(monkeypatch):
    import rocm_moe.experts.base
    import rocm_moe.experts.reference
    import rocm_moe.sanity
    from rocm_moe.sanity import run_sanity

    original = rocm_moe.experts.base.swiglu_expert

    def swapped(x, w13, w2):  # gate and up swapped: a bug in the package's own expert
        half = w13.shape[-2] // 2
        return original(x, torch.cat([w13[..., half:, :], w13[..., :half, :]], -2), w2)

    for module in (rocm_moe.experts.base, rocm_moe.experts.reference, rocm_moe.sanity):
        monkeypatch.setattr(module, "swiglu_expert", swapped, raising=False)
    rows = {(r.check, r.weight_mode): r for r in run_sanity(_layer())}
    assert not rows["single_expert", "experts"].passed


def test_sanity_puts_two_local_slots_in_one_row():
    from rocm_moe import LocalDispatcher
    from rocm_moe.sanity import run_sanity

    class SlotOrderBug(LocalDispatcher):
        """The raw path returns a row's slots reversed where every slot is used."""

        def combine_raw(self, expert_output, handle):
            raw = super().combine_raw(expert_output, handle)
            full = (handle.topk_ids >= 0).all(1)
            raw[full] = raw[full].flip(1)
            return raw

    layer = _layer(dispatcher=SlotOrderBug(Placement.contiguous(8, 1)))
    rows = {(r.check, r.weight_mode): r for r in run_sanity(layer)}
    assert not rows["raw_slots", "experts"].passed


# ---- crashes inside the library become clear refusals ----------------------------------------


def test_forward_checks_trace_and_return_raw():
    layer = _layer()
    with pytest.raises(TypeError, match=r"^trace='yes': must be a rocm_moe\.layer\.Trace"):
        layer(torch.randn(3, 16), trace="yes")
    with pytest.raises(TypeError, match=r"^return_raw='no'"):
        layer(torch.randn(3, 16), return_raw="no")
    with pytest.raises(TypeError, match=r"^trace=1"):
        layer.forward_routed(torch.randn(3, 16), torch.rand(3, 2),
                             torch.zeros(3, 2, dtype=torch.int32), trace=1)


def test_meta_routing_tensors_refused():
    layer = _layer()
    with pytest.raises(ValueError, match=r"^forced_expert_ids\.device=meta"):
        layer(torch.randn(3, 16), forced_expert_ids=torch.zeros(3, 2, dtype=torch.int32,
                                                                device="meta"))
    with pytest.raises(ValueError, match=r"^topk_weights\.device=meta"):
        layer.forward_routed(torch.randn(3, 16), torch.rand(3, 2, device="meta"),
                             torch.tensor([[0, 1]] * 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^topk_ids\.device=meta"):
        layer.forward_routed(torch.randn(3, 16), torch.rand(3, 2),
                             torch.zeros(3, 2, dtype=torch.int32, device="meta"))


def test_integer_expert_weights_are_not_cast_silently():
    layer = _layer()
    with pytest.raises(TypeError, match=r"^w13\.dtype=torch\.int64.*cast silently"):
        layer.load_experts(torch.ones(8, 64, 16, dtype=torch.int64), layer.w2.detach())


@pytest.mark.parametrize(("buckets", "error", "match"), [
    ((1, 2.5), TypeError, "must be ints"),
    ("8", TypeError, "sequence of ints"),
    ((True,), TypeError, "must be ints"),
])
def test_graphs_refuse_non_integer_buckets(buckets, error, match):
    from rocm_moe.graphs import GraphedEPMoE

    with pytest.raises(error, match=match):
        GraphedEPMoE(_layer(), buckets=buckets)


def test_graphs_refuse_a_cpu_layer_or_a_non_layer():
    from rocm_moe.graphs import GraphedEPMoE

    with pytest.raises(ValueError, match="CUDA graphs capture GPU work only"):
        GraphedEPMoE(_layer(), buckets=(1, 2))
    with pytest.raises(TypeError, match="must be a MoE layer"):
        GraphedEPMoE(torch.nn.Linear(4, 4), buckets=(1, 2))


def test_graphs_take_a_moe_stack():
    from rocm_moe.graphs import GraphedEPMoE
    from rocm_moe.model import MoEStack

    with pytest.raises(ValueError, match="CUDA graphs"):  # a CPU stack: taken as a layer
        GraphedEPMoE(MoEStack([_layer()]), buckets=(1, 2))


@pytest.mark.parametrize("experts_of_rank", [[[0, 1.0], [2, 3]], [[0, 1.7], [2, 3]]])
def test_placement_refuses_float_ids(experts_of_rank):
    with pytest.raises(TypeError, match="expert ids must be ints"):
        Placement.from_lists(experts_of_rank, 4)
    with pytest.raises(TypeError, match="expert ids must be ints"):
        Placement(4, tuple(tuple(r) for r in experts_of_rank))


def test_placement_refuses_out_of_range_ids():
    with pytest.raises(ValueError, match=r"holds 7: expert ids must lie in \[0, 4\)"):
        Placement(4, ((0, 1), (2, 7)))
    with pytest.raises(TypeError, match=r"Placement\.num_experts"):
        Placement(4.0, ((0, 1), (2, 3)))
    assert Placement.from_lists(torch.tensor([[0, 1], [2, 3]]), 4) == Placement.contiguous(4, 2)


def test_replace_moe_blocks_with_a_dispatcher_for_another_e():
    transformers = pytest.importorskip("transformers")
    from rocm_moe import LocalDispatcher
    from rocm_moe.integrations import hf

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, intermediate_size=48,
        moe_intermediate_size=16, num_experts=8, mlp_only_layers=[])
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"placement\.num_experts=16: must be the block's"):
        hf.replace_moe_blocks(model, lambda: LocalDispatcher(Placement.contiguous(16, 1)))


# ---- router logits: -inf masks an expert, NaN is refused --------------------------------------


def test_minus_inf_logits_mask_experts():
    from rocm_moe import RouterConfig, route

    logits = torch.randn(4, 8)
    logits[:, :5] = float("-inf")
    logits[0, 5] = float("-inf")
    logits[0, 0] = 0.0  # row 0 keeps experts 0, 6, 7
    res = route(logits, RouterConfig.qwen3_moe(8, 2))
    assert set(res.topk_ids[1].tolist()) <= {5, 6, 7}
    assert set(res.topk_ids[0].tolist()) <= {0, 6, 7}
    assert torch.isfinite(res.topk_weights).all()
    layer = _layer()
    layer.forward_routed(torch.randn(4, 16), res.topk_weights, res.topk_ids)


def test_too_many_minus_inf_or_nan_logits_refused():
    from rocm_moe import RouterConfig, route

    logits = torch.randn(3, 8)
    logits[2, 1:] = float("-inf")
    with pytest.raises(ValueError, match=r"^router_logits\[2\]=1 finite: .*top_k=2"):
        route(logits, RouterConfig.qwen3_moe(8, 2))
    logits = torch.randn(3, 8)
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^router_logits=contains nan"):
        route(logits, RouterConfig.qwen3_moe(8, 2))
    logits[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"^router_logits=contains inf"):
        route(logits, RouterConfig.qwen3_moe(8, 2))


@pytest.mark.parametrize(("args", "match"), [((8.0, 2), "num_experts"), ((8, 2.0), "world_size"),
                                             ((8, True), "world_size")])
def test_contiguous_placement_takes_ints(args, match):
    with pytest.raises(TypeError, match=f"^{match}=.*must be an int"):
        Placement.contiguous(*args)
