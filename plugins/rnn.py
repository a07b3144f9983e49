"""The Elman RNN: h_t = tanh(h_{t-1} Wh + x_t Wx + b), stateful across truncated-BPTT blocks."""

from gpurnn.hookspecs import hookimpl
from gpurnn.layers import RecurrentLayer, recurrent_layout


class TimeRNN(RecurrentLayer):
    """Elman RNN over T steps; carries h to the next block (truncated BPTT)."""

    param_layout = recurrent_layout("")

    def __init__(self, ctx, hidden_size=100, stateful=True, init_wx="default", init_wh="default"):
        super().__init__(ctx, "rnn", 1, hidden_size, stateful, init_wx, init_wh)

    def forward(self, xs):
        """One GEMM projects all T inputs; the loop holds only h_{t-1} Wh and tanh."""
        xp, Wh = self.xp, self.params["Wh"]
        x_tm, hs = self.project(xs)
        (h0,) = self.initial_state(xs.shape[0], xs.dtype)
        h = h0
        for t in range(hs.shape[0]):
            hs[t] += h @ Wh
            xp.tanh(hs[t], out=hs[t])
            h = hs[t]
        self.cache = (x_tm, h0, hs)
        self.keep_state(hs[-1])
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        """Back through the block only (the carried h0 is a constant); weight gradients in one GEMM each."""
        x_tm, h0, hs = self.cache
        Wh_T = self.params["Wh"].T
        dhs_tm = dhs.transpose(1, 0, 2)
        dts = self.xp.empty_like(hs)
        dh = 0
        for t in range(hs.shape[0] - 1, -1, -1):
            dt = dhs_tm[t] + dh
            dt *= 1 - hs[t] * hs[t]
            dts[t] = dt
            dh = dt @ Wh_T
        return self.weight_grads(x_tm, h0, hs, dts)


@hookimpl
def gpurnn_layer_types():
    return {"rnn": TimeRNN}
