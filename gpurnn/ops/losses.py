"""Softmax cross-entropy over the vocabulary: stable, fused, never a one-hot.

NumPy works per cache-sized block of rows on the thread pool; CuPy runs one block per row.
"""

import threading

import numpy as np

from ..backend import array_module
from .kernels import KERNELS, dtype_scalar, grid_blocks, launch
from .threads import for_row_blocks


KERNELS["softmax_rows"] = r"""
// One block per row (row-stride over the n rows: the loop is the same for every thread of a block,
// so each reaches every barrier): max and sum of exp by block reductions; lse = max + log(sum) and
// the row's loss lse - x[target], 0 where the target is the ignore index, NaN where the target is
// outside [0, V) (the row is never read there: a marked loss, not an illegal address).
extern "C" __global__ void softmax_rows(const T* x, const int* t, int ignore, T* lse, T* nll, long long n, int V) {
    __shared__ T part[256];
    for (long long r = blockIdx.x; r < n; r += gridDim.x) {
        const T* row = x + r * V;
        T m = row[0];
        for (int j = threadIdx.x; j < V; j += blockDim.x) m = max(m, row[j]);
        part[threadIdx.x] = m;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) part[threadIdx.x] = max(part[threadIdx.x], part[threadIdx.x + s]);
            __syncthreads();
        }
        m = part[0];
        __syncthreads();
        T sum = 0;
        for (int j = threadIdx.x; j < V; j += blockDim.x) sum += exp(row[j] - m);
        part[threadIdx.x] = sum;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            T l = m + log(part[0]);
            int target = t[r];
            lse[r] = l;
            nll[r] = target == ignore ? T(0) : target >= 0 && target < V ? l - row[target] : T(0) / T(0);
        }
        __syncthreads();  // part is written again for the next row
    }
}
"""
KERNELS["softmax_loss_total"] = r"""
// One block: count = max(1, number of scored rows), loss = sum(nll) / count.
extern "C" __global__ void softmax_loss_total(const T* nll, const int* t, int ignore, long long n, T* loss, T* count) {
    __shared__ T sum[256];
    __shared__ long long cnt[256];
    T s = 0;
    long long c = 0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) { s += nll[i]; c += t[i] != ignore; }
    sum[threadIdx.x] = s; cnt[threadIdx.x] = c;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) { sum[threadIdx.x] += sum[threadIdx.x + k]; cnt[threadIdx.x] += cnt[threadIdx.x + k]; }
        __syncthreads();
    }
    if (threadIdx.x == 0) { T total = T(cnt[0] > 1 ? cnt[0] : 1); count[0] = total; loss[0] = sum[0] / total; }
}
"""
KERNELS["softmax_backward"] = r"""
// dx = (exp(x - lse) - onehot(target)) * dout / count on scored rows, 0 on ignored ones, NaN on rows
// whose target is outside [0, V) (as their loss).
extern "C" __global__ void softmax_backward(const T* x, const int* t, int ignore, const T* lse, const T* count,
                                            T dout, T* dx, long long n, int V) {
    GRID_STRIDE(k, n) {
        long long r = k / V;
        int target = t[r];
        T g = target == ignore ? T(0) : target >= 0 && target < V ? exp(x[k] - lse[r]) - T((k % V) == target)
                                                                   : T(0) / T(0);
        dx[k] = g * dout / count[0];
    }
}
"""


_SCRATCH = threading.local()


