"""Training end to end: the chapter-5 demo, exact resume, SIGINT, non-finite loss, bad options."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpurnn.cli import main
from gpurnn.train.checkpoint import load_checkpoint


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run folders (runs/...) go under the test's own folder."""
    monkeypatch.chdir(tmp_path)


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def read_metrics(path):
    """The step records of a metrics file (its header records left out)."""
    return [r for r in map(json.loads, open(path)) if r["kind"] == "step"]


def test_chapter5_demo_perplexity_falls_from_about_400_to_about_5(capsys, tmp_path):
    """The textbook measured 401 / 193 / 78 / 5.25 at epochs 1 / 10 / 50 / 100."""
    metrics = tmp_path / "m.jsonl"
    code, out, _ = run(capsys, "--backend", "numpy", "train", "--quiet", "--metrics", str(metrics))
    assert code == 0
    by_epoch = {round(r["epoch"]): r["train_perplexity"] for r in read_metrics(metrics)}
    assert 300 < by_epoch[1] < 500
    assert 150 < by_epoch[10] < 250
    assert 40 < by_epoch[50] < 120
    assert by_epoch[100] < 8
    assert "iteration 1900" in out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_stopped_and_resumed_run_is_bit_identical(capsys, tmp_path, optimizer):
    common = ["--backend", "numpy", "train", "--quiet", "--optimizer", optimizer, "--lr", "0.01",
              "--clip", "1.0", "--hidden-size", "20", "--wordvec-size", "16"]
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert run(capsys, *common, "--max-iters", "60", "--checkpoint", str(full))[0] == 0
    assert run(capsys, *common, "--max-iters", "23", "--checkpoint", str(part))[0] == 0
    assert load_checkpoint(part).meta["trainer"]["iteration"] == 23
    code, _, err = run(capsys, *common, "--max-iters", "60", "--checkpoint", str(part), "--resume")
    assert code == 0, err
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert b.meta["trainer"]["iteration"] == 60
    for group in ("params", "optimizer_arrays", "state"):
        assert getattr(a, group).keys() == getattr(b, group).keys()
        for k in getattr(a, group):
            np.testing.assert_array_equal(getattr(a, group)[k], getattr(b, group)[k], err_msg=f"{group} {k}")
    assert a.meta["stream"] == b.meta["stream"]


def test_sigint_saves_and_exits_130_and_the_resumed_run_matches(tmp_path, capsys):
    args = ["--backend", "numpy", "train", "--quiet", "--max-iters", "1500", "--log-every", "1"]
    ref = tmp_path / "ref.h5"
    assert run(capsys, *args, "--checkpoint", str(ref))[0] == 0
    ck, metrics = tmp_path / "ck.h5", tmp_path / "m.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "gpurnn", *args, "--checkpoint", str(ck), "--metrics", str(metrics)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (metrics.exists() and '"kind": "step"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    stopped = load_checkpoint(ck).meta["trainer"]["iteration"]
    assert 0 < stopped < 1500
    assert run(capsys, *args, "--checkpoint", str(ck), "--resume")[0] == 0
    a, b = load_checkpoint(ref), load_checkpoint(ck)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_non_finite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck.h5"
    code, _, err = run(capsys, "--backend", "numpy", "train", "--quiet", "--lr", "1e38", "--max-iters", "500",
                       "--save-every", "1", "--log-every", "1", "--checkpoint", str(ck))
    assert code == 2 and err.count("\n") == 1
    assert "non-finite at iteration" in err
    bad = int(err.split("iteration ")[1].split(";")[0])
    saved = load_checkpoint(ck)
    assert saved.meta["trainer"]["iteration"] == bad - 1
    assert all(np.isfinite(v).all() for v in saved.params.values())
    assert f"(iteration {bad - 1}) is kept" in err


@pytest.mark.parametrize("args, message", [
    (["train", "--resume"], "--resume needs the run to continue"),
    (["train", "--model", "nope"], "Invalid value for '--model': 'nope' is not one of 'simple-rnnlm'"),
    (["train", "--model-config", "missing.toml"], "does not exist"),
    (["train", "--lr", "-1"], "Invalid value for '--lr'"),
    (["train", "--checkpoint", "no/such/dir/ck.h5", "--max-iters", "1"], "folder no/such/dir does not exist"),
    (["train", "no_such_corpus.h5"], "no_such_corpus.h5"),
])
def test_bad_train_options_are_one_line_errors(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "--backend", "numpy", *args)
    assert code == 2, err
    first, *rest = err.splitlines()
    assert message in first and rest in ([], ["Try 'gpurnn train -h' for help."])


