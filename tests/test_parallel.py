"""Data-parallel training: 2 ranks under mpiexec equal one process; resume across rank counts; faults.

The MPI tests start `mpiexec -n 2` (mpi4py and MPICH from the `mpi` extra) and skip, saying why, where
either is missing; CI installs the extra so they run there. They hold under Open MPI's launcher as well:
name it in $MPIEXEC (with MPI4PY_LIBMPI naming its libmpi, so mpi4py loads the same MPI).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpurnn.train import parallel
from gpurnn.train.checkpoint import load_checkpoint
from gpurnn.train.trainer import Trainer
from tests.conftest import requires_gpu, write_small_corpus

TESTS = Path(__file__).parent
# $MPIEXEC chooses the launcher (such as Open MPI's, where mpi4py loads its library: MPI4PY_LIBMPI).
MPIEXEC = (os.environ.get("MPIEXEC") or shutil.which("mpiexec", path=str(Path(sys.executable).parent))
           or shutil.which("mpiexec"))
try:
    import mpi4py  # noqa: F401
    WHY_NOT = None if MPIEXEC else "no mpiexec on PATH (pip install 'gpurnn[mpi]')"
except ImportError:
    WHY_NOT = "mpi4py is not installed (pip install 'gpurnn[mpi]')"
needs_mpi = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
# One BLAS thread per rank: two ranks share this machine's two cores. Open MPI's mpiexec refuses to
# start as root without the two OMPI_ variables (MPICH's ignores them).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
TRAIN = ("--backend", "numpy", "train")
TINY = ("--model", "rnnlm", "--wordvec-size", "16", "--hidden-size", "16", "--batch-size", "4",
        "--time-size", "5", "--lr", "1.0", "--clip", "0.25")


# What a launcher adds to a job's stderr: Open MPI's blocks between lines of dashes (MPICH's between
# lines of "="), and its runtime's "[host:pid] PMIX ERROR: ..." lines.
BORDER = re.compile(r"-{20,}|={20,}")
LAUNCHER_LINE = re.compile(r"\[[\w.-]+:\d+\] [A-Z]+ ERROR: ")


def own_lines(text):
    """gpurnn's lines of a job's output, the launcher's left out. Only a closed block is left out, so a
    traceback of ours never hides in one."""
    kept, block = [], None
    for line in text.splitlines():
        if BORDER.fullmatch(line):
            block = [line] if block is None else None
        elif block is not None:
            block.append(line)
        elif not LAUNCHER_LINE.match(line):
            kept.append(line)
    return kept + (block or [])


def gpurnn(*args):
    return [sys.executable, "-m", "gpurnn", *map(str, args)]


def mpirun(ranks, command, timeout=120):
    return subprocess.run([MPIEXEC, "-n", str(ranks), *command], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def relative_error(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


def max_relative_error(path_a, path_b):
    """The largest relative difference over the parameters and carried states of two checkpoints."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a.params.keys() == b.params.keys() and a.state.keys() == b.state.keys()
    assert a.meta["stream"] == b.meta["stream"] and a.meta["trainer"]["iteration"] == b.meta["trainer"]["iteration"]
    return max(relative_error(x[k], y[k]) for x, y in ((a.params, b.params), (a.state, b.state)) for k in x)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))


