"""Corpora: a corpus file opened read-only, and the same interface over a text held in memory.

A corpus has a level (word or char), a vocabulary, and splits of int32 token ids (`train`, and
`valid`/`test` when given). The file layout is in docs/corpus-format.md; FORMAT_VERSION is bumped on any
change a reader must know about, and a reader refuses versions newer than its own.
"""

import hashlib
import os
from importlib import resources

import h5py
import numpy as np

from ..atomic import os_error_cause
from ..errors import DataError
from .text import SPECIAL_TOKENS, check_level, detokenize, read_chunks, string_chunks, tokenize
from .vocab import Vocab, vocab_from_text

FORMAT_NAME = "gpurnn-corpus"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
MIN_SPLIT_TOKENS = 2
CHECK_CHUNK_IDS = 1 << 22  # ids read at a time when checking a split (16 MiB)
DEMO_FILE = "ptb_first_1000_words.txt"


def check_split_length(name, length, where):
    if length < MIN_SPLIT_TOKENS:
        raise DataError(f"{where}: the {name} split has {length} token(s); a split needs at least "
                        f"{MIN_SPLIT_TOKENS}")


class CorpusSplit:
    """One split of a corpus file: a 1-D, sliceable, read-only sequence of int32 ids read from HDF5.

    Nothing is loaded until it is sliced; `split[a:b]` reads just those ids. A read that fails (a corrupt
    file) raises DataError.
    """

    def __init__(self, dataset, name, path):
        self._dataset = dataset
        self.name = name
        self.path = path

    def __len__(self):
        return self._dataset.shape[0]

    def __getitem__(self, index):
        try:
            return self._dataset[index]
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{self.path}: cannot read the {self.name} split ({os_error_cause(exc)})") from None

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)

    def __repr__(self):
        return f"<CorpusSplit {self.name!r}: {len(self)} ids from {self.path}>"


class Corpus:
    """A vocabulary and its splits: `split(name)`, `encode(text or tokens)`, `decode(ids)`.

    `counts[i]` is how often token i occurs in the train split (after mapping unknown words to `<unk>`).
    A corpus opened from a file holds it open until `close()` (or the end of a `with` block).
    """

    def __init__(self, vocab, level, splits, counts, sources=None, path=None, file=None, format_version=None):
        self.vocab = vocab
        self.level = level
        self._splits = splits
        self.counts = counts
        self.sources = sources or {}
        self.path = path
        self._file = file
        self.format_version = format_version

    @property
    def splits(self):
        """The names of the splits this corpus has."""
        return tuple(self._splits)

    @property
    def special_tokens(self):
        return list(SPECIAL_TOKENS[self.level])

    def split(self, name):
        """The ids of split `name`: a CorpusSplit for a file, a NumPy int32 array in memory."""
        try:
            return self._splits[name]
        except KeyError:
            have = ", ".join(self._splits)
            raise DataError(f"{self.path or 'the corpus'} has no {name!r} split (it has: {have})") from None

    def encode(self, tokens):
        """Ids (int32) of a text (tokenized at this corpus's level) or of a sequence of tokens."""
        if isinstance(tokens, str):
            return encode_chunks(self.vocab, string_chunks(tokens, self.level), self.level)
        return self.vocab.encode(list(tokens))

    def decode(self, ids):
        """The text of a sequence of ids (char level: characters joined; word level: `<eos>` as newline)."""
        return detokenize(self.vocab.decode(ids), self.level)

    def describe(self, top=10):
        """A JSON-able summary: level, vocab size, tokens per split, most frequent tokens, sources."""
        order = np.argsort(-self.counts, kind="stable")[:top]
        return {"path": None if self.path is None else str(self.path),
                "format_version": self.format_version,
                "level": self.level,
                "vocab_size": len(self.vocab),
                "special_tokens": self.special_tokens,
                "tokens": {name: len(ids) for name, ids in self._splits.items()},
                "most_frequent": [[self.vocab[i], int(self.counts[i])] for i in order],
                "sources": self.sources}

    def require_frequency_order(self, needed_by):
        """Refuse a vocabulary that is not sorted most frequent first by the train split's counts (the
        special tokens aside: `prepare` places them by rule); `needed_by` names what needs the order."""
        ordinary = np.ones(len(self.vocab), bool)
        ordinary[[self.vocab.index[t] for t in self.special_tokens if t in self.vocab]] = False
        ids = np.flatnonzero(ordinary)
        counts = self.counts[ids]
        rises = np.flatnonzero(counts[1:] > counts[:-1])
        if len(rises):
            before, after = ids[rises[0]], ids[rises[0] + 1]
            raise DataError(f"{self.path or 'the corpus'}: {needed_by} needs a vocabulary sorted most frequent "
                            f"first, and {self.vocab[after]!r} (id {after}, {self.counts[after]:,} times in train) "
                            f"comes after {self.vocab[before]!r} (id {before}, {self.counts[before]:,} times); "
                            f"make the corpus with `gpurnn prepare`, which sorts it")

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        sizes = ", ".join(f"{name} {len(ids)}" for name, ids in self._splits.items())
        return f"<Corpus {self.level}-level, {len(self.vocab)} tokens in vocab; {sizes}>"


