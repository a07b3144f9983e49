"""Corpus files: prepare (word and char level), the corpus API, PTB's counts, and every bad input."""

import hashlib
import json
import os

import h5py
import numpy as np
import pytest

from gpurnn.cli import main
from gpurnn.data import corpus_from_text, demo_corpus, open_corpus, prepare_corpus
from gpurnn.data import text as text_module
from gpurnn.errors import DataError

from .conftest import PTB_DIR, needs_ptb



def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def left_in(directory):
    """Every name in the directory (temporary files included)."""
    return sorted(os.listdir(directory))


# ---- word level ---------------------------------------------------------------------------------

def test_word_vocab_by_frequency_ties_by_first_appearance(tmp_path):
    write(tmp_path / "t.txt", "b a c\nc a b d\n")
    corpus = corpus_from_text(tmp_path / "t.txt")
    # counts: b 2, a 2, c 2, <eos> 2, d 1; <unk> not in the text goes last
    assert list(corpus.vocab) == ["b", "a", "c", "<eos>", "d", "<unk>"]
    assert corpus.vocab.decode(corpus.split("train")) == "b a c <eos> c a b d <eos>".split()
    assert corpus.split("train").dtype == np.int32 and corpus.level == "word"


def test_line_ends_and_whitespace(tmp_path):
    corpus = corpus_from_text("x  y\r\nz\t\rw\n\nv")
    # \r\n and \r are line ends; an empty line is one <eos>; no <eos> after a last line without newline
    assert corpus.vocab.decode(corpus.split("train")) == "x y <eos> z <eos> w <eos> <eos> v".split()
    assert corpus.decode(corpus.split("train")) == "x y\nz\nw\n\nv"


def test_words_cut_by_chunk_boundaries_stay_whole(tmp_path, monkeypatch):
    text = "".join(f"word{i} {'é' * (i % 3)}tail{i}\n" for i in range(200))
    whole = corpus_from_text(text).vocab.decode(corpus_from_text(text).split("train"))
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 7)
    write(tmp_path / "t.txt", text)
    prepare_corpus(tmp_path / "t.txt", tmp_path / "c.h5")
    with open_corpus(tmp_path / "c.h5") as corpus:
        assert corpus.vocab.decode(corpus.split("train")[:]) == whole
        assert len(whole) == 600


def test_unknown_words_vocab_size_and_min_count(tmp_path):
    write(tmp_path / "train.txt", "a a a b b c\nd\n")
    write(tmp_path / "valid.txt", "a zz b\n")
    prepare_corpus(tmp_path / "train.txt", tmp_path / "c.h5", valid=tmp_path / "valid.txt", vocab_size=4)
    with open_corpus(tmp_path / "c.h5") as corpus:
        # a 3, then b and <eos> 2 each (b came first); c is cut to keep room for <unk> (not in the text)
        assert list(corpus.vocab) == ["a", "b", "<eos>", "<unk>"]
        assert corpus.decode(corpus.split("valid")[:]) == "a <unk> b\n"
        assert corpus.describe()["most_frequent"] == [["a", 3], ["b", 2], ["<eos>", 2], ["<unk>", 2]]
    small = corpus_from_text("a a a b b c\nd\n", min_count=2)
    assert list(small.vocab) == ["a", "b", "<eos>", "<unk>"]


def test_encode_decode_and_vocab_lookup():
    corpus = corpus_from_text("the cat sat\nthe dog\n")
    vocab = corpus.vocab
    assert vocab.id("the") == vocab.index["the"] == 0 and vocab[0] == "the" and len(vocab) == 6
    assert "cat" in vocab and "cow" not in vocab
    ids = corpus.encode("the cow\nsat")
    assert ids.dtype == np.int32 and vocab.decode(ids) == ["the", "<unk>", "<eos>", "sat"]
    assert corpus.decode(ids) == "the <unk>\nsat"
    np.testing.assert_array_equal(corpus.encode(["the", "cow"]), ids[:2])
    with pytest.raises(DataError, match="'cow' is not in the vocabulary"):
        vocab.id("cow")
    with pytest.raises(DataError, match="has no 'valid' split"):
        corpus.split("valid")