def train64(ranks, corpus, checkpoint, iters, resume=False):
    """tests/mpi_train.py (float64) on `ranks` ranks (1: a plain process); the ranks' parameter digests."""
    command = [sys.executable, str(TESTS / "mpi_train.py"), str(corpus), str(checkpoint), str(iters)]
    command += ["--resume"] if resume else []
    done = mpirun(ranks, command) if ranks > 1 else subprocess.run(command, capture_output=True, text=True,
                                                                   timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    return sorted(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("rank "))


@pytest.fixture(scope="module")
def single64(corpus, tmp_path_factory):
    """The single-process float64 run of 50 iterations: the reference the ranks must equal."""
    path = tmp_path_factory.mktemp("single") / "one.h5"
    train64(1, corpus, path, 50)
    return path


# -- without MPI ------------------------------------------------------------------------------------

def test_importing_gpurnn_never_imports_mpi4py():
    code = "import sys, gpurnn.cli, gpurnn.train.job; print('mpi4py' in sys.modules, 'mpi4py.MPI' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_one_process_is_one_rank_whose_collectives_return_their_input():
    group = parallel.Group()
    losses = np.array([1.5, 2.5])
    assert (group.rank, group.size, group.lanes(7), group.loss_share) == (0, 1, (0, 7), 1.0)
    assert group.sum(losses) is losses and group.from_root(lambda: 3.0) == 3.0
    flat = np.arange(6.0)
    group.reduce_gradients(flat)
    np.testing.assert_array_equal(flat, np.arange(6.0))


@pytest.mark.parametrize("size_variable, rank_variable, rank, shown", [
    ("PMI_SIZE", "PMI_RANK", "0", True), ("PMI_SIZE", "PMI_RANK", "1", False),  # MPICH
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "0", True), ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "1", False)])
def test_mpi_launch_without_mpi4py_exits_2_with_one_line_from_rank_0(size_variable, rank_variable, rank, shown):
    """Started by a launcher (MPICH's or Open MPI's variables) where mpi4py cannot be imported: exit 2, rank 0
    says why."""
    code = "import sys; sys.modules['mpi4py'] = None; from gpurnn.cli import main; sys.exit(main(sys.argv[1:]))"
    launcher = set(parallel.SIZE_VARIABLES + parallel.RANK_VARIABLES + parallel.LOCAL_RANK_VARIABLES)
    env = {**{k: v for k, v in ENV.items() if k not in launcher}, size_variable: "2", rank_variable: rank}
    done = subprocess.run([sys.executable, "-c", code, *TRAIN, "--max-iters", "1"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines == (["gpurnn: error: started by an MPI launcher (2 ranks) but mpi4py is not installed: "
                      "pip install 'gpurnn[mpi]'"] if shown else [])


def test_ctrl_c_while_mpi_starts_ends_every_rank_once_the_group_exists(monkeypatch):
    """A rank that left during MPI's start-up would leave its peers waiting for it for ever (MPICH and
    Open MPI alike): the Ctrl-C waits for the group, then ends the job (MPI_Abort)."""
    group, ended = parallel.Group(), []
    group.size, group.end_job = 2, ended.append

    def starting():
        os.kill(os.getpid(), signal.SIGINT)  # lands inside MPI_Init, as it were
        time.sleep(0.05)
        return group

    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(parallel, "world", starting)
    parallel.on_every_rank(lambda: pytest.fail("the command ran"))()
    assert [type(exc) for exc in ended] == [KeyboardInterrupt]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler again


def test_a_stop_signal_during_training_on_many_ranks_ends_the_job_even_inside_a_weakref_callback():
    """A Ctrl-C can arrive while Python runs a weakref callback, which ignores any exception it raises (it
    prints 'Exception ignored' with a traceback): the handler ends the job itself instead of raising."""
    group, ended, released = parallel.Group(), [], []
    group.size, group.end_job = 2, ended.append
    trainer = Trainer.__new__(Trainer)
    trainer.group, trainer.lock = group, SimpleNamespace(release=lambda: released.append(True))

    class Target:
        pass

    target = Target()
    watch = weakref.ref(target, lambda ref: trainer._request_stop(signal.SIGINT, None))
    del target  # the callback runs now, as a collection's would
    assert watch() is None
    assert [type(exc) for exc in ended] == [KeyboardInterrupt] and released == [True]


@pytest.mark.parametrize("variable", ["MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"])  # MPICH's, Open MPI's
@pytest.mark.parametrize("local, visible, chosen", [("1", None, "1"), ("1", "4,6", "6"), ("0", "3", "3")])
def test_each_rank_on_a_node_sees_its_own_gpu(monkeypatch, variable, local, visible, chosen):
    for name in parallel.LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, local)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    parallel.pick_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == chosen


@needs_mpi
def test_the_launcher_tells_each_process_its_rank_the_size_and_its_rank_on_the_node(tmp_path):
    code = ("import sys; from pathlib import Path; from gpurnn.train import parallel; group = parallel.world(); "
            "values = (group.size, parallel.launcher_value(parallel.LOCAL_RANK_VARIABLES), "
            "parallel.launcher_value(parallel.RANK_VARIABLES)); "
            "(Path(sys.argv[1]) / str(group.rank)).write_text(' '.join(map(str, values)))")
    done = mpirun(2, [sys.executable, "-c", code, tmp_path])
    assert done.returncode == 0, done.stderr
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"0": "2 0 0", "1": "2 1 1"}


