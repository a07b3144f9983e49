"""The CPU side of the NumPy bodies: a thread pool for wide per-row work and control of BLAS threads.

NumPy releases the GIL inside its loops, so cache-sized blocks of one array can run on all cores at
once; OpenBLAS, for its part, threads a product with only B = 20 rows poorly. These helpers decide,
by measured sizes, when the pool pays and when BLAS should stay on one thread. On CuPy they do nothing:
the GPU is the parallel part.
"""

import contextlib
import functools
import os
import threading
import queue
from concurrent.futures import Future

import numpy as np

from ..backend import array_module
from .linear import matmul

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


class _Pool:
    """Worker threads for row shares, all started when the pool is made: as many of `size` as the
    process may start (a limit on its address space may allow fewer, or none). Where none started,
    the calls run on the calling thread, so the work is the same whatever started."""

    def __init__(self, size):
        self.tasks = queue.SimpleQueue()
        self.workers = 0
        for _ in range(size):
            try:
                threading.Thread(target=self._work, name="gpurnn-rows", daemon=True).start()
            except RuntimeError:  # "can't start new thread"
                break
            self.workers += 1

    def _work(self):
        while True:
            future, fn, args = self.tasks.get()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def run(self, calls):
        """Run each (fn, *args) of `calls`, on the workers where there are any, and wait for all."""
        if not self.workers:
            for fn, *args in calls:
                fn(*args)
            return
        futures = []
        for fn, *args in calls:
            futures.append(Future())
            self.tasks.put((futures[-1], fn, args))
        for future in futures:
            future.result()


def _pool(threads):
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _Pool(threads)
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

    _pool(threads).run([(share, start) for start in range(0, n, step)])


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
        return matmul(a, b, out=out)
    threads = cpu_threads()
    n = b.shape[1]
    step = -(-n // threads)
    _pool(threads).run([(np.matmul, a, b[:, lo:lo + step], out[:, lo:lo + step]) for lo in range(0, n, step)])
    return out
