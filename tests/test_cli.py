"""The command line: info and plugins (text and JSON), and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from gpurnn.cli import main

from .test_plugins import SCALED_TANH


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json(capsys):
    code, out, _ = run(capsys, "--backend", "numpy", "info", "--json")
    report = json.loads(out)
    assert code == 0 and report["backend"] == "numpy" and report["gpurnn"] and report["why"]


def test_info_text(capsys):
    code, out, _ = run(capsys, "--backend", "numpy", "info")
    assert code == 0 and "backend: numpy" in out


def test_plugins_lists_builtins_and_a_user_plugin(capsys, tmp_path):
    path = tmp_path / "st.py"
    path.write_text(SCALED_TANH)
    code, out, _ = run(capsys, "--plugin", str(path), "plugins", "--json")
    rows = {r["type"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["rnn"]["plugin"] == "gpurnn_plugins.rnn"
    assert rows["scaled_tanh"]["plugin"] == str(path)
    code, out, _ = run(capsys, "--plugin", str(path), "plugins")
    assert "scaled_tanh" in out and "Elman" in out


def test_errors_are_one_line_exit_2(capsys):
    code, out, err = run(capsys, "--plugin", "no_such_plugin_module", "plugins")
    assert code == 2
    assert "plugin 'no_such_plugin_module' failed to import" in err and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message, hint", [
    (["--backend", "gpu", "info"], "Invalid value for '--backend'", "Try 'gpurnn -h' for help."),
    (["nosuchcommand"], "No such command", "Try 'gpurnn -h' for help."),
    (["train", "--bogus"], "No such option '--bogus'", "Try 'gpurnn train -h' for help."),
    (["generate", "ck.h5", "--temperature", "-1"], "Invalid value for '--temperature'",
     "Try 'gpurnn generate -h' for help."),
])
def test_usage_errors_are_one_line_and_the_help_hint_exit_2(capsys, args, message, hint):
    code, out, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err
    first, second = err.splitlines()
    assert first.startswith("gpurnn: error: ") and message in first and second == hint


def test_cupy_unusable_from_the_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "cupy", None)
    code, _, err = run(capsys, "--backend", "cupy", "train", "--max-iters", "1")
    assert code == 2 and "--backend numpy" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no empty run folder left behind


@pytest.mark.parametrize("how", ["option", "environment"])
def test_info_reports_every_backend_and_never_fails(capsys, monkeypatch, how):
    monkeypatch.setitem(sys.modules, "cupy", None)
    if how == "environment":
        monkeypatch.setenv("GPURNN_BACKEND", "cupy")
        args = ["info", "--json"]
    else:
        args = ["--backend", "cupy", "info", "--json"]
    code, out, _ = run(capsys, *args)
    report = json.loads(out)
    assert code == 0
    assert report["backends"]["numpy"] == "usable"
    assert report["backends"]["cupy"].startswith("unusable: CuPy is not installed")
    assert report["backend"] is None and "the cupy backend is unusable" in report["why"]
    code, out, _ = run(capsys, *args[:-1])
    assert code == 0 and "backend cupy: unusable" in out


def test_backend_and_plugin_on_every_subcommand(capsys, tmp_path):
    path = tmp_path / "st.py"
    path.write_text(SCALED_TANH)
    code, out, _ = run(capsys, "plugins", "--plugin", str(path), "--json")
    assert code == 0 and "scaled_tanh" in {r["type"] for r in json.loads(out)}
    code, out, _ = run(capsys, "--backend", "cupy", "info", "--backend", "numpy", "--json")
    assert code == 0 and json.loads(out)["backend"] == "numpy"  # the subcommand's wins
    for command in ("prepare", "corpus-info", "train", "eval", "generate", "strip"):
        code, out, _ = run(capsys, command, "-h")
        assert code == 0 and "--backend [numpy|cupy|auto]" in out and "--plugin MODULE" in out


def test_python_dash_m_and_no_traceback():
    ok = subprocess.run([sys.executable, "-m", "gpurnn", "plugins"], capture_output=True, text=True)
    assert ok.returncode == 0 and "softmax_loss" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gpurnn", "--plugin", "nope_nope", "plugins"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("gpurnn: error:")
