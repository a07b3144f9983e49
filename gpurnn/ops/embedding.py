"""The embedding's backward: rows added into a table at repeated indices, deterministically."""

import numpy as np

from ..backend import array_module
from .kernels import KERNELS, launch


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
    launch("rank_ids", target.dtype, n, (ids, np.int32(n), order))
    launch("add_sorted_rows", target.dtype, n * D, (ids, order, rows, target, np.int32(n), np.int32(D)))
