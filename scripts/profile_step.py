#!/usr/bin/env python3
"""Where a training step's time goes: each layer's forward and backward, and the optimizer, in ms.

Uses scripts/bench.py's configurations and data; run it on a quiet machine.

    python scripts/profile_step.py --config small-rnn --backend numpy
    python scripts/profile_step.py --config large-vocab --output adaptive
    python scripts/profile_step.py --model-config scripts/ptb_lstm.toml --optimizer adam
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench import B, CLIP, CONFIGS, LR, T, batches, preset_options, vocab_size  # noqa: E402

from gpurnn.backend import get_backend  # noqa: E402
from gpurnn.model import Model, preset_specs  # noqa: E402
from gpurnn.registry import Registry  # noqa: E402
from gpurnn.train.job import load_model_config  # noqa: E402
from gpurnn.train.optim import OPTIMIZERS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small-rnn", choices=list(CONFIGS))
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--model-config", metavar="TOML", help="a model file instead of --config's preset")
    parser.add_argument("--output", default="full", choices=["full", "adaptive"],
                        help="the config's output layer (adaptive: configs with cutoffs, such as large-vocab)")
    parser.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS))
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    backend = get_backend(args.backend)
    cfg = CONFIGS[args.config]
    specs = load_model_config(args.model_config) if args.model_config else preset_specs(
        cfg["preset"], **preset_options(cfg, args.output))
    model = Model(specs, vocab_size(cfg), backend, Registry(), seed=0)
    model.train()
    model.use_sparse_rows(not backend.is_gpu)  # as the trainer does
    opt = OPTIMIZERS[args.optimizer](lr=LR)
    totals = defaultdict(float)

    def clock(name, fn, *a):
        backend.synchronize()
        start = time.perf_counter()
        out = fn(*a)
        backend.synchronize()
        totals[name] += time.perf_counter() - start
        return out

    data = [(backend.asarray(x), backend.asarray(t)) for x, t in batches(args.iters + 2, cfg=cfg)]
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
        clock("update (clipped)", opt.step, model.flat_params, model.flat_grads, CLIP, model.sparse_segments())
    total = sum(totals.values())
    print(f"{args.model_config or args.config} ({args.optimizer}) on {backend.name}: {1000 * total / args.iters:.1f} ms/step, "
          f"{B * T * args.iters / total:,.0f} tok/s")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {1000 * seconds / args.iters:7.2f} ms  {seconds / total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
