"""Perplexity over a whole split, every token scored exactly once.

The N - 1 predictions of a split (each token from the one before it) are cut into B contiguous lanes
of ceil((N - 1) / B) positions, read T at a time with the hidden state carried along each lane
(`gpurnn.data.stream.eval_batches`). The last lane is shorter: its missing positions are padded with
IGNORE targets, which the loss skips, so the padding scores nothing. Each lane starts from a zero
state, so B = 1 gives the exact perplexity of one left-to-right pass; larger B is faster and costs a
little context at B - 1 lane starts. On CuPy the forward pass of a block is captured once as a CUDA
graph and replayed for every block (as training steps are), unless `cuda_graph` is off. Under data
parallelism each rank scores its share of the lanes and the ranks add up their sums.
"""

import math

import numpy as np

from ..data.stream import eval_batches, eval_lanes
from ..memory import LOWER_EVAL, out_of_memory
from .graph import CapturedStep
from .parallel import Group

# The most logits (B x T x V) one evaluation block may hold: bounds memory whatever --batch-size says.
MAX_BLOCK_LOGITS = 1 << 25  # 128 MiB in float32
LARGEST_LOG = math.log(1.7e308)  # exp of more than this overflows a float


def perplexity_of_loss(mean_loss):
    """exp(mean loss), or inf where that overflows a float (a diverging model), never an error."""
    return math.inf if mean_loss >= LARGEST_LOG else math.exp(mean_loss)


def lanes_for(model, positions, batch_size, time_size):
    """The lanes an evaluation uses: each holds a block, and a block's logits (the scores the loss layer
    holds at once, `Model.logits_per_row` per position) stay within MAX_BLOCK_LOGITS."""
    by_memory = max(1, MAX_BLOCK_LOGITS // (time_size * max(model.logits_per_row, 1)))
    return eval_lanes(positions, min(batch_size, by_memory), time_size)


def perplexity(model, ids, batch_size=10, time_size=35, progress=None, on_note=None, cuda_graph=True,
               group=None):
    """(perplexity, tokens scored) of `model` on `ids`; the model's training state is left as it was.

    `progress(done, total)`, when given, is called after each batch (for a progress bar). `batch_size`
    is lowered where it would leave a lane without a whole block or exceed the memory bound;
    `on_note(text)` is told when that happens (and when a CUDA graph cannot be captured). With `group`
    (the ranks of a data-parallel run, `gpurnn.train.parallel.Group`), this rank scores its share of
    the lanes and every rank returns the whole split's perplexity.
    """
    lanes = lanes_for(model, len(ids) - 1, batch_size, time_size)
    if lanes < batch_size and on_note is not None:
        on_note(f"batch size {batch_size} lowered to {lanes} (each lane holds at least one block of "
                f"{time_size} tokens, and a block at most {MAX_BLOCK_LOGITS:,} logits)")
    saved_state = model.get_state()
    was_training = model.layers[0].training
    model.eval()
    model.reset_state()
    total, tokens = 0.0, 0
    group = group if group is not None else Group()  # one process: all the lanes, and sums that are its own
    rows = group.share(lanes)
    try:
        with out_of_memory(f"evaluating {rows[1] - rows[0]} lanes of {time_size} tokens", LOWER_EVAL):
            batches = list(eval_batches(ids, lanes, time_size, rows))  # views of two (B, width) arrays
            forward = block_forward(model, cuda_graph, on_note)
            for done, (xs, ts, count) in enumerate(batches, 1):
                loss = forward(xs, ts)
                total = total + loss.astype(np.float64) * count  # float64, on the device until the end
                tokens += count
                if progress:
                    progress(done, len(batches))
        sums = np.array([float(total), tokens])  # this rank's: loss times tokens, tokens
    finally:
        model.set_state(saved_state)
        model.train(was_training)
    sums = group.sum(sums)
    return perplexity_of_loss(sums[0] / sums[1]), int(sums[1])


def block_forward(model, cuda_graph=True, on_note=None):
    """forward(xs, ts) -> mean loss of one block from host arrays: replayed from a CUDA graph on CuPy
    (every block of an evaluation has the same shape), eager otherwise."""
    backend = model.backend
    if backend.is_gpu and cuda_graph:
        return CapturedStep(model.forward, backend, on_note or (lambda text: None), "evaluation")
    return lambda xs, ts: model.forward(backend.asarray(xs), backend.asarray(ts))
