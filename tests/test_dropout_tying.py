"""Dropout (training vs evaluation, counter-based masks) and weight tying."""

import numpy as np
import pytest

from gpurnn.errors import SpecError
from gpurnn.layers import LayerContext
from gpurnn.model import Model, preset_specs
from gpurnn.registry import Registry
from gpurnn.testing import ConformanceError, check_layer, check_model_gradients

V = 11


def blocks(rng, count=2, B=2, T=3):
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(count)]


def dropout(registry, backend, p, seed=0, size=50, step=0, index=1):
    ctx = LayerContext(backend, np.random.default_rng(0), size, V, seed=seed,
                       step=np.array([step], np.uint32), index=index)
    return registry.build_layer({"type": "dropout", "p": p}, ctx)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_dropout_passes_the_kit_in_training_mode(registry, p):
    report = check_layer("dropout", {"p": p}, registry=registry)
    assert set(report["grad_errors"]) == {"<input>"} and report["grad_errors"]["<input>"] < 1e-5


def test_the_kit_catches_a_dropout_whose_backward_forgets_the_mask(tmp_path):
    plugin = tmp_path / "bad_dropout.py"
    plugin.write_text(
        "from gpurnn.hookspecs import hookimpl\n"
        "from gpurnn_plugins.dropout import TimeDropout\n"
        "class Bad(TimeDropout):\n"
        "    '''Dropout with a backward that ignores the mask.'''\n"
        "    def backward(self, dout):\n"
        "        return dout\n"
        "@hookimpl\n"
        "def gpurnn_layer_types():\n"
        "    return {'bad_dropout': Bad}\n")
    with pytest.raises(ConformanceError, match="'<input>'"):
        check_layer("bad_dropout", {"p": 0.5}, registry=Registry(plugins=[str(plugin)]))


def test_dropout_is_identity_in_evaluation(registry, np64, rng):
    layer = dropout(registry, np64, 0.5)
    layer.training = False
    x, dout = rng.standard_normal((4, 3, 50)), rng.standard_normal((4, 3, 50))
    np.testing.assert_array_equal(layer.forward(x), x)
    np.testing.assert_array_equal(layer.backward(dout), dout)


def test_dropout_keeps_one_minus_p_scaled_by_its_inverse(registry, np64):
    p = 0.3
    layer = dropout(registry, np64, p)
    out = layer.forward(np.ones((40, 50, 50)))
    kept = out != 0
    assert kept.mean() == pytest.approx(1 - p, abs=0.01)
    np.testing.assert_allclose(out[kept], 1 / (1 - p))
    dout = np.full(out.shape, 2.0)
    np.testing.assert_array_equal(layer.backward(dout), 2.0 * out)  # the same mask, the same scale


