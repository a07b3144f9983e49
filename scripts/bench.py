#!/usr/bin/env python3
"""Training-step and evaluation speed of gpurnn against PyTorch on the same model, in one run.

For each configuration it times, after warm-up, a fixed number of training steps (`Trainer.step`:
forward, backward, gradient-norm clipping, SGD update) and forward-only evaluation blocks as
`gpurnn eval` runs them (host batch in, loss out), each a CUDA graph on CuPy unless --no-cuda-graph,
in tokens/s, on the NumPy and (where usable) CuPy backends, and the same model in PyTorch when torch is importable (same B, T,
sizes, thread count). Each measurement runs in its own process, so its peak RSS is its own; gpurnn
and the peer are measured in back-to-back pairs, --repeat times, and each ratio is the median of the
pairs' ratios (a shared VM's speed drifts by tens of percent between minutes). Prints a table with
the gpurnn / PyTorch ratios (and their range over the pairs) and the fraction of the machine's limit
reached (the model's matmul FLOPs at the measured sgemm rate plus the softmax passes at the measured
memory bandwidth); --json writes everything with the machine's description.

`large-vocab` is WikiText-103's vocabulary size (V = 267,735) on a synthetic Zipf corpus (exponent
1, made here in memory), an LSTM 1 x 512: measured twice, with the full softmax (the presets'
fused affine_softmax_loss, beside PyTorch's Linear + cross_entropy) and with the adaptive softmax (cutoffs 20000,
60000, 200000, div_value 4, beside PyTorch's nn.AdaptiveLogSoftmaxWithLoss with the same cutoffs
and sizes), then the adaptive rows' speed-up over the full ones. The other configs use PTB's shapes
with uniformly drawn ids.

    python scripts/bench.py                          # all configs, all usable backends
    python scripts/bench.py --configs small-rnn --quick --json out.json
    python scripts/bench.py --configs large-vocab --quick  # a few steps: checks the harness only
"""

import gpurnn  # noqa: F401  first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from statistics import median

import numpy as np

from gpurnn.backend import cpu_name, get_backend, probe_cupy
from gpurnn.config import TrainConfig
from gpurnn.model import Model, preset_specs
from gpurnn.ops import cpu_threads, for_row_blocks
from gpurnn.registry import Registry
from gpurnn.train.evaluate import block_forward
from gpurnn.train.graph import CapturedStep
from gpurnn.train.optim import SGD
from gpurnn.train.trainer import Observer, Trainer

V, B, T = 10000, 20, 35
CONFIGS = {
    "small-rnn": dict(preset="simple-rnnlm", cell="rnn", D=100, H=100, layers=1, dropout=0.0, tied=False),
    "small-lstm": dict(preset="rnnlm", cell="lstm", D=100, H=100, layers=1, dropout=0.0, tied=False),
    "medium-lstm": dict(preset="better-rnnlm", cell="lstm", D=650, H=650, layers=2, dropout=0.5, tied=True),
    "large-vocab": dict(preset="rnnlm", cell="lstm", D=512, H=512, layers=1, dropout=0.0, tied=False, V=267735,
                        zipf=1.0, outputs=("full", "adaptive"), cutoffs=[20000, 60000, 200000], div_value=4.0),
}
CLIP, LR = 0.25, 0.1


def vocab_size(cfg):
    return cfg.get("V", V)


def preset_options(cfg, output="full"):
    """The preset's options for a config, with the adaptive output layer's when `output` is "adaptive"."""
    sizes = {"wordvec_size": cfg["D"], "hidden_size": cfg["H"]}
    if cfg["preset"] == "better-rnnlm":
        sizes["dropout"] = cfg["dropout"]
    if output == "adaptive":
        sizes.update(output_layer="adaptive", cutoffs=cfg["cutoffs"], div_value=cfg["div_value"])
    return sizes


def batches(count, seed=0, cfg=None):
    """`count` (xs, ts) blocks: ids drawn uniformly, or with `zipf` from a Zipf law over the vocabulary
    (p(rank k) proportional to 1 / k**zipf), each block's ts its xs one token on (a synthetic corpus)."""
    cfg = cfg or {}
    rng, vocab = np.random.default_rng(seed), vocab_size(cfg)
    if "zipf" not in cfg:
        return [(rng.integers(0, vocab, (B, T)).astype(np.int32), rng.integers(0, vocab, (B, T)).astype(np.int32))
                for _ in range(count)]
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** cfg["zipf"])
    ids = np.searchsorted(cdf, rng.random((count, B, T + 1)) * cdf[-1]).clip(max=vocab - 1).astype(np.int32)
    return [(block[:, :-1].copy(), block[:, 1:].copy()) for block in ids]