def test_in_memory_corpus_matches_the_file(tmp_path):
    text = "one two three\ntwo three\nthree\n"
    write(tmp_path / "t.txt", text)
    prepare_corpus(tmp_path / "t.txt", tmp_path / "c.h5")
    memory = corpus_from_text(text)
    with open_corpus(tmp_path / "c.h5") as corpus:
        assert list(corpus.vocab) == list(memory.vocab)
        np.testing.assert_array_equal(corpus.split("train")[:], memory.split("train"))
        assert corpus.split("train")[2:4].tolist() == memory.split("train")[2:4].tolist()
        assert len(corpus.split("train")) == len(memory.split("train")) == 9


def test_file_layout(tmp_path):
    write(tmp_path / "t.txt", "héllo wörld\n")
    prepare_corpus(tmp_path / "t.txt", tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["format"] == "gpurnn-corpus" and f.attrs["format_version"] == 1
        assert f.attrs["level"] == "word" and list(f.attrs["special_tokens"]) == ["<unk>", "<eos>"]
        assert f["vocab"].dtype.kind == "O" and h5py.check_string_dtype(f["vocab"].dtype).encoding == "utf-8"
        assert list(f["vocab"].asstr()[:]) == ["héllo", "wörld", "<eos>", "<unk>"]
        train = f["train"]
        assert train.dtype == np.int32 and train.chunks == (3,) and train.fletcher32  # a split under 65,536 ids
        assert train.attrs["source_sha256"] == hashlib.sha256("héllo wörld\n".encode()).hexdigest()
        assert f["vocab_counts"][:].tolist() == [1, 1, 1, 0]
    assert left_in(tmp_path) == ["c.h5", "t.txt"]


def test_demo_corpus_is_the_first_1000_ptb_words():
    corpus = demo_corpus()
    tokens = corpus.vocab.decode(corpus.split("train"))
    assert len(tokens) == 1000 and isinstance(corpus.split("train"), np.ndarray)
    assert len(corpus.vocab) == 418  # the textbook's vocabulary size for this excerpt
    if (PTB_DIR / "ptb.train.txt").exists():  # the textbook's load_data(), then corpus[:1000]
        words = (PTB_DIR / "ptb.train.txt").read_text().replace("\n", "<eos>").strip().split()
        assert tokens == words[:1000]


# ---- char level ---------------------------------------------------------------------------------

def test_char_level_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 5)  # chunk boundaries cut multi-byte characters
    text = "Größe 10 €\r\nnaïve 🙂 text\n\ttabs\rand CR\n"
    write(tmp_path / "train.txt", text)
    write(tmp_path / "valid.txt", "Ωnaïve 🙂\n")
    prepare_corpus(tmp_path / "train.txt", tmp_path / "c.h5", valid=tmp_path / "valid.txt", level="char")
    with open_corpus(tmp_path / "c.h5") as corpus:
        assert corpus.level == "char" and len(corpus.split("train")) == len(text)
        assert corpus.decode(corpus.split("train")[:]) == text
        assert corpus.vocab.decode(corpus.split("valid")[:])[:2] == ["<unk>", "n"]
        assert corpus.decode(corpus.split("valid")[:]) == "<unk>naïve 🙂\n"
        assert corpus.special_tokens == ["<unk>"] and "<eos>" not in corpus.vocab
    assert corpus_from_text(text, level="char").decode(corpus_from_text(text, level="char").split("train")) == text


# ---- PTB ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ptb_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptb") / "ptb.h5"
    code = main(["prepare", str(PTB_DIR / "ptb.train.txt"), "--valid", str(PTB_DIR / "ptb.valid.txt"),
                 "--test", str(PTB_DIR / "ptb.test.txt"), "--output", str(out)])
    assert code == 0
    return out


@needs_ptb
def test_ptb_counts(ptb_report, capsys):
    code, out, _ = run(capsys, "corpus-info", ptb_report, "--json")
    report = json.loads(out)
    assert code == 0 and report["vocab_size"] == 10000 and report["level"] == "word"
    assert report["tokens"] == {"train": 929589, "valid": 73760, "test": 82430}
    assert report["most_frequent"][:3] == [["the", 50770], ["<unk>", 45020], ["<eos>", 42068]]
    sums = dict(reversed(line.split()) for line in (PTB_DIR / "SHA256SUMS").read_text().splitlines())
    assert {name: s["sha256"] for name, s in report["sources"].items()} == {
        name: sums[f"ptb.{name}.txt"] for name in ("train", "valid", "test")}
    with open_corpus(ptb_report) as corpus:
        assert corpus.decode(corpus.split("train")[:10]) == "aer banknote berlitz calloway centrust cluett " \
            "fromstein gitano guterman hydro-quebec"
        assert np.bincount(corpus.split("valid")[:], minlength=10000)[corpus.vocab.id("<eos>")] == 3370


