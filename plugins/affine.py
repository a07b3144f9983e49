"""Affine: a dense projection x W + b applied at every time step (B, T, H) -> (B, T, O)."""

import numpy as np

from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, init_matrix, require_input_size


class TimeAffine(Layer):
    """Dense projection at every time step; output size defaults to the vocabulary (logits)."""

    def __init__(self, ctx, output_size=None, init="default"):
        super().__init__(ctx)
        in_size = require_input_size(ctx, "affine")
        self.output_size = int(output_size or ctx.vocab_size)
        self.add_param("W", init_matrix(ctx.rng, (in_size, self.output_size), init, in_size))
        self.add_param("b", np.zeros(self.output_size))
        self.x2d = None

    def forward(self, x):
        """All B*T rows in one GEMM."""
        self.x2d = x.reshape(-1, x.shape[-1])
        out = self.x2d @ self.params["W"]
        out += self.params["b"]
        return out.reshape(*x.shape[:-1], self.output_size)

    def backward(self, dout):
        d2d = dout.reshape(-1, self.output_size)
        self.xp.matmul(self.x2d.T, d2d, out=self.grads["W"])
        d2d.sum(axis=0, out=self.grads["b"])
        dx = d2d @ self.params["W"].T
        return dx.reshape(*dout.shape[:-1], dx.shape[-1])


@hookimpl
def gpurnn_layer_types():
    return {"affine": TimeAffine}
