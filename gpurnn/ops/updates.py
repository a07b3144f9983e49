"""Optimizer updates over flat parameter buffers, the global-norm clip factor folded in.

On CuPy the learning rate and the clip's squared norm stay in device memory and are read by the
kernels, so a captured training step sees each step's values without the host.
"""

import numpy as np

from ..backend import array_module
from .kernels import KERNELS, dtype_scalar, grid_blocks, launch
from .threads import for_row_blocks


ELEMENT_BLOCK = 32768  # elements per block: a block of p, g, m, v and two temporaries fits a core's L2


NORM_BLOCKS = 1024  # blocks sharing a squared norm's first stage on CuPy

KERNELS["sum_squares_blocks"] = r"""
// Stage one of sum(g * g): each block sums its grid-stride share, then reduces it to partial[block].
extern "C" __global__ void sum_squares_blocks(const T* g, long long n, T* partial) {
    __shared__ T part[256];
    T s = 0;
    GRID_STRIDE(i, n)
        s += g[i] * g[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) part[threadIdx.x] += part[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}
"""
KERNELS["sum_blocks"] = r"""
// Stage two: one block adds the blocks' shares into total[0].
extern "C" __global__ void sum_blocks(const T* partial, long long count, T* total) {
    __shared__ T part[256];
    T s = 0;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) part[threadIdx.x] += part[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) total[0] = part[0];
}
"""


def squared_norm(g):
    """sum(g * g) of a flat array: BLAS dot on NumPy; on CuPy a 1-element device array from two
    kernels (a share per block, then their sum), all on the GPU at full bandwidth and in a fixed
    order, so the result is the same from run to run."""
    xp = array_module(g)
    if xp is np:
        return np.vdot(g, g)
    blocks = grid_blocks(g.size, most=NORM_BLOCKS)
    partial, total = xp.empty(blocks, g.dtype), xp.empty(1, g.dtype)
    launch("sum_squares_blocks", g.dtype, g.size, (g, np.int64(g.size), partial), blocks=blocks)
    launch("sum_blocks", g.dtype, blocks, (partial, np.int64(blocks), total), blocks=1)
    return total


def _dense_ranges(size, sparse):
    """The (lo, hi) ranges of [0, size) outside the sparse segments (given in any order)."""
    ranges, lo = [], 0
    for start, stop, _, _ in sorted(sparse, key=lambda segment: segment[0]):
        if start > lo:
            ranges.append((lo, start))
        lo = stop
    return ranges + [(lo, size)] if lo < size else ranges


def _sgd_blocks(p, g, coef):
    """p -= g * coef in cache-sized blocks on all cores."""
    def block(lo, hi):
        p[lo:hi] -= g[lo:hi] * coef

    for_row_blocks(p, block, ELEMENT_BLOCK)


def clip_factor(sumsq, max_norm):
    """min(1, max_norm / (sqrt(sumsq) + 1e-6)) on the host (NumPy; the kernels compute it themselves)."""
    return 1.0 if not max_norm else min(1.0, max_norm / (float(np.sqrt(sumsq)) + 1e-6))


KERNELS["sgd_update"] = r"""
// p -= lr * scale * g, scale = min(1, max_norm / (|g| + 1e-6)) when clipping (sumsq = |g|^2).
extern "C" __global__ void sgd_update(T* p, const T* g, const T* sumsq, T max_norm, const T* lr, long long n) {
    T scale = max_norm > 0 ? min(T(1), max_norm / (sqrt(sumsq[0]) + T(1e-6))) : T(1);
    T coef = lr[0] * scale;
    GRID_STRIDE(i, n)
        p[i] -= coef * g[i];
}
"""


def sgd_update(p, g, max_norm, lr, sparse=()):
    """p -= lr * scale * g over flat arrays; scale clips the global norm to max_norm (0: no clip).

    `lr` is a 1-element array (on the device for CuPy), so a captured step reads each step's value.
    `sparse` (NumPy): (start, stop, row_size, rows) segments of the flat buffers, each a table whose
    gradient is zero outside `rows` this step (an embedding's: `Model.sparse_segments`); the norm and
    the update read and move those rows alone, which for a large vocabulary is most of the buffer
    skipped. The other parts are read whole.
    """
    xp = array_module(p)
    if xp is np:
        dense = _dense_ranges(p.size, sparse)
        tables = [(p[start:stop].reshape(-1, row_size), rows) for start, stop, row_size, rows in sparse]
        touched = [g[start:stop].reshape(-1, row_size)[rows] for start, stop, row_size, rows in sparse]
        coef = float(lr[0])
        if max_norm:
            sumsq = sum(squared_norm(part) for part in [g[lo:hi] for lo, hi in dense] + touched)
            coef *= clip_factor(sumsq, max_norm)
        for lo, hi in dense:
            _sgd_blocks(p[lo:hi], g[lo:hi], coef)
        for (table, rows), grad_rows in zip(tables, touched):
            table[rows] -= grad_rows * coef
        return
    sumsq = squared_norm(g) if max_norm else lr
    launch("sgd_update", p.dtype, p.size, (p, g, sumsq, dtype_scalar(p, max_norm or 0), lr, np.int64(p.size)))


KERNELS["adam_update"] = r"""
// Adam with g = scale * gradient: m += (1-b1)(g-m), v += (1-b2)(g^2-v), p -= lr_t m / (sqrt(v)+eps),
// lr_t holding the bias correction.
extern "C" __global__ void adam_update(T* p, const T* grad, T* m, T* v, const T* sumsq, T max_norm,
                                       const T* lr_t, T b1, T b2, T eps, long long n) {
    T scale = max_norm > 0 ? min(T(1), max_norm / (sqrt(sumsq[0]) + T(1e-6))) : T(1);
    T step = lr_t[0];
    GRID_STRIDE(i, n) {
        T g = grad[i] * scale;
        T mi = m[i] + (T(1) - b1) * (g - m[i]);
        T vi = v[i] + (T(1) - b2) * (g * g - v[i]);
        m[i] = mi; v[i] = vi;
        p[i] -= step * mi / (sqrt(vi) + eps);
    }
}
"""


def adam_update(p, g, m, v, max_norm, lr_t, b1, b2, eps):
    """One Adam step over flat arrays (g scaled to clip the global norm to max_norm; 0: no clip).

    `lr_t` is a 1-element array holding the bias-corrected step size of this step.
    """
    xp = array_module(p)
    if xp is np:
        scale = clip_factor(squared_norm(g), max_norm)
        step_size = float(lr_t[0])

        def block(lo, hi):
            gb, mb, vb = g[lo:hi], m[lo:hi], v[lo:hi]
            if scale != 1.0:
                gb = gb * scale
            tmp = gb - mb
            tmp *= 1 - b1
            mb += tmp                      # m += (1 - b1) (g - m)
            np.multiply(gb, gb, out=tmp)
            tmp -= vb
            tmp *= 1 - b2
            vb += tmp                      # v += (1 - b2) (g^2 - v)
            np.multiply(mb, step_size, out=tmp)
            denom = np.sqrt(vb)
            denom += eps
            tmp /= denom
            p[lo:hi] -= tmp                # p -= lr_t m / (sqrt(v) + eps)

        for_row_blocks(p, block, ELEMENT_BLOCK)
        return
    sumsq = squared_norm(g) if max_norm else lr_t
    launch("adam_update", p.dtype, p.size, (p, g, m, v, sumsq, dtype_scalar(p, max_norm or 0), lr_t,
                                             dtype_scalar(p, b1), dtype_scalar(p, b2),
                                             dtype_scalar(p, eps), np.int64(p.size)))
