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


@pytest.mark.parametrize("args, message", [
    (["--plugin", "no_such_plugin_module", "plugins"], "plugin 'no_such_plugin_module' failed to import"),
    (["--backend", "gpu", "info"], "Invalid value for '--backend'"),
    (["nosuchcommand"], "No such command"),
])
def test_errors_are_one_line_exit_2(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cupy_unusable_from_the_cli(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    code, _, err = run(capsys, "--backend", "cupy", "info")
    assert code == 2 and "--backend numpy" in err and err.count("\n") == 1


def test_python_dash_m_and_no_traceback():
    ok = subprocess.run([sys.executable, "-m", "gpurnn", "plugins"], capture_output=True, text=True)
    assert ok.returncode == 0 and "softmax_loss" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gpurnn", "--plugin", "nope_nope", "plugins"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("gpurnn: error:")
