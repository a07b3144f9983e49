"""`gpurnn strip`: a checkpoint without its optimizer state scores and samples as the original, is less
than half its size (Adam), cannot resume, and bad input is one line with exit code 2."""

import json
import shutil
from importlib.resources import files

import h5py
import numpy as np
import pytest

from gpurnn.lock import PathLock
from gpurnn.memory import size_text
from gpurnn.train.checkpoint import load_checkpoint

from .faultkit import assert_one_line_error, cli, litter

TINY_ADAM = ["--optimizer", "adam", "--lr", "0.01", "--hidden-size", "16", "--wordvec-size", "16",
             "--max-iters", "5", "--quiet"]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run folders and relative paths stay in the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    """An Adam checkpoint of a few iterations on the embedded demo, its stripped copy, and strip's output."""
    folder = tmp_path_factory.mktemp("strip")
    ck, copy = folder / "ck.h5", folder / "ck.stripped.h5"
    code, _, err = cli("train", *TINY_ADAM, "--checkpoint", ck)
    assert code == 0, err
    code, out, err = cli("strip", ck, copy)
    assert code == 0 and err == "", err
    return ck, copy, out


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    """The embedded demo as a corpus file (the same vocabulary), for `gpurnn eval`."""
    path = tmp_path_factory.mktemp("demo") / "demo.h5"
    code, _, err = cli("prepare", files("gpurnn.data").joinpath("ptb_first_1000_words.txt"), "--output", path)
    assert code == 0, err
    return path


def test_a_stripped_checkpoint_scores_and_samples_exactly_as_the_original(stripped, demo_file):
    ck, copy, _ = stripped
    scores = [cli("eval", path, demo_file, "--split", "train", "--json") for path in (ck, copy)]
    assert [code for code, _, _ in scores] == [0, 0]
    assert json.loads(scores[0][1])["perplexity"] == json.loads(scores[1][1])["perplexity"] > 1
    samples = [cli("generate", path, "--num-samples", "2", "--length", "12", "--seed", "5") for path in (ck, copy)]
    assert samples[0] == samples[1] and samples[0][0] == 0 and len(samples[0][1].split()) >= 24


def test_strip_empties_the_optimizer_group_keeps_the_rest_and_says_so(stripped):
    ck, copy, out = stripped
    before, after = ck.stat().st_size, copy.stat().st_size
    assert out == f"wrote {copy} without optimizer state: {size_text(before)} -> {size_text(after)}\n"
    assert after < before / 2
    with h5py.File(ck, "r") as original, h5py.File(copy, "r") as f:
        assert len(original["optimizer"]) > 0 and len(f["optimizer"]) == 0
        assert f.attrs["format_version"] == 2
    a, b = load_checkpoint(ck), load_checkpoint(copy)
    for group in ("params", "state"):
        assert getattr(a, group).keys() == getattr(b, group).keys()
        for name, value in getattr(a, group).items():
            np.testing.assert_array_equal(getattr(b, group)[name], value)
    assert b.vocab == a.vocab and b.layouts == a.layouts and b.layouts["rnn.Wx"]["axes"]
    assert b.meta == {**a.meta, "optimizer_scalars": {}, "stripped": True} and a.meta["optimizer_scalars"]["t"] == 5
    assert litter(copy.parent) == []


def test_resume_from_a_stripped_checkpoint_is_refused(stripped):
    _, copy, _ = stripped
    content = copy.read_bytes()
    code, _, err = cli("train", *TINY_ADAM, "--checkpoint", copy, "--resume")
    assert_one_line_error(code, err, f"{copy} is a stripped checkpoint", "no optimizer state", "cannot resume")
    assert copy.read_bytes() == content and litter(copy.parent) == []


@pytest.mark.parametrize("case, fragment", [
    ("itself", "is both the stripped checkpoint to write and the checkpoint to strip"),
    ("itself spelt otherwise", "is both the stripped checkpoint to write and the checkpoint to strip"),
    ("missing", "no checkpoint file at"),
    ("not a checkpoint", "is not a readable gpurnn checkpoint"),
    ("missing folder", "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(stripped, tmp_path, case, fragment):
    ck = tmp_path / "ck.h5"
    shutil.copy(stripped[0], ck)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    source, output = {"itself": ("ck.h5", "ck.h5"), "itself spelt otherwise": ("ck.h5", f"../{tmp_path.name}/ck.h5"),
                      "missing": ("no.h5", "out.h5"), "not a checkpoint": ("notes.txt", "out.h5"),
                      "missing folder": ("ck.h5", "no/such/out.h5")}[case]
    before = ck.read_bytes()
    code, out, err = cli("strip", source, output)
    assert_one_line_error(code, err, fragment)
    assert out == "" and ck.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5", "notes.txt"]


def test_a_checkpoint_a_trainer_is_writing_is_not_replaced(stripped, tmp_path):
    held = PathLock(tmp_path / "live.h5").acquire()  # as a running trainer holds its checkpoint
    try:
        code, _, err = cli("strip", stripped[0], "live.h5")
    finally:
        held.release()
    assert_one_line_error(code, err, "another process is writing the checkpoint live.h5")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size, text", [(0, "0 bytes"), (1023, "1,023 bytes"), (1024, "1.0 KiB (1,024 bytes)"),
                                        (1_298_180, "1.2 MiB (1,298,180 bytes)"),
                                        (3 << 30, "3.0 GiB (3,221,225,472 bytes)")])
def test_sizes_are_printed_in_binary_units_and_bytes(size, text):
    assert size_text(size) == text
