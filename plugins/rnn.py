"""The Elman RNN: h_t = tanh(h_{t-1} Wh + x_t Wx + b), stateful across truncated-BPTT blocks."""

import numpy as np

from gpurnn.hookspecs import hookimpl
from gpurnn.layers import Layer, init_matrix, require_input_size


class TimeRNN(Layer):
    """Elman RNN over T steps; carries h to the next block (truncated BPTT)."""

    stateful = True

    def __init__(self, ctx, hidden_size=100, stateful=True, init_wx="default", init_wh="default"):
        super().__init__(ctx)
        in_size = require_input_size(ctx, "rnn")
        H = self.output_size = int(hidden_size)
        self.add_param("Wx", init_matrix(ctx.rng, (in_size, H), init_wx, in_size))
        self.add_param("Wh", init_matrix(ctx.rng, (H, H), init_wh, H))
        self.add_param("b", np.zeros(H))
        self.carry = stateful
        self.h = None
        self.cache = None

    def reset_state(self):
        self.h = None

    def get_state(self):
        return {} if self.h is None else {"h": self.h}

    def set_state(self, state):
        self.h = state.get("h")

    def forward(self, xs):
        """One GEMM projects all T inputs; the loop holds only h_{t-1} Wh and tanh.

        Works time-major internally, (T, B, H), so each step reads and writes contiguous rows.
        """
        xp, p = self.xp, self.params
        B, T, D = xs.shape
        H = self.output_size
        h0 = self.h if (self.carry and self.h is not None and self.h.shape[0] == B) else xp.zeros((B, H), xs.dtype)
        x_tm = xs.transpose(1, 0, 2).reshape(T * B, D)
        hs = (x_tm @ p["Wx"]).reshape(T, B, H)
        hs += p["b"]
        h = h0
        for t in range(T):
            hs[t] += h @ p["Wh"]
            xp.tanh(hs[t], out=hs[t])
            h = hs[t]
        self.cache = (x_tm, h0, hs)
        self.h = hs[-1].copy() if self.carry else None
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        """Back through the block only (the carried h0 is a constant); weight gradients in one GEMM each."""
        xp, p, g = self.xp, self.params, self.grads
        x_tm, h0, hs = self.cache
        T, B, H = hs.shape
        dhs_tm = dhs.transpose(1, 0, 2)
        dts = xp.empty_like(hs)
        dh = xp.zeros((B, H), hs.dtype)
        for t in range(T - 1, -1, -1):
            dt = dhs_tm[t] + dh
            dt *= 1 - hs[t] * hs[t]
            dts[t] = dt
            dh = dt @ p["Wh"].T
        self.dh0 = dh
        dts2 = dts.reshape(T * B, H)
        xp.matmul(hs[:-1].reshape(-1, H).T, dts2[B:], out=g["Wh"])
        g["Wh"] += h0.T @ dts[0]
        xp.matmul(x_tm.T, dts2, out=g["Wx"])
        dts2.sum(axis=0, out=g["b"])
        dxs = dts2 @ p["Wx"].T
        return dxs.reshape(T, B, -1).transpose(1, 0, 2)


@hookimpl
def gpurnn_layer_types():
    return {"rnn": TimeRNN}
