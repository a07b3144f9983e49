#!/usr/bin/env python3
"""Where a training step's time goes: each layer's forward and backward, and the optimizer, in ms.

Uses scripts/bench.py's configurations and data; run it on a quiet machine.

    python scripts/profile_step.py --config small-rnn --backend numpy
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench import B, CLIP, CONFIGS, LR, T, V, batches, preset_options  # noqa: E402

from gpurnn.backend import get_backend  # noqa: E402
from gpurnn.model import Model, preset_specs  # noqa: E402
from gpurnn.registry import Registry  # noqa: E402
from gpurnn.train.optim import SGD, clip_grads  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small-rnn", choices=list(CONFIGS))
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    backend = get_backend(args.backend)
    cfg = CONFIGS[args.config]
    model = Model(preset_specs(cfg["preset"], **preset_options(cfg)), V, backend, Registry(), seed=0)
    opt = SGD(lr=LR)
    totals = defaultdict(float)

    def clock(name, fn, *a):
        backend.synchronize()
        start = time.perf_counter()
        out = fn(*a)
        backend.synchronize()
        totals[name] += time.perf_counter() - start
        return out

    data = [(backend.asarray(x), backend.asarray(t)) for x, t in batches(args.iters + 2)]
    for step, (xs, ts) in enumerate(data):
        if step == 2:
            totals.clear()  # warm-up done
        x = xs
        for name, layer in zip(model.names[:-1], model.layers[:-1]):
            x = clock(f"{name} forward", layer.forward, x)
        clock(f"{model.names[-1]} forward", model.layers[-1].forward, x, ts)
        d = 1.0
        for name, layer in reversed(list(zip(model.names, model.layers))):
            d = clock(f"{name} backward", layer.backward, d)
        for layer in model.tied:
            clock("tied grads", layer.add_tied_grads)
        grads = model.grads
        clock("clip", clip_grads, grads, CLIP)
        clock("sgd", opt.step, model.params, grads)
    total = sum(totals.values())
    print(f"{args.config} on {backend.name}: {1000 * total / args.iters:.1f} ms/step, "
          f"{B * T * args.iters / total:,.0f} tok/s")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {1000 * seconds / args.iters:7.2f} ms  {seconds / total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