def test_resume_refuses_contradicting_options(capsys, tmp_path):
    ck = tmp_path / "ck.h5"
    base = ["--backend", "numpy", "train", "--quiet", "--checkpoint", str(ck)]
    assert run(capsys, *base, "--max-iters", "3", "--hidden-size", "8")[0] == 0
    code, _, err = run(capsys, *base, "--resume", "--hidden-size", "9", "--max-iters", "5")
    assert code == 2 and "contradict the checkpoint's model" in err
    code, _, err = run(capsys, *base, "--resume", "--batch-size", "4", "--max-iters", "5")
    assert code == 2 and "--batch-size 4 contradicts the checkpoint (10)" in err
    code, _, err = run(capsys, *base, "--resume", "--optimizer", "adam", "--max-iters", "5")
    assert code == 2 and "--optimizer adam contradicts the checkpoint (sgd)" in err
    assert run(capsys, *base, "--resume", "--max-iters", "5")[0] == 0
    assert load_checkpoint(ck).meta["trainer"]["iteration"] == 5
    assert load_checkpoint(ck).meta["trainer"]["lr"] == 0.1
    assert run(capsys, *base, "--resume", "--max-iters", "6", "--lr", "0.025")[0] == 0  # a new rate from here on
    assert load_checkpoint(ck).meta["trainer"]["lr"] == 0.025


def test_model_config_toml_with_a_plugin_layer(capsys, tmp_path):
    from .test_plugins import SCALED_TANH
    plugin = tmp_path / "st.py"
    plugin.write_text(SCALED_TANH)
    config = tmp_path / "m.toml"
    config.write_text('[[layers]]\ntype = "embedding"\nsize = 8\n\n[[layers]]\ntype = "rnn"\nhidden_size = 8\n\n'
                      '[[layers]]\ntype = "scaled_tanh"\n\n[[layers]]\ntype = "affine"\n\n'
                      '[[layers]]\ntype = "softmax_loss"\n')
    ck = tmp_path / "ck.h5"
    code, _, err = run(capsys, "--backend", "numpy", "--plugin", str(plugin), "train", "--quiet",
                       "--model-config", str(config), "--max-iters", "5", "--checkpoint", str(ck))
    assert code == 0, err
    assert "scaled_tanh.scale" in load_checkpoint(ck).params
    config.write_text("layers = 3\n")
    code, _, err = run(capsys, "--backend", "numpy", "train", "--model-config", str(config))
    assert code == 2 and "[[layers]]" in err


def test_generate_is_reproducible(capsys, tmp_path):
    ck = tmp_path / "ck.h5"
    assert run(capsys, "--backend", "numpy", "train", "--quiet", "--max-iters", "50", "--checkpoint", str(ck))[0] == 0
    code, first, _ = run(capsys, "--backend", "numpy", "generate", str(ck), "--prompt", "the company", "--length", "20",
                         "--seed", "3")
    assert code == 0 and first.startswith("the company")
    assert len(first.split()) >= 20
    assert run(capsys, "--backend", "numpy", "generate", str(ck), "--prompt", "the company", "--length", "20",
               "--seed", "3")[1] == first
    assert run(capsys, "--backend", "numpy", "generate", str(ck), "--length", "20", "--seed", "4")[1] != first
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    code, _, err = run(capsys, "--backend", "numpy", "generate", str(bad))
    assert code == 2 and "not a readable gpurnn checkpoint" in err


