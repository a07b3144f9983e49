#!/usr/bin/env python3
"""Minibatch delivery speed of BPTTStream, and peak memory while preparing and streaming a big corpus.

1. PTB: tokens/s delivered by BPTTStream reading HDF5 (in_memory=False), by BPTTStream over an array
   in memory, and by the plain rule sliced from an in-memory array (the peer), for (B, T) = (20, 35)
   and (256, 35). Goal: >= 10M tokens/s from HDF5.
2. Synthetic: a word-level text of --synthetic-mb MB (default 1024) is generated in a temporary folder,
   prepared, then streamed for one epoch, each phase in its own process reporting its peak RSS.
   Goal: under 300 MB. Nothing is left behind.

    python scripts/bench_stream.py                      # the full benchmark (needs ~1 GB + ~0.8 GB disk)
    python scripts/bench_stream.py --synthetic-mb 50    # a quick check
"""

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gpurnn.backend import cpu_name
from gpurnn.data import BPTTStream, open_corpus, prepare_corpus

SHAPES = [(20, 35), (256, 35)]
DEFAULT_PTB = Path(os.environ.get("GPURNN_PTB_DIR", Path(__file__).resolve().parents[1] / "../shared/data/ptb"))


def sliced_batches(ids, B, T):
    """The peer: the batching rule as direct index arithmetic on an in-memory array."""
    M = len(ids) - 1
    lanes = np.arange(B)[:, None] * (M // B) + np.arange(T)[None, :]
    for k in itertools.count():
        p = (lanes + k * T) % M
        yield ids[p], ids[p + 1]


def tokens_per_second(batches, B, T, seconds):
    """Pull batches for about `seconds`; the delivered (B * T) tokens per second."""
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(64):
            next(batches)
        count += 64
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * B * T / elapsed


def bench_ptb(ptb_dir, seconds, workdir):
    corpus_path = Path(workdir) / "ptb.h5"
    prepare_corpus(ptb_dir / "ptb.train.txt", corpus_path)
    rows = []
    with open_corpus(corpus_path) as corpus:
        split = corpus.split("train")
        ids = split[:]
        for B, T in SHAPES:
            rates = {"hdf5_stream": tokens_per_second(BPTTStream(split, B, T, in_memory=False), B, T, seconds),
                     "memory_stream": tokens_per_second(BPTTStream(ids, B, T), B, T, seconds),
                     "sliced_array": tokens_per_second(sliced_batches(ids, B, T), B, T, seconds)}
            rows.append({"B": B, "T": T, **rates})
            print(f"PTB B={B:>3} T={T}: HDF5 stream {rates['hdf5_stream'] / 1e6:7.1f}M tok/s   "
                  f"in-memory stream {rates['memory_stream'] / 1e6:7.1f}M   "
                  f"sliced array (peer) {rates['sliced_array'] / 1e6:7.1f}M   "
                  f"HDF5 / peer {rates['hdf5_stream'] / rates['sliced_array']:.2f}", flush=True)
    return rows


def write_synthetic_text(path, megabytes, seed=0):
    """Zipf-distributed words from a 10,000-word vocabulary, 20 words a line, about `megabytes` MB."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(10_000)])
    weights = 1.0 / np.arange(1, 10_001)
    weights /= weights.sum()
    target, written = megabytes * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lines = words[rng.choice(10_000, size=(10_000, 20), p=weights)]
            text = "\n".join(" ".join(line) for line in lines) + "\n"
            written += f.write(text)
    return written


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def phase(args):
    """Run one phase of the synthetic benchmark in this process; print its figures as JSON."""
    start = time.perf_counter()
    if args.phase == "prepare":
        prepare_corpus(args.text, args.corpus)
        result = {}
    else:
        B, T = SHAPES[-1]
        with open_corpus(args.corpus) as corpus:
            stream = BPTTStream(corpus.split("train"), B, T)
            for _ in range(stream.steps_per_epoch):
                next(stream)
            result = {"tokens": stream.steps_per_epoch * B * T, "held_in_memory": stream.in_memory}
    seconds = time.perf_counter() - start
    print(json.dumps({**result, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def run_phase(name, text, corpus):
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--text", str(text), "--corpus", str(corpus)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def bench_synthetic(megabytes, workdir):
    text, corpus = Path(workdir) / "synthetic.txt", Path(workdir) / "synthetic.h5"
    size = write_synthetic_text(text, megabytes)
    prepared = run_phase("prepare", text, corpus)
    streamed = run_phase("stream", text, corpus)
    print(f"synthetic {size / 1e6:.0f} MB text -> {corpus.stat().st_size / 1e6:.0f} MB corpus: "
          f"prepare {prepared['seconds']:.1f} s, peak RSS {prepared['peak_rss_mb']:.0f} MB; "
          f"stream one epoch (B=256, T=35, {streamed['tokens'] / 1e6:.0f}M tokens) "
          f"{streamed['tokens'] / streamed['seconds'] / 1e6:.1f}M tok/s, peak RSS {streamed['peak_rss_mb']:.0f} MB",
          flush=True)
    return {"text_bytes": size, "corpus_bytes": corpus.stat().st_size, "prepare": prepared, "stream": streamed}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptb-dir", type=Path, default=DEFAULT_PTB)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per PTB measurement")
    parser.add_argument("--synthetic-mb", type=int, default=1024, help="size of the synthetic text (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--phase", choices=["prepare", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--text", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args)
    report = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__}}
    with tempfile.TemporaryDirectory(prefix="gpurnn-bench-") as workdir:
        if (args.ptb_dir / "ptb.train.txt").exists():
            report["ptb"] = bench_ptb(args.ptb_dir, args.seconds, workdir)
        else:
            print(f"no PTB at {args.ptb_dir}: skipping the PTB figures", flush=True)
        if args.synthetic_mb > 0:
            report["synthetic"] = bench_synthetic(args.synthetic_mb, workdir)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
