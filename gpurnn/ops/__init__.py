"""The operations whose body differs between NumPy and CuPy: one seam, each op with both bodies.

Layers say *what* (a cell step, a loss, an update); this package says *how*, per backend. Each op
dispatches on its arrays' module: the NumPy body is plain array code written to read memory once
(in place, in cache-sized blocks, on the thread pool when the work is large enough to pay for it);
the CuPy body launches one named CUDA kernel whose source stands right beside it. One module per
op family:

    threads    the CPU thread pool and BLAS thread control (NumPy only)
    kernels    the CUDA preamble, compilation per float type, the launch
    linear     matrix products the layers share (on CuPy: cuBLAS GEMMs called directly, so they capture)
    cells      recurrent cells (Elman, LSTM, GRU), forward and backward steps
    losses     softmax cross-entropy over the vocabulary
    output     the fused output layer's affine + softmax cross-entropy in chunks of rows
    adaptive   the adaptive softmax for large vocabularies, and normalised log-distributions
    embedding  the embedding's backward (rows added at repeated indices)
    dropout    masks from a counter-based hash
    updates    optimizer updates over flat buffers

Nothing here waits for the GPU: scalars that change between steps (the learning rate, the clip
norm, the dropout step) are read from device memory by the kernels, so a whole training step can
be captured once as a CUDA graph and replayed.
"""

from .adaptive import (AdaptiveClusters, Workspace, adaptive_log_prob, adaptive_nll, adaptive_softmax_loss,
                       adaptive_softmax_loss_backward, log_softmax)
from .cells import (GRUGates, LSTMGates, gru_cell, gru_cell_backward, gru_gates, lstm_backward_factors, lstm_cell,
                    lstm_cell_backward, lstm_gates, rnn_cell, rnn_cell_backward, sigmoid)
from .dropout import dropout, dropout_key
from .embedding import scatter_add_rows
from .kernels import KERNELS, kernel_source
from .linear import bind_cublas_to_current_stream, column_sums, matmul
from .losses import softmax_cross_entropy, softmax_cross_entropy_backward, softmax_nll
from .output import default_chunk_rows, output_log_prob, output_loss, output_nll
from .threads import cpu_threads, for_row_blocks, recurrent_loop, step_matmul, training_threads
from .updates import adam_update, clip_factor, sgd_update, squared_norm

__all__ = [
    "AdaptiveClusters", "GRUGates", "KERNELS", "LSTMGates", "Workspace", "adam_update", "adaptive_log_prob",
    "adaptive_nll", "adaptive_softmax_loss", "adaptive_softmax_loss_backward", "bind_cublas_to_current_stream",
    "clip_factor", "column_sums", "cpu_threads", "default_chunk_rows", "dropout", "dropout_key", "for_row_blocks", "gru_cell",
    "gru_cell_backward", "gru_gates", "kernel_source", "log_softmax", "lstm_backward_factors", "lstm_cell",
    "lstm_cell_backward", "lstm_gates", "matmul", "output_log_prob", "output_loss", "output_nll", "recurrent_loop", "rnn_cell", "rnn_cell_backward",
    "scatter_add_rows", "sgd_update", "sigmoid", "softmax_cross_entropy", "softmax_cross_entropy_backward",
    "softmax_nll", "squared_norm", "step_matmul", "training_threads",
]
