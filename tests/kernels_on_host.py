"""Run gpurnn's CUDA kernels on the CPU, to check what they compute without a GPU.

The kernels in `gpurnn.ops.KERNELS` are grid-stride loops and block reductions, so a few macros turn
the CUDA source into host C++ (a shared library built with g++), and a wrapper generated for each
kernel walks its grid. Every launch is checked against the kernel's C signature first (pointer or
scalar, and which type), the mistakes that a GPU would answer with garbage rather than an error.
`host_kernels()` patches `gpurnn.ops` so that its CuPy branches run on NumPy arrays with these
compiled kernels: the launch arguments, the kernels' arithmetic and the op's surrounding code are
all exercised.

How a grid is walked, and what that can show:

- blocks run one after another in an order given per launch: `shuffled` (the default), `reverse` or
  `forward`. A GPU runs them in no fixed order and at once, so a kernel whose result depends on the
  order (one block reading what another writes in the same launch) gives a different answer here
  than its NumPy twin;
- a block has one thread (a grid-stride loop then does all the work; the fastest walk) or, with full
  blocks, as many as on the GPU. A kernel without `__syncthreads()` then runs its threads one after
  another in the same kind of order; one with barriers runs them as fibers on one host thread: each
  thread runs up to its next `__syncthreads()`, in that order, and the block goes on when every
  thread has arrived. Shared memory read before the barrier that would order it gives an answer
  that depends on the order, and a barrier that some threads of a block never reach (one inside a
  divergent branch) is reported as an error.

What it cannot show: the GPU's real concurrency within a phase (warp scheduling, memory ordering),
timing, and memory limits; `compute-sanitizer` on a GPU (scripts/gpu_check.sh) covers those.
"""

import ctypes
import functools
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
#include <cmath>
#include <functional>
#include <mutex>
#include <vector>
#include <ucontext.h>
using std::exp; using std::log; using std::max; using std::min; using std::sqrt; using std::tanh;
struct Dim { unsigned int x; };
static Dim threadIdx = {0}, blockIdx = {0}, blockDim = {1}, gridDim = {1};
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

// A block whose kernel synchronises runs its threads as fibers on this host thread.
static struct {
    std::vector<ucontext_t> context;
    std::vector<char> done, stacks;
    ucontext_t scheduler;
    unsigned int current = 0;
    bool on = false;
    const std::function<void()>* body = nullptr;
} team;
static const size_t FIBER_STACK = 1 << 16;
static void sync_threads() { if (team.on) swapcontext(&team.context[team.current], &team.scheduler); }
#define __syncthreads() sync_threads()
static void fiber_main() { (*team.body)(); team.done[team.current] = 1; }  // then back to the scheduler

// Each thread runs up to its next barrier, in `order`; 1 when a barrier is reached by some of the
// block's threads while the others have finished (a __syncthreads() in a divergent branch).
static int run_block_as_fibers(unsigned int threads, const unsigned int* order, const std::function<void()>& body) {
    team.context.resize(threads);
    team.done.assign(threads, 0);
    team.stacks.resize(threads * FIBER_STACK);
    team.body = &body;
    for (unsigned int t = 0; t < threads; ++t) {
        ucontext_t& c = team.context[t];
        getcontext(&c);
        c.uc_stack.ss_sp = &team.stacks[t * FIBER_STACK];
        c.uc_stack.ss_size = FIBER_STACK;
        c.uc_link = &team.scheduler;
        makecontext(&c, fiber_main, 0);
    }
    team.on = true;
    int status = 0;
    for (;;) {
        unsigned int waiting = 0;
        for (unsigned int k = 0; k < threads; ++k) {
            unsigned int t = order[k];
            if (team.done[t]) continue;
            team.current = t;
            threadIdx.x = t;
            swapcontext(&team.scheduler, &team.context[t]);
            waiting += !team.done[t];
        }
        if (waiting == 0) break;
        if (waiting != threads) { status = 1; break; }
    }
    team.on = false;
    return status;
}

