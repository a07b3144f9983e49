"""Scoring sentences with a trained model: log P(w_1 .. w_m, <eos> | a sentence starts), many at once.

A sentence is tokenized as `gpurnn prepare` tokenizes the model's corpus (words on whitespace, or
characters) and scored from the state after the end token (a fresh state fed `<eos>`; at char level
the line end "\\n"), over its tokens and the end token that closes it: the conditionals of
docs/chapter5.md's `sentence_log_probability`, from the loss layer itself (`Model.target_log_prob`),
so full and adaptive softmax and every layer type score alike.

Sentences are scored independently, many per forward pass: the input is read WINDOW sentences at a
time (memory does not grow with the input), each window's sentences are sorted into buckets of
similar length, padded to a fixed width (a multiple of WIDTH_STEP) with the loss layer's ignore
index as target, and scored `batch_size` rows at a time; results come back in input order. A bucket
holds at most `max_logits` scores at once (a long sentence lowers its bucket's rows, and one too long
for a row is scored in pieces that carry the state); where an allocation fails anyway, the bucket's
rows are halved and the batch scored again. Each batch is read back once: no host sync per token.

`context="carry"` scores the sentences as one running text instead (the state carried from each into
the next, as `gpurnn eval --batch-size 1` scores a split that starts with its end token).
"""

import math
from dataclasses import dataclass
from itertools import islice

import numpy as np

from ..data.text import EOS, check_level
from ..errors import GpurnnError
from ..memory import is_out_of_memory, out_of_memory_error
from ..train.evaluate import MAX_BLOCK_LOGITS, perplexity_of_loss

CONTEXTS = ("sentence", "carry")
END_TOKENS = {"word": EOS, "char": "\n"}  # what ends (and so starts) a sentence at each level
WIDTH_STEP = 8  # padded widths are multiples of this: few distinct shapes
WINDOW = 8192  # sentences read, sorted and scored at a time
CARRY_BLOCK = 256  # positions per forward pass of a running text


@dataclass
class SentenceScore:
    """One sentence's score. `tokens` are the scored tokens in order (the end token last unless it is
    left out), `log_probs` their natural-log probabilities (float64); `oov` counts the words outside
    the vocabulary (scored as <unk>); `end_log_prob` is log P(end token | the sentence), counted or not."""

    index: int
    text: str
    tokens: list
    log_probs: np.ndarray
    oov: int
    end_log_prob: float
    words: int

    @property
    def log_prob(self):
        """The sentence's total natural-log probability."""
        return float(self.log_probs.sum())

    @property
    def perplexity(self):
        """exp(-log_prob / scored tokens); NaN when no token is scored."""
        return perplexity(self.log_prob, len(self.log_probs))


def sentence_tokens(text, level):
    """The tokens of one sentence as `prepare` makes them: whitespace-separated words, or characters."""
    return text.split() if level == "word" else list(text)


class Totals:
    """Sums over scored sentences, and SRILM's perplexities: `ppl` over the words and every end
    token, `ppl1` over the words alone."""

    def __init__(self):
        self.sentences = self.words = self.oov = 0
        self.log_prob = self.words_log_prob = self.end_log_prob = 0.0

    def add(self, score):
        self.sentences += 1
        self.words += score.words
        self.oov += score.oov
        self.log_prob += score.log_prob
        self.end_log_prob += score.end_log_prob
        self.words_log_prob += float(score.log_probs[:score.words].sum())

    @property
    def ppl(self):
        return perplexity(self.words_log_prob + self.end_log_prob, self.words + self.sentences)

    @property
    def ppl1(self):
        return perplexity(self.words_log_prob, self.words)


def perplexity(log_prob, tokens):
    """exp(-log_prob / tokens); inf where that overflows, NaN for no tokens."""
    return perplexity_of_loss(-log_prob / tokens) if tokens else math.nan


@dataclass
class _Prepared:
    index: int
    text: str
    tokens: list
    ids: np.ndarray  # the sentence's ids and the end token's: the targets
    oov: int


