"""Sampling text from a trained model: a prompt, then one token at a time from the model's distribution
(`Model.log_prob`, whatever its output layer).

Sampling draws from a NumPy generator seeded by the caller, on the host, so the same seed gives the
same text; several samples are drawn side by side, one batch lane each. Prompts are tokenized, and samples turned back into text, by the data package's rules.
"""

import math

import numpy as np

from ..data.text import EOS, detokenize, string_chunks, tokenize
from ..errors import GpurnnError
from ..memory import out_of_memory


def prompt_tokens(text, level):
    """The prompt's tokens at `level` (words, with <eos> for line breaks, or characters)."""
    return [token for batch in tokenize(string_chunks(text, level), level) for token in batch]


def prompt_ids(vocab, tokens):
    """Ids of the prompt's tokens (unknown ones as <unk>); an empty prompt starts as after a sentence."""
    if tokens:
        return [int(i) for i in vocab.encode(tokens)]
    return [vocab.index.get(EOS, 0)]


def generate_texts(model, vocab, level, prompt="", length=50, temperature=1.0, top_k=None, seed=0,
                   num_samples=1, stop_at_eos=False):
    """`num_samples` texts, each the prompt followed by up to `length` sampled tokens.

    With stop_at_eos a sample ends at its first <eos> (a line end at word level).
    """
    tokens = prompt_tokens(prompt, level)
    stop_id = vocab.index.get(EOS) if stop_at_eos else None
    with out_of_memory(f"sampling {num_samples} texts side by side", "--num-samples"):
        rows = sample(model, prompt_ids(vocab, tokens), length, temperature, top_k, seed, num_samples, stop_id)
    return [detokenize(tokens + vocab.decode(row), level) for row in rows]


def next_tokens(logits, temperature, top_k, rng):
    """One token id per row of host logits or log-probabilities (N, V): greedy at temperature 0, else
    sampled from softmax(logits / temperature)."""
    if top_k and top_k < logits.shape[1]:
        dropped = np.argsort(logits, axis=1)[:, :-top_k]
        np.put_along_axis(logits, dropped, -np.inf, axis=1)
    if temperature == 0:
        return logits.argmax(axis=1)
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random(len(p))  # as Generator.choice(V, p=row) draws, so one sample matches it
    return np.minimum((cdf <= u[:, None]).sum(axis=1), p.shape[1] - 1)


def sample(model, ids, length, temperature=1.0, top_k=None, seed=0, num_samples=1, stop_id=None):
    """`num_samples` lists of up to `length` new token ids following `ids`, drawn side by side.

    Temperature 0 is greedy decoding (the likeliest token each time); top_k keeps only the K likeliest
    tokens. A list ends after its first `stop_id` when one is given.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GpurnnError(f"--temperature must be a finite number >= 0 (0 is greedy decoding), not {temperature!r}")
    backend = model.backend
    rng = np.random.default_rng(seed)
    model.eval()
    model.reset_state()
    lanes = np.tile(np.asarray(ids, np.int32), (num_samples, 1))
    if lanes.shape[1] > 1:  # the prompt's state; the distribution is needed after its last token only
        model.predict(backend.asarray(lanes[:, :-1]))
    log_p = model.log_prob(backend.asarray(lanes[:, -1:]))[:, -1]
    out, stopped = [], np.zeros(num_samples, bool)
    for _ in range(length):
        tokens = next_tokens(backend.to_host(log_p).astype(np.float64), temperature, top_k, rng)
        out.append(tokens)
        if stop_id is not None:
            stopped |= tokens == stop_id
            if stopped.all():
                break
        log_p = model.log_prob(backend.asarray(tokens[:, None].astype(np.int32)))[:, -1]
    rows = np.stack(out, axis=1).tolist() if out else [[] for _ in range(num_samples)]
    return [row[: row.index(stop_id) + 1] if stop_id in row else row for row in rows]
