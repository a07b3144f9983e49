"""A third party's plugin distribution (tests/plugin_pkg, the plugin guide's example) end to end:
installed, listed, trained, saved, evaluated, sampled, checked by the kit; and what a checkpoint
says when the plugin that made it is missing."""

import json
import shutil
import sys
import tomllib
from pathlib import Path

import h5py
import pytest

from gpurnn.cli import main
from gpurnn.registry import Registry
from gpurnn.testing import check_layer
from gpurnn.train.checkpoint import load_checkpoint

PACKAGE = Path(__file__).parent / "plugin_pkg"
MODULE = "gpurnn_example_layers"
MODEL = """
[[layers]]
type = "embedding"
size = 16

[[layers]]
type = "relu_rnn"
hidden_size = 16

[[layers]]
type = "residual"

[[layers]]
type = "affine"

[[layers]]
type = "softmax_loss"
"""


def run(capsys, *args):
    code = main(["--backend", "numpy", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def install(package, site):
    """Install `package` into the folder `site` as a wheel installer lays it out: the module beside a
    .dist-info folder holding METADATA and entry_points.txt (all that importlib.metadata reads)."""
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    shutil.copy(package / f"{MODULE}.py", site)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
        for group, points in project["entry-points"].items()))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The example distribution installed on sys.path for this test; uninstall() takes it away."""
    site = tmp_path / "site"
    site.mkdir()
    install(PACKAGE, site)
    monkeypatch.syspath_prepend(str(site))

    def uninstall():
        sys.path.remove(str(site))
        sys.modules.pop(MODULE, None)

    yield uninstall
    sys.modules.pop(MODULE, None)


def train(capsys, tmp_path, corpus, *plugin):
    config, ck, metrics = tmp_path / "m.toml", tmp_path / "ck.h5", tmp_path / "m.jsonl"
    config.write_text(MODEL)
    code, _, err = run(capsys, *plugin, "train", corpus, "--quiet", "--model-config", config, "--batch-size", 4,
                       "--time-size", 5, "--optimizer", "adam", "--lr", 0.01, "--max-iters", 60, "--log-every", 10,
                       "--checkpoint", ck, "--metrics", metrics)
    assert code == 0, err
    return ck, [json.loads(line)["train_perplexity"] for line in open(metrics)]


def test_an_installed_plugin_distribution_end_to_end(installed, capsys, tmp_path, small_corpus):
    code, out, _ = run(capsys, "plugins", "--json")
    rows = {row["type"]: row for row in json.loads(out)}
    assert rows["relu_rnn"]["plugin"] == MODULE and rows["residual"]["plugin"] == MODULE
    assert (rows["relu_rnn"]["distribution"], rows["relu_rnn"]["version"]) == ("gpurnn-example-layers", "0.1.0")
    assert rows["relu_rnn"]["description"].startswith("Elman RNN with ReLU")

    ck, perplexities = train(capsys, tmp_path, small_corpus)
    assert perplexities[-1] < perplexities[0] / 2
    saved = load_checkpoint(ck)
    assert saved.meta["layer_types"]["relu_rnn"] == {
        "plugin": MODULE, "distribution": "gpurnn-example-layers", "version": "0.1.0"}
    assert saved.meta["layer_types"]["affine"]["distribution"] == "gpurnn"
    with h5py.File(ck, "r") as f:
        assert f["params/relu_rnn.Wh"].attrs["axes"] == "hidden, hidden"
        assert f["params/residual.W"].attrs["role"] == "y = x + tanh(x @ W + b)"

    code, out, err = run(capsys, "eval", ck, small_corpus, "--json")
    assert code == 0, err
    assert 1 < json.loads(out)["perplexity"] < perplexities[0]
    code, out, _ = run(capsys, "generate", ck, "--prompt", "the", "--length", 5, "--seed", 1)
    assert code == 0 and out.startswith("the ") and len(out.split()) >= 6
    for layer_type in ("relu_rnn", "residual"):
        assert check_layer(layer_type, registry=Registry())["grad_errors"]

    installed()
    for args in (["eval", ck, small_corpus], ["generate", ck],
                 ["train", small_corpus, "--checkpoint", ck, "--resume", "--max-iters", 70]):
        code, _, err = run(capsys, *args)
        assert code == 2 and err.count("\n") == 1, err
        assert ("unknown layer type 'relu_rnn': it comes from the distribution 'gpurnn-example-layers' "
                "(version 0.1.0 made this file), which is not installed here; pip install gpurnn-example-layers") in err


def test_a_plugin_loaded_by_path_is_named_when_it_is_missing(capsys, tmp_path, small_corpus):
    plugin = tmp_path / "my_layers.py"
    shutil.copy(PACKAGE / f"{MODULE}.py", plugin)
    ck, _ = train(capsys, tmp_path, small_corpus, "--plugin", plugin)
    assert load_checkpoint(ck).meta["layer_types"]["residual"] == {
        "plugin": str(plugin), "distribution": None, "version": None}
    code, _, err = run(capsys, "eval", ck, small_corpus)
    assert code == 2 and f"it came from the plugin '{plugin}', which is not loaded; pass --plugin {plugin}" in err
    assert run(capsys, "--plugin", plugin, "eval", ck, small_corpus)[0] == 0


def test_the_plugin_guide_shows_the_example_package_verbatim():
    guide = (Path(__file__).parents[1] / "docs" / "plugin-guide.md").read_text()
    for name in (f"{MODULE}.py", "tests/test_example_layers.py", "pyproject.toml"):
        assert (PACKAGE / name).read_text() in guide, name
