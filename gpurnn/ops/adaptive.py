"""The adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs"): exact
log-probabilities over a large vocabulary at a fraction of the full softmax's cost.

The vocabulary, sorted most frequent first, is cut at c_0 < c_1 < ... < c_{K-1} < V: the head
scores the c_0 frequent words and one entry per tail cluster; cluster k holds the words
[c_k, c_{k+1}) (c_K = V) behind its own projection P_k (D, d_k) and output O_k (d_k, size_k). For a
word w of cluster k, log p(w | h) = log softmax(h W)[c_0 + k] + log softmax(h P_k O_k)[w - c_k];
for a head word the first term alone. So the loss of a row needs the head and only its target's
cluster, and the perplexity is the true one.

The two backends differ in how a cluster's rows are found:

- NumPy gathers them: for each cluster, the rows whose targets fall in it (data-dependent counts,
  read on the host at no cost) are copied out, scored with their own GEMMs and fused softmax, and
  their input gradient is scattered back. Tails cost only the rows that need them.
- CuPy keeps every row in place. A CUDA-graph step is captured once with fixed shapes, and cuBLAS
  runs a GEMM for the rows it was captured with: a row count that lives in device memory cannot
  shorten it. A gathered buffer would therefore need all N rows anyway (any block may put every row
  in one cluster), and gathering into it and scattering out of it would be two passes that save
  nothing. Instead one kernel (`adaptive_targets`) buckets the targets on the device: each row's head
  target, and per cluster its cluster-local target or `ignore` when it lies elsewhere. Each cluster's
  GEMMs then run on all N rows, and losses.py's fused row kernels score only the rows whose local
  target is set (the others contribute nothing and get a zero gradient). No host sync anywhere, so
  the step captures; the price is the tails' GEMMs on all rows and an N x (V - c_0) score buffer,
  still far fewer multiply-adds than the full softmax's N x D x V (for V = 267,735, D = 512 and
  cutoffs 20000, 60000, 200000 with div_value 4: 20.3M per row against 137M).

`log_softmax` also serves `softmax_loss`: both loss layers give `Model.log_prob` a normalised
distribution for sampling.
"""

import math

import numpy as np

from ..backend import array_module
from .kernels import KERNELS, dtype_scalar, grid_blocks, launch
from .linear import column_sums, matmul
from .losses import softmax_cross_entropy, softmax_cross_entropy_backward, softmax_nll


KERNELS["adaptive_targets"] = r"""
// Bucket targets by cluster. bounds holds c_0 < ... < c_K = V. Row i's head target is its word (a head
// word), c_0 + k (a word of cluster k) or ignore; tail_t[k * n + i] is the word's place in cluster k,
// or ignore when the word is not in cluster k.
extern "C" __global__ void adaptive_targets(const int* t, int ignore, const int* bounds, int clusters,
                                            int* head_t, int* tail_t, long long n) {
    GRID_STRIDE(i, n) {
        int target = t[i], cluster = -1;
        if (target != ignore)
            for (int k = 0; k < clusters; ++k) if (target >= bounds[k]) cluster = k;
        head_t[i] = target == ignore ? ignore : cluster < 0 ? target : bounds[0] + cluster;
        for (int k = 0; k < clusters; ++k) tail_t[k * n + i] = k == cluster ? target - bounds[k] : ignore;
    }
}
"""


class AdaptiveClusters:
    """Where the vocabulary is cut: head words [0, c_0), cluster k's words [bounds[k], bounds[k+1]).

    `on_device` is the same bounds as an int32 array of the backend, made once (an upload inside a
    captured step would be refused), for the bucketing kernel.
    """

    def __init__(self, cutoffs, vocab_size, xp):
        self.bounds = tuple(int(c) for c in cutoffs) + (int(vocab_size),)
        self.on_device = xp.asarray(np.array(self.bounds, np.int32))
        self.head_size = self.bounds[0] + len(self.sizes)

    @property
    def sizes(self):
        """Words per cluster."""
        return [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]

    def logits_per_row(self, xp):
        """The most scores one row holds at once: the head and the largest cluster on NumPy (its rows
        gathered), the head and every cluster on CuPy (every row scored in every cluster)."""
        return self.head_size + (max(self.sizes) if xp is np else sum(self.sizes))


class Workspace:
    """Named arrays reused from call to call (grown when a call needs more), so a step allocates
    nothing large: no page faults on the CPU, fixed buffers for a captured CUDA graph."""

    def __init__(self):
        self.arrays = {}

    def get(self, xp, name, shape, dtype):
        size = math.prod(shape)
        flat = self.arrays.get(name)
        if flat is None or flat.size < size or flat.dtype != dtype:
            flat = self.arrays[name] = xp.empty(size, dtype)
        return flat[:size].reshape(shape)