# -- two ranks equal one process ----------------------------------------------------------------------

@needs_mpi
def test_two_ranks_equal_one_process_in_float64_and_hold_identical_parameters(corpus, single64, tmp_path):
    digests = train64(2, corpus, tmp_path / "two.h5", 50)
    assert [rank for rank, _, _ in digests] == ["0", "1"] and digests[0][2] == digests[1][2]
    assert max_relative_error(single64, tmp_path / "two.h5") < 1e-12


@needs_mpi
def test_two_ranks_equal_one_process_from_the_cli_in_float32_with_the_same_eval_perplexity(corpus, tmp_path):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    common = [*TRAIN, corpus, *TINY, "--max-iters", "50", "--eval-every", "25", "--quiet"]
    single = subprocess.run(gpurnn(*common, "--checkpoint", one, "--metrics", tmp_path / "one.jsonl"),
                            capture_output=True, text=True, env=ENV)
    assert single.returncode == 0, single.stderr
    both = mpirun(2, gpurnn(*common, "--checkpoint", two, "--metrics", tmp_path / "two.jsonl"))
    assert both.returncode == 0, both.stderr
    summaries = [done.stdout.splitlines() for done in (single, both)]
    assert len(summaries[1]) == len(summaries[0])  # printed by rank 0 alone, with the same figures
    figures = [dict(zip(line[0].split()[::2], map(float, line[0].split()[1::2]))) for line in summaries]
    assert figures[0].keys() == figures[1].keys()
    assert all(abs(figures[0][k] - figures[1][k]) <= 1e-4 * figures[0][k] for k in figures[0])
    logs = [[r for r in map(json.loads, open(tmp_path / f"{name}.jsonl")) if r.get("kind") != "header"]
            for name in ("one", "two")]
    assert [r["iteration"] for r in logs[1]] == [r["iteration"] for r in logs[0]]  # rank 0 alone logs
    for key in ("train_perplexity", "valid_perplexity"):
        pairs = [(a[key], b[key]) for a, b in zip(*logs) if key in a]
        assert pairs and all(abs(a - b) < 1e-4 * a for a, b in pairs)
    assert max_relative_error(one, two) < 1e-4
    scores = []
    for path in (one, two):
        done = subprocess.run(gpurnn("--backend", "numpy", "eval", path, corpus, "--json"), capture_output=True,
                              text=True, env=ENV)
        scores.append(json.loads(done.stdout)["perplexity"])
    assert abs(scores[0] - scores[1]) < 1e-4 * scores[0]


@needs_mpi
def test_resume_from_two_ranks_on_one_and_back_continues_the_same_run(corpus, single64, tmp_path):
    ck = tmp_path / "ck.h5"
    train64(2, corpus, ck, 20)
    assert load_checkpoint(ck).state["lstm.h"].shape == (4, 16)  # every lane's state, gathered
    train64(1, corpus, ck, 35, resume=True)
    train64(2, corpus, ck, 50, resume=True)
    assert max_relative_error(single64, ck) < 1e-12