def timed(fn, data, warmup, sync):
    """Seconds per call of fn(xs, ts) over `data` after `warmup` untimed calls."""
    for xs, ts in data[:warmup]:
        fn(xs, ts)
    sync()
    start = time.perf_counter()
    for xs, ts in data[warmup:]:
        fn(xs, ts)
    sync()
    return (time.perf_counter() - start) / (len(data) - warmup)


class NoticesToStderr(Observer):
    """Prints the trainer's one-off notices (such as a CUDA graph that could not be captured)."""

    def on_notice(self, message):
        print(message, file=sys.stderr)


def run_gpurnn(cfg, backend_name, data, warmup, cuda_graph=True, output="full"):
    backend = get_backend(backend_name)
    model = Model(preset_specs(cfg["preset"], **preset_options(cfg, output)), vocab_size(cfg), backend, Registry(),
                  seed=0)
    trainer = Trainer(model, SGD(lr=LR), None, TrainConfig(batch_size=B, time_size=T, clip=CLIP,
                                                           cuda_graph=cuda_graph),
                      observer=NoticesToStderr())

    def train_step(xs, ts):
        trainer.step(xs, ts)
        trainer.iteration += 1

    model.train()
    with trainer.threads():
        train = timed(train_step, data, warmup, backend.synchronize)
    model.eval()
    forward = block_forward(model, cuda_graph)  # as `gpurnn eval` runs a block: host batch in, loss out
    evaluate = timed(forward, data, warmup, backend.synchronize)
    result = {"train_s": train, "eval_s": evaluate, "device": backend.describe()["device"]}
    if backend.is_gpu:
        graphs = [g for g in (trainer.graph, forward) if isinstance(g, CapturedStep)]
        pools = [backend.xp.get_default_memory_pool()] + [g.pool for g in graphs]
        result["device_peak_bytes"] = sum(pool.total_bytes() for pool in pools)
        result["cuda_graph"] = bool(trainer.graph and trainer.graph.graph is not None)
    return result


