"""The vocabulary: id <-> token, how it is chosen from train-split counts, and fast encoding.

Ids are assigned by frequency in the train split, most frequent first, ties by first appearance; the
special tokens (`<unk>`, and `<eos>` at word level) are always in it, at their frequency rank when they
occur in the text and at the end otherwise.
"""

from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from .text import SPECIAL_TOKENS, UNK, tokenize

MIN_VOCAB_SIZE = 3


def count_tokens(token_batches):
    """A Counter of tokens over batches of tokens; its order is first appearance (it is a dict)."""
    counts = Counter()
    for tokens in token_batches:
        counts.update(tokens)
    return counts


def choose_tokens(counts, specials, vocab_size=None, min_count=1):
    """The vocabulary's tokens from train counts: by frequency (stable), at most `vocab_size`, specials kept.

    Words seen fewer than `min_count` times are left out; when `vocab_size` cuts the list, the rarest
    words make room for any special token that did not make it on frequency.
    """
    limit = float("inf") if vocab_size is None else vocab_size
    ranked = sorted(counts, key=counts.__getitem__, reverse=True)  # stable: ties keep first appearance
    tokens, missing = [], list(specials)
    for token in ranked:
        if token in missing:
            tokens.append(token)
            missing.remove(token)
        elif counts[token] >= min_count and len(tokens) + len(missing) < limit:
            tokens.append(token)
    return tokens + missing


class Vocab(Sequence):
    """The vocabulary: `vocab[i]` is the token with id i, `vocab.index[token]` (or `vocab.id(token)`) its id.

    Encoding maps tokens outside it to `<unk>`.
    """

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise DataError("the vocabulary has a repeated token")
        if UNK not in self.index:
            raise DataError(f"the vocabulary has no {UNK} token")
        self.unk_id = self.index[UNK]
        self._char_table = None

    def __getitem__(self, i):
        return self.tokens[i]

    def __len__(self):
        return len(self.tokens)

    def __contains__(self, token):
        return token in self.index

    def id(self, token):
        """The id of `token`; DataError if it is not in the vocabulary."""
        try:
            return self.index[token]
        except KeyError:
            raise DataError(f"{token!r} is not in the vocabulary") from None

    def encode(self, tokens):
        """Ids (int32) of a sequence of tokens, `<unk>` for unknown ones; a str is a sequence of chars."""
        if isinstance(tokens, str):
            return self._encode_chars(tokens)
        get, unk = self.index.get, self.unk_id
        return np.fromiter((get(t, unk) for t in tokens), dtype=np.int32, count=len(tokens))

    def decode(self, ids):
        """The tokens of a sequence of ids."""
        tokens = self.tokens
        return [tokens[i] for i in np.asarray(ids, dtype=np.int64).ravel()]

    def _encode_chars(self, text):
        """Vectorised char lookup: code points searched in a sorted table of the one-char tokens."""
        if self._char_table is None:
            chars = sorted((ord(t), i) for i, t in enumerate(self.tokens) if len(t) == 1)
            table = np.array([(-1, self.unk_id)] + chars, dtype=np.int64)  # -1: never a code point
            self._char_table = (table[:, 0], table[:, 1].astype(np.int32))
        codes, ids = self._char_table
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        where = np.searchsorted(codes, points).clip(max=len(codes) - 1)
        return np.where(codes[where] == points, ids[where], self.unk_id).astype(np.int32)


def check_vocab_options(vocab_size=None, min_count=1):
    """Refuse a vocabulary size too small for the special tokens, or a minimum count below 1."""
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size must be at least {MIN_VOCAB_SIZE} "
                        f"(the special tokens and one word), not {vocab_size}")
    if min_count < 1:
        raise DataError(f"min count must be at least 1, not {min_count}")


def vocab_from_counts(counts, level, vocab_size=None, min_count=1):
    """The vocabulary chosen from a train text's token counts (checked with `check_vocab_options`)."""
    return Vocab(choose_tokens(counts, SPECIAL_TOKENS[level], vocab_size, min_count))


def vocab_from_text(chunks, level, vocab_size=None, min_count=1):
    """The vocabulary of a train text given as chunks."""
    check_vocab_options(vocab_size, min_count)
    return vocab_from_counts(count_tokens(tokenize(chunks, level)), level, vocab_size, min_count)
