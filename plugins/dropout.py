"""Inverted dropout: in training, zero each value with probability p and scale the rest by 1/(1-p).

Scaling while training (not at test time) makes evaluation and generation a plain identity. The mask
is drawn on the device from the model's generator, so a checkpoint that saves the generator's state
lets a resumed run draw the same masks as an uninterrupted one.
"""

from gpurnn.errors import SpecError
from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, require_input_size


class TimeDropout(Layer):
    """Inverted dropout with probability p while training; identity in evaluation."""

    def __init__(self, ctx, p=0.5):
        super().__init__(ctx)
        if not 0 <= p < 1:
            raise SpecError(f"dropout p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.output_size = require_input_size(ctx, "dropout")
        self.generator = ctx.generator if ctx.generator is not None else ctx.backend.generator(0)
        self.mask = None

    def forward(self, x):
        if not self.training or self.p == 0:
            self.mask = None
            return x
        keep = self.generator.random(x.shape, dtype=x.dtype) >= self.p
        self.mask = keep.astype(x.dtype)
        self.mask *= 1 / (1 - self.p)
        return x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask


@hookimpl
def gpurnn_layer_types():
    return {"dropout": TimeDropout}
