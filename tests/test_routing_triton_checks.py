"""fused_route called directly (issue 34's eyes on the one-launch router): a bias of the wrong
length or kind is refused (the kernel read E values from it), and logits on a device Triton
cannot run on are reported unsupported (route(fused=True) then takes the torch path)."""

from __future__ import annotations

import pytest
import torch

from rocm_moe.routing import RouterConfig, route

pytest.importorskip("triton")


@pytest.mark.parametrize("bias", [torch.zeros(7), torch.zeros(8, dtype=torch.int64),
                                  torch.zeros(2, 8), [0.0] * 8],
                         ids=["short", "integer", "2d", "list"])
def test_bad_bias_refused(bias):
    from rocm_moe._routing_triton import fused_route

    cfg = RouterConfig.deepseek_v3(8, 2, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="bias_E"):
        fused_route(logits_TE=torch.zeros(3, 8), config=cfg, bias_E=bias)


def test_cpu_logits_without_the_interpreter_are_unsupported(monkeypatch):
    from rocm_moe._routing_triton import fused_route_unsupported

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = RouterConfig.qwen3_moe(8, 2)
    x = torch.randn(3, 8)
    assert "Triton runs on" in fused_route_unsupported(x, cfg)
    r = route(x, cfg, fused=True)  # falls back to the torch path
    assert torch.equal(r.topk_ids, route(x, cfg).topk_ids)
