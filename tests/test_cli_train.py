"""The train command as users drive it: run folders, run records, the plot, one configuration
(file, environment, command line), preset options, grouped help, and generate's sampling options."""

import json
from pathlib import Path

import pytest

from gpurnn.train.checkpoint import load_checkpoint
from gpurnn.errors import GpurnnError
from gpurnn.train.metrics import MetricsLog, read_records, run_figure, run_records

from .conftest import with_this_python
from .test_train import in_tmp_path, run  # noqa: F401  (a fixture)

NUMPY_TRAIN = ["--backend", "numpy", "train", "--quiet"]


def printed_path(out, label):
    return Path(next(line for line in out.splitlines() if line.startswith(label + ": ")).split(": ", 1)[1])


def test_the_main_job_leaves_a_checkpoint_that_eval_and_generate_accept(capsys, small_corpus):
    code, out, err = run(capsys, *NUMPY_TRAIN, str(small_corpus), "--max-iters", "12", "--eval-every", "3",
                         "--batch-size", "4", "--time-size", "5", "--keep-best", "--lr", "2")
    assert code == 0, err
    checkpoint, best = printed_path(out, "checkpoint"), printed_path(out, "best checkpoint")
    assert checkpoint.parent.parent == Path("runs") and checkpoint.name == "checkpoint.h5"
    assert best == checkpoint.with_name("checkpoint.best.h5")
    assert printed_path(out, "metrics") == checkpoint.with_name("checkpoint.metrics.jsonl")
    steps = [r for r in read_records(printed_path(out, "metrics")) if "valid_perplexity" in r]
    best_step = min(steps, key=lambda r: r["valid_perplexity"])
    assert load_checkpoint(best).meta["trainer"]["iteration"] == best_step["iteration"]
    assert load_checkpoint(checkpoint).meta["trainer"]["iteration"] == 12
    code, out, err = run(capsys, "eval", str(checkpoint), str(small_corpus), "--backend", "numpy", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] > 1
    code, out, _ = run(capsys, "generate", str(best), "--length", "5", "--backend", "numpy")
    assert code == 0 and len(out.split()) >= 5


def test_keep_best_needs_a_validation_split(capsys):
    code, _, err = run(capsys, *NUMPY_TRAIN, "--max-iters", "2", "--keep-best")
    assert code == 2 and "--keep-best needs a corpus with a validation split" in err
    assert not any(Path("runs").iterdir())  # the run folder made for it is gone again


def test_a_run_record_starts_with_a_header_and_a_resume_joins_its_run(capsys):
    ck = Path("ck.h5")
    model = ["--model", "rnnlm", "--hidden-size", "8", "--wordvec-size", "8"]
    base = [*NUMPY_TRAIN, "--checkpoint", str(ck), "--log-every", "2", *model]
    assert run(capsys, *base, "--max-iters", "4")[0] == 0
    metrics = Path("ck.metrics.jsonl")
    header, *steps = read_records(metrics)
    assert header["kind"] == "header" and header["run_id"] and header["time"]
    assert header["gpurnn"] and header["backend"] == "numpy" and header["device"]
    assert header["config"]["max_iters"] == 4 and header["config"]["batch_size"] == 10
    assert header["specs"][1] == {"type": "lstm", "hidden_size": 8}
    assert [s["iteration"] for s in steps] == [2, 4] and {s["run_id"] for s in steps} == {header["run_id"]}
    assert load_checkpoint(ck).meta["run_id"] == header["run_id"]

    code, _, err = run(capsys, *base, "--max-iters", "4")  # a new run never appends to another's file
    assert code == 2 and "already holds a run: pass --resume" in err and err.count("\n") == 1
    assert run(capsys, *base[:-len(model)], "--max-iters", "8", "--resume")[0] == 0  # the model from the checkpoint
    records = read_records(metrics)
    assert records[3]["kind"] == "header" and records[3]["resumed_at"] == 4
    assert {r["run_id"] for r in records} == {header["run_id"]}
    first, steps = run_records(records, header["run_id"])
    assert first == header and [s["iteration"] for s in steps] == [2, 4, 6, 8]
    assert records[3]["model_name"] == header["model_name"] == "rnnlm"