def test_the_mask_is_a_function_of_seed_step_and_layer_alone(registry, np64):
    x = np.ones((3, 4, 50))
    same = [dropout(registry, np64, 0.5, seed=7, step=3, index=2).forward(x) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    for other in ({"seed": 8, "step": 3, "index": 2}, {"seed": 7, "step": 4, "index": 2},
                  {"seed": 7, "step": 3, "index": 5}):
        assert not np.array_equal(same[0], dropout(registry, np64, 0.5, **other).forward(x)), other


def test_the_step_counter_changes_the_mask_between_iterations(registry, np64):
    layer = dropout(registry, np64, 0.5)
    x = np.ones((3, 4, 50))
    first = layer.forward(x)
    layer.step[0] = 1
    assert not np.array_equal(first, layer.forward(x))
    layer.step[0] = 0
    np.testing.assert_array_equal(first, layer.forward(x))


def test_dropout_p_out_of_range_is_a_spec_error(registry, np64):
    with pytest.raises(SpecError, match=r"dropout p must be in \[0, 1\)"):
        dropout(registry, np64, 1.0)


def tied_model(registry, backend, dropout=0.0, seed=0, pair=False):
    """better-rnnlm, tiny; the embedding starts at N(0, 1) rather than N(0, 0.01^2), else the LSTMs'
    weight gradients (~1e-6) fall below what central differences resolve. pair: its output as the two
    layers tied_affine + softmax_loss, in place of the preset's fused affine_softmax_loss."""
    specs = preset_specs("better-rnnlm", wordvec_size=4, hidden_size=4, dropout=dropout)
    specs[0]["init"] = "normal:1"
    if pair:
        specs[-1:] = [{"type": "tied_affine", "tie_to": "embedding"}, {"type": "softmax_loss"}]
    return Model(specs, V, backend, registry, seed=seed)


def test_better_rnnlm_layers_and_the_tied_weight_stored_once(registry, np64):
    model = tied_model(registry, np64)
    assert model.names == ["embedding", "dropout1", "lstm1", "dropout2", "lstm2", "dropout3", "affine_softmax_loss"]
    assert model.specs[-1] == {"type": "affine_softmax_loss", "tie_to": "embedding"}
    assert "affine_softmax_loss.W" not in model.params and "affine_softmax_loss.W" not in model.grads
    assert {"embedding.W", "affine_softmax_loss.b", "lstm1.Wh", "lstm2.Wh"} <= set(model.params)
    weight, _ = model.layers[-1]._weight()
    assert np.shares_memory(weight, model.params["embedding.W"]) and weight.shape == (4, V)


def test_the_two_layer_tied_output_stores_the_weight_once(registry, np64):
    model = tied_model(registry, np64, pair=True)
    assert model.names[-2:] == ["tied_affine", "softmax_loss"]
    assert "tied_affine.W" not in model.params and "tied_affine.W" not in model.grads
    assert {"embedding.W", "tied_affine.b"} <= set(model.params)
    affine = model.layers[model.names.index("tied_affine")]
    assert np.shares_memory(affine.W, model.params["embedding.W"])
    assert affine.W.shape == (4, V)


@pytest.mark.parametrize("pair", [False, True])
def test_tied_gradient_is_the_sum_of_both_uses(registry, np64, rng, pair):
    """Tied: embedding.W's gradient equals the untied model's embedding.W + output W^T gradients (the
    fused output layer, or the pair with affine)."""
    tied = tied_model(registry, np64, pair=pair)
    untied_specs = [dict(s) for s in tied.specs]
    if pair:
        untied_specs[-2] = {"type": "affine"}
    else:
        untied_specs[-1] = {"type": "affine_softmax_loss"}
    out = "affine" if pair else "affine_softmax_loss"
    untied = Model(untied_specs, V, np64, registry)
    for k, v in tied.params.items():
        untied.params[k.replace("tied_affine.", "affine.")][...] = v
    untied.params[f"{out}.W"][...] = tied.params["embedding.W"].T
    (xs, ts), = blocks(rng, count=1)
    for model in (tied, untied):
        model.forward(xs, ts)
        model.backward()
    np.testing.assert_allclose(tied.grads["embedding.W"],
                               untied.grads["embedding.W"] + untied.grads[f"{out}.W"].T, rtol=1e-12)
    assert not np.allclose(untied.grads[f"{out}.W"], 0) and not np.allclose(untied.grads["embedding.W"], 0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_two_lstm_tied_model_with_dropout_gradient_check(registry, np64, rng, mode):
    model = tied_model(registry, np64, dropout=0.3)
    model.train(mode == "train")
    errors = check_model_gradients(model, blocks(rng))
    assert "embedding.W" in errors and "affine_softmax_loss.W" not in errors
    assert max(errors.values()) < 1e-5


def test_dropout_changes_training_outputs_but_not_evaluation(registry, np64, rng):
    model = tied_model(registry, np64, dropout=0.5)
    xs = rng.integers(0, V, (2, 3))
    first = model.predict(xs)
    model.reset_state()
    np.testing.assert_array_equal(model.predict(xs), first)  # the same step: the same masks
    model.reset_state()
    model.set_step(1)
    assert not np.allclose(model.predict(xs), first)  # the next iteration: new masks
    model.eval()
    model.reset_state()
    first = model.predict(xs)
    model.reset_state()
    np.testing.assert_array_equal(model.predict(xs), first)


@pytest.mark.parametrize("tie_to, sizes, message", [
    ("embedding", {"size": 3}, r"tying needs \(11, 4\)"),
    ("nope", {"size": 4}, "tie_to='nope' names no other layer"),
    ("lstm", {"size": 4}, "that layer has no weight W"),
])
def test_bad_ties_are_spec_errors(registry, np64, tie_to, sizes, message):
    specs = [{"type": "embedding", **sizes}, {"type": "lstm", "hidden_size": 4},
             {"type": "tied_affine", "tie_to": tie_to}, {"type": "softmax_loss"}]
    with pytest.raises(SpecError, match=message):
        Model(specs, V, np64, registry)


def test_affine_and_tied_affine_are_two_layer_types_and_affine_names_the_other_when_given_tie_to(registry, np64):
    """An affine owns its weight; the tied one is its own registered type (its tie_to naming the
    embedding by default), never a class swapped in behind the name 'affine'."""
    assert registry.get("affine").cls is not registry.get("tied_affine").cls
    ctx = LayerContext(np64, np.random.default_rng(0), 4, V)
    assert registry.build_layer({"type": "tied_affine"}, ctx).tie_to == "embedding"
    with pytest.raises(SpecError, match="is the layer type 'tied_affine'"):
        registry.build_layer({"type": "affine", "tie_to": "embedding"}, ctx)


def test_preset_with_an_unknown_option_is_a_spec_error():
    with pytest.raises(SpecError, match="model preset 'rnnlm': got an unexpected keyword argument 'heads'"):
        preset_specs("rnnlm", heads=2)


def test_a_tied_affine_built_outside_a_model_says_it_is_not_wired(registry, np64):
    ctx = LayerContext(np64, np.random.default_rng(0), 4, V)
    affine = registry.build_layer({"type": "tied_affine", "tie_to": "embedding"}, ctx)
    with pytest.raises(SpecError, match="is not wired: build it inside a Model"):
        affine.forward(np.zeros((1, 2, 4)))


def test_untied_affine_w_and_b_are_one_array_and_the_bias_reaches_the_output(registry, np64):
    """W and b are views of one [W; b] array (the bias rides in the GEMM): writing them in place (as a
    checkpoint restore or an optimizer does) changes what forward computes."""
    ctx = LayerContext(np64, np.random.default_rng(0), 4, V)
    affine = registry.build_layer({"type": "affine"}, ctx)
    x = np.random.default_rng(1).standard_normal((2, 3, 4))
    affine.params["W"][...] = 0
    affine.params["b"][...] = np.arange(V)
    np.testing.assert_array_equal(affine.forward(x), np.broadcast_to(np.arange(V), (2, 3, V)))
    assert affine.params["W"].base is affine.params["b"].base is not None