def log_softmax(z):
    """log softmax over each row of z (a new array): z - max - log(sum(exp(z - max)))."""
    xp = array_module(z)
    out = z - z.max(axis=1, keepdims=True)
    out -= xp.log(xp.exp(out).sum(axis=1, keepdims=True))
    return out


def head_logits(h2, head, bias, out=None):
    """h2 @ head (+ bias): the head's scores, c_0 words then one per cluster."""
    z = matmul(h2, head, out=out)
    if bias is not None:
        z += bias
    return z


def adaptive_softmax_loss(h2, t, weights, clusters, ignore, work):
    """Mean negative log-likelihood of targets t (N,) given features h2 (N, D), `ignore` targets skipped.

    weights = (head (D, c_0 + K), head bias or None, [(P_k, O_k), ...]). Returns (loss, cache): loss
    a 0-d array (on the device for CuPy: nothing waits for the GPU), cache what
    `adaptive_softmax_loss_backward` needs. h2 and t are never modified. The scores live in `work`
    and each serves as its own softmax's buffer (softmax_cross_entropy writes exp over a block of
    scores once it has read them, and its backward reads only the buffer): no second N x head array,
    and the same call serves training and evaluation.
    """
    xp = array_module(h2)
    head, bias, tails = weights
    n = h2.shape[0]
    zh = head_logits(h2, head, bias, work.get(xp, "head", (n, clusters.head_size), h2.dtype))
    if xp is np:
        return _gathered_loss(h2, t, tails, clusters, ignore, work, zh)
    return _masked_loss(h2, t, tails, clusters, ignore, work, zh)


def _gathered_loss(h2, t, tails, clusters, ignore, work, zh):
    """NumPy: the head on all rows, each cluster on the rows whose targets fall in it."""
    valid, cluster, head_t = _head_targets(t, clusters, ignore)
    count = max(int(valid.sum()), 1)
    head_loss, head_cache = softmax_cross_entropy(zh, head_t, ignore, zh)
    total = float(head_loss) * count
    gathered = []
    for k, (P, O) in enumerate(tails):
        rows = np.flatnonzero(valid & (cluster == k + 1))
        if not len(rows):
            gathered.append(None)
            continue
        hk = h2[rows]
        p = matmul(hk, P)
        z = matmul(p, O, out=work.get(np, f"tail{k}", (len(rows), O.shape[1]), h2.dtype))
        loss, cache = softmax_cross_entropy(z, t[rows] - clusters.bounds[k], ignore, z)
        total += float(loss) * len(rows)
        gathered.append((rows, hk, p, cache))
    loss = h2.dtype.type(total / count)
    return loss, ("numpy", h2, head_cache, gathered, count)


def _masked_loss(h2, t, tails, clusters, ignore, work, zh):
    """CuPy: targets bucketed on the device; every cluster's GEMMs on all rows, scored where they belong."""
    xp = array_module(h2)
    n, K = h2.shape[0], len(tails)
    t, head_t, tail_t = _device_targets(t, clusters, ignore, work, h2.dtype)
    head_loss, head_cache = softmax_cross_entropy(zh, head_t, ignore, zh)
    count = xp.maximum((t != ignore).sum(), 1).astype(h2.dtype).reshape(1)
    lse, nll = work.get(xp, "tail_lse", (K, n), h2.dtype), work.get(xp, "tail_nll", (K, n), h2.dtype)
    scored = []
    for k, (P, O) in enumerate(tails):
        p = matmul(h2, P)
        z = matmul(p, O, out=work.get(xp, f"tail{k}", (n, O.shape[1]), h2.dtype))
        # losses.py's row kernel: log-sum-exp and loss per row, 0 where the local target is `ignore`
        launch("softmax_rows", h2.dtype, n, (z, tail_t[k], np.int32(ignore), lse[k], nll[k], np.int64(n),
                                             np.int32(z.shape[1])), blocks=grid_blocks(n, threads=1))
        scored.append((p, z))
    loss = head_loss + nll.sum() / count[0]
    return loss, ("cupy", h2, head_cache, scored, (tail_t, lse, count, ignore))


def _head_targets(t, clusters, ignore):
    """NumPy: (scored rows, 0 for a head word or k + 1 for cluster k, the head's target per row)."""
    valid = t != ignore
    cluster = np.searchsorted(clusters.bounds, t, side="right")
    return valid, cluster, np.where(valid & (cluster > 0), clusters.bounds[0] + cluster - 1, t)


