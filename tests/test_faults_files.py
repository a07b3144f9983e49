"""Fault tests on files: full and read-only places, truncated and bit-flipped corpora and checkpoints,
outputs that would write over inputs, stale temporary files, and hostile text given to `prepare`."""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpurnn.data import open_corpus

from .faultkit import (SMALL_RUN, assert_good_checkpoint, assert_one_line_error, cli, fill, litter, mount_tmpfs,
                       train_small, unmount, unused_pid)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """A run without --checkpoint makes its run folder under runs/ in the current folder: not the repo's."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small corpus, a checkpoint trained on it, and the checkpoint's test perplexity as eval --json prints it."""
    corpus, ck = train_small(tmp_path_factory.mktemp("trained"))
    code, out, err = cli("eval", ck, corpus, "--json")
    assert code == 0, err
    return corpus, ck, out


@pytest.fixture
def full_disk(tmp_path):
    """A tiny tmpfs holding a filler file that takes every free byte (root only; skipped otherwise)."""
    folder = mount_tmpfs(tmp_path / "full", "size=256k")
    try:
        yield folder
    finally:
        unmount(folder)


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written in: a read-only tmpfs as root, a mode-555 folder otherwise."""
    if os.geteuid() == 0:
        folder = mount_tmpfs(tmp_path / "ro", "ro,size=64k")
        yield folder
        unmount(folder)
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)


def test_a_full_disk_ends_with_the_cause_and_keeps_the_previous_checkpoint(tmp_path, trained, full_disk):
    corpus, reference, _ = trained
    ck = full_disk / "ck.h5"
    ck.write_bytes(reference.read_bytes())
    fill(full_disk)
    before = ck.read_bytes()
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 50, "--save-every", 1, "--checkpoint", ck,
                       "--metrics", tmp_path / "m.jsonl", "--resume")
    note, err = err.splitlines(keepends=True)  # the note says the decayed lr is kept
    assert note.startswith("resume: lr 0.5 from the checkpoint is kept")
    assert_one_line_error(code, err, f"cannot write checkpoint {ck}: No space left on device",
                          "the last good checkpoint (iteration 40) is kept")
    assert ck.read_bytes() == before and assert_good_checkpoint(ck) == 40
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 40, "--checkpoint", tmp_path / "x.h5",
                       "--metrics", full_disk / "m.jsonl")
    assert_one_line_error(code, err, f"cannot write metrics to {full_disk / 'm.jsonl'}: No space left on device")
    folder = corpus.parent
    code, _, err = cli("prepare", folder / "train.txt", "--valid", folder / "valid.txt", "-o", full_disk / "c.h5")
    assert_one_line_error(code, err, f"cannot write the corpus file {full_disk / 'c.h5'}: No space left on device")
    assert sorted(os.listdir(full_disk)) == ["ck.h5", "filler", "m.jsonl"] or \
        sorted(os.listdir(full_disk)) == ["ck.h5", "filler"]
    assert litter(full_disk) == []


@pytest.mark.parametrize("option", ["--checkpoint", "--metrics", "--plot"])
def test_an_unwritable_output_is_refused_before_training(trained, read_only, option):
    corpus, _, _ = trained
    target = read_only / "out"
    code, out, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 100_000, option, target)
    assert_one_line_error(code, err, f"{target}: ")
    assert out == "" and os.listdir(read_only) == []


def test_prepare_into_an_unwritable_folder_is_refused(trained, read_only):
    corpus, _, _ = trained
    code, _, err = cli("prepare", corpus.parent / "train.txt", "-o", read_only / "c.h5")
    assert_one_line_error(code, err, f"{read_only / 'c.h5'}")
    assert os.listdir(read_only) == []


def damaged_copies(path, folder, how):
    """Yield copies of `path` in `folder`: truncated at 40 offsets, or with one bit flipped at 100."""
    data = path.read_bytes()
    rng = np.random.default_rng(len(data))
    offsets = np.linspace(0, len(data) - 1, 40 if how == "truncated" else 100).astype(int)
    for offset in offsets:
        bad = bytearray(data[:offset]) if how == "truncated" else bytearray(data)
        if how == "flipped":
            bad[offset] ^= 1 << int(rng.integers(8))
        copy = folder / f"bad-{path.name}"
        copy.write_bytes(bad)
        yield offset, copy


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("damaged", ["checkpoint", "corpus"])
def test_a_damaged_file_gives_the_right_result_or_one_line(tmp_path, trained, damaged, how):
    """Truncated at 40 offsets or one bit flipped at 100: eval either prints exactly the undamaged
    result or refuses with one line, and the damage never goes unnoticed where it changes a result."""
    corpus, ck, expected = trained
    refused = 0
    for offset, bad in damaged_copies(ck if damaged == "checkpoint" else corpus, tmp_path, how):
        args = (bad, corpus) if damaged == "checkpoint" else (ck, bad)
        code, out, err = cli("eval", *args, "--json")
        if code == 0:
            assert out == expected, f"offset {offset}: {out}"
        else:
            assert_one_line_error(code, err)
            refused += 1
    assert refused > (35 if how == "truncated" else 50)


@pytest.mark.parametrize("option", ["--checkpoint", "--metrics", "--plot"])
def test_no_output_is_written_over_an_input(trained, tmp_path, option):
    corpus, _, _ = trained
    before = corpus.read_bytes()
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 3, option, corpus)
    assert_one_line_error(code, err, f"{corpus} is both the")
    assert corpus.read_bytes() == before
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 3, "--checkpoint", tmp_path / "x",
                       "--metrics", tmp_path / "x")
    assert_one_line_error(code, err, "is both the checkpoint to write and the metrics file")


@pytest.mark.parametrize("content", [b"my notes\n", "corpus"])
def test_train_never_replaces_a_file_that_is_not_a_checkpoint(trained, tmp_path, content):
    corpus, _, _ = trained
    other = tmp_path / "precious.h5"
    other.write_bytes(corpus.read_bytes() if content == "corpus" else content)
    before = other.read_bytes()
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 3, "--checkpoint", other)
    assert_one_line_error(code, err, f"{other} exists and is not a gpurnn checkpoint: not replacing it")
    assert other.read_bytes() == before


def test_stale_temporary_files_of_dead_processes_are_removed(trained, tmp_path):
    corpus, _, _ = trained
    ck = tmp_path / "ck.h5"
    stale, alive = tmp_path / f".ck.h5.{unused_pid()}.tmp", tmp_path / f".ck.h5.{os.getppid()}.tmp"
    for path in (stale, alive, tmp_path / ".ck.h5.lock"):  # as a kill -9 inside a save leaves them
        path.write_bytes(b"half a checkpoint")
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 3, "--checkpoint", ck)
    assert code == 0, err
    assert not stale.exists() and alive.exists()  # another live process may still be writing that one
    assert sorted(os.listdir(tmp_path)) == sorted(["ck.h5", "ck.metrics.jsonl", alive.name])


def prepare_text(data, level):
    """Run `gpurnn prepare` on `data` (bytes) in a fresh folder; return (code, stderr, corpus or None, names)."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "t.txt").write_bytes(data)
        code, _, err = cli("prepare", folder / "t.txt", "--valid", folder / "t.txt", "-o", folder / "c.h5",
                           "--level", level)
        text = None
        if code == 0:
            with open_corpus(folder / "c.h5") as corpus:
                text = corpus.decode(corpus.split("train")[:])
        return code, err, text, sorted(os.listdir(folder))


HOSTILE = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])


@HOSTILE
@given(data=st.binary(max_size=300), level=st.sampled_from(["word", "char"]))
def test_random_bytes_into_prepare_give_a_corpus_or_one_line(data, level):
    code, err, _, names = prepare_text(data, level)
    if code == 0:
        assert names == ["c.h5", "t.txt"]
    else:
        assert_one_line_error(code, err)
        assert names == ["t.txt"]


@HOSTILE
@given(text=st.text(st.characters(blacklist_categories=["Cs"]), max_size=200), level=st.sampled_from(["word", "char"]))
def test_random_unicode_into_prepare_gives_its_text_back_or_one_line(text, level):
    code, err, back, names = prepare_text(text.encode("utf-8"), level)
    if code == 2:
        assert_one_line_error(code, err)
        assert names == ["t.txt"]
        return
    assert code == 0 and names == ["c.h5", "t.txt"]
    if level == "char":
        assert back == text  # every character kept, line ends included
    else:  # words split at any whitespace, a line end as <eos> (decoded as a newline)
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        assert back == "\n".join(" ".join(line.split()) for line in lines)
