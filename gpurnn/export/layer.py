"""How one layer type leaves gpurnn: what a plugin returns from the `gpurnn_layer_exports` hook.

An export is an object with ``onnx(graph, name, layer, x)``: it adds the layer's inference nodes to an
`gpurnn.export.onnx_graph.OnnxGraph` and returns the name of the value holding its output (``x``
itself for a layer that is an identity at inference, such as dropout). `LayerExport` makes one from a
function. `RecurrentExport` is the export of a `gpurnn.layers.RecurrentLayer` (Wx (D, G*H), Wh (H, G*H),
b (G*H,)): it says which ONNX operator and which PyTorch ``nn`` module compute the same cell, and in
which order each keeps the G gate blocks, and it converts the weights both ways.

Nothing here imports onnx: plugins import this module freely.
"""

from dataclasses import dataclass, field

import numpy as np


class LayerExport:
    """An export given as a function ``onnx(graph, name, layer, x) -> output value name``."""

    def __init__(self, onnx):
        self.onnx = onnx


def identity_at_inference(graph, name, layer, x):
    """The ONNX export of a layer that passes its input through at inference (dropout)."""
    return x


def host_params(model, layer_name):
    """{key: float32 host array} of the parameters of the model's layer `layer_name`."""
    prefix = layer_name + "."
    return {name[len(prefix):]: model.backend.to_host(value).astype(np.float32)
            for name, value in model.params.items() if name.startswith(prefix)}


def gate_order(ours, theirs):
    """Indices of our gate blocks in another framework's order: ``gate_order("i,f,g,o", "i,o,f,g")``
    is ``[0, 3, 1, 2]``."""
    ours, theirs = ours.split(",") if ours else [""], theirs.split(",") if theirs else [""]
    if sorted(ours) != sorted(theirs):
        raise ValueError(f"gate orders {ours} and {theirs} name different gates")
    return [ours.index(gate) for gate in theirs]


def reorder_blocks(array, order):
    """`array` with its first axis cut into len(order) equal blocks, taken in `order`."""
    blocks = np.split(array, len(order), axis=0)
    return np.concatenate([blocks[k] for k in order], axis=0)


@dataclass(frozen=True)
class RecurrentExport:
    """The export of a recurrent layer whose cell ONNX and PyTorch have as operators.

    onnx_op: the ONNX operator (``RNN``, ``LSTM``, ``GRU``); rnn_type: the ``rnn_type`` of PyTorch's
    word_language_model ``RNNModel`` that holds the same cell (``RNN_TANH``, ``LSTM``, ``GRU``);
    gates: our order of the gate blocks, which is PyTorch's (``i,f,g,o``; "" for one block);
    onnx_gates: the same gates in ONNX's order (``i,o,f,g``: ONNX calls g "c"); hidden_bias: the
    parameter that is added to ``h_{t-1} @ Wh`` of the last gate only (GRU's ``bhn``, which the reset
    gate scales), so PyTorch and ONNX keep it in their recurrent bias; onnx_attributes: further
    attributes of the ONNX node (GRU: ``linear_before_reset = 1``, PyTorch's formulation).

    The layer's carried state, in its `state_names` order, is ONNX's ``initial_h`` (and ``initial_c``).
    """

    onnx_op: str
    rnn_type: str
    gates: str = ""
    onnx_gates: str = ""
    hidden_bias: str | None = None
    onnx_attributes: dict = field(default_factory=dict)

    def to_torch(self, params):
        """PyTorch's ``weight_ih``, ``weight_hh`` (out, in) and ``bias_ih``, ``bias_hh`` of a layer's host
        parameters. gpurnn's one bias becomes ``bias_ih`` and ``bias_hh`` is zero, but for the
        hidden_bias, which is the last gate's block of ``bias_hh``."""
        bias_hh = np.zeros_like(params["b"])
        if self.hidden_bias:
            bias_hh[-len(params[self.hidden_bias]):] = params[self.hidden_bias]
        return {"weight_ih": params["Wx"].T.copy(), "weight_hh": params["Wh"].T.copy(),
                "bias_ih": params["b"].copy(), "bias_hh": bias_hh}

    def from_torch(self, weights):
        """The layer's parameters from PyTorch's four arrays (the inverse of `to_torch`): the two biases
        summed into one, except that the last gate's block of ``bias_hh`` is the hidden_bias."""
        params = {"Wx": weights["weight_ih"].T.copy(), "Wh": weights["weight_hh"].T.copy()}
        b = weights["bias_ih"] + weights["bias_hh"]
        if self.hidden_bias:
            H = weights["weight_hh"].shape[1]
            b[-H:] = weights["bias_ih"][-H:]
            params[self.hidden_bias] = weights["bias_hh"][-H:].copy()
        params["b"] = b
        return params

    def onnx(self, graph, name, layer, x):
        """ONNX's operator with W, R and B from PyTorch's arrays, gate blocks in ONNX's order."""
        torch = self.to_torch(host_params(graph.model, name))
        order = gate_order(self.gates, self.onnx_gates)
        W, R, b_in, b_hid = (reorder_blocks(torch[k], order)
                             for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        return graph.recurrent(self.onnx_op, name, layer, x, W=graph.constant(f"{name}.W", W[None]),
                               R=graph.constant(f"{name}.R", R[None]),
                               B=graph.constant(f"{name}.B", np.concatenate([b_in, b_hid])[None]),
                               **self.onnx_attributes)
