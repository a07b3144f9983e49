"""Checkpoint format 2 as docs/checkpoint-format.md describes it: layout attributes, version and
dtype records, logits rebuilt without gpurnn, and version 1 files still loading and resuming."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpurnn.backend import get_backend
from gpurnn.cli import main
from gpurnn.contract import GENERIC_LAYOUT
from gpurnn.model import Model, preset_specs
from gpurnn.registry import Registry
from gpurnn.train.checkpoint import load_checkpoint
from gpurnn.train.job import model_from_checkpoint

from .exportkit import model_config, unfused_specs, unfused_twin
from .test_adaptive_softmax import demo_corpus_file

READER = Path(__file__).parent / "checkpoint_reader.py"
TIED_LSTM = """
[[layers]]
type = "embedding"
size = 8

[[layers]]
type = "dropout"

[[layers]]
type = "lstm"
hidden_size = 8

[[layers]]
type = "tied_affine"
tie_to = "embedding"

[[layers]]
type = "softmax_loss"
"""


def train(capsys, tmp_path, *model):
    ck = tmp_path / "ck.h5"
    code, _, err = main(["--backend", "numpy", "train", "--quiet", *model, "--max-iters", "20", "--optimizer", "adam",
                         "--lr", "0.01", "--checkpoint", str(ck)]), *capsys.readouterr()
    assert code == 0, err
    return ck


@pytest.mark.parametrize("model", ["simple-rnnlm", "rnnlm", "better-rnnlm", "tied-lstm", "adaptive"])
def test_logits_rebuilt_with_h5py_alone_match_gpurnn(capsys, tmp_path, model):
    """Logits, or for the adaptive softmax the log-distribution (`Model.log_prob`). The presets end in
    the fused output layer (tied in better-rnnlm), tied-lstm in tied_affine + softmax_loss."""
    if model == "tied-lstm":
        (tmp_path / "m.toml").write_text(TIED_LSTM)
        options = ["--model-config", str(tmp_path / "m.toml")]
    elif model == "adaptive":
        options = ["--model", "rnnlm", "--wordvec-size", "8", "--hidden-size", "8", "--output-layer", "adaptive",
                   "--cutoffs", "50,150", "--div-value", "2"]
    else:
        options = ["--model", model, "--wordvec-size", "8", "--hidden-size", "8"]
    ck = train(capsys, tmp_path, *options)
    ids = np.random.default_rng(0).integers(0, 418, (3, 6)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    block_gpurnn = "import sys; sys.modules['gpurnn'] = None; sys.argv = sys.argv[1:]; import runpy; "
    subprocess.run([sys.executable, "-c", block_gpurnn + "runpy.run_path(sys.argv[0], run_name='__main__')",
                    str(READER), str(ck), str(tmp_path / "ids.npy"), str(tmp_path / "out.npy")], check=True)
    outside = np.load(tmp_path / "out.npy")
    loaded = model_from_checkpoint(load_checkpoint(ck), get_backend("numpy"), Registry())
    gpurnn = loaded.log_prob(ids) if model == "adaptive" else unfused_twin(loaded).predict(ids)
    assert outside.shape == gpurnn.shape == (3, 6, 418)
    np.testing.assert_allclose(outside, gpurnn, rtol=1e-4, atol=1e-5)


def test_files_record_version_dtype_layouts_and_no_generator_state(capsys, tmp_path):
    (tmp_path / "m.toml").write_text(TIED_LSTM.replace('type = "lstm"', 'type = "gru"'))
    ck = train(capsys, tmp_path, "--model-config", str(tmp_path / "m.toml"))
    with h5py.File(ck, "r") as f:
        assert f.attrs["format_version"] == 2 and f.attrs["dtype"] == "float32"
        assert f.attrs["gpurnn_version"] == "0.1.0"
        assert "tied_affine.W" not in f["params"]
        wx = dict(f["params/gru.Wx"].attrs)
        assert wx == {"layer_type": "gru", "role": "x_t @ Wx", "axes": "input, 3*hidden", "gates": "r,z,n"}
        assert f["params/gru.bhn"].attrs["axes"] == "hidden"
        assert "tie_to" in f["params/tied_affine.b"].attrs["role"]
        meta = json.loads(f.attrs["meta"])
    assert set(meta["stream"]) == {"split", "tokens", "batch_size", "time_size", "iteration"}
    documented = (Path(__file__).parents[1] / "docs" / "checkpoint-format.md").read_text()
    for key in [*meta, *meta["config"], *meta["stream"], *meta["trainer"]]:
        assert f"`{key}`" in documented, key
    assert meta["layer_types"]["gru"]["plugin"] == "gpurnn_plugins.gru"
    assert "generator" not in meta
    assert meta["corpus"] == "demo"


def test_a_plugin_layer_without_a_layout_gets_the_generic_one(tmp_path):
    from .test_plugins import SCALED_TANH
    plugin = tmp_path / "st.py"
    plugin.write_text(SCALED_TANH)
    specs = [{"type": "embedding", "size": 3}, {"type": "scaled_tanh"}, {"type": "affine"}, {"type": "softmax_loss"}]
    layouts = Model(specs, 5, get_backend("numpy"), Registry(plugins=[str(plugin)])).param_layouts()
    assert layouts["scaled_tanh.scale"] == {"layer_type": "scaled_tanh", **GENERIC_LAYOUT.attrs()}
    assert layouts["affine.W"]["role"] == "x @ W + b"


def make_version_1(path):
    """Turn a version 2 file into what version 1 wrote: no layouts, version, dtype or checksum records,
    no layer_types, and NumPy's PCG64 state (128-bit integers as JSON numbers) for the dropout generator."""
    with h5py.File(path, "a") as f:
        for name in ("gpurnn_version", "dtype", "sha256"):
            del f.attrs[name]
        f.attrs["format_version"] = 1
        for dataset in f["params"].values():
            for key in list(dataset.attrs):
                del dataset.attrs[key]
        meta = json.loads(f.attrs["meta"])
        del meta["layer_types"]
        meta["generator"] = {"bit_generator": "PCG64", "state": {"state": 2 ** 127 + 1, "inc": 3},
                             "has_uint32": 0, "uinteger": 0}
        f.attrs["meta"] = json.dumps(meta)


