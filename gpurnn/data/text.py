"""Text for a corpus: checked UTF-8 read in bounded chunks, and the word/char tokenizers.

`prepare` (both its passes), the in-memory corpus and `Corpus.encode` all go through here, so a text is
always tokenized the same way. Files are read CHUNK_BYTES at a time and only a partial word is carried
between chunks, so memory does not grow with the file.

Word level (the Penn Treebank convention): tokens are separated by whitespace and every line end adds
`<eos>`; `\\r\\n` and `\\r` count as line ends, as in Python's text mode. Char level: every character is
a token, line ends included and untranslated, so joining the tokens gives the file back exactly.
"""

import codecs
import io
import os

from ..errors import DataError

CHUNK_BYTES = 1 << 20
EOS = "<eos>"
UNK = "<unk>"
LEVELS = ("word", "char")
SPECIAL_TOKENS = {"word": (UNK, EOS), "char": (UNK,)}


def check_level(level):
    if level not in LEVELS:
        raise DataError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")


def check_text_file(path):
    """Raise DataError unless `path` is an existing, non-empty regular file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a text file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file")


def read_chunks(path, level, digest=None):
    """Yield the decoded text of a file chunk by chunk, feeding the raw bytes to `digest` if given.

    A NUL byte (a binary file) or bytes that are not UTF-8 raise DataError naming the byte offset.
    """
    check_text_file(path)
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True) if level == "word" else utf8
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK_BYTES)
            if b"\0" in data:
                raise DataError(f"{path}: binary file (NUL byte at byte offset {offset + data.index(0)})")
            pending = len(utf8.getstate()[0])
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                where = offset - pending + exc.start
                raise DataError(f"{path}: not UTF-8 text (byte offset {where}: {exc.reason})") from None
            if digest is not None:
                digest.update(data)
            offset += len(data)
            if text:
                yield text
            if not data:
                return


def string_chunks(text, level):
    """The chunks `read_chunks` would give for a file holding `text` (line ends translated at word level)."""
    if level == "word":
        text = io.IncrementalNewlineDecoder(None, translate=True).decode(text, final=True)
    return [text] if text else []


def tokenize(chunks, level):
    """Yield the tokens of a stream of text chunks, one batch per chunk.

    Char level yields each chunk itself (a str is a sequence of one-character tokens); word level yields
    lists of words, with `<eos>` for each newline and a word cut by a chunk boundary carried over whole.
    """
    if level == "char":
        yield from chunks
        return
    carry = ""
    for chunk in chunks:
        text = carry + chunk.replace("\n", f" {EOS} ")
        words = text.split()
        carry = words.pop() if words and not text[-1].isspace() else ""
        yield words
    if carry:
        yield [carry]


def detokenize(tokens, level):
    """Tokens back to text: the inverse of `tokenize` (word level: single spaces, `<eos>` as a newline)."""
    if level == "char":
        return "".join(tokens)
    parts = []
    for token in tokens:
        if token == EOS:
            parts.append("\n")
            continue
        if parts and parts[-1] != "\n":
            parts.append(" ")
        parts.append(token)
    return "".join(parts)
