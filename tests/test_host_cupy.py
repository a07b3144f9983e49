"""gpurnn's CuPy code paths, run end to end on the CPU through the stand-in for CuPy (tests/hostcupy).

The stand-in keeps what CuPy demands of gpurnn's code (no implicit conversion to NumPy, kernel
arguments matching the kernels' C signatures, nothing run, no host read and no CuPy cuBLAS call while
a stream captures, a graph replaying what was captured) while the arithmetic runs on NumPy, the
kernels compiled for the host, and gpurnn's direct cuBLAS GEMMs on a host libcublas that reads their
arguments as cuBLAS does. So the CUDA-graph training step, checkpoints written from device arrays, evaluation and
generation on the `cupy` backend all run here, with no GPU. What the stand-in cannot show (speed,
the GPU's own parallelism and memory) waits for `scripts/gpu_check.sh` on a GPU machine.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import with_this_python
from .kernels_on_host import compiler
from .test_parallel import WHY_NOT as WHY_NO_MPI

pytestmark = pytest.mark.skipif(compiler() is None, reason="no g++ to build the kernels for the host")
TESTS = Path(__file__).resolve().parent
TINY = ["--model", "better-rnnlm", "--wordvec-size", "16", "--hidden-size", "16", "--dropout", "0.3",
        "--optimizer", "adam", "--lr", "0.01", "--clip", "0.5", "--seed", "4", "--quiet"]


def with_stand_in(args, cwd, check=True, program=(sys.executable,), **env_vars):
    """Run `python args...` (or `program args...`) with the stand-in found as `cupy`, loaded before
    gpurnn probes for it, and `env_vars` added to the environment (without the variables that steer
    gpurnn and the GPU scripts, which the caller's run may have set)."""
    steering = ("GPURNN_", "GPU_CHECK_", "SANITIZE_", "PTB_", "COMPUTE_SANITIZER")
    env = with_this_python({k: v for k, v in os.environ.items() if not k.startswith(steering)})
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "hostcupy"), str(TESTS.parent)])
    env.update({k: str(v) for k, v in env_vars.items()})
    done = subprocess.run([*program, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


def gpurnn(*args, cwd):
    return with_stand_in(["-m", "gpurnn", *map(str, args)], cwd)


def pytest_with_stand_in(*args, cwd):
    """pytest `args` in a process that has the stand-in as `cupy`; its last line, once it passed."""
    done = with_stand_in(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args], cwd, check=False)
    assert done.returncode == 0, done.stdout
    return done.stdout.strip().splitlines()[-1]


def params(path):
    with h5py.File(path, "r") as f:
        return {name: f["params"][name][()] for name in f["params"]}


def test_the_gpu_tests_pass_with_the_stand_in(tmp_path):
    """Every test that a CUDA device would unskip: CuPy against NumPy per layer (the plugin kit), per
    training step, the CUDA-graph step against the eager one bit for bit, exact resume with dropout."""
    summary = pytest_with_stand_in(str(TESTS / "test_gpu.py"), str(TESTS / "test_backend.py"),
                                   str(TESTS / "test_kit.py"), "-k", "not importing_gpurnn_does_not_import_cupy",
                                   cwd=tmp_path)
    assert "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.skipif(WHY_NO_MPI is not None, reason=str(WHY_NO_MPI))
def test_one_rank_all_reduces_through_nccl_with_the_stand_in(tmp_path):
    test = f"{TESTS / 'test_parallel.py'}::test_one_rank_with_nccl_trains_as_one_process_without_mpi"
    assert "1 passed" in pytest_with_stand_in(test, cwd=tmp_path)


def test_training_on_the_cupy_backend_with_and_without_the_cuda_graph(tmp_path):
    gpurnn("--backend", "cupy", "train", *TINY, "--max-iters", "30", "--checkpoint", "graph.h5", cwd=tmp_path)
    gpurnn("--backend", "cupy", "train", *TINY, "--max-iters", "30", "--no-cuda-graph",
           "--checkpoint", "eager.h5", cwd=tmp_path)
    gpurnn("--backend", "numpy", "train", *TINY, "--max-iters", "30", "--checkpoint", "numpy.h5", cwd=tmp_path)
    graph, eager, host = (params(tmp_path / f"{name}.h5") for name in ("graph", "eager", "numpy"))
    for name, value in graph.items():
        np.testing.assert_array_equal(value, eager[name], err_msg=name)  # the replayed graph is the step
        np.testing.assert_allclose(value, host[name], rtol=1e-3, atol=1e-3 * np.abs(host[name]).max(),
                                   err_msg=name)  # float32 on two backends, 30 Adam steps


def test_a_cupy_run_resumes_exactly_and_its_checkpoint_scores_the_same_on_numpy(tmp_path):
    from .conftest import write_small_corpus
    corpus = write_small_corpus(tmp_path / "corpus")
    common = ["--backend", "cupy", "train", corpus, *TINY, "--batch-size", "4", "--time-size", "5",
              "--eval-every", "10"]
    gpurnn(*common, "--max-iters", "40", "--checkpoint", "whole.h5", cwd=tmp_path)
    gpurnn(*common, "--max-iters", "20", "--checkpoint", "split.h5", cwd=tmp_path)
    gpurnn(*common, "--max-iters", "40", "--checkpoint", "split.h5", "--resume", cwd=tmp_path)
    whole, split = params(tmp_path / "whole.h5"), params(tmp_path / "split.h5")
    for name, value in whole.items():
        np.testing.assert_array_equal(split[name], value, err_msg=name)
    scores = [json.loads(gpurnn("--backend", backend, "eval", "whole.h5", corpus, "--split", "test", "--json",
                                *extra, cwd=tmp_path).stdout)["perplexity"]
              for backend, extra in (("cupy", []), ("cupy", ["--no-cuda-graph"]), ("numpy", []))]
    assert scores[0] == scores[1]  # each block's forward replayed from a CUDA graph, or run eagerly
    assert scores[0] == pytest.approx(scores[2], rel=1e-5)
    texts = [gpurnn("--backend", backend, "generate", "whole.h5", "--length", "12", "--seed", "3",
                    cwd=tmp_path).stdout for backend in ("cupy", "numpy")]
    assert texts[0] == texts[1] and len(texts[0].split()) >= 8  # 12 tokens, <eos> printed as a line break


def test_training_at_ptb_shapes_with_whole_blocks_of_threads_agrees_with_numpy(tmp_path):
    """scripts/sanitize_kernels.py at V = 10,000 and B = 20 with every block on 256 threads (their
    barriers, block reductions and shared memory as on a GPU, blocks and threads shuffled): every
    kernel, each recurrent family training with dropout, tied weights and clipped SGD or Adam, and
    an evaluation, all equal to NumPy's in float64."""
    args = ["--vocab", "10000", "--batch", "20", "--time", "3", "--hidden", "8", "--steps", "3"]
    done = with_stand_in([str(TESTS.parent / "scripts/sanitize_kernels.py"), *args], tmp_path,
                         HOST_KERNELS_BLOCKS="full")
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("sanitize_kernels: passed: 36 of 36 checks") and "never launched" not in last, done.stdout


FAKE_SANITIZER = r"""#!/usr/bin/env bash
# Answers as compute-sanitizer does: runs the program, then its summary; racecheck finds a race.
tool=memcheck
while [ $# -gt 0 ]; do
    case $1 in --tool) tool=$2; shift 2 ;; --error-exitcode|--print-limit) shift 2 ;; *) break ;; esac
done
echo "========= COMPUTE-SANITIZER"
"$@"
rc=$?
if [ "$tool" = racecheck ]; then
    echo "========= Error: Race reported between Write access at softmax_rows+0x1f0 and Read access [8 hazards]"
    echo "=========     in block (3,0,0)"
    echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
    echo "========= ERROR SUMMARY: 1 error"
    exit 3
fi
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


def test_the_sanitizer_step_reports_each_tool_and_its_errors(tmp_path):
    """scripts/sanitize.sh with a compute-sanitizer that finds a race under racecheck: every tool's
    summary and the driver's verdict land in the summary, the race's report too, and it fails."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "compute-sanitizer").write_text(FAKE_SANITIZER)
    (folder / "compute-sanitizer").chmod(0o755)
    summary = tmp_path / "summary.txt"
    done = with_stand_in([str(TESTS.parent / "scripts/sanitize.sh")], tmp_path, check=False, program=("bash",),
                         PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", SUMMARY=summary, LOGS=tmp_path / "logs")
    lines = summary.read_text().splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    passed = "========= ERROR SUMMARY: 0 errors sanitize_kernels: passed: "
    assert lines[0].startswith(f"sanitizer memcheck (rc 0, at most 70 s): {passed}36 of 36 checks")
    assert lines[1].startswith("sanitizer racecheck (rc 3, at most 40 s): ========= RACECHECK SUMMARY: 1 hazard")
    assert lines[2].startswith("========= Error: Race reported between Write access at softmax_rows")
    assert lines[3].startswith(f"sanitizer synccheck (rc 0, at most 30 s): {passed}27 of 27 checks")
    assert lines[4].startswith("sanitizer initcheck (rc 0, at most 40 s): ") and len(lines) == 5


def test_a_script_test_runs_this_interpreter_where_path_holds_only_system_folders():
    """`VENV/bin/python -m pytest` with no virtual environment activated: the scripts a test starts run
    this interpreter ($PYTHON), not a `python3` from PATH that lacks gpurnn's dependencies."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON")}
    env["PATH"] = os.defpath
    test = f"{Path(__file__).name}::test_the_sanitizer_step_reports_each_tool_and_its_errors"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=TESTS,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


STAND_IN_REFUSALS = r"""
import numpy as np, cupy
a = cupy.zeros(3, dtype=cupy.float32)
for attempt in (lambda: np.asarray(a), lambda: a + np.ones(3, np.float32)):
    try:
        attempt()
        print("accepted")
    except TypeError:
        print("refused")
for attempt in (lambda: float(a.sum()), lambda: cupy.matmul(a, a), lambda: a @ a, lambda: a.dot(a)):
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            attempt()
            print("accepted")
        except (RuntimeError, NotImplementedError) as exc:
            print(type(exc).__name__, exc)
        stream.end_capture()
stream = cupy.cuda.Stream(non_blocking=True)
with stream:
    stream.begin_capture()
    b = a + 1
    a += 2
    graph = stream.end_capture()
print(a.get().tolist(), b.get().tolist())
graph.launch(stream)
stream.synchronize()  # the replay ran on a non-blocking stream: wait for it before reading elsewhere
print(a.get().tolist(), b.get().tolist())
try:
    graph.launch(stream)
    a.get()  # on the legacy default stream, the replay not waited for: on a GPU the two race
    print("accepted")
except RuntimeError as exc:
    print(type(exc).__name__, str(exc).split(" while ")[0])
"""


def test_the_stand_in_refuses_what_cupy_refuses_and_replays_what_it_captured(tmp_path):
    out = with_stand_in(["-c", STAND_IN_REFUSALS], tmp_path).stdout.split("\n")
    assert out[:3] == ["refused", "refused", "RuntimeError the current stream is capturing, so D2H transfers are "
                                             "disallowed"]
    assert out[3:6] == ["NotImplementedError calling cuBLAS API during stream capture is currently unsupported"] * 3
    assert out[6] == "[0.0, 0.0, 0.0] [nan, nan, nan]"  # captured, not run
    assert out[7] == "[2.0, 2.0, 2.0] [1.0, 1.0, 1.0]"  # the replay runs both, in order
    assert out[8] == "RuntimeError unordered streams: work on the legacy default stream"


CUBLAS_REFUSALS = r"""
import ctypes, cupy
from gpurnn.ops import linear
a, c = cupy.ones((4, 3), dtype=cupy.float32), cupy.empty((4, 4), dtype=cupy.float32)
one, zero = ctypes.c_float(1), ctypes.c_float(0)
handle = linear._handle()
def gemm(lda, c_ptr=c.data.ptr):  # C (4 x 4) = A (4 x 3) A^T, column-major
    return linear._cublas().cublasSgemm_v2(handle, 0, 1, 4, 4, 3, ctypes.byref(one), a.data.ptr, lda, a.data.ptr,
                                           lda, ctypes.byref(zero), c_ptr, 4)
print(gemm(4), gemm(3), gemm(5), gemm(4, c.data.ptr + 4))
with cupy.cuda.Stream(non_blocking=True):
    print(gemm(4))
print(c.get().sum())
"""


def test_the_stand_ins_cublas_reads_what_it_is_given_as_cublas_would(tmp_path):
    """A GEMM through the binding onto the stand-in's libcublas: right; a leading dimension below the
    rows; one that runs past the array; a C one element on (past its end); a handle bound to a stream
    that is not the current one."""
    done = with_stand_in(["-c", CUBLAS_REFUSALS], tmp_path)
    assert done.stdout.split() == ["0", "7", "13", "13", "13", "48.0"]  # CUBLAS_STATUS_*: INVALID_VALUE, EXECUTION_FAILED
    reasons = done.stderr.splitlines()
    assert reasons[0] == "host cuBLAS: A: leading dimension 3 for 4 rows" and "bytes past the end" in reasons[1]
    assert "bytes past the end" in reasons[2] and "not CuPy's current stream" in reasons[3]


def test_the_gpu_check_script_runs_through_with_the_stand_in(tmp_path):
    """scripts/gpu_check.sh --ptb as a dry run: what it leaves in $OUT, and a checkpoint that joins
    from its parts and scores on NumPy what it scored on the `cupy` backend."""
    from gpurnn.data import prepare_corpus
    lines = (TESTS.parent / "gpurnn/data/ptb_first_1000_words.txt").read_text().splitlines()
    for name, part in (("train", lines), ("valid", lines[:6]), ("test", lines[6:12])):
        (tmp_path / f"{name}.txt").write_text("\n".join(part) + "\n")
    corpus, out = tmp_path / "corpus.h5", tmp_path / "out"
    prepare_corpus(tmp_path / "train.txt", corpus, valid=tmp_path / "valid.txt", test=tmp_path / "test.txt")
    with_stand_in([str(TESTS.parent / "scripts/gpu_check.sh"), "--ptb"], tmp_path, program=("bash",),
                  GPU_CHECK_QUICK=1, PTB_SECONDS=20, PTB_CORPUS=corpus, OUT=out,
                  COMPUTE_SANITIZER="")  # the stand-in makes no CUDA call for a sanitizer to watch
    summary = (out / "summary.txt").read_text()
    assert "summary: sanitize rc=0 tests rc=0 bench rc=0 score rc=0 ptb rc=0" in summary
    assert "capture probe: captured" in summary and "score: small-rnn    batched" in summary
    # no compute-sanitizer here: the driver ran alone, every kernel against NumPy
    assert "sanitizer: none found; the driver alone (rc 0): sanitize_kernels: passed: " in summary
    parts = sorted(out.glob("ptb_medium.h5.part*"))
    assert len(list(out.iterdir())) <= 8 and parts and all(p.stat().st_size <= 16 << 20 for p in parts)
    joined = tmp_path / "joined.h5"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    assert hashlib.sha256(joined.read_bytes()).hexdigest() in summary
    on_gpu = json.loads(summary.split("ptb test (rc 0): ")[1].splitlines()[0])["perplexity"]
    on_cpu = json.loads(gpurnn("--backend", "numpy", "eval", joined, corpus, "--split", "test", "--batch-size", "1",
                               "--json", cwd=tmp_path).stdout)["perplexity"]
    assert on_cpu == pytest.approx(on_gpu, rel=1e-5)
