"""The expert variants (issue 30) at the surfaces that do not model them yet (issue 34's eyes):
diagnose and sanity refuse such layers by name instead of reporting a false FAIL or crashing
inside the probe, EPLB replicas refuse expert biases (a rebalance would not move them), and the
experts probe passes the layer's keywords on."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.diagnose import diagnose
from rocm_moe.experts.base import ExpertVariant
from rocm_moe.sanity import run_sanity

E, H, I, K = 8, 32, 16, 2


def _layer(**kw):
    return EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K), **kw)


@pytest.mark.parametrize("variant", [ExpertVariant.gpt_oss(), ExpertVariant(bias=True)],
                         ids=["gpt_oss", "bias"])
def test_diagnose_and_sanity_refuse_an_expert_variant(variant):
    layer = _layer(expert_variant=variant)
    x = torch.randn(5, H)
    with pytest.raises(ValueError, match="expert_variant"):
        diagnose(layer, x)
    with pytest.raises(ValueError, match="expert_variant"):
        run_sanity(layer)


def test_diagnose_refuses_eplb_replicas():
    layer = _layer(dispatcher=LocalDispatcher(Placement.contiguous(E + 2, 1)),
                   num_redundant_experts=2)
    with pytest.raises(ValueError, match="replicas"):
        diagnose(layer, torch.randn(5, H))


def test_replicas_refuse_expert_biases():
    with pytest.raises(ValueError, match="expert biases"):
        _layer(dispatcher=LocalDispatcher(Placement.contiguous(E + 2, 1)),
               num_redundant_experts=2, expert_variant=ExpertVariant.gpt_oss())


def test_experts_probe_passes_keywords_on():
    """diagnose's experts probe forwards the layer's other keywords (a variant, a row bound)
    to the experts it wraps; a fault planted at the experts stage of a variant layer is refused
    (it computes plain SwiGLU)."""
    from rocm_moe.experts.reference import ReferenceExperts
    from rocm_moe.faults import ProbedExperts

    seen = {}

    class Spy(ReferenceExperts):
        def __call__(self, *args, **kw):
            seen.update(kw)
            return super().__call__(*args, **{k: v for k, v in kw.items()
                                              if k not in ("num_rows", "expected_rows")})

    probe = ProbedExperts(Spy(), None, None)
    emap = Placement.contiguous(E, 1).expert_map(0)
    x, ids = torch.randn(3, H), torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    rows = torch.tensor([3], dtype=torch.int32)
    probe(x, ids, torch.rand(3, K), w13, w2, emap, weight_mode="experts", num_rows=rows,
          expected_rows=3)
    assert seen["num_rows"] is rows
    assert seen["expected_rows"] == 3


def test_layer_validate_must_be_a_bool():
    with pytest.raises(TypeError, match="validate"):
        _layer(validate=1)


def test_num_chunks_checks_group_max_tokens_on_one_rank():
    disp = LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=4)
    assert disp.num_chunks(9, group_max_tokens=9) == 3
    with pytest.raises(ValueError, match="group_max_tokens"):
        disp.num_chunks(9, group_max_tokens=2)  # fewer than this rank's own tokens


def test_diagnose_refuses_a_batch_above_capacity():
    """diagnose's taps follow one dispatch: a batch the layer would run in chunks is refused by
    name (it crashed with an IndexError inside the dispatch check)."""
    disp = LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=4)
    layer = _layer(dispatcher=disp)
    layer.reset_parameters(0)
    with pytest.raises(ValueError, match="max_tokens_per_rank=4"):
        diagnose(layer, torch.randn(9, H))
    assert diagnose(layer, torch.randn(4, H)) is not None
