"""The LSTM: gated cell state c and output h, stateful across truncated-BPTT blocks.

Gate order i, f, g, o (PyTorch's, so its weights map over without reordering):

    i, f, o = sigmoid(.),  g = tanh(.)   of   x_t Wx + h_{t-1} Wh + b   split in four H-wide blocks
    c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)

Wx (D, 4H), Wh (H, 4H), b (4H,). PyTorch's two biases b_ih + b_hh are one bias here.
"""

from gpurnn.hookspecs import hookimpl
from gpurnn.layers import RecurrentLayer, sigmoid


class TimeLSTM(RecurrentLayer):
    """LSTM over T steps (gates i, f, g, o); carries h and c to the next block (truncated BPTT)."""

    state_names = ("h", "c")

    def __init__(self, ctx, hidden_size=100, stateful=True, init_wx="default", init_wh="default"):
        super().__init__(ctx, "lstm", 4, hidden_size, stateful, init_wx, init_wh)

    def forward(self, xs):
        """One GEMM projects all T inputs to the four gates; the loop holds h_{t-1} Wh and the cell."""
        xp, Wh, H = self.xp, self.params["Wh"], self.output_size
        x_tm, gates = self.project(xs)  # pre-activations, turned into gate values step by step
        h0, c0 = self.initial_state(xs.shape[0], xs.dtype)
        hs, cs = xp.empty((2, gates.shape[0]) + h0.shape, xs.dtype)
        h, c = h0, c0
        for t in range(gates.shape[0]):
            a = gates[t]
            a += h @ Wh
            sigmoid(a[:, :2 * H], out=a[:, :2 * H])
            xp.tanh(a[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
            sigmoid(a[:, 3 * H:], out=a[:, 3 * H:])
            i, f, g, o = xp.split(a, 4, axis=1)
            xp.multiply(f, c, out=cs[t])
            cs[t] += i * g
            xp.tanh(cs[t], out=hs[t])
            hs[t] *= o
            h, c = hs[t], cs[t]
        self.cache = (x_tm, h0, c0, gates, hs, cs)
        self.keep_state(h, c)
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        """Back through the block only (carried h0, c0 are constants); weight gradients in one GEMM each."""
        xp = self.xp
        x_tm, h0, c0, gates, hs, cs = self.cache
        Wh_T = self.params["Wh"].T
        dhs_tm = dhs.transpose(1, 0, 2)
        das = xp.empty_like(gates)  # gradients of the gate pre-activations
        dh = dc = 0
        for t in range(gates.shape[0] - 1, -1, -1):
            i, f, g, o = xp.split(gates[t], 4, axis=1)
            di, df, dg, do = xp.split(das[t], 4, axis=1)
            c_prev = cs[t - 1] if t else c0
            tanh_c = xp.tanh(cs[t])
            dh = dhs_tm[t] + dh
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
            xp.multiply(dh, tanh_c, out=do)
            do *= o * (1 - o)
            xp.multiply(dc, g, out=di)
            di *= i * (1 - i)
            xp.multiply(dc, c_prev, out=df)
            df *= f * (1 - f)
            xp.multiply(dc, i, out=dg)
            dg *= 1 - g * g
            dc = dc * f
            dh = das[t] @ Wh_T
        return self.weight_grads(x_tm, h0, hs, das)


@hookimpl
def gpurnn_layer_types():
    return {"lstm": TimeLSTM}
