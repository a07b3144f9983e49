"""The array backend: which array module (`xp`) is in use, and the few things that differ between them.

NumPy runs everywhere; CuPy runs on a CUDA device. `import cupy` succeeds on machines without a driver
and only the first allocation fails, so CuPy counts as usable only after a real probe: a device exists,
and a tiny allocation and kernel run. `auto` takes CuPy when that probe passes and NumPy otherwise,
remembering why. Nothing here imports CuPy until a backend asks for it.
"""

import os
import platform
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import BackendError

BACKEND_NAMES = ("numpy", "cupy", "auto")
DTYPES = {"float32": np.float32, "float64": np.float64}


def probe_cupy():
    """Return (cupy_module, None) when CuPy can really run a kernel here, else (None, reason)."""
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


def array_module(array):
    """The array module (numpy or cupy) that owns `array`, without importing CuPy for NumPy arrays."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return np
    import cupy

    return cupy.get_array_module(array)


def scatter_add_rows(target, index, rows):
    """target[index[i]] += rows[i] for every i, with repeated indices summed.

    The embedding's backward. NumPy's `np.add.at` is slow, so on NumPy the rows are sorted by index and
    summed per run with `np.add.reduceat`; CuPy has an atomic `scatter_add`.
    """
    xp = array_module(target)
    if xp is np:
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
        target[sorted_index[starts]] += np.add.reduceat(rows[order], starts, axis=0)
    else:
        import cupyx

        cupyx.scatter_add(target, index, rows)


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


_POOL = None
ROW_BLOCK = 32


def cpu_threads():
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def for_row_blocks(array, fn, block=ROW_BLOCK):
    """Call fn(lo, hi) over row ranges covering array's rows: cache-sized blocks on all CPU cores.

    For wide per-row work such as a softmax over a 10,000-word vocabulary. On NumPy the rows go in
    blocks that fit in a core's cache, so the several passes of a softmax read memory once, and the
    blocks run on a thread pool (NumPy's loops release the GIL). Each block's work is independent, so
    results do not depend on the scheduling. On CuPy one call covers all rows: the GPU is the parallel part.
    """
    global _POOL
    n = array.shape[0]
    if array_module(array) is not np:
        fn(0, n)
        return
    threads = cpu_threads()
    if threads == 1 or n <= block:
        for lo in range(0, n, block):
            fn(lo, min(lo + block, n))
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpurnn-rows")
    step = -(-n // threads)  # each thread takes one contiguous share, in cache-sized blocks

    def share(start):
        for lo in range(start, min(start + step, n), block):
            fn(lo, min(lo + block, n, start + step))

    for future in [_POOL.submit(share, start) for start in range(0, n, step)]:
        future.result()


class Backend:
    """One array module with its float dtype; moves arrays, seeds random numbers, synchronises."""

    def __init__(self, name, xp, dtype=np.float32, reason=""):
        self.name = name
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.reason = reason

    def __repr__(self):
        return f"Backend({self.name!r}, dtype={self.dtype.name})"

    @property
    def is_gpu(self):
        return self.name == "cupy"

    def with_dtype(self, dtype):
        """The same backend with another float dtype (float64 for gradient checks)."""
        return Backend(self.name, self.xp, dtype, self.reason)

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

    def generator(self, seed):
        """A random generator on the device, for sampling during training (dropout masks).

        On NumPy its state can be saved and restored exactly (`generator_state`), so a resumed run
        draws the same masks as an uninterrupted one.
        """
        if self.xp is np:
            return np.random.default_rng(seed)
        return self.xp.random.default_rng(seed)

    def generator_state(self, generator):
        """The generator's state as a JSON-able dict (NumPy), or None where it cannot be saved (CuPy).

        PCG64's 128-bit integers are written as decimal strings, which every JSON reader keeps exactly.
        """
        if self.xp is not np:
            return None
        state = generator.bit_generator.state
        return {**state, "state": {k: str(v) for k, v in state["state"].items()}}

    def set_generator_state(self, generator, state):
        """Restore a state from `generator_state` (its integers as strings or, in older files, numbers)."""
        if state is not None and self.xp is np:
            generator.bit_generator.state = {**state, "state": {k: int(v) for k, v in state["state"].items()}}

    def synchronize(self):
        """Wait for all queued device work (needed before reading a wall clock on the GPU)."""
        if self.xp is not np:
            self.xp.cuda.Stream.null.synchronize()

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
        return Backend("cupy", cupy, dtype, f"asked for {name}; a CUDA device is usable")
    if name == "cupy":
        raise BackendError(f"the cupy backend is unusable: {why_not}; use --backend numpy")
    return Backend("numpy", np, dtype, f"auto: CuPy unusable ({why_not})")
