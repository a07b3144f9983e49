"""The operations whose body differs between NumPy and CuPy: one seam, each op with both bodies.

Layers say *what* (a cell step, a loss, an update); this module says *how*, per backend. Each op
dispatches on its arrays' module: the NumPy body is plain array code written to read memory once
(in place, in cache-sized blocks, on the thread pool when the work is large enough to pay for it);
the CuPy body launches one named CUDA kernel whose source stands right beside it. Kernels are raw
CUDA C++ over a type ``T`` (float or double, chosen per call), so the same source serves float32
training and float64 gradient checks, and the tests compile every source without a GPU.

Nothing here waits for the GPU: scalars that change between steps (the learning rate, the clip
norm, the dropout step) are read from device memory by the kernels, so a whole training step can
be captured once as a CUDA graph and replayed.
"""

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backend import array_module

# -- the thread pool (NumPy only) ---------------------------------------------------------------

ROW_BLOCK = 32
# Below this many elements a pool dispatch (lock, wake-up, join) costs more than the work it splits:
# the demo's 50 x 418 softmax stays on the calling thread, PTB's 700 x 10,000 goes to all cores.
MIN_PARALLEL_ELEMENTS = 1 << 17
_POOL = None
_POOL_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def cpu_threads():
    """CPUs this process may run on (read once)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pool(threads):
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpurnn-rows")
    return _POOL


def for_row_blocks(array, fn, block=ROW_BLOCK):
    """Call fn(lo, hi) over row ranges covering array's rows, in cache-sized blocks.

    For wide per-row work such as a softmax over a 10,000-word vocabulary, or an optimizer pass over
    a flat buffer (rows are then elements). Blocks fit in a core's cache, so the several passes of
    the work read memory once; when the array holds at least MIN_PARALLEL_ELEMENTS elements the
    blocks run on a thread pool, one contiguous share per core (NumPy releases the GIL in its loops).
    Each block is independent, so results do not depend on the scheduling. On CuPy one call covers
    all rows: the GPU is the parallel part.
    """
    n = array.shape[0]
    if array_module(array) is not np:
        fn(0, n)
        return
    threads = cpu_threads()
    if threads == 1 or n <= block or array.size < MIN_PARALLEL_ELEMENTS:
        for lo in range(0, n, block):
            fn(lo, min(lo + block, n))
        return
    step = -(-n // threads)

    def share(start):
        for lo in range(start, min(start + step, n), block):
            fn(lo, min(lo + block, n, start + step))

    for future in [_pool(threads).submit(share, start) for start in range(0, n, step)]:
        future.result()


# A time step's GEMM has only B rows (20 for PTB): OpenBLAS threads it poorly, so above this many
# multiply-adds the step's columns are split over the pool with BLAS on one thread (`step_matmul`).
MIN_SPLIT_MULTIPLY_ADDS = 1 << 22
# Below this many multiply-adds per training step (parameters x rows) every GEMM of the step is too
# small for OpenBLAS's threads to pay for waking up: the demo's step runs faster on one thread.
MIN_THREADED_STEP = 1 << 26


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _blas_on_one_thread(wanted):
    """BLAS on the calling thread only, within the block, if `wanted` (threadpoolctl)."""
    if not wanted:
        yield
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def training_threads(xp, multiply_adds):
    """The context of a training loop whose step does `multiply_adds` multiply-adds: on NumPy with
    several cores and a small step, BLAS on one thread; otherwise BLAS as it is."""
    return _blas_on_one_thread(xp is np and cpu_threads() > 1 and multiply_adds < MIN_THREADED_STEP)


def recurrent_loop(h, W):
    """The context of a recurrent layer's time loop over steps h @ W: on NumPy with several cores
    and a step large enough to split, BLAS runs on the calling thread only, so `step_matmul` can
    split each step's product itself."""
    return _blas_on_one_thread(_splits(h, W))


def _splits(a, b):
    """Whether the step product a @ b is split over the pool: NumPy, several cores, large enough."""
    return (array_module(a) is np and cpu_threads() > 1
            and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_SPLIT_MULTIPLY_ADDS)


