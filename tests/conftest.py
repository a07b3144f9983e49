"""Shared fixtures: backends, the registry, a small prepared corpus, and a skip marker for tests that need a
CUDA device."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gpurnn.backend import get_backend, probe_cupy
from gpurnn.registry import Registry

_cupy, _why_no_cupy = probe_cupy()
# PTB's text files, where the data-set tests look for them
PTB_DIR = Path(os.environ.get("GPURNN_PTB_DIR", Path(__file__).parents[1] / "../shared/data/ptb"))
needs_ptb = pytest.mark.skipif(not (PTB_DIR / "ptb.train.txt").exists(), reason=f"no PTB at {PTB_DIR}")
requires_gpu = pytest.mark.skipif(_cupy is None, reason=f"no usable CuPy device: {_why_no_cupy}")


@pytest.fixture(scope="session")
def registry():
    return Registry()


@pytest.fixture
def np64():
    return get_backend("numpy", dtype="float64")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def small_corpus(tmp_path):
    return write_small_corpus(tmp_path)


def write_small_corpus(folder):
    """A prepared word corpus in `folder` with train/valid/test splits from the first PTB lines (shipped text)."""
    from importlib.resources import files

    from gpurnn.data import prepare_corpus
    folder.mkdir(exist_ok=True)
    lines = files("gpurnn.data").joinpath("ptb_first_1000_words.txt").read_text().splitlines()
    for name, part in (("train", lines[:30]), ("valid", lines[30:37]), ("test", lines[37:])):
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n")
    out = folder / "small.h5"
    prepare_corpus(folder / "train.txt", out, valid=folder / "valid.txt", test=folder / "test.txt")
    return out



def with_this_python(env):
    """`env` naming the interpreter running the tests as $PYTHON, which the scripts run (for Python and
    `python -m gpurnn`) instead of `python3` from PATH: this one, activated virtual environment or not."""
    return {**env, "PYTHON": sys.executable}
