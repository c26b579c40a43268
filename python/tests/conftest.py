"""Shared helpers for the softce Python tests (torch 2.13.0, CPU)."""

import numpy as np
import pytest
import torch

# torch's intra-op threads (OpenMP) only slow the small reference computations down here and
# compete with softce's own pool; softce's results do not depend on either thread count.
torch.set_num_threads(1)


# Tolerances of a comparison against torch in the input's dtype: float32 / float64 agree to
# rounding; the 16-bit types are computed in float32 by softce but with 16-bit intermediates
# by torch, so only a few units in their last place.
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


def assert_close(actual, expected, dtype=None, scale=1.0, **kwargs):
    """torch.testing.assert_close with the dtype's tolerance; `scale` widens it."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    tol = dict(TOLERANCE[dtype or expected.dtype])
    tol = {k: v * scale for k, v in tol.items()}
    tol.update(kwargs)
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **tol)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
