"""Crash at any moment, run the same command again, and it continues: before the first checkpoint the
rerun begins afresh (the stopped run's records kept aside), after it --resume continues, and a metrics
line a kill cut short is repaired rather than reported."""

import json
import signal

import pytest

from gpurnn.errors import GpurnnError
from gpurnn.train.checkpoint import load_checkpoint
from gpurnn.train.metrics import MetricsLog, read_records, run_records, stopped_path

from .conftest import write_small_corpus
from .faultkit import SMALL_RUN, assert_one_line_error, assert_same_run, cli, litter, start, wait_for_lines


def killed_before_its_first_save(corpus, ck):
    """`gpurnn train` that would save only at its end, killed (-9) once it has logged two steps."""
    proc = start("train", corpus, *SMALL_RUN, "--max-iters", 10 ** 6, "--log-every", 1, "--checkpoint", ck)
    wait_for_lines(ck.with_name("ck.metrics.jsonl"), 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not ck.exists()


def steps(path):
    return [r["iteration"] for r in read_records(path) if r["kind"] == "step"]


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_run_killed_before_its_first_save_begins_again_with_one_notice(tmp_path, resume):
    corpus, ck = write_small_corpus(tmp_path), tmp_path / "ck.h5"
    metrics = tmp_path / "ck.metrics.jsonl"
    killed_before_its_first_save(corpus, ck)
    dead = metrics.read_text()
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 6, "--log-every", 2, "--checkpoint", ck, *resume)
    assert code == 0, err
    aside = tmp_path / "ck.metrics.stopped.jsonl"
    assert err == (f"note: no checkpoint at {ck} yet: the run starts from the beginning; "
                   f"the stopped run's records are in {aside}\n")
    assert aside.read_text() == dead  # kept as they were
    [header] = [r for r in read_records(metrics) if r["kind"] == "header"]
    assert "resumed_at" not in header and steps(metrics) == [2, 4, 6]
    assert load_checkpoint(ck).meta["trainer"]["iteration"] == 6 and litter(tmp_path) == []


def test_resume_before_any_record_begins_with_one_notice(tmp_path):
    corpus, ck = write_small_corpus(tmp_path), tmp_path / "ck.h5"
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 2, "--checkpoint", ck, "--resume")
    assert code == 0, err
    assert err == f"note: no checkpoint at {ck} yet: the run starts from the beginning\n"
    assert not stopped_path(tmp_path / "ck.metrics.jsonl").exists()


def test_where_a_checkpoint_exists_a_rerun_without_resume_is_refused_naming_it(tmp_path):
    corpus, ck = write_small_corpus(tmp_path), tmp_path / "ck.h5"
    args = ["train", corpus, *SMALL_RUN, "--max-iters", 4, "--checkpoint", ck]
    assert cli(*args)[0] == 0
    code, _, err = cli(*args)
    assert_one_line_error(code, err, "already holds a run: pass --resume")


def test_records_of_another_checkpoint_are_never_moved_aside(tmp_path):
    path = tmp_path / "m.jsonl"
    MetricsLog(path, {"run_id": "a", "checkpoint": str(tmp_path / "a.h5")})({"iteration": 1})
    with pytest.raises(GpurnnError, match="already holds a run"):
        MetricsLog(path, {"run_id": "b"}, checkpoint=tmp_path / "b.h5")
    assert steps(path) == [1] and not stopped_path(path).exists()


def test_resume_repairs_a_line_cut_short_and_drops_the_stopped_process_later_steps(tmp_path):
    """A kill inside a metrics write leaves part of a line; steps logged after the checkpoint are logged again."""
    corpus, ck = write_small_corpus(tmp_path), tmp_path / "ck.h5"
    args = ["train", corpus, *SMALL_RUN, "--log-every", 2, "--checkpoint", ck]
    assert cli(*args, "--max-iters", 4)[0] == 0
    metrics = tmp_path / "ck.metrics.jsonl"
    run_id = read_records(metrics)[0]["run_id"]
    with open(metrics, "a") as f:  # what the stopped process wrote after its checkpoint at 4
        f.write(json.dumps({"kind": "step", "run_id": run_id, "iteration": 6, "train_perplexity": 1.0}) + "\n")
        f.write('{"kind": "step", "run_id": "' + run_id + '", "itera')
    assert steps(metrics) == [2, 4, 6]  # a reader leaves the unfinished line out
    code, _, err = cli(*args, "--max-iters", 8, "--resume")
    assert code == 0 and err == "", err
    lines = metrics.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines) and metrics.read_text().endswith("\n")
    assert steps(metrics) == [2, 4, 6, 7, 8] and 1.0 not in [r.get("train_perplexity") for r in read_records(metrics)]
    assert [s["iteration"] for s in run_records(read_records(metrics), run_id)[1]] == [2, 4, 6, 7, 8]  # 7: --eval-every
    assert litter(tmp_path) == []


def test_a_run_resumed_after_a_kill_before_and_after_its_first_save_matches_one_uninterrupted(tmp_path):
    corpus = write_small_corpus(tmp_path)
    reference, ck = tmp_path / "reference.h5", tmp_path / "ck.h5"
    assert cli("train", corpus, *SMALL_RUN, "--max-iters", 30, "--checkpoint", reference)[0] == 0
    killed_before_its_first_save(corpus, ck)
    args = ["train", corpus, *SMALL_RUN, "--checkpoint", ck, "--resume"]
    assert cli(*args, "--max-iters", 12)[0] == 0
    assert cli(*args, "--max-iters", 30)[0] == 0
    assert_same_run(reference, ck)
