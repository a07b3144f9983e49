"""Fault tests on memory: a model, a training step, a checkpoint's in-memory file, evaluation buffers or
side-by-side samples too large for the memory there is, each in a child process whose address space is
limited (RLIMIT_AS) to a little more than importing gpurnn took. Each ends with exit 2 and one line
naming what was being allocated, its size and what to lower, while the same commands with small sizes
pass under the same limit. CuPy's out-of-memory errors, and CUDA libraries', are recognised without
importing CuPy."""

import os
import random
import resource
import subprocess
import sys

import numpy as np
import pytest

from gpurnn.memory import OutOfMemory, out_of_memory
from gpurnn.model import preset_specs

from .exportkit import model_config, unfused_specs
from .faultkit import assert_no_traceback, assert_one_line_error, cli, litter

LIMITED = """
import os, resource, sys
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # thread stacks as on a 2-core machine
import gpurnn.cli, gpurnn.train.evaluate, gpurnn.train.job, gpurnn.train.trainer  # before the limit
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[1]),) * 2)
sys.exit(gpurnn.cli.main(["--backend", "numpy", *sys.argv[2:]]))
"""
# The address space a command may take beyond what importing gpurnn took, on at most 2 CPUs (each
# thread reserves its stack): the middle of the sizes under which each test below fails where it says
# (from about 180 to 320 MiB).
ROOM = 250 << 20
TINY = ["--hidden-size", "8", "--wordvec-size", "8"]


