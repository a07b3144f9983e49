#!/usr/bin/env python3
"""The cost of data parallelism on one machine: 2 ranks of 1 thread each against 1 process of 2 threads.

Both train the same model on the same global batch (B = 20, T = 35; each rank takes 10 lanes) with
clipping and SGD through `Trainer.step`. For each it prints tokens/s and, for the ranks, the time per
step spent in the trainer's all-reduce of the flat gradient buffer (MPI Allreduce, including any wait
for the slower rank) and its fraction of the step. Then it times the all-reduce of the model's whole
gradient alone (medium-lstm's 2 x 650 tied model: 13.3M floats). Each setup runs in its own
processes, one after the other; the ranks are bound to one core each (mpiexec -bind-to core), the
single process runs on both.

    python scripts/bench_mpi.py [--config medium-lstm] [--iters 20] [--warmup 3] [--json PATH]
    python scripts/bench_mpi.py --config small-lstm --iters 2 --warmup 1      # a quick check that it runs

Needs the `mpi` extra (mpi4py and mpiexec). Timings are only meaningful on an otherwise idle machine.
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench import B, CLIP, CONFIGS, LR, T, V, batches, preset_options  # noqa: E402

from gpurnn.backend import cpu_name, get_backend  # noqa: E402
from gpurnn.config import TrainConfig  # noqa: E402
from gpurnn.model import Model, preset_specs  # noqa: E402
from gpurnn.ops import cpu_threads  # noqa: E402
from gpurnn.registry import Registry  # noqa: E402
from gpurnn.train.optim import SGD  # noqa: E402
from gpurnn.train.parallel import world  # noqa: E402
from gpurnn.train.trainer import Trainer  # noqa: E402


def build(config):
    cfg = CONFIGS[config]
    return Model(preset_specs(cfg["preset"], **preset_options(cfg)), V, get_backend("numpy"), Registry(), seed=0)


def train_steps(config, iters, warmup):
    """Time `iters` steps of the trainer (after `warmup`) on this rank's lanes; the figures, for rank 0."""
    group = world()
    trainer = Trainer(build(config), SGD(lr=LR), None, TrainConfig(batch_size=B, time_size=T, clip=CLIP),
                      group=group)
    lo, hi = group.lanes(B)
    reduce, spent = group.reduce_gradients, [0.0]

    def timed_reduce(flat):  # the trainer's own all-reduce, with a clock around it
        before = time.perf_counter()
        reduce(flat)
        spent[0] += time.perf_counter() - before

    group.reduce_gradients = timed_reduce
    trainer.model.train()
    for k, (xs, ts) in enumerate(batches(warmup + iters)):
        if k == warmup:
            start, spent[0] = time.perf_counter(), 0.0
        trainer.step(xs[lo:hi], ts[lo:hi])
        trainer.iteration += 1
    step_s = (time.perf_counter() - start) / iters
    return {"ranks": group.size, "threads_per_rank": cpu_threads(), "step_s": step_s,
            "tokens_per_second": B * T / step_s, "allreduce_s_per_step": spent[0] / iters,
            "allreduce_fraction": spent[0] / iters / step_s}


def allreduce_alone(config, iters, warmup):
    """Time the MPI all-reduce of a float32 buffer the size of the model's whole gradient."""
    from mpi4py import MPI

    size = build(config).flat_grads.size
    buffer = np.ones(size, np.float32)
    comm = MPI.COMM_WORLD
    for k in range(warmup + iters):
        if k == warmup:
            comm.Barrier()
            start = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    seconds = (time.perf_counter() - start) / iters
    return {"ranks": comm.Get_size(), "floats": size, "allreduce_s": seconds,
            "gigabytes_per_second": 4 * size / seconds / 1e9}


def run(command, threads, args, ranks=None):
    """Run this script's `command` in fresh processes (under mpiexec for `ranks`); rank 0's JSON."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    line = [sys.executable, __file__, command, "--config", args.config, "--iters", str(args.iters),
            "--warmup", str(args.warmup)]
    if ranks:
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
        if mpiexec is None:
            raise SystemExit("bench_mpi: no mpiexec found: pip install 'gpurnn[mpi]'")
        line = [mpiexec, "-n", str(ranks), "-bind-to", "core", *line]
    done = subprocess.run(line, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench_mpi: {command} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="compare", choices=["compare", "steps", "allreduce"])
    parser.add_argument("--config", default="medium-lstm", choices=sorted(CONFIGS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="Write the figures and the machine's description here.")
    args = parser.parse_args()
    if args.command != "compare":  # one measurement, in a child process (rank 0 prints it)
        result = (train_steps if args.command == "steps" else allreduce_alone)(args.config, args.iters, args.warmup)
        if world().rank == 0:
            print(json.dumps(result))
        return
    single = run("steps", 2, args)
    ranks = run("steps", 1, args, ranks=2)
    alone = run("allreduce", 1, args, ranks=2)
    print(f"{args.config}, B={B} T={T}, {cpu_name()}; {args.iters} steps after {args.warmup}")
    print(f"{'setup':<28} {'tokens/s':>9} {'step ms':>9} {'all-reduce ms':>14} {'fraction':>9}")
    for name, r in (("1 process x 2 threads", single), ("2 ranks x 1 thread (MPI)", ranks)):
        print(f"{name:<28} {r['tokens_per_second']:>9,.0f} {1e3 * r['step_s']:>9.1f} "
              f"{1e3 * r['allreduce_s_per_step']:>14.1f} {r['allreduce_fraction']:>9.1%}")
    print(f"all-reduce alone of {alone['floats']:,} float32 over 2 ranks: {1e3 * alone['allreduce_s']:.1f} ms "
          f"({alone['gigabytes_per_second']:.2f} GB/s of buffer)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "cpu": cpu_name(), "single": single, "ranks": ranks,
                       "allreduce_alone": alone}, f, indent=2)


if __name__ == "__main__":
    main()
