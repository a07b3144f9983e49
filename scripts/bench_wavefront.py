#!/usr/bin/env python3
"""Two stacked LSTM layers' forward time loop, layer by layer against a wavefront, on the CPU.

gpurnn runs a stack of recurrent layers one layer after another: layer 1's T steps, then layer 2's.
Each step's product has only B rows (20 for PTB), which BLAS runs at a fraction of its large-product
rate, so gpurnn splits it by columns over the cores (`step_matmul`) while the step's gate arithmetic
runs on one thread. A wavefront schedule runs layer 1 at step t beside layer 2 at step t-1, one on
each of two threads, each product on one BLAS thread: the cores each get whole small products and
the gate arithmetic of two steps at once, at the price of layer 2's input projection done per step
(it waits for layer 1's output) instead of as one large product.

Both schedules run the same operations (`gpurnn.ops`: step_matmul, lstm_cell) on PTB's medium shapes
(B = 20, T = 35, H = 650) in float32, and must agree to rounding; the script prints each one's time
per block of T steps, the median of --repeat alternating rounds, and their ratio.

    python scripts/bench_wavefront.py [--repeat 7] [--json PATH]
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import median

import numpy as np
from threadpoolctl import threadpool_limits

from gpurnn.backend import cpu_name
from gpurnn.ops import cpu_threads, lstm_cell, recurrent_loop, step_matmul

B, T, H = 20, 35, 650


def lstm_weights(rng):
    """(Wx, Wh, b) of one LSTM layer of H units over H inputs, small random values."""
    return (rng.standard_normal((H, 4 * H), np.float32) * 0.05, rng.standard_normal((H, 4 * H), np.float32) * 0.05,
            np.zeros(4 * H, np.float32))


class Lane:
    """One layer's state and buffers across a block: h and c per step, the step's gate rows."""

    def __init__(self, weights):
        self.Wx, self.Wh, self.b = weights
        self.hs = np.zeros((T + 1, B, H), np.float32)  # hs[0]: the state before the block
        self.cs = np.zeros((T + 1, B, H), np.float32)
        self.r = np.empty((B, 4 * H), np.float32)

    def step(self, a, t, product=step_matmul):
        """Step t (from 1) given its input projection rows a (B, 4H): the recurrent product, the cell."""
        product(self.hs[t - 1], self.Wh, out=self.r)
        lstm_cell(a, self.r, self.cs[t - 1], self.cs[t], self.hs[t])


def layered(x, layers):
    """Today's schedule: each layer's input projection as one product, then its T steps."""
    lanes, inputs = [Lane(w) for w in layers], x
    for lane in lanes:
        a = (inputs.reshape(B * T, H) @ lane.Wx + lane.b).reshape(T, B, 4 * H)
        with recurrent_loop(lane.hs[0], lane.Wh):
            for t in range(1, T + 1):
                lane.step(a[t - 1], t)
        inputs = lane.hs[1:]
    return inputs


def wavefront(x, layers, pool):
    """Layer 1 at step t beside layer 2 at step t - 1, each on its own thread and one BLAS thread."""
    first, second = (Lane(w) for w in layers)
    a1 = (x.reshape(B * T, H) @ first.Wx + first.b).reshape(T, B, 4 * H)
    a2 = np.empty((B, 4 * H), np.float32)

    def second_step(t):
        np.matmul(first.hs[t], second.Wx, out=a2)
        np.add(a2, second.b, out=a2)
        second.step(a2, t, np.matmul)

    with threadpool_limits(limits=1, user_api="blas"):
        for tick in range(1, T + 2):
            later = pool.submit(second_step, tick - 1) if tick > 1 else None
            if tick <= T:
                first.step(a1[tick - 1], tick, np.matmul)
            if later is not None:
                later.result()
    return second.hs[1:]


def seconds(fn, rounds=3):
    """The fastest of `rounds` timed calls of fn (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="alternating rounds (the median is reported)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layers = [lstm_weights(rng), lstm_weights(rng)]
    x = rng.standard_normal((T, B, H), np.float32)
    with ThreadPoolExecutor(max_workers=1) as pool:
        difference = float(np.max(np.abs(layered(x, layers) - wavefront(x, layers, pool))))
        assert difference < 1e-4, f"the schedules disagree by {difference}"
        rounds = [(seconds(lambda: layered(x, layers)), seconds(lambda: wavefront(x, layers, pool)))
                  for _ in range(args.repeat)]
    ours, wave = median(r[0] for r in rounds), median(r[1] for r in rounds)
    ratio = median(r[0] / r[1] for r in rounds)
    low, high = min(r[0] / r[1] for r in rounds), max(r[0] / r[1] for r in rounds)
    print(f"machine: {cpu_name()}, {cpu_threads()} threads; 2 x LSTM {H}, B = {B}, T = {T}, float32, forward")
    print(f"layer by layer {ours * 1e3:8.2f} ms per block")
    print(f"wavefront      {wave * 1e3:8.2f} ms per block")
    print(f"wavefront speed-up {ratio:.2f}x (rounds {low:.2f}-{high:.2f}); schedules agree within {difference:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": cpu_name(), "threads": cpu_threads(), "layered_ms": ours * 1e3,
                       "wavefront_ms": wave * 1e3, "speedup": ratio, "range": [low, high]}, f, indent=1)


if __name__ == "__main__":
    main()
