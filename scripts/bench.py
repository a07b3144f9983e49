#!/usr/bin/env python3
"""Training-step and evaluation speed of gpurnn against PyTorch on the same model, in one run.

For each configuration it times, after warm-up, a fixed number of training steps (forward, backward,
gradient clipping, SGD update) and of forward-only evaluation steps, in tokens/s, on the NumPy and
(where usable) CuPy backends, and the same model in PyTorch when torch is importable (same B, T,
sizes and thread count). Prints a table with gpurnn / PyTorch ratios; --json writes the figures with
the machine's description.

    python scripts/bench.py                      # every config, all usable backends
    python scripts/bench.py --quick --json out.json
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from gpurnn.backend import cpu_name, get_backend, probe_cupy
from gpurnn.model import Model, preset_specs
from gpurnn.registry import Registry
from gpurnn.train.optim import SGD, clip_grads

CONFIGS = {
    "small-rnn": dict(preset="simple-rnnlm", sizes=dict(wordvec_size=100, hidden_size=100),
                      cell="rnn", D=100, H=100, V=10000, B=20, T=35),
}


def batches(cfg, count, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg["B"], cfg["T"])
    return [(rng.integers(0, cfg["V"], shape).astype(np.int32), rng.integers(0, cfg["V"], shape).astype(np.int32))
            for _ in range(count)]


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


def bench_gpurnn(cfg, backend_name, data, warmup):
    backend = get_backend(backend_name)
    model = Model(preset_specs(cfg["preset"], **cfg["sizes"]), cfg["V"], backend, Registry(), seed=0)
    opt = SGD(lr=0.1)
    device = [(backend.asarray(x), backend.asarray(t)) for x, t in data]

    def train_step(xs, ts):
        model.forward(xs, ts)
        model.backward()
        clip_grads(model.grads, 0.25)
        opt.step(model.params, model.grads)

    def eval_step(xs, ts):
        model.forward(xs, ts)

    model.train()
    train = timed(train_step, device, warmup, backend.synchronize)
    model.eval()
    evaluate = timed(eval_step, device, warmup, backend.synchronize)
    return {"train_s": train, "eval_s": evaluate, "device": backend.describe()["device"]}


def bench_torch(cfg, device_name, data, warmup):
    import torch
    from torch import nn

    torch.manual_seed(0)
    device = torch.device(device_name)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg["V"], cfg["D"])
            self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM}[cfg["cell"]](cfg["D"], cfg["H"], batch_first=True)
            self.out = nn.Linear(cfg["H"], cfg["V"])

        def forward(self, xs, state):
            hs, state = self.rnn(self.embed(xs), state)
            return self.out(hs), state

    net = Net().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    tensors = [(torch.as_tensor(x, dtype=torch.long, device=device), torch.as_tensor(t, dtype=torch.long, device=device))
               for x, t in data]
    state = [None]

    def detach(s):
        return None if s is None else (tuple(x.detach() for x in s) if isinstance(s, tuple) else s.detach())

    def train_step(xs, ts):
        logits, s = net(xs, detach(state[0]))
        state[0] = s
        loss = loss_fn(logits.reshape(-1, cfg["V"]), ts.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 0.25)
        opt.step()

    def eval_step(xs, ts):
        with torch.no_grad():
            logits, state[0] = net(xs, state[0])
            loss_fn(logits.reshape(-1, cfg["V"]), ts.reshape(-1))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train = timed(train_step, tensors, warmup, sync)
    evaluate = timed(eval_step, tensors, warmup, sync)
    return {"train_s": train, "eval_s": evaluate, "torch": torch.__version__, "threads": torch.get_num_threads()}


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--iters", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test of the harness")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.warmup = 10, 3
    backends = ["numpy"] + (["cupy"] if probe_cupy()[0] is not None else [])
    use_torch = torch_available() and not args.no_torch
    if use_torch:
        import torch
        torch.set_num_threads(os.cpu_count())
    machine = {"cpu": cpu_name(), "threads": os.cpu_count(), "python": platform.python_version(),
               "numpy": np.__version__}
    rows = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        data = batches(cfg, args.warmup + args.iters)
        tokens = cfg["B"] * cfg["T"]
        for backend in backends:
            ours = bench_gpurnn(cfg, backend, data, args.warmup)
            row = {"config": name, "backend": backend, "device": ours["device"],
                   "train_tok_s": tokens / ours["train_s"], "eval_tok_s": tokens / ours["eval_s"]}
            if use_torch:
                peer = bench_torch(cfg, "cuda" if backend == "cupy" else "cpu", data, args.warmup)
                row.update(torch_train_tok_s=tokens / peer["train_s"], torch_eval_tok_s=tokens / peer["eval_s"],
                           torch=peer["torch"], torch_threads=peer["threads"])
                row["train_ratio"] = row["train_tok_s"] / row["torch_train_tok_s"]
                row["eval_ratio"] = row["eval_tok_s"] / row["torch_eval_tok_s"]
            rows.append(row)
            print_row(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "iters": args.iters, "results": rows}, f, indent=2)
    return 0


def print_row(row):
    peer = (f"  torch {row['torch_train_tok_s']:>9,.0f} / {row['torch_eval_tok_s']:>9,.0f}"
            f"  ratio train {row['train_ratio']:.2f}x eval {row['eval_ratio']:.2f}x") if "train_ratio" in row else ""
    print(f"{row['config']:<12} {row['backend']:<6} train {row['train_tok_s']:>9,.0f} tok/s  "
          f"eval {row['eval_tok_s']:>9,.0f} tok/s{peer}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
