"""The model: presets, names, the whole-model gradient check over two blocks, spec errors."""

import numpy as np
import pytest

from gpurnn.errors import SpecError
from gpurnn.model import Model, fused_output, preset_specs
from gpurnn.testing import check_model_gradients

from .exportkit import unfused_specs

V = 11


def small_model(registry, backend, seed=0):
    return Model(preset_specs("simple-rnnlm", wordvec_size=4, hidden_size=5), V, backend, registry, seed=seed)


def blocks(rng, count=2, B=2, T=3):
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(count)]


def test_simple_rnnlm_gradient_over_two_blocks(registry, np64, rng):
    errors = check_model_gradients(small_model(registry, np64), blocks(rng))
    assert set(errors) == {"embedding.W", "rnn.Wx", "rnn.Wh", "rnn.b", "affine_softmax_loss.W", "affine_softmax_loss.b"}
    assert max(errors.values()) < 1e-5


def test_params_and_grads_have_readable_names_and_matching_shapes(registry, np64):
    model = small_model(registry, np64)
    assert list(model.params) == list(model.grads)
    assert model.params["rnn.Wh"].shape == (5, 5)
    assert model.params["affine_softmax_loss.W"].shape == (5, V)
    for k in model.params:
        assert model.params[k].shape == model.grads[k].shape


def test_same_seed_same_model_and_state_is_carried(registry, np64, rng):
    a, b = small_model(registry, np64, seed=3), small_model(registry, np64, seed=3)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    (x1, t1), (x2, t2) = blocks(rng)
    loss_fresh = float(a.forward(x2, t2))
    a.reset_state()
    a.forward(x1, t1)
    loss_carried = float(a.forward(x2, t2))
    assert loss_fresh != loss_carried
    a.reset_state()
    assert float(a.forward(x2, t2)) == loss_fresh
    assert set(a.get_state()) == {"rnn.h"}


@pytest.mark.parametrize("preset", ["simple-rnnlm", "rnnlm", "better-rnnlm"])
def test_each_preset_computes_what_affine_and_softmax_loss_compute(registry, np64, rng, preset):
    """The presets end in the fused output layer; a model with affine (tied: tied_affine) + softmax_loss
    in its place starts from the same parameters (in one flat layout) and trains to the same numbers."""
    specs = preset_specs(preset, wordvec_size=6, hidden_size=6)
    assert specs[-1]["type"] == "affine_softmax_loss" and ("tie_to" in specs[-1]) == (preset == "better-rnnlm")
    fused, pair = (Model(s, V, np64, registry, seed=2) for s in (specs, unfused_specs(specs)))
    np.testing.assert_array_equal(fused.flat_params, pair.flat_params)
    for step, (xs, ts) in enumerate(blocks(rng, count=3)):  # better-rnnlm: with dropout, new masks each step
        losses = []
        for model in (fused, pair):
            model.set_step(step)
            losses.append(float(model.forward(xs, ts)))
            model.backward()
            model.flat_params -= 0.5 * model.flat_grads
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
        np.testing.assert_allclose(fused.flat_grads, pair.flat_grads, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fused.log_prob(xs), pair.log_prob(xs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", ["simple-rnnlm", "rnnlm", "better-rnnlm"])
def test_a_float32_model_starts_from_the_float64_models_numbers(registry, np64, preset):
    from gpurnn.backend import get_backend
    specs = preset_specs(preset, wordvec_size=12, hidden_size=12)
    single, double = (Model(specs, 40, backend, registry, seed=5) for backend in (get_backend("numpy"), np64))
    for name, value in single.params.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, double.params[name].astype(np.float32), err_msg=name)


def test_initial_loss_is_near_log_vocab(registry, rng):
    from gpurnn.backend import get_backend
    model = Model(preset_specs("simple-rnnlm"), 1000, get_backend("numpy"), registry)
    xs, ts = rng.integers(0, 1000, (10, 5)), rng.integers(0, 1000, (10, 5))
    assert float(model.forward(xs, ts)) == pytest.approx(np.log(1000), rel=0.01)
    assert model.predict(xs).shape == (10, 5, 100)  # what the fused output layer reads: the last features
    assert model.log_prob(xs).shape == (10, 5, 1000)


def test_repeated_layer_types_get_numbered_names(registry, np64):
    specs = [{"type": "embedding", "size": 3}, {"type": "rnn", "hidden_size": 4},
             {"type": "rnn", "hidden_size": 4}, {"type": "affine"}, {"type": "softmax_loss"}]
    model = Model(specs, V, np64, registry)
    assert {"rnn1.Wh", "rnn2.Wh"} <= set(model.params)


@pytest.mark.parametrize("specs, message", [
    ([{"type": "embedding", "size": 3}, {"type": "affine"}], "last layer must be a loss"),
    ([{"type": "rnn", "hidden_size": 3}, {"type": "affine"}, {"type": "softmax_loss"}], "needs an input size"),
    ([{"type": "embedding"}, {"type": "softmax_loss"}, {"type": "affine"}, {"type": "softmax_loss"}],
     "may only come last"),
    ([{"type": "embedding"}, {"type": "lstmm"}, {"type": "softmax_loss"}], "unknown layer type 'lstmm'"),
    ([{"type": "embedding", "sizee": 3}, {"type": "softmax_loss"}], "unexpected keyword argument 'sizee'"),
    (["embedding"], "must be a mapping"),
    ([], "at least one layer"),
])
def test_bad_specs_are_clear_errors(registry, np64, specs, message):
    with pytest.raises(SpecError, match=message):
        Model(specs, V, np64, registry)


def test_affine_and_softmax_loss_read_as_the_fused_layer_only_where_they_are_the_same_model():
    """`fused_output`, which lets a checkpoint of the two layers resume under a preset's options."""
    for preset in ("rnnlm", "better-rnnlm"):
        assert fused_output(unfused_specs(preset_specs(preset))) == preset_specs(preset)
        assert fused_output(preset_specs(preset)) == preset_specs(preset)
    body = preset_specs("rnnlm")[:-1]
    for tail in ([{"type": "affine", "output_size": 5}, {"type": "softmax_loss"}],
                 [{"type": "affine", "name": "out"}, {"type": "softmax_loss"}], [{"type": "softmax_loss"}]):
        assert fused_output(body + tail) == body + tail


def test_unknown_preset(registry):
    with pytest.raises(SpecError, match="unknown model preset 'nope'"):
        preset_specs("nope")


def test_print_model_shows_each_layer_its_shapes_and_the_parameter_count(registry, np64):
    specs = preset_specs("better-rnnlm", wordvec_size=6, hidden_size=6)
    model = Model(specs, V, np64, registry)
    text = repr(model)
    count = sum(v.size for v in model.params.values())
    assert text.splitlines()[0] == f"Model(7 layers, {count:,} parameters, vocabulary {V}, float64 on numpy)"
    assert "  lstm2                TimeLSTM('lstm', output_size=6, Wx (6, 24), Wh (6, 24), b (24,))  312" in text
    assert "AffineSoftmaxWithLoss('affine_softmax_loss', output_size=11, tie_to='embedding', b (11,))  11" in text
    assert count == 11 * 6 + 2 * (6 * 24 + 6 * 24 + 24) + 11  # the tied table counted once
