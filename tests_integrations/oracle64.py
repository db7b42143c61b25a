"""The float64 oracle and the seeded inputs both framework suites share.

Every expert's weights come from ``rocm_moe.synthetic`` (a function of (seed, g) only), so each
rank and the oracle regenerate them apart; the oracle sums w[t, k] * expert(x[t]) densely in
float64 from the global ids, with no rocm_moe stage in between."""

from __future__ import annotations

import torch

from rocm_moe import synthetic

# (E, H, I, K) and tokens per rank: uneven, one rank with none, sizes 1, 33.
SHAPE = dict(E=8, H=64, I=32, K=3)
TOKENS = {2: [0, 33], 3: [5, 0, 33]}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def tokens(seed: int, rank: int, T: int, E: int, H: int, K: int, dtype):
    """x [T, H], weights [T, K] float32, ids [T, K] int32 (distinct experts per token)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    w = torch.rand(T, K, generator=g) + 0.05
    return x, w.float(), ids.to(torch.int32)


def ids_on_rank0(T: int, e0: int, K: int) -> torch.Tensor:
    """[T, K] int32 ids all among rank 0's experts 0..e0-1 (contiguous placements); slots past
    e0 are empty (-1), so the other ranks receive no row."""
    ids = torch.full((T, K), -1, dtype=torch.int32)
    n = min(K, e0)
    g = torch.Generator().manual_seed(T * 31 + e0)
    for t in range(T):
        ids[t, :n] = torch.randperm(e0, generator=g)[:n].int()
    return ids


def expert_weights(seed: int, g: int, H: int, I: int, dtype):
    w13, w2 = synthetic.expert_weights(seed, g, H, I)
    return w13.to(dtype), w2.to(dtype)


def local_weights(seed: int, experts: tuple[int, ...], H: int, I: int, dtype):
    pairs = [expert_weights(seed, g, H, I, dtype) for g in experts]
    return (torch.stack([a for a, _ in pairs]).contiguous(),
            torch.stack([b for _, b in pairs]).contiguous())


def oracle(seed: int, x, w, ids, H: int, I: int, dtype) -> torch.Tensor:
    """[T, H] float64: sum_k w[t, k] * swiglu_{ids[t, k]}(x[t]) with the dtype's weights."""
    y = torch.zeros(x.shape[0], H, dtype=torch.float64)
    xd = x.double()
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            g = int(ids[t, k])
            if g < 0:
                continue
            w13, w2 = (a.double() for a in expert_weights(seed, g, H, I, dtype))
            h = xd[t] @ w13.T
            y[t] += float(w[t, k]) * ((torch.nn.functional.silu(h[:I]) * h[I:]) @ w2.T)
    return y


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    d = e.norm().item()
    return (a - e).norm().item() / d if d else (a - e).norm().item()
