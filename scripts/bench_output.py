#!/usr/bin/env python3
"""Speed and memory of the fused output layer (`affine_softmax_loss`) beside the pair it replaces
(`affine` -> `softmax_loss`), on the same features, weights and targets, in one run.

For each shape it times training steps of the output layer alone (forward and backward, host
features already on the device), fused and pair in back-to-back rounds, --repeat times; the ratio
is the median of the rounds' ratios (a shared machine's speed drifts between minutes). On NumPy it
also gives the peak bytes one step allocates (tracemalloc), which for the pair includes its N x V
logits and work buffer. Shapes: PTB's block (N = 20 x 35 rows, D = 650, V = 10,000) and WikiText-103's
vocabulary (V = 267,735, D = 512), float32, on NumPy and (where usable) CuPy.

    python scripts/bench_output.py                  # all shapes, all usable backends
    python scripts/bench_output.py --chunk-rows 64,350,700  # the fused layer at each chunk size
    python scripts/bench_output.py --quick          # tiny shapes, one round: checks the harness only
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import time
import tracemalloc
from statistics import median

import numpy as np

from gpurnn.backend import get_backend, probe_cupy
from gpurnn.layers import LayerContext
from gpurnn.registry import Registry

SHAPES = {"ptb": dict(N=700, D=650, V=10000), "large-vocab": dict(N=700, D=512, V=267735)}
QUICK = {"tiny": dict(N=70, D=16, V=300)}


def output_step(fused, backend, registry, N, D, V, chunk_rows=None):
    """step(x, t) -> loss: one training step of the fused layer (its default chunks, or `chunk_rows`)
    or of the pair, built with one seed."""
    ctx = LayerContext(backend, np.random.default_rng(0), D, V)
    if fused:
        layer = registry.build_layer({"type": "affine_softmax_loss", "chunk_rows": chunk_rows}, ctx)

        def step(x, t):
            loss = layer.forward(x, t)
            layer.backward()
            return loss
        step.rows = layer.chunk_size(N)
        return step
    affine = registry.build_layer({"type": "affine"}, ctx)
    loss_layer = registry.build_layer({"type": "softmax_loss"}, LayerContext(backend, ctx.rng, V, V))

    def step(x, t):
        loss = loss_layer.forward(affine.forward(x), t)
        affine.backward(loss_layer.backward())
        return loss
    return step


def seconds_per_step(step, x, t, iters, sync):
    step(x, t)  # warm-up: buffers made, kernels compiled
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step(x, t)
    sync()
    return (time.perf_counter() - start) / iters


def peak_bytes(step, x, t):
    """The most bytes NumPy holds at once during one step of layers that never ran (their work buffers
    made in it), beyond their parameters and gradients."""
    tracemalloc.start()
    try:
        step(x, t)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(backend, shape, iters, repeat, chunk_rows):
    registry, rng = Registry(), np.random.default_rng(1)
    x = backend.asarray(rng.standard_normal((shape["N"], shape["D"])).astype(np.float32))
    t = backend.asarray(rng.integers(0, shape["V"], shape["N"]).astype(np.int32))

    def built():
        return {name: output_step(name == "fused", backend, registry, **shape, chunk_rows=chunk_rows)
                for name in ("fused", "pair")}

    steps = built()
    rounds = [{name: seconds_per_step(step, x, t, iters, backend.synchronize) for name, step in steps.items()}
              for _ in range(repeat)]
    row = {name: shape["N"] / median(r[name] for r in rounds) for name in steps}  # tokens/s
    row["ratio"] = median(r["pair"] / r["fused"] for r in rounds)  # > 1: fused is faster
    row["rows"] = steps["fused"].rows
    if backend.xp is np:
        fresh = built()  # no buffers yet
        row.update({f"{name}_peak_MiB": peak_bytes(step, x, t) / 2 ** 20 for name, step in fresh.items()})
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test of the harness")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk-rows", default="", help="comma-separated rows per chunk to time the fused layer "
                        "at, each beside the pair (default: the layer's own rule)")
    args = parser.parse_args()
    chunk_rows = [int(r) for r in args.chunk_rows.split(",") if r] or [None]
    shapes, iters, repeat = (QUICK, 2, 1) if args.quick else (SHAPES, args.iters, args.repeat)
    backends = ["numpy"] + (["cupy"] if probe_cupy()[0] is not None else [])
    print(f"{'shape':<12} {'backend':<7} {'chunk':>6} {'fused tok/s':>12} {'pair tok/s':>12} "
          f"{'fused/pair speed':>17} {'peak MiB fused':>15} {'pair':>8}")
    for name, shape in shapes.items():
        for backend_name in backends:
            for rows in chunk_rows:
                row = measure(get_backend(backend_name, dtype="float32"), shape, iters, repeat, rows)
                peaks = (f"{row['fused_peak_MiB']:>15.1f} {row['pair_peak_MiB']:>8.1f}" if "fused_peak_MiB" in row
                         else f"{'-':>15} {'-':>8}")
                print(f"{name:<12} {backend_name:<7} {row['rows']:>6} {row['fused']:>12,.0f} {row['pair']:>12,.0f} "
                      f"{row['ratio']:>17.2f} {peaks}", flush=True)


if __name__ == "__main__":
    main()
