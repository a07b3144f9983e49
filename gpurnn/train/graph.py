"""A step captured once as a CUDA graph and replayed for every block (CuPy only).

A step of a medium LSTM launches about a thousand small kernels; replaying them as one graph removes
the per-launch cost of the host. `CapturedStep` runs the step eagerly for a few warm-up calls (so
every buffer the step keeps between calls exists: carried state, optimizer moments, the loss
layer's work buffer), then captures one call with a private memory pool, and from then on copies
each batch into fixed device buffers and launches the graph. Everything runs on the backend's one
stream: the eager calls and the captured ones compute alike bit for bit there (cuBLAS promises that
on one stream), and what changes between steps without being an input (the dropout step, the
learning rate), written into device arrays that the kernels read, is in place before each launch.
The GEMMs capture because gpurnn.ops calls cuBLAS directly, bound to the stream before the capture
begins. Any eager use of the model in between (an evaluation) calls `reset()`: the next steps warm
up and capture again. Where capture fails, the work goes on eagerly and says why once.
"""

import contextlib

import numpy as np

from ..backend import using_stream
from ..ops import bind_cublas_to_current_stream


class CapturedStep:
    """compute(xs, ts) -> loss on the backend's stream, replayed from a CUDA graph after WARMUP
    eager calls. `purpose` names what goes on eagerly where capture fails ("training")."""

    WARMUP = 2

    def __init__(self, compute, backend, say, purpose="training"):
        self.compute, self.say, self.purpose = compute, say, purpose
        self.cupy, self.stream = backend.xp, backend.stream
        self.pool = self.cupy.cuda.MemoryPool()  # what the captured step allocates stays with the graph
        self.graph, self.failed, self.calls = None, False, 0
        self.xs = self.ts = self.loss = None

    def reset(self):
        """Drop the graph after the model ran eagerly (its buffers may have moved)."""
        self.graph, self.calls = None, 0

    def __call__(self, xs, ts):
        with using_stream(self.cupy, self.stream):
            if self.failed or self.calls < self.WARMUP:
                self.calls += 1
                return self._eager(xs, ts)
            if self.graph is None:
                try:
                    self._capture(xs, ts)
                except Exception as exc:  # an op refusing capture: go on without the graph
                    self.failed = True
                    self.say(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                             f"{self.purpose} goes on without it")
                    return self._eager(xs, ts)
            return self._replay(xs, ts)

    def _eager(self, xs, ts):
        return self.compute(self.cupy.asarray(xs), self.cupy.asarray(ts))

    def _capture(self, xs, ts):
        cupy = self.cupy
        self.xs, self.ts = cupy.asarray(xs), cupy.asarray(ts)
        bind_cublas_to_current_stream()
        with cupy.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                self.loss = self.compute(self.xs, self.ts)
            except BaseException:
                with contextlib.suppress(Exception):  # end the broken capture; what broke it is the news
                    self.stream.end_capture()
                raise
            self.graph = self.stream.end_capture()

    def _replay(self, xs, ts):
        self.xs.set(np.ascontiguousarray(xs, dtype=self.xs.dtype), stream=self.stream)
        self.ts.set(np.ascontiguousarray(ts, dtype=self.ts.dtype), stream=self.stream)
        self.graph.launch(self.stream)
        return self.loss.copy()
