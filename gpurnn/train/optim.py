"""Optimizers (SGD, Adam) over a model's flat parameter and gradient buffers, with global-norm clipping.

A step is two calls: `prepare()` on the host (the step count, the learning rate of this step written
into a 1-element array on the device) and `update(params, grads, max_norm)`, one pass over the flat
buffers (`gpurnn.ops`: a kernel on CuPy; cache-sized blocks on all cores on NumPy) with the clip
factor computed inside it. `update` never waits for the GPU and reads every changing scalar from
device memory, so it can run inside a captured CUDA graph. Optimizer state is flat too; checkpoints
store it per parameter (`state_dict(model)`: `m.<param>`, `v.<param>`).
"""

import math

from ..backend import array_module
from ..errors import SpecError
from ..ops import adam_update, sgd_update


class Optimizer:
    """What SGD and Adam share: the learning rate and its device copy."""

    def __init__(self, lr):
        self.lr = lr
        self.lr_now = None  # 1-element array read by the update

    def _set_rate(self, params, value):
        if self.lr_now is None:
            self.lr_now = array_module(params).zeros(1, params.dtype)
        self.lr_now[...] = value

    def step(self, params, grads, max_norm=None, sparse=()):
        """prepare() then update(): one whole step, outside a captured graph."""
        self.prepare(params)
        self.update(params, grads, max_norm, sparse)


class SGD(Optimizer):
    """Plain stochastic gradient descent: p -= lr * scale * g."""

    def __init__(self, lr=0.1):
        super().__init__(lr)

    def prepare(self, params):
        self._set_rate(params, self.lr)

    def update(self, params, grads, max_norm=None, sparse=()):
        """One clipped step; `sparse`: the gradient's row-sparse segments (`Model.sparse_segments`)."""
        sgd_update(params, grads, max_norm or 0, self.lr_now, sparse)

    def state_dict(self, model):
        return {}

    def load_state_dict(self, state, model):
        pass


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction folded into the step size; g is scale * gradient."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(lr)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.t = 0
        self.m = self.v = None

    def prepare(self, params):
        if self.m is None:
            self.m, self.v = array_module(params).zeros_like(params), array_module(params).zeros_like(params)
        self.t += 1
        self._set_rate(params, self.lr * math.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t))

    def update(self, params, grads, max_norm=None, sparse=()):
        """One clipped step over every parameter: Adam's moments move rows with a zero gradient too,
        so `sparse` changes nothing here (the gradient buffer is whole either way)."""
        adam_update(params, grads, self.m, self.v, max_norm or 0, self.lr_now, self.beta1, self.beta2, self.eps)

    def state_dict(self, model):
        """{"t": steps, "m.<param>": array, "v.<param>": array} (arrays are views of the flat state)."""
        state = {"t": self.t}
        if self.m is not None:
            state.update({f"m.{k}": a for k, a in model.views(self.m).items()})
            state.update({f"v.{k}": a for k, a in model.views(self.v).items()})
        return state

    def load_state_dict(self, state, model):
        self.t = int(state.get("t", 0))
        if not any(k.startswith("m.") for k in state):
            self.m = self.v = None
            return
        xp = model.backend.xp
        self.m, self.v = xp.zeros_like(model.flat_params), xp.zeros_like(model.flat_params)
        for flat, prefix in ((self.m, "m."), (self.v, "v.")):
            for name, view in model.views(flat).items():
                view[...] = xp.asarray(state[prefix + name])


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name, lr):
    if name not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr=lr)