def open_corpus(path):
    """Open a corpus file made by `gpurnn prepare`; DataError for anything else or a damaged file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a corpus file")
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({os_error_cause(exc)})") from None
    try:
        return _read_corpus(file, path)
    except BaseException:
        file.close()
        raise


def _read_corpus(file, path):
    try:
        attrs = file.attrs  # reads the root object: a damaged one raises here
        if attrs.get("format") != FORMAT_NAME:
            raise DataError(f"{path}: not a gpurnn corpus file (no format={FORMAT_NAME!r} attribute)")
        version = int(attrs["format_version"])
        if version > FORMAT_VERSION:
            raise DataError(f"{path}: corpus format version {version} is newer than this gpurnn reads "
                            f"({FORMAT_VERSION}); upgrade gpurnn")
        level = str(attrs["level"])
        check_level(level)
        vocab = Vocab(file["vocab"].asstr()[:])
        counts = file["vocab_counts"][:]
        splits = {name: CorpusSplit(file[name], name, path) for name in SPLITS if name in file}
        sources = {name: {"file": str(file[name].attrs["source"]),
                          "sha256": str(file[name].attrs["source_sha256"]),
                          "bytes": int(file[name].attrs["source_bytes"])} for name in splits}
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: damaged gpurnn corpus file ({os_error_cause(exc)})") from None
    if "train" not in splits or len(counts) != len(vocab):
        raise DataError(f"{path}: damaged gpurnn corpus file (no train split or counts do not match vocab)")
    for name, split in splits.items():
        if split._dataset.dtype != np.int32 or split._dataset.ndim != 1:
            raise DataError(f"{path}: damaged gpurnn corpus file (split {name} is not 1-D int32)")
        check_ids(split, len(vocab))
    return Corpus(vocab, level, splits, counts, sources, path=path, file=file, format_version=version)


def check_ids(split, vocab_size):
    """Refuse a split holding an id outside the vocabulary (a damaged file): one pass over its chunks.

    Reading every chunk also checks its Fletcher-32 checksum, so damage anywhere in the ids is found here.
    """
    for start in range(0, len(split), CHECK_CHUNK_IDS):
        ids = split[start:start + CHECK_CHUNK_IDS]
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise DataError(f"{split.path}: damaged gpurnn corpus file (the {split.name} split holds id {bad}, "
                            f"outside the vocabulary of {vocab_size} tokens)")


def encode_chunks(vocab, chunks, level):
    """The ids (one int32 array) of a text given as chunks."""
    batches = [vocab.encode(tokens) for tokens in tokenize(chunks, level)]
    return np.concatenate(batches or [np.zeros(0, np.int32)])


def corpus_from_text(text, level="word", vocab_size=None, min_count=1):
    """An in-memory corpus whose train split (a NumPy int32 array) is `text`: a str, or a Path to read.

    Tokenized and given a vocabulary exactly as `gpurnn prepare` would; for small texts (demos, tests).
    """
    check_level(level)
    is_path = isinstance(text, os.PathLike)
    digest = hashlib.sha256()

    def chunks(digest=None):
        return read_chunks(text, level, digest) if is_path else string_chunks(text, level)

    vocab = vocab_from_text(chunks(digest), level, vocab_size, min_count)
    ids = encode_chunks(vocab, chunks(), level)
    check_split_length("train", len(ids), text if is_path else "the text")
    sources = {"train": {"file": str(text), "sha256": digest.hexdigest(),
                         "bytes": os.path.getsize(text)}} if is_path else {}
    return Corpus(vocab, level, {"train": ids}, np.bincount(ids, minlength=len(vocab)), sources)


def demo_corpus():
    """The embedded demo corpus: the first 1,000 words of PTB's train split, as the textbook's chapter 5."""
    text = resources.files(__package__).joinpath(DEMO_FILE).read_text(encoding="utf-8")
    return corpus_from_text(text)