def test_plot_needs_matplotlib_or_draws(capsys, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        code, _, err = run(capsys, "--backend", "numpy", "train", "--plot", str(tmp_path / "p.png"))
        assert code == 2 and "pip install 'gpurnn[plot]'" in err
        return
    png = tmp_path / "p.png"
    assert run(capsys, "--backend", "numpy", "train", "--quiet", "--max-iters", "40", "--plot", str(png))[0] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_validation_decays_lr_and_eval_scores_the_whole_split(capsys, tmp_path, small_corpus):
    from gpurnn.data import open_corpus
    ck, metrics = tmp_path / "ck.h5", tmp_path / "m.jsonl"
    code, _, err = run(capsys, "--backend", "numpy", "train", str(small_corpus), "--quiet", "--batch-size", "4",
                       "--time-size", "5", "--lr", "1.0", "--lr-decay", "0.5", "--max-iters", "120",
                       "--eval-every", "10", "--checkpoint", str(ck), "--metrics", str(metrics))
    assert code == 0, err
    records = read_metrics(metrics)
    evaluated = [r for r in records if "valid_perplexity" in r]
    assert [r["iteration"] for r in evaluated] == list(range(10, 121, 10))
    lrs = [r["lr"] for r in evaluated]
    assert lrs[0] == 1.0 and min(lrs) < 1.0  # lr 1.0 overfits this tiny set: validation stops improving
    code, out, _ = run(capsys, "--backend", "numpy", "eval", str(ck), str(small_corpus), "--split", "test", "--json")
    result = json.loads(out)
    with open_corpus(small_corpus) as corpus:
        assert result["tokens"] == len(corpus.split("test")) - 1 and result["split"] == "test"
    assert 1 < result["perplexity"] < len(corpus.vocab) * 10
    _, out1, _ = run(capsys, "--backend", "numpy", "eval", str(ck), str(small_corpus), "--split", "valid",
                     "--batch-size", "1", "--json")
    assert json.loads(out1)["tokens"] == len(open_corpus(small_corpus).split("valid")) - 1


def test_eval_and_resume_refuse_another_vocabulary(capsys, tmp_path, small_corpus):
    ck = tmp_path / "ck.h5"
    assert run(capsys, "--backend", "numpy", "train", "--quiet", "--max-iters", "2", "--checkpoint", str(ck))[0] == 0
    code, _, err = run(capsys, "--backend", "numpy", "eval", str(ck), str(small_corpus))
    assert code == 2 and "vocabulary" in err and err.count("\n") == 1
    code, _, err = run(capsys, "--backend", "numpy", "train", str(small_corpus), "--checkpoint", str(ck), "--resume")
    assert code == 2 and "vocabulary" in err
    code, _, err = run(capsys, "--backend", "numpy", "eval", str(ck), str(small_corpus), "--split", "nope")
    assert code == 2


def test_resume_with_dropout_is_bit_identical(capsys, tmp_path, small_corpus):
    config = tmp_path / "m.toml"
    config.write_text('[[layers]]\ntype = "embedding"\nsize = 12\n\n[[layers]]\ntype = "dropout"\np = 0.5\n\n'
                      '[[layers]]\ntype = "lstm"\nhidden_size = 12\n\n[[layers]]\ntype = "dropout"\np = 0.5\n\n'
                      '[[layers]]\ntype = "tied_affine"\ntie_to = "embedding"\n\n[[layers]]\ntype = "softmax_loss"\n')
    common = ["--backend", "numpy", "train", str(small_corpus), "--quiet", "--model-config", str(config),
              "--batch-size", "4", "--time-size", "5", "--optimizer", "adam", "--lr", "0.01", "--eval-every", "7"]
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert run(capsys, *common, "--max-iters", "40", "--checkpoint", str(full))[0] == 0
    assert run(capsys, *common, "--max-iters", "17", "--checkpoint", str(part))[0] == 0
    assert run(capsys, *common, "--max-iters", "40", "--checkpoint", str(part), "--resume")[0] == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert "tied_affine.W" not in a.params and "tied_affine.b" in a.params  # tied: stored once, as the embedding's
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert "generator" not in a.meta  # the masks follow from the seed and the iteration


@pytest.mark.parametrize("model", ["rnnlm", "better-rnnlm"])
def test_chapter6_presets_train_from_the_cli(capsys, tmp_path, model):
    ck = tmp_path / "ck.h5"
    code, out, err = run(capsys, "--backend", "numpy", "train", "--quiet", "--model", model, "--wordvec-size", "16",
                         "--hidden-size", "16", "--max-iters", "20", "--checkpoint", str(ck))
    assert code == 0, err
    saved = load_checkpoint(ck)
    assert any(k.startswith("lstm") for k in saved.state)
    assert float(out.split("train_perplexity ")[1].split()[0]) < 418  # better than uniform over the demo's vocabulary
