"""`prepare`: text files -> a corpus file (HDF5), streamed so memory does not grow with the corpus.

Two passes over the train text: count tokens to choose the vocabulary, then encode every split chunk by
chunk, appending to chunked int32 datasets. The file is written under a temporary name and renamed, so
an error or a crash leaves no output file behind.
"""

import hashlib
import os
from importlib.metadata import PackageNotFoundError, version

import h5py
import numpy as np

from ..atomic import atomic_path, check_output_path, os_error_cause
from ..errors import DataError, GpurnnError
from .corpus import FORMAT_NAME, FORMAT_VERSION, check_split_length
from .text import EOS, SPECIAL_TOKENS, check_level, check_text_file, read_chunks, tokenize
from .vocab import vocab_from_text

HDF5_CHUNK_IDS = 1 << 16  # 256 KiB of int32 per HDF5 chunk (large sequential reads), each checksummed


def prepare_corpus(train, output, valid=None, test=None, level="word", vocab_size=None, min_count=1):
    """Tokenize the text files, build the vocabulary from `train`, and write the corpus file `output`."""
    check_level(level)
    sources = {name: os.fspath(path) for name, path in
               (("train", train), ("valid", valid), ("test", test)) if path is not None}
    for path in sources.values():
        check_text_file(path)
    check_output(output, sources.values())
    vocab = vocab_from_text(read_chunks(sources["train"], level), level, vocab_size, min_count)
    try:
        with atomic_path(output) as tmp, h5py.File(tmp, "w", libver=("v110", "latest")) as file:
            write_header(file, vocab, level)
            counts = np.zeros(len(vocab), dtype=np.int64)
            for name, path in sources.items():
                write_split(file, name, path, vocab, level, counts if name == "train" else None)
            file.create_dataset("vocab_counts", data=counts)
    except OSError as exc:
        raise DataError(f"{output}: cannot write the corpus file ({os_error_cause(exc)})") from None
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


def write_header(file, vocab, level):
    file.attrs["format"] = FORMAT_NAME
    file.attrs["format_version"] = FORMAT_VERSION
    file.attrs["level"] = level
    file.attrs["special_tokens"] = list(SPECIAL_TOKENS[level])
    file.attrs["gpurnn_version"] = gpurnn_version()
    file.create_dataset("vocab", data=list(vocab), dtype=h5py.string_dtype("utf-8"))


def write_split(file, name, path, vocab, level, counts=None):
    """Encode one text file chunk by chunk into a growing int32 dataset; record the file's SHA-256.

    With `counts`, add each token's number of occurrences to it.
    """
    digest = hashlib.sha256()
    ids = file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(HDF5_CHUNK_IDS,),
                              fletcher32=True)
    has_text = False
    for tokens in tokenize(read_chunks(path, level, digest), level):
        has_text = has_text or has_text_tokens(tokens, level)
        batch = vocab.encode(tokens)
        end = ids.shape[0]
        ids.resize((end + len(batch),))
        ids[end:] = batch
        if counts is not None:
            counts += np.bincount(batch, minlength=len(counts))
    check_split_length(name, ids.shape[0], path)
    if not has_text:
        raise DataError(f"{path}: holds only whitespace; the {name} split needs some text")
    ids.attrs["source"] = path
    ids.attrs["source_sha256"] = digest.hexdigest()
    ids.attrs["source_bytes"] = os.path.getsize(path)


def has_text_tokens(tokens, level):
    """Whether a batch of tokens holds more than line ends and whitespace."""
    if level == "char":
        return bool(tokens) and not tokens.isspace()
    return any(token != EOS for token in tokens)


def gpurnn_version():
    try:
        return version("gpurnn")
    except PackageNotFoundError:
        return "unknown"
