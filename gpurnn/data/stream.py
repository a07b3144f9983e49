"""BPTTStream: ordered offset minibatches for truncated BPTT, the textbook trainer's batching.

With N ids in the split, M = N - 1 input positions and jump = M // B, the batch at step k is

    xs[b, j] = ids[p],  ts[b, j] = ids[p + 1],  p = (b * jump + k * T + j) % M

so lane b reads the split in order from offset b * jump, wrapping to the start, and the hidden state of
lane b carries meaningfully from one batch to the next. One epoch is M // (B * T) steps; k counts on
across epochs. The state is the step count alone, so a stream resumed from `state_dict()` yields exactly
the batches the uninterrupted one would have.

Evaluation reads a split differently (`eval_batches`): every prediction exactly once, in B contiguous
lanes padded with IGNORE targets, which the loss skips.

Reading: each refill reads, for every lane, one contiguous block of many steps (two when the lane wraps)
into (B, L) buffers, and the batches are column slices of them. An HDF5 split is read that way at
constant memory; it is loaded whole only when small (or `in_memory=True`).

Lanes: `lanes=(lo, hi)` makes a stream that yields only rows lo..hi-1 of the global batch (the share
of one rank in data-parallel training) and reads only those lanes' ids; offsets, epochs and the state
are still those of the whole batch, so any split of the lanes sees exactly the global batches' rows.
"""

import math

import numpy as np

from ..config import is_int
from ..errors import DataError

IGNORE = -1  # a target that scores nothing (padding); the softmax loss's default ignore_index

READ_AHEAD_IDS = 1 << 20  # ids per refill, over all lanes (4 MiB each for xs and ts)
IN_MEMORY_IDS = 1 << 22  # splits up to this many ids (16 MiB) are loaded whole by default


