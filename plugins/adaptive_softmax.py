"""Adaptive softmax with loss (Grave et al. 2017): the output layer for large vocabularies.

It replaces the ``affine`` + ``softmax_loss`` pair: it takes the last hidden features (B, T, D) and
owns the head weight (D, c_0 + K) and, per tail cluster k, a projection P_k (D, d_k) and an output
O_k (d_k, size_k), with d_k = D // div_value ** (k + 1) as in PyTorch's
``nn.AdaptiveLogSoftmaxWithLoss``. Its log-probabilities are exact, so perplexity is the true
perplexity, and `log_prob` gives the full distribution for sampling. Cutoffs only make sense on a
vocabulary sorted most frequent first, which `gpurnn prepare` writes (training checks the corpus).
How each backend computes it is in `gpurnn.ops.adaptive`.
"""

import math

import numpy as np

from gpurnn.plugin import (AdaptiveClusters, IGNORE, Layer, ParamLayout, SpecError, Workspace, adaptive_log_prob,
                           adaptive_nll, adaptive_softmax_loss, adaptive_softmax_loss_backward, hookimpl, init_matrix,
                           require_input_size)

NAME = "adaptive_softmax_loss"


def check_cutoffs(cutoffs, vocab_size):
    """Refuse cutoffs that are not increasing positive integers below the vocabulary size."""
    ints = isinstance(cutoffs, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs)
    if not (ints and cutoffs and cutoffs[0] > 0 and cutoffs[-1] < vocab_size
            and all(a < b for a, b in zip(cutoffs, cutoffs[1:]))):
        raise SpecError(f"{NAME}: cutoffs must be increasing positive integers below the vocabulary size "
                        f"{vocab_size}, such as [2000, 6000]; got {cutoffs!r}")


def projection_sizes(in_size, n_clusters, div_value):
    """d_k = in_size // div_value ** (k + 1) per cluster; each must be at least 1."""
    if isinstance(div_value, bool) or not isinstance(div_value, (int, float)) or not (
            math.isfinite(div_value) and div_value > 0):
        raise SpecError(f"{NAME}: div_value must be a number > 0, not {div_value!r}")
    sizes = [int(in_size // div_value ** (k + 1)) for k in range(n_clusters)]
    if min(sizes) < 1:
        k = sizes.index(0)
        raise SpecError(f"{NAME}: div_value {div_value:g} leaves cluster {k} a projection of size 0 "
                        f"({in_size} // {div_value:g}**{k + 1}); use a smaller div_value or fewer cutoffs")
    return sizes


class AdaptiveSoftmaxWithLoss(Layer):
    """Adaptive softmax with cross-entropy: frequent words in a head, rare ones in cheaper tail clusters."""

    is_loss = True
    needs_frequency_order = True  # the training job checks the corpus's vocabulary order

    def __init__(self, ctx, cutoffs, div_value=4.0, head_bias=False, init="default", ignore_index=IGNORE):
        super().__init__(ctx)
        check_cutoffs(cutoffs, ctx.vocab_size)
        if not isinstance(head_bias, bool):
            raise SpecError(f"{NAME}: head_bias must be true or false, not {head_bias!r}")
        D = require_input_size(ctx, NAME)
        self.clusters = AdaptiveClusters(cutoffs, ctx.vocab_size, self.xp)
        self.ignore_index = ignore_index
        dtype = ctx.backend.dtype  # every table drawn straight into the layer's dtype, as the guide says
        self.add_param("head", init_matrix(ctx.rng, (D, self.clusters.head_size), init, D, dtype))
        self.param_layout = {"head": ParamLayout("h @ head (+ head_bias): the head words, then one score per "
                                                 "cluster", "input, head words + clusters")}
        if head_bias:
            self.add_param("head_bias", np.zeros(self.clusters.head_size))
            self.param_layout["head_bias"] = ParamLayout("added to h @ head", "head words + clusters")
        for k, (d, size) in enumerate(zip(projection_sizes(D, self.n_clusters, div_value), self.clusters.sizes)):
            lo, hi = self.clusters.bounds[k], self.clusters.bounds[k + 1]
            self.add_param(f"proj{k}", init_matrix(ctx.rng, (D, d), init, D, dtype))
            self.add_param(f"out{k}", init_matrix(ctx.rng, (d, size), init, d, dtype))
            self.param_layout[f"proj{k}"] = ParamLayout(f"h @ proj{k} @ out{k}: words {lo}..{hi - 1}", "input, projection")
            self.param_layout[f"out{k}"] = ParamLayout(f"h @ proj{k} @ out{k}: words {lo}..{hi - 1}",
                                                       "projection, cluster words")
        self.work = Workspace()
        self.cache = None

    @property
    def input_size(self):
        """The feature size it reads (the head's rows): it scores features, not logits."""
        return self.params["head"].shape[0]

    @property
    def n_clusters(self):
        return len(self.clusters.sizes)

    @property
    def logits_per_row(self):
        """The most scores one row holds at once (evaluation sizes its blocks by it)."""
        return self.clusters.logits_per_row(self.xp)

    def _layout(self, arrays):
        """(head, head bias or None, [(proj_k, out_k), ...]) from params or grads."""
        return (arrays["head"], arrays.get("head_bias"),
                [(arrays[f"proj{k}"], arrays[f"out{k}"]) for k in range(self.n_clusters)])

    def forward(self, x, t):
        """Mean loss over the scored targets, a 0-d array (on the device for CuPy)."""
        self.shape = x.shape
        loss, self.cache = adaptive_softmax_loss(x.reshape(-1, x.shape[-1]), t.reshape(-1), self._layout(self.params),
                                                 self.clusters, self.ignore_index, self.work)
        return loss

    def backward(self, dout=1.0):
        """d loss / d x; follows the forward just before it (whose scores it overwrites)."""
        dh2 = adaptive_softmax_loss_backward(self.cache, dout, self._layout(self.params), self._layout(self.grads))
        self.cache = None
        return dh2.reshape(self.shape)

    def target_log_prob(self, x, t):
        """log P(t | x) per position (B, T) on the device, 0 where t is the ignore index (for scoring)."""
        nll = adaptive_nll(x.reshape(-1, x.shape[-1]), t.reshape(-1), self._layout(self.params), self.clusters,
                           self.ignore_index, self.work)
        return -nll.reshape(t.shape)

    def log_prob(self, x):
        """The normalised log-distribution over the whole vocabulary, (B, T, V): head x tail."""
        lp = adaptive_log_prob(x.reshape(-1, x.shape[-1]), self._layout(self.params), self.clusters)
        return lp.reshape(*x.shape[:-1], -1)


@hookimpl
def gpurnn_layer_types():
    return {NAME: AdaptiveSoftmaxWithLoss}
