"""CUDA kernels: their shared preamble, compilation per float type on first use, and the launch.

Each op family's module puts its kernels' sources into `KERNELS` beside the NumPy body they mirror.
Kernels are raw CUDA C++ over a type ``T`` (float or double, chosen per call), so the same source
serves float32 training and float64 gradient checks, and the tests compile every source without a GPU.
"""

import numpy as np

THREADS = 256
CUDA_PREAMBLE = r"""
// GRID_STRIDE(i, n) { ... }: the body for every i in [0, n), spread over the whole grid (thread t of
// the grid takes t, t + the grid's thread count, ...), so any grid size covers any n; i is 64-bit.
#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)
__device__ __forceinline__ T sigmoid_(T x) { return T(0.5) * (T(1) + tanh(T(0.5) * x)); }
__device__ __forceinline__ unsigned int mix32(unsigned int x) {   // a 32-bit integer hash
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16; return x;
}
"""
KERNELS = {}  # name -> CUDA source, filled by each family's module beside its op
_COMPILED = {}


def kernel_source(name, dtype):
    """The complete CUDA source of kernel `name` for float type `dtype` (float32 or float64)."""
    ctype = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    return f"typedef {ctype} T;\n{CUDA_PREAMBLE}\n{KERNELS[name]}"


def launch(name, dtype, n, args, threads=THREADS, blocks=None):
    """Run kernel `name` (float type `dtype`) over n items: grid-stride, `threads` per block."""
    import cupy

    key = (name, np.dtype(dtype).name)
    if key not in _COMPILED:
        _COMPILED[key] = cupy.RawKernel(kernel_source(name, dtype), name)
    if blocks is None:
        blocks = grid_blocks(n, threads)
    _COMPILED[key]((blocks,), (threads,), args)


def grid_blocks(n, threads=THREADS, most=65535):
    """Blocks of a grid-stride launch over n items: one item per thread, at most `most` blocks."""
    return max(1, min(-(-n // threads), most))


def dtype_scalar(array, value):
    """A Python number as a kernel argument of the array's float type."""
    return array.dtype.type(value)
