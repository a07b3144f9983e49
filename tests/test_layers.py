"""The built-in layers through the conformance kit, plus truncated-BPTT semantics of the RNN."""

import numpy as np
import pytest

from gpurnn import layers
from gpurnn.errors import SpecError
from gpurnn.layers import LayerContext, init_matrix
from gpurnn.testing import check_layer


@pytest.mark.parametrize("layer_type, options", [
    ("embedding", {"size": 4}),
    ("rnn", {"hidden_size": 6}),
    ("rnn", {"hidden_size": 3, "init_wh": "orthogonal", "init_wx": "uniform:0.5"}),
    ("affine", {}),
    ("affine", {"output_size": 3}),
    ("softmax_loss", {}),
])
def test_builtin_layers_pass_the_kit(registry, layer_type, options):
    report = check_layer(layer_type, options, registry=registry)
    assert report["grad_errors"], "the kit checked no gradient"
    assert max(report["grad_errors"].values()) < 1e-5
    assert report["stateful"] == (layer_type == "rnn")


def rnn(registry, backend, hidden=5, inp=4, seed=0):
    ctx = LayerContext(backend, np.random.default_rng(seed), inp, 11)
    return registry.build_layer({"type": "rnn", "hidden_size": hidden}, ctx)


def test_two_blocks_of_5_equal_one_block_of_10(registry, np64, rng):
    layer = rnn(registry, np64)
    xs = rng.standard_normal((3, 10, 4))
    long = layer.forward(xs).copy()
    layer.reset_state()
    first, second = layer.forward(xs[:, :5]).copy(), layer.forward(xs[:, 5:]).copy()
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), long, rtol=1e-12)


def test_second_block_backward_stops_at_the_boundary(registry, np64, rng):
    """The gradient of block 2 equals the gradient of a fresh layer started from the carried h."""
    layer = rnn(registry, np64)
    x1, x2 = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 5, 4))
    dout = rng.standard_normal((3, 5, 5))
    layer.forward(x1)
    carried = layer.get_state()["h"].copy()
    layer.forward(x2)
    dx2 = layer.backward(dout)
    grads = {k: v.copy() for k, v in layer.grads.items()}

    fresh = rnn(registry, np64)
    fresh.set_state({"h": carried})
    fresh.forward(x2)
    np.testing.assert_allclose(fresh.backward(dout), dx2, rtol=1e-12)
    for k in grads:
        np.testing.assert_allclose(fresh.grads[k], grads[k], rtol=1e-12)
    assert dx2.shape == x2.shape  # a gradient for block 2's inputs only


def test_non_stateful_rnn_starts_from_zero_each_block(registry, np64, rng):
    ctx = LayerContext(np64, np.random.default_rng(0), 4, 11)
    layer = registry.build_layer({"type": "rnn", "hidden_size": 5, "stateful": False}, ctx)
    xs = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(layer.forward(xs), layer.forward(xs))


def test_softmax_loss_is_stable_and_ignores_minus_one(registry, np64):
    ctx = LayerContext(np64, np.random.default_rng(0), 3, 3)
    loss = registry.build_layer({"type": "softmax_loss"}, ctx)
    x = np.array([[[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]]])
    value = float(loss.forward(x, np.array([[0, -1]])))
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-12)
    dx = loss.backward()
    np.testing.assert_array_equal(dx[0, 1], 0.0)  # the ignored position gets no gradient
    value = float(loss.forward(x, np.array([[2, 1]])))
    assert value == pytest.approx((2000.0 + np.log(3.0)) / 2)


def test_embedding_backward_sums_repeated_ids(registry, np64):
    ctx = LayerContext(np64, np.random.default_rng(0), None, 6)
    emb = registry.build_layer({"type": "embedding", "size": 2}, ctx)
    ids = np.array([[1, 3, 1], [5, 1, 0]])
    emb.forward(ids)
    dout = np.arange(12, dtype=float).reshape(2, 3, 2)
    emb.backward(dout)
    expected = np.zeros((6, 2))
    np.add.at(expected, ids.ravel(), dout.reshape(-1, 2))  # the slow reference, fine in a test
    np.testing.assert_array_equal(emb.grads["W"], expected)