class BPTTStream:
    """An endless iterator of `(xs, ts)` int32 arrays of shape (batch_size, time_size); see the module doc.

    `split` is a corpus split (sliceable, with len) or a 1-D NumPy array of ids. `.iteration` counts the
    batches given so far, `.epoch` the completed epochs, `.steps_per_epoch` the batches per epoch;
    `.in_memory` says whether the whole split is held in memory. `lanes=(lo, hi)` yields rows lo..hi-1
    of each global batch (`.lanes`); a stream of a lane subset reads the split from its source (a
    file) unless `in_memory=True`.
    """

    def __init__(self, split, batch_size, time_size, *, in_memory=None, name=None, lanes=None):
        if isinstance(split, np.ndarray) and split.ndim != 1:
            raise DataError(f"a split of ids must be 1-D, not of shape {split.shape}")
        self.name = name or getattr(split, "name", None) or "array"
        self.tokens = len(split)
        self.batch_size = check_positive("batch size", batch_size)
        self.time_size = check_positive("time size", time_size)
        positions = self.tokens - 1
        needed = self.batch_size * self.time_size + 1
        if self.tokens < needed:
            raise DataError(f"the {self.name} split has {self.tokens} tokens; batch size {batch_size} x "
                            f"time size {time_size} needs at least {needed}")
        self.jump = positions // self.batch_size
        self.steps_per_epoch = positions // (self.batch_size * self.time_size)
        self.iteration = 0
        self.lanes = check_lanes(lanes, self.batch_size)
        if in_memory is None:
            whole = self.lanes == (0, self.batch_size)
            in_memory = isinstance(split, np.ndarray) or (whole and self.tokens <= IN_MEMORY_IDS)
        self._ids = np.asarray(split[:], dtype=np.int32) if in_memory else split
        self.in_memory = isinstance(self._ids, np.ndarray)
        # A block spans at most one epoch: a lane then reads at most M // B ids, wrapping at most once.
        steps = max(1, READ_AHEAD_IDS // (self.batch_size * self.time_size))
        self._block_steps = min(steps, self.steps_per_epoch)
        self._xs = np.empty((self.lanes[1] - self.lanes[0], self._block_steps * self.time_size), dtype=np.int32)
        self._ts = np.empty_like(self._xs)
        self._block_start = None  # the step at which the buffered block begins

    @property
    def epoch(self):
        return self.iteration // self.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        k = self.iteration
        if self._block_start is None or not 0 <= k - self._block_start < self._block_steps:
            self._refill(k)
        start = (k - self._block_start) * self.time_size
        cols = slice(start, start + self.time_size)
        self.iteration += 1
        return self._xs[:, cols].copy(), self._ts[:, cols].copy()

    def _refill(self, k):
        """Read the block of `_block_steps` steps starting at step k into the lane buffers."""
        positions = self.tokens - 1
        length = self._xs.shape[1]
        lo, hi = self.lanes
        for b in range(lo, hi):
            p = (b * self.jump + k * self.time_size) % positions
            first = min(length, positions - p)  # ids before the lane wraps to the start
            self._read_lane(b - lo, 0, p, first)
            if first < length:
                self._read_lane(b - lo, first, 0, length - first)
        self._block_start = k

    def _read_lane(self, b, at, p, count):
        """Buffer row b: xs[b, at:at+count] = ids[p:p+count] and ts one id further, from one contiguous read."""
        run = self._ids[p:p + count + 1]
        self._xs[b, at:at + count] = run[:-1]
        self._ts[b, at:at + count] = run[1:]

    def state_dict(self):
        """The stream's position and what it streams, as a small JSON-able dict."""
        return {"split": self.name, "tokens": self.tokens, "batch_size": self.batch_size,
                "time_size": self.time_size, "iteration": self.iteration}

    def load_state_dict(self, state):
        """Continue from `state` (from `state_dict()` of a stream over the same split, B and T)."""
        mine = self.state_dict()
        try:
            theirs = {key: state[key] for key in mine}
            iteration = int(state["iteration"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"not a BPTTStream state: {state!r}") from None
        del mine["iteration"], theirs["iteration"]
        if theirs != mine:
            raise DataError(f"the stream state is for {describe(theirs)}; this stream is {describe(mine)}")
        if iteration < 0:
            raise DataError(f"a stream state's iteration cannot be negative ({iteration})")
        self.iteration = iteration
        self._block_start = None


def describe(state):
    return (f"split {state['split']!r} ({state['tokens']} tokens), batch size {state['batch_size']}, "
            f"time size {state['time_size']}")


def check_lanes(lanes, batch_size):
    """(lo, hi) with 0 <= lo < hi <= batch_size; None means all lanes."""
    if lanes is None:
        return (0, batch_size)
    try:
        lo, hi = (int(v) for v in lanes)
    except (TypeError, ValueError):
        raise DataError(f"lanes must be a pair (lo, hi), not {lanes!r}") from None
    if not 0 <= lo < hi <= batch_size:
        raise DataError(f"lanes ({lo}, {hi}) must satisfy 0 <= lo < hi <= batch size {batch_size}")
    return (lo, hi)


def check_positive(what, value):
    if not (is_int(value) and value >= 1):
        raise DataError(f"{what} must be a positive integer, not {value!r}")
    return int(value)


def eval_layout(positions, batch_size, time_size):
    """(lanes, lane length) of an evaluation: at most `batch_size` lanes, each holding at least one block
    and none empty.

    More lanes than positions // time_size would pad most lanes (and, past the positions, give every
    token a lane of its own), costing memory and context for nothing.
    """
    lane = math.ceil(positions / max(1, min(batch_size, positions // time_size)))
    return math.ceil(positions / lane), lane


def eval_lanes(positions, batch_size, time_size):
    """How many lanes `eval_batches` uses for these sizes."""
    return eval_layout(positions, batch_size, time_size)[0]


def eval_batches(ids, batch_size, time_size, rows=None):
    """Yield (xs, ts, count): int32 (B, T) blocks covering every prediction of `ids` once.

    The N - 1 predictions are cut into B contiguous lanes of ceil((N - 1) / B) positions (B from
    `eval_layout`); the last lane's missing positions are padded with IGNORE targets. `rows` (lo, hi)
    keeps lanes lo..hi-1 only (one rank's share; it may be empty), `count` then counting theirs.
    """
    ids = np.asarray(ids)
    positions = len(ids) - 1
    if positions < 1:
        raise DataError(f"a split needs at least 2 tokens to be evaluated, it has {len(ids)}")
    B, lane = eval_layout(positions, batch_size, time_size)
    steps = math.ceil(lane / time_size)
    width = steps * time_size
    xs = np.zeros((B, width), np.int32)
    ts = np.full((B, width), IGNORE, np.int32)
    for b in range(B):
        start, stop = b * lane, min((b + 1) * lane, positions)
        xs[b, : stop - start] = ids[start:stop]
        ts[b, : stop - start] = ids[start + 1: stop + 1]
    if rows is not None:
        xs, ts = xs[rows[0]: rows[1]], ts[rows[0]: rows[1]]
    for k in range(steps):
        block = slice(k * time_size, (k + 1) * time_size)
        t = ts[:, block]
        count = int((t != IGNORE).sum())
        if count:
            yield xs[:, block], t, count
