"""Softmax with cross-entropy loss over all B*T positions (the loss layer of a language model)."""

from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer


class TimeSoftmaxWithLoss(Layer):
    """Softmax cross-entropy, mean over all B*T targets; targets equal to -1 are ignored."""

    is_loss = True

    def __init__(self, ctx, ignore_index=-1):
        super().__init__(ctx)
        self.ignore_index = ignore_index
        self.cache = None

    def forward(self, x, t):
        """Stable log-softmax: subtract the row max, never build one-hot targets.

        Returns the mean loss as a 0-d array on the device: nothing here waits for the GPU.
        """
        xp = self.xp
        x2 = x.reshape(-1, x.shape[-1])
        t1 = t.reshape(-1)
        valid = t1 != self.ignore_index
        target = xp.where(valid, t1, 0)
        count = xp.maximum(valid.sum(), 1).astype(x.dtype)
        rows = xp.arange(x2.shape[0])
        e = x2 - x2.max(axis=1, keepdims=True)
        picked = e[rows, target]  # x[t] - max, read before exp overwrites e
        xp.exp(e, out=e)
        s = e.sum(axis=1, keepdims=True)
        e /= s
        nll = xp.log(s[:, 0]) - picked
        self.cache = (e, rows, target, valid, count, x.shape)
        return (nll * valid).sum() / count

    def backward(self, dout=1.0):
        """d loss / d x = (softmax - onehot) / count, written into the cached probabilities."""
        probs, rows, target, valid, count, shape = self.cache
        self.cache = None  # dx reuses the probabilities' buffer: one backward per forward
        probs[rows, target] -= 1
        probs *= (valid * (dout / count)).astype(probs.dtype)[:, None]
        return probs.reshape(shape)


@hookimpl
def gpurnn_layer_types():
    return {"softmax_loss": TimeSoftmaxWithLoss}
