"""Logits from a gpurnn checkpoint with h5py and NumPy alone, following docs/checkpoint-format.md (for
a model ending in the adaptive softmax, its log-probabilities over the vocabulary).

It imports nothing of gpurnn: tests/test_checkpoint_format.py runs it in a process where gpurnn cannot
be imported and compares its logits with gpurnn's. Usage: python checkpoint_reader.py CK.h5 IDS.npy OUT.npy
"""

import json
import sys

import h5py
import numpy as np


def read(path):
    """(meta, {param name: (float64 array, its layout attributes)}) of a checkpoint."""
    with h5py.File(path, "r") as f:
        if f.attrs["format"] != "gpurnn-checkpoint" or int(f.attrs["format_version"]) != 2:
            raise ValueError(f"{path} is not a version 2 gpurnn checkpoint")
        meta = json.loads(f.attrs["meta"])
        params = {name: (d[()].astype(np.float64), dict(d.attrs)) for name, d in f["params"].items()}
    return meta, params


def layer_names(specs):
    """The spec's name, else its type, numbered from 1 when the type repeats."""
    types = [spec["type"] for spec in specs]
    seen, names = {}, []
    for spec, kind in zip(specs, types):
        if "name" in spec:
            names.append(spec["name"])
        elif types.count(kind) > 1:
            seen[kind] = seen.get(kind, 0) + 1
            names.append(f"{kind}{seen[kind]}")
        else:
            names.append(kind)
    return names


def expect(attrs, role, axes):
    if attrs.get("role") != role or attrs.get("axes") != axes:
        raise ValueError(f"unexpected layout {attrs}")


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def recurrent(kind, p, xs):
    """An rnn or lstm layer over xs (B, T, D) from a zero state."""
    (Wx, wx_attrs), (Wh, _), (b, _) = p["Wx"], p["Wh"], p["b"]
    gates = wx_attrs.get("gates", "")
    expect(wx_attrs, "x_t @ Wx", "input, 4*hidden" if gates else "input, hidden")
    B, T, _ = xs.shape
    H = Wh.shape[0]
    h, c = np.zeros((B, H)), np.zeros((B, H))
    out = []
    for t in range(T):
        a = xs[:, t] @ Wx + h @ Wh + b
        if kind == "rnn":
            h = np.tanh(a)
        else:
            g = dict(zip(gates.split(","), np.split(a, 4, axis=1)))
            c = sigmoid(g["f"]) * c + sigmoid(g["i"]) * np.tanh(g["g"])
            h = sigmoid(g["o"]) * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def adaptive_log_prob(p, cutoffs, vocab_size, h):
    """The adaptive softmax's log-distribution (B, T, V): head words, then each cluster's."""
    head, attrs = p["head"]
    expect(attrs, "h @ head (+ head_bias): the head words, then one score per cluster", "input, head words + clusters")
    head_lp = log_softmax(h @ head + (p["head_bias"][0] if "head_bias" in p else 0))
    bounds = [*cutoffs, vocab_size]
    parts = [head_lp[..., :bounds[0]]]
    for k in range(len(cutoffs)):
        cluster = log_softmax(h @ p[f"proj{k}"][0] @ p[f"out{k}"][0])
        parts.append(cluster + head_lp[..., bounds[0] + k, None])
    return np.concatenate(parts, axis=-1)


def logits(path, ids):
    """(B, T, V) logits of the checkpoint's model for token ids (B, T), from a zero state."""
    meta, params = read(path)
    x = None
    for name, spec in zip(layer_names(meta["specs"]), meta["specs"]):
        p = {key.split(".", 1)[1]: value for key, value in params.items() if key.split(".", 1)[0] == name}
        kind = spec["type"]
        if kind == "embedding":
            W, attrs = p["W"]
            expect(attrs, "W[ids]: row v is token v's vector", "vocab, size")
            x = W[ids]
        elif kind in ("rnn", "lstm"):
            x = recurrent(kind, p, x)
        elif kind in ("affine", "tied_affine"):
            W = p["W"][0] if kind == "affine" else params[f"{spec['tie_to']}.W"][0].T
            x = x @ W + p["b"][0]
        elif kind == "softmax_loss":
            return x
        elif kind == "affine_softmax_loss":  # the fused output layer: affine's W and b (tied: b only)
            W = p["W"][0] if "tie_to" not in spec else params[f"{spec['tie_to']}.W"][0].T
            return x @ W + p["b"][0]
        elif kind == "adaptive_softmax_loss":
            return adaptive_log_prob(p, spec["cutoffs"], meta["vocab_size"], x)
        elif kind != "dropout":  # dropout is the identity outside training
            raise ValueError(f"this reader knows no layer type {kind!r}")
    raise ValueError("no loss layer")


if __name__ == "__main__":
    np.save(sys.argv[3], logits(sys.argv[1], np.load(sys.argv[2])))
