"""Run gpurnn's CUDA kernels on the CPU, to check what they compute without a GPU.

The kernels in `gpurnn.ops.KERNELS` are grid-stride loops and one-row-per-block reductions, so with
one thread per block they are plain sequential C++: a few macros turn the CUDA source into a shared
library (g++), and a wrapper generated for each kernel walks its grid block by block. Every launch
is checked against the kernel's C signature first (pointer or scalar, and which type), the mistakes
that a GPU would answer with garbage rather than an error. `host_kernels()` patches `gpurnn.ops` so
that its CuPy branches run on NumPy arrays with these compiled kernels: the launch arguments, the
kernels' arithmetic and the op's surrounding code are all exercised, only the GPU's parallelism is
not.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gpurnn import ops
from gpurnn.ops import kernels

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
using std::exp; using std::log; using std::max; using std::min; using std::sqrt; using std::tanh;
struct Dim { unsigned int x; };
static thread_local Dim threadIdx = {0};
static Dim blockIdx = {0}, blockDim = {1}, gridDim = {1};
static std::barrier<>* block_barrier = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() (block_barrier ? block_barrier->arrive_and_wait() : void())
"""

# C parameter type -> (ctypes type of a scalar, or None for a pointer; dtype name, "T" for the float)
C_TYPES = {"int": (ctypes.c_int, "int32"), "long long": (ctypes.c_longlong, "int64"),
           "unsigned int": (ctypes.c_uint, "uint32"), "int*": (None, "int32"),
           "unsigned int*": (None, "uint32"), "T": (None, "T"), "T*": (None, "T")}
_LIBRARIES = {}


def compiler():
    return shutil.which("g++")


def signatures():
    """{kernel name: [(C type, parameter name), ...]} read from the kernels' CUDA source."""
    found = {}
    for name, source in ops.KERNELS.items():
        match = re.search(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', source, re.S)
        assert match and match.group(1) == name, f"kernel {name}: no signature found"
        params = []
        for param in match.group(2).split(","):
            words = param.replace("*", "* ").replace("const ", "").split()
            params.append(("".join(w if w.endswith("*") else w + " " for w in words[:-1]).strip()
                           .replace(" *", "*"), words[-1]))
        found[name] = params
    return found


def grid_wrapper(name, params):
    """C++ for `name__grid(blocks, threads, args...)`: the kernel over a grid of `blocks` blocks, one
    block after another, each block's `threads` threads on as many host threads meeting at a barrier
    for `__syncthreads()` (one thread: a plain loop, much faster)."""
    decl = ", ".join(f"{ctype} {pname}" for ctype, pname in params)
    names = ", ".join(pname for _, pname in params)
    return f"""extern "C" void {name}__grid(unsigned int blocks, unsigned int threads, {decl}) {{
    gridDim.x = blocks; blockDim.x = threads;
    for (unsigned int block_ = 0; block_ < blocks; ++block_) {{
        blockIdx.x = block_;
        if (threads == 1) {{ threadIdx.x = 0; {name}({names}); continue; }}
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> team;
        for (unsigned int thread_ = 0; thread_ < threads; ++thread_)
            team.emplace_back([&, thread_] {{ threadIdx.x = thread_; {name}({names}); }});
        for (auto& member : team) member.join();
        block_barrier = nullptr;
    }}
}}
"""


def library(dtype):
    """All kernels for one float type, compiled into one shared library (cached in the temporary
    folder by a digest of the source, and per process)."""
    name = np.dtype(dtype).name
    if name not in _LIBRARIES:
        ctype = {"float32": "float", "float64": "double"}[name]
        wrappers = "\n".join(grid_wrapper(k, p) for k, p in signatures().items())
        source = (f"typedef {ctype} T;\n{SHIM}\n{kernels.CUDA_PREAMBLE}\n" + "\n".join(ops.KERNELS.values())
                  + "\n" + wrappers)
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        built = Path(tempfile.gettempdir()) / f"gpurnn-host-kernels-{digest}.so"
        if not built.exists():  # built once per source, shared by every process
            with tempfile.TemporaryDirectory(prefix="gpurnn-kernels-", dir=built.parent) as folder:
                cpp, so = Path(folder) / "kernels.cpp", Path(folder) / "kernels.so"
                cpp.write_text(source)
                subprocess.run([compiler(), "-std=c++20", "-pthread", "-O1", "-shared", "-fPIC",
                                "-o", str(so), str(cpp)], check=True, capture_output=True, text=True)
                os.replace(so, built)  # whole, or not at all, for a process starting beside this one
        _LIBRARIES[name] = ctypes.CDLL(str(built))
    return _LIBRARIES[name]


def c_arguments(name, dtype, args):
    """`args` as ctypes values after checking each against kernel `name`'s C signature."""
    params = signatures()[name]
    assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
    float_c = {"float32": ctypes.c_float, "float64": ctypes.c_double}[np.dtype(dtype).name]
    converted = []
    for value, (ctype, pname) in zip(args, params):
        scalar, want = C_TYPES[ctype]
        want = np.dtype(dtype).name if want == "T" else want
        where = f"{name}({pname}: {ctype})"
        if ctype.endswith("*"):
            assert isinstance(value, np.ndarray), f"{where} got {type(value).__name__}, not an array"
            assert value.dtype.name == want, f"{where} got a {value.dtype.name} array"
            assert value.flags.c_contiguous, f"{where} got an array that is not C-contiguous"
            converted.append(ctypes.c_void_p(value.ctypes.data))
        else:
            assert isinstance(value, np.generic) and value.dtype.name == want, \
                f"{where} got {type(value).__name__} {value!r}, not a numpy {want} scalar"
            converted.append((scalar or float_c)(value))
    return converted


def launch_on_host(name, dtype, n, args, threads=kernels.THREADS, blocks=None):
    """`gpurnn.ops.kernels.launch` on the host: the same grid, each block on one thread or (`block_threads()`) on
    as many threads as the GPU would give it."""
    if blocks is None:
        blocks = kernels.grid_blocks(n, threads)
    run_grid(name, dtype, blocks, args, threads if _FULL_BLOCKS else 1)


def run_grid(name, dtype, blocks, args, threads=1):
    """Kernel `name` for float type `dtype` over `blocks` blocks of `threads` threads."""
    grid = getattr(library(dtype), f"{name}__grid")
    grid(ctypes.c_uint(blocks), ctypes.c_uint(threads), *c_arguments(name, dtype, args))


class HostCupy:
    """Stands in for the cupy module in ops' CuPy branches: numpy's functions, but not numpy itself."""

    def __getattr__(self, name):
        return getattr(np, name)


_FULL_BLOCKS = False


@contextmanager
def host_kernels(full_blocks=False):
    """Within this block, every op in gpurnn.ops takes its CuPy branch, running the kernels on the CPU;
    with `full_blocks`, each block on as many threads as on the GPU (block reductions really run)."""
    global _FULL_BLOCKS
    stand_ins = {"array_module": lambda array: HostCupy(), "launch": launch_on_host}
    saved = [(module, name, getattr(module, name)) for module in _op_modules() for name in stand_ins
             if hasattr(module, name)]
    saved_blocks, _FULL_BLOCKS = _FULL_BLOCKS, full_blocks
    for module, name, _ in saved:
        setattr(module, name, stand_ins[name])
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        _FULL_BLOCKS = saved_blocks


def _op_modules():
    """gpurnn.ops's family modules: each holds its own reference to array_module and launch."""
    return [module for name, module in sorted(sys.modules.items()) if name.startswith("gpurnn.ops.")]
