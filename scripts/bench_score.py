#!/usr/bin/env python3
"""Sentence-scoring speed: gpurnn's batched scoring against one sentence at a time and against PyTorch.

Scores PTB's test set, one sentence per line (each from a sentence start, over its words and <eos>),
with the small-rnn and medium-lstm models of scripts/bench.py (weights drawn at random with a fixed
seed: speed does not depend on them), and reports sentences/s, tokens/s and peak RSS of:

- gpurnn batched: `gpurnn.score.Scorer` with --batch-size sentences per forward pass (length buckets);
- gpurnn one at a time: the same with a batch of 1;
- PyTorch: the same weights, written by gpurnn's safetensors export (`gpurnn.export.torch_names`) and
  loaded into PyTorch's word_language_model RNNModel, scoring the same sentences in padded batches of
  the same size sorted by length, pads masked out of the sums. Its scores are checked against gpurnn's.

Each measurement runs in its own process, so its peak RSS is its own; each is timed after a warm-up
on the first sentences. --quick scores 40 sentences with D = H = 32 (a smoke test of the harness).

    python scripts/bench_score.py                           # both configs, NumPy, PyTorch on the CPU
    python scripts/bench_score.py --backend cupy --json out.json
    python scripts/bench_score.py --quick
    python scripts/bench_score.py --corpus runs/ptb.h5    # vocabulary and test sentences from a corpus file
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gpurnn.backend import get_backend
from gpurnn.data import Vocab, open_corpus
from gpurnn.data.text import read_chunks
from gpurnn.data.vocab import vocab_from_text
from gpurnn.export.safetensors_file import read_safetensors, write_safetensors
from gpurnn.export.torch_names import torch_tensors
from gpurnn.model import Model, preset_specs
from gpurnn.ops import cpu_threads
from gpurnn.registry import Registry
from gpurnn.score import Scorer

from bench import peak_rss_bytes  # scripts/bench.py, beside this file

PTB = Path(os.environ.get("GPURNN_PTB_DIR", Path(__file__).resolve().parents[1] / "../shared/data/ptb"))
CONFIGS = {"small-rnn": ("simple-rnnlm", {"wordvec_size": 100, "hidden_size": 100}),
           "medium-lstm": ("better-rnnlm", {"wordvec_size": 650, "hidden_size": 650})}
QUICK_SIZES = {"wordvec_size": 32, "hidden_size": 32}
WARMUP_SENTENCES = 20


def build_model(config, vocab_size, quick, backend="numpy"):
    preset, sizes = CONFIGS[config]
    return Model(preset_specs(preset, **(QUICK_SIZES if quick else sizes)), vocab_size, get_backend(backend),
                 Registry(), seed=0).eval()


def run_gpurnn(args, vocab, sentences, batch_size):
    model = build_model(args.config, len(vocab), args.quick, args.backend)
    scorer = Scorer(model, vocab, batch_size=batch_size)
    list(scorer.score(sentences[:WARMUP_SENTENCES]))
    start = time.perf_counter()
    scores = [s.log_prob for s in scorer.score(sentences)]  # each batch is read back: the work is done
    return time.perf_counter() - start, scores


def run_torch(args, vocab, sentences):
    import torch
    from torch import nn

    torch.set_num_threads(cpu_threads())
    tensors, metadata = read_safetensors(args.weights)
    rnn_args = json.loads(metadata["rnn_model"])
    device = torch.device(args.device)

    class RNNModel(nn.Module):
        """PyTorch's word_language_model RNNModel (dropout left out: it scores in evaluation mode)."""

        def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
            super().__init__()
            self.encoder = nn.Embedding(ntoken, ninp)
            self.rnn = nn.LSTM(ninp, nhid, nlayers) if rnn_type == "LSTM" else nn.RNN(ninp, nhid, nlayers)
            self.decoder = nn.Linear(nhid, ntoken)
            if tie_weights:
                self.decoder.weight = self.encoder.weight

        def forward(self, ids):  # (T, B), from zero states
            output, _ = self.rnn(self.encoder(ids))
            return self.decoder(output)

    net = RNNModel(**rnn_args)
    net.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in tensors.items()})
    net = net.to(device).eval()
    eos = vocab.index["<eos>"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def score(texts):
        """Sentences sorted by length, in padded batches; log P of the targets summed where not padding."""
        ids = [vocab.encode(text.split() + ["<eos>"]) for text in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty(len(ids))
        with torch.no_grad():
            for lo in range(0, len(order), args.batch_size):
                part = order[lo:lo + args.batch_size]
                width = max(len(ids[i]) for i in part)
                xs = np.full((width, len(part)), eos, np.int64)
                ts = np.zeros((width, len(part)), np.int64)
                mask = np.zeros((width, len(part)), bool)
                for b, i in enumerate(part):
                    xs[1:len(ids[i]), b] = ids[i][:-1]
                    ts[:len(ids[i]), b] = ids[i]
                    mask[:len(ids[i]), b] = True
                log_p = torch.log_softmax(net(torch.from_numpy(xs).to(device)), dim=-1)
                picked = log_p.gather(-1, torch.from_numpy(ts).to(device)[..., None])[..., 0]
                out[part] = (picked * torch.from_numpy(mask).to(device)).sum(0).double().cpu().numpy()
        return out

    score(sentences[:WARMUP_SENTENCES])
    sync()
    start = time.perf_counter()
    scores = score(sentences)
    sync()
    return time.perf_counter() - start, scores.tolist()


def measure_one(args):
    """One measurement (in a child process): seconds, per-sentence scores and peak RSS, as JSON."""
    vocab = Vocab(Path(args.vocab).read_text(encoding="utf-8").split("\n"))
    sentences = Path(args.sentences).read_text(encoding="utf-8").split("\n")[:-1]
    if args.impl == "torch":
        seconds, scores = run_torch(args, vocab, sentences)
    else:
        seconds, scores = run_gpurnn(args, vocab, sentences, args.batch_size if args.impl == "batched" else 1)
    print(json.dumps({"seconds": seconds, "scores": scores, "peak_rss_bytes": peak_rss_bytes()}))


def in_child(args, config, impl, files):
    cmd = [sys.executable, __file__, "--one", impl, "--config", config, "--backend", args.backend, "--device",
           args.device, "--batch-size", str(args.batch_size), *files] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config} {impl} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sentences(corpus_path=None):
    """PTB's vocabulary and test sentences: from a corpus file when given, else from the text files."""
    if corpus_path:
        with open_corpus(corpus_path) as corpus:
            return list(corpus.vocab), corpus.decode(corpus.split("test")[:]).splitlines()
    vocab = vocab_from_text(read_chunks(PTB / "ptb.train.txt", "word"), "word")
    return vocab, (PTB / "ptb.test.txt").read_text(encoding="utf-8").splitlines()


def has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="gpurnn's backend")
    parser.add_argument("--device", default="cpu", help="PyTorch's device (cpu, cuda)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass (both)")
    parser.add_argument("--quick", action="store_true", help="40 sentences, D = H = 32: checks the harness only")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--corpus", help="a gpurnn corpus (.h5) of PTB: its vocabulary and test split (one "
                                         "sentence per <eos>) instead of the text files in $GPURNN_PTB_DIR")
    parser.add_argument("--one", choices=["batched", "single", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", help=argparse.SUPPRESS)
    parser.add_argument("--sentences", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.impl = args.one
        measure_one(args)
        return
    vocab, sentences = test_sentences(args.corpus)
    sentences = sentences[:40 if args.quick else None]
    tokens = sum(len(s.split()) + 1 for s in sentences)
    impls = ["batched", "single"] + (["torch"] if has_torch() else [])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
        (Path(folder) / "sentences.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
        for config in args.configs:
            weights = Path(folder) / f"{config}.safetensors"
            tensors, rnn_args = torch_tensors(build_model(config, len(vocab), args.quick), Registry())
            write_safetensors(weights, tensors, {"format": "pt", "rnn_model": json.dumps(rnn_args)})
            files = ["--vocab", str(Path(folder) / "vocab.txt"), "--sentences", str(Path(folder) / "sentences.txt"),
                     "--weights", str(weights)]
            results = {impl: in_child(args, config, impl, files) for impl in impls}
            reference = np.array(results["batched"]["scores"])
            for impl, result in results.items():
                difference = np.abs(np.array(result["scores"]) - reference).max() / np.abs(reference).max()
                rows.append({"config": config, "impl": impl, "sentences": len(sentences), "tokens": tokens,
                             "sentences_per_s": len(sentences) / result["seconds"],
                             "tokens_per_s": tokens / result["seconds"],
                             "peak_rss_mb": result["peak_rss_bytes"] / 2**20, "max_rel_difference": float(difference)})
                row = rows[-1]
                print(f"{config:<12} {impl:<8} {row['sentences_per_s']:>10,.0f} sentences/s "
                      f"{row['tokens_per_s']:>11,.0f} tokens/s  rss {row['peak_rss_mb']:>7,.0f} MB  "
                      f"scores vs batched {difference:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": args.backend, "device": args.device,
                                               "batch_size": args.batch_size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
