"""Recurrent cells: one fused kernel per time step, beside the GEMM the layer runs itself.

Each cell's forward and backward step is written twice, side by side: NumPy array code working in
place on the step's rows, and one CUDA kernel doing the same for all (row, unit) pairs in one launch.
"""

from typing import Any, NamedTuple

import numpy as np

from ..backend import array_module
from .kernels import KERNELS, launch

Array = Any  # a numpy.ndarray or cupy.ndarray


class LSTMGates(NamedTuple):
    """The LSTM's four H-wide gate blocks of a (..., 4H) array, as views, in PyTorch's order."""

    i: Array  # input gate
    f: Array  # forget gate
    g: Array  # candidate (tanh)
    o: Array  # output gate


class GRUGates(NamedTuple):
    """The GRU's three H-wide gate blocks of a (..., 3H) array, as views, in PyTorch's order."""

    r: Array  # reset gate
    z: Array  # update gate
    n: Array  # candidate (tanh)


def gate_blocks(a, count):
    """Views of the `count` equal blocks along the last axis of `a` (writing to one writes to `a`)."""
    H = a.shape[-1] // count
    return [a[..., k * H:(k + 1) * H] for k in range(count)]


def lstm_gates(a) -> LSTMGates:
    """Named views i, f, g, o of an LSTM gate array (..., 4H): ``lstm_gates(a).f`` is the forget gate."""
    return LSTMGates(*gate_blocks(a, 4))


def gru_gates(a) -> GRUGates:
    """Named views r, z, n of a GRU gate array (..., 3H): ``gru_gates(a).n`` is the candidate."""
    return GRUGates(*gate_blocks(a, 3))


def sigmoid(x, out):
    """The logistic function written into `out` (may be `x`): 0.5 * (1 + tanh(x / 2)), stable for any x."""
    xp = array_module(x)
    xp.multiply(x, 0.5, out=out)
    xp.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


KERNELS["rnn_cell"] = r"""
// a = tanh(a + r): the Elman step, a = x Wx + b and r = h_{t-1} Wh.
extern "C" __global__ void rnn_cell(T* a, const T* r, long long n) {
    GRID_STRIDE(i, n)
        a[i] = tanh(a[i] + r[i]);
}
"""


def rnn_cell(a, r):
    """The Elman step in place: a = tanh(a + r), with a = x_t Wx + b and r = h_{t-1} Wh."""
    xp = array_module(a)
    if xp is np:
        a += r
        np.tanh(a, out=a)
        return a
    launch("rnn_cell", a.dtype, a.size, (a, r, np.int64(a.size)))
    return a


KERNELS["rnn_cell_backward"] = r"""
// dt = (dh + rec) * (1 - h^2), rec = dt_{t+1} Wh^T (absent at the block's last step).
extern "C" __global__ void rnn_cell_backward(const T* dh, const T* rec, int has_rec, const T* h, T* dt,
                                             long long n) {
    GRID_STRIDE(i, n) {
        T d = dh[i] + (has_rec ? rec[i] : T(0));
        dt[i] = d * (T(1) - h[i] * h[i]);
    }
}
"""


def rnn_cell_backward(dh, rec, h, dt):
    """dt = (dh + rec) * (1 - h^2): the gradient at tanh's input; rec is None at the last step."""
    xp = array_module(dh)
    if xp is np:
        np.add(dh, rec, out=dt) if rec is not None else np.copyto(dt, dh)
        dt *= 1 - h * h
        return dt
    launch("rnn_cell_backward", dh.dtype, dh.size,
            (dh, dh if rec is None else rec, np.int32(rec is not None), h, dt, np.int64(dh.size)))
    return dt


KERNELS["lstm_cell"] = r"""
// One LSTM step for (b, j): gates i, f, g, o from a + r (4H-wide rows), stored activated in a;
// c = f * c_prev + i * g and h = o * tanh(c).
extern "C" __global__ void lstm_cell(T* a, const T* r, const T* c_prev, T* c, T* h, int B, int H) {
    GRID_STRIDE(k, (long long)B * H) {
        long long row = (k / H) * 4 * H, j = k % H;
        T i = sigmoid_(a[row + j] + r[row + j]);
        T f = sigmoid_(a[row + H + j] + r[row + H + j]);
        T g = tanh(a[row + 2 * H + j] + r[row + 2 * H + j]);
        T o = sigmoid_(a[row + 3 * H + j] + r[row + 3 * H + j]);
        a[row + j] = i; a[row + H + j] = f; a[row + 2 * H + j] = g; a[row + 3 * H + j] = o;
        T cv = f * c_prev[k] + i * g;
        c[k] = cv;
        h[k] = o * tanh(cv);
    }
}
"""


