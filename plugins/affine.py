"""Affine: a dense projection x W + b applied at every time step (B, T, H) -> (B, T, O).

Weight tying (Press & Wolf 2017, Inan et al. 2017): with ``tie_to="embedding"`` the affine has no
weight of its own and uses that layer's (V, D) table transposed. The model wires it (`tie`) and,
after backward, adds this use's gradient to the table's (`add_tied_grads`), so the shared weight is
one parameter with the sum of both uses as its gradient.

Speed: an untied affine keeps W and b as one (D+1, O) array, W its first D rows and b its last (the
parameters `W` and `b` are views of it), and appends a column of ones to x, so [x 1] @ [W; b] adds the
bias inside the GEMM and [x 1]^T @ dout gives dW and db in one GEMM: no pass of its own over the
B*T x O output, which is the model's largest array. A tied affine adds its bias in threaded row blocks.
"""

import numpy as np

from gpurnn.backend import for_row_blocks
from gpurnn.contract import ParamLayout
from gpurnn.errors import SpecError
from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, column_sums, init_matrix, require_input_size


class TimeAffine(Layer):
    """Dense projection at every time step; output size defaults to the vocabulary (logits)."""

    param_layout = {"W": ParamLayout("x @ W + b", "input, output"),
                    "b": ParamLayout("x @ W + b (tied: W is the tie_to layer's W transposed, not stored here)",
                                     "output")}

    def __init__(self, ctx, output_size=None, init="default", tie_to=None):
        super().__init__(ctx)
        self.in_size = require_input_size(ctx, "affine")
        self.output_size = int(output_size or ctx.vocab_size)
        self.tie_to = tie_to
        self.source = None
        self.tied_grad = None
        if tie_to is None:
            W = init_matrix(ctx.rng, (self.in_size, self.output_size), init, self.in_size)
            self.Wb = self.add_param("Wb", np.vstack([W, np.zeros((1, self.output_size))]))
            self.dWb = self.grads["Wb"]
            self.params = {"W": self.Wb[:-1], "b": self.Wb[-1]}
            self.grads = {"W": self.dWb[:-1], "b": self.dWb[-1]}
        else:
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
        if self.source is not None:
            return self.source.params["W"].T
        if self.tie_to is not None:
            raise SpecError(f"affine tie_to={self.tie_to!r} is not wired: build it inside a Model")
        return self.params["W"]

    def forward(self, x):
        """All B*T rows in one GEMM (untied: [x 1] @ [W; b])."""
        x2d = x.reshape(-1, x.shape[-1])
        if self.tie_to is None:
            self.x2d = self.xp.empty((x2d.shape[0], self.in_size + 1), x2d.dtype)
            self.x2d[:, :-1] = x2d
            self.x2d[:, -1] = 1
            out = self.x2d @ self.Wb
        else:
            self.x2d = x2d
            out = x2d @ self.W
            b = self.params["b"]

            def add_bias(lo, hi):
                out[lo:hi] += b

            for_row_blocks(out, add_bias)
        return out.reshape(*x.shape[:-1], self.output_size)

    def backward(self, dout):
        xp = self.xp
        d2d = dout.reshape(-1, self.output_size)
        if self.tie_to is None:
            xp.matmul(self.x2d.T, d2d, out=self.dWb)  # dW and db (the ones column's row)
        else:
            xp.matmul(d2d.T, self.x2d, out=self.tied_grad)  # in the source's (V, D) layout
            column_sums(d2d, self.grads["b"])
        dx = d2d @ self.W.T
        return dx.reshape(*dout.shape[:-1], dx.shape[-1])

    def add_tied_grads(self):
        """Add this layer's use of the shared weight to the source's gradient (after the source's backward)."""
        self.source.grads["W"] += self.tied_grad


@hookimpl
def gpurnn_layer_types():
    return {"affine": TimeAffine}
