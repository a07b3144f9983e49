"""The LSTM: gated cell state c and output h, stateful across truncated-BPTT blocks.

Gate order i, f, g, o (PyTorch's, so its weights map over without reordering):

    i, f, o = sigmoid(.),  g = tanh(.)   of   x_t Wx + h_{t-1} Wh + b   split in four H-wide blocks
    c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)

Wx (D, 4H), Wh (H, 4H), b (4H,). PyTorch's two biases b_ih + b_hh are one bias here.
"""

from gpurnn.plugin import (RecurrentExport, RecurrentLayer, hookimpl, lstm_backward_factors, lstm_cell,
                           lstm_cell_backward, recurrent_layout, recurrent_loop, step_matmul)

GATES = "i,f,g,o"  # PyTorch's order; ONNX's is i, o, f, c (its c is our g)


class TimeLSTM(RecurrentLayer):
    """LSTM over T steps (gates i, f, g, o); carries h and c to the next block (truncated BPTT)."""

    state_names = ("h", "c")
    param_layout = recurrent_layout(GATES)

    def __init__(self, ctx, hidden_size=100, stateful=True, init_wx="default", init_wh="default"):
        super().__init__(ctx, "lstm", 4, hidden_size, stateful, init_wx, init_wh)

    def forward(self, xs):
        """One GEMM projects all T inputs to the four gates; each step is one GEMM and one fused cell."""
        xp, Wh = self.xp, self.params["Wh"]
        x_tm, gates = self.project(xs)  # pre-activations, turned into gate values step by step
        h0, c0 = self.initial_state(xs.shape[0], xs.dtype)
        hs, cs = xp.empty((2, gates.shape[0]) + h0.shape, xs.dtype)
        recurrent = xp.empty_like(gates[0])
        h, c = h0, c0
        with recurrent_loop(h0, Wh):
            for t in range(gates.shape[0]):
                step_matmul(h, Wh, recurrent)
                h = lstm_cell(gates[t], recurrent, c, cs[t], hs[t])
                c = cs[t]
        self.cache = (x_tm, h0, c0, gates, hs, cs)
        self.keep_state(h, c)
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        """Back through the block only (carried h0, c0 are constants); weight gradients in one GEMM each.

        What does not depend on the incoming gradient (each gate's derivative times what the gate
        multiplies) is computed for all T steps at once into the gate-gradient array, so each step
        of the loop is one GEMM (das_{t+1} Wh^T) and one fused kernel that scales by dc and dh:

            dh_t = dhs_t + das_{t+1} Wh^T,   dc_t = dc_{t+1} * f_{t+1} + dh_t * o(1 - tanh^2 c_t)
        """
        xp = self.xp
        x_tm, h0, c0, gates, hs, cs = self.cache
        Wh_T = xp.ascontiguousarray(self.params["Wh"].T)  # row-major: faster GEMMs with few rows
        T = gates.shape[0]
        das = xp.empty_like(gates)  # first the factors, then (in the loop) the gate gradients
        dc_from_dh = xp.empty_like(cs)
        lstm_backward_factors(gates, cs, c0, das, dc_from_dh)
        dhs_tm = xp.ascontiguousarray(dhs.transpose(1, 0, 2))
        dc = xp.zeros_like(h0)
        rec = xp.empty_like(h0)
        with recurrent_loop(das[0], Wh_T):
            for t in range(T - 1, -1, -1):
                last = t == T - 1
                if not last:  # what flows back from step t + 1
                    step_matmul(das[t + 1], Wh_T, rec)
                lstm_cell_backward(dhs_tm[t], None if last else rec, None if last else gates[t + 1],
                                   dc_from_dh[t], dc, das[t])
        return self.weight_grads(x_tm, h0, hs, das)


@hookimpl
def gpurnn_layer_types():
    return {"lstm": TimeLSTM}


@hookimpl
def gpurnn_layer_exports():
    """ONNX's LSTM (gates reordered to i, o, f, c) and PyTorch's nn.LSTM (the same order as here)."""
    return {"lstm": RecurrentExport("LSTM", "LSTM", gates=GATES, onnx_gates="i,o,f,g")}
