"""Sampling text from a trained model: a prompt, then one token at a time from the softmax.

Sampling draws from a NumPy generator seeded by the caller, on the host, so the same seed gives the
same text on either backend's numbers (up to their floating-point differences).
"""

import numpy as np

from ..errors import GpurnnError

EOS = "<eos>"
UNK = "<unk>"


def tokenize(text, level):
    """Prompt text -> tokens: whitespace-separated words, or characters."""
    return list(text) if level == "char" else text.split()


def render(tokens, level):
    """Tokens -> text: characters joined as they are; words joined by spaces, <eos> as a line break."""
    if level == "char":
        return "".join(tokens)
    lines, words = [], []
    for token in tokens:
        if token == EOS:
            lines.append(" ".join(words) + "\n")
            words = []
        else:
            words.append(token)
    return "".join(lines) + " ".join(words)


def prompt_ids(tokens, vocab):
    """Token ids for a prompt; unknown tokens become <unk>, or an error naming them if there is none."""
    index = {token: i for i, token in enumerate(vocab)}
    unknown = [t for t in tokens if t not in index]
    if unknown and UNK not in index:
        raise GpurnnError(f"prompt tokens not in the vocabulary: {' '.join(unknown[:10])}")
    if not tokens:
        tokens = [EOS if EOS in index else vocab[0]]
    return [index.get(t, index.get(UNK)) for t in tokens]


def sample(model, ids, length, temperature=1.0, top_k=None, seed=0):
    """`length` new token ids following `ids`, sampled with temperature and optional top-k."""
    if temperature <= 0:
        raise GpurnnError("--temperature must be > 0")
    backend = model.backend
    rng = np.random.default_rng(seed)
    model.eval()
    model.reset_state()
    logits = model.predict(backend.asarray(np.array([ids], np.int32)))[0, -1]
    out = []
    for _ in range(length):
        z = backend.to_host(logits).astype(np.float64) / temperature
        if top_k:
            z[np.argsort(z)[:-top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        token = int(rng.choice(len(p), p=p))
        out.append(token)
        logits = model.predict(backend.asarray(np.array([[token]], np.int32)))[0, -1]
    return out