@pytest.mark.parametrize("scheme, whole", [
    ("default", lambda rng, shape: rng.standard_normal(shape) / np.sqrt(13)),
    ("normal:0.5", lambda rng, shape: rng.standard_normal(shape) * 0.5),
    ("uniform:0.2", lambda rng, shape: rng.uniform(-0.2, 0.2, shape)),
    ("xavier", lambda rng, shape: rng.uniform(-np.sqrt(6 / 24), np.sqrt(6 / 24), shape)),
    ("orthogonal", None)])
def test_init_in_float32_gives_the_float64_numbers_drawn_block_by_block(monkeypatch, scheme, whole):
    """Blocks of 7 values (ending mid-row) give one whole float64 draw's numbers, and float32 those cast."""
    once = init_matrix(np.random.default_rng(3), (13, 11), scheme, 13)
    if whole is not None:
        np.testing.assert_array_equal(once, whole(np.random.default_rng(3), (13, 11)))
    monkeypatch.setattr(layers, "INIT_BLOCK", 7)
    blocks = init_matrix(np.random.default_rng(3), (13, 11), scheme, 13)
    single = init_matrix(np.random.default_rng(3), (13, 11), scheme, 13, np.float32)
    assert blocks.dtype == np.float64 and single.dtype == np.float32
    np.testing.assert_array_equal(blocks, once)
    np.testing.assert_array_equal(single, once.astype(np.float32))


def test_default_init_follows_the_textbook(registry):
    rng = np.random.default_rng(0)
    w = init_matrix(rng, (400, 300), "default", 400)
    assert w.std() == pytest.approx(1 / np.sqrt(400), rel=0.02)
    q = init_matrix(rng, (50, 50), "orthogonal", 50)
    np.testing.assert_allclose(q @ q.T, np.eye(50), atol=1e-10)
    with pytest.raises(SpecError, match="unknown init scheme"):
        init_matrix(rng, (2, 2), "bogus", 2)
    with pytest.raises(SpecError, match="needs a number"):
        init_matrix(rng, (2, 2), "uniform:x", 2)


@pytest.mark.parametrize("scheme", ["default", "normal:0.01", "uniform:0.1", "xavier"])
def test_init_drawn_in_blocks_is_one_draw_and_float32_its_rounding(monkeypatch, scheme):
    """A vocabulary-sized table is drawn a block of rows at a time (never whole in float64): the same
    numbers as one draw, and in float32 exactly those numbers rounded."""
    rng = np.random.default_rng
    whole = {"default": rng(3).standard_normal((1000, 7)) / np.sqrt(1000),
             "normal:0.01": rng(3).standard_normal((1000, 7)) * 0.01,
             "uniform:0.1": rng(3).uniform(-0.1, 0.1, (1000, 7)),
             "xavier": rng(3).uniform(-np.sqrt(6 / 1007), np.sqrt(6 / 1007), (1000, 7))}[scheme]
    monkeypatch.setattr("gpurnn.layers.INIT_BLOCK", 100)  # 14 rows a block
    np.testing.assert_array_equal(init_matrix(rng(3), (1000, 7), scheme, 1000), whole)
    single = init_matrix(rng(3), (1000, 7), scheme, 1000, dtype=np.float32)
    assert single.dtype == np.float32
    np.testing.assert_array_equal(single, whole.astype(np.float32))


def test_float32_backend_gives_float32(registry):
    from gpurnn.backend import get_backend
    layer = rnn(registry, get_backend("numpy"))
    out = layer.forward(np.ones((2, 3, 4), np.float32))
    assert out.dtype == np.float32 and layer.params["Wh"].dtype == np.float32
