"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch

from rocm_moe import sanity as _sanity

# Without a GPU, Triton kernels run in Triton's interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread in the test process: its tensors are tiny, and on a small CPU host
    # shared with spawned ranks (or other jobs) a second OpenMP thread spinning for a core made
    # in-process tests 3-5x slower (tests/test_layer.py + test_planted.py at load ~8 on 2 cores:
    # 33-43 s -> 8-11 s). Spawned CPU ranks likewise (rocm_moe.distributed.launch reads it;
    # at W = 1 a rank took two: test_model's W = 1 stack 55.7 s with two, 1.6 s with one).
    torch.set_num_threads(1)
    os.environ.setdefault("ROCM_MOE_THREADS_PER_RANK", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The package's own error measure and tolerances against a float64 oracle, by compute dtype.
rel_err = _sanity.rel_err
TOL = _sanity.TOLERANCE


def compile_in_workers(fn, jobs: list, workers: int) -> list:
    """``fn`` over ``jobs`` in ``workers`` spawned processes that compile Triton kernels for
    real: this session runs them under the interpreter (TRITON_INTERPRET=1 above turns
    @triton.jit into a Python stand-in at import), and spawned workers start from this
    environment, so it is switched off (and Triton's default FP fusion set) around the pool."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    os.environ.update(TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, jobs))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test (the seed is in the failure's parameters)."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, (1,)).item())