def test_a_run_that_left_only_its_header_gives_way_unless_its_checkpoint_is_there(tmp_path):
    path, ck = tmp_path / "ck.metrics.jsonl", tmp_path / "ck.h5"
    MetricsLog(path, {"run_id": "a"})  # stopped before its first step
    MetricsLog(path, {"run_id": "b"}, checkpoint=ck)
    assert [r["run_id"] for r in read_records(path)] == ["b"]
    ck.write_bytes(b"a checkpoint of run b")
    with pytest.raises(GpurnnError, match="already holds a run"):
        MetricsLog(path, {"run_id": "c"}, checkpoint=ck)


def record(run_id, iteration, lr=1.0, **extra):
    return {"kind": "step", "run_id": run_id, "iteration": iteration, "epoch": iteration / 10, "lr": lr,
            "train_perplexity": 100.0 / iteration, "tokens_per_second": 1.0, **extra}


def test_the_plot_draws_the_current_run_only():
    pytest.importorskip("matplotlib")
    header = {"kind": "header", "run_id": "b", "model_name": "rnnlm", "corpus": "ptb.h5"}
    records = [{"kind": "header", "run_id": "a", "model_name": "x", "corpus": "y"},
               *[record("a", i) for i in (1, 2, 3)],
               header, record("b", 1), record("b", 2, valid_perplexity=50.0), record("b", 3, lr=0.5),
               record("b", 4, lr=0.5),  # written after the last checkpoint, then stopped
               {**header, "resumed_at": 3}, record("b", 4, lr=0.5, valid_perplexity=40.0), record("b", 5, lr=0.5)]
    first, steps = run_records(records, "b")
    assert first == header and [s["iteration"] for s in steps] == [1, 2, 3, 4, 5]
    fig = run_figure(first, steps)
    ax = fig.axes[0]
    train, valid = ax.get_lines()[:2]
    assert list(train.get_xdata()) == [1, 2, 3, 4, 5]
    assert list(valid.get_xdata()) == [2, 4] and list(valid.get_ydata()) == [50.0, 40.0]
    marks = [list(line.get_xdata()) for line in ax.get_lines()[2:]]
    assert marks == [[2, 2]]  # the one lr change: after the validation at iteration 2
    assert "rnnlm on ptb.h5" in ax.get_title()
    assert any(other.get_xlabel() == "epoch" for other in ax.child_axes)
    with pytest.raises(Exception, match="no run 'c'"):
        run_records(records, "c")