def _device_targets(t, clusters, ignore, work, dtype):
    """CuPy: (t as int32, the head's target per row, each cluster's local target per row or `ignore`),
    bucketed by one kernel on the device (compiled for the float type `dtype`, which it does not use)."""
    xp = array_module(t)
    n, K = t.shape[0], len(clusters.sizes)
    t = xp.ascontiguousarray(t, dtype=xp.int32)
    head_t = work.get(xp, "head_t", (n,), np.int32)
    tail_t = work.get(xp, "tail_t", (K, n), np.int32)
    launch("adaptive_targets", dtype, n, (t, np.int32(ignore), clusters.on_device, np.int32(K), head_t, tail_t,
                                          np.int64(n)))
    return t, head_t, tail_t


def adaptive_nll(h2, t, weights, clusters, ignore, work):
    """Each row's negative log-likelihood of its target (N,), 0 where the target is `ignore`: the head's
    term plus, for a tail word, its cluster's; the per-row terms of `adaptive_softmax_loss`'s mean.
    NumPy scores each cluster on its own rows; CuPy every cluster on all rows, nothing read back."""
    xp = array_module(h2)
    head, bias, tails = weights
    zh = head_logits(h2, head, bias, work.get(xp, "head", (h2.shape[0], clusters.head_size), h2.dtype))
    if xp is np:
        valid, cluster, head_t = _head_targets(t, clusters, ignore)
        nll = softmax_nll(zh, head_t, ignore)
        for k, (P, O) in enumerate(tails):
            rows = np.flatnonzero(valid & (cluster == k + 1))
            if len(rows):
                z = matmul(matmul(h2[rows], P), O, out=work.get(np, f"tail{k}", (len(rows), O.shape[1]), h2.dtype))
                nll[rows] += softmax_nll(z, t[rows] - clusters.bounds[k], ignore)
        return nll
    _, head_t, tail_t = _device_targets(t, clusters, ignore, work, h2.dtype)
    nll = softmax_nll(zh, head_t, ignore)
    for k, (P, O) in enumerate(tails):
        z = matmul(matmul(h2, P), O, out=work.get(xp, f"tail{k}", (h2.shape[0], O.shape[1]), h2.dtype))
        nll += softmax_nll(z, tail_t[k], ignore)  # 0 on the rows whose word is in another cluster
    return nll


def adaptive_softmax_loss_backward(cache, dout, weights, grads):
    """Write d loss / d weights into grads (laid out as weights) and return d loss / d h2 (N, D).

    The forward's scores are overwritten with their gradients.
    """
    backend, h2, head_cache, tails, extra = cache
    head, bias, tail_weights = weights
    g_head, g_bias, g_tails = grads
    dzh = softmax_cross_entropy_backward(head_cache, dout)
    matmul(h2.T, dzh, out=g_head)
    if g_bias is not None:
        column_sums(dzh, g_bias)
    dh2 = matmul(dzh, head.T)
    for k, ((P, O), (gP, gO), kept) in enumerate(zip(tail_weights, g_tails, tails)):
        if kept is None:  # no row in this cluster (NumPy)
            gP[...] = 0
            gO[...] = 0
            continue
        if backend == "numpy":
            rows, hk, p, softmax_cache = kept
            dz = softmax_cross_entropy_backward(softmax_cache, dout * len(rows) / extra)
            dh2[rows] += _tail_backward(hk, p, dz, P, O, gP, gO)
        else:
            p, z = kept
            tail_t, lse, count, ignore = extra
            # losses.py's gradient kernel, in place: (softmax - onehot) * dout / count, 0 on unscored rows
            launch("softmax_backward", z.dtype, z.size, (z, tail_t[k], np.int32(ignore), lse[k], count,
                                                         dtype_scalar(z, dout), z, np.int64(z.size),
                                                         np.int32(z.shape[1])))
            dh2 += _tail_backward(h2, p, z, P, O, gP, gO)
    return dh2


def _tail_backward(hk, p, dz, P, O, gP, gO):
    """One cluster's chain back from its scores' gradient dz: gO = p^T dz, gP = hk^T (dz O^T); returns
    the rows' input gradient dz O^T P^T."""
    matmul(p.T, dz, out=gO)
    dp = matmul(dz, O.T)
    matmul(hk.T, dp, out=gP)
    return matmul(dp, P.T)


def adaptive_log_prob(h2, weights, clusters):
    """The full normalised log-distribution (N, V): head words from the head, cluster k's words as
    log p(cluster k) + log softmax within it. Materialises N x V: for sampling and checks, not training."""
    xp = array_module(h2)
    head, bias, tails = weights
    c0 = clusters.bounds[0]
    head_lp = log_softmax(head_logits(h2, head, bias))
    out = xp.empty((h2.shape[0], clusters.bounds[-1]), h2.dtype)
    out[:, :c0] = head_lp[:, :c0]
    for k, (P, O) in enumerate(tails):
        lo, hi = clusters.bounds[k], clusters.bounds[k + 1]
        out[:, lo:hi] = log_softmax(matmul(matmul(h2, P), O)) + head_lp[:, c0 + k:c0 + k + 1]
    return out
