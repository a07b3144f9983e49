"""Perplexity over a whole split, every token scored exactly once.

The N - 1 predictions of a split (each token from the one before it) are cut into B contiguous lanes
of ceil((N - 1) / B) positions, read T at a time with the hidden state carried along each lane. The
last lane is shorter: its missing positions are padded with target -1, which the loss ignores, so
the padding scores nothing. Each lane starts from a zero state, so B = 1 gives the exact perplexity
of one left-to-right pass; larger B is faster and costs a little context at B - 1 lane starts.
"""

import math

import numpy as np

from ..errors import DataError

IGNORE = -1


def eval_batches(ids, batch_size, time_size):
    """Yield (xs, ts, count): int32 (B, T) blocks covering every prediction of `ids` once."""
    ids = np.asarray(ids)
    positions = len(ids) - 1
    if positions < 1:
        raise DataError(f"a split needs at least 2 tokens to be evaluated, it has {len(ids)}")
    B = max(1, min(batch_size, positions))
    lane = math.ceil(positions / B)
    steps = math.ceil(lane / time_size)
    width = steps * time_size
    xs = np.zeros((B, width), np.int32)
    ts = np.full((B, width), IGNORE, np.int32)
    for b in range(B):
        start, stop = b * lane, min((b + 1) * lane, positions)
        xs[b, : stop - start] = ids[start:stop]
        ts[b, : stop - start] = ids[start + 1: stop + 1]
    for k in range(steps):
        block = slice(k * time_size, (k + 1) * time_size)
        t = ts[:, block]
        count = int((t != IGNORE).sum())
        if count:
            yield xs[:, block], t, count


def perplexity(model, ids, batch_size=10, time_size=35):
    """(perplexity, tokens scored) of `model` on `ids`; the model's training state is left as it was."""
    backend = model.backend
    saved_state = model.get_state()
    was_training = model.layers[0].training
    model.eval()
    model.reset_state()
    total, tokens = 0.0, 0
    try:
        for xs, ts, count in eval_batches(ids, batch_size, time_size):
            loss = model.forward(backend.asarray(xs), backend.asarray(ts))
            total = total + loss.astype(np.float64) * count  # float64, on the device until the end
            tokens += count
        mean = float(total) / tokens
    finally:
        model.set_state(saved_state)
        model.train(was_training)
    return math.exp(mean), tokens