@needs_ptb
def test_corpus_info_text(ptb_report, capsys):
    code, out, _ = run(capsys, "corpus-info", ptb_report, "--top", "3")
    assert code == 0 and "10000 tokens" in out and "929,589" in out and "'<unk>' 45,020" in out


# ---- bad input ----------------------------------------------------------------------------------

BAD_TEXTS = {
    "missing": (None, "no such file"),
    "directory": ("dir", "is a directory"),
    "empty": (b"", "empty file"),
    "binary": (b"abc\x00\x01\x02", "binary file (NUL byte at byte offset 3)"),
    "latin-1": ("caf\u00e9\n".encode("latin-1") + b" more", "not UTF-8 text (byte offset 3"),
    "too short": (b"   \n", "the train split has 1 token(s); a split needs at least 2"),
    "whitespace only": (b" \n\t\n  \n\r\n", "holds only whitespace; the train split needs some text"),
}


def make_bad_text(tmp_path, kind):
    content, message = BAD_TEXTS[kind]
    path = tmp_path / "bad.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        write(path, content)
    return path, message


@pytest.mark.parametrize("kind", BAD_TEXTS)
def test_bad_text_from_the_cli(tmp_path, capsys, kind):
    bad, message = make_bad_text(tmp_path, kind)
    code, out, err = run(capsys, "prepare", bad, "-o", tmp_path / "c.h5")
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("gpurnn: error:")
    assert not (tmp_path / "c.h5").exists() and left_in(tmp_path) == ([] if kind == "missing" else ["bad.txt"])


@pytest.mark.parametrize("kind", BAD_TEXTS)
def test_bad_valid_text_leaves_no_file_and_keeps_an_old_one(tmp_path, kind):
    bad, message = make_bad_text(tmp_path, kind)
    write(tmp_path / "train.txt", "a b c\n")
    write(tmp_path / "c.h5", "previous contents")
    with pytest.raises(DataError) as info:
        prepare_corpus(tmp_path / "train.txt", tmp_path / "c.h5", valid=bad)
    assert message.replace("train split", "valid split") in str(info.value)
    assert (tmp_path / "c.h5").read_text() == "previous contents"
    assert not [name for name in left_in(tmp_path) if name.endswith(".tmp")]


def test_non_utf8_in_a_later_chunk_names_the_exact_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 4)
    write(tmp_path / "t.txt", "ab ü\ncd\xff".encode("utf-8")[:-2] + b"\xff tail")
    with pytest.raises(DataError, match=r"t.txt: not UTF-8 text \(byte offset 8: invalid start byte\)"):
        corpus_from_text(tmp_path / "t.txt")


@pytest.mark.parametrize("args, message", [
    (["--vocab-size", "2"], "vocab size must be at least 3"),
    (["--min-count", "0"], "min count must be at least 1"),
    (["--level", "byte"], "Invalid value for '--level'"),
])
def test_bad_options(tmp_path, capsys, args, message):
    write(tmp_path / "t.txt", "a b c\n")
    code, _, err = run(capsys, "prepare", tmp_path / "t.txt", "-o", tmp_path / "c.h5", *args)
    first, *rest = err.splitlines()
    assert code == 2 and message in first and rest in ([], ["Try 'gpurnn prepare -h' for help."])
    assert left_in(tmp_path) == ["t.txt"]


def test_bad_output_paths(tmp_path, capsys):
    write(tmp_path / "t.txt", "a b c\n")
    for output, message in [(tmp_path / "nodir" / "c.h5", "does not exist"), (tmp_path, "is a directory"),
                            (tmp_path / "t.txt", "is one of the input texts")]:
        code, _, err = run(capsys, "prepare", tmp_path / "t.txt", "-o", output)
        assert code == 2 and message in err and err.count("\n") == 1
    assert left_in(tmp_path) == ["t.txt"] and (tmp_path / "t.txt").read_text() == "a b c\n"


@pytest.fixture
def good_corpus(tmp_path):
    write(tmp_path / "t.txt", " ".join(f"w{i % 97}" for i in range(100_000)) + "\n")
    prepare_corpus(tmp_path / "t.txt", tmp_path / "good.h5")
    return tmp_path / "good.h5"