def full_and_part(tmp_path):
    """(train command, full, part): a tied LSTM trained 30 iterations into `full`, 12 into `part`."""
    common = ["--backend", "numpy", "train", "--quiet", "--model-config", str(tmp_path / "m.toml"),
              "--optimizer", "adam", "--lr", "0.01"]
    (tmp_path / "m.toml").write_text(TIED_LSTM)
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert main([*common, "--max-iters", "30", "--checkpoint", str(full)]) == 0
    assert main([*common, "--max-iters", "12", "--checkpoint", str(part)]) == 0
    return common, full, part


def test_version_1_files_still_evaluate_and_resume_bit_identically(capsys, tmp_path):
    common, full, part = full_and_part(tmp_path)
    make_version_1(part)
    assert main(["--backend", "numpy", "generate", str(part), "--length", "3"]) == 0
    assert main([*common, "--max-iters", "30", "--checkpoint", str(part), "--resume"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


def make_before_tied_affine(path):
    """Turn a tied model's file into what gpurnn wrote before the `tied_affine` layer type: the tied
    output layer an `affine` with `tie_to`, its bias and optimizer arrays named after it."""
    with h5py.File(path, "a") as f:
        meta = json.loads(f.attrs["meta"])
        meta["specs"] = [{**spec, "type": "affine"} if spec["type"] == "tied_affine" else spec
                         for spec in meta["specs"]]
        meta["layer_types"]["affine"] = meta["layer_types"].pop("tied_affine")
        f.attrs["meta"] = json.dumps(meta)
        del f.attrs["sha256"]  # its digest covered the meta as it was
        for group in ("params", "optimizer"):
            for name in [n for n in f[group] if "tied_affine." in n]:
                f[group].move(name, name.replace("tied_affine.", "affine."))
        f["params/affine.b"].attrs["layer_type"] = "affine"


def test_files_from_before_tied_affine_evaluate_and_resume_bit_identically(capsys, tmp_path):
    _, full, part = full_and_part(tmp_path)
    make_before_tied_affine(part)
    old = load_checkpoint(part)
    assert {"type": "tied_affine", "tie_to": "embedding", "name": "affine"} in old.meta["specs"]
    assert "affine.b" in old.params
    assert main(["--backend", "numpy", "generate", str(part), "--length", "3"]) == 0
    resume = ["--backend", "numpy", "train", "--quiet", "--max-iters", "30", "--checkpoint", str(part), "--resume"]
    assert main(resume) == 0  # the model from the checkpoint: no model options
    a, b = load_checkpoint(full), load_checkpoint(part)
    np.testing.assert_array_equal(a.params.pop("tied_affine.b"), b.params.pop("affine.b"))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


@pytest.mark.parametrize("preset", ["rnnlm", "better-rnnlm"])
def test_checkpoints_of_the_presets_with_affine_and_softmax_loss_evaluate_generate_and_resume(capsys, tmp_path,
                                                                                              preset):
    """Before the presets ended in the fused output layer they ended in affine (better-rnnlm: tied_affine)
    + softmax_loss: such a checkpoint keeps its layers and names, evaluates, generates, and resumes bit
    for bit, also with the preset's options given again (which now mean the fused layer: the same numbers)."""
    sizes = {"wordvec_size": 8, "hidden_size": 8}
    (tmp_path / "m.toml").write_text(model_config(unfused_specs(preset_specs(preset, **sizes))))
    common = ["--backend", "numpy", "train", "--quiet", "--optimizer", "adam", "--lr", "0.01"]
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    for path, iters in ((full, "30"), (part, "12")):
        assert main([*common, "--model-config", str(tmp_path / "m.toml"), "--max-iters", iters,
                     "--checkpoint", str(path)]) == 0
    old = load_checkpoint(part)
    assert old.meta["specs"][-1] == {"type": "softmax_loss"}
    assert ({"affine.W", "affine.b"} if preset == "rnnlm" else {"tied_affine.b"}) <= set(old.params)
    capsys.readouterr()
    assert main(["--backend", "numpy", "eval", str(part), str(demo_corpus_file(tmp_path)), "--split", "train",
                 "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["perplexity"])
    assert main(["--backend", "numpy", "generate", str(part), "--length", "3"]) == 0
    options = ["--model", preset, "--wordvec-size", "8", "--hidden-size", "8"]
    assert main([*common, *options, "--max-iters", "30", "--checkpoint", str(part), "--resume"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert b.meta["specs"] == a.meta["specs"] and list(b.params) == list(a.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert main([*common, *options, "--num-layers", "3", "--max-iters", "31", "--checkpoint", str(part), "--resume"]) == 2
    assert "contradict the checkpoint's model" in capsys.readouterr().err
