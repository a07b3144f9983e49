"""What every layer shares: the context it is built in, its base class, and parameter initialisers.

Plugins import these through `gpurnn.plugin`; nothing here knows any concrete layer.
"""

from dataclasses import dataclass

import numpy as np

from .backend import Backend
from .contract import ParamLayout
from .errors import SpecError
from .ops import column_sums, matmul


@dataclass
class LayerContext:
    """What a layer needs to know when it is built.

    backend: the array backend (its `xp` and float dtype); rng: a NumPy generator for initial values
    (drawn on the host so NumPy and CuPy start from identical parameters); input_size: the feature size
    of the previous layer's output (None for the first layer); vocab_size: the model's vocabulary size.
    For layers that sample while training (dropout): seed, the model's seed; step, a 1-element uint32
    array holding the training iteration (on the device; None where a layer is built alone); index,
    the layer's position in the model; first_lane, which lane of the whole batch this process's
    first row is (0 but in a data-parallel job). A mask drawn as a function of (seed, step, index,
    global element) needs no generator state: a resumed run, the other backend, or R processes
    sharing the batch draw the same one.
    """

    backend: Backend
    rng: np.random.Generator
    input_size: int | None
    vocab_size: int
    seed: int = 0
    step: object = None
    index: int = 0
    first_lane: int = 0


class Layer:
    """Base class keeping the layer contract (`gpurnn.contract.LayerContract`): parameter bookkeeping,
    defaults for stateless layers, and a readable repr.

    Subclasses set `output_size` and register parameters with `add_param`; `params[name]` and
    `grads[name]` then exist with the same shape. `param_layout` says what each parameter's axes
    mean, for checkpoint readers. Loss layers set `is_loss = True` and take `forward(x, t)`; layers
    that read token ids set `takes_ids = True`.

    Weight tying: a layer that shares another layer's weight sets `tie_to` to that layer's name and
    implements `tie(source)`, which the model calls once after building, and `add_tied_grads()`,
    which the model calls after backward (when the source has written its own gradients). The shared
    weight stays a parameter of the source only, so it is stored and updated once.

    Row-sparse gradients: while the model sets `sparse_rows` to a dict (`Model.use_sparse_rows`:
    nothing else writes this layer's gradients), a layer whose backward writes only some rows of a
    gradient (the embedding) may clear only the rows it wrote the time before and record
    `sparse_rows[name] = rows written`; the SGD update then reads and moves those rows alone. A layer
    that records nothing keeps dense gradients, as it does while `sparse_rows` is None (the default).
    """

    is_loss = False
    takes_ids = False
    stateful = False
    tie_to = None
    sparse_rows = None
    param_layout = {}
    layer_type = None  # the registered type name, set by the registry when it builds the layer

    def __init__(self, ctx):
        self.backend = ctx.backend
        self.xp = ctx.backend.xp
        self.params = {}
        self.grads = {}
        self.training = True

    def add_param(self, name, host_value):
        """Register a parameter from a host array (stored C-contiguous); its gradient starts at zero.

        A model moves every parameter into one flat buffer after building (`adopt_buffers`), so read
        parameters and gradients from `self.params` / `self.grads` when used, not from references
        kept at construction.
        """
        value = self.xp.ascontiguousarray(self.backend.asarray(host_value, dtype=self.backend.dtype))
        self.params[name] = value
        self.grads[name] = self.xp.zeros(value.shape, value.dtype)  # calloc: no memory touched until written
        return value

    def adopt_buffers(self, param_block, grad_block):
        """Move the parameters (values copied) and gradients into 1-D blocks of the model's flat
        buffers, in registration order; `params` and `grads` then hold views into them."""
        offset = 0
        for name, value in list(self.params.items()):
            size = value.size
            view = param_block[offset:offset + size].reshape(value.shape)
            view[...] = value
            self.params[name] = view
            self.grads[name] = grad_block[offset:offset + size].reshape(value.shape)
            offset += size

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __repr__(self):
        return layer_repr(self)


