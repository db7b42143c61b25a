"""The engines' interleaved gate/up layout (gpt-oss checkpoints: w13 rows gate0, up0, gate1,
...) rewritten once as rocm_moe's (gate rows then up rows), and the mark that says it was."""

from __future__ import annotations

import torch

GATE_UP_ATTR = "_rocm_moe_gate_up"  # set on a w13 (and its bias) de-interleaved in place


def uninterleave_gate_up(w13: torch.Tensor, w13_bias: torch.Tensor | None = None, *,
                         permute: bool = True) -> None:
    """An engine's interleaved w13 [e, 2I, H] (and w13_bias [e, 2I]) rewritten in place as gate
    rows then up rows, rocm_moe's layout, and marked so (``is_gate_up``); ``permute=False``
    only marks them (weights an engine loaded already processed). Storage and Parameter
    objects stay the same (CUDA graphs, quant configs' bias references and EPLB hold them).

    Worked example (a test asserts it): rows [g0, u0, g1, u1] become [g0, g1, u0, u1]."""
    with torch.no_grad():
        for t in (w13, w13_bias):
            if t is not None:
                if permute:
                    t.copy_(torch.cat([t[:, 0::2], t[:, 1::2]], dim=1))
                setattr(t, GATE_UP_ATTR, True)


def is_gate_up(w13: torch.Tensor) -> bool:
    """Whether ``uninterleave_gate_up`` rewrote (or marked) this tensor."""
    return bool(getattr(w13, GATE_UP_ATTR, False))
