"""The embedding's backward: rows added into a table at repeated indices, deterministically.

On CuPy the positions are first sorted by id with a stable radix sort written here as three small
kernels per 8-bit digit, rather than with `cupy.argsort`: that one runs on Thrust, which allocates
its temporary storage and synchronises inside the call, neither of which a CUDA graph capture
allows. A radix sort without atomics is deterministic (the same order every run) and linear in the
number of ids; each id's rows are then added in position order.
"""

import numpy as np

from ..backend import array_module
from .kernels import KERNELS, launch

RADIX_BITS = 8  # one digit per pass: 256 buckets; PTB's 10,000 ids take two passes, 267k three
MOST_WORKERS = 1024  # sort workers, each walking a contiguous share of the positions
IDS_PER_WORKER = 32  # fewer workers for fewer ids: the scan's work is 256 counters per worker

KERNELS["radix_count"] = r"""
// Stable radix sort by id, one pass per 8-bit digit; step 1: worker w counts the digits of its share
// [w * chunk, (w + 1) * chunk) of the positions (in the order so far; position order when first)
// into its own column w of hist (digit-major: hist[digit * workers + w]).
extern "C" __global__ void radix_count(const int* ids, const int* order, int first, int shift, long long n,
                                       long long chunk, long long workers, int* hist) {
    GRID_STRIDE(w, workers) {
        for (long long d = 0; d < 256; ++d) hist[d * workers + w] = 0;
        for (long long i = w * chunk; i < n && i < (w + 1) * chunk; ++i) {
            unsigned int digit = ((unsigned int)ids[first ? i : order[i]] >> shift) & 255u;
            ++hist[digit * workers + w];
        }
    }
}
"""
KERNELS["exclusive_scan"] = r"""
// One block, in place: values[k] = values[0] + ... + values[k - 1]. Each thread sums a contiguous
// segment, the block scans the segment sums (Hillis-Steele), then each thread rewrites its segment.
extern "C" __global__ void exclusive_scan(int* values, long long count) {
    __shared__ int part[256];
    long long per = (count + blockDim.x - 1) / blockDim.x, lo = threadIdx.x * per;
    long long hi = lo + per < count ? lo + per : count;
    int sum = 0;
    for (long long k = lo; k < hi; ++k) sum += values[k];
    part[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int step = 1; step < blockDim.x; step <<= 1) {
        int before = threadIdx.x >= step ? part[threadIdx.x - step] : 0;
        __syncthreads();
        part[threadIdx.x] += before;
        __syncthreads();
    }
    int run = threadIdx.x ? part[threadIdx.x - 1] : 0;
    for (long long k = lo; k < hi; ++k) { int v = values[k]; values[k] = run; run += v; }
}
"""
KERNELS["radix_scatter"] = r"""
// Step 3: worker w walks its share in order again and puts each position at the next place its
// digit's bucket has for it (hist, scanned, holds where worker w's part of each bucket starts):
// positions with equal digits keep their order, so the sort is stable.
extern "C" __global__ void radix_scatter(const int* ids, const int* order, int first, int shift, long long n,
                                         long long chunk, long long workers, int* hist, int* sorted) {
    GRID_STRIDE(w, workers) {
        for (long long i = w * chunk; i < n && i < (w + 1) * chunk; ++i) {
            int position = first ? (int)i : order[i];
            unsigned int digit = ((unsigned int)ids[position] >> shift) & 255u;
            sorted[hist[digit * workers + w]++] = position;
        }
    }
}
"""
KERNELS["add_sorted_rows"] = r"""
// For each run of equal ids in sorted order, one thread per column adds the run's rows to the id's
// row of target one after another, in position order (deterministic, no atomics: np.add.at's sum);
// an id outside [0, V) has no row there and is skipped (the data layer refuses such ids earlier).
extern "C" __global__ void add_sorted_rows(const int* ids, const int* order, const T* rows, T* target,
                                           long long n, int D, int V) {
    GRID_STRIDE(k, n * D) {
        long long r = k / D, j = k % D;
        int id = ids[order[r]];
        if ((r > 0 && ids[order[r - 1]] == id) || id < 0 || id >= V) continue;
        T sum = target[(long long)id * D + j];
        for (long long s = r; s < n && ids[order[s]] == id; ++s) sum += rows[(long long)order[s] * D + j];
        target[(long long)id * D + j] = sum;
    }
}
"""


def scatter_add_rows(target, index, rows):
    """target[index[i]] += rows[i] for every i, repeated indices summed in index order.

    The embedding's backward. NumPy: sort by index and sum each run with `np.add.reduceat` (much
    faster than `np.add.at`; pairwise within a run). CuPy: sort the positions by id
    (`sorted_positions`), then one thread per (run, column) adds its run's rows to the target one
    after another in index order, which is `np.add.at`'s result bit for bit. Both are deterministic,
    so a GPU run repeats bit for bit (atomics would not).
    """
    xp = array_module(target)
    if len(index) == 0:
        return
    if xp is np:
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
        target[sorted_index[starts]] += np.add.reduceat(rows[order], starts, axis=0)
        return
    ids = xp.ascontiguousarray(index, dtype=xp.int32)
    rows = xp.ascontiguousarray(rows)
    n, D = rows.shape
    order = sorted_positions(ids, target.shape[0], target.dtype)
    launch("add_sorted_rows", target.dtype, n * D,
           (ids, order, rows, target, np.int64(n), np.int32(D), np.int32(target.shape[0])))


def sorted_positions(ids, vocab_size, dtype):
    """The positions 0..n-1 of the device int32 array `ids` (values in [0, vocab_size)) ordered by
    (id, position): an LSD radix sort, one stable pass per 8-bit digit of the largest id.

    Each pass: `radix_count` (per worker and digit), `exclusive_scan` (where each worker's part of
    each bucket starts), `radix_scatter` (stable placement). Nothing waits for the GPU and nothing
    is allocated inside a kernel, so it captures in a CUDA graph. `dtype` only picks the compiled
    variant of the kernels (they read no floats).
    """
    xp = array_module(ids)
    n = ids.size
    workers = min(MOST_WORKERS, -(-n // IDS_PER_WORKER))
    chunk = -(-n // workers)
    passes = max(1, -(-max(vocab_size - 1, 1).bit_length() // RADIX_BITS))
    hist = xp.empty(256 * workers, xp.int32)
    source, sorted_ = xp.empty(n, xp.int32), xp.empty(n, xp.int32)
    for p in range(passes):
        digit = (np.int32(p == 0), np.int32(p * RADIX_BITS), np.int64(n), np.int64(chunk), np.int64(workers))
        launch("radix_count", dtype, workers, (ids, source, *digit, hist))
        launch("exclusive_scan", dtype, hist.size, (hist, np.int64(hist.size)), blocks=1)
        launch("radix_scatter", dtype, workers, (ids, source, *digit, hist, sorted_))
        source, sorted_ = sorted_, source
    return source