class Scorer:
    """Scores sentences with `model` (put in evaluation mode) and its vocabulary `vocab` (a `Vocab`).

    `eos=False` leaves each sentence's end token out of its total (it is still scored, for `Totals`);
    `context` is "sentence" (each from a fresh state) or "carry" (one running text). `on_note(text)`
    hears when a bucket's rows are lowered; `progress(n)` is told of every n sentences scored.
    """

    def __init__(self, model, vocab, level="word", batch_size=64, eos=True, context="sentence",
                 max_logits=MAX_BLOCK_LOGITS, on_note=None, progress=None):
        check_level(level)
        if context not in CONTEXTS:
            raise GpurnnError(f"context must be one of {', '.join(CONTEXTS)}, not {context!r}")
        if batch_size < 1:
            raise GpurnnError(f"the batch size must be at least 1, not {batch_size}")
        self.model, self.vocab, self.level = model.eval(), vocab, level
        self.batch_size, self.eos, self.context, self.max_logits = batch_size, eos, context, max_logits
        self.on_note, self.progress = on_note or (lambda text: None), progress or (lambda n: None)
        self.end_id = vocab.index.get(END_TOKENS[level], vocab.unk_id)
        self.carries = all(getattr(layer, "carry", True) for _, layer in model.stateful_layers())
        if context == "carry" and not self.carries:
            raise GpurnnError("--context carry needs every recurrent layer to carry its state (stateful)")
        self.rows = {}  # padded width -> rows per batch, lowered where memory ran out
        self.last_id = self.end_id

    def score(self, sentences):
        """Yield a `SentenceScore` per sentence of the iterable `sentences` (str), in input order."""
        prepared = (self._prepare(index, text) for index, text in enumerate(sentences))
        self.model.reset_state()
        self.last_id = self.end_id  # what a running text starts after
        while True:
            window = list(islice(prepared, WINDOW))
            if not window:
                return
            scored = self._carried(window) if self.context == "carry" else self._independent(window)
            for item, log_probs in zip(window, scored):
                yield self._result(item, log_probs)

    def _prepare(self, index, text):
        tokens = sentence_tokens(text, self.level)
        ids = np.empty(len(tokens) + 1, np.int32)
        ids[:-1] = self.vocab.encode(tokens if self.level == "word" else text)
        ids[-1] = self.end_id
        oov = sum(token not in self.vocab.index for token in tokens) if self.level == "word" else int(
            (ids[:-1] == self.vocab.unk_id).sum())
        return _Prepared(index, text, tokens, ids, oov)

    def _result(self, item, log_probs):
        counted = log_probs if self.eos else log_probs[:-1]
        tokens = item.tokens + [END_TOKENS[self.level]] if self.eos else item.tokens
        return SentenceScore(item.index, item.text, tokens, counted, item.oov, float(log_probs[-1]), len(item.tokens))

    def _independent(self, window):
        """Each sentence's log-probabilities (float64), scored in buckets of one padded width."""
        results = [None] * len(window)
        buckets = {}
        for k, item in enumerate(window):
            buckets.setdefault(-(-len(item.ids) // WIDTH_STEP) * WIDTH_STEP, []).append(k)
        for width in sorted(buckets):
            members = buckets[width]
            start = 0
            while start < len(members):
                part = members[start:start + self._rows(width)]
                scored = self._batch([window[k].ids for k in part], width)
                if scored is None:  # out of memory: fewer rows for this width, and again
                    continue
                for k, row in zip(part, scored):
                    results[k] = row[:len(window[k].ids)].astype(np.float64)
                start += len(part)
                self.progress(len(part))
        return results

    def _rows(self, width):
        """Rows per batch for a padded width: the batch size, lowered so a batch holds at most
        `max_logits` scores (a row too wide for that alone is scored in pieces, see `_pieces`)."""
        if width not in self.rows:
            rows = max(1, min(self.batch_size, self.max_logits // (width * self.model.logits_per_row)))
            if rows < self.batch_size:
                self.on_note(f"batch size lowered to {rows} for sentences of up to {width} tokens "
                             f"(at most {self.max_logits:,} scores at once)")
            self.rows[width] = rows
        return self.rows[width]

    def _pieces(self, rows, width):
        """Positions per forward pass: all of them, or fewer where one pass would hold too many scores."""
        per_position = rows * self.model.logits_per_row
        return width if not self.carries or width * per_position <= self.max_logits else max(
            1, self.max_logits // per_position)

    def _batch(self, targets, width):
        """Log-probabilities (rows, width) of sentences padded to `width`, from fresh states; None when
        memory ran out and the width's rows were halved (a single row out of memory is an error)."""
        rows = self._rows(width) if self.model.backend.is_gpu else len(targets)  # fixed shapes on the GPU
        ignore = self.model.ignore_index
        xs = np.full((rows, width), self.end_id, np.int32)
        ts = np.full((rows, width), ignore, np.int32)
        for r, ids in enumerate(targets):
            xs[r, 1:len(ids)] = ids[:-1]
            ts[r, :len(ids)] = ids
        try:
            self.model.reset_state()
            return self._forward(xs, ts, self._pieces(rows, width))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if self.rows[width] == 1:
                raise out_of_memory_error(exc, f"scoring a sentence of up to {width} tokens", "its length") from exc
            self.rows[width] //= 2
            self.on_note(f"out of memory: batch size lowered to {self.rows[width]} for sentences of up to "
                         f"{width} tokens")
            return None

    def _forward(self, xs, ts, piece):
        """The host array of log P(ts | xs) (rows, width), computed `piece` positions at a time with the
        state carried between pieces, read back once."""
        backend, xp = self.model.backend, self.model.backend.xp
        parts = [self.model.target_log_prob(*(backend.asarray(a[:, lo:lo + piece]) for a in (xs, ts)))
                 for lo in range(0, xs.shape[1], piece)]
        return backend.to_host(parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1))

    def _carried(self, window):
        """Each sentence's log-probabilities as parts of one running text, its state carried on."""
        ts = np.concatenate([item.ids for item in window])
        xs = np.concatenate([[self.last_id], ts[:-1]]).astype(np.int32)
        self.last_id = int(ts[-1])
        log_probs = np.empty(len(ts), np.float64)
        piece = max(1, min(CARRY_BLOCK, self.max_logits // self.model.logits_per_row))
        for lo in range(0, len(ts), piece):
            log_probs[lo:lo + piece] = self._forward(xs[None, lo:lo + piece], ts[None, lo:lo + piece], piece)[0]
        self.progress(len(window))
        return np.split(log_probs, np.cumsum([len(item.ids) for item in window])[:-1])


def score_sentences(model, vocab, sentences, level="word", **options):
    """A list of `SentenceScore`, one per sentence of `sentences`, in order (options: see `Scorer`)."""
    return list(Scorer(model, vocab, level, **options).score(sentences))
