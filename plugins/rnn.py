"""The Elman RNN: h_t = tanh(h_{t-1} Wh + x_t Wx + b), stateful across truncated-BPTT blocks."""

from gpurnn.plugin import (RecurrentExport, RecurrentLayer, hookimpl, recurrent_layout, recurrent_loop, rnn_cell,
                           rnn_cell_backward, step_matmul)


class TimeRNN(RecurrentLayer):
    """Elman RNN over T steps; carries h to the next block (truncated BPTT)."""

    param_layout = recurrent_layout("")

    def __init__(self, ctx, hidden_size=100, stateful=True, init_wx="default", init_wh="default"):
        super().__init__(ctx, "rnn", 1, hidden_size, stateful, init_wx, init_wh)

    def forward(self, xs):
        """One GEMM projects all T inputs; each step is one GEMM (h_{t-1} Wh) and one fused tanh."""
        xp, Wh = self.xp, self.params["Wh"]
        x_tm, hs = self.project(xs)
        (h0,) = self.initial_state(xs.shape[0], xs.dtype)
        recurrent = xp.empty_like(h0)
        h = h0
        with recurrent_loop(h0, Wh):
            for t in range(hs.shape[0]):
                step_matmul(h, Wh, recurrent)
                h = rnn_cell(hs[t], recurrent)
        self.cache = (x_tm, h0, hs)
        self.keep_state(hs[-1])
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        """Back through the block only (the carried h0 is a constant); weight gradients in one GEMM each."""
        xp = self.xp
        x_tm, h0, hs = self.cache
        Wh_T = xp.ascontiguousarray(self.params["Wh"].T)
        dhs_tm = xp.ascontiguousarray(dhs.transpose(1, 0, 2))
        dts = xp.empty_like(hs)
        rec = xp.empty_like(h0)
        with recurrent_loop(h0, Wh_T):
            for t in range(hs.shape[0] - 1, -1, -1):
                if t < hs.shape[0] - 1:  # what flows back from step t + 1
                    step_matmul(dts[t + 1], Wh_T, rec)
                rnn_cell_backward(dhs_tm[t], rec if t < hs.shape[0] - 1 else None, hs[t], dts[t])
        return self.weight_grads(x_tm, h0, hs, dts)


@hookimpl
def gpurnn_layer_types():
    return {"rnn": TimeRNN}


@hookimpl
def gpurnn_layer_exports():
    """ONNX's RNN (tanh, its default) and PyTorch's nn.RNN (RNNModel's RNN_TANH)."""
    return {"rnn": RecurrentExport("RNN", "RNN_TANH")}
