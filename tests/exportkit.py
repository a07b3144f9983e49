"""Shared by the export tests: a tiny corpus, and checkpoints of each model kind whose every parameter
(biases included) holds random values, so that a misplaced gate block or bias cannot go unseen."""

import json
from pathlib import Path

import numpy as np

from gpurnn.backend import get_backend
from gpurnn.data import prepare_corpus
from gpurnn.model import Model
from gpurnn.registry import Registry
from gpurnn.train.checkpoint import load_checkpoint, save_checkpoint
from gpurnn.train.job import model_from_checkpoint

from .faultkit import cli

WORDS = "the cat dog sat ran on under a mat tree house and then slept ate".split()
EXAMPLE_PLUGIN = ["--plugin", str(Path(__file__).parent / "plugin_pkg" / "gpurnn_example_layers.py")]
EMBEDDING, AFFINE, LOSS = {"type": "embedding", "size": 8}, {"type": "affine"}, {"type": "softmax_loss"}
# Each model kind as `gpurnn train` options or as the layer specs of a model config; the keys are
# what the tests are parametrized over.
MODELS = {
    "simple-rnnlm": ["--model", "simple-rnnlm", "--wordvec-size", 8, "--hidden-size", 12],
    "rnnlm": ["--model", "rnnlm", "--wordvec-size", 8, "--hidden-size", 12],
    "better-rnnlm": ["--model", "better-rnnlm", "--wordvec-size", 12, "--hidden-size", 12],  # 2 layers, tied
    "gru": [EMBEDDING, {"type": "gru", "hidden_size": 12}, {"type": "gru", "hidden_size": 12}, AFFINE, LOSS],
}


# Models of the example plugin's layer types (relu_rnn, residual), which need EXAMPLE_PLUGIN loaded.
PLUGIN_MODELS = {"relu": [EMBEDDING, {"type": "relu_rnn", "hidden_size": 12}, AFFINE, LOSS],
                 "plugin": [EMBEDDING, {"type": "relu_rnn", "hidden_size": 12}, {"type": "residual"}, AFFINE, LOSS]}


def all_checkpoints(folder):
    """(a tiny corpus, {kind: a random checkpoint}) for every kind of MODELS and PLUGIN_MODELS."""
    corpus = tiny_corpus(folder)
    cks = {kind: random_checkpoint(folder, kind, corpus, options) for kind, options in MODELS.items()}
    cks.update({kind: random_checkpoint(folder, kind, corpus, options, plugin=EXAMPLE_PLUGIN)
                for kind, options in PLUGIN_MODELS.items()})
    return corpus, cks


def plugins_of(kind):
    """The --plugin options a model of `kind` needs."""
    return EXAMPLE_PLUGIN if kind in PLUGIN_MODELS else []


def tiny_corpus(folder):
    """A prepared word corpus of a 17-token vocabulary (15 words, <unk>, <eos>), train/valid/test."""
    rng = np.random.default_rng(7)
    for name, lines in (("train", 60), ("valid", 12), ("test", 12)):
        text = "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(lines)) + "\n"
        (folder / f"{name}.txt").write_text(text)
    corpus = folder / "tiny.h5"
    prepare_corpus(folder / "train.txt", corpus, valid=folder / "valid.txt", test=folder / "test.txt")
    return corpus


def model_config(specs):
    """The TOML text of a model config holding `specs`, a list of layer specs."""
    return "\n".join("[[layers]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in spec.items())
                     for spec in specs)


def random_checkpoint(folder, kind, corpus, options, plugin=()):
    """A checkpoint of model `kind` (`options`: train options, or layer specs) after 2 iterations, its
    parameters then replaced by N(0, 0.5) draws."""
    if isinstance(options[0], dict):
        config = folder / f"{kind}.toml"
        config.write_text(model_config(options))
        options = ["--model-config", config]
    ck = folder / f"{kind}.h5"
    code, _, err = cli(*plugin, "train", corpus, *options, "--max-iters", 2, "--batch-size", 2, "--time-size", 5,
                       "--quiet", "--checkpoint", ck)
    assert code == 0, err
    saved = load_checkpoint(ck)
    rng = np.random.default_rng(sum(map(ord, kind)))
    params = {name: rng.normal(0, 0.5, value.shape).astype(np.float32) for name, value in saved.params.items()}
    save_checkpoint(ck, params=params, optimizer_arrays={}, state={}, vocab=saved.vocab, meta=saved.meta,
                    layouts=saved.layouts)
    return ck


def gpurnn_model(ck, kind=None):
    """The model of checkpoint `ck` (of model `kind`) on NumPy (float32), in evaluation mode."""
    registry = Registry(plugins=plugins_of(kind)[1:])
    return model_from_checkpoint(load_checkpoint(ck), get_backend("numpy"), registry)


def unfused_twin(model, registry=None):
    """A model whose `predict` gives `model`'s logits: where `model` ends in the fused output layer
    (whose `predict` gives the last features), the affine (or tied_affine) + softmax_loss model holding
    its parameters (its flat buffer's layout is the same); any other model itself."""
    if model.specs[-1]["type"] != "affine_softmax_loss":
        return model
    twin = Model(unfused_specs(model.specs), model.vocab_size, model.backend, registry or Registry()).eval()
    twin.flat_params[...] = model.flat_params
    return twin


def unfused_specs(specs):
    """`specs` (ending in the fused output layer, as the presets do) with affine (tied: tied_affine) +
    softmax_loss in its place: the layers the presets had before they used the fused one."""
    fused = specs[-1]
    affine = {"type": "tied_affine", "tie_to": fused["tie_to"]} if "tie_to" in fused else {"type": "affine"}
    return [*specs[:-1], affine, {"type": "softmax_loss"}]


def relative_difference(a, b):
    """max |a - b| over max |b|: the error relative to the array's scale."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
