"""Embedding: token ids (B, T) -> word vectors (B, T, D), a row lookup in a (V, D) table."""

from gpurnn.plugin import Layer, LayerExport, ParamLayout, hookimpl, init_matrix, scatter_add_rows


class TimeEmbedding(Layer):
    """Word embedding: ids (B, T) -> vectors (B, T, size); init N(0,1)/100 as the textbook."""

    takes_ids = True
    param_layout = {"W": ParamLayout("W[ids]: row v is token v's vector", "vocab, size")}

    def __init__(self, ctx, size=100, init="normal:0.01"):
        super().__init__(ctx)
        W = init_matrix(ctx.rng, (ctx.vocab_size, int(size)), init, ctx.vocab_size, ctx.backend.dtype)
        self.add_param("W", W)
        self.ids = None

    @property
    def output_size(self):
        return self.params["W"].shape[1]

    def forward(self, ids):
        self.ids = ids
        return self.params["W"][ids]

    def backward(self, dout):
        """Sum each output row's gradient into its token's row; no V x D array per step.

        With row-sparse gradients on (`sparse_rows` a dict, see `gpurnn.layers.Layer`) only the rows
        the last block wrote are cleared, and the rows this block writes are recorded: for a large
        vocabulary neither this nor the update then passes over the whole table.
        """
        dW = self.grads["W"]
        ids = self.ids.ravel()
        if self.sparse_rows is None:
            dW[...] = 0
        else:
            self._clear_rows(dW)
            self.sparse_rows = {"W": self.xp.unique(ids)}
        scatter_add_rows(dW, ids, dout.reshape(-1, self.output_size))
        return None

    def _clear_rows(self, dW):
        """Zero the rows the last block wrote. Before the first block every row is cleared, but only if
        one is not zero already: the gradient starts as untouched zero pages, which reading leaves
        unmapped, so a large table's gradient costs memory only for the rows blocks write."""
        rows = self.sparse_rows.get("W")
        if rows is not None:
            dW[rows] = 0
        elif dW.any():
            dW[...] = 0


def embedding_onnx(graph, name, layer, ids):
    """ONNX: the rows of the table, Gather(W, ids)."""
    return graph.node("Gather", [graph.param(name, "W"), ids], axis=0)


@hookimpl
def gpurnn_layer_types():
    return {"embedding": TimeEmbedding}


@hookimpl
def gpurnn_layer_exports():
    return {"embedding": LayerExport(embedding_onnx)}
