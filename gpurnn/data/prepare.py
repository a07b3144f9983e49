"""`prepare`: text files -> a corpus file (HDF5), streamed so memory does not grow with the corpus.

Two passes over every text: the first counts its tokens and takes its SHA-256 (the train text's counts
choose the vocabulary), the second encodes it chunk by chunk into its int32 dataset. Knowing every
split's length before writing lets the whole layout be made first and the disk space for the ids be
reserved before HDF5 writes them (`gpurnn.hdf5_files.reserved_hdf5`): a disk too full for the corpus
is one line and no file, never a crash inside HDF5. The file is written under a temporary name and
renamed, so an error or a crash leaves no output file behind.
"""

import hashlib
import math
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import h5py
import numpy as np

from ..atomic import check_output_path, os_error_cause
from ..errors import DataError, GpurnnError
from ..hdf5_files import reserved_hdf5
from .corpus import FORMAT_NAME, FORMAT_VERSION, check_split_length
from .text import EOS, SPECIAL_TOKENS, check_level, check_text_file, read_chunks, tokenize
from .vocab import check_vocab_options, count_tokens, vocab_from_counts

HDF5_CHUNK_IDS = 1 << 16  # 256 KiB of int32 per HDF5 chunk (large sequential reads), each checksummed
# Disk a stored chunk takes beyond its ids: the Fletcher-32 checksum (4 bytes) and its entry in the
# split's chunk index, with room to spare; and per split, the index's own header and blocks.
CHUNK_EXTRA_BYTES = 64
SPLIT_EXTRA_BYTES = 1 << 14


@dataclass
class Text:
    """One split's text file as the first pass saw it: its token counts, SHA-256 and size."""

    path: str
    counts: dict
    sha256: str
    size: int

    @property
    def tokens(self):
        return sum(self.counts.values())


def prepare_corpus(train, output, valid=None, test=None, level="word", vocab_size=None, min_count=1):
    """Tokenize the text files, build the vocabulary from `train`, and write the corpus file `output`."""
    check_level(level)
    check_vocab_options(vocab_size, min_count)
    sources = {name: os.fspath(path) for name, path in
               (("train", train), ("valid", valid), ("test", test)) if path is not None}
    for path in sources.values():
        check_text_file(path)
    check_output(output, sources.values())
    texts = {name: read_text(name, path, level) for name, path in sources.items()}
    vocab = vocab_from_counts(texts["train"].counts, level, vocab_size, min_count)
    try:
        with reserved_hdf5(output, lambda file: write_layout(file, vocab, level, texts), ids_bytes(texts)) as file:
            for name, text in texts.items():
                write_ids(file[name], text, vocab, level)
    except OSError as exc:
        raise DataError(f"cannot write the corpus file {output}: {os_error_cause(exc)}") from None
    return output


def check_output(output, inputs):
    parent = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise DataError(f"{output}: is a directory; give a file name for the corpus")
    if not os.path.isdir(parent):
        raise DataError(f"{output}: the directory {parent} does not exist")
    if os.path.exists(output) and any(os.path.samefile(output, path) for path in inputs):
        raise DataError(f"{output}: is one of the input texts; choose another output name")
    try:
        check_output_path(output, "the corpus file")
    except GpurnnError as exc:
        raise DataError(str(exc)) from None


def read_text(name, path, level):
    """The first pass over one split's text: its counts and digest; refuses a split too short or blank."""
    digest = hashlib.sha256()
    counts = count_tokens(tokenize(read_chunks(path, level, digest), level))
    text = Text(path, counts, digest.hexdigest(), os.path.getsize(path))
    check_split_length(name, text.tokens, path)
    if not has_text(text.counts, level):
        raise DataError(f"{path}: holds only whitespace; the {name} split needs some text")
    return text


def has_text(tokens, level):
    """Whether distinct tokens hold more than line ends and whitespace."""
    if level == "char":
        return any(not token.isspace() for token in tokens)
    return any(token != EOS for token in tokens)


def chunk_ids(tokens):
    """Ids per HDF5 chunk of a split of `tokens` ids: HDF5_CHUNK_IDS, or the whole of a shorter split."""
    return min(HDF5_CHUNK_IDS, tokens)


def ids_bytes(texts):
    """An upper bound on the disk the splits' ids take in the file: what is reserved before writing them."""
    total = 0
    for text in texts.values():
        chunk = chunk_ids(text.tokens)
        total += math.ceil(text.tokens / chunk) * (4 * chunk + CHUNK_EXTRA_BYTES) + SPLIT_EXTRA_BYTES
    return total


def write_layout(file, vocab, level, texts):
    """Everything but the ids: the attributes, the vocabulary and its counts, and one empty (N,) int32
    dataset per split (chunked, each chunk checksummed) with its source's attributes."""
    file.attrs["format"] = FORMAT_NAME
    file.attrs["format_version"] = FORMAT_VERSION
    file.attrs["level"] = level
    file.attrs["special_tokens"] = list(SPECIAL_TOKENS[level])
    file.attrs["gpurnn_version"] = gpurnn_version()
    file.create_dataset("vocab", data=list(vocab), dtype=h5py.string_dtype("utf-8"))
    counts = np.zeros(len(vocab), dtype=np.int64)  # after mapping unknown tokens to <unk>
    for token, count in texts["train"].counts.items():
        counts[vocab.index.get(token, vocab.unk_id)] += count
    file.create_dataset("vocab_counts", data=counts)
    for name, text in texts.items():
        ids = file.create_dataset(name, shape=(text.tokens,), dtype=np.int32, chunks=(chunk_ids(text.tokens),),
                                  fletcher32=True)
        ids.attrs["source"] = text.path
        ids.attrs["source_sha256"] = text.sha256
        ids.attrs["source_bytes"] = text.size


def write_ids(dataset, text, vocab, level):
    """The second pass over one split's text: its ids, encoded chunk by chunk, into its dataset."""
    end = 0
    for tokens in tokenize(read_chunks(text.path, level), level):
        batch = vocab.encode(tokens)
        if end + len(batch) <= len(dataset):
            dataset[end:end + len(batch)] = batch
        end += len(batch)
    if end != len(dataset):
        raise DataError(f"{text.path}: changed while it was being prepared; run prepare again")


def gpurnn_version():
    try:
        return version("gpurnn")
    except PackageNotFoundError:
        return "unknown"
