"""A model as an ONNX graph for inference, built with onnx.helper from each layer type's export.

The graph's inputs are ``ids`` (int64, batch x time, both dynamic) and the state every recurrent layer
carries, under the names `Model.get_state` uses (``lstm1.h``, ``lstm1.c``, ...; batch x hidden, zeros
to start); its outputs are ``logits`` (batch x time x vocabulary) and each state after the block,
named with ``.next`` added (``lstm1.h.next``). Feeding a block's ``.next`` values back as the next
block's states streams a long text block by block exactly as gpurnn's truncated BPTT does. The loss
layer is left out (the graph ends at the logits, as `Model.predict` does), and so are the layers that
are an identity at inference (dropout).

Each layer type adds its own nodes through the export its plugin returns from `gpurnn_layer_exports`
(`gpurnn.export.layer`). Parameters become initializers named as in `Model.params` (``embedding.W``),
each stored once: a tied output affine reads the embedding's. The onnx package is imported only here,
only when exporting (`pip install 'gpurnn[onnx]'`).
"""

import json

import numpy as np

from ..errors import ExportError, GpurnnError, PluginError
from .layer import host_params

OPSET = 17  # the ONNX opset the graphs declare (it came with ONNX 1.12; tested: onnx 1.23.2, ONNX Runtime 1.32.0)
IDS, LOGITS = "ids", "logits"
BATCH, TIME = "batch", "time"  # the names of the dynamic dimensions
NEXT = ".next"  # added to a state input's name to name the state the block leaves


def require_onnx():
    """The onnx module, or a one-line error saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'gpurnn[onnx]'") from None
    return onnx


class OnnxGraph:
    """What a layer's export builds with: initializers from the model's parameters, nodes whose
    output values get unique readable names (``lstm1/LSTM_3``), and the carried-state inputs and
    outputs of a recurrent layer (`recurrent` does all of a recurrent operator's plumbing)."""

    def __init__(self, model, onnx):
        self.model, self.onnx, self.helper = model, onnx, onnx.helper
        self.nodes, self.initializers, self.state_inputs, self.state_outputs = [], {}, [], []
        self.scope = ""
        self._count = 0

    def param(self, layer_name, key):
        """The initializer holding the model's parameter ``layer_name.key`` (added on first use)."""
        name = f"{layer_name}.{key}"
        if name not in self.initializers:
            self.constant(name, host_params(self.model, layer_name)[key])
        return name

    def constant(self, name, array):
        """Add an initializer called `name` holding `array`; returns its name."""
        if name in self.initializers:
            raise ValueError(f"initializer {name!r} is added twice")
        self.initializers[name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def axes(self, *axes):
        """An int64 initializer holding `axes` (the axes input of Squeeze and Unsqueeze)."""
        name = "axes." + ".".join(map(str, axes))
        return name if name in self.initializers else self.constant(name, np.array(axes, np.int64))

    def node(self, op_type, inputs, outputs=1, **attributes):
        """Add a node; returns its output's name (or the list of them when it has several). `outputs`
        is how many to name here, or the names themselves."""
        if isinstance(outputs, int):
            outputs = [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), list(outputs), name=self._fresh(op_type),
                                                **attributes))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def _fresh(self, op_type):
        self._count += 1
        return f"{self.scope}/{op_type}_{self._count}"

    def state(self, layer_name, key, size):
        """(input, output) value names of the state `key` a layer carries: a graph input and output of
        shape (batch, size)."""
        given = f"{layer_name}.{key}"
        for values, value_name in ((self.state_inputs, given), (self.state_outputs, given + NEXT)):
            values.append(self.helper.make_tensor_value_info(value_name, self.onnx.TensorProto.FLOAT, [BATCH, size]))
        return given, given + NEXT

    def recurrent(self, op_type, layer_name, layer, x, W, R, B, **attributes):
        """ONNX's RNN, LSTM or GRU on x (batch, time, input) from the layer's carried state, whose new
        value becomes the state outputs; returns the output (batch, time, hidden).

        ONNX's operators are time-major and keep a leading direction axis on every state, hence the
        transposes, unsqueezes and squeezes around the one node.
        """
        H = layer.output_size
        states = [self.state(layer_name, key, H) for key in layer.state_names]
        starts = [self.node("Unsqueeze", [given, self.axes(0)]) for given, _ in states]
        x_tm = self.node("Transpose", [x], perm=[1, 0, 2])
        y, *finals = self.node(op_type, [x_tm, W, R, B, "", *starts], outputs=1 + len(states), hidden_size=H,
                               **attributes)
        for final, (_, new) in zip(finals, states):
            self.node("Squeeze", [final, self.axes(0)], outputs=[new])
        return self.node("Transpose", [self.node("Squeeze", [y, self.axes(1)])], perm=[1, 0, 2])


def onnx_model(model, registry, vocab, level="word"):
    """The ONNX ModelProto of `model` (a `gpurnn.Model`), checked by onnx.checker. The vocabulary, the
    corpus level and the layer specs go into its metadata (``gpurnn.vocab``, ``gpurnn.level``,
    ``gpurnn.specs``, JSON), so a caller can turn text into ids without gpurnn."""
    onnx = require_onnx()
    helper = onnx.helper
    graph = OnnxGraph(model, onnx)
    x = IDS
    for name, layer, spec in zip(model.names, model.layers, model.specs):  # the loss layer gives the logits
        graph.scope = name
        x = export_layer(graph, registry, name, layer, spec["type"], x)
    graph.scope = LOGITS
    graph.node("Identity", [x], outputs=[LOGITS])
    inputs = [helper.make_tensor_value_info(IDS, onnx.TensorProto.INT64, [BATCH, TIME]), *graph.state_inputs]
    outputs = [helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, [BATCH, TIME, model.vocab_size]),
               *graph.state_outputs]
    body = helper.make_graph(graph.nodes, "gpurnn", inputs, outputs, list(graph.initializers.values()))
    opsets = [helper.make_opsetid("", OPSET)]
    proto = helper.make_model(body, opset_imports=opsets, producer_name="gpurnn",
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(proto, {"gpurnn.vocab": json.dumps(list(vocab), ensure_ascii=False),
                                   "gpurnn.level": level, "gpurnn.specs": json.dumps(model.specs)})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the ONNX graph fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    return proto


def export_layer(graph, registry, name, layer, type_name, x):
    """Add one layer's nodes through its type's export; a type without one, or an export that fails,
    is a one-line error naming the plugin."""
    found = registry.layer_exports.get(type_name)
    if found is None:
        raise ExportError(f"layer {name!r} (type {type_name!r}, from plugin {registry.get(type_name).plugin!r}) "
                          f"has no ONNX export: no plugin implements gpurnn_layer_exports for it "
                          f"(see docs/plugin-guide.md)")
    try:
        return found.export.onnx(graph, name, layer, x)
    except GpurnnError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {found.plugin!r}: the ONNX export of layer {name!r} (type {type_name!r}) "
                          f"failed: {type(exc).__name__}: {exc}") from exc
