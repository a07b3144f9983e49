"""The output layer without its logits: affine + softmax cross-entropy over chunks of rows.

For N rows of features x (N, D), weight W (D, V) and bias b, each chunk of `rows` rows gets its
logits by one GEMM (`head_logits`) into one reused (rows, V) buffer; while that buffer is in cache
its log-sum-exp and target log-probability are taken, and in training its gradient (softmax -
onehot) / count is turned at once into the chunk's rows of dx (a GEMM) and its share of dW and db
(GEMMs accumulated over the chunks). The N x V logits never exist: the memory is O(rows x V).

NumPy runs each chunk through `softmax_cross_entropy` and its backward (in training the chunk's
buffer is its own softmax buffer; evaluation leaves it as the GEMM wrote it). CuPy launches the
same kernels that op launches, per chunk, with the count of scored targets of the whole block
computed first on the device, so nothing waits for the GPU and every launch has the same shapes
from step to step: the training step still captures as a graph.
Numbers equal the unfused pair's (affine, then `softmax_cross_entropy` over all rows) to rounding.
"""

from pathlib import Path

import numpy as np

from ..backend import array_module
from .adaptive import head_logits, log_softmax
from .kernels import dtype_scalar, launch
from .linear import column_sums, matmul
from .losses import device_softmax_rows, softmax_cross_entropy, softmax_cross_entropy_backward, softmax_nll
from .threads import ROW_BLOCK

DEFAULT_CACHE_BYTES = 32 << 20  # where the machine does not say: a server CPU's L3, a data-centre GPU's L2