def test_plot_option_draws_the_run(capsys):
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, *NUMPY_TRAIN, "--max-iters", "6", "--log-every", "2", "--plot", "p.png")
    assert code == 0, err
    assert Path("p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def saved_config(ck="ck.h5"):
    meta = load_checkpoint(ck).meta
    return meta["config"], meta["specs"]


def test_a_config_file_holds_train_options_and_the_command_line_wins(capsys):
    Path("run.toml").write_text('[train]\nmax-iters = 3\nhidden_size = 8\nwordvec-size = 8\noptimizer = "adam"\n'
                                'lr = 0.01\ncheckpoint = "ck.h5"\nquiet = true\n')
    assert run(capsys, "--backend", "numpy", "train", "--config", "run.toml")[0] == 0
    config, specs = saved_config()
    assert config["max_iters"] == 3 and config["optimizer"] == "adam" and config["lr"] == 0.01
    assert specs[1]["hidden_size"] == 8
    Path("ck.metrics.jsonl").unlink()
    assert run(capsys, "--backend", "numpy", "train", "--config", "run.toml", "--max-iters", "5")[0] == 0
    assert saved_config()[0]["max_iters"] == 5


def test_a_config_file_may_name_the_corpus_and_the_runtime_options(capsys, small_corpus):
    Path("run.toml").write_text(f'corpus = "{small_corpus}"\nbackend = "numpy"\nplugin = []\nmax_iters = 2\n'
                                'checkpoint = "ck.h5"\nbatch_size = 4\n')
    code, _, err = run(capsys, "train", "--config", "run.toml")
    assert code == 0, err
    assert load_checkpoint("ck.h5").meta["corpus"] == str(small_corpus)


@pytest.mark.parametrize("text, message", [
    ("max_iters = 3\nwarmup = 10\n", "unknown option(s) warmup"),
    ("max_iters = 'many'\n", "'many' is not a valid integer"),
    ("max_iters = \n", "is not valid TOML"),
])
def test_a_bad_config_file_is_a_usage_error(capsys, text, message):
    Path("run.toml").write_text(text)
    code, _, err = run(capsys, "--backend", "numpy", "train", "--config", "run.toml")
    first, hint = err.splitlines()
    assert code == 2 and message in first and hint == "Try 'gpurnn train -h' for help."


def test_environment_variables_set_every_option(capsys, monkeypatch):
    Path("run.toml").write_text("max_iters = 3\n")
    monkeypatch.setenv("GPURNN_TRAIN_MAX_ITERS", "2")
    monkeypatch.setenv("GPURNN_TRAIN_HIDDEN_SIZE", "6")
    monkeypatch.setenv("GPURNN_TRAIN_CHECKPOINT", "ck.h5")
    monkeypatch.setenv("GPURNN_TRAIN_QUIET", "1")
    monkeypatch.setenv("GPURNN_BACKEND", "numpy")
    assert run(capsys, "train", "--config", "run.toml")[0] == 0  # the environment wins over the file
    config, specs = saved_config()
    assert config["max_iters"] == 2 and specs[1]["hidden_size"] == 6
    assert load_checkpoint("ck.h5").meta["backend"] == "numpy"
    Path("ck.metrics.jsonl").unlink()
    assert run(capsys, "train", "--max-iters", "4")[0] == 0  # the command line wins over the environment
    assert saved_config()[0]["max_iters"] == 4
    monkeypatch.setenv("GPURNN_TRAIN_EPOCHS", "0")
    code, _, err = run(capsys, "train")
    assert code == 2 and "Invalid value for '--epochs'" in err


def test_preset_options_build_the_model(capsys):
    args = [*NUMPY_TRAIN, "--model", "rnnlm", "--num-layers", "2", "--dropout", "0.2", "--tie-weights",
            "--wordvec-size", "8", "--hidden-size", "8", "--max-iters", "2", "--checkpoint", "ck.h5"]
    assert run(capsys, *args)[0] == 0
    assert [s["type"] for s in saved_config()[1]] == ["embedding", "dropout", "lstm", "dropout", "lstm", "dropout",
                                                      "affine_softmax_loss"]
    assert saved_config()[1][1]["p"] == 0.2 and saved_config()[1][-1]["tie_to"] == "embedding"
    assert run(capsys, *NUMPY_TRAIN, "--model", "better-rnnlm", "--no-tie-weights", "--wordvec-size", "8",
               "--hidden-size", "6", "--max-iters", "1", "--checkpoint", "b.h5")[0] == 0
    assert saved_config("b.h5")[1][-1] == {"type": "affine_softmax_loss"}


@pytest.mark.parametrize("extra, names", [(["--hidden-size", "8"], "--hidden-size applies"),
                                          (["--dropout", "0.1", "--model", "rnnlm"], "--dropout, --model apply")])
def test_preset_options_with_a_model_config_are_refused(capsys, extra, names):
    Path("m.toml").write_text('[[layers]]\ntype = "embedding"\nsize = 4\n[[layers]]\ntype = "softmax_loss"\n')
    code, _, err = run(capsys, *NUMPY_TRAIN, "--model-config", "m.toml", *extra)
    first, hint = err.splitlines()
    assert code == 2 and f"{names} only to a preset" in first and hint.startswith("Try 'gpurnn train -h'")


def test_help_is_grouped_with_defaults_and_lists_the_presets(capsys):
    code, out, _ = run(capsys, "train", "-h")
    assert code == 0
    headings = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["Model:", "Optimisation:", "Schedule:", "Output:", "Run:"]
    assert "--model [simple-rnnlm|rnnlm|better-rnnlm]" in out and "[default: simple-rnnlm]" in out
    assert "[default: 0.1; x>0]" in out and "(20; demo 10)" in out
    code, out, _ = run(capsys, "generate", "-h")
    assert "--temperature" in out and "greedy" in out and "[default: 1.0; x>=0]" in out


@pytest.fixture
def checkpoint(capsys):
    assert run(capsys, *NUMPY_TRAIN, "--max-iters", "30", "--checkpoint", "ck.h5")[0] == 0
    return "ck.h5"


def test_generate_several_samples_to_a_file(capsys, checkpoint):
    code, out, err = run(capsys, "--backend", "numpy", "generate", checkpoint, "--num-samples", "3",
                         "--max-tokens", "15", "--seed", "3", "--output", "samples.txt")
    assert code == 0 and out == "" and "3 sample(s) written to samples.txt" in err
    text = Path("samples.txt").read_text()
    assert text.endswith("\n") and len(text.rstrip("\n").split("\n\n")) >= 3
    assert run(capsys, "--backend", "numpy", "generate", checkpoint, "--num-samples", "3", "--max-tokens", "15",
               "--seed", "3")[1] == text  # the same as stdout would show
    code, _, err = run(capsys, "--backend", "numpy", "generate", checkpoint, "--output", "no/such/dir/s.txt")
    assert code == 2 and "cannot write no/such/dir/s.txt" in err and err.count("\n") == 1


def test_generate_greedy_and_stop_at_eos(capsys, checkpoint):
    greedy = run(capsys, "--backend", "numpy", "generate", checkpoint, "--greedy", "--length", "12", "--seed", "1")[1]
    assert greedy == run(capsys, "--backend", "numpy", "generate", checkpoint, "--temperature", "0",
                         "--length", "12", "--seed", "2")[1]
    code, out, _ = run(capsys, "--backend", "numpy", "generate", checkpoint, "--num-samples", "8",
                       "--length", "200", "--stop-at-eos", "--prompt", "the")
    samples = out.rstrip("\n").split("\n\n")
    assert code == 0 and len(samples) == 8
    assert all("\n" not in s and s.startswith("the") for s in samples)  # each ends at its first <eos>
    assert min(len(s.split()) for s in samples) < 200


@pytest.mark.parametrize("script, args", [("train_ptb.sh", ["rnn"]), ("ptb_adaptive.sh", [])])
def test_the_ptb_scripts_say_where_ptb_comes_from(tmp_path, script, args):
    import os
    import subprocess
    script = Path(__file__).resolve().parents[1] / "scripts" / script
    env = with_this_python({**os.environ, "GPURNN_PTB_DIR": str(tmp_path / "nowhere")})
    done = subprocess.run(["bash", str(script), *args, str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"no {tmp_path / 'nowhere'}/ptb.train.txt: set GPURNN_PTB_DIR" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_train_options_are_the_configuration_fields_with_their_defaults_and_help():
    from dataclasses import fields

    import click

    from gpurnn.cli import train
    from gpurnn.config import CONFIGS, PRESETS, command_options

    options = {p.name: p for p in train.params if isinstance(p, click.Option)}
    runtime = {"config", "backend", "plugins", "debug", "help"}
    fields_with_options = {f.name for config in CONFIGS for f in fields(config) if f.metadata["setting"].section}
    assert set(options) - runtime == fields_with_options == {opt.name for opt in command_options()}
    for opt in command_options():
        param = options[opt.name]
        assert param.help == opt.setting.help and param.default == opt.default
        assert param.show_default == (opt.shown if opt.shown is not None else None)
        assert param.section == opt.setting.section
    assert list(options["model"].type.choices) == list(PRESETS)
    assert options["hidden_size"].show_default == "the preset's: 100, better-rnnlm 650"
    assert options["batch_size"].show_default == "20; demo 10"


@pytest.mark.parametrize("options, message", [
    ({"lr": float("nan")}, "--lr must be a finite number > 0, not nan"),
    ({"lr_decay": 1.5}, "--lr-decay must be at most 1, not 1.5"),
    ({"batch_size": True}, "--batch-size must be a positive integer, not True"),
    ({"optimizer": "rmsprop"}, "--optimizer must be one of sgd, adam, not 'rmsprop'"),
    ({"warmup": 3}, "unknown training option(s) warmup"),
])
def test_a_train_config_refuses_values_its_fields_exclude(options, message):
    from gpurnn.config import TrainConfig

    with pytest.raises(GpurnnError) as caught:
        TrainConfig.from_options(options)
    assert str(caught.value) == message
