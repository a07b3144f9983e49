"""The fused output layer: affine + softmax cross-entropy in one loss layer, over chunks of rows.

``affine_softmax_loss`` replaces the pair ``affine`` -> ``softmax_loss`` with the same numbers (to
rounding) and the same parameters (W (D, V) and b, or with ``tie_to`` only b, the named layer's
(V, D) table transposed serving as W, wired by the model as `affine`'s tied form is). It reads the
last features (B, T, D), not logits: the N x V logits never exist, only one chunk's (see
`gpurnn.ops.output`). In training its forward already turns each chunk's gradient into dx, dW and
db (for dout = 1), so backward only scales them by dout; no logits are kept or recomputed.

Chunk rows: by default at least 1,024, more where their logits fit half the largest cache, fewer
where they would pass 512 MiB (`gpurnn.ops.output.default_chunk_rows`); ``chunk_rows`` sets them.
"""

import numpy as np

from gpurnn.plugin import (IGNORE, Layer, LayerExport, ParamLayout, SpecError, Workspace, default_chunk_rows,
                           hookimpl, init_matrix, output_log_prob, output_loss, output_nll, require_input_size)

NAME = "affine_softmax_loss"


class AffineSoftmaxWithLoss(Layer):
    """Affine + softmax cross-entropy in chunks of rows: the output layer without its N x V logits."""

    is_loss = True
    owns_affine = True  # export: it stands for affine + softmax_loss (PyTorch's decoder, ONNX's logits)
    logits_per_row = 2  # what it holds per position: a log-sum-exp and a loss (a chunk's logits are apart)

    def __init__(self, ctx, init="default", tie_to=None, chunk_rows=None, ignore_index=IGNORE):
        super().__init__(ctx)
        D = self.input_size = require_input_size(ctx, NAME)
        V = self.output_size = ctx.vocab_size
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise SpecError(f"{NAME}: chunk_rows must be a positive integer, not {chunk_rows!r}")
        self.rows = chunk_rows or default_chunk_rows(V, ctx.backend.dtype, self.xp)
        self.tie_to, self.source, self.tied_grad = tie_to, None, None
        self.ignore_index = ignore_index
        self.param_layout = {"b": ParamLayout("x @ W + b", "output")}
        if tie_to is None:
            self.add_param("W", init_matrix(ctx.rng, (D, V), init, D, ctx.backend.dtype))
            self.param_layout = {"W": ParamLayout("x @ W + b", "input, output"), **self.param_layout}
        self.add_param("b", np.zeros(V))
        self.work = Workspace()
        self.inputs = self.grads_for = None

    def tie(self, source):
        """Use `source.params["W"]` (V, D) transposed as the weight; the model calls this once after building."""
        W = source.params.get("W")
        if W is None or W.shape != (self.output_size, self.input_size):
            found = "no weight W" if W is None else f"W of shape {W.shape}"
            raise SpecError(f"{NAME} tie_to={self.tie_to!r}: that layer has {found}; tying needs "
                            f"{(self.output_size, self.input_size)} (its size must equal this layer's input size)")
        self.source, self.tied_grad = source, self.xp.zeros_like(W)

    def add_tied_grads(self):
        """Add this layer's use of the shared weight to the source's gradient (after the source's backward)."""
        self.source.grads["W"] += self.tied_grad

    def _weight(self):
        """(W (D, V), its gradient): this layer's own, or the tied table's transposed views."""
        if self.tie_to is None:
            return self.params["W"], self.grads["W"]
        if self.source is None:
            raise SpecError(f"{NAME} tie_to={self.tie_to!r} is not wired: build it inside a Model")
        return self.source.params["W"].T, self.tied_grad.T

    def chunk_size(self, n):
        """Rows per chunk for a block of n rows: at most `chunk_rows` (or the default rule's, read once when
        built), spread evenly over the chunks that takes (2,240 rows at most 1,024 a chunk: three of 747)."""
        n = max(n, 1)
        return -(-n // -(-n // self.rows))

    def forward(self, x, t):
        """Mean loss over the scored targets, a 0-d array; in training also the gradients for dout = 1."""
        x2, t2 = x.reshape(-1, x.shape[-1]), t.reshape(-1)
        self.inputs, self.shape = (x2, t2), x.shape
        self.grads_for = self._grads(x2) if self.training else None
        return self._loss(self.grads_for)

    def _grads(self, x2):
        """(dx, dW, db) for the block: dx in the reused work space, dW and db the gradients themselves."""
        W, dW = self._weight()
        return self.work.get(self.xp, "dx", x2.shape, x2.dtype), dW, self.grads["b"]

    def _loss(self, grads):
        """The last forward's loss over its chunks, writing `grads` (dx, dW, db) when given."""
        x2, t2 = self.inputs
        W, _ = self._weight()
        return output_loss(x2, t2, W, self.params["b"], self.ignore_index, self.chunk_size(x2.shape[0]),
                           self.work, grads)

    def backward(self, dout=1.0):
        """d loss / d x (valid until the next forward), and the gradients, scaled by dout."""
        if self.grads_for is None:  # an evaluation-mode forward: run it again with gradients
            self.grads_for = self._grads(self.inputs[0])
            self._loss(self.grads_for)
        grads, self.grads_for = self.grads_for, None
        if not (isinstance(dout, (int, float)) and dout == 1):
            for g in grads:
                g *= dout
        return grads[0].reshape(self.shape)

    def target_log_prob(self, x, t):
        """log P(t | x) per position (B, T), 0 where t is the ignore index, chunk by chunk (for scoring)."""
        x2 = x.reshape(-1, x.shape[-1])
        W, _ = self._weight()
        nll = output_nll(x2, t.reshape(-1), W, self.params["b"], self.ignore_index, self.chunk_size(x2.shape[0]),
                         self.work)
        return -nll.reshape(t.shape)

    def log_prob(self, x):
        """The normalised log-distribution (B, T, V) of features x: log softmax of x W + b, chunk by chunk."""
        x2 = x.reshape(-1, x.shape[-1])
        W, _ = self._weight()
        lp = output_log_prob(x2, W, self.params["b"], self.chunk_size(x2.shape[0]))
        return lp.reshape(*x.shape[:-1], -1)


def output_onnx(graph, name, layer, x):
    """ONNX: the logits, x @ W + b (a tied W read from the embedding's initializer, transposed)."""
    weight = (graph.param(name, "W") if layer.tie_to is None
              else graph.node("Transpose", [graph.param(layer.tie_to, "W")], perm=[1, 0]))
    return graph.node("Add", [graph.node("MatMul", [x, weight]), graph.param(name, "b")])


@hookimpl
def gpurnn_layer_types():
    return {NAME: AffineSoftmaxWithLoss}


@hookimpl
def gpurnn_layer_exports():
    return {NAME: LayerExport(output_onnx)}