def layer_repr(layer):
    """``TimeLSTM('lstm', output_size=650, Wx (650, 2600), Wh (650, 2600), b (2600,))``: class,
    registered type, sizes and parameter shapes (for any object keeping the layer contract)."""
    parts = [repr(layer.layer_type)] if getattr(layer, "layer_type", None) else []
    if getattr(layer, "output_size", None) is not None:
        parts.append(f"output_size={layer.output_size}")
    if getattr(layer, "tie_to", None) is not None:
        parts.append(f"tie_to={layer.tie_to!r}")
    parts += [f"{k} {tuple(v.shape)}" for k, v in layer.params.items()]
    return f"{type(layer).__name__}({', '.join(parts)})"


def recurrent_layout(gates):
    """`param_layout` of a `RecurrentLayer` whose gate blocks are `gates` (``"i,f,g,o"``; "" for one)."""
    n = len(gates.split(",")) if gates else 1
    width = f"{n}*hidden" if n > 1 else "hidden"
    return {"Wx": ParamLayout("x_t @ Wx", f"input, {width}", gates),
            "Wh": ParamLayout("h_{t-1} @ Wh", f"hidden, {width}", gates),
            "b": ParamLayout("added to x_t @ Wx + h_{t-1} @ Wh (one merged bias)", width, gates)}


class RecurrentLayer(Layer):
    """Base class for stateful time layers (rnn, lstm, gru): carried state and the shared GEMMs.

    A subclass names its carried arrays in `state_names` and has `gates` blocks of H columns in
    Wx (D, gates*H), Wh (H, gates*H) and b (gates*H,); its `param_layout` comes from
    `recurrent_layout`. `project` runs the one input GEMM over all T steps before the recurrent loop; `weight_grads` runs the one GEMM per weight after the backward
    loop. Arrays inside are time-major, (T, B, ...), so each step reads and writes contiguous rows.
    Truncated BPTT: forward starts from the state the previous block left (zeros at first or after
    `reset_state`); backward treats it as a constant.
    """

    stateful = True
    state_names = ("h",)

    def __init__(self, ctx, layer_type, gates, hidden_size, stateful, init_wx, init_wh):
        super().__init__(ctx)
        in_size = require_input_size(ctx, layer_type)
        H = self.output_size = int(hidden_size)
        dtype = ctx.backend.dtype
        self.add_param("Wx", init_matrix(ctx.rng, (in_size, gates * H), init_wx, in_size, dtype))
        self.add_param("Wh", init_matrix(ctx.rng, (H, gates * H), init_wh, H, dtype))
        self.add_param("b", np.zeros(gates * H))
        self.carry = stateful
        self.state = {}
        self.cache = None

    def reset_state(self):
        self.state = {}

    def get_state(self):
        """Copies of the carried arrays."""
        return {k: v.copy() for k, v in self.state.items()}

    def set_state(self, state):
        """Carry the given arrays (copied); names missing from `state` start from zeros."""
        for k in self.state_names:
            if k in state:
                self._store(k, state[k])
            else:
                self.state.pop(k, None)

    def _store(self, name, value):
        """Copy `value` into the carried array `name`, in place when the shape allows: the carried
        arrays keep their memory from block to block, as a captured CUDA graph needs."""
        kept = self.state.get(name)
        if kept is not None and kept.shape == value.shape:
            kept[...] = value
        else:
            self.state[name] = value.copy()

    def initial_state(self, batch, dtype):
        """Copies of the carried arrays in `state_names` order; zeros when none is carried for this batch size."""
        if self.carry and self.state and self.state[self.state_names[0]].shape[0] == batch:
            return [self.state[k].copy() for k in self.state_names]
        return [self.xp.zeros((batch, self.output_size), dtype) for _ in self.state_names]

    def keep_state(self, *arrays):
        """Carry the last step's arrays (in `state_names` order) to the next block."""
        if self.carry:
            for k, a in zip(self.state_names, arrays):
                self._store(k, a)

    def project(self, xs):
        """(x_tm, a): the inputs time-major as (T*B, D) rows, and x Wx + b for all steps, (T, B, gates*H)."""
        B, T, D = xs.shape
        x_tm = xs.transpose(1, 0, 2).reshape(T * B, D)
        a = matmul(x_tm, self.params["Wx"]).reshape(T, B, -1)
        a += self.params["b"]
        return x_tm, a

    def weight_grads(self, x_tm, h0, hs, d_in, d_hid=None):
        """Write the gradients of Wx, b (from d_in) and Wh (from d_hid, default d_in); return dxs (B, T, D).

        d_in (T, B, gates*H) is the gradient of the input projection, d_hid that of h_{t-1} Wh (they
        differ only where a gate scales the recurrent term, as GRU's reset gate does); hs are the
        outputs (T, B, H), so h_{t-1} is h0 at t = 0 and hs[t-1] after.
        """
        g = self.grads
        d_hid = d_in if d_hid is None else d_hid
        T, B, G = d_in.shape
        H = hs.shape[2]
        d_in2 = d_in.reshape(T * B, G)
        matmul(hs[:-1].reshape(-1, H).T, d_hid[1:].reshape(-1, G), out=g["Wh"])
        g["Wh"] += matmul(h0.T, d_hid[0])
        matmul(x_tm.T, d_in2, out=g["Wx"])
        column_sums(d_in2, g["b"])
        dxs = matmul(d_in2, self.params["Wx"].T)
        return dxs.reshape(T, B, -1).transpose(1, 0, 2)


