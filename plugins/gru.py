"""The GRU in PyTorch's formulation, stateful across truncated-BPTT blocks.

Gate order r, z, n (PyTorch's):

    r = sigmoid(x_t Wx_r + h_{t-1} Wh_r + b_r),   z = sigmoid(x_t Wx_z + h_{t-1} Wh_z + b_z)
    n = tanh(x_t Wx_n + b_n + r * (h_{t-1} Wh_n + bhn)),   h_t = (1 - z) * n + z * h_{t-1}

Wx (D, 3H), Wh (H, 3H), b (3H,) and bhn (H,). The reset gate scales the recurrent term of n
including its bias, so that bias (PyTorch's b_hn) is a parameter of its own; for r and z PyTorch's
two biases only ever appear summed, so b holds b_ih + b_hh there and b_in for n.
"""

import numpy as np

from gpurnn.plugin import (ParamLayout, RecurrentExport, RecurrentLayer, column_sums, gru_cell, gru_cell_backward,
                           gru_gates, hookimpl, recurrent_layout, recurrent_loop, step_matmul)

GATES = "r,z,n"  # PyTorch's order; ONNX's is z, r, h (its h is our n)


class TimeGRU(RecurrentLayer):
    """GRU over T steps (PyTorch's r, z, n); carries h to the next block (truncated BPTT)."""

    param_layout = {
        **recurrent_layout(GATES),
        "b": ParamLayout("added to x_t @ Wx: b_ih + b_hh for r and z, b_in for n", "3*hidden", GATES),
        "bhn": ParamLayout("n = tanh(x_t @ Wx_n + b_n + r * (h_{t-1} @ Wh_n + bhn))", "hidden"),
    }

    def __init__(self, ctx, hidden_size=100, stateful=True, init_wx="default", init_wh="default"):
        super().__init__(ctx, "gru", 3, hidden_size, stateful, init_wx, init_wh)
        self.add_param("bhn", np.zeros(self.output_size))

    def forward(self, xs):
        """One GEMM projects all T inputs to r, z, n; each step is one GEMM and one fused cell."""
        xp, Wh = self.xp, self.params["Wh"]
        x_tm, gates = self.project(xs)  # pre-activations, turned into gate values step by step
        (h0,) = self.initial_state(xs.shape[0], xs.dtype)
        recurrent = xp.empty_like(gates)  # h_{t-1} Wh (+ bhn for n): backward needs n's part
        hs = xp.empty((gates.shape[0],) + h0.shape, xs.dtype)
        h = h0
        with recurrent_loop(h0, Wh):
            for t in range(gates.shape[0]):
                step_matmul(h, Wh, recurrent[t])
                h = gru_cell(gates[t], recurrent[t], self.params["bhn"], h, hs[t])
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
        Wh_T = xp.ascontiguousarray(self.params["Wh"].T)
        dhs_tm = xp.ascontiguousarray(dhs.transpose(1, 0, 2))
        T = gates.shape[0]
        d_in, d_hid = xp.empty_like(gates), xp.empty_like(gates)
        dh, rec = xp.empty_like(h0), xp.empty_like(h0)
        with recurrent_loop(d_hid[0], Wh_T):
            for t in range(T - 1, -1, -1):
                last = t == T - 1
                if not last:  # what flows back from step t + 1
                    step_matmul(d_hid[t + 1], Wh_T, rec)
                gru_cell_backward(dhs_tm[t], None if last else rec, None if last else gates[t + 1], gates[t],
                                  recurrent[t], hs[t - 1] if t else h0, dh, d_in[t], d_hid[t])
        column_sums(gru_gates(d_hid).n.reshape(-1, H), self.grads["bhn"])
        return self.weight_grads(x_tm, h0, hs, d_in, d_hid)


@hookimpl
def gpurnn_layer_types():
    return {"gru": TimeGRU}


@hookimpl
def gpurnn_layer_exports():
    """ONNX's GRU with linear_before_reset = 1 (the reset gate scales h_{t-1} Wh_n + bhn, PyTorch's
    formulation; gates reordered to z, r, h) and PyTorch's nn.GRU (whose b_hn is bhn)."""
    return {"gru": RecurrentExport("GRU", "GRU", gates=GATES, onnx_gates="z,r,n", hidden_bias="bhn",
                                   onnx_attributes={"linear_before_reset": 1})}
