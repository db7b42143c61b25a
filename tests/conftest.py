"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch

from rocm_moe import sanity as _sanity

# Without a GPU, Triton kernels run in Triton's interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The package's own error measure and tolerances against a float64 oracle, by compute dtype.
rel_err = _sanity.rel_err
TOL = _sanity.TOLERANCE


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test (the seed is in the failure's parameters)."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, (1,)).item())