def cache_bytes(xp):
    """The largest cache the chunk's logits can stay in: the CPU's last level (Linux's sysfs), or the
    GPU's L2; DEFAULT_CACHE_BYTES where neither is known (another OS, the tests' CuPy stand-in)."""
    if xp is np:
        sizes = [_size(p.read_text()) for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
        return max(sizes, default=DEFAULT_CACHE_BYTES)
    attributes = getattr(xp.cuda.Device(), "attributes", {})
    return attributes.get("L2CacheSize", DEFAULT_CACHE_BYTES)


def _size(text):
    """Bytes of a sysfs cache size such as ``32768K``."""
    text = text.strip()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * scale


# The fewest rows a chunk has by default. dW is summed over the chunks by GEMMs whose inner dimension
# is the chunk's rows: on a 2-core EPYC the fused layer trained PTB's 700 rows at 0.98x the pair's
# speed in one chunk, 0.88x in two of 350 and 0.56x in eleven of 64 (`scripts/bench_output.py --chunk-rows`).
MIN_CHUNK_ROWS = 1024

# The most bytes a chunk's logits take by default, which binds for large vocabularies only (at 267,735
# words, float32: 480 rows, so a block of 700 runs as two chunks of 350). There the pair's own speed
# holds down to about 350 rows a chunk (1.03x the pair at 350 rows, 0.89x at 234, on the same EPYC).
MAX_CHUNK_BYTES = 512 << 20


def default_chunk_rows(vocab_size, dtype, xp):
    """Rows per chunk: MIN_CHUNK_ROWS, or more where that many rows' logits fill less than half the
    cache (the other half keeps the features and the weight's panel the GEMM streams); fewer where
    the logits would pass MAX_CHUNK_BYTES. In whole blocks of ROW_BLOCK rows."""
    row_bytes = vocab_size * np.dtype(dtype).itemsize
    rows = max(MIN_CHUNK_ROWS, cache_bytes(xp) // 2 // row_bytes)
    rows = min(rows, MAX_CHUNK_BYTES // row_bytes)
    return max(ROW_BLOCK, rows // ROW_BLOCK * ROW_BLOCK)


def chunks(n, rows):
    """(lo, hi) of each chunk of `rows` rows covering n (the last may be shorter; the same every step)."""
    return [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]


def output_loss(x2, t, W, b, ignore, rows, work, grads=None):
    """Mean cross-entropy of targets t (N,) under the logits x2 @ W + b, `rows` rows at a time.

    Targets equal to `ignore` are skipped (the mean is over the block's scored targets); a target
    outside [0, V) makes the loss NaN, as `softmax_cross_entropy` does. W may be a transposed view
    (a tied table E.T). With grads = (dx (N, D), dW like W, db (V,)) their values for dout = 1 are
    written (a transposed dW is written through its transpose, in the table's own layout). x2 and t
    are never modified; `work` (a `Workspace`) holds the chunk's buffers from call to call (fixed
    buffers for a graph). Returns the loss, a 0-d array (on the device for CuPy).
    """
    xp = array_module(x2)
    n, V = x2.shape[0], W.shape[1]
    spans = chunks(n, rows)
    z = work.get(xp, "logits", (min(rows, n), V), x2.dtype)
    if xp is np:
        weights = chunk_weights(t, ignore, spans)
    else:
        x2, t = xp.ascontiguousarray(x2), xp.ascontiguousarray(t, dtype=xp.int32)
        lse, nll = work.get(xp, "lse", (n,), x2.dtype), work.get(xp, "nll", (n,), x2.dtype)
        count = xp.maximum((t != ignore).sum(), 1).astype(x2.dtype).reshape(1)
    total = 0
    for k, (lo, hi) in enumerate(spans):
        zc = head_logits(x2[lo:hi], W, b, out=z[:hi - lo])
        if xp is np:
            scale = weights[k]
            # training keeps exp(logits) in the chunk's buffer for the backward; evaluation writes nothing
            loss, cache = softmax_cross_entropy(zc, t[lo:hi], ignore, zc if grads is not None else None)
            total = total + loss * scale
            if grads is not None:
                softmax_cross_entropy_backward(cache, scale)
        else:
            device_softmax_rows(zc, t[lo:hi], ignore, lse[lo:hi], nll[lo:hi])
            if grads is not None:
                launch("softmax_backward", zc.dtype, zc.size, (zc, t[lo:hi], np.int32(ignore), lse[lo:hi], count,
                                                               dtype_scalar(zc, 1.0), zc, np.int64(zc.size),
                                                               np.int32(V)))
        if grads is not None:
            add_chunk_grads(x2[lo:hi], zc, W, grads, lo, hi, k == 0, work)
    if xp is np:
        return np.asarray(total, x2.dtype)
    loss, scored = xp.empty((), x2.dtype), xp.empty(1, x2.dtype)
    launch("softmax_loss_total", x2.dtype, n, (nll, t, np.int32(ignore), np.int64(n), loss, scored), blocks=1)
    return loss


def chunk_weights(t, ignore, spans):
    """What turns each chunk's own mean loss into its share of the block's mean: the chunk's scored
    targets over the block's (1 for a block in one chunk, which needs no count)."""
    if len(spans) == 1:
        return [1.0]
    valid = t != ignore
    count = max(int(valid.sum()), 1)
    return [max(int(valid[lo:hi].sum()), 1) / count for lo, hi in spans]


def add_chunk_grads(xc, g, W, grads, lo, hi, first, work):
    """The chunk's part of the gradients from its logits' gradient g: dx rows by one GEMM, dW and db
    written by the first chunk and added to by the others."""
    dx, dW, db = grads
    xp = array_module(g)
    matmul(g, W.T, out=dx[lo:hi])
    # dW = xc.T @ g, or for a transposed view (a tied table) its transpose g.T @ xc, in place
    target, lhs, rhs = (dW, xc.T, g) if dW.flags.c_contiguous else (dW.T, g.T, xc)
    if first:
        matmul(lhs, rhs, out=target)
        column_sums(g, db)
        return
    matmul(lhs, rhs, out=target, accumulate=True)
    db += column_sums(g, work.get(xp, "db", db.shape, g.dtype))


def output_log_prob(x2, W, b, rows):
    """log softmax of x2 @ W + b (N, V), built `rows` rows at a time (the result is the only N x V array)."""
    xp = array_module(x2)
    out = xp.empty((x2.shape[0], W.shape[1]), x2.dtype)
    for lo, hi in chunks(x2.shape[0], rows):
        out[lo:hi] = log_softmax(head_logits(x2[lo:hi], W, b))
    return out


def output_nll(x2, t, W, b, ignore, rows, work):
    """Each row's -log softmax(x2 @ W + b)[t] (N,), 0 where t is `ignore`, `rows` rows at a time."""
    xp = array_module(x2)
    nll = xp.empty(x2.shape[0], x2.dtype)
    z = work.get(xp, "logits", (min(rows, x2.shape[0]), W.shape[1]), x2.dtype)
    for lo, hi in chunks(x2.shape[0], rows):
        nll[lo:hi] = softmax_nll(head_logits(x2[lo:hi], W, b, out=z[:hi - lo]), t[lo:hi], ignore)
    return nll
