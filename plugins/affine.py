"""Affine: a dense projection x W + b applied at every time step (B, T, H) -> (B, T, O).

Two layer types: ``affine`` (`TimeAffine`) owns its weight; ``tied_affine`` (`TiedAffine`, Press &
Wolf 2017, Inan et al. 2017) has no weight of its own and uses the (V, D) table of the layer named by
``tie_to`` (default ``"embedding"``) transposed. The model wires a tied one (`tie`) and, after
backward, adds this use's gradient to the table's (`add_tied_grads`), so the shared weight is one
parameter whose gradient is the sum of both uses.

The untied affine registers W then b, so in the model's flat buffer they are one (D+1, O) array
[W; b]; with a column of ones appended to x, [x 1] @ [W; b] adds the bias inside the GEMM and
[x 1]^T @ dout gives dW and db in one GEMM: no pass of its own over the B*T x O output.
"""

import numpy as np

from gpurnn.plugin import (Layer, LayerExport, ParamLayout, SpecError, column_sums, for_row_blocks, hookimpl,
                           init_matrix, matmul, require_input_size)


class TimeAffine(Layer):
    """Dense projection at every time step; output size defaults to the vocabulary (logits)."""

    param_layout = {"W": ParamLayout("x @ W + b", "input, output"), "b": ParamLayout("x @ W + b", "output")}

    def __init__(self, ctx, output_size=None, init="default", tie_to=None):
        super().__init__(ctx)
        if tie_to is not None:
            raise SpecError(f"affine has a weight of its own; an output layer sharing {tie_to!r}'s table is "
                            f"the layer type 'tied_affine' (type = \"tied_affine\", tie_to = {tie_to!r})")
        in_size, out_size = require_input_size(ctx, "affine"), int(output_size or ctx.vocab_size)
        W = init_matrix(ctx.rng, (in_size, out_size), init, in_size, ctx.backend.dtype)
        self.Wb = self.xp.asarray(np.vstack([W, np.zeros((1, out_size), W.dtype)]), dtype=self.backend.dtype)
        self.adopt_buffers(self.Wb.reshape(-1), self.xp.zeros(self.Wb.size, self.Wb.dtype))
        self.x1 = None

    def adopt_buffers(self, param_block, grad_block):
        """W and b as views of one (D+1, O) block, [W; b], and the same for their gradients."""
        Wb = param_block.reshape(self.Wb.shape)
        Wb[...] = self.Wb
        self.Wb, self.dWb = Wb, grad_block.reshape(Wb.shape)
        self.params = {"W": self.Wb[:-1], "b": self.Wb[-1]}
        self.grads = {"W": self.dWb[:-1], "b": self.dWb[-1]}

    @property
    def output_size(self):
        return self.Wb.shape[1]

    def forward(self, x):
        """All B*T rows in one GEMM: [x 1] @ [W; b]."""
        x2d = x.reshape(-1, x.shape[-1])
        self.x1 = self.xp.empty((x2d.shape[0], x2d.shape[1] + 1), x2d.dtype)
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

    def __init__(self, ctx, tie_to="embedding", output_size=None):
        super().__init__(ctx)
        self.in_size = require_input_size(ctx, "tied_affine")
        self.tie_to = tie_to
        self.source = None
        self.tied_grad = None
        self.add_param("b", np.zeros(int(output_size or ctx.vocab_size)))
        self.x2d = None

    @property
    def output_size(self):
        return self.params["b"].shape[0]

    def tie(self, source):
        """Use `source.params["W"]` transposed as the weight; the model calls this once after building."""
        W = source.params.get("W")
        needed = (self.output_size, self.in_size)
        if W is None or W.shape != needed:
            found = "no weight W" if W is None else f"W of shape {W.shape}"
            raise SpecError(f"tied_affine tie_to={self.tie_to!r}: that layer has {found}, tying needs {needed} "
                            f"(its size must equal the tied affine's input size)")
        self.source = source
        self.tied_grad = self.xp.zeros_like(W)

    @property
    def W(self):
        if self.source is None:
            raise SpecError(f"tied_affine tie_to={self.tie_to!r} is not wired: build it inside a Model")
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
    """ONNX: MatMul then Add."""
    return graph.node("Add", [graph.node("MatMul", [x, graph.param(name, "W")]), graph.param(name, "b")])


def tied_affine_onnx(graph, name, layer, x):
    """ONNX: MatMul with the tied table's initializer, transposed (stored once), then Add."""
    W = graph.node("Transpose", [graph.param(layer.tie_to, "W")], perm=[1, 0])
    return graph.node("Add", [graph.node("MatMul", [x, W]), graph.param(name, "b")])


@hookimpl
def gpurnn_layer_types():
    return {"affine": TimeAffine, "tied_affine": TiedAffine}


@hookimpl
def gpurnn_layer_exports():
    return {"affine": LayerExport(affine_onnx), "tied_affine": LayerExport(tied_affine_onnx)}
