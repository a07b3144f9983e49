"""Everything a layer plugin needs, from one module: ``from gpurnn.plugin import ...``.

A plugin (the built-in ones in ``plugins/`` included) imports gpurnn through this module only, so
what a plugin may rely on is this list and nothing else; the modules behind it may move. In groups:

    registering    hookimpl (the marker of `gpurnn_layer_types` / `gpurnn_layer_exports`)
    the contract   LayerContract, StatefulLayerContract, ParamLayout, SpecError, Array
    base classes   Layer, RecurrentLayer, LayerContext, recurrent_layout, require_input_size
    initialisers   init_matrix
    exports        LayerExport, RecurrentExport, identity_at_inference
    ops            the NumPy/CuPy operations a layer may call (GEMMs, cells and their gate views,
                   losses, dropout, the embedding's scatter, the CPU helpers of the recurrent loop)
    data           IGNORE, the target the loss layers skip

The conformance kit a plugin's tests run is `gpurnn.testing` (``check_layer``), kept apart: tests
import it, layers do not.
"""

from __future__ import annotations

from .contract import Array, LayerContract, ParamLayout, StatefulLayerContract
from .data.stream import IGNORE
from .errors import SpecError
from .export import LayerExport, RecurrentExport, identity_at_inference
from .hookspecs import hookimpl
from .layers import Layer, LayerContext, RecurrentLayer, init_matrix, recurrent_layout, require_input_size
from .ops import (AdaptiveClusters, GRUGates, LSTMGates, Workspace, adaptive_log_prob, adaptive_nll,
                  adaptive_softmax_loss, adaptive_softmax_loss_backward, column_sums, dropout, for_row_blocks,
                  gru_cell, gru_cell_backward, gru_gates, log_softmax, lstm_backward_factors, lstm_cell,
                  lstm_cell_backward, lstm_gates, matmul, recurrent_loop, rnn_cell, rnn_cell_backward,
                  scatter_add_rows, sigmoid, softmax_cross_entropy, softmax_cross_entropy_backward, softmax_nll,
                  step_matmul, default_chunk_rows, output_log_prob, output_loss, output_nll)

__all__ = [
    # registering
    "hookimpl",
    # the contract
    "Array", "LayerContract", "ParamLayout", "SpecError", "StatefulLayerContract",
    # base classes and initialisers
    "Layer", "LayerContext", "RecurrentLayer", "init_matrix", "recurrent_layout", "require_input_size",
    # exports
    "LayerExport", "RecurrentExport", "identity_at_inference",
    # ops: matrix products and the CPU helpers around them
    "column_sums", "for_row_blocks", "matmul", "recurrent_loop", "step_matmul",
    # ops: recurrent cells and their gates
    "GRUGates", "LSTMGates", "gru_cell", "gru_cell_backward", "gru_gates", "lstm_backward_factors", "lstm_cell",
    "lstm_cell_backward", "lstm_gates", "rnn_cell", "rnn_cell_backward", "sigmoid",
    # ops: losses, dropout, embedding
    "AdaptiveClusters", "Workspace", "adaptive_log_prob", "adaptive_nll", "adaptive_softmax_loss",
    "adaptive_softmax_loss_backward", "log_softmax", "softmax_cross_entropy", "softmax_cross_entropy_backward",
    "softmax_nll", "dropout", "scatter_add_rows",
    # ops: the fused output layer (affine + softmax cross-entropy in chunks of rows)
    "default_chunk_rows", "output_log_prob", "output_loss", "output_nll",
    # data
    "IGNORE",
]