@needs_mpi
@requires_gpu
@pytest.mark.gpu
def test_one_rank_with_nccl_trains_as_one_process_without_mpi(corpus, tmp_path):
    """On a GPU: `mpiexec -n 1` all-reduces through NCCL (one device cannot host two NCCL ranks)."""
    common = ["--backend", "cupy", "train", corpus, *TINY, "--max-iters", "20", "--quiet"]
    alone = subprocess.run(gpurnn(*common, "--checkpoint", tmp_path / "one.h5"), capture_output=True,
                           text=True, env=ENV)
    assert alone.returncode == 0, alone.stderr
    nccl = mpirun(1, gpurnn(*common, "--checkpoint", tmp_path / "nccl.h5"))
    assert nccl.returncode == 0, nccl.stderr
    assert max_relative_error(tmp_path / "one.h5", tmp_path / "nccl.h5") < 1e-4


# -- refusals and faults -------------------------------------------------------------------------------

@needs_mpi
def test_a_batch_the_ranks_cannot_split_exits_2_with_one_line(corpus):
    done = mpirun(2, gpurnn(*TRAIN, corpus, "--batch-size", "3", "--max-iters", "2"))
    assert done.returncode == 2
    assert own_lines(done.stderr) == ["gpurnn: error: --batch-size 3 cannot be split over 2 ranks: "
                                        "choose a multiple of 2"]


@needs_mpi
def test_ranks_given_different_options_are_refused(corpus):
    base = [*TRAIN, corpus, "--batch-size", "4", "--max-iters", "2"]
    done = subprocess.run([MPIEXEC, "-n", "1", *gpurnn(*base, "--lr", "0.1"), ":",
                           "-n", "1", *gpurnn(*base, "--lr", "0.2")],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2
    assert own_lines(done.stderr) == ["gpurnn: error: rank 1 was started with other options than rank 0 "
                                        "(lr): give every rank the same command"]


def start_long_run(corpus, checkpoint):
    """A two-rank run that saves every 5 iterations and would go on for a long time."""
    command = [MPIEXEC, "-n", "2", *gpurnn(*TRAIN, corpus, *TINY, "--max-iters", "1000000", "--save-every", "5",
                                           "--checkpoint", checkpoint, "--quiet")]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                           start_new_session=True)
    deadline = time.monotonic() + 60
    while not checkpoint.exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.1)
    return job


def rank_pid(job, rank):
    """The process id of `rank` among the job's processes (found through /proc: descendants, environment)."""
    wanted = {f"{name}={rank}".encode() for name in parallel.RANK_VARIABLES}  # MPICH's or Open MPI's
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    for pid in parents:
        ancestor = pid
        while ancestor in parents and ancestor != job.pid:
            ancestor = parents[ancestor]
        try:
            if ancestor == job.pid and wanted & set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                return pid
        except OSError:
            continue
    raise AssertionError(f"no process of rank {rank}")


def finished_within(job, seconds):
    try:
        out, err = job.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the session start_long_run began
        job.communicate()
        raise AssertionError(f"the job still ran {seconds} s after the fault") from None
    return job.returncode, out + err


