"""The array backend: which array module (`xp`) is in use, and moving arrays between host and device.

NumPy runs everywhere; CuPy runs on a CUDA device. `import cupy` succeeds on machines without a driver
and only the first allocation fails, so CuPy counts as usable only after a real probe: a device exists,
and a tiny allocation and kernel run. `auto` takes CuPy when that probe passes and NumPy otherwise,
remembering why. Nothing here imports CuPy until a backend asks for it. What an operation does
differently on each backend lives in `gpurnn.ops`.

On CuPy all of gpurnn's device work runs on one non-blocking stream, made CuPy's current stream when
the backend is chosen (`device_stream`): uploads, eager steps, steps replayed from a CUDA graph and
reads back are ordered on it without events, a graph can capture on it (the legacy default stream
cannot capture), and cuBLAS promises bitwise-equal results only for work on one stream. Before CuPy
is first imported, CUBLAS_WORKSPACE_CONFIG is set to ":4096:8" unless the environment says otherwise:
cuBLAS then keeps a fixed workspace (what a captured GEMM needs) and reproducible results even across
streams. It takes effect for a cuBLAS handle made after it, which is every handle CuPy makes for
gpurnn unless the process had used cuBLAS through CuPy before choosing the backend.
"""

import contextlib
import ctypes
import importlib.util
import os
import platform
import sys

import numpy as np

from .errors import BackendError

BACKEND_NAMES = ("numpy", "cupy", "auto")
DTYPES = {"float32": np.float32, "float64": np.float64}
CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # 8 buffers of 4 MiB per stream: deterministic cuBLAS (NVIDIA's docs)
_STREAM = []  # the one device stream, once made


def cuda_driver_problem():
    """Why the CUDA driver library cannot be loaded (Linux), or None. Much cheaper than importing
    CuPy, which a machine without a GPU would otherwise do on every `auto` start."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no usable CUDA driver (libcuda.so.1 cannot be loaded: {exc})"
    return None


def probe_cupy():
    """Return (cupy_module, None) when CuPy can really run a kernel here, else (None, reason)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    if "cupy" not in sys.modules:  # not imported yet: the cheap checks first
        if importlib.util.find_spec("cupy") is None:
            return None, "CuPy is not installed; install gpurnn[cuda12] or gpurnn[cuda13]"
        problem = cuda_driver_problem()
        if problem:
            return None, problem
    try:
        import cupy
    except ImportError as exc:
        return None, f"CuPy is not installed ({exc}); install gpurnn[cuda12] or gpurnn[cuda13]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises CUDARuntimeError, or others when the driver is missing
        return None, f"no usable CUDA driver ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "CUDA reports no device"
    try:
        value = int((cupy.arange(4, dtype=cupy.float32) * 2).sum().item())
    except Exception as exc:
        return None, f"a test kernel failed on the CUDA device ({type(exc).__name__}: {exc})"
    if value != 12:
        return None, f"a test kernel gave a wrong result ({value} instead of 12)"
    return cupy, None


def device_stream(cupy):
    """The non-blocking stream that gpurnn's device work runs on (one per process), made CuPy's
    current stream."""
    if not _STREAM:
        _STREAM.append(cupy.cuda.Stream(non_blocking=True))
    return _STREAM[0].use()


@contextlib.contextmanager
def using_stream(cupy, stream):
    """Make `stream` CuPy's current stream within the block and restore the one current before.

    Not `with stream:`: when the stream before was made current by `use()` (as `device_stream`
    does), CuPy 14 leaves the legacy default stream current after such a block (cupy/cupy#8377),
    and work queued there is not ordered with work on a non-blocking stream."""
    before = cupy.cuda.get_current_stream()
    stream.use()
    try:
        yield stream
    finally:
        before.use()


def array_module(array):
    """The array module (numpy or cupy) that owns `array`, without importing CuPy for NumPy arrays."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return np
    import cupy

    return cupy.get_array_module(array)


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Backend:
    """One array module with its float dtype; moves arrays, seeds initial values, synchronises.
    On CuPy, `stream` is the stream its work runs on (`device_stream`)."""

    def __init__(self, name, xp, dtype=np.float32, reason="", stream=None):
        self.name = name
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.reason = reason
        self.stream = stream

    def __repr__(self):
        return f"Backend({self.name!r}, dtype={self.dtype.name})"

    @property
    def is_gpu(self):
        return self.name == "cupy"

    def with_dtype(self, dtype):
        """The same backend with another float dtype (float64 for gradient checks)."""
        return Backend(self.name, self.xp, dtype, self.reason, self.stream)

    def asarray(self, array, dtype=None):
        """`array` on this backend's device (a no-op for arrays already there)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_host(self, array):
        """`array` as a NumPy array on the host."""
        if self.xp is np:
            return np.asarray(array)
        return self.xp.asnumpy(array)

    def host_rng(self, seed):
        """A NumPy generator; parameters are drawn on the host so both backends start identical."""
        return np.random.default_rng(seed)

    def synchronize(self):
        """Wait for all queued device work (needed before reading a wall clock on the GPU)."""
        if self.stream is not None:
            self.stream.synchronize()

    def describe(self):
        """A dict saying what runs the arrays: for `gpurnn info` and benchmark reports."""
        info = {"backend": self.name, "dtype": self.dtype.name, "why": self.reason,
                "numpy": np.__version__}
        if self.xp is np:
            info["device"] = cpu_name()
            info["cpu_count"] = os.cpu_count()
        else:
            cupy = self.xp
            device = cupy.cuda.Device()
            props = cupy.cuda.runtime.getDeviceProperties(device.id)
            name = props["name"]
            info["device"] = name.decode() if isinstance(name, bytes) else str(name)
            info["device_memory_bytes"] = int(props["totalGlobalMem"])
            info["cupy"] = cupy.__version__
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        return info


def get_backend(name=None, dtype="float32"):
    """The backend named `name` (or $GPURNN_BACKEND, default `auto`) with float dtype `dtype`."""
    name = (name or os.environ.get("GPURNN_BACKEND") or "auto").lower()
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BackendError(f"unknown dtype {dtype!r}; choose float32 or float64")
        dtype = DTYPES[dtype]
    if name == "numpy":
        return Backend("numpy", np, dtype, "asked for numpy")
    cupy, why_not = probe_cupy()
    if cupy is not None:
        return Backend("cupy", cupy, dtype, f"asked for {name}; a CUDA device is usable", device_stream(cupy))
    if name == "cupy":
        raise BackendError(f"the cupy backend is unusable: {why_not}; use --backend numpy")
    return Backend("numpy", np, dtype, f"auto: CuPy unusable ({why_not})")
