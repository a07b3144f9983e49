"""Fault tests: stops planned or not (signals, kill -9 anywhere, inside saves too) lose nothing, and a
resumed run ends bit-identical to an uninterrupted one, learning-rate decay and evaluations included."""

import signal
import time

import numpy as np
import pytest

from gpurnn.atomic import PAUSE_ENV
from gpurnn.train.checkpoint import load_checkpoint

from .conftest import write_small_corpus
from .faultkit import (DECAYING, STOP_SIGNALS, TINY, assert_good_checkpoint, assert_no_traceback,
                       assert_one_line_error, assert_same_run, cli, litter, send, start, wait_for_lines)

ITERS = 300


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The arguments of a small decaying run on the small corpus, and its uninterrupted checkpoint."""
    folder = tmp_path_factory.mktemp("job")
    args = ["train", write_small_corpus(folder), "--quiet", *TINY, *DECAYING, "--max-iters", ITERS]
    reference = folder / "reference.h5"
    code, _, err = cli(*args, "--checkpoint", reference)
    assert code == 0, err
    assert load_checkpoint(reference).meta["trainer"]["lr"] < 1.0  # it decayed: a resume must get that right
    return args, reference


def test_planned_stop_and_resume_with_decay_and_evaluation_is_bit_identical(tmp_path, job):
    """The end-of-run validation of the first part must not feed the decay rule."""
    args, reference = job
    ck = tmp_path / "ck.h5"
    for stop in (23, 100, ITERS):  # 23 and 100 are not multiples of --eval-every 7
        code, _, err = cli(*args[:-1], stop, "--checkpoint", ck, *(["--resume"] if ck.exists() else []))
        assert code == 0, err
    assert_same_run(reference, ck)
    assert litter(tmp_path) == []


@pytest.mark.parametrize("name", STOP_SIGNALS)
def test_a_stop_signal_saves_exits_128_plus_n_and_the_resumed_run_matches(tmp_path, job, name):
    signum, status = STOP_SIGNALS[name]
    args, reference = job
    ck, metrics = tmp_path / "ck.h5", tmp_path / "m.jsonl"
    proc = start(*args, "--checkpoint", ck, "--metrics", metrics, "--log-every", 1)
    wait_for_lines(metrics, 3, proc)
    code, err = send(proc, signum)
    assert code == status, err
    assert f"({name}); checkpoint saved to {ck}" in err
    assert_no_traceback(err)
    assert 0 < assert_good_checkpoint(ck) < ITERS
    assert litter(tmp_path) == []
    code, _, err = cli(*args, "--checkpoint", ck, "--resume")
    assert code == 0, err
    assert_same_run(reference, ck)


@pytest.mark.parametrize("in_save", [False, True], ids=["in-training", "in-a-save"])
def test_a_double_ctrl_c_exits_130_at_once_with_one_line(tmp_path, job, in_save):
    """A second Ctrl-C stops at once (one inside a save lets the save complete first; one after the
    checkpoint is saved is ignored): exit 130 either way, never a traceback or a death by SIGINT."""
    args, _ = job
    ck, metrics = tmp_path / "ck.h5", tmp_path / "m.jsonl"
    env = {PAUSE_ENV: "0.3"} if in_save else {}
    proc = start(*args, "--checkpoint", ck, "--metrics", metrics, "--log-every", 1, "--save-every", 5, env=env)
    wait_for_lines(metrics, 5 if in_save else 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    code, err = send(proc, signal.SIGINT)
    assert code == 130, err
    assert_no_traceback(err)
    lines = err.strip().splitlines()
    assert all(line.startswith(("interrupted at iteration", "SIGINT again: stopped at once")) for line in lines)
    if in_save:  # the second Ctrl-C came during a save: the save completed, then it stopped
        assert len(lines) == 1 and lines[0].startswith("SIGINT again: stopped at once; the checkpoint on disk"), err
        assert lines[0].endswith(f"is from iteration {assert_good_checkpoint(ck)}")
    elif ck.exists():
        assert_good_checkpoint(ck)
    assert litter(tmp_path) == []


def test_kill_9_anywhere_then_resume_ends_bit_identical(tmp_path, job):
    """kill -9 at random moments, half of the runs spending most of their time inside saves; every
    checkpoint left is complete, stale temporary files are cleaned by the next run, and the resumed
    run ends as the uninterrupted one."""
    args, reference = job
    ck, metrics = tmp_path / "ck.h5", tmp_path / "m.jsonl"
    rng = np.random.default_rng(15)
    killed_in_save = 0
    for k in range(16):  # 8 kills, more while none has landed inside a save
        if k >= 8 and killed_in_save:
            break
        resume = ["--resume"] if ck.exists() else []
        in_save = k % 2 == 1
        metrics.unlink(missing_ok=True)
        proc = start(*args, "--checkpoint", ck, "--metrics", metrics, "--log-every", 1, "--save-every", 3, *resume,
                     env={PAUSE_ENV: "0.2"} if in_save else {})
        wait_for_lines(metrics, 1, proc)
        time.sleep(rng.uniform(0, 0.2))
        proc.kill()
        proc.communicate(timeout=60)
        killed_in_save += any(name.endswith(".tmp") for name in litter(tmp_path))
        if ck.exists():
            assert_good_checkpoint(ck)
    assert killed_in_save >= 1  # at least one kill landed between a save's write and its rename
    code, _, err = cli(*args, "--checkpoint", ck, *(["--resume"] if ck.exists() else []))
    assert code == 0, err
    assert_same_run(reference, ck)
    assert litter(tmp_path) == []


def test_a_second_trainer_on_the_same_checkpoint_is_refused_until_the_first_dies(tmp_path, job):
    args, _ = job
    ck, metrics = tmp_path / "ck.h5", tmp_path / "m.jsonl"
    first = start(*args[:-1], 100_000, "--checkpoint", ck, "--metrics", metrics, "--log-every", 1)
    try:
        wait_for_lines(metrics, 1, first)
        code, _, err = cli(*args, "--checkpoint", ck)
        assert_one_line_error(code, err, f"another process is writing the checkpoint {ck}")
    finally:
        first.kill()
        first.communicate(timeout=60)
    code, _, err = cli(*args[:-1], 5, "--checkpoint", ck)  # the kernel released the dead one's lock
    assert code == 0, err
    assert litter(tmp_path) == []
