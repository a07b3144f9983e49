"""LSTM and GRU: the conformance kit, parity with PyTorch over two carried blocks, stacks, presets."""

import numpy as np
import pytest

from gpurnn.layers import LayerContext
from gpurnn.model import Model, preset_specs
from gpurnn.testing import check_layer

V = 11


@pytest.mark.parametrize("layer_type, options", [
    ("lstm", {"hidden_size": 4}),
    ("lstm", {"hidden_size": 3, "init_wh": "orthogonal", "init_wx": "uniform:0.5"}),
    ("gru", {"hidden_size": 4}),
    ("gru", {"hidden_size": 3, "init_wh": "orthogonal"}),
])
def test_lstm_and_gru_pass_the_kit(registry, layer_type, options):
    report = check_layer(layer_type, options, registry=registry)
    assert report["stateful"]
    expected = {"Wx", "Wh", "b", "<input>"} | ({"bhn"} if layer_type == "gru" else set())
    assert set(report["grad_errors"]) == expected
    assert max(report["grad_errors"].values()) < 1e-5


def lstm_from_torch(torch_layer, ours):
    """Copy PyTorch's LSTM weights into ours: same gate order (i, f, g, o), one bias b_ih + b_hh."""
    p = {k: v.detach().numpy() for k, v in torch_layer.named_parameters()}
    ours.params["Wx"][...] = p["weight_ih_l0"].T
    ours.params["Wh"][...] = p["weight_hh_l0"].T
    ours.params["b"][...] = p["bias_ih_l0"] + p["bias_hh_l0"]


def lstm_grads_as_torch(torch_layer):
    g = {k: v.grad.numpy() for k, v in torch_layer.named_parameters()}
    return {"Wx": g["weight_ih_l0"].T, "Wh": g["weight_hh_l0"].T, "b": g["bias_ih_l0"]}


def gru_from_torch(torch_layer, ours):
    """Copy PyTorch's GRU weights into ours: r and z biases summed, n's hidden bias kept as bhn."""
    p = {k: v.detach().numpy() for k, v in torch_layer.named_parameters()}
    H = ours.output_size
    ours.params["Wx"][...] = p["weight_ih_l0"].T
    ours.params["Wh"][...] = p["weight_hh_l0"].T
    ours.params["b"][...] = p["bias_ih_l0"] + np.r_[p["bias_hh_l0"][:2 * H], np.zeros(H)]
    ours.params["bhn"][...] = p["bias_hh_l0"][2 * H:]


def gru_grads_as_torch(torch_layer):
    g = {k: v.grad.numpy() for k, v in torch_layer.named_parameters()}
    H = g["bias_hh_l0"].shape[0] // 3
    return {"Wx": g["weight_ih_l0"].T, "Wh": g["weight_hh_l0"].T, "b": g["bias_ih_l0"],
            "bhn": g["bias_hh_l0"][2 * H:]}


@pytest.mark.parametrize("layer_type", ["lstm", "gru"])
def test_outputs_and_gradients_equal_pytorch_over_two_carried_blocks(registry, np64, rng, layer_type):
    torch = pytest.importorskip("torch")
    B, T, D, H = 3, 5, 4, 6
    torch.manual_seed(0)
    cls, copy_in, grads_of = {"lstm": (torch.nn.LSTM, lstm_from_torch, lstm_grads_as_torch),
                              "gru": (torch.nn.GRU, gru_from_torch, gru_grads_as_torch)}[layer_type]
    reference = cls(D, H, batch_first=True).double()
    ours = registry.build_layer({"type": layer_type, "hidden_size": H},
                                LayerContext(np64, np.random.default_rng(0), D, V))
    copy_in(reference, ours)

    state = None
    for _ in range(2):  # block 2 starts from the state block 1 left; neither backward crosses a block
        xs, dout = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, H))
        out = ours.forward(xs)
        dxs = ours.backward(dout)

        x_t = torch.tensor(xs, requires_grad=True)
        reference.zero_grad()
        out_t, state = reference(x_t, state)
        (out_t * torch.tensor(dout)).sum().backward()
        state = tuple(s.detach() for s in state) if layer_type == "lstm" else state.detach()

        np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dxs, x_t.grad.numpy(), rtol=1e-10, atol=1e-12)
        for name, expected in grads_of(reference).items():
            np.testing.assert_allclose(ours.grads[name], expected, rtol=1e-10, atol=1e-12, err_msg=name)


def two_lstm_model(registry, backend):
    specs = [{"type": "embedding", "size": 4}, {"type": "lstm", "hidden_size": 5},
             {"type": "lstm", "hidden_size": 3}, {"type": "affine"}, {"type": "softmax_loss"}]
    return Model(specs, V, backend, registry)


def test_a_stack_of_two_lstms_carries_one_state_per_layer(registry, np64, rng):
    model = two_lstm_model(registry, np64)
    xs = rng.integers(0, V, (2, 8))
    long = model.predict(xs)
    assert set(model.get_state()) == {"lstm1.h", "lstm1.c", "lstm2.h", "lstm2.c"}
    assert model.get_state()["lstm1.h"].shape == (2, 5) and model.get_state()["lstm2.h"].shape == (2, 3)
    model.reset_state()
    halves = np.concatenate([model.predict(xs[:, :4]), model.predict(xs[:, 4:])], axis=1)
    np.testing.assert_allclose(halves, long, rtol=1e-12)
    model.reset_state()
    model.predict(xs[:, :4])
    model.set_state({k: v for k, v in model.get_state().items() if k.startswith("lstm1.")})
    assert not np.allclose(model.predict(xs[:, 4:]), long[:, 4:])  # lstm2 restarted: its state mattered


def test_rnnlm_preset_is_the_textbook_model(registry, rng):
    from gpurnn.backend import get_backend
    model = Model(preset_specs("rnnlm"), 1000, get_backend("numpy"), registry)
    assert model.names == ["embedding", "lstm", "affine_softmax_loss"]  # affine + softmax loss, fused
    assert model.params["lstm.Wx"].shape == (100, 400) and model.params["lstm.Wh"].shape == (100, 400)
    xs, ts = rng.integers(0, 1000, (10, 5)), rng.integers(0, 1000, (10, 5))
    assert float(model.forward(xs, ts)) == pytest.approx(np.log(1000), rel=0.01)


@pytest.mark.parametrize("layer_type", ["lstm", "gru"])
def test_float32_backend_gives_float32(registry, layer_type):
    from gpurnn.backend import get_backend
    ctx = LayerContext(get_backend("numpy"), np.random.default_rng(0), 4, V)
    layer = registry.build_layer({"type": layer_type, "hidden_size": 3}, ctx)
    out = layer.forward(np.ones((2, 3, 4), np.float32))
    dx = layer.backward(np.ones_like(out))
    assert out.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
