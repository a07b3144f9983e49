"""Dropout with masks from a counter-based hash of (seed, step, layer, element): no state to save,
the same mask on NumPy and CuPy, on resume and on any number of ranks."""

import functools

import numpy as np

from ..backend import array_module
from .kernels import KERNELS, dtype_scalar, launch


KERNELS["dropout"] = r"""
// out = x * mask / (1 - p); mask from a hash of (seed, step, layer, element + offset): no state to save.
extern "C" __global__ void dropout(const T* x, T* out, const unsigned int* step, unsigned int seed,
                                   unsigned int layer, unsigned int threshold, T scale, long long offset,
                                   long long n) {
    unsigned int key = mix32(mix32(mix32(seed + 0x9e3779b9U) ^ (step[0] + 0x85ebca6bU)) ^ (layer + 0xc2b2ae35U));
    GRID_STRIDE(i, n) {
        unsigned int u = mix32(key ^ mix32((unsigned int)(i + offset) + 0x27d4eb2fU));
        out[i] = (u >> 8) >= threshold ? x[i] * scale : T(0);
    }
}
"""


def _mix32(x):
    """The kernel's 32-bit hash on NumPy uint32 arrays (multiplication wraps modulo 2**32)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


@functools.lru_cache(maxsize=4)
def _hashed_positions(n, offset):
    """mix32(i + c) for the n element positions from `offset`: the half of the mask hash no key changes."""
    return _mix32((np.arange(offset, offset + n, dtype=np.int64) + 0x27D4EB2F).astype(np.uint32))


def dropout_key(seed, step, layer):
    """The 32-bit key of one (seed, step, layer): the same arithmetic as the kernel's first line."""
    def mix(v):
        return int(_mix32(np.array([v & 0xFFFFFFFF], np.uint32))[0])

    return mix(mix(mix(seed + 0x9E3779B9) ^ ((step + 0x85EBCA6B) & 0xFFFFFFFF)) ^ ((layer + 0xC2B2AE35) & 0xFFFFFFFF))


def dropout(x, out, p, seed, step, layer, first_lane=0):
    """out = x * mask / (1 - p), the mask a pure function of (seed, step[0], layer, element index).

    `step` is a 1-element uint32 array (on the device for CuPy, read there by the kernel, so a
    captured graph sees each step's value); `out` is C-contiguous. Element indices count from lane
    `first_lane` of the whole batch (x's first axis), so a process that holds lanes lo..hi of a
    data-parallel batch draws exactly those lanes' part of the one-process mask. Called again with
    the same arguments it applies the same mask, which is the backward; NumPy and CuPy draw
    identical masks.
    """
    xp = array_module(x)
    threshold = int(p * (1 << 24))
    scale = 1.0 / (1.0 - p)
    offset = first_lane * (x.size // max(x.shape[0], 1))  # elements per lane (an empty x has none)
    if xp is np:
        key = np.uint32(dropout_key(seed, int(step[0]), layer))
        u = _mix32(_hashed_positions(x.size, offset) ^ key)
        keep = (u >> np.uint32(8)) >= threshold
        np.multiply(x, keep.reshape(x.shape), out=out)
        out *= scale
        return out
    launch("dropout", x.dtype, x.size, (xp.ascontiguousarray(x), out, step, np.uint32(seed & 0xFFFFFFFF),
                                         np.uint32(layer), np.uint32(threshold), dtype_scalar(x, scale),
                                         np.int64(offset), np.int64(x.size)))
    return out
