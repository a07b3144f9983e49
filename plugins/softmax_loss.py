"""Softmax with cross-entropy loss over all B*T positions (the loss layer of a language model)."""

from gpurnn.plugin import (IGNORE, Layer, LayerExport, SpecError, hookimpl, identity_at_inference, log_softmax,
                           softmax_cross_entropy, softmax_cross_entropy_backward, softmax_nll)


class TimeSoftmaxWithLoss(Layer):
    """Softmax cross-entropy, mean over all B*T targets; targets equal to IGNORE (-1) are ignored."""

    is_loss = True

    def __init__(self, ctx, ignore_index=IGNORE):
        super().__init__(ctx)
        self.ignore_index = ignore_index
        self.vocab_size = ctx.vocab_size
        self.cache = None
        self.buffer = None

    def _work_buffer(self, shape, dtype):
        """The (N, V) work buffer, reused between steps: it is the largest array of the model."""
        if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != dtype:
            self.buffer = self.xp.empty(shape, dtype)
        return self.buffer

    def forward(self, x, t):
        """Stable and fused (see `gpurnn.ops.softmax_cross_entropy`); the input is not modified.

        Returns the mean loss as a 0-d array on the device: nothing here waits for the GPU. In
        evaluation mode no N x V buffer is written (a backward then recomputes what it needs).
        """
        self._check_scores(x)
        x2 = x.reshape(-1, x.shape[-1])
        buffer = self._work_buffer(x2.shape, x2.dtype) if self.training else None
        loss, self.cache = softmax_cross_entropy(x2, t.reshape(-1), self.ignore_index, buffer)
        self.inputs, self.shape, self.buffered = (x2, t.reshape(-1)), x.shape, buffer is not None
        return loss

    def _check_scores(self, x):
        if x.shape[-1] != self.vocab_size:  # the targets are token ids: each needs its column
            raise SpecError(f"softmax_loss: its input has {x.shape[-1]} scores per position, not one for each "
                            f"of the {self.vocab_size} tokens (the layer before it needs output_size "
                            f"{self.vocab_size}, or none)")

    def target_log_prob(self, x, t):
        """log P(t | x) per position (B, T) on the device, 0 where t is the ignore index: the terms of
        the loss, one by one (for scoring)."""
        self._check_scores(x)
        return -softmax_nll(x.reshape(-1, x.shape[-1]), t.reshape(-1), self.ignore_index).reshape(t.shape)

    def backward(self, dout=1.0):
        """d loss / d x, written into the reused work buffer: valid until the next forward."""
        if not self.buffered:  # an evaluation-mode forward kept no buffer: run it again with one
            x2, t = self.inputs
            _, self.cache = softmax_cross_entropy(x2, t, self.ignore_index, self._work_buffer(x2.shape, x2.dtype))
        dx = softmax_cross_entropy_backward(self.cache, dout)
        self.cache = None
        return dx.reshape(self.shape)

    def log_prob(self, x):
        """The normalised log-distribution (B, T, V) of logits x: log softmax over the last axis."""
        return log_softmax(x.reshape(-1, x.shape[-1])).reshape(x.shape)


@hookimpl
def gpurnn_layer_types():
    return {"softmax_loss": TimeSoftmaxWithLoss}


@hookimpl
def gpurnn_layer_exports():
    return {"softmax_loss": LayerExport(identity_at_inference)}  # the graph's output is the logits it scores
