"""Backend choice: numpy/cupy/auto, the CuPy probe (simulated where no GPU), transfers and dtypes."""

import os
import sys
import types

import numpy as np
import pytest

import gpurnn.backend as backend_mod
from gpurnn.backend import get_backend, probe_cupy
from gpurnn.ops import scatter_add_rows
from gpurnn.errors import BackendError

from .conftest import requires_gpu


def fake_cupy(device_count=None, raises=None, kernel_value=12):
    """A stand-in CuPy module whose runtime behaves as on a machine with the given problem."""
    def get_device_count():
        if raises:
            raise raises
        return device_count

    class FakeArray:
        def __mul__(self, other):
            return self

        def sum(self):
            return types.SimpleNamespace(item=lambda: kernel_value)

    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime), float32="float32",
                                 arange=lambda n, dtype=None: FakeArray())


@pytest.mark.parametrize("module, why", [
    (None, "not installed"),
    (fake_cupy(raises=RuntimeError("cudaErrorInsufficientDriver")), "no usable CUDA driver"),
    (fake_cupy(device_count=0), "no device"),
    (fake_cupy(device_count=1, kernel_value=5), "wrong result"),
])
def test_unusable_cupy(monkeypatch, module, why):
    monkeypatch.setitem(sys.modules, "cupy", module)
    cupy, reason = probe_cupy()
    assert cupy is None and why in reason
    with pytest.raises(BackendError) as info:
        get_backend("cupy")
    assert why in str(info.value) and "--backend numpy" in str(info.value)
    auto = get_backend("auto")
    assert auto.name == "numpy" and why in auto.reason


def test_probing_cupy_fixes_cublas_workspace_unless_the_environment_chose(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(device_count=0))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    probe_cupy()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    probe_cupy()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_env_chooses_backend_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setenv("GPURNN_BACKEND", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.setenv("GPURNN_BACKEND", "tpu")
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        get_backend()
    with pytest.raises(BackendError, match="unknown dtype"):
        get_backend("numpy", dtype="float16")


def test_importing_gpurnn_does_not_import_cupy():
    import subprocess
    code = "import sys, gpurnn, gpurnn.cli, gpurnn.testing; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_numpy_backend_basics():
    b = get_backend("numpy", dtype="float64")
    assert b.dtype == np.float64 and b.with_dtype(np.float32).dtype == np.float32
    a = b.asarray([1, 2], dtype=b.dtype)
    assert b.to_host(a) is not None and b.to_host(a).dtype == np.float64
    b.synchronize()
    info = b.describe()
    assert info["backend"] == "numpy" and info["device"]
    r1, r2 = b.host_rng(5), b.host_rng(5)
    assert r1.standard_normal() == r2.standard_normal()


def test_scatter_add_rows_matches_add_at(rng):
    target = np.zeros((7, 3))
    index = rng.integers(0, 7, 50)
    rows = rng.standard_normal((50, 3))
    scatter_add_rows(target, index, rows)
    expected = np.zeros((7, 3))
    np.add.at(expected, index, rows)
    np.testing.assert_allclose(target, expected, rtol=1e-12)


@requires_gpu
def test_cupy_backend_roundtrip():
    b = get_backend("cupy")
    a = b.asarray(np.arange(6, dtype=np.float32))
    assert backend_mod.array_module(a) is b.xp
    np.testing.assert_array_equal(b.to_host(a * 2), np.arange(6) * 2)
    assert b.describe()["device"]
