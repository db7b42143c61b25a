"""Float64 oracles of the engines' own expert variants, and seeded weights for them (shared by
the vLLM and SGLang suites).

The oracle reads the expert weights in the layout the engine's own kernels read (for vLLM's
SWIGLUOAI: w13 rows interleaved, gate0, up0, gate1, ...; for SGLang's and vLLM's other
activations: gate rows then up rows) and computes, per token,

    y[t] = sum_k w[t, k] * (act(x[t] @ w13[g].T + b13[g]) @ w2[g].T + b2[g])

in float64 from the global ids, with no rocm_moe code in between; ``weights_on_input`` moves
w[t, k] onto the input instead (Llama 4). ``act`` is gpt-oss's clamped SwiGLU (vLLM's
``SwigluOAIAndMul.forward_native``, SGLang's ``swiglu_limit`` / ``gemm1_alpha`` path):
gate <= limit, up in [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate); or SiLU."""

from __future__ import annotations

import torch


def expert_params(seed: int, E: int, H: int, I: int, dtype, *, bias: bool = True,
                  scale: float = 0.5) -> dict:
    """w13 [E, 2I, H], w2 [E, H, I] and biases b13 [E, 2I], b2 [E, H] in ``dtype``; the scale
    makes |x @ w13.T| exceed gpt-oss's limit 7 on a few percent of entries (the clamp
    matters)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(w13=torch.randn(E, 2 * I, H, generator=g) * scale,
               w2=torch.randn(E, H, I, generator=g) * (scale / 4))
    if bias:
        out.update(b13=torch.randn(E, 2 * I, generator=g) * scale,
                   b2=torch.randn(E, H, generator=g) * scale)
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def interleave(t: torch.Tensor) -> torch.Tensor:
    """Gate rows then up rows along dim 1 -> interleaved rows (gate0, up0, gate1, ...)."""
    half = t.shape[1] // 2
    return torch.stack([t[:, :half], t[:, half:]], dim=2).reshape(t.shape).contiguous()


def gpt_oss_checkpoint(p: dict) -> dict:
    """The same experts as gpt-oss's checkpoint holds them (transformers' GptOssExperts):
    gate_up_proj [E, H, 2I] with interleaved columns, gate_up_proj_bias [E, 2I] interleaved,
    down_proj [E, I, H], down_proj_bias [E, H]."""
    return dict(gate_up_proj=interleave(p["w13"]).transpose(1, 2).contiguous(),
                gate_up_proj_bias=interleave(p["b13"]),
                down_proj=p["w2"].transpose(1, 2).contiguous(), down_proj_bias=p["b2"])


def swiglu_oai(gate, up, alpha: float, limit: float | None):
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def oracle(x, w, ids, p: dict, *, act: str = "swiglu_oai", alpha: float = 1.702,
           limit: float | None = 7.0, interleaved: bool = False,
           weights_on_input: bool = False) -> torch.Tensor:
    """[T, H] float64 (see the module docstring); ``p`` from ``expert_params`` in the
    engine's layout (``interleaved``: w13 / b13 rows interleaved)."""
    T, H = x.shape[0], p["w2"].shape[1]
    y = torch.zeros(T, H, dtype=torch.float64)
    xd = x.double()
    for t in range(T):
        for k in range(ids.shape[1]):
            g = int(ids[t, k])
            if g < 0:
                continue
            xin = xd[t] * float(w[t, k]) if weights_on_input else xd[t]
            h = xin @ p["w13"][g].double().T
            if "b13" in p:
                h = h + p["b13"][g].double()
            gate, up = (h[0::2], h[1::2]) if interleaved else h.chunk(2)
            a = swiglu_oai(gate, up, alpha, limit) if act == "swiglu_oai" \
                else torch.nn.functional.silu(gate) * up
            o = a @ p["w2"][g].double().T
            if "b2" in p:
                o = o + p["b2"][g].double()
            y[t] += o if weights_on_input else float(w[t, k]) * o
    return y
