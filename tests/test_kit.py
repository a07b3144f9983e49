"""The conformance kit's checks, each shown failing on a small deliberately broken layer with the
message that says what is wrong, and passing on every built-in layer."""

import textwrap

import pytest

from gpurnn.backend import probe_cupy
from gpurnn.errors import PluginError
from gpurnn.registry import Registry
from gpurnn.testing import F32_TOL, ConformanceError, check_layer

BROKEN_LAYERS = '''
import numpy as np
from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, RecurrentLayer, require_input_size


class Tanh(Layer):
    """y = tanh(x), correct; the broken layers below change one thing each."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.output_size = require_input_size(ctx, "tanh")

    def forward(self, x):
        self.y = self.xp.tanh(x)
        return self.y

    def backward(self, dout):
        return dout * (1 - self.y ** 2)


class TanhInPlace(Tanh):
    """Overwrites its input."""

    def forward(self, x):
        self.y = self.xp.tanh(x, out=x)
        return self.y


class DoutInPlace(Tanh):
    """Overwrites the gradient it is given."""

    def backward(self, dout):
        dout *= 1 - self.y ** 2
        return dout


class AssumesContiguous(Tanh):
    """Reads its input with C-contiguous strides whatever its real ones (as a raw kernel might)."""

    def forward(self, x):
        item = x.itemsize
        c = np.lib.stride_tricks.as_strided(x, x.shape, (x.shape[1] * x.shape[2] * item, x.shape[2] * item, item))
        self.y = np.tanh(c)
        return self.y


class Cancels(Tanh):
    """y = (x + 1e4) - 1e4: exact in float64, about 1e-3 off in float32."""

    def forward(self, x):
        self.y = (x + 1e4) - 1e4
        return self.y

    def backward(self, dout):
        return dout.copy()


class Accumulates(Layer):
    """y = x * s with a learned per-feature s whose gradient is added to, not written."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.output_size = require_input_size(ctx, "accumulates")
        self.add_param("s", np.ones(self.output_size))

    def forward(self, x):
        self.x = x
        return x * self.params["s"]

    def backward(self, dout):
        self.grads["s"] += (dout * self.x).reshape(-1, self.output_size).sum(axis=0)
        return dout * self.params["s"]


class NoReset(RecurrentLayer):
    """An Elman RNN whose reset_state() does nothing."""

    def __init__(self, ctx, hidden_size=3):
        super().__init__(ctx, "no_reset", 1, hidden_size, True, "default", "default")

    def forward(self, xs):
        x_tm, hs = self.project(xs)
        (h,) = self.initial_state(xs.shape[0], xs.dtype)
        h0 = h
        for t in range(hs.shape[0]):
            hs[t] = np.tanh(hs[t] + h @ self.params["Wh"])
            h = hs[t]
        self.cache = (x_tm, h0, hs)
        self.keep_state(h)
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        x_tm, h0, hs = self.cache
        dts, dh = np.empty_like(hs), 0
        for t in range(hs.shape[0] - 1, -1, -1):
            dts[t] = (dhs[:, t] + dh) * (1 - hs[t] ** 2)
            dh = dts[t] @ self.params["Wh"].T
        return self.weight_grads(x_tm, h0, hs, dts)

    def reset_state(self):
        pass


class NoCarry(NoReset):
    """Resets, but never carries its state to the next forward."""

    def keep_state(self, *arrays):
        pass

    def reset_state(self):
        self.state = {}


@hookimpl
def gpurnn_layer_types():
    return {"tanh": Tanh, "tanh_in_place": TanhInPlace, "dout_in_place": DoutInPlace,
            "assumes_contiguous": AssumesContiguous, "cancels": Cancels, "no_reset": NoReset,
            "no_carry": NoCarry, "accumulates": Accumulates}
'''


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    path = tmp_path_factory.mktemp("kit") / "broken_layers.py"
    path.write_text(BROKEN_LAYERS)
    return Registry(plugins=[str(path)])


KIT_MESSAGES = {
    "tanh_in_place": "forward modified its input x in place",
    "dout_in_place": "backward modified its input dout in place",
    "assumes_contiguous": "forward gives other outputs for a non-contiguous input than for a contiguous one",
    "cancels": "in float32 forward's output differs from float64: relative error",
    "no_reset": "the state was never reset",
    "no_carry": "the state is not carried from one forward to the next",
    "accumulates": r"backward must write grads\['s'\], not add to it",
}


@pytest.mark.parametrize("layer_type", sorted(KIT_MESSAGES))
def test_the_kit_says_what_is_broken(broken, layer_type):
    with pytest.raises(ConformanceError, match=KIT_MESSAGES[layer_type]):
        check_layer(layer_type, registry=broken)


def test_the_unbroken_layer_passes_with_its_float32_errors_reported(broken):
    report = check_layer("tanh", registry=broken)
    assert set(report["float32_errors"]) == {"output", "<input>"}
    assert 0 < max(report["float32_errors"].values()) < F32_TOL


@pytest.mark.parametrize("layer_type, options", [
    ("embedding", {"size": 4}), ("rnn", {"hidden_size": 3}), ("lstm", {"hidden_size": 3}),
    ("gru", {"hidden_size": 3}), ("affine", {}), ("dropout", {"p": 0.3}), ("softmax_loss", {}),
    ("adaptive_softmax_loss", {"cutoffs": [2, 4], "div_value": 2.0}), ("affine_softmax_loss", {"chunk_rows": 4}),
])
def test_every_builtin_layer_passes_the_stricter_kit(registry, layer_type, options):
    report = check_layer(layer_type, options, registry=registry)
    assert max(report["float32_errors"].values()) < F32_TOL
    assert max(report["grad_errors"].values(), default=0.0) < 1e-5
    assert report["cupy_parity"] == (probe_cupy()[0] is not None)  # checked wherever CuPy can run
    assert report.get("cupy_parity_error", 0.0) < 1e-10


def test_a_stateful_class_without_get_state_is_refused_by_the_registry(tmp_path):
    path = tmp_path / "half_stateful.py"
    path.write_text(textwrap.dedent('''
        from gpurnn.hookspecs import hookimpl
        from gpurnn.layers import Layer
        class Half(Layer):
            stateful = True
            def forward(self, x): return x
            def backward(self, d): return d
            def reset_state(self): pass
        @hookimpl
        def gpurnn_layer_types():
            return {"half": Half}
        '''))
    with pytest.raises(PluginError, match="stateful layer type 'half' has no get_state"):
        Registry(plugins=[str(path)])