static int walk_grid(unsigned int blocks, unsigned int threads, const unsigned int* block_order,
                     const unsigned int* thread_order, bool synchronises, const std::function<void()>& body) {
    static std::mutex busy;  // one grid at a time: the indices and the shared memory are global
    std::lock_guard<std::mutex> hold(busy);
    gridDim.x = blocks; blockDim.x = threads;
    for (unsigned int b = 0; b < blocks; ++b) {
        blockIdx.x = block_order[b];
        if (synchronises && threads > 1) {
            if (run_block_as_fibers(threads, thread_order, body)) return 1;
            continue;
        }
        for (unsigned int k = 0; k < threads; ++k) { threadIdx.x = thread_order[k]; body(); }
    }
    return 0;
}
"""

# C parameter type -> (ctypes type of a scalar, or None for a pointer; dtype name, "T" for the float)
C_TYPES = {"int": (ctypes.c_int, "int32"), "long long": (ctypes.c_longlong, "int64"),
           "unsigned int": (ctypes.c_uint, "uint32"), "int*": (None, "int32"),
           "unsigned int*": (None, "uint32"), "T": (None, "T"), "T*": (None, "T")}
ORDERS = ("shuffled", "reverse", "forward")
# How the stand-in for CuPy (tests/hostcupy) walks grids, from its environment.
SETTINGS = {"full_blocks": os.environ.get("HOST_KERNELS_BLOCKS") == "full",
            "order": os.environ.get("HOST_KERNELS_ORDER", "shuffled")}
_LIBRARIES = {}


def compiler():
    return shutil.which("g++")


def signature(source, name):
    """[(C type, parameter name), ...] of kernel `name` in `source`."""
    match = re.search(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', source, re.S)
    assert match and match.group(1) == name, f"kernel {name}: no signature found"
    params = []
    for param in match.group(2).split(","):
        words = param.replace("*", "* ").replace("const ", "").split()
        params.append(("".join(w if w.endswith("*") else w + " " for w in words[:-1]).strip()
                       .replace(" *", "*"), words[-1]))
    return params


def signatures(sources=None):
    """{kernel name: [(C type, parameter name), ...]} read from the kernels' CUDA source."""
    return {name: signature(source, name) for name, source in (sources or ops.KERNELS).items()}


def grid_wrapper(name, source):
    """C++ for `name__grid(blocks, threads, block_order, thread_order, args...)`: the kernel over a
    grid of `blocks` blocks of `threads` threads, in the orders given; non-zero where a block's
    threads did not all reach its barriers."""
    params = signature(source, name)
    decl = ", ".join(f"{ctype} {pname}" for ctype, pname in params)
    names = ", ".join(pname for _, pname in params)
    synchronises = "true" if "__syncthreads" in source else "false"
    return f"""extern "C" int {name}__grid(unsigned int blocks, unsigned int threads, const unsigned int* block_order,
                                  const unsigned int* thread_order, {decl}) {{
    return walk_grid(blocks, threads, block_order, thread_order, {synchronises}, [&] {{ {name}({names}); }});
}}
"""


def library(dtype, sources=None):
    """The kernels of `sources` (default: all of gpurnn's) for one float type, compiled into one
    shared library (cached in the temporary folder by a digest of the source, and per process)."""
    sources = sources or ops.KERNELS
    ctype = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    wrappers = "\n".join(grid_wrapper(name, source) for name, source in sources.items())
    source = (f"typedef {ctype} T;\n{SHIM}\n{kernels.CUDA_PREAMBLE}\n" + "\n".join(sources.values())
              + "\n" + wrappers)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    if digest not in _LIBRARIES:
        built = Path(tempfile.gettempdir()) / f"gpurnn-host-kernels-{digest}.so"
        if not built.exists():  # built once per source, shared by every process
            with tempfile.TemporaryDirectory(prefix="gpurnn-kernels-", dir=built.parent) as folder:
                cpp, so = Path(folder) / "kernels.cpp", Path(folder) / "kernels.so"
                cpp.write_text(source)
                subprocess.run([compiler(), "-std=c++20", "-O1", "-shared", "-fPIC",
                                "-o", str(so), str(cpp)], check=True, capture_output=True, text=True)
                os.replace(so, built)  # whole, or not at all, for a process starting beside this one
        _LIBRARIES[digest] = ctypes.CDLL(str(built))
    return _LIBRARIES[digest]


