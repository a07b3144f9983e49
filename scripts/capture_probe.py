"""On a CUDA GPU: can gpurnn's GEMMs be captured in a CUDA graph, and does the graph compute what the
same work computes eagerly, bit for bit? One line per finding; the last line is the verdict, starting
with "captured" or "FAILED". `scripts/gpu_check.sh` runs it first (python3 scripts/capture_probe.py).

1. `cupy.matmul` during a capture: CuPy 13 and 14 refuse it (NotImplementedError), said as found;
2. where CuPy finds the CUDA headers that it compiles every RawKernel with (CuPy 14), and the
   CUBLAS_WORKSPACE_CONFIG in effect;
3. gpurnn.ops.matmul (cuBLAS called directly) in the layouts and at the sizes of the 2 x 650 PTB
   LSTM's steps (B = 20, T = 35), chained into a RawKernel and elementwise kernels, captured on
   gpurnn's stream and replayed twice with new inputs, against the same work done eagerly on that
   stream, in float32 and float64.
"""

import contextlib
import os
import sys

import numpy as np

from gpurnn import ops
from gpurnn.backend import get_backend, using_stream

SIZES = [((700, 650), (650, 2600)), ((20, 650), (650, 2600)), ((650, 700), (700, 2600), "a.T"),
         ((700, 2600), (2600, 650), "b.T"), ((700,), (700, 2600))]  # x @ Wx, h @ Wh, x.T @ d, d @ W.T, ones @ d


def operands(cupy, dtype, rng):
    pairs = []
    for a_shape, b_shape, *view in SIZES:
        a = cupy.asarray(rng.standard_normal(a_shape[::-1] if view == ["a.T"] else a_shape).astype(dtype))
        b = cupy.asarray(rng.standard_normal(b_shape[::-1] if view == ["b.T"] else b_shape).astype(dtype))
        pairs.append((a.T if view == ["a.T"] else a, b.T if view == ["b.T"] else b))
    return pairs


def step(pairs):
    """sigmoid(tanh(2 a @ b)) for each pair: two GEMMs, a RawKernel, elementwise kernels."""
    results = []
    for a, b in pairs:
        r = ops.matmul(a, b)
        results.append(ops.sigmoid(ops.rnn_cell(r, ops.matmul(a, b)), r))
    return results


def cupy_matmul_in_a_capture(cupy, stream):
    a = cupy.ones((64, 64), cupy.float32)
    with using_stream(cupy, stream):
        stream.begin_capture()
        try:
            cupy.matmul(a, a)
            found = "captured"
        except Exception as exc:
            found = f"refused ({type(exc).__name__}: {exc})"
        finally:
            with contextlib.suppress(Exception):
                stream.end_capture()
    return found


def replay_against_eager(dtype):
    """'' when two replays equal the eager work bit for bit, else what differed."""
    backend = get_backend("cupy", dtype)
    cupy, stream = backend.xp, backend.stream
    pairs = operands(cupy, dtype, np.random.default_rng(0))
    with using_stream(cupy, stream):  # eager work, the capture and the replays all on gpurnn's stream
        ops.bind_cublas_to_current_stream()
        stream.begin_capture()
        captured = step(pairs)
        graph = stream.end_capture()
        for replay in (1, 2):
            eager = [r.get() for r in step(pairs)]
            graph.launch(stream)
            for (a, b), got, want in zip(pairs, captured, eager):
                got = got.get()
                if not np.array_equal(got, want):
                    return (f"{dtype} replay {replay}: {a.shape} @ {b.shape} differs from eager by up to "
                            f"{float(np.abs(got - want).max()):.3g}")
            for a, _ in pairs:
                a *= 1.5  # the next replay reads the inputs as they are then
    return ""


def main():
    backend = get_backend("cupy")
    cupy = backend.xp
    print(f"cupy.matmul in a capture: {cupy_matmul_in_a_capture(cupy, backend.stream)}")
    from cuda import pathfinder  # how CuPy 14 finds them

    headers = pathfinder.find_nvidia_header_directory("cudart")
    print(f"CUDA headers for RawKernels: {headers or 'none found (CuPy 14 needs them: cupy-cuda13x[ctk])'}; "
          f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}")
    try:
        problems = [p for p in (replay_against_eager("float32"), replay_against_eager("float64")) if p]
    except Exception as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        print(f"FAILED: {'; '.join(problems)}")
        return 1
    print(f"captured: ops.matmul with kernels ({2 * len(SIZES)} GEMMs), two replays bit-identical to eager "
          f"in float32 and float64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
