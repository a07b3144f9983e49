"""Optimizers (SGD, Adam) and global gradient-norm clipping, over {name: array} mappings.

Updates happen in place on the parameter arrays, with no host synchronisation, so a GPU step runs
without waiting. Clipping is a factor handed to the optimizer (`clip_scale`), so the gradients are not
rewritten in a pass of their own. On NumPy each update runs over cache-sized blocks of the flattened
arrays on all cores (`for_row_blocks`): Adam's dozen element passes then read memory once, not twelve
times. Optimizer state is a flat {key: array} dict, so checkpoints store it as datasets.
"""

import math

from ..backend import array_module, for_row_blocks
from ..errors import SpecError

ELEMENT_BLOCK = 32768  # elements per block: a block of p, g, m, v and two temporaries fits a core's L2


def clip_scale(grads, max_norm):
    """The factor min(1, max_norm / norm) that brings the gradients' global L2 norm to at most
    `max_norm`, as a 0-d array on the device (the norm is not read back). Returns 1.0 for no clipping."""
    if not max_norm:
        return 1.0
    grads = list(grads.values())
    xp = array_module(grads[0])
    norm = xp.sqrt(sum(xp.vdot(g.ravel(), g.ravel()) for g in grads))  # BLAS dot: no g * g temporary
    return xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(grads[0].dtype)


def _flat(a):
    """A 1-D view of a contiguous array (the update must write through to the parameter itself)."""
    if not a.flags.c_contiguous:
        raise ValueError("optimizer arrays must be C-contiguous")
    return a.reshape(-1)


def _scaled(g, scale):
    return g if isinstance(scale, float) and scale == 1.0 else g * scale


class SGD:
    """Plain stochastic gradient descent: p -= lr * scale * g."""

    def __init__(self, lr=0.1):
        self.lr = lr

    def step(self, params, grads, scale=1.0):
        coef = self.lr * scale
        for k, p in params.items():
            p1, g1 = _flat(p), _flat(grads[k])

            def block(lo, hi, p1=p1, g1=g1):
                p1[lo:hi] -= g1[lo:hi] * coef

            for_row_blocks(p1, block, ELEMENT_BLOCK)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Adam:
    """Adam (Kingma & Ba) with bias correction folded into the step size; g is scale * gradient."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.t = 0
        self.m, self.v = {}, {}

    def step(self, params, grads, scale=1.0):
        if not self.m:
            xp = array_module(next(iter(params.values())))
            self.m = {k: xp.zeros_like(p) for k, p in params.items()}
            self.v = {k: xp.zeros_like(p) for k, p in params.items()}
        self.t += 1
        b1, b2, eps = self.beta1, self.beta2, self.eps
        lr_t = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for k, p in params.items():
            p1, g1, m1, v1 = _flat(p), _flat(grads[k]), _flat(self.m[k]), _flat(self.v[k])
            xp = array_module(p1)

            def block(lo, hi, p1=p1, g1=g1, m1=m1, v1=v1, xp=xp):
                g, m, v = _scaled(g1[lo:hi], scale), m1[lo:hi], v1[lo:hi]
                step = g - m
                step *= 1 - b1
                m += step                      # m += (1 - b1) (g - m)
                xp.multiply(g, g, out=step)
                step -= v
                step *= 1 - b2
                v += step                      # v += (1 - b2) (g^2 - v)
                xp.multiply(m, lr_t, out=step)
                denom = xp.sqrt(v)
                denom += eps
                step /= denom
                p1[lo:hi] -= step              # p -= lr_t m / (sqrt(v) + eps)

            for_row_blocks(p1, block, ELEMENT_BLOCK)

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
