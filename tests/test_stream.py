"""BPTTStream against a direct NumPy implementation of its rule; resume; refusals; HDF5-backed reads."""

import json

import numpy as np
import pytest

from gpurnn.data import BPTTStream, corpus_from_text, demo_corpus, open_corpus, prepare_corpus
from gpurnn.data import stream as stream_module
from gpurnn.errors import DataError


def expected_batch(ids, B, T, k):
    """The rule written out: p = (b * jump + k * T + j) % M, xs = ids[p], ts = ids[p + 1]."""
    M = len(ids) - 1
    p = ((np.arange(B)[:, None] * (M // B)) + k * T + np.arange(T)[None, :]) % M
    return ids[p], ids[p + 1]


def textbook_batches(corpus, B, T, iters):
    """The textbook trainer's get_batch loop, verbatim in structure."""
    xs, ts = corpus[:-1], corpus[1:]
    data_size = len(xs)
    offsets = [i * (data_size // B) for i in range(B)]
    time_idx = 0
    for _ in range(iters):
        batch_x, batch_t = np.empty((B, T), "i"), np.empty((B, T), "i")
        for t in range(T):
            for i, offset in enumerate(offsets):
                batch_x[i, t] = xs[(offset + time_idx) % data_size]
                batch_t[i, t] = ts[(offset + time_idx) % data_size]
            time_idx += 1
        yield batch_x, batch_t


@pytest.fixture
def small_read_ahead(monkeypatch):
    """A tiny read-ahead so that refills and lane wrap-arounds happen often."""
    monkeypatch.setattr(stream_module, "READ_AHEAD_IDS", 50)


@pytest.mark.parametrize("n, B, T", [(2, 1, 1), (50, 3, 4), (101, 7, 5), (1000, 20, 35), (997, 1, 13),
                                     (360, 16, 7), (64, 63, 1)])
@pytest.mark.parametrize("read_ahead", ["default", "small"])
def test_stream_matches_the_rule(request, rng, n, B, T, read_ahead):
    if read_ahead == "small":
        request.getfixturevalue("small_read_ahead")
    ids = rng.integers(0, 1000, size=n).astype(np.int32)
    stream = BPTTStream(ids, B, T)
    assert stream.steps_per_epoch == (n - 1) // (B * T)
    for k in range(3 * stream.steps_per_epoch + 5):  # several epochs: every lane wraps around
        assert stream.iteration == k and stream.epoch == k // stream.steps_per_epoch
        xs, ts = next(stream)
        want_x, want_t = expected_batch(ids, B, T, k)
        assert xs.dtype == np.int32 and xs.shape == (B, T) and xs.flags.c_contiguous
        np.testing.assert_array_equal(xs, want_x)
        np.testing.assert_array_equal(ts, want_t)


def test_stream_is_the_textbook_batching():
    ids = demo_corpus().split("train")
    stream = BPTTStream(ids, 10, 5)
    for (want_x, want_t), (xs, ts) in zip(textbook_batches(ids, 10, 5, 45), stream):
        np.testing.assert_array_equal(xs, want_x)
        np.testing.assert_array_equal(ts, want_t)
    assert stream.iteration == 45 and stream.steps_per_epoch == 19 and stream.epoch == 2


@pytest.mark.parametrize("stop", [0, 1, 2, 7, 19, 20, 33])
def test_resume_yields_the_next_batch(small_read_ahead, rng, stop):
    ids = rng.integers(0, 50, size=300).astype(np.int32)
    first = BPTTStream(ids, 4, 5)
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BPTTStream(ids, 4, 5)
    resumed.load_state_dict(state)
    for k in range(stop, stop + 25):
        xs, ts = next(resumed)
        want_x, want_t = expected_batch(ids, 4, 5, k)
        np.testing.assert_array_equal(xs, want_x)
        np.testing.assert_array_equal(ts, want_t)
        np.testing.assert_array_equal(next(first)[0], xs)


def test_state_is_small_and_plain():
    state = BPTTStream(np.arange(100, dtype=np.int32), 3, 4, name="train").state_dict()
    assert state == {"split": "train", "tokens": 100, "batch_size": 3, "time_size": 4, "iteration": 0}


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 4}, "batch size 4"),
    ({"time_size": 5}, "time size 5"),
    ({"split": "valid"}, "split 'valid'"),
    ({"tokens": 99}, "(99 tokens)"),
])
def test_state_from_another_stream_is_refused(change, message):
    stream = BPTTStream(np.arange(100, dtype=np.int32), 3, 4, name="train")
    state = {**stream.state_dict(), **change, "iteration": 5}
    with pytest.raises(DataError, match="stream state is for") as info:
        stream.load_state_dict(state)
    assert message in str(info.value) and stream.iteration == 0


@pytest.mark.parametrize("state", [{}, {"iteration": 3}, None, "x"])
def test_malformed_state_is_refused(state):
    stream = BPTTStream(np.arange(100, dtype=np.int32), 3, 4)
    with pytest.raises(DataError, match="not a BPTTStream state"):
        stream.load_state_dict(state)


def test_split_too_short_says_how_many_tokens_are_needed():
    with pytest.raises(DataError, match=r"has 20 tokens; batch size 4 x time size 5 needs at least 21"):
        BPTTStream(np.arange(20, dtype=np.int32), 4, 5)
    assert BPTTStream(np.arange(21, dtype=np.int32), 4, 5).steps_per_epoch == 1


@pytest.mark.parametrize("B, T", [(0, 5), (3, 0), (-1, 2), (2.5, 3), (True, 3)])
def test_bad_batch_or_time_size(B, T):
    with pytest.raises(DataError, match="must be a positive integer"):
        BPTTStream(np.arange(100, dtype=np.int32), B, T)


def test_two_dimensional_array_is_refused():
    with pytest.raises(DataError, match="must be 1-D"):
        BPTTStream(np.zeros((10, 10), dtype=np.int32), 2, 2)


@pytest.mark.parametrize("in_memory", [False, True, None])
def test_hdf5_split_streams_like_the_array(tmp_path, small_read_ahead, rng, in_memory):
    words = [f"w{i}" for i in rng.integers(0, 40, size=900)]
    text = "\n".join(" ".join(words[i:i + 9]) for i in range(0, 900, 9)) + "\n"
    (tmp_path / "train.txt").write_text(text)
    prepare_corpus(tmp_path / "train.txt", tmp_path / "c.h5")
    with open_corpus(tmp_path / "c.h5") as corpus:
        split = corpus.split("train")
        ids = split[:]
        stream = BPTTStream(split, 6, 7, in_memory=in_memory)
        assert stream.state_dict()["split"] == "train"
        assert stream.in_memory == (in_memory is not False)
        for k in range(2 * stream.steps_per_epoch + 3):
            xs, ts = next(stream)
            want_x, want_t = expected_batch(ids, 6, 7, k)
            np.testing.assert_array_equal(xs, want_x)
            np.testing.assert_array_equal(ts, want_t)
    np.testing.assert_array_equal(ids, corpus_from_text(text).split("train"))


class CountingSplit:
    """A split (sliceable, with len) over `ids` that records the length of every read."""

    name = "counted"

    def __init__(self, ids):
        self.ids, self.reads = ids, []

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        self.reads.append(index.stop - index.start)
        return self.ids[index]


def test_hdf5_reads_are_blocks_never_single_tokens(tmp_path):
    """Each refill reads one slice per lane (two when it wraps), each many steps long."""
    ids = np.arange(100_000, dtype=np.int32)
    split = CountingSplit(ids)
    stream = BPTTStream(split, 8, 10, in_memory=False)
    for _ in range(stream.steps_per_epoch):
        next(stream)
    refills = -(-stream.steps_per_epoch // stream._block_steps)
    assert min(split.reads) > 10 * stream.time_size and len(split.reads) <= 2 * 8 * refills
    assert sum(split.reads) <= len(ids) + 2 * 8 * refills  # each id read once (plus one per read for ts)


@pytest.mark.parametrize("lanes", [(0, 3), (3, 6), (2, 3), (0, 6)])
def test_a_lane_subset_yields_those_rows_of_the_global_batches(small_read_ahead, rng, lanes):
    """Rows lo..hi-1 of every global batch, across refills and epochs; the state stays the global one."""
    ids = rng.integers(0, 50, 300).astype(np.int32)
    whole, part = BPTTStream(ids, 6, 7), BPTTStream(ids, 6, 7, lanes=lanes)
    assert part.lanes == lanes and part.steps_per_epoch == whole.steps_per_epoch
    for _ in range(2 * whole.steps_per_epoch + 3):
        (wx, wt), (px, pt) = next(whole), next(part)
        np.testing.assert_array_equal(px, wx[lanes[0]:lanes[1]])
        np.testing.assert_array_equal(pt, wt[lanes[0]:lanes[1]])
    assert part.state_dict() == whole.state_dict()


def test_a_lane_subset_reads_only_its_lanes_from_the_file():
    """Two ranks' streams over a split read about half of it each per epoch, never the whole."""
    ids = np.arange(100_000, dtype=np.int32)
    splits = [CountingSplit(ids), CountingSplit(ids)]
    streams = [BPTTStream(splits[0], 8, 10, lanes=(0, 4)), BPTTStream(splits[1], 8, 10, lanes=(4, 8))]
    assert not any(s.in_memory for s in streams)
    for stream in streams:
        for _ in range(stream.steps_per_epoch):
            next(stream)
    for split in splits:
        assert max(split.reads) < len(ids) // 4 and sum(split.reads) <= len(ids) // 2 + 100


@pytest.mark.parametrize("lanes", [(3, 3), (-1, 2), (0, 7), "ab", (1,)])
def test_bad_lanes_are_refused(lanes):
    with pytest.raises(DataError, match="lanes"):
        BPTTStream(np.arange(100, dtype=np.int32), 6, 2, lanes=lanes)
