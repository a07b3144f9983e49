"""Sampling text from a trained model: a prompt, then one token at a time from the softmax.

Sampling draws from a NumPy generator seeded by the caller, on the host, so the same seed gives the
same text. Prompts are tokenized, and samples turned back into text, by the data package's rules.
"""

import math

import numpy as np

from ..data.text import EOS, detokenize, string_chunks, tokenize
from ..errors import GpurnnError


def prompt_tokens(text, level):
    """The prompt's tokens at `level` (words, with <eos> for line breaks, or characters)."""
    return [token for batch in tokenize(string_chunks(text, level), level) for token in batch]


def prompt_ids(vocab, tokens):
    """Ids of the prompt's tokens (unknown ones as <unk>); an empty prompt starts as after a sentence."""
    if tokens:
        return [int(i) for i in vocab.encode(tokens)]
    return [vocab.index.get(EOS, 0)]


def generate_text(model, vocab, level, prompt="", length=50, temperature=1.0, top_k=None, seed=0):
    """The prompt followed by `length` sampled tokens, as text."""
    tokens = prompt_tokens(prompt, level)
    ids = sample(model, prompt_ids(vocab, tokens), length, temperature, top_k, seed)
    return detokenize(tokens + vocab.decode(ids), level)


def sample(model, ids, length, temperature=1.0, top_k=None, seed=0):
    """`length` new token ids following `ids`, sampled with temperature and optional top-k."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise GpurnnError(f"--temperature must be a finite number > 0, not {temperature!r}")
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
