"""Shared fixtures: backends, the registry, and a skip marker for tests that need a CUDA device."""

import numpy as np
import pytest

from gpurnn.backend import get_backend, probe_cupy
from gpurnn.registry import Registry

_cupy, _why_no_cupy = probe_cupy()
requires_gpu = pytest.mark.skipif(_cupy is None, reason=f"no usable CuPy device: {_why_no_cupy}")


@pytest.fixture(scope="session")
def registry():
    return Registry()


@pytest.fixture
def np64():
    return get_backend("numpy", dtype="float64")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
