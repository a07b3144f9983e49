"""The LSTM: gated cell state c and output h, stateful across truncated-BPTT blocks.

Gate order i, f, g, o (PyTorch's, so its weights map over without reordering):

    i, f, o = sigmoid(.),  g = tanh(.)   of   x_t Wx + h_{t-1} Wh + b   split in four H-wide blocks
    c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)

Wx (D, 4H), Wh (H, 4H), b (4H,). PyTorch's two biases b_ih + b_hh are one bias here.
"""

from gpurnn.hookspecs import hookimpl
from gpurnn.layers import RecurrentLayer, recurrent_layout, sigmoid


class TimeLSTM(RecurrentLayer):
    """LSTM over T steps (gates i, f, g, o); carries h and c to the next block (truncated BPTT)."""

    state_names = ("h", "c")
    param_layout = recurrent_layout("i,f,g,o")

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
        """Back through the block only (carried h0, c0 are constants); weight gradients in one GEMM each.

        Every factor that does not depend on the incoming gradient (the gates' derivatives, times
        what each gate multiplies) is computed for all T steps at once, into the gate-gradient array
        itself, so the sequential loop only scales it by dc or dh and runs the recurrent GEMM:

            das[t] = [dc * g*i(1-i),  dc * c_{t-1}*f(1-f),  dc * i(1-g^2),  dh * tanh(c_t)*o(1-o)]
            dc_t = dc_{t+1} * f_{t+1} + dh_t * o(1 - tanh^2 c_t),   dh_t = dhs_t + das[t+1] Wh^T
        """
        xp = self.xp
        x_tm, h0, c0, gates, hs, cs = self.cache
        Wh_T = xp.ascontiguousarray(self.params["Wh"].T)  # a row-major copy: faster small-M GEMMs
        T, B, _ = gates.shape
        H = self.output_size
        i, f, g, o = (gates[:, :, k * H:(k + 1) * H] for k in range(4))
        tanh_c = xp.tanh(cs)
        dc_from_dh = o * (1 - tanh_c * tanh_c)
        das = xp.empty_like(gates)  # first the factors, then (in the loop) the gate gradients
        di, df, dg, do = (das[:, :, k * H:(k + 1) * H] for k in range(4))
        xp.multiply(g, i * (1 - i), out=di)
        xp.multiply(f, 1 - f, out=df)
        df[0] *= c0
        df[1:] *= cs[:-1]
        xp.multiply(i, 1 - g * g, out=dg)
        xp.multiply(tanh_c, o * (1 - o), out=do)
        blocks = das.reshape(T, B, 4, H)
        dhs_tm = dhs.transpose(1, 0, 2)
        dc = xp.zeros((B, H), gates.dtype)
        for t in range(T - 1, -1, -1):
            dh = dhs_tm[t]
            if t < T - 1:  # what flows back from step t + 1
                dh = dh + das[t + 1] @ Wh_T
                dc *= f[t + 1]
            dc += dh * dc_from_dh[t]
            blocks[t, :, :3] *= dc[:, None, :]
            blocks[t, :, 3] *= dh
        return self.weight_grads(x_tm, h0, hs, das)


@hookimpl
def gpurnn_layer_types():
    return {"lstm": TimeLSTM}
