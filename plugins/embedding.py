"""Embedding: token ids (B, T) -> word vectors (B, T, D), a row lookup in a (V, D) table."""

from gpurnn.contract import ParamLayout
from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, init_matrix
from gpurnn.ops import scatter_add_rows


class TimeEmbedding(Layer):
    """Word embedding: ids (B, T) -> vectors (B, T, size); init N(0,1)/100 as the textbook."""

    takes_ids = True
    param_layout = {"W": ParamLayout("W[ids]: row v is token v's vector", "vocab, size")}

    def __init__(self, ctx, size=100, init="normal:0.01"):
        super().__init__(ctx)
        self.output_size = int(size)
        self.add_param("W", init_matrix(ctx.rng, (ctx.vocab_size, self.output_size), init, ctx.vocab_size,
                                        dtype=ctx.backend.dtype))  # vocabulary-sized: never whole in float64
        self.ids = None

    def forward(self, ids):
        self.ids = ids
        return self.params["W"][ids]

    def backward(self, dout):
        """Sum each output row's gradient into its token's row; no V x D array per step."""
        dW = self.grads["W"]
        dW[...] = 0
        scatter_add_rows(dW, self.ids.ravel(), dout.reshape(-1, self.output_size))
        return None


@hookimpl
def gpurnn_layer_types():
    return {"embedding": TimeEmbedding}