def limited(*args):
    """(exit code, stderr) of `gpurnn --backend numpy ARGS` in a child allowed ROOM more address space."""
    if not os.path.exists("/proc/self/statm") or not hasattr(resource, "RLIMIT_AS") \
            or not hasattr(os, "sched_setaffinity"):
        pytest.skip("limiting a child's memory needs Linux (/proc, RLIMIT_AS and CPU affinity)")
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}  # threads reserve no 64 MiB malloc arenas of their own
    done = subprocess.run([sys.executable, "-c", LIMITED, str(ROOM), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert_no_traceback(done.stderr)
    return done.returncode, done.stderr


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A corpus of 68,250 tokens over 5,002 distinct ones (so a (B, T) block's logits are large), a tiny
    model's config whose output is affine + softmax_loss (which hold those logits: the presets' fused
    output layer never does), and its checkpoint trained on it."""
    folder = tmp_path_factory.mktemp("wide")
    rng = random.Random(1)
    words = [f"w{i}" for i in range(5000)]
    tokens = words + [rng.choice(words) for _ in range(60000)]
    rng.shuffle(tokens)
    (folder / "text.txt").write_text("".join(" ".join(tokens[i:i + 20]) + "\n" for i in range(0, len(tokens), 20)))
    corpus, ck, config = folder / "wide.h5", folder / "ck.h5", folder / "pair.toml"
    assert cli("prepare", folder / "text.txt", "--valid", folder / "text.txt", "-o", corpus)[0] == 0
    config.write_text(model_config(unfused_specs(preset_specs("simple-rnnlm", wordvec_size=8, hidden_size=8))))
    code, _, err = cli("train", corpus, "--model-config", config, "--batch-size", 4, "--time-size", 5,
                       "--max-iters", 2, "--checkpoint", ck, "--quiet")
    assert code == 0, err
    return corpus, ck, config


def test_small_sizes_run_under_the_same_limit(tmp_path, wide):
    corpus, ck, _ = wide
    code, err = limited("train", corpus, *TINY, "--batch-size", 4, "--time-size", 5, "--max-iters", 2,
                        "--checkpoint", tmp_path / "ck.h5", "--quiet")
    assert code == 0, err
    for args in (("eval", ck, corpus, "--split", "valid", "--batch-size", 1, "--time-size", 5),
                 ("generate", ck, "--num-samples", 4, "--length", 3)):
        code, err = limited(*args)
        assert code == 0, err


@pytest.mark.parametrize("hidden, array", [(20000, "1.5 GiB (1,600,000,000 bytes) for a 20000 x 20000 float32"),
                                           (300000, "335.3 GiB (360,000,000,000 bytes) for a 300000 x 300000 "
                                                    "float32")])
def test_a_model_too_large_for_memory_is_one_line(tmp_path, hidden, array):
    ck = tmp_path / "ck.h5"
    code, err = limited("train", "--hidden-size", hidden, "--wordvec-size", 10, "--checkpoint", ck)  # the demo corpus
    assert_one_line_error(code, err, f"out of host memory building the model's layer 'rnn': {array} array; "
                                     "lower --hidden-size, --wordvec-size or the vocabulary (prepare --vocab-size)")
    assert os.listdir(tmp_path) == []


def test_a_training_step_too_large_for_memory_is_one_line(tmp_path, wide):
    """The tiny model with affine + softmax_loss, whose (B x T, V) logits do not fit; the preset itself,
    whose fused output layer holds one chunk of them at a time, trains and evaluates those sizes."""
    corpus, _, config = wide
    code, err = limited("train", corpus, "--model-config", config, "--batch-size", 50, "--time-size", 500,
                        "--max-iters", 1, "--checkpoint", tmp_path / "ck.h5", "--quiet")
    assert_one_line_error(code, err, "out of host memory in a training step (B=50, T=500): 477.0 MiB "
                                     "(500,200,000 bytes) for a 25000 x 5002 float32 array; lower --batch-size, "
                                     "--time-size or --hidden-size")
    assert not (tmp_path / "ck.h5").exists() and litter(tmp_path) == []
    # The failed run left only its header: the same command with a smaller batch starts afresh there.
    code, err = limited("train", corpus, "--model-config", config, "--batch-size", 4, "--time-size", 5,
                        "--max-iters", 1, "--checkpoint", tmp_path / "ck.h5", "--quiet")
    assert code == 0, err
    headers = [line for line in (tmp_path / "ck.metrics.jsonl").read_text().splitlines() if '"header"' in line]
    assert len(headers) == 1 and '"batch_size": 4' in headers[0]
    code, err = limited("train", corpus, *TINY, "--batch-size", 50, "--time-size", 500, "--max-iters", 1,
                        "--checkpoint", tmp_path / "fused.h5", "--quiet")
    assert code == 0, err
    code, err = limited("eval", tmp_path / "fused.h5", corpus, "--split", "valid", "--batch-size", 13,
                        "--time-size", 500)
    assert code == 0, err


def test_a_checkpoint_too_large_to_build_in_memory_is_one_line_and_no_file(tmp_path, wide):
    """HDF5's in-memory file must not run out of room half-way (h5py would crash): it is claimed first."""
    corpus, _, _ = wide
    ck = tmp_path / "ck.h5"
    code, err = limited("train", corpus, "--hidden-size", 8, "--wordvec-size", 3000, "--batch-size", 4,
                        "--time-size", 5, "--max-iters", 1, "--checkpoint", ck, "--quiet")
    assert_one_line_error(code, err, f"out of host memory building checkpoint {ck} in memory: ",
                          "; lower --hidden-size")
    assert not ck.exists() and litter(tmp_path) == []


def test_evaluation_buffers_too_large_for_memory_are_one_line(wide):
    corpus, ck, _ = wide
    code, err = limited("eval", ck, corpus, "--split", "valid", "--batch-size", 13, "--time-size", 500)
    assert_one_line_error(code, err, "out of host memory evaluating 13 lanes of 500 tokens: 124.0 MiB "
                                     "(130,052,000 bytes) for a 6500 x 5002 float32 array; lower --batch-size or "
                                     "--time-size")


def test_too_many_samples_side_by_side_are_one_line(wide):
    _, ck, _ = wide
    code, err = limited("generate", ck, "--num-samples", 100_000_000, "--length", 1)
    assert_one_line_error(code, err, "out of host memory sampling 100000000 texts side by side: 381.5 MiB "
                                     "(400,000,000 bytes) for a 100000000 x 1 int32 array; lower --num-samples")


def test_an_allocation_no_guard_names_is_one_line_too(wide, monkeypatch):
    from gpurnn.data.corpus import Corpus
    monkeypatch.setattr(Corpus, "describe", lambda self, top=10: np.empty(1 << 50, np.uint8))  # 1 PiB
    code, _, err = cli("corpus-info", wide[0])
    assert_one_line_error(code, err, "out of host memory: 1.0 PiB (1,125,899,906,842,624 bytes) for a "
                                     "1125899906842624 uint8 array; lower the sizes the command was given")


def test_cupy_out_of_memory_names_the_device_and_the_size():
    memory = pytest.importorskip("cupy.cuda.memory")
    with pytest.raises(OutOfMemory) as raised, out_of_memory("in a training step", "--batch-size"):
        raise memory.OutOfMemoryError(1 << 30, 3 << 30)
    assert str(raised.value) == ("out of device memory in a training step: 1.0 GiB (1,073,741,824 bytes); "
                                 "lower --batch-size")


def test_cuda_library_allocation_failures_are_recognised_and_other_errors_pass():
    class CUDARuntimeError(RuntimeError):
        """Shaped as CuPy's: recognised by its module and its text, without importing CuPy."""

    CUDARuntimeError.__module__ = "cupy_backends.cuda.api.runtime"
    with pytest.raises(OutOfMemory, match=r"^out of device memory evaluating; lower --batch-size$"):
        with out_of_memory("evaluating", "--batch-size"):
            raise CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")
    for other in (CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access"), ValueError("bad")):
        with pytest.raises(type(other)), out_of_memory("evaluating", "--batch-size"):
            raise other
    done = subprocess.run([sys.executable, "-c", "import sys, gpurnn.memory; print('cupy' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.stdout == "False\n", done.stderr