def require_input_size(ctx, layer_type):
    """The input feature size, or a clear error when the layer is placed where none is known."""
    if ctx.input_size is None:
        raise SpecError(f"layer {layer_type!r} needs an input size: put a layer such as 'embedding' before it")
    return ctx.input_size


INIT_BLOCK = 1 << 20  # initial values drawn (in float64) at a time, then cast


def init_matrix(rng, shape, scheme, fan_in, dtype=np.float64):
    """An initial weight matrix on the host, in `dtype` (pass the layer's: `ctx.backend.dtype`).

    Schemes: ``default`` the textbook's N(0,1)/sqrt(fan_in); ``normal:S`` N(0,1)*S; ``uniform:A``
    U(-A, A); ``xavier`` U(+-sqrt(6/(fan_in+fan_out))); ``orthogonal`` a (semi-)orthogonal matrix.
    The values are drawn in float64 INIT_BLOCK at a time and cast block by block: the numbers of one
    float64 draw of the whole matrix, without holding a float64 copy of it (a large float32 matrix
    needs only its own memory). ``orthogonal`` needs the whole float64 matrix for its QR.
    """
    name, _, arg = str(scheme).partition(":")
    if name == "orthogonal":
        a = rng.standard_normal((max(shape), min(shape)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))
        return (q if shape[0] >= shape[1] else q.T).astype(dtype, copy=False)
    draw = _initial_values(rng, name, arg, shape, fan_in, scheme)
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)
    for start in range(0, flat.size, INIT_BLOCK):
        flat[start:start + INIT_BLOCK] = draw(min(INIT_BLOCK, flat.size - start))
    return out


def _initial_values(rng, name, arg, shape, fan_in, scheme):
    """draw(n): the next n float64 values of a scheme other than orthogonal."""
    if name == "default":
        return lambda n: rng.standard_normal(n) / np.sqrt(fan_in)
    if name == "normal":
        scale = _scheme_number(scheme, arg)
        return lambda n: rng.standard_normal(n) * scale
    if name in ("uniform", "xavier"):
        bound = _scheme_number(scheme, arg) if name == "uniform" else np.sqrt(6.0 / (shape[0] + shape[1]))
        return lambda n: rng.uniform(-bound, bound, n)
    raise SpecError(f"unknown init scheme {scheme!r}; use default, normal:S, uniform:A, xavier or orthogonal")


def _scheme_number(scheme, arg):
    try:
        return float(arg)
    except ValueError:
        raise SpecError(f"init scheme {scheme!r} needs a number after the colon, e.g. uniform:0.1") from None
