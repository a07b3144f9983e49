"""Two gpurnn layers: a ReLU RNN (stateful, on RecurrentLayer) and a residual tanh layer; and their exports."""

import numpy as np

from gpurnn.plugin import (Layer, LayerExport, ParamLayout, RecurrentExport, RecurrentLayer, hookimpl, init_matrix,
                           recurrent_layout, require_input_size)


class ReluRNN(RecurrentLayer):
    """Elman RNN with ReLU, h_t = max(0, x_t Wx + h_{t-1} Wh + b); carries h to the next block."""

    param_layout = recurrent_layout("")  # Wx (input, hidden), Wh (hidden, hidden), b (hidden,)

    def __init__(self, ctx, hidden_size=32, stateful=True, init_wx="default", init_wh="orthogonal"):
        # RecurrentLayer registers Wx, Wh (drawn by init_matrix from ctx.rng) and b (zeros).
        super().__init__(ctx, "relu_rnn", 1, hidden_size, stateful, init_wx, init_wh)

    def forward(self, xs):
        xp, Wh = self.xp, self.params["Wh"]
        x_tm, hs = self.project(xs)  # x_t Wx + b for all T steps at once, time-major (T, B, H)
        (h0,) = self.initial_state(xs.shape[0], xs.dtype)  # the carried h, or zeros
        h = h0
        for t in range(hs.shape[0]):
            hs[t] += h @ Wh
            xp.maximum(hs[t], 0, out=hs[t])
            h = hs[t]
        self.cache = (x_tm, h0, hs)
        self.keep_state(h)  # the next forward starts from here
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        x_tm, h0, hs = self.cache
        Wh_T = self.params["Wh"].T
        d_pre = self.xp.empty_like(hs)  # gradient of each step's pre-activation
        dh = 0
        for t in range(hs.shape[0] - 1, -1, -1):
            d_pre[t] = (dhs[:, t] + dh) * (hs[t] > 0)
            dh = d_pre[t] @ Wh_T
        return self.weight_grads(x_tm, h0, hs, d_pre)  # writes grads Wx, Wh, b; returns d xs


class Residual(Layer):
    """y = x + tanh(x W + b) at every time step (W square, drawn by init_matrix; b zeros)."""

    param_layout = {"W": ParamLayout("y = x + tanh(x @ W + b)", "input, input"),
                    "b": ParamLayout("y = x + tanh(x @ W + b)", "input")}

    def __init__(self, ctx, init="xavier"):
        super().__init__(ctx)
        D = self.output_size = require_input_size(ctx, "residual")  # the previous layer's size
        self.add_param("W", init_matrix(ctx.rng, (D, D), init, fan_in=D))
        self.add_param("b", np.zeros(D))

    def forward(self, x):
        self.x2d = x.reshape(-1, self.output_size)
        self.y = self.xp.tanh(self.x2d @ self.params["W"] + self.params["b"])
        return x + self.y.reshape(x.shape)

    def backward(self, dout):
        d2d = dout.reshape(-1, self.output_size)
        da = d2d * (1 - self.y ** 2)
        self.grads["W"][...] = self.x2d.T @ da
        self.grads["b"][...] = da.sum(axis=0)
        return dout + (da @ self.params["W"].T).reshape(dout.shape)


def residual_onnx(graph, name, layer, x):
    """The residual layer as ONNX nodes: x + Tanh(MatMul(x, W) + b), W and b as initializers."""
    projected = graph.node("Add", [graph.node("MatMul", [x, graph.param(name, "W")]), graph.param(name, "b")])
    return graph.node("Add", [x, graph.node("Tanh", [projected])])


@hookimpl
def gpurnn_layer_types():
    return {"relu_rnn": ReluRNN, "residual": Residual}


@hookimpl
def gpurnn_layer_exports():
    # ONNX's RNN operator with ReLU computes relu_rnn; so does PyTorch's nn.RNN(nonlinearity="relu").
    return {"relu_rnn": RecurrentExport("RNN", "RNN_RELU", onnx_attributes={"activations": ["Relu"]}),
            "residual": LayerExport(residual_onnx)}