def damage(good, kind):
    """A copy of a good corpus file, damaged in one way."""
    bad = good.with_name("bad.h5")
    data = bytearray(good.read_bytes())
    if kind == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt data":
        with h5py.File(good, "r") as f:
            offset = f["train"].id.get_chunk_info(0).byte_offset
        data[offset + 1000:offset + 1100] = bytes(100)
        bad.write_bytes(data)
    elif kind == "not hdf5":
        bad.write_text("just some text\n")
    elif kind == "other hdf5":
        with h5py.File(bad, "w") as f:
            f["train"] = np.arange(10, dtype=np.int32)
    elif kind == "newer version":
        bad.write_bytes(data)
        with h5py.File(bad, "r+") as f:
            f.attrs["format_version"] = 2
    elif kind == "no vocab":
        bad.write_bytes(data)
        with h5py.File(bad, "r+") as f:
            del f["vocab"]
    elif kind == "directory":
        bad.mkdir()
    return bad


BAD_CORPORA = {
    "missing": "no such file",
    "directory": "is a directory",
    "not hdf5": "not a readable HDF5 file",
    "truncated": "not a readable HDF5 file",
    "other hdf5": "not a gpurnn corpus file",
    "newer version": "corpus format version 2 is newer than this gpurnn reads (1); upgrade gpurnn",
    "no vocab": "damaged gpurnn corpus file",
}


@pytest.mark.parametrize("kind", BAD_CORPORA)
def test_bad_corpus_files(good_corpus, capsys, kind):
    bad = damage(good_corpus, kind)
    code, out, err = run(capsys, "corpus-info", bad)
    assert code == 2 and BAD_CORPORA[kind] in err and err.count("\n") == 1 and out == ""
    with pytest.raises(DataError, match="bad.h5"):
        open_corpus(bad)


def test_corrupt_ids_are_caught_by_the_checksum(good_corpus):
    bad = damage(good_corpus, "corrupt data")
    with pytest.raises(DataError, match="cannot read the train split"):
        open_corpus(bad)  # every chunk is read, and so checked, when the corpus is opened


def test_prepare_from_the_cli_char_level_json(tmp_path, capsys):
    write(tmp_path / "t.txt", "abba\ncab\n")
    code, out, err = run(capsys, "prepare", tmp_path / "t.txt", "-o", tmp_path / "c.h5", "--level", "char",
                         "--vocab-size", "3", "--json")
    report = json.loads(out)
    assert code == 0 and err == "" and report["level"] == "char" and report["vocab_size"] == 3
    assert report["tokens"] == {"train": 9} and report["most_frequent"][:2] == [["a", 3], ["b", 3]]
    assert report["most_frequent"][2] == ["<unk>", 3]  # \n (2) and c (1) did not fit
    code, out, _ = run(capsys, "prepare", tmp_path / "t.txt", "-o", tmp_path / "c.h5")
    assert code == 0 and "word-level corpus" in out and "vocabulary: 4 tokens" in out
    assert left_in(tmp_path) == ["c.h5", "t.txt"]


# ---- writing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fallocate", [True, False])
def test_reserve_gives_the_file_its_disk_blocks(tmp_path, monkeypatch, fallocate):
    from gpurnn.hdf5_files import reserve
    if not fallocate:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)  # as on macOS: zeros are written
    elif not hasattr(os, "posix_fallocate"):
        pytest.skip("this OS has no posix_fallocate")
    size = (3 << 20) + 5
    with open(tmp_path / "f", "wb") as f:
        f.write(b"layout")
        f.flush()
        reserve(f, size)
    stat = os.stat(tmp_path / "f")
    assert stat.st_size == size and stat.st_blocks * 512 >= size
    assert (tmp_path / "f").read_bytes()[:6] == b"layout"


def test_a_text_that_changes_between_the_two_passes_is_refused(tmp_path, monkeypatch):
    from gpurnn.data import prepare
    train = write(tmp_path / "train.txt", "a b c\n")
    choose = prepare.vocab_from_counts

    def choose_then_grow(*args, **kwargs):  # between counting the text and encoding it
        with open(train, "a") as f:
            f.write("d e\n")
        return choose(*args, **kwargs)

    monkeypatch.setattr(prepare, "vocab_from_counts", choose_then_grow)
    with pytest.raises(DataError, match="train.txt: changed while it was being prepared; run prepare again"):
        prepare_corpus(train, tmp_path / "c.h5")
    assert left_in(tmp_path) == ["train.txt"]
