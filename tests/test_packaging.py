"""`pip install .` (not editable) into a fresh virtual environment, then the main job runs.

Marked `packaging`: it builds a wheel with the declared build requirements and installs the
dependencies from PyPI (about a minute on a clean machine). `pytest -m "not packaging"` leaves it out.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache")


def check(args, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPURNN_")}  # the defaults, as on a fresh machine
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.packaging
def test_pip_install_into_a_fresh_venv_then_train(tmp_path):
    source, venv, work = tmp_path / "source", tmp_path / "venv", tmp_path / "work"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    work.mkdir()
    check([sys.executable, "-m", "venv", venv], tmp_path)
    check([venv / "bin/python", "-m", "pip", "install", "-q", source], tmp_path)
    metadata = json.loads(check([venv / "bin/python", "-c",
                                 "import importlib.metadata as m, json, gpurnn; d = m.metadata('gpurnn'); "
                                 "print(json.dumps({'file': gpurnn.__file__, 'license': d['License-Expression'], "
                                 "'python': d['Requires-Python'], 'files': d.get_all('License-File')}))"], work))
    assert str(venv) in metadata["file"]  # the installed copy, not the source tree
    assert metadata["license"] == "MIT" and metadata["files"] == ["LICENSE"]
    assert metadata["python"] == ">=3.11"
    out = check([venv / "bin/gpurnn", "--backend", "numpy", "train", "--max-iters", "5"], work)
    checkpoint = work / out.split("checkpoint: ")[1].split("\n")[0]
    assert checkpoint.is_file() and checkpoint.parent.parent == work / "runs"
    assert len(check([venv / "bin/gpurnn", "generate", checkpoint, "--length", "5"], work).split()) >= 5
    report = json.loads(check([venv / "bin/gpurnn", "info", "--json"], work))
    assert report["backends"]["numpy"] == "usable" and report["tqdm"]