def lstm_cell(a, r, c_prev, c, h):
    """One LSTM step: a (B, 4H) += r, then gates i, f, g, o activated in place, c and h written."""
    xp = array_module(a)
    if xp is np:
        a += r
        i, f, g, o = lstm_gates(a)
        sigmoid(i, out=i)
        sigmoid(f, out=f)
        np.tanh(g, out=g)
        sigmoid(o, out=o)
        np.multiply(f, c_prev, out=c)
        c += i * g
        np.tanh(c, out=h)
        h *= o
        return h
    B, H = h.shape
    launch("lstm_cell", a.dtype, B * H, (a, r, c_prev, c, h, np.int32(B), np.int32(H)))
    return h


KERNELS["lstm_backward_factors"] = r"""
// For all T steps at once, what does not depend on the incoming gradient: the gate derivatives
// times what each gate multiplies, into das; and dc_from_dh = o * (1 - tanh(c)^2).
extern "C" __global__ void lstm_backward_factors(const T* gates, const T* cs, const T* c0, T* das,
                                                 T* dc_from_dh, int steps, int B, int H) {
    long long bh = (long long)B * H;
    GRID_STRIDE(k, steps * bh) {
        long long t = k / bh, row = (k / H) * 4 * H, j = k % H;
        T i = gates[row + j], f = gates[row + H + j], g = gates[row + 2 * H + j], o = gates[row + 3 * H + j];
        T tc = tanh(cs[k]);
        T c_prev = t ? cs[k - bh] : c0[k];
        dc_from_dh[k] = o * (T(1) - tc * tc);
        das[row + j] = g * i * (T(1) - i);
        das[row + H + j] = c_prev * f * (T(1) - f);
        das[row + 2 * H + j] = i * (T(1) - g * g);
        das[row + 3 * H + j] = tc * o * (T(1) - o);
    }
}
"""


def lstm_backward_factors(gates, cs, c0, das, dc_from_dh):
    """Fill das (T, B, 4H) with the gate factors and dc_from_dh (T, B, H), for all steps at once:

        das[t] = [g*i(1-i),  c_{t-1}*f(1-f),  i(1-g^2),  tanh(c_t)*o(1-o)],  dc_from_dh = o(1 - tanh^2 c_t)
    """
    xp = array_module(gates)
    if xp is np:
        i, f, g, o = lstm_gates(gates)
        di, df, dg, do = lstm_gates(das)
        tanh_c = np.tanh(cs)
        np.multiply(o, 1 - tanh_c * tanh_c, out=dc_from_dh)
        np.multiply(g, i * (1 - i), out=di)
        np.multiply(f, 1 - f, out=df)
        df[0] *= c0
        df[1:] *= cs[:-1]
        np.multiply(i, 1 - g * g, out=dg)
        np.multiply(tanh_c, o * (1 - o), out=do)
        return
    steps, B, H = cs.shape
    launch("lstm_backward_factors", gates.dtype, steps * B * H,
            (gates, cs, c0, das, dc_from_dh, np.int32(steps), np.int32(B), np.int32(H)))


KERNELS["lstm_cell_backward"] = r"""
// One step back: dh = dhs_t + rec; dc = dc * f_{t+1} + dh * dc_from_dh; scale the factors in das_t
// (i, f, g by dc; o by dh). rec = das_{t+1} Wh^T and f_{t+1} are absent at the block's last step.
extern "C" __global__ void lstm_cell_backward(const T* dhs_t, const T* rec, const T* gates_next, int has_next,
                                              const T* dc_from_dh, T* dc, T* das, int B, int H) {
    GRID_STRIDE(k, (long long)B * H) {
        long long row = (k / H) * 4 * H, j = k % H;
        T dh = dhs_t[k] + (has_next ? rec[row / 4 + j] : T(0));
        T dcv = (has_next ? dc[k] * gates_next[row + H + j] : T(0)) + dh * dc_from_dh[k];
        dc[k] = dcv;
        das[row + j] *= dcv; das[row + H + j] *= dcv; das[row + 2 * H + j] *= dcv;
        das[row + 3 * H + j] *= dh;
    }
}
"""


def lstm_cell_backward(dhs_t, rec, gates_next, dc_from_dh, dc, das_t):
    """One step of the LSTM's backward loop (see `lstm_backward_factors` for das_t's contents).

    dh = dhs_t + rec, dc = dc * f_{t+1} + dh * dc_from_dh, das_t's i, f, g blocks *= dc and o *= dh.
    rec (das_{t+1} Wh^T) and gates_next are None at the block's last step, where dc starts at zero.
    """
    xp = array_module(dhs_t)
    B, H = dc.shape
    if xp is np:
        dh = dhs_t if rec is None else dhs_t + rec
        if gates_next is None:
            np.multiply(dh, dc_from_dh, out=dc)
        else:
            dc *= lstm_gates(gates_next).f
            dc += dh * dc_from_dh
        di, df, dg, do = lstm_gates(das_t)
        di *= dc
        df *= dc
        dg *= dc
        do *= dh
        return
    has_next = rec is not None
    launch("lstm_cell_backward", dc.dtype, B * H,
            (dhs_t, rec if has_next else dhs_t, gates_next if has_next else das_t, np.int32(has_next),
             dc_from_dh, dc, das_t, np.int32(B), np.int32(H)))