def c_arguments(name, dtype, args, sources=None):
    """`args` as ctypes values after checking each against kernel `name`'s C signature."""
    params = signatures(sources)[name]
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


@functools.lru_cache(maxsize=256)
def walk_order(kind, count):
    """The order `kind` of `count` blocks or threads, as a uint32 array (a fixed shuffle per count)."""
    if kind not in ORDERS:
        raise ValueError(f"unknown order {kind!r}; use one of {', '.join(ORDERS)}")
    order = np.arange(count, dtype=np.uint32)
    if kind == "reverse":
        return np.ascontiguousarray(order[::-1])
    if kind == "shuffled":
        return np.random.default_rng(count).permutation(order)
    return order


def block_threads(threads):
    """The threads per block a launch of `threads` gets here: all of them with full blocks, else one."""
    return threads if SETTINGS["full_blocks"] else 1


def launch_on_host(name, dtype, n, args, threads=kernels.THREADS, blocks=None):
    """`gpurnn.ops.kernels.launch` on the host: the same grid, each block on one thread or (full
    blocks) on as many as the GPU would give it."""
    if blocks is None:
        blocks = kernels.grid_blocks(n, threads)
    run_grid(name, dtype, blocks, args, block_threads(threads))


def run_grid(name, dtype, blocks, args, threads=1, order=None, sources=None):
    """Kernel `name` for float type `dtype` over `blocks` blocks of `threads` threads, blocks and
    threads in `order` (default: SETTINGS's); `sources` other kernels than gpurnn's."""
    order = order or SETTINGS["order"]
    grid = getattr(library(dtype, sources), f"{name}__grid")
    block_order, thread_order = walk_order(order, blocks), walk_order(order, threads)
    status = grid(ctypes.c_uint(blocks), ctypes.c_uint(threads), ctypes.c_void_p(block_order.ctypes.data),
                  ctypes.c_void_p(thread_order.ctypes.data), *c_arguments(name, dtype, args, sources))
    if status:
        raise RuntimeError(f"{name}: a __syncthreads() that only some threads of a block reached "
                           f"(a barrier inside a divergent branch)")


class HostCupy:
    """Stands in for the cupy module in ops' CuPy branches: numpy's functions, but not numpy itself."""

    def __getattr__(self, name):
        return getattr(np, name)


@contextmanager
def host_kernels(full_blocks=False, order=None):
    """Within this block, every op in gpurnn.ops takes its CuPy branch, running the kernels on the CPU;
    with `full_blocks`, each block on as many threads as on the GPU (block reductions really run);
    blocks and threads in `order` (default: SETTINGS's)."""
    stand_ins = {"array_module": lambda array: HostCupy(), "launch": launch_on_host}
    saved = [(module, name, getattr(module, name)) for module in _op_modules() for name in stand_ins
             if hasattr(module, name)]
    saved_settings = dict(SETTINGS)
    SETTINGS.update(full_blocks=full_blocks, order=order or SETTINGS["order"])
    for module, name, _ in saved:
        setattr(module, name, stand_ins[name])
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        SETTINGS.update(saved_settings)


def _op_modules():
    """gpurnn.ops's family modules: each holds its own reference to array_module and launch."""
    return [module for name, module in sorted(sys.modules.items()) if name.startswith("gpurnn.ops.")]
