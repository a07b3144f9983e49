"""Affine: a dense projection x W + b applied at every time step (B, T, H) -> (B, T, O).

Two classes behind the one layer type ``affine``: `TimeAffine` owns its weight; `TiedAffine`
(``tie_to="embedding"``, Press & Wolf 2017, Inan et al. 2017) has no weight of its own and uses that
layer's (V, D) table transposed. The model wires a tied one (`tie`) and, after backward, adds this
use's gradient to the table's (`add_tied_grads`), so the shared weight is one parameter whose
gradient is the sum of both uses.

The untied affine registers W then b, so in the model's flat buffer they are one (D+1, O) array
[W; b]; with a column of ones appended to x, [x 1] @ [W; b] adds the bias inside the GEMM and
[x 1]^T @ dout gives dW and db in one GEMM: no pass of its own over the B*T x O output.
"""

import numpy as np

from gpurnn.contract import ParamLayout
from gpurnn.errors import SpecError
from gpurnn.export import LayerExport
from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, init_matrix, require_input_size
from gpurnn.ops import column_sums, for_row_blocks, matmul


class TimeAffine(Layer):
    """Dense projection at every time step; output size defaults to the vocabulary (logits)."""

    param_layout = {"W": ParamLayout("x @ W + b", "input, output"), "b": ParamLayout("x @ W + b", "output")}

    def __new__(cls, ctx, output_size=None, init="default", tie_to=None):
        """``affine`` with ``tie_to`` builds a TiedAffine instead (one layer type for both in the specs)."""
        if tie_to is not None:
            return TiedAffine(ctx, output_size, init, tie_to)
        return super().__new__(cls)

    def __init__(self, ctx, output_size=None, init="default", tie_to=None):
        super().__init__(ctx)
        self.in_size = require_input_size(ctx, "affine")
        self.output_size = int(output_size or ctx.vocab_size)
        W = init_matrix(ctx.rng, (self.in_size, self.output_size), init, self.in_size, ctx.backend.dtype)
        self.Wb = self.xp.asarray(np.vstack([W, np.zeros((1, self.output_size), W.dtype)]), dtype=self.backend.dtype)
        self.adopt_buffers(self.Wb.reshape(-1), self.xp.zeros(self.Wb.size, self.Wb.dtype))
        self.x1 = None

    def adopt_buffers(self, param_block, grad_block):
        """W and b as views of one (D+1, O) block, [W; b], and the same for their gradients."""
        Wb = param_block.reshape(self.Wb.shape)
        Wb[...] = self.Wb
        self.Wb, self.dWb = Wb, grad_block.reshape(Wb.shape)
        self.params = {"W": self.Wb[:-1], "b": self.Wb[-1]}
        self.grads = {"W": self.dWb[:-1], "b": self.dWb[-1]}

    def forward(self, x):
        """All B*T rows in one GEMM: [x 1] @ [W; b]."""
        x2d = x.reshape(-1, x.shape[-1])
        self.x1 = self.xp.empty((x2d.shape[0], self.in_size + 1), x2d.dtype)
        self.x1[:, :-1] = x2d
        self.x1[:, -1] = 1
        return matmul(self.x1, self.Wb).reshape(*x.shape[:-1], self.output_size)

    def backward(self, dout):
        d2d = dout.reshape(-1, self.output_size)
        matmul(self.x1.T, d2d, out=self.dWb)  # dW and db (the ones column's row)
        dx = matmul(d2d, self.params["W"].T)
        return dx.reshape(*dout.shape[:-1], dx.shape[-1])


class TiedAffine(Layer):
    """Dense projection with another layer's (V, D) table transposed as its weight, and its own bias."""

    param_layout = {"b": ParamLayout("x @ E.T + b, E the tie_to layer's W (no weight stored here)", "output")}

    def __init__(self, ctx, output_size=None, init="default", tie_to=None):
        super().__init__(ctx)
        self.in_size = require_input_size(ctx, "affine")
        self.output_size = int(output_size or ctx.vocab_size)
        self.tie_to = tie_to
        self.source = None
        self.tied_grad = None
        self.add_param("b", np.zeros(self.output_size))
        self.x2d = None

    def tie(self, source):
        """Use `source.params["W"]` transposed as the weight; the model calls this once after building."""
        W = source.params.get("W")
        needed = (self.output_size, self.in_size)
        if W is None or W.shape != needed:
            found = "no weight W" if W is None else f"W of shape {W.shape}"
            raise SpecError(f"affine tie_to={self.tie_to!r}: that layer has {found}, tying needs {needed} "
                            f"(its size must equal the affine's input size)")
        self.source = source
        self.tied_grad = self.xp.zeros_like(W)

    @property
    def W(self):
        if self.source is None:
            raise SpecError(f"affine tie_to={self.tie_to!r} is not wired: build it inside a Model")
        return self.source.params["W"].T

    def forward(self, x):
        """All B*T rows in one GEMM, then the bias added in cache-sized row blocks."""
        self.x2d = x.reshape(-1, x.shape[-1])
        out = matmul(self.x2d, self.W)
        b = self.params["b"]

        def add_bias(lo, hi):
            out[lo:hi] += b

        for_row_blocks(out, add_bias)
        return out.reshape(*x.shape[:-1], self.output_size)

    def backward(self, dout):
        d2d = dout.reshape(-1, self.output_size)
        matmul(d2d.T, self.x2d, out=self.tied_grad)  # in the source's (V, D) layout
        column_sums(d2d, self.grads["b"])
        dx = matmul(d2d, self.W.T)
        return dx.reshape(*dout.shape[:-1], dx.shape[-1])

    def add_tied_grads(self):
        """Add this layer's use of the shared weight to the source's gradient (after the source's backward)."""
        self.source.grads["W"] += self.tied_grad


def affine_onnx(graph, name, layer, x):
    """ONNX: MatMul then Add; a tied affine reads the embedding's initializer, transposed (stored once)."""
    if layer.tie_to is None:
        W = graph.param(name, "W")
    else:
        W = graph.node("Transpose", [graph.param(layer.tie_to, "W")], perm=[1, 0])
    return graph.node("Add", [graph.node("MatMul", [x, W]), graph.param(name, "b")])


@hookimpl
def gpurnn_layer_types():
    return {"affine": TimeAffine}


@hookimpl
def gpurnn_layer_exports():
    return {"affine": LayerExport(affine_onnx)}
