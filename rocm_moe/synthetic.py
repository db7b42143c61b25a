"""Seeded synthetic weights and tokens, reproducible per global expert id.

Expert g's weights depend only on (seed, g), never on the world size or the rank that holds
them, so every rank can regenerate any expert for a float64 check, and an EP run on W ranks can
be compared with a single-process run expert by expert. Scales keep activations O(1):
N(0, 1/fan_in). Weights are drawn on the CPU; ``device=`` draws them with that device's
generator instead (the same per (seed, g) on that device type, other numbers than the CPU's:
for benchmarks that only time, where DeepSeek-V3's 11G CPU draws take minutes).
"""

from __future__ import annotations

import torch

# Streams: distinct offsets keep the generators of different tensors apart.
_GATE, _SHARED, _EXPERT, _TOKENS = 1, 2, 1_000, 10_000_000


def _randn(seed: int, shape: tuple[int, ...], fan_in: int,
           device: torch.device | None = None) -> torch.Tensor:
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32, device=device or "cpu") / \
        fan_in**0.5


def gate_weight(seed: int, num_experts: int, hidden: int) -> torch.Tensor:
    """[E, H] float32 router weight."""
    return _randn(seed * 7919 + _GATE, (num_experts, hidden), hidden)


def expert_weights(seed: int, expert: int, hidden: int, inter: int,
                   device: torch.device | None = None):
    """(w13 [2I, H], w2 [H, I]) float32 of global expert ``expert``."""
    base = seed * 7919 + _EXPERT + 2 * expert
    return (_randn(base, (2 * inter, hidden), hidden, device),
            _randn(base + 1, (hidden, inter), inter, device))


def shared_weights(seed: int, hidden: int, inter: int, device: torch.device | None = None):
    """(w13 [2I, H], w2 [H, I], gate [1, H]) float32 of the shared experts."""
    base = seed * 7919 + _SHARED
    return (_randn(base, (2 * inter, hidden), hidden, device),
            _randn(base + 100, (hidden, inter), inter, device),
            _randn(base + 200, (1, hidden), hidden, device))


def tokens(seed: int, rank: int, num_tokens: int, hidden: int) -> torch.Tensor:
    """[T, H] float32 input of one rank."""
    g = torch.Generator().manual_seed(seed * 7919 + _TOKENS + rank)
    return torch.randn(num_tokens, hidden, generator=g)
