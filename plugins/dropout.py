"""Inverted dropout: in training, zero each value with probability p and scale the rest by 1/(1-p).

Scaling while training (not at test time) makes evaluation and generation a plain identity. The mask
is a pure function of (model seed, training iteration, layer position, element): no generator state
exists, so a resumed run draws the masks an uninterrupted one would, on NumPy and CuPy alike, and
backward re-applies the same mask instead of storing it.
"""

import numpy as np

from gpurnn.plugin import (Layer, LayerExport, SpecError, dropout, hookimpl, identity_at_inference,
                           require_input_size)


class TimeDropout(Layer):
    """Inverted dropout with probability p while training; identity in evaluation."""

    def __init__(self, ctx, p=0.5):
        super().__init__(ctx)
        if not 0 <= p < 1:
            raise SpecError(f"dropout p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.output_size = require_input_size(ctx, "dropout")
        self.seed, self.index, self.first_lane = ctx.seed, ctx.index, ctx.first_lane
        self.step = ctx.step if ctx.step is not None else self.xp.zeros(1, np.uint32)
        self.active = False

    def forward(self, x):
        self.active = self.training and self.p > 0
        if not self.active:
            return x
        return dropout(x, self.xp.empty(x.shape, x.dtype), self.p, self.seed, self.step, self.index, self.first_lane)

    def backward(self, dout):
        if not self.active:
            return dout
        return dropout(dout, self.xp.empty(dout.shape, dout.dtype), self.p, self.seed, self.step, self.index,
                       self.first_lane)


@hookimpl
def gpurnn_layer_types():
    return {"dropout": TimeDropout}


@hookimpl
def gpurnn_layer_exports():
    return {"dropout": LayerExport(identity_at_inference)}  # an identity at inference: left out of the graph
