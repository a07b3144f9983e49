"""Optimizers (SGD, Adam) and global gradient-norm clipping, over {name: array} mappings.

Updates happen in place on the parameter arrays, with no host synchronisation, so a GPU step runs
without waiting. Optimizer state is a flat {key: array} dict, so checkpoints store it as datasets.
"""

import math

from ..backend import array_module
from ..errors import SpecError


def clip_grads(grads, max_norm):
    """Scale all gradients so their global L2 norm is at most `max_norm`; return the norm before.

    The scale min(1, max_norm / norm) is applied on the device without reading the norm back.
    """
    grads = list(grads.values())
    xp = array_module(grads[0])
    norm = xp.sqrt(sum(xp.vdot(g.ravel(), g.ravel()) for g in grads))  # BLAS dot: no g * g temporary
    rate = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(grads[0].dtype)
    for g in grads:
        g *= rate
    return norm


class SGD:
    """Plain stochastic gradient descent: p -= lr * g."""

    def __init__(self, lr=0.1):
        self.lr = lr

    def step(self, params, grads):
        for k, p in params.items():
            p -= self.lr * grads[k]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Adam:
    """Adam (Kingma & Ba) with bias correction folded into the step size."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.t = 0
        self.m, self.v = {}, {}

    def step(self, params, grads):
        if not self.m:
            xp = array_module(next(iter(params.values())))
            self.m = {k: xp.zeros_like(p) for k, p in params.items()}
            self.v = {k: xp.zeros_like(p) for k, p in params.items()}
        self.t += 1
        lr_t = self.lr * math.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        for k, p in params.items():
            g, m, v = grads[k], self.m[k], self.v[k]
            m += (1 - self.beta1) * (g - m)
            v += (1 - self.beta2) * (g * g - v)
            p -= lr_t * m / (array_module(v).sqrt(v) + self.eps)

    def state_dict(self):
        state = {"t": self.t}
        state.update({f"m.{k}": a for k, a in self.m.items()})
        state.update({f"v.{k}": a for k, a in self.v.items()})
        return state

    def load_state_dict(self, state):
        self.t = int(state.get("t", 0))
        self.m = {k[2:]: a for k, a in state.items() if k.startswith("m.")}
        self.v = {k[2:]: a for k, a in state.items() if k.startswith("v.")}


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name, lr):
    if name not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr=lr)