def resumes(corpus, checkpoint):
    """The checkpoint loads and a single process continues from it for 5 more iterations."""
    iteration = load_checkpoint(checkpoint).meta["trainer"]["iteration"]
    done = subprocess.run(gpurnn(*TRAIN, corpus, "--checkpoint", checkpoint, "--resume", "--max-iters",
                                 iteration + 5, "--quiet"), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(checkpoint).meta["trainer"]["iteration"] == iteration + 5


@needs_mpi
@needs_proc
def test_a_killed_rank_ends_the_job_within_seconds_and_the_checkpoint_resumes(corpus, tmp_path):
    checkpoint = tmp_path / "ck.h5"
    job = start_long_run(corpus, checkpoint)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    code, output = finished_within(job, 30)
    assert code != 0
    # whichever comes first: the launcher names the dead rank's signal (MPICH's words, Open MPI's), MPICH's
    # library aborts naming the collective that failed, or rank 0 says its peer is gone
    assert re.search(r"Killed \(signal 9\)|signal 9 \(Killed\)|Fatal error in \w*Allreduce|"
                     r"another rank stopped \(it failed or was killed\)", output), output
    resumes(corpus, checkpoint)


@needs_mpi
def test_an_error_on_one_rank_aborts_every_rank_with_its_message(corpus, tmp_path):
    """Rank 0 alone writes checkpoints: when it cannot, it says so and MPI_Abort ends rank 1 too."""
    folder = tmp_path / "run"
    folder.mkdir()
    job = start_long_run(corpus, folder / "ck.h5")
    folder.rename(tmp_path / "moved")
    code, output = finished_within(job, 30)
    assert code != 0
    message = next(line for line in output.splitlines() if line.startswith("gpurnn: error: rank 0 of 2: "))
    assert str(folder) in message and "Traceback" not in output  # one line naming the missing folder
    resumes(corpus, tmp_path / "moved" / "ck.h5")



@needs_mpi
@needs_proc
def test_ctrl_c_stops_every_rank_at_once_and_the_last_checkpoint_resumes(corpus, tmp_path):
    """gpurnn's promise: every rank stops within seconds, each one that speaks says it was interrupted, and
    the last checkpoint resumes. The job's exit status and whether a rank's last words reach the terminal
    are the launcher's (MPICH's passes on rank 0's 130 and its line; Open MPI's exits 1 and may drop it)."""
    checkpoint = tmp_path / "ck.h5"
    job = start_long_run(corpus, checkpoint)
    ranks = [rank_pid(job, rank) for rank in (0, 1)]
    job.send_signal(signal.SIGINT)  # to mpiexec, which passes it on to the ranks
    code, output = finished_within(job, 30)
    assert code != 0
    deadline = time.monotonic() + 5  # a launcher may exit while the ranks it killed are still going down
    while any(map(running, ranks)):
        assert time.monotonic() < deadline, "a rank still runs 5 s after the job ended"
        time.sleep(0.1)
    said = [line for line in output.splitlines() if line.startswith("gpurnn")]
    assert "Traceback" not in output and all(re.fullmatch(
        r"gpurnn: error: rank [01] of 2: interrupted; resume from the last saved checkpoint", line) for line in said)
    resumes(corpus, checkpoint)


def running(pid):
    """Whether process `pid` exists and has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


@needs_mpi
def test_a_diverging_run_is_reported_once_and_every_rank_exits_2(corpus, tmp_path):
    """The ranks share the summed loss, so all of them find it non-finite at once: one line, not one per rank."""
    ck = tmp_path / "ck.h5"
    done = mpirun(2, gpurnn(*TRAIN, corpus, *TINY[:-4], "--lr", "1e38", "--max-iters", "40", "--log-every", "1",
                            "--save-every", "1", "--checkpoint", ck, "--quiet"))
    assert done.returncode == 2
    [line] = own_lines(done.stderr)
    assert "the loss became non-finite at iteration" in line
    kept = int(line.split("(iteration ")[1].split(")")[0])
    assert load_checkpoint(ck).meta["trainer"]["iteration"] == kept


@needs_mpi
def test_two_ranks_evaluate_a_split_as_one_process_does(corpus, tmp_path):
    ck = tmp_path / "ck.h5"
    done = subprocess.run(gpurnn(*TRAIN, corpus, *TINY, "--max-iters", "10", "--checkpoint", ck, "--quiet"),
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    evaluate = gpurnn("--backend", "numpy", "eval", ck, corpus, "--split", "valid", "--batch-size", "5",
                      "--time-size", "5", "--json")
    alone = subprocess.run(evaluate, capture_output=True, text=True, env=ENV)
    shared = mpirun(2, evaluate)  # lanes 0-1 on rank 0, 2-4 on rank 1; rank 0 alone prints
    assert alone.returncode == 0 and shared.returncode == 0, shared.stderr
    one, two = json.loads(alone.stdout), json.loads(shared.stdout)
    assert two["tokens"] == one["tokens"] and two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)