KERNELS["gru_cell"] = r"""
// One GRU step for (b, j), gates r, z, n (3H-wide rows): ah = h_{t-1} Wh; its n part gets bhn
// (kept for backward); r, z, n stored activated in a; h = n + z * (h_prev - n).
extern "C" __global__ void gru_cell(T* a, T* ah, const T* bhn, const T* h_prev, T* h, int B, int H) {
    GRID_STRIDE(k, (long long)B * H) {
        long long row = (k / H) * 3 * H, j = k % H;
        T ahn = ah[row + 2 * H + j] + bhn[j];
        ah[row + 2 * H + j] = ahn;
        T r = sigmoid_(a[row + j] + ah[row + j]);
        T z = sigmoid_(a[row + H + j] + ah[row + H + j]);
        T n = tanh(a[row + 2 * H + j] + r * ahn);
        a[row + j] = r; a[row + H + j] = z; a[row + 2 * H + j] = n;
        h[k] = n + z * (h_prev[k] - n);
    }
}
"""


def gru_cell(a, ah, bhn, h_prev, h):
    """One GRU step: ah = h_prev Wh (its n block gets bhn, kept), gates r, z, n into a, h written."""
    xp = array_module(a)
    B, H = h.shape
    if xp is np:
        r, z, n = gru_gates(a)
        ah_r, ah_z, ah_n = gru_gates(ah)
        ah_n += bhn
        r += ah_r
        z += ah_z
        sigmoid(r, out=r)
        sigmoid(z, out=z)
        n += r * ah_n
        np.tanh(n, out=n)
        np.subtract(h_prev, n, out=h)  # h = n + z * (h_prev - n)
        h *= z
        h += n
        return h
    launch("gru_cell", a.dtype, B * H, (a, ah, bhn, h_prev, h, np.int32(B), np.int32(H)))
    return h


KERNELS["gru_cell_backward"] = r"""
// One GRU step back. dh = dhs_t + (dh_{t+1} * z_{t+1} + rec), rec = d_hid_{t+1} Wh^T; then the
// gradients at the gates' inputs: d_in = [dr, dz, dn] for Wx and b, d_hid = [dr, dz, dn * r] for Wh.
extern "C" __global__ void gru_cell_backward(const T* dhs_t, const T* rec, const T* gates_next, int has_next,
                                             const T* gates, const T* ah, const T* h_prev, T* dh,
                                             T* d_in, T* d_hid, int B, int H) {
    GRID_STRIDE(k, (long long)B * H) {
        long long row = (k / H) * 3 * H, j = k % H;
        T d = dhs_t[k] + (has_next ? dh[k] * gates_next[row + H + j] + rec[row / 3 + j] : T(0));
        dh[k] = d;
        T r = gates[row + j], z = gates[row + H + j], n = gates[row + 2 * H + j];
        T dz = d * (h_prev[k] - n) * z * (T(1) - z);
        T dn = d * (T(1) - z) * (T(1) - n * n);
        T dr = dn * ah[row + 2 * H + j] * r * (T(1) - r);
        d_in[row + j] = dr; d_in[row + H + j] = dz; d_in[row + 2 * H + j] = dn;
        d_hid[row + j] = dr; d_hid[row + H + j] = dz; d_hid[row + 2 * H + j] = dn * r;
    }
}
"""


def gru_cell_backward(dhs_t, rec, gates_next, gates, ah, h_prev, dh, d_in, d_hid):
    """One step of the GRU's backward loop; dh (B, H) carries dh_t from step to step.

    rec (d_hid_{t+1} Wh^T) and gates_next are None at the block's last step.
    """
    xp = array_module(dhs_t)
    B, H = dh.shape
    if xp is np:
        if rec is None:
            np.copyto(dh, dhs_t)
        else:
            dh *= gru_gates(gates_next).z
            dh += rec
            dh += dhs_t
        r, z, n = gru_gates(gates)
        dr, dz, dn = gru_gates(d_in)
        hid_r, hid_z, hid_n = gru_gates(d_hid)
        np.multiply(dh, h_prev - n, out=dz)
        dz *= z * (1 - z)
        np.multiply(dh, 1 - z, out=dn)
        dn *= 1 - n * n
        np.multiply(dn, gru_gates(ah).n, out=dr)
        dr *= r * (1 - r)
        hid_r[...] = dr
        hid_z[...] = dz
        np.multiply(dn, r, out=hid_n)
        return
    has_next = rec is not None
    launch("gru_cell_backward", dh.dtype, B * H,
            (dhs_t, rec if has_next else dhs_t, gates_next if has_next else gates, np.int32(has_next),
             gates, ah, h_prev, dh, d_in, d_hid, np.int32(B), np.int32(H)))