def run_torch(cfg, device_name, data, warmup, output="full"):
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(cpu_threads())
    device = torch.device(device_name)
    vocab = vocab_size(cfg)

    class Net(nn.Module):
        """The same model; `loss(xs, ts, state)` is the mean cross-entropy of the block and the new state."""

        def __init__(self):
            super().__init__()
            cell = {"rnn": nn.RNN, "lstm": nn.LSTM}[cfg["cell"]]
            self.embed = nn.Embedding(vocab, cfg["D"])
            self.drop = nn.Dropout(cfg["dropout"])
            self.rnn = cell(cfg["D"], cfg["H"], num_layers=cfg["layers"], batch_first=True,
                            dropout=cfg["dropout"] if cfg["layers"] > 1 else 0.0)
            if output == "adaptive":
                self.out = nn.AdaptiveLogSoftmaxWithLoss(cfg["H"], vocab, cfg["cutoffs"], div_value=cfg["div_value"])
            else:
                self.out = nn.Linear(cfg["H"], vocab)
            if cfg["tied"]:
                self.out.weight = self.embed.weight

        def loss(self, xs, ts, state):
            hs, state = self.rnn(self.drop(self.embed(xs)), state)
            hs = self.drop(hs).reshape(-1, cfg["H"])
            if output == "adaptive":
                return self.out(hs, ts.reshape(-1)).loss, state
            return nn.functional.cross_entropy(self.out(hs), ts.reshape(-1)), state

    net = Net().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    tensors = [(torch.as_tensor(x, dtype=torch.long, device=device), torch.as_tensor(t, dtype=torch.long, device=device))
               for x, t in data]
    carried = [None]

    def detach(state):
        if state is None:
            return None
        return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()

    def train_step(xs, ts):
        loss, carried[0] = net.loss(xs, ts, detach(carried[0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()

    def eval_step(xs, ts):
        with torch.no_grad():
            _, carried[0] = net.loss(xs, ts, carried[0])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net.train()
    train = timed(train_step, tensors, warmup, sync)
    net.eval()
    evaluate = timed(eval_step, tensors, warmup, sync)
    result = {"train_s": train, "eval_s": evaluate, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def measure_one(config, impl, iters, warmup, cuda_graph, output="full"):
    """One measurement (run in a child process): its timings and its own peak RSS."""
    cfg = CONFIGS[config]
    data = batches(warmup + iters, cfg=cfg)
    if impl.startswith("torch-"):
        result = run_torch(cfg, impl.split("-", 1)[1], data, warmup, output)
    else:
        result = run_gpurnn(cfg, impl, data, warmup, cuda_graph, output)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def peak_rss_bytes():
    """This process's peak resident memory: VmHWM where Linux has it (ru_maxrss would include the
    parent's peak, which survives fork and exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_child(config, impl, args, output="full"):
    """One measurement in a fresh process (which inherits gpurnn's OpenBLAS setting; PyTorch uses MKL)."""
    cmd = [sys.executable, __file__, "--one", config, impl, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--output", output]
    cmd += ["--no-cuda-graph"] if args.no_cuda_graph else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{config} ({output} softmax) on {impl} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def forward_flops_per_token(cfg):
    """Matmul FLOPs of one token's forward pass: recurrent layers' two projections and the output affine."""
    gates = {"rnn": 1, "lstm": 4}[cfg["cell"]]
    flops, size = 0, cfg["D"]
    for _ in range(cfg["layers"]):
        flops += 2 * (size + cfg["H"]) * gates * cfg["H"]
        size = cfg["H"]
    return flops + 2 * cfg["H"] * vocab_size(cfg)


def machine_limits(seconds=1.0):
    """Measured sgemm rate (FLOP/s, on the output affine's shape) and copy bandwidth (bytes/s, all cores)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((B * T, 256), dtype=np.float32)
    w = rng.standard_normal((256, V), dtype=np.float32)
    out = np.empty((B * T, V), np.float32)
    gemm = rate(lambda: np.matmul(a, w, out=out), seconds)
    src = rng.standard_normal((8192, 8192), dtype=np.float32)
    dst = np.empty_like(src)

    def copy():
        for_row_blocks(src, lambda lo, hi: np.copyto(dst[lo:hi], src[lo:hi]), block=256)

    copy_s = 1 / rate(copy, seconds)
    return {"sgemm_flops": gemm * 2 * B * T * 256 * V, "bandwidth_bytes": 2 * src.nbytes / copy_s}


def rate(fn, seconds):
    """Calls per second of fn, over at least `seconds`."""
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def limit_fraction(cfg, limits, seconds_per_token, passes, matmul_factor):
    """Fraction of the machine's limit: ideal time (matmuls at sgemm rate + softmax passes at bandwidth) / measured."""
    ideal = (matmul_factor * forward_flops_per_token(cfg) / limits["sgemm_flops"]
             + passes * 4 * vocab_size(cfg) / limits["bandwidth_bytes"])
    return ideal / seconds_per_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--iters", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5, help="back-to-back gpurnn/peer pairs per config")
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test of the harness")
    parser.add_argument("--backends", default="numpy,cupy",
                        help="comma-separated gpurnn backends to measure (cupy only where usable)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--no-cuda-graph", action="store_true", help="CuPy: run each step eagerly")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.iters, args.warmup, not args.no_cuda_graph, args.output)))
        return 0
    if args.quick:
        args.iters, args.warmup, args.repeat = 8, 2, 1
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    backends = [b for b in args.backends.split(",") if b == "numpy" or (b == "cupy" and probe_cupy()[0])]
    if not backends:
        parser.error(f"none of the backends {args.backends!r} is usable here")
    use_torch = not args.no_torch and subprocess.run([sys.executable, "-c", "import torch"],
                                                     capture_output=True).returncode == 0
    limits = machine_limits()
    machine = {"cpu": cpu_name(), "threads": cpu_threads(), "python": platform.python_version(),
               "numpy": np.__version__, **limits}
    print(f"machine: {machine['cpu']}, {machine['threads']} threads; sgemm {limits['sgemm_flops'] / 1e9:.0f} GFLOP/s, "
          f"copy bandwidth {limits['bandwidth_bytes'] / 1e9:.1f} GB/s")
    rows = []
    for config in configs:
        cfg = CONFIGS[config]
        for backend in backends:
            peer_impl = ("torch-cuda" if backend == "cupy" else "torch-cpu") if use_torch else None
            pair = {}
            for output in cfg.get("outputs", ("full",)):
                row = pair[output] = measure_pair(cfg, config, backend, peer_impl, limits, args, output)
                rows.append(row)
                print_row(row)
            if len(pair) == 2:
                rows.append(adaptive_speedup(config, backend, pair["full"], pair["adaptive"]))
                print_speedup(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "batch": B, "time": T, "iters": args.iters, "results": rows}, f, indent=2)
    return 0


def measure_pair(cfg, config, backend, peer_impl, limits, args, output="full"):
    """`args.repeat` back-to-back pairs (gpurnn, then the peer): each rate is the median over the
    repeats, each ratio the median of the pairs' ratios (a pair shares the machine's state of the
    moment, which on a shared VM drifts by tens of percent), with the pairs' range beside it."""
    ours, peer = [], []
    for _ in range(args.repeat):
        ours.append(in_child(config, backend, args, output))
        if peer_impl:
            peer.append(in_child(config, peer_impl, args, output))
    label = config if "outputs" not in cfg else f"{config}/{output}"
    row = {"config": label, "vocab": vocab_size(cfg), "backend": backend, "device": ours[0]["device"],
           "repeats": args.repeat,
           "train_tok_s": median(B * T / o["train_s"] for o in ours),
           "eval_tok_s": median(B * T / o["eval_s"] for o in ours),
           "peak_rss_mb": max(o["peak_rss_bytes"] for o in ours) / 2**20}
    if backend == "numpy" and output == "full":
        row["train_limit_fraction"] = limit_fraction(cfg, limits, 1 / row["train_tok_s"], 4, 3)
        row["eval_limit_fraction"] = limit_fraction(cfg, limits, 1 / row["eval_tok_s"], 2, 1)
    if "device_peak_bytes" in ours[0]:
        row["device_peak_mb"] = max(o["device_peak_bytes"] for o in ours) / 2**20
        row["cuda_graph"] = ours[0]["cuda_graph"]
    if not peer:
        return row
    row.update(torch=peer[0]["torch"], torch_threads=peer[0]["threads"],
               torch_train_tok_s=median(B * T / p["train_s"] for p in peer),
               torch_eval_tok_s=median(B * T / p["eval_s"] for p in peer),
               torch_peak_rss_mb=max(p["peak_rss_bytes"] for p in peer) / 2**20)
    if "device_peak_bytes" in peer[0]:
        row["torch_device_peak_mb"] = max(p["device_peak_bytes"] for p in peer) / 2**20
    for phase in ("train", "eval"):
        ratios = sorted(p[f"{phase}_s"] / o[f"{phase}_s"] for o, p in zip(ours, peer))
        row[f"{phase}_ratio"] = median(ratios)
        row[f"{phase}_ratio_range"] = [ratios[0], ratios[-1]]
    return row


def adaptive_speedup(config, backend, full, adaptive):
    """How much faster the adaptive softmax trains and evaluates than the full one, in gpurnn (and in
    PyTorch when it ran)."""
    row = {"config": f"{config}/adaptive-vs-full", "backend": backend}
    for who in ("", "torch_"):
        for phase in ("train", "eval"):
            key = f"{who}{phase}_tok_s"
            if key in full:
                row[f"{who}{phase}_speedup"] = adaptive[key] / full[key]
    return row


def print_speedup(row):
    line = (f"{row['config']:<20} {row['backend']:<6} adaptive / full softmax: train {row['train_speedup']:.2f}x "
            f"eval {row['eval_speedup']:.2f}x")
    if "torch_train_speedup" in row:
        line += f" | torch train {row['torch_train_speedup']:.2f}x eval {row['torch_eval_speedup']:.2f}x"
    print(line, flush=True)


def print_row(row):
    line = (f"{row['config']:<20} {row['backend']:<6} train {row['train_tok_s']:>8,.0f} tok/s  "
            f"eval {row['eval_tok_s']:>8,.0f} tok/s  rss {row['peak_rss_mb']:>6,.0f} MB")
    if "train_limit_fraction" in row:
        line += f"  limit {row['train_limit_fraction']:.0%}/{row['eval_limit_fraction']:.0%}"
    if "train_ratio" in row:
        spread = {k: "{:.2f}-{:.2f}".format(*row[f"{k}_ratio_range"]) for k in ("train", "eval")}
        line += (f" | torch {row['torch_train_tok_s']:>8,.0f} / {row['torch_eval_tok_s']:>8,.0f}"
                 f"  ratio train {row['train_ratio']:.2f}x ({spread['train']}) eval {row['eval_ratio']:.2f}x"
                 f" ({spread['eval']})  rss {row['torch_peak_rss_mb']:,.0f} MB")
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