def step_matmul(a, b, out):
    """out = a @ b for one time step (a has few rows). Inside `recurrent_loop` on NumPy, a large
    enough product is split by columns over the pool, one share per core; otherwise one matmul."""
    if not _splits(a, b):
        return array_module(a).matmul(a, b, out=out)
    threads = cpu_threads()
    n = b.shape[1]
    step = -(-n // threads)
    shares = [_pool(threads).submit(np.matmul, a, b[:, lo:lo + step], out=out[:, lo:lo + step])
              for lo in range(0, n, step)]
    for share in shares:
        share.result()
    return out


# -- CUDA kernels: compiled per float type on first use -------------------------------------------

THREADS = 256
CUDA_PREAMBLE = r"""
__device__ __forceinline__ T sigmoid_(T x) { return T(0.5) * (T(1) + tanh(T(0.5) * x)); }
__device__ __forceinline__ unsigned int mix32(unsigned int x) {   // a 32-bit integer hash
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16; return x;
}
"""
KERNELS = {}  # name -> CUDA source, filled beside each op below
_COMPILED = {}


def kernel_source(name, dtype):
    """The complete CUDA source of kernel `name` for float type `dtype` (float32 or float64)."""
    ctype = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    return f"typedef {ctype} T;\n{CUDA_PREAMBLE}\n{KERNELS[name]}"


def _launch(name, dtype, n, args, threads=THREADS, blocks=None):
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


def _dtype_scalar(array, value):
    """A Python number as a kernel argument of the array's float type."""
    return array.dtype.type(value)


# -- small shared pieces ------------------------------------------------------------------------


def column_sums(a, out):
    """out[j] = sum_i a[i, j] (a bias gradient), as ones @ a: BLAS reads the rows once at full speed."""
    xp = array_module(a)
    return xp.matmul(xp.ones(a.shape[0], a.dtype), a, out=out)


def sigmoid(x, out):
    """The logistic function written into `out` (may be `x`): 0.5 * (1 + tanh(x / 2)), stable for any x."""
    xp = array_module(x)
    xp.multiply(x, 0.5, out=out)
    xp.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


# -- embedding backward -------------------------------------------------------------------------

KERNELS["rank_ids"] = r"""
// order[rank(i)] = i, ranking positions by (id, position): a stable sort of a few thousand ids.
extern "C" __global__ void rank_ids(const int* ids, int n, int* order) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int id = ids[i], rank = 0;
        for (int k = 0; k < n; ++k) rank += (ids[k] < id) || (ids[k] == id && k < i);
        order[rank] = i;
    }
}
"""
KERNELS["add_sorted_rows"] = r"""
// For each run of equal ids in sorted order, one thread per column sums the run's rows in order
// (deterministic: no atomics) and adds the sum to the id's row of target.
extern "C" __global__ void add_sorted_rows(const int* ids, const int* order, const T* rows, T* target,
                                           int n, int D) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < (long long)n * D;
         k += (long long)gridDim.x * blockDim.x) {
        int r = k / D, j = k % D, id = ids[order[r]];
        if (r > 0 && ids[order[r - 1]] == id) continue;
        T sum = 0;
        for (int s = r; s < n && ids[order[s]] == id; ++s) sum += rows[(long long)order[s] * D + j];
        target[(long long)id * D + j] += sum;
    }
}
"""


def scatter_add_rows(target, index, rows):
    """target[index[i]] += rows[i] for every i, repeated indices summed in index order.

    The embedding's backward. NumPy: sort by index and sum each run with `np.add.reduceat` (much
    faster than `np.add.at`). CuPy: rank the ids, then one thread per (run, column) sums its run;
    both are deterministic, so a GPU run repeats bit for bit (atomics would not).
    """
    xp = array_module(target)
    if xp is np:
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
        target[sorted_index[starts]] += np.add.reduceat(rows[order], starts, axis=0)
        return
    ids = xp.ascontiguousarray(index, dtype=xp.int32)
    rows = xp.ascontiguousarray(rows)
    n, D = rows.shape
    order = xp.empty(n, xp.int32)
    _launch("rank_ids", target.dtype, n, (ids, np.int32(n), order))
    _launch("add_sorted_rows", target.dtype, n * D, (ids, order, rows, target, np.int32(n), np.int32(D)))


# -- dropout: masks from a counter-based hash -----------------------------------------------------

KERNELS["dropout"] = r"""
// out = x * mask / (1 - p); mask from a hash of (seed, step, layer, element + offset): no state to save.
extern "C" __global__ void dropout(const T* x, T* out, const unsigned int* step, unsigned int seed,
                                   unsigned int layer, unsigned int threshold, T scale, long long offset,
                                   long long n) {
    unsigned int key = mix32(mix32(mix32(seed + 0x9e3779b9U) ^ (step[0] + 0x85ebca6bU)) ^ (layer + 0xc2b2ae35U));
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned int u = mix32(key ^ mix32((unsigned int)(i + offset) + 0x27d4eb2fU));
        out[i] = (u >> 8) >= threshold ? x[i] * scale : T(0);
    }
}
"""


def _mix32(x):
    """The kernel's 32-bit hash on NumPy uint32 arrays (multiplication wraps modulo 2**32)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


@functools.lru_cache(maxsize=4)
def _hashed_positions(n, offset):
    """mix32(i + c) for the n element positions from `offset`: the half of the mask hash no key changes."""
    return _mix32((np.arange(offset, offset + n, dtype=np.int64) + 0x27D4EB2F).astype(np.uint32))


def dropout_key(seed, step, layer):
    """The 32-bit key of one (seed, step, layer): the same arithmetic as the kernel's first line."""
    def mix(v):
        return int(_mix32(np.array([v & 0xFFFFFFFF], np.uint32))[0])

    return mix(mix(mix(seed + 0x9E3779B9) ^ ((step + 0x85EBCA6B) & 0xFFFFFFFF)) ^ ((layer + 0xC2B2AE35) & 0xFFFFFFFF))


def dropout(x, out, p, seed, step, layer, first_lane=0):
    """out = x * mask / (1 - p), the mask a pure function of (seed, step[0], layer, element index).

    `step` is a 1-element uint32 array (on the device for CuPy, read there by the kernel, so a
    captured graph sees each step's value); `out` is C-contiguous. Element indices count from lane
    `first_lane` of the whole batch (x's first axis), so a process that holds lanes lo..hi of a
    data-parallel batch draws exactly those lanes' part of the one-process mask. Called again with
    the same arguments it applies the same mask, which is the backward; NumPy and CuPy draw
    identical masks.
    """
    xp = array_module(x)
    threshold = int(p * (1 << 24))
    scale = 1.0 / (1.0 - p)
    offset = first_lane * (x.size // x.shape[0])
    if xp is np:
        key = np.uint32(dropout_key(seed, int(step[0]), layer))
        u = _mix32(_hashed_positions(x.size, offset) ^ key)
        keep = (u >> np.uint32(8)) >= threshold
        np.multiply(x, keep.reshape(x.shape), out=out)
        out *= scale
        return out
    _launch("dropout", x.dtype, x.size, (xp.ascontiguousarray(x), out, step, np.uint32(seed & 0xFFFFFFFF),
                                         np.uint32(layer), np.uint32(threshold), _dtype_scalar(x, scale),
                                         np.int64(offset), np.int64(x.size)))
    return out


# -- recurrent cells: one fused kernel per time step, beside the GEMM -----------------------------

KERNELS["rnn_cell"] = r"""
// a = tanh(a + r): the Elman step, a = x Wx + b and r = h_{t-1} Wh.
extern "C" __global__ void rnn_cell(T* a, const T* r, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        a[i] = tanh(a[i] + r[i]);
}
"""


def rnn_cell(a, r):
    """The Elman step in place: a = tanh(a + r), with a = x_t Wx + b and r = h_{t-1} Wh."""
    xp = array_module(a)
    if xp is np:
        a += r
        np.tanh(a, out=a)
        return a
    _launch("rnn_cell", a.dtype, a.size, (a, r, np.int64(a.size)))
    return a


KERNELS["rnn_cell_backward"] = r"""
// dt = (dh + rec) * (1 - h^2), rec = dt_{t+1} Wh^T (absent at the block's last step).
extern "C" __global__ void rnn_cell_backward(const T* dh, const T* rec, int has_rec, const T* h, T* dt,
                                             long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        T d = dh[i] + (has_rec ? rec[i] : T(0));
        dt[i] = d * (T(1) - h[i] * h[i]);
    }
}
"""


def rnn_cell_backward(dh, rec, h, dt):
    """dt = (dh + rec) * (1 - h^2): the gradient at tanh's input; rec is None at the last step."""
    xp = array_module(dh)
    if xp is np:
        np.add(dh, rec, out=dt) if rec is not None else np.copyto(dt, dh)
        dt *= 1 - h * h
        return dt
    _launch("rnn_cell_backward", dh.dtype, dh.size,
            (dh, dh if rec is None else rec, np.int32(rec is not None), h, dt, np.int64(dh.size)))
    return dt


KERNELS["lstm_cell"] = r"""
// One LSTM step for (b, j): gates i, f, g, o from a + r (4H-wide rows), stored activated in a;
// c = f * c_prev + i * g and h = o * tanh(c).
extern "C" __global__ void lstm_cell(T* a, const T* r, const T* c_prev, T* c, T* h, int B, int H) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < (long long)B * H; k += (long long)gridDim.x * blockDim.x) {
        long long row = (k / H) * 4 * H, j = k % H;
        T i = sigmoid_(a[row + j] + r[row + j]);
        T f = sigmoid_(a[row + H + j] + r[row + H + j]);
        T g = tanh(a[row + 2 * H + j] + r[row + 2 * H + j]);
        T o = sigmoid_(a[row + 3 * H + j] + r[row + 3 * H + j]);
        a[row + j] = i; a[row + H + j] = f; a[row + 2 * H + j] = g; a[row + 3 * H + j] = o;
        T cv = f * c_prev[k] + i * g;
        c[k] = cv;
        h[k] = o * tanh(cv);
    }
}
"""


def lstm_cell(a, r, c_prev, c, h):
    """One LSTM step: a (B, 4H) += r, then gates i, f, g, o activated in place, c and h written."""
    xp = array_module(a)
    if xp is np:
        H = h.shape[1]
        a += r
        sigmoid(a[:, :2 * H], out=a[:, :2 * H])
        np.tanh(a[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
        sigmoid(a[:, 3 * H:], out=a[:, 3 * H:])
        i, f, g, o = np.split(a, 4, axis=1)
        np.multiply(f, c_prev, out=c)
        c += i * g
        np.tanh(c, out=h)
        h *= o
        return h
    B, H = h.shape
    _launch("lstm_cell", a.dtype, B * H, (a, r, c_prev, c, h, np.int32(B), np.int32(H)))
    return h


KERNELS["lstm_backward_factors"] = r"""
// For all T steps at once, what does not depend on the incoming gradient: the gate derivatives
// times what each gate multiplies, into das; and dc_from_dh = o * (1 - tanh(c)^2).
extern "C" __global__ void lstm_backward_factors(const T* gates, const T* cs, const T* c0, T* das,
                                                 T* dc_from_dh, int steps, int B, int H) {
    long long bh = (long long)B * H;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < steps * bh; k += (long long)gridDim.x * blockDim.x) {
        long long t = k / bh, row = (k / H) * 4 * H, j = k % H;
        T i = gates[row + j], f = gates[row + H + j], g = gates[row + 2 * H + j], o = gates[row + 3 * H + j];
        T tc = tanh(cs[k]);
        T c_prev = t ? cs[k - bh] : c0[k];
        dc_from_dh[k] = o * (T(1) - tc * tc);
        das[row + j] = g * i * (T(1) - i);
        das[row + H + j] = c_prev * f * (T(1) - f);
        das[row + 2 * H + j] = i * (T(1) - g * g);
        das[row + 3 * H + j] = tc * o * (T(1) - o);
    }
}
"""


def lstm_backward_factors(gates, cs, c0, das, dc_from_dh):
    """Fill das (T, B, 4H) with the gate factors and dc_from_dh (T, B, H), for all steps at once:

        das[t] = [g*i(1-i),  c_{t-1}*f(1-f),  i(1-g^2),  tanh(c_t)*o(1-o)],  dc_from_dh = o(1 - tanh^2 c_t)
    """
    xp = array_module(gates)
    if xp is np:
        H = cs.shape[2]
        i, f, g, o = (gates[:, :, k * H:(k + 1) * H] for k in range(4))
        di, df, dg, do = (das[:, :, k * H:(k + 1) * H] for k in range(4))
        tanh_c = np.tanh(cs)
        np.multiply(o, 1 - tanh_c * tanh_c, out=dc_from_dh)
        np.multiply(g, i * (1 - i), out=di)
        np.multiply(f, 1 - f, out=df)
        df[0] *= c0
        df[1:] *= cs[:-1]
        np.multiply(i, 1 - g * g, out=dg)
        np.multiply(tanh_c, o * (1 - o), out=do)
        return
    steps, B, H = cs.shape
    _launch("lstm_backward_factors", gates.dtype, steps * B * H,
            (gates, cs, c0, das, dc_from_dh, np.int32(steps), np.int32(B), np.int32(H)))


KERNELS["lstm_cell_backward"] = r"""
// One step back: dh = dhs_t + rec; dc = dc * f_{t+1} + dh * dc_from_dh; scale the factors in das_t
// (i, f, g by dc; o by dh). rec = das_{t+1} Wh^T and f_{t+1} are absent at the block's last step.
extern "C" __global__ void lstm_cell_backward(const T* dhs_t, const T* rec, const T* gates_next, int has_next,
                                              const T* dc_from_dh, T* dc, T* das, int B, int H) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < (long long)B * H; k += (long long)gridDim.x * blockDim.x) {
        long long row = (k / H) * 4 * H, j = k % H;
        T dh = dhs_t[k] + (has_next ? rec[row / 4 + j] : T(0));
        T dcv = (has_next ? dc[k] * gates_next[row + H + j] : T(0)) + dh * dc_from_dh[k];
        dc[k] = dcv;
        das[row + j] *= dcv; das[row + H + j] *= dcv; das[row + 2 * H + j] *= dcv;
        das[row + 3 * H + j] *= dh;
    }
}
"""


def lstm_cell_backward(dhs_t, rec, gates_next, dc_from_dh, dc, das_t):
    """One step of the LSTM's backward loop (see `lstm_backward_factors` for das_t's contents).

    dh = dhs_t + rec, dc = dc * f_{t+1} + dh * dc_from_dh, das_t's i, f, g blocks *= dc and o *= dh.
    rec (das_{t+1} Wh^T) and gates_next are None at the block's last step, where dc starts at zero.
    """
    xp = array_module(dhs_t)
    B, H = dc.shape
    if xp is np:
        dh = dhs_t if rec is None else dhs_t + rec
        if gates_next is None:
            np.multiply(dh, dc_from_dh, out=dc)
        else:
            dc *= gates_next[:, H:2 * H]
            dc += dh * dc_from_dh
        blocks = das_t.reshape(B, 4, H)
        blocks[:, :3] *= dc[:, None, :]
        blocks[:, 3] *= dh
        return
    has_next = rec is not None
    _launch("lstm_cell_backward", dc.dtype, B * H,
            (dhs_t, rec if has_next else dhs_t, gates_next if has_next else das_t, np.int32(has_next),
             dc_from_dh, dc, das_t, np.int32(B), np.int32(H)))


KERNELS["gru_cell"] = r"""
// One GRU step for (b, j), gates r, z, n (3H-wide rows): ah = h_{t-1} Wh; its n part gets bhn
// (kept for backward); r, z, n stored activated in a; h = n + z * (h_prev - n).
extern "C" __global__ void gru_cell(T* a, T* ah, const T* bhn, const T* h_prev, T* h, int B, int H) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < (long long)B * H; k += (long long)gridDim.x * blockDim.x) {
        long long row = (k / H) * 3 * H, j = k % H;
        T ahn = ah[row + 2 * H + j] + bhn[j];
        ah[row + 2 * H + j] = ahn;
        T r = sigmoid_(a[row + j] + ah[row + j]);
        T z = sigmoid_(a[row + H + j] + ah[row + H + j]);
        T n = tanh(a[row + 2 * H + j] + r * ahn);
        a[row + j] = r; a[row + H + j] = z; a[row + 2 * H + j] = n;
        h[k] = n + z * (h_prev[k] - n);
    }
}
"""


def gru_cell(a, ah, bhn, h_prev, h):
    """One GRU step: ah = h_prev Wh (its n block gets bhn, kept), gates r, z, n into a, h written."""
    xp = array_module(a)
    B, H = h.shape
    if xp is np:
        ah[:, 2 * H:] += bhn
        rz = a[:, :2 * H]
        rz += ah[:, :2 * H]
        sigmoid(rz, out=rz)
        r, z, n = np.split(a, 3, axis=1)
        n += r * ah[:, 2 * H:]
        np.tanh(n, out=n)
        np.subtract(h_prev, n, out=h)  # h = n + z * (h_prev - n)
        h *= z
        h += n
        return h
    _launch("gru_cell", a.dtype, B * H, (a, ah, bhn, h_prev, h, np.int32(B), np.int32(H)))
    return h


KERNELS["gru_cell_backward"] = r"""
// One GRU step back. dh = dhs_t + (dh_{t+1} * z_{t+1} + rec), rec = d_hid_{t+1} Wh^T; then the
// gradients at the gates' inputs: d_in = [dr, dz, dn] for Wx and b, d_hid = [dr, dz, dn * r] for Wh.
extern "C" __global__ void gru_cell_backward(const T* dhs_t, const T* rec, const T* gates_next, int has_next,
                                             const T* gates, const T* ah, const T* h_prev, T* dh,
                                             T* d_in, T* d_hid, int B, int H) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < (long long)B * H; k += (long long)gridDim.x * blockDim.x) {
        long long row = (k / H) * 3 * H, j = k % H;
        T d = dhs_t[k] + (has_next ? dh[k] * gates_next[row + H + j] + rec[row / 3 + j] : T(0));
        dh[k] = d;
        T r = gates[row + j], z = gates[row + H + j], n = gates[row + 2 * H + j];
        T dz = d * (h_prev[k] - n) * z * (T(1) - z);
        T dn = d * (T(1) - z) * (T(1) - n * n);
        T dr = dn * ah[row + 2 * H + j] * r * (T(1) - r);
        d_in[row + j] = dr; d_in[row + H + j] = dz; d_in[row + 2 * H + j] = dn;
        d_hid[row + j] = dr; d_hid[row + H + j] = dz; d_hid[row + 2 * H + j] = dn * r;
    }
}
"""


def gru_cell_backward(dhs_t, rec, gates_next, gates, ah, h_prev, dh, d_in, d_hid):
    """One step of the GRU's backward loop; dh (B, H) carries dh_t from step to step.

    rec (d_hid_{t+1} Wh^T) and gates_next are None at the block's last step.
    """
    xp = array_module(dhs_t)
    B, H = dh.shape
    if xp is np:
        if rec is None:
            np.copyto(dh, dhs_t)
        else:
            dh *= gates_next[:, H:2 * H]
            dh += rec
            dh += dhs_t
        r, z, n = np.split(gates, 3, axis=1)
        dr, dz, dn = np.split(d_in, 3, axis=1)
        np.multiply(dh, h_prev - n, out=dz)
        dz *= z * (1 - z)
        np.multiply(dh, 1 - z, out=dn)
        dn *= 1 - n * n
        np.multiply(dn, ah[:, 2 * H:], out=dr)
        dr *= r * (1 - r)
        d_hid[:, :2 * H] = d_in[:, :2 * H]
        np.multiply(dn, r, out=d_hid[:, 2 * H:])
        return
    has_next = rec is not None
    _launch("gru_cell_backward", dh.dtype, B * H,
            (dhs_t, rec if has_next else dhs_t, gates_next if has_next else gates, np.int32(has_next),
             gates, ah, h_prev, dh, d_in, d_hid, np.int32(B), np.int32(H)))


# -- softmax cross-entropy over the vocabulary ----------------------------------------------------

KERNELS["softmax_rows"] = r"""
// One block per row: max and sum of exp by block reductions; lse = max + log(sum) and the row's
// loss lse - x[target] (0 where the target is the ignore index).
extern "C" __global__ void softmax_rows(const T* x, const int* t, int ignore, T* lse, T* nll, int V) {
    __shared__ T part[256];
    const T* row = x + (long long)blockIdx.x * V;
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
        int target = t[blockIdx.x];
        lse[blockIdx.x] = l;
        nll[blockIdx.x] = target == ignore ? T(0) : l - row[target];
    }
}
"""
KERNELS["softmax_loss_total"] = r"""
// One block: count = max(1, number of scored rows), loss = sum(nll) / count.
extern "C" __global__ void softmax_loss_total(const T* nll, const int* t, int ignore, int n, T* loss, T* count) {
    __shared__ T sum[256];
    __shared__ T cnt[256];
    T s = 0, c = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { s += nll[i]; c += t[i] != ignore; }
    sum[threadIdx.x] = s; cnt[threadIdx.x] = c;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) { sum[threadIdx.x] += sum[threadIdx.x + k]; cnt[threadIdx.x] += cnt[threadIdx.x + k]; }
        __syncthreads();
    }
    if (threadIdx.x == 0) { T total = max(cnt[0], T(1)); count[0] = total; loss[0] = sum[0] / total; }
}
"""
KERNELS["softmax_backward"] = r"""
// dx = (exp(x - lse) - onehot(target)) * dout / count on scored rows, 0 on ignored ones.
extern "C" __global__ void softmax_backward(const T* x, const int* t, int ignore, const T* lse, const T* count,
                                            T dout, T* dx, long long n, int V) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        long long r = k / V;
        int target = t[r];
        T g = target == ignore ? T(0) : exp(x[k] - lse[r]) - T((k % V) == target);
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
    """
    xp = array_module(x2)
    n = x2.shape[0]
    if xp is np:
        valid = t != ignore
        target = np.where(valid, t, 0)
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
        count = np.maximum(valid.sum(), 1).astype(x2.dtype)
        return (nll * valid).sum() / count, ("numpy", buffer, inv_sum, rows, target, valid, count)
    x2, t = xp.ascontiguousarray(x2), xp.ascontiguousarray(t, dtype=xp.int32)
    lse, nll = xp.empty(n, x2.dtype), xp.empty(n, x2.dtype)
    loss, count = xp.empty((), x2.dtype), xp.empty(1, x2.dtype)
    _launch("softmax_rows", x2.dtype, n, (x2, t, np.int32(ignore), lse, nll, np.int32(x2.shape[1])), blocks=n)
    _launch("softmax_loss_total", x2.dtype, n, (nll, t, np.int32(ignore), np.int32(n), loss, count), blocks=1)
    return loss, ("cupy", x2, t, ignore, lse, count, buffer)


def softmax_cross_entropy_backward(cache, dout=1.0):
    """d loss / d x2 = (softmax - onehot) * dout / count, written into the buffer given to forward."""
    if cache[0] == "numpy":
        _, e, inv_sum, rows, target, valid, count = cache
        weight = (valid * (dout / count)).astype(e.dtype)
        scale = inv_sum * weight[:, None]

        def block(lo, hi):
            e[lo:hi] *= scale[lo:hi]

        for_row_blocks(e, block)
        e[rows, target] -= weight
        return e
    _, x2, t, ignore, lse, count, buffer = cache
    _launch("softmax_backward", x2.dtype, x2.size, (x2, t, np.int32(ignore), lse, count,
                                                    _dtype_scalar(x2, dout), buffer, np.int64(x2.size),
                                                    np.int32(x2.shape[1])))
    return buffer


# -- optimizers over flat buffers, the clip factor folded in ------------------------------------

ELEMENT_BLOCK = 32768  # elements per block: a block of p, g, m, v and two temporaries fits a core's L2


NORM_BLOCKS = 1024  # blocks sharing a squared norm's first stage on CuPy

KERNELS["sum_squares_blocks"] = r"""
// Stage one of sum(g * g): each block sums its grid-stride share, then reduces it to partial[block].
extern "C" __global__ void sum_squares_blocks(const T* g, long long n, T* partial) {
    __shared__ T part[256];
    T s = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
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
extern "C" __global__ void sum_blocks(const T* partial, int count, T* total) {
    __shared__ T part[256];
    T s = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
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
    _launch("sum_squares_blocks", g.dtype, g.size, (g, np.int64(g.size), partial), blocks=blocks)
    _launch("sum_blocks", g.dtype, blocks, (partial, np.int32(blocks), total), blocks=1)
    return total


def clip_factor(sumsq, max_norm):
    """min(1, max_norm / (sqrt(sumsq) + 1e-6)) on the host (NumPy; the kernels compute it themselves)."""
    return 1.0 if not max_norm else min(1.0, max_norm / (float(np.sqrt(sumsq)) + 1e-6))


KERNELS["sgd_update"] = r"""
// p -= lr * scale * g, scale = min(1, max_norm / (|g| + 1e-6)) when clipping (sumsq = |g|^2).
extern "C" __global__ void sgd_update(T* p, const T* g, const T* sumsq, T max_norm, const T* lr, long long n) {
    T scale = max_norm > 0 ? min(T(1), max_norm / (sqrt(sumsq[0]) + T(1e-6))) : T(1);
    T coef = lr[0] * scale;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        p[i] -= coef * g[i];
}
"""


def sgd_update(p, g, max_norm, lr):
    """p -= lr * scale * g over flat arrays; scale clips the global norm to max_norm (0: no clip).

    `lr` is a 1-element array (on the device for CuPy), so a captured step reads each step's value.
    """
    xp = array_module(p)
    if xp is np:
        coef = float(lr[0]) * clip_factor(squared_norm(g), max_norm) if max_norm else float(lr[0])

        def block(lo, hi):
            p[lo:hi] -= g[lo:hi] * coef

        for_row_blocks(p, block, ELEMENT_BLOCK)
        return
    sumsq = squared_norm(g) if max_norm else lr
    _launch("sgd_update", p.dtype, p.size, (p, g, sumsq, _dtype_scalar(p, max_norm or 0), lr, np.int64(p.size)))


KERNELS["adam_update"] = r"""
// Adam with g = scale * gradient: m += (1-b1)(g-m), v += (1-b2)(g^2-v), p -= lr_t m / (sqrt(v)+eps),
// lr_t holding the bias correction.
extern "C" __global__ void adam_update(T* p, const T* grad, T* m, T* v, const T* sumsq, T max_norm,
                                       const T* lr_t, T b1, T b2, T eps, long long n) {
    T scale = max_norm > 0 ? min(T(1), max_norm / (sqrt(sumsq[0]) + T(1e-6))) : T(1);
    T step = lr_t[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
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
    _launch("adam_update", p.dtype, p.size, (p, g, m, v, sumsq, _dtype_scalar(p, max_norm or 0), lr_t,
                                             _dtype_scalar(p, b1), _dtype_scalar(p, b2),
                                             _dtype_scalar(p, eps), np.int64(p.size)))
