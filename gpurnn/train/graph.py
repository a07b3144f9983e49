"""A training step captured once as a CUDA graph and replayed for every block (CuPy only).

A step of a medium LSTM launches about a thousand small kernels; replaying them as one graph removes
the per-launch cost of the host. `CapturedStep` runs the step eagerly for a few warm-up calls (so
every buffer the step keeps between calls exists: carried state, optimizer moments, the loss
layer's work buffer), then captures one call on a non-blocking stream with a private memory pool,
and from then on copies each batch into fixed device buffers and launches the graph. What changes
between steps without being an input (the dropout step, the learning rate) lives in device arrays
that the kernels read, written before each launch. Any eager use of the model in between (an
evaluation) calls `reset()`: the next steps warm up and capture again. Where capture fails,
training goes on eagerly and says why once.
"""

import contextlib

import numpy as np


class CapturedStep:
    """compute(xs, ts) -> loss, replayed from a CUDA graph after WARMUP eager calls."""

    WARMUP = 2

    def __init__(self, compute, cupy, say):
        self.compute, self.cupy, self.say = compute, cupy, say
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()  # what the captured step allocates stays with the graph
        self.graph, self.failed, self.calls = None, False, 0
        self.xs = self.ts = self.loss = None

    def reset(self):
        """Drop the graph after the model ran eagerly (its buffers may have moved)."""
        self.graph, self.calls = None, 0

    def __call__(self, xs, ts):
        cupy = self.cupy
        if self.failed or self.calls < self.WARMUP:
            self.calls += 1
            return self.compute(cupy.asarray(xs), cupy.asarray(ts))
        if self.graph is None:
            try:
                self._capture(xs, ts)
            except Exception as exc:  # cuBLAS or an op refusing capture: go on without the graph
                self.failed = True
                self.say(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                         f"training goes on without it")
                return self.compute(cupy.asarray(xs), cupy.asarray(ts))
        return self._replay(xs, ts)

    def _capture(self, xs, ts):
        cupy = self.cupy
        self.xs, self.ts = cupy.asarray(xs), cupy.asarray(ts)
        self.stream.wait_event(cupy.cuda.Stream.null.record())
        with self.stream, cupy.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                self.loss = self.compute(self.xs, self.ts)
            except BaseException:
                with contextlib.suppress(Exception):  # end the broken capture; what broke it is the news
                    self.stream.end_capture()
                raise
            self.graph = self.stream.end_capture()

    def _replay(self, xs, ts):
        cupy = self.cupy
        null = cupy.cuda.Stream.null
        self.stream.wait_event(null.record())  # the step counter and learning rate written before
        with self.stream:
            self.xs.set(np.ascontiguousarray(xs, dtype=self.xs.dtype), stream=self.stream)
            self.ts.set(np.ascontiguousarray(ts, dtype=self.ts.dtype), stream=self.stream)
            self.graph.launch(self.stream)
            loss = self.loss.copy()
        null.wait_event(self.stream.record())
        return loss
