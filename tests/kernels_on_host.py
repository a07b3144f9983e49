"""Run gpurnn's CUDA kernels on the CPU, to check what they compute without a GPU.

The kernels in `gpurnn.ops.KERNELS` are grid-stride loops and one-row-per-block reductions, so with
one thread per block they are plain sequential C++: a few macros turn the CUDA source into a shared
library (g++), and a block index set before each call walks the grid. `host_kernels()` patches
`gpurnn.ops` so that its CuPy branches run on NumPy arrays with these compiled kernels: the launch
arguments, the kernels' arithmetic and the op's surrounding code are all exercised, only the GPU's
parallelism is not.
"""

import ctypes
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gpurnn import ops

SHIM = r"""
#include <algorithm>
#include <cmath>
using std::exp; using std::log; using std::max; using std::min; using std::sqrt; using std::tanh;
struct Dim { unsigned int x; };
static Dim threadIdx = {0}, blockIdx = {0}, blockDim = {1}, gridDim = {1};
extern "C" void set_grid(unsigned int block, unsigned int blocks) { blockIdx.x = block; gridDim.x = blocks; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads()
"""

_LIBRARIES = {}


def compiler():
    return shutil.which("g++")


def library(dtype):
    """All kernels for one float type, compiled into one shared library (cached per process)."""
    name = np.dtype(dtype).name
    if name not in _LIBRARIES:
        ctype = {"float32": "float", "float64": "double"}[name]
        source = f"typedef {ctype} T;\n{SHIM}\n{ops.CUDA_PREAMBLE}\n" + "\n".join(ops.KERNELS.values())
        folder = Path(tempfile.mkdtemp(prefix="gpurnn-kernels-"))
        (folder / "kernels.cpp").write_text(source)
        subprocess.run([compiler(), "-O1", "-shared", "-fPIC", "-o", str(folder / "kernels.so"),
                        str(folder / "kernels.cpp")], check=True, capture_output=True, text=True)
        _LIBRARIES[name] = ctypes.CDLL(str(folder / "kernels.so"))
    return _LIBRARIES[name]


def c_argument(value):
    if isinstance(value, np.ndarray):
        assert value.flags.c_contiguous, "kernels take C-contiguous arrays"
        return ctypes.c_void_p(value.ctypes.data)
    kinds = {np.int32: ctypes.c_int, np.int64: ctypes.c_longlong, np.uint32: ctypes.c_uint,
             np.float32: ctypes.c_float, np.float64: ctypes.c_double}
    return kinds[type(value)](value)


def launch_on_host(name, dtype, n, args, threads=ops.THREADS, blocks=None):
    """`ops._launch` with one thread per block: every block of the same grid, in turn."""
    lib = library(dtype)
    if blocks is None:
        blocks = max(1, min(-(-n // threads), 65535))
    kernel = getattr(lib, name)
    cargs = [c_argument(a) for a in args]
    for block in range(blocks):
        lib.set_grid(block, blocks)
        kernel(*cargs)


class HostCupy:
    """Stands in for the cupy module in ops' CuPy branches: numpy's functions, but not numpy itself."""

    def __getattr__(self, name):
        return getattr(np, name)

    def vdot(self, a, b):
        return np.asarray(np.vdot(a, b))  # CuPy's is a 0-d array on the device, read by the kernel


@contextmanager
def host_kernels():
    """Within this block, every op in gpurnn.ops takes its CuPy branch, running the kernels on the CPU."""
    saved = ops.array_module, ops._launch
    ops.array_module, ops._launch = (lambda array: HostCupy()), launch_on_host
    try:
        yield
    finally:
        ops.array_module, ops._launch = saved
