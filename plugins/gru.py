"""The GRU in PyTorch's formulation, stateful across truncated-BPTT blocks.

Gate order r, z, n (PyTorch's):

    r = sigmoid(x_t Wx_r + h_{t-1} Wh_r + b_r),   z = sigmoid(x_t Wx_z + h_{t-1} Wh_z + b_z)
    n = tanh(x_t Wx_n + b_n + r * (h_{t-1} Wh_n + bhn)),   h_t = (1 - z) * n + z * h_{t-1}

Wx (D, 3H), Wh (H, 3H), b (3H,) and bhn (H,). The reset gate scales the recurrent term of n
including its bias, so that bias (PyTorch's b_hn) is a parameter of its own; for r and z PyTorch's
two biases only ever appear summed, so b holds b_ih + b_hh there and b_in for n.
"""

import numpy as np

from gpurnn.hookspecs import hookimpl
from gpurnn.contract import ParamLayout
from gpurnn.layers import RecurrentLayer, recurrent_layout, sigmoid


class TimeGRU(RecurrentLayer):
    """GRU over T steps (PyTorch's r, z, n); carries h to the next block (truncated BPTT)."""

    param_layout = {
        **recurrent_layout("r,z,n"),
        "b": ParamLayout("added to x_t @ Wx: b_ih + b_hh for r and z, b_in for n", "3*hidden", "r,z,n"),
        "bhn": ParamLayout("n = tanh(x_t @ Wx_n + b_n + r * (h_{t-1} @ Wh_n + bhn))", "hidden"),
    }

    def __init__(self, ctx, hidden_size=100, stateful=True, init_wx="default", init_wh="default"):
        super().__init__(ctx, "gru", 3, hidden_size, stateful, init_wx, init_wh)
        self.add_param("bhn", np.zeros(self.output_size))

    def forward(self, xs):
        """One GEMM projects all T inputs to r, z, n; the loop holds h_{t-1} Wh and the gates."""
        xp, Wh, H = self.xp, self.params["Wh"], self.output_size
        x_tm, gates = self.project(xs)  # pre-activations, turned into gate values step by step
        (h0,) = self.initial_state(xs.shape[0], xs.dtype)
        recurrent = xp.empty_like(gates)  # h_{t-1} Wh (+ bhn for n): backward needs n's part
        hs = xp.empty((gates.shape[0],) + h0.shape, xs.dtype)
        h = h0
        for t in range(gates.shape[0]):
            a, ah = gates[t], recurrent[t]
            xp.matmul(h, Wh, out=ah)
            ah[:, 2 * H:] += self.params["bhn"]
            rz = a[:, :2 * H]
            rz += ah[:, :2 * H]
            sigmoid(rz, out=rz)
            r, z, n = xp.split(a, 3, axis=1)
            n += r * ah[:, 2 * H:]
            xp.tanh(n, out=n)
            xp.subtract(h, n, out=hs[t])  # h_t = n + z * (h_{t-1} - n)
            hs[t] *= z
            hs[t] += n
            h = hs[t]
        self.cache = (x_tm, h0, gates, recurrent, hs)
        self.keep_state(h)
        return hs.transpose(1, 0, 2)

    def backward(self, dhs):
        """Back through the block only (the carried h0 is a constant); weight gradients in one GEMM each.

        The input projection and the recurrent one get different gradients in the n block (r scales
        only the recurrent term), so both are kept: d_in for Wx and b, d_hid for Wh and bhn.
        """
        xp, H = self.xp, self.output_size
        x_tm, h0, gates, recurrent, hs = self.cache
        Wh_T = self.params["Wh"].T
        dhs_tm = dhs.transpose(1, 0, 2)
        d_in, d_hid = xp.empty_like(gates), xp.empty_like(gates)
        dh = 0
        for t in range(gates.shape[0] - 1, -1, -1):
            r, z, n = xp.split(gates[t], 3, axis=1)
            dr, dz, dn = xp.split(d_in[t], 3, axis=1)
            h_prev = hs[t - 1] if t else h0
            dh = dhs_tm[t] + dh
            xp.multiply(dh, h_prev - n, out=dz)
            dz *= z * (1 - z)
            xp.multiply(dh, 1 - z, out=dn)
            dn *= 1 - n * n
            xp.multiply(dn, recurrent[t][:, 2 * H:], out=dr)
            dr *= r * (1 - r)
            d_hid[t][:, :2 * H] = d_in[t][:, :2 * H]
            xp.multiply(dn, r, out=d_hid[t][:, 2 * H:])
            dh = dh * z + d_hid[t] @ Wh_T
        d_hid[:, :, 2 * H:].sum(axis=(0, 1), out=self.grads["bhn"])
        return self.weight_grads(x_tm, h0, hs, d_in, d_hid)


@hookimpl
def gpurnn_layer_types():
    return {"gru": TimeGRU}
