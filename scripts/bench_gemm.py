#!/usr/bin/env python3
"""The matrix products of one training step, timed alone: NumPy's BLAS against PyTorch's, same shapes.

A training step of these models is nearly all matrix products, so their time in each library bounds
what the whole step can reach: if NumPy's products alone take longer than PyTorch's whole step, no
work outside them can close the gap. For each scripts/bench.py configuration it lists every product of
a step (input projections, the T per-step recurrent products with B rows, the weight and input
gradients, the output affine), times each with C-contiguous float32 operands in both libraries in
the same process (alternating, median of --repeat), and prints the sums as tokens/s bounds.

    python scripts/bench_gemm.py [--configs medium-lstm] [--json PATH]
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import json
import sys
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench import B, CONFIGS, T, V, rate  # noqa: E402

from gpurnn.backend import cpu_name  # noqa: E402
from gpurnn.ops import cpu_threads  # noqa: E402


def step_products(cfg):
    """(what, phase, M, K, N, count): each product (M x K) @ (K x N) of one step, `count` times."""
    rows, G = B * T, {"rnn": 1, "lstm": 4}[cfg["cell"]] * cfg["H"]
    H, size, products = cfg["H"], cfg["D"], []
    for _ in range(cfg["layers"]):
        products += [("input projection x Wx", "forward", rows, size, G, 1),
                     ("recurrent h Wh, per step", "forward", B, H, G, T),
                     ("recurrent dh = da Wh^T, per step", "backward", B, G, H, T),
                     ("dWx = x^T da", "backward", size, rows, G, 1),
                     ("dWh = h^T da", "backward", H, rows, G, 1),
                     ("dx = da Wx^T", "backward", rows, G, size, 1)]
        size = H
    return products + [("output affine", "forward", rows, H, V, 1),
                       ("output dW = h^T dlogits", "backward", H, rows, V, 1),
                       ("output dh = dlogits W^T", "backward", rows, V, H, 1)]


def time_product(M, K, N, torch, repeat):
    """Median seconds of one (M x K) @ (K x N) product in NumPy and in PyTorch, measured alternately."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, K), np.float32), rng.standard_normal((K, N), np.float32)
    out = np.empty((M, N), np.float32)
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out.copy())
    ours, peer = [], []
    for _ in range(repeat):
        ours.append(1 / rate(lambda: np.matmul(a, b, out=out), 0.2))
        peer.append(1 / rate(lambda: torch.mm(ta, tb, out=tout), 0.2))
    return median(ours), median(peer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        parser.error("PyTorch is not importable: pip install torch==2.13.0 (the peer BLAS)")
    torch.set_num_threads(cpu_threads())
    results = {}
    print(f"{cpu_name()}, {cpu_threads()} threads; NumPy {np.__version__}, PyTorch {torch.__version__}")
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
        rows, totals = [], {"forward": [0.0, 0.0], "backward": [0.0, 0.0]}
        for what, phase, M, K, N, count in step_products(CONFIGS[config]):
            ours, peer = time_product(M, K, N, torch, args.repeat)
            totals[phase][0] += count * ours
            totals[phase][1] += count * peer
            rows.append({"what": what, "phase": phase, "shape": [M, K, N], "count": count,
                         "numpy_gflops": 2e-9 * M * K * N / ours, "torch_gflops": 2e-9 * M * K * N / peer})
        train = [f + b for f, b in zip(totals["forward"], totals["backward"])]
        summary = {"train_tok_s_bound": [B * T / s for s in train],
                   "eval_tok_s_bound": [B * T / s for s in totals["forward"]]}
        results[config] = {"products": rows, **summary}
        print(f"{config}: products alone allow train {summary['train_tok_s_bound'][0]:,.0f} tok/s with NumPy, "
              f"{summary['train_tok_s_bound'][1]:,.0f} with PyTorch; eval {summary['eval_tok_s_bound'][0]:,.0f} / "
              f"{summary['eval_tok_s_bound'][1]:,.0f}")
        for row in rows:
            print(f"  {row['what']:<34} {'x'.join(map(str, row['shape'])):>15} x{row['count']:<3} "
                  f"NumPy {row['numpy_gflops']:6.0f}  PyTorch {row['torch_gflops']:6.0f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": cpu_threads(), "numpy": np.__version__,
                       "torch": torch.__version__, "batch": B, "time": T, "vocab": V, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
