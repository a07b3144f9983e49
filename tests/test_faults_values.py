"""Fault tests on values: NaN parameters, incomplete metadata, ids outside the vocabulary, divergence,
non-finite options, bad model configs, oversized evaluation batches, and schedule changes on resume."""

import json
import math

import h5py
import numpy as np
import pytest

from gpurnn.backend import get_backend
from gpurnn.model import preset_specs
from gpurnn.registry import Registry
from gpurnn.train.checkpoint import DIGEST_ATTR, content_digest, load_checkpoint
from gpurnn.train.evaluate import MAX_BLOCK_LOGITS, lanes_for
from gpurnn.train.job import prepare_job
from gpurnn.train.metrics import MetricsLog
from gpurnn.train.trainer import TrainingDiverged

from .faultkit import (SMALL_RUN, TINY, assert_good_checkpoint, assert_no_traceback, assert_one_line_error, cli,
                       train_small)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """A run without --checkpoint makes its run folder under runs/ in the current folder: not the repo's."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small corpus and a checkpoint trained on it for 40 iterations with a decaying schedule."""
    return train_small(tmp_path_factory.mktemp("values"))


def copy(path, tmp_path):
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())
    return target


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as every other JSON parser does."""
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"invalid JSON token {token}"))


def test_non_finite_parameters_are_refused_by_eval_generate_and_resume(trained, tmp_path):
    corpus, good = trained
    ck = copy(good, tmp_path)
    with h5py.File(ck, "r+") as f:
        f["params/rnn.Wh"][0, 0] = np.nan
    for args in (["eval", ck, corpus], ["generate", ck], ["train", corpus, *SMALL_RUN, "--checkpoint", ck, "--resume"]):
        code, _, err = cli(*args)
        assert_one_line_error(code, err, "params 'rnn.Wh' holds NaN or infinite values")


@pytest.mark.parametrize("signed", [True, False], ids=["re-signed", "unsigned"])
def test_a_checkpoint_without_a_required_meta_key_is_refused(trained, tmp_path, signed):
    corpus, good = trained
    ck = copy(good, tmp_path)
    with h5py.File(ck, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        del meta["specs"]
        f.attrs["meta"] = json.dumps(meta)
        if signed:  # as another tool writing the file would
            f.attrs[DIGEST_ATTR] = content_digest(f.attrs["meta"], load_checkpoint(good).vocab)
    code, _, err = cli("eval", ck, corpus)
    assert_one_line_error(code, err, "meta has no 'specs'" if signed else "does not match its checksum")


@pytest.mark.parametrize("split, bad_id", [("train", 10_000), ("test", -1)])
def test_ids_outside_the_vocabulary_are_refused_naming_the_split(trained, tmp_path, split, bad_id):
    corpus, ck = trained
    bad = copy(corpus, tmp_path)
    with h5py.File(bad, "r+") as f:
        f[split][3] = bad_id
    for args in (["eval", ck, bad, "--split", split], ["train", bad, *SMALL_RUN, "--max-iters", 3],
                 ["corpus-info", bad]):
        code, _, err = cli(*args)
        assert_one_line_error(code, err, f"the {split} split holds id {bad_id}, outside the vocabulary")


@pytest.mark.parametrize("args", [["train", "--lr", "nan"], ["train", "--lr", "inf"], ["train", "--clip", "nan"],
                                  ["train", "--lr-decay", "nan"]])
def test_non_finite_training_options_are_refused(args):
    code, _, err = cli(*args, "--max-iters", 1)
    assert_one_line_error(code, err, f"{args[1]} must be a finite number > 0")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_temperature_is_refused(trained, value):
    code, _, err = cli("generate", trained[1], "--temperature", value)
    assert_one_line_error(code, err, "--temperature must be a finite number >= 0")


@pytest.mark.parametrize("lr", ["1e4", "1e38"])
def test_divergence_ends_in_one_line_and_keeps_only_a_good_checkpoint(tmp_path, lr):
    ck = tmp_path / "ck.h5"
    code, out, err = cli("train", "--quiet", *TINY, "--lr", lr, "--max-iters", 60, "--save-every", 1,
                         "--log-every", 1, "--checkpoint", ck)
    assert_no_traceback(err)
    if code == 0:  # survived: perplexities may have overflowed, printed as inf
        assert out.startswith("iteration 60") and assert_good_checkpoint(ck) == 60
        return
    assert_one_line_error(code, err, "non-finite")
    kept = int(err.split("(iteration ")[1].split(")")[0])
    assert assert_good_checkpoint(ck) == kept


def test_a_checkpoint_is_never_written_from_non_finite_parameters(tmp_path):
    ck = tmp_path / "ck.h5"
    trainer, _ = prepare_job(None, specs=preset_specs("simple-rnnlm", wordvec_size=4, hidden_size=4),
                             options={"max_iters": 2}, explicit=set(), backend=get_backend("numpy"),
                             registry=Registry(), checkpoint=ck)
    trainer.run()
    before = ck.read_bytes()
    trainer.model.params["rnn.Wh"][0, 0] = np.inf
    with pytest.raises(TrainingDiverged, match=r"rnn.Wh became non-finite by iteration 2: not saved; "
                                               r"the last good checkpoint \(iteration 2\) is kept"):
        trainer.save()
    assert ck.read_bytes() == before


def test_an_overflowing_perplexity_prints_inf_and_json_null(trained, tmp_path):
    corpus, good = trained
    ck = copy(good, tmp_path)
    with h5py.File(ck, "r+") as f:
        f["params/affine_softmax_loss.b"][0] = 1e4  # every other token's loss is about 1e4: exp overflows
    code, out, err = cli("eval", ck, corpus)
    assert code == 0 and out.startswith("test perplexity inf over"), err
    code, out, err = cli("eval", ck, corpus, "--json")
    assert code == 0 and strict_json(out)["perplexity"] is None
    log = MetricsLog(tmp_path / "m.jsonl", {"run_id": "r", "best": math.inf})
    log({"iteration": 1, "train_perplexity": math.inf, "lr": float("nan")})
    header, step = [strict_json(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert header["best"] is None
    assert {k: step[k] for k in ("iteration", "train_perplexity", "lr")} == \
        {"iteration": 1, "train_perplexity": None, "lr": None}


def test_an_oversized_eval_batch_is_lowered_with_a_note_and_scores_the_same(trained):
    corpus, ck = trained
    code, out, err = cli("eval", ck, corpus, "--batch-size", 100_000, "--time-size", 5, "--json")
    assert code == 0
    lanes = int(err.split("lowered to ")[1].split()[0])
    assert 1 < lanes <= strict_json(out)["tokens"] // 5  # every lane holds at least one block of 5
    assert err == f"note: batch size 100000 lowered to {lanes} (each lane holds at least one block of 5 tokens, " \
                  f"and a block at most {MAX_BLOCK_LOGITS:,} logits)\n"
    assert cli("eval", ck, corpus, "--batch-size", lanes, "--time-size", 5, "--json") == (0, out, "")


def test_evaluation_memory_is_bounded_whatever_the_batch_size():
    class Model:
        vocab_size = logits_per_row = 10_000
    lanes = lanes_for(Model(), 82_429, 100_000, 35)
    assert lanes * 35 * 10_000 <= MAX_BLOCK_LOGITS and lanes >= 1


@pytest.mark.parametrize("line, message", [
    ('hidden_size = "eight"', "layer 2 (rnn): hidden_size must be a positive integer, not 'eight'"),
    ("hidden_size = -4", "layer 2 (rnn): hidden_size must be a positive integer, not -4"),
    ("hidden_size = true", "layer 2 (rnn): hidden_size must be a positive integer, not True"),
    ("hidden_size = 4.5", "layer 2 (rnn): hidden_size must be a positive integer, not 4.5"),
])
def test_bad_model_config_values_name_the_layer_and_key(tmp_path, line, message):
    config = tmp_path / "m.toml"
    config.write_text(f'[[layers]]\ntype = "embedding"\nsize = 8\n\n[[layers]]\ntype = "rnn"\n{line}\n\n'
                      '[[layers]]\ntype = "affine"\n\n[[layers]]\ntype = "softmax_loss"\n')
    code, _, err = cli("train", "--model-config", config, "--max-iters", 1)
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("p", ["1.5", "-0.1", '"half"'])
def test_a_dropout_probability_out_of_range_is_refused(tmp_path, p):
    config = tmp_path / "m.toml"
    config.write_text(f'[[layers]]\ntype = "embedding"\nsize = 8\n\n[[layers]]\ntype = "dropout"\np = {p}\n\n'
                      '[[layers]]\ntype = "affine"\n\n[[layers]]\ntype = "softmax_loss"\n')
    code, _, err = cli("train", "--model-config", config, "--max-iters", 1)
    assert_one_line_error(code, err, "layer 2 (dropout): p must be a probability in [0, 1)")


def test_schedule_options_on_resume_say_what_they_replace(trained, tmp_path):
    corpus, good = trained
    ck = copy(good, tmp_path)
    decayed = load_checkpoint(ck).meta["trainer"]["lr"]
    assert decayed < 1.0
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 41, "--checkpoint", ck, "--resume")
    assert code == 0 and err == f"resume: lr {decayed:g} from the checkpoint is kept (decayed from --lr 1)\n"
    assert load_checkpoint(ck).meta["trainer"]["lr"] == decayed  # the same command again keeps the schedule
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 42, "--checkpoint", ck, "--resume",
                       "--lr", "0.001", "--clip", "2", "--eval-every", 50)
    assert code == 0
    assert err == (f"resume: lr {decayed:g} from the checkpoint -> 0.001 (--lr)\n"
                   "resume: clip 5 from the checkpoint -> 2 (--clip)\n")
    assert load_checkpoint(ck).meta["trainer"]["lr"] == 0.001
