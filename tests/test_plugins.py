"""Third-party plugins: loaded by path, name or $GPURNN_PLUGINS, listed, used in a model, and every
way a plugin can break is a clear error naming it."""

import textwrap

import pytest

from gpurnn.errors import PluginError
from gpurnn.model import Model
from gpurnn.registry import Registry
from gpurnn.testing import ConformanceError, check_layer, check_model_gradients

SCALED_TANH = '''
"""A user's plugin: y = scale * tanh(x), elementwise."""
from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, require_input_size


class ScaledTanh(Layer):
    """Elementwise scale * tanh(x) with a learned per-feature scale."""

    def __init__(self, ctx, init_scale=1.5):
        super().__init__(ctx)
        self.output_size = require_input_size(ctx, "scaled_tanh")
        self.add_param("scale", [init_scale] * self.output_size)

    def forward(self, x):
        self.y = self.xp.tanh(x)
        return self.y * self.params["scale"]

    def backward(self, dout):
        self.grads["scale"][...] = (dout * self.y).reshape(-1, self.output_size).sum(axis=0)
        return dout * self.params["scale"] * (1 - self.y ** 2)


@hookimpl
def gpurnn_layer_types():
    return {"scaled_tanh": ScaledTanh}
'''


def write_plugin(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def scaled_tanh(tmp_path):
    return write_plugin(tmp_path, "scaled_tanh_plugin", SCALED_TANH)


def test_user_plugin_by_path_passes_the_kit_and_trains_in_a_model(scaled_tanh, np64, rng):
    registry = Registry(plugins=[str(scaled_tanh)])
    layer_type = registry.get("scaled_tanh")
    assert layer_type.plugin == str(scaled_tanh)
    assert layer_type.description.startswith("Elementwise scale * tanh")
    report = check_layer("scaled_tanh", registry=registry)
    assert set(report["grad_errors"]) == {"scale", "<input>"}
    specs = [{"type": "embedding", "size": 4}, {"type": "rnn", "hidden_size": 5},
             {"type": "scaled_tanh"}, {"type": "affine"}, {"type": "softmax_loss"}]
    model = Model(specs, 9, np64, registry)
    data = [(rng.integers(0, 9, (2, 3)), rng.integers(0, 9, (2, 3))) for _ in range(2)]
    assert "scaled_tanh.scale" in check_model_gradients(model, data)


def test_user_plugin_by_module_name_and_env(scaled_tanh, monkeypatch):
    monkeypatch.syspath_prepend(str(scaled_tanh.parent))
    assert "scaled_tanh" in Registry(plugins=["scaled_tanh_plugin"]).layer_types
    monkeypatch.setenv("GPURNN_PLUGINS", "scaled_tanh_plugin, ")
    assert Registry().get("scaled_tanh").plugin == "scaled_tanh_plugin"


def test_builtin_layers_come_from_entry_points():
    registry = Registry(env=False)
    assert {"embedding", "rnn", "affine", "softmax_loss"} <= set(registry.layer_types)
    assert registry.get("rnn").plugin == "gpurnn_plugins.rnn"
    assert "rnn" not in Registry(entry_points=False, env=False).layer_types


def test_kit_catches_a_wrong_gradient(tmp_path):
    broken = write_plugin(tmp_path, "broken_grad", SCALED_TANH.replace("(1 - self.y ** 2)", "(1 - self.y)"))
    with pytest.raises(ConformanceError, match="<input>"):
        check_layer("scaled_tanh", plugins=[str(broken)])


BROKEN = {
    "duplicate": ('''
        from gpurnn.hookspecs import hookimpl
        from gpurnn.layers import Layer
        class Mine(Layer):
            def forward(self, x): return x
            def backward(self, d): return d
        @hookimpl
        def gpurnn_layer_types():
            return {"rnn": Mine}
        ''', "'rnn' is provided by two plugins"),
    "fails_import": ("import no_such_module_anywhere\n", "failed to import: ModuleNotFoundError"),
    "hook_raises": ('''
        from gpurnn.hookspecs import hookimpl
        @hookimpl
        def gpurnn_layer_types():
            raise RuntimeError("boom")
        ''', "raised in gpurnn_layer_types: RuntimeError: boom"),
    "no_backward": ('''
        from gpurnn.hookspecs import hookimpl
        from gpurnn.layers import Layer
        class Half(Layer):
            def forward(self, x): return x
        @hookimpl
        def gpurnn_layer_types():
            return {"half": Half}
        ''', "'half' has no backward"),
    "not_a_dict": ('''
        from gpurnn.hookspecs import hookimpl
        @hookimpl
        def gpurnn_layer_types():
            return ["x"]
        ''', "must return a dict"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_plugins_are_errors_naming_the_plugin(tmp_path, name):
    body, message = BROKEN[name]
    path = write_plugin(tmp_path, name, body)
    with pytest.raises(PluginError, match=message) as info:
        Registry(plugins=[str(path)])
    assert str(path) in str(info.value) or name in str(info.value)


def test_layer_with_mismatched_params_and_grads_is_refused(tmp_path, np64):
    path = write_plugin(tmp_path, "mismatch", '''
        import numpy as np
        from gpurnn.hookspecs import hookimpl
        from gpurnn.layers import Layer
        class Odd(Layer):
            def __init__(self, ctx):
                super().__init__(ctx)
                self.output_size = ctx.input_size
                self.params = {"W": np.zeros(3)}
                self.grads = {"W": np.zeros(4)}
            def forward(self, x): return x
            def backward(self, d): return d
        @hookimpl
        def gpurnn_layer_types():
            return {"odd": Odd}
        ''')
    specs = [{"type": "embedding", "size": 3}, {"type": "odd"}, {"type": "affine"}, {"type": "softmax_loss"}]
    with pytest.raises(PluginError, match=r"mismatch.*grads\['W'\] has shape"):
        Model(specs, 5, np64, Registry(plugins=[str(path)]))


def test_missing_plugin_file():
    with pytest.raises(PluginError, match="no such file"):
        Registry(plugins=["./nowhere/plugin.py"])


BROKEN_EXPORTS = {
    "export_duplicate": ('''
        from gpurnn.export import LayerExport
        from gpurnn.hookspecs import hookimpl
        @hookimpl
        def gpurnn_layer_exports():
            return {"rnn": LayerExport(lambda graph, name, layer, x: x)}
        ''', "'rnn' is exported by two plugins: 'gpurnn_plugins.rnn' and"),
    "export_without_onnx": ('''
        from gpurnn.hookspecs import hookimpl
        @hookimpl
        def gpurnn_layer_exports():
            return {"rnn": object()}
        ''', "the export of layer type 'rnn' has no onnx"),
    "export_hook_raises": ('''
        from gpurnn.hookspecs import hookimpl
        @hookimpl
        def gpurnn_layer_exports():
            raise RuntimeError("boom")
        ''', "raised in gpurnn_layer_exports: RuntimeError: boom"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_EXPORTS))
def test_broken_exports_are_errors_naming_the_plugin_when_exporting_only(tmp_path, name):
    body, message = BROKEN_EXPORTS[name]
    registry = Registry(plugins=[str(write_plugin(tmp_path, name, body))])  # other commands are unaffected
    assert "rnn" in registry.layer_types
    with pytest.raises(PluginError, match=message) as info:
        registry.layer_exports
    assert name in str(info.value)


def test_every_built_in_layer_type_but_the_adaptive_softmax_has_an_export(registry):
    modules = {name: name for name in ("affine", "dropout", "embedding", "gru", "lstm", "rnn", "softmax_loss")}
    modules["tied_affine"] = "affine"
    modules["affine_softmax_loss"] = "softmax_output"
    assert {name: entry.plugin for name, entry in registry.layer_exports.items()} == {
        name: f"gpurnn_plugins.{module}" for name, module in modules.items()}
