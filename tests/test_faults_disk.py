"""Fault tests on a disk that fills during a write: a checkpoint that fits once and then no longer, a
stripped checkpoint, PTB's corpus being prepared (tiny tmpfs mounts, so they run as root and are
skipped with the reason otherwise), and another program taking the disk while a corpus is written.

HDF5 never meets the full disk (gpurnn.hdf5_files): each write ends with exit 2 and one line, the
previous file intact and loadable, no temporary file left, and a run resumes once there is room."""

import os

import numpy as np
import pytest

import gpurnn.hdf5_files
from gpurnn.data import open_corpus

from .conftest import PTB_DIR, needs_ptb, write_small_corpus
from .faultkit import (SMALL_RUN, assert_good_checkpoint, assert_no_traceback, assert_one_line_error,
                       assert_same_run, cli, fill, free_bytes, litter, mount_tmpfs, pages, resize_tmpfs, start,
                       train_small, unmount)

PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a new tmpfs of `size` bytes (root only; skipped otherwise), unmounted after the test."""
    mounted = []

    def mount(size):
        mounted.append(mount_tmpfs(tmp_path / f"disk{len(mounted)}", f"size={size}"))
        return mounted[-1]

    yield mount
    for folder in mounted:
        unmount(folder)


def in_child(*args):
    """(exit code, stderr) of `gpurnn --backend numpy ARGS` in a child process: a crash shows as its
    signal (a segmentation fault as -11) instead of taking the tests with it."""
    proc = start(*args)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_a_checkpoint_that_no_longer_fits_fails_mid_write_and_the_run_resumes_once_there_is_room(tmp_path, tmpfs):
    corpus = write_small_corpus(tmp_path / "data")
    run = [corpus, *SMALL_RUN, "--max-iters", 30, "--save-every", 10]
    reference = tmp_path / "reference.h5"
    code, _, err = cli("train", *run, "--checkpoint", reference)  # the same run, uninterrupted
    assert code == 0, err
    size = reference.stat().st_size
    disk = tmpfs(pages(size) + pages(size // 2))  # room for one checkpoint and half of the next
    ck, metrics = disk / "ck.h5", tmp_path / "m.jsonl"
    code, err = in_child("train", *run, "--checkpoint", ck, "--metrics", metrics)
    assert_no_traceback(err)
    assert_one_line_error(code, err, f"cannot write checkpoint {ck}: No space left on device",
                          "the last good checkpoint (iteration 10) is kept")
    assert 0 < free_bytes(disk) < size  # so the save at iteration 20 began writing, and ran out of room
    assert os.listdir(disk) == ["ck.h5"] and assert_good_checkpoint(ck) == 10
    code, out, err = cli("eval", ck, corpus)
    assert code == 0 and out.startswith("test perplexity "), err
    resize_tmpfs(disk, 4 * pages(size))  # room again
    code, _, err = cli("train", *run, "--checkpoint", ck, "--metrics", metrics, "--resume")
    assert code == 0, err
    assert_same_run(ck, reference)
    assert litter(disk) == []


def test_a_stripped_checkpoint_that_does_not_fit_is_one_line_and_no_file(tmp_path, tmpfs):
    _, ck = train_small(tmp_path)
    disk = tmpfs(8192)  # a quarter of the stripped checkpoint
    out = disk / "stripped.h5"
    code, err = in_child("strip", ck, out)
    assert_no_traceback(err)
    assert_one_line_error(code, err, f"cannot write checkpoint {out}: No space left on device")
    assert os.listdir(disk) == []


@needs_ptb
def test_preparing_ptb_on_a_disk_that_fills_part_way_is_one_line_and_no_file(tmpfs, monkeypatch):
    disk = tmpfs(2 << 20)  # 2 MiB; PTB's train split takes 3.7 MB
    out = disk / "ptb.h5"
    code, err = in_child("prepare", PTB_DIR / "ptb.train.txt", "-o", out)
    assert_no_traceback(err)
    assert_one_line_error(code, err, f"cannot write the corpus file {out}: No space left on device")
    assert os.listdir(disk) == []
    # Where it stops: the file's layout is written, and the room for the ids cannot be reserved.
    seen, reserve = [], gpurnn.hdf5_files.reserve

    def watched(f, size):
        seen.append((os.fstat(f.fileno()).st_size, free_bytes(disk), size))
        reserve(f, size)

    monkeypatch.setattr(gpurnn.hdf5_files, "reserve", watched)
    code, _, err = cli("prepare", PTB_DIR / "ptb.train.txt", "-o", out)
    assert_one_line_error(code, err, f"cannot write the corpus file {out}: No space left on device")
    [(written, free, wanted)] = seen
    assert 0 < written < free < wanted
    assert os.listdir(disk) == []


@needs_ptb
@pytest.mark.parametrize("level, files", [("word", ("train", "valid", "test")), ("char", ("valid", "test"))])
def test_a_disk_taken_by_another_program_while_a_corpus_is_written_changes_nothing(tmp_path, tmpfs, monkeypatch,
                                                                                   level, files):
    """Once the ids' room is reserved HDF5 writes only inside it: a program that takes every free byte
    right after the reservation leaves the corpus whole, the same as one written on a roomy disk."""
    texts = [PTB_DIR / f"ptb.{name}.txt" for name in files]
    args = [texts[0], "--valid", texts[1], *(["--test", texts[2]] if len(texts) > 2 else []), "--level", level]
    code, _, err = cli("prepare", *args, "-o", tmp_path / "roomy.h5")
    assert code == 0, err
    disk = tmpfs(3 * (tmp_path / "roomy.h5").stat().st_size)
    reserve = gpurnn.hdf5_files.reserve

    def reserve_then_fill(f, size):
        reserve(f, size)
        fill(disk)

    monkeypatch.setattr(gpurnn.hdf5_files, "reserve", reserve_then_fill)
    code, _, err = cli("prepare", *args, "-o", disk / "c.h5")
    assert code == 0, err
    assert sorted(os.listdir(disk)) == ["c.h5", "filler"]
    with open_corpus(disk / "c.h5") as full, open_corpus(tmp_path / "roomy.h5") as roomy:
        assert full.splits == roomy.splits and list(full.vocab) == list(roomy.vocab)
        for name, text in zip(full.splits, texts):
            ids = full.split(name)[:]
            expected = PTB_TOKENS[name] if level == "word" else len(text.read_bytes().decode("utf-8"))
            assert len(ids) == expected and np.array_equal(ids, roomy.split(name)[:])
        np.testing.assert_array_equal(full.counts, roomy.counts)
