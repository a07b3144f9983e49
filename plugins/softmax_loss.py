"""Softmax with cross-entropy loss over all B*T positions (the loss layer of a language model)."""

from gpurnn.backend import for_row_blocks
from gpurnn.data.stream import IGNORE
from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer


class TimeSoftmaxWithLoss(Layer):
    """Softmax cross-entropy, mean over all B*T targets; targets equal to IGNORE (-1) are ignored."""

    is_loss = True

    def __init__(self, ctx, ignore_index=IGNORE):
        super().__init__(ctx)
        self.ignore_index = ignore_index
        self.cache = None
        self.buffer = None

    def _exp_buffer(self, shape, dtype):
        """The (N, V) work buffer, reused between steps: it is the largest array of the model."""
        if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != dtype:
            self.buffer = self.xp.empty(shape, dtype)
        return self.buffer

    def forward(self, x, t):
        """Stable and fused: per block of rows, max, x - max, exp and row sums while the block is in cache.

        The division by the row sums is left to backward (one pass fewer); the input is not modified.
        Returns the mean loss as a 0-d array on the device: nothing here waits for the GPU.
        """
        xp = self.xp
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        t1 = t.reshape(-1)
        valid = t1 != self.ignore_index
        target = xp.where(valid, t1, 0)
        e = self._exp_buffer(x2.shape, x2.dtype)
        nll = xp.empty(n, x2.dtype)
        inv_sum = xp.empty((n, 1), x2.dtype)
        rows = xp.arange(n)

        def block(lo, hi):
            eb = e[lo:hi]
            xp.subtract(x2[lo:hi], x2[lo:hi].max(axis=1, keepdims=True), out=eb)
            picked = eb[rows[: hi - lo], target[lo:hi]]  # x[t] - max, read before exp overwrites it
            xp.exp(eb, out=eb)
            s = eb.sum(axis=1)
            nll[lo:hi] = xp.log(s) - picked
            inv_sum[lo:hi, 0] = 1 / s

        for_row_blocks(x2, block)
        count = xp.maximum(valid.sum(), 1).astype(x.dtype)
        self.cache = (e, inv_sum, rows, target, valid, count, x.shape)
        return (nll * valid).sum() / count

    def backward(self, dout=1.0):
        """d loss / d x = (exp / sum - onehot) * dout / count, written over the exp buffer."""
        e, inv_sum, rows, target, valid, count, shape = self.cache
        self.cache = None  # dx lives in the reused buffer: valid until the next forward
        weight = (valid * (dout / count)).astype(e.dtype)
        scale = inv_sum * weight[:, None]

        def block(lo, hi):
            e[lo:hi] *= scale[lo:hi]

        for_row_blocks(e, block)
        e[rows, target] -= weight
        return e.reshape(shape)


@hookimpl
def gpurnn_layer_types():
    return {"softmax_loss": TimeSoftmaxWithLoss}
