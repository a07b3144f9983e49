"""What every layer shares: the context it is built in, its base class, and parameter initialisers.

Plugins import from here (and from `gpurnn.backend`); nothing here knows any concrete layer.
"""

from dataclasses import dataclass

import numpy as np

from .backend import Backend
from .errors import SpecError


@dataclass
class LayerContext:
    """What a layer needs to know when it is built.

    backend: the array backend (its `xp` and float dtype); rng: a NumPy generator for initial values
    (drawn on the host so NumPy and CuPy start from identical parameters); input_size: the feature size
    of the previous layer's output (None for the first layer); vocab_size: the model's vocabulary size;
    generator: the model's device-side generator for sampling while training (dropout masks), shared
    by all its layers and saved in checkpoints (None where a layer is built alone: make one then).
    """

    backend: Backend
    rng: np.random.Generator
    input_size: int | None
    vocab_size: int
    generator: object = None


class Layer:
    """Base class for layers: parameter bookkeeping, defaults for stateless layers.

    Subclasses set `output_size` and register parameters with `add_param`; `params[name]` and
    `grads[name]` then exist with the same shape. Loss layers set `is_loss = True` and take
    `forward(x, t)`; layers that read token ids set `takes_ids = True`.
    """

    is_loss = False
    takes_ids = False
    stateful = False

    def __init__(self, ctx):
        self.backend = ctx.backend
        self.xp = ctx.backend.xp
        self.params = {}
        self.grads = {}
        self.training = True

    def add_param(self, name, host_value):
        """Register a parameter from a host array; its gradient buffer starts at zero."""
        value = self.backend.asarray(host_value, dtype=self.backend.dtype)
        self.params[name] = value
        self.grads[name] = self.xp.zeros_like(value)
        return value

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError


def require_input_size(ctx, layer_type):
    """The input feature size, or a clear error when the layer is placed where none is known."""
    if ctx.input_size is None:
        raise SpecError(f"layer {layer_type!r} needs an input size: put a layer such as 'embedding' before it")
    return ctx.input_size


def init_matrix(rng, shape, scheme, fan_in):
    """An initial weight matrix on the host (float64; the layer casts it to the backend dtype).

    Schemes: ``default`` the textbook's N(0,1)/sqrt(fan_in); ``normal:S`` N(0,1)*S; ``uniform:A``
    U(-A, A); ``xavier`` U(+-sqrt(6/(fan_in+fan_out))); ``orthogonal`` a (semi-)orthogonal matrix.
    """
    name, _, arg = str(scheme).partition(":")
    if name == "default":
        return rng.standard_normal(shape) / np.sqrt(fan_in)
    if name == "normal":
        return rng.standard_normal(shape) * _scheme_number(scheme, arg)
    if name == "uniform":
        bound = _scheme_number(scheme, arg)
        return rng.uniform(-bound, bound, shape)
    if name == "xavier":
        bound = np.sqrt(6.0 / (shape[0] + shape[1]))
        return rng.uniform(-bound, bound, shape)
    if name == "orthogonal":
        a = rng.standard_normal((max(shape), min(shape)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))
        return q if shape[0] >= shape[1] else q.T
    raise SpecError(f"unknown init scheme {scheme!r}; use default, normal:S, uniform:A, xavier or orthogonal")


def _scheme_number(scheme, arg):
    try:
        return float(arg)
    except ValueError:
        raise SpecError(f"init scheme {scheme!r} needs a number after the colon, e.g. uniform:0.1") from None