def _scratch(rows, cols, dtype):
    """A (rows, cols) work array of this thread's, reused from call to call (it stays in cache)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < rows * cols or buf.dtype != dtype:
        buf = _SCRATCH.buf = np.empty(rows * cols, dtype)
    return buf[:rows * cols].reshape(rows, cols)


def softmax_cross_entropy(x2, t, ignore, buffer):
    """Mean cross-entropy of the rows of x2 (N, V) against targets t (N,), skipping `ignore` targets.

    Returns (loss, cache): loss a 0-d array on the device (nothing waits for the GPU), cache what
    `softmax_cross_entropy_backward` needs. x2 is never modified. NumPy: per cache-sized block of
    rows, max, exp and row sums while the block is in cache, exp kept in `buffer` (N, V) for the
    backward; with `buffer` None (evaluation: no backward) each block works in a scratch array of
    its thread's, so nothing of size N x V is written at all. CuPy: one kernel per row computes
    log-sum-exp and the row's loss, one sums them.

    A target outside [0, V) that is not `ignore` makes its row's loss (and gradient) NaN on both
    backends, so the mean loss is NaN: the data layer refuses such ids when a corpus is opened, and
    a caller that passes one anyway gets a non-finite loss, never a read outside the row.
    """
    xp = array_module(x2)
    if xp is np:
        nll, inv_sum, rows, target, valid, outside = _numpy_rows(x2, t, ignore, buffer)
        count = np.maximum(valid.sum(), 1).astype(x2.dtype)
        return (nll * valid).sum() / count, ("numpy", buffer, inv_sum, rows, target, valid, outside, count)
    x2, t = xp.ascontiguousarray(x2), xp.ascontiguousarray(t, dtype=xp.int32)
    lse, nll = device_softmax_rows(x2, t, ignore)
    loss, count = xp.empty((), x2.dtype), xp.empty(1, x2.dtype)
    n = x2.shape[0]
    launch("softmax_loss_total", x2.dtype, n, (nll, t, np.int32(ignore), np.int64(n), loss, count), blocks=1)
    return loss, ("cupy", x2, t, ignore, lse, count, buffer)


def softmax_nll(x2, t, ignore):
    """Each row's negative log-likelihood -log softmax(x2[i])[t[i]] (N,), 0 where t[i] is `ignore`: the
    per-row terms whose mean `softmax_cross_entropy` returns, left on the device."""
    xp = array_module(x2)
    if xp is np:
        nll, _, _, _, valid, _ = _numpy_rows(x2, t, ignore, None)
        nll[~valid] = 0
        return nll
    return device_softmax_rows(xp.ascontiguousarray(x2), xp.ascontiguousarray(t, dtype=xp.int32), ignore)[1]


def _numpy_rows(x2, t, ignore, buffer):
    """NumPy: per cache-sized block of rows, max, exp and row sums while the block is in cache (exp
    kept in `buffer` when given, else in a scratch array of the thread's). Returns (nll, 1 / row sums,
    row numbers, targets clipped into range, valid rows, rows whose target is outside [0, V))."""
    n = x2.shape[0]
    valid = t != ignore
    outside = valid & ((t < 0) | (t >= x2.shape[1]))
    target = np.where(valid & ~outside, t, 0)
    nll = np.empty(n, x2.dtype)
    inv_sum = np.empty((n, 1), x2.dtype)
    rows = np.arange(n)

    def block(lo, hi):
        eb = buffer[lo:hi] if buffer is not None else _scratch(hi - lo, x2.shape[1], x2.dtype)
        np.subtract(x2[lo:hi], x2[lo:hi].max(axis=1, keepdims=True), out=eb)
        picked = eb[rows[: hi - lo], target[lo:hi]]  # x[t] - max, read before exp overwrites it
        np.exp(eb, out=eb)
        s = eb.sum(axis=1)
        nll[lo:hi] = np.log(s) - picked
        inv_sum[lo:hi, 0] = 1 / s

    for_row_blocks(x2, block)
    nll[outside] = np.nan
    return nll, inv_sum, rows, target, valid, outside


def device_softmax_rows(x2, t, ignore, lse=None, nll=None):
    """CuPy: one kernel launch, a block per row: (log-sum-exp, nll) per row, into `lse` and `nll` where
    given (fixed buffers, for a step captured as a graph), else into new arrays. x2 and t contiguous."""
    xp = array_module(x2)
    n = x2.shape[0]
    lse = xp.empty(n, x2.dtype) if lse is None else lse
    nll = xp.empty(n, x2.dtype) if nll is None else nll
    launch("softmax_rows", x2.dtype, n, (x2, t, np.int32(ignore), lse, nll, np.int64(n), np.int32(x2.shape[1])),
           blocks=grid_blocks(n, threads=1))  # a block per row (one for none), row-stride past 65,535
    return lse, nll


def softmax_cross_entropy_backward(cache, dout=1.0):
    """d loss / d x2 = (softmax - onehot) * dout / count, written into the buffer given to forward."""
    if cache[0] == "numpy":
        _, e, inv_sum, rows, target, valid, outside, count = cache
        weight = (valid * (dout / count)).astype(e.dtype)
        scale = inv_sum * weight[:, None]

        def block(lo, hi):
            e[lo:hi] *= scale[lo:hi]

        for_row_blocks(e, block)
        e[rows, target] -= weight
        e[outside] = np.nan
        return e
    _, x2, t, ignore, lse, count, buffer = cache
    launch("softmax_backward", x2.dtype, x2.size, (x2, t, np.int32(ignore), lse, count,
                                                    dtype_scalar(x2, dout), buffer, np.int64(x2.size),
                                                    np.int32(x2.shape[1])))
    return buffer
