"""Optimizers, clipping, checkpoint files, evaluation coverage and sampling (no stream needed)."""

import math

import h5py
import numpy as np
import pytest

from gpurnn.errors import CheckpointError, GpurnnError
from gpurnn.model import Model, preset_specs
from gpurnn.train.checkpoint import load_checkpoint, save_checkpoint
from gpurnn.data.stream import IGNORE, eval_batches
from gpurnn.train.evaluate import perplexity
from gpurnn.train.generate import generate_texts, prompt_ids, prompt_tokens, sample
from gpurnn.ops.updates import ELEMENT_BLOCK
from gpurnn.train.optim import Adam, SGD, make_optimizer


def test_clipping_brings_the_norm_to_max_norm_and_leaves_small_gradients():
    g = np.array([3.0, 0.0, 4.0])  # norm 5
    p = np.zeros(3)
    SGD(lr=1.0).step(p, g, max_norm=1.0)
    np.testing.assert_allclose(p, [-0.6, 0.0, -0.8], rtol=1e-5)
    small = np.array([0.3, 0.4])
    q = np.zeros(2)
    SGD(lr=1.0).step(q, small, max_norm=1.0)
    np.testing.assert_array_equal(q, -small)
    r = np.zeros(3)
    SGD(lr=1.0).step(r, g)  # no clipping
    np.testing.assert_array_equal(r, -g)


def reference_adam(p, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam written plainly, one whole-array expression per line."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return p - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps), m, v


def test_blocked_threaded_updates_equal_the_plain_formulas_on_large_arrays():
    """A flat buffer spanning many blocks (and a ragged last one), with gradient clipping folded in."""
    rng = np.random.default_rng(0)
    n = 9 * ELEMENT_BLOCK + 7
    p0 = rng.standard_normal(n)
    adam, sgd = Adam(lr=0.01), SGD(lr=0.1)
    pa, ps = p0.copy(), p0.copy()
    ref = (p0.copy(), 0.0, 0.0)
    for t in (1, 2, 3):
        g = rng.standard_normal(n)
        scale = 2.0 / np.linalg.norm(g)  # clip to norm 2
        adam.step(pa, g, max_norm=2.0)
        sgd.step(ps, g, max_norm=2.0)
        ref = reference_adam(ref[0], scale * g, *ref[1:], t, 0.01)
        p0 = p0 - 0.1 * scale * g
    np.testing.assert_allclose(pa, ref[0], rtol=1e-9, atol=1e-12)  # the norm: one dot vs np.linalg.norm
    np.testing.assert_allclose(ps, p0, rtol=1e-9, atol=1e-10)


def test_sgd_and_adam_minimise_a_quadratic():
    for opt in (SGD(lr=0.1), Adam(lr=0.1)):
        x = np.array([5.0, -3.0])
        for _ in range(300):
            opt.step(x, 2 * x)
        assert np.abs(x).max() < 1e-2, type(opt).__name__


def test_adam_matches_the_textbook_formula_and_round_trips_its_state(np64, registry):
    model = Model(preset_specs("simple-rnnlm", wordvec_size=3, hidden_size=4), 5, np64, registry)
    opt = Adam(lr=0.01)
    g = np.full(model.flat_params.size, 0.5)
    start = model.flat_params.copy()
    opt.step(model.flat_params, g)
    # first step: m = 0.05, v = 0.00025; lr_t = 0.01 * sqrt(0.001) / 0.1
    delta = 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9) * 0.05 / (math.sqrt(0.00025) + 1e-8)
    np.testing.assert_allclose(model.flat_params, start - delta, rtol=1e-12)
    state = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt.state_dict(model).items()}
    assert set(state) == {"t"} | {f"{m}.{k}" for m in "mv" for k in model.params}
    clone = Adam(lr=0.01)
    clone.load_state_dict(state, model)
    q = model.flat_params.copy()
    opt.step(model.flat_params, g)
    clone.step(q, g)
    np.testing.assert_array_equal(model.flat_params, q)
    with pytest.raises(GpurnnError, match="unknown optimizer"):
        make_optimizer("lbfgs", 1.0)


def test_checkpoint_round_trip_and_atomicity(tmp_path):
    path = tmp_path / "ck.h5"
    params = {"rnn.Wh": np.arange(6.0).reshape(2, 3)}
    save_checkpoint(path, params=params, optimizer_arrays={"m.rnn.Wh": np.ones((2, 3))},
                    state={"rnn.h": np.zeros((1, 3))}, vocab=["a", "ü", "<eos>"], meta={"x": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == ["ck.h5"]
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.params["rnn.Wh"], params["rnn.Wh"])
    assert ck.vocab == ["a", "ü", "<eos>"] and ck.meta == {"x": [1, 2]}
    assert set(ck.optimizer_arrays) == {"m.rnn.Wh"} and set(ck.state) == {"rnn.h"}


def test_failed_save_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "ck.h5"
    save_checkpoint(path, params={"w": np.ones(2)}, optimizer_arrays={}, state={}, vocab=["a"], meta={})
    with pytest.raises(TypeError):
        save_checkpoint(path, params={"w": np.ones(2)}, optimizer_arrays={}, state={}, vocab=["a"],
                        meta={"bad": object()})
    assert load_checkpoint(path).params["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["ck.h5"]


@pytest.mark.parametrize("content, message", [
    (None, "no checkpoint file"),
    (b"not hdf5 at all", "not a readable gpurnn checkpoint"),
    ("other-h5", "is not a gpurnn checkpoint"),
    ("future", "checkpoint format 99"),
    ("truncated", "not a readable gpurnn checkpoint"),
])
def test_bad_checkpoints_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "ck.h5"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "other-h5":
        with h5py.File(path, "w") as f:
            f["x"] = 1
    elif content in ("future", "truncated"):
        save_checkpoint(path, params={"w": np.ones(1000)}, optimizer_arrays={}, state={}, vocab=["a"], meta={})
        if content == "future":
            with h5py.File(path, "a") as f:
                f.attrs["format_version"] = 99
        else:
            path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("n, B, T", [(2, 1, 1), (50, 3, 4), (101, 10, 35), (37, 40, 5), (64, 7, 9), (177, 35, 5),
                                     (177, 100, 1)])
def test_eval_batches_score_every_token_exactly_once(n, B, T):
    ids = np.arange(n) % 13 + 100 * np.arange(n)  # each position's value is unique
    scored = []
    for xs, ts, count in eval_batches(ids, B, T):
        assert xs.shape == ts.shape and xs.shape[1] == T
        mask = ts != IGNORE
        assert count == mask.sum()
        # each scored target follows its input in the split
        for x, t in zip(xs[mask], ts[mask]):
            assert list(ids).index(t) == list(ids).index(x) + 1
        scored.extend(ts[mask].tolist())
    assert sorted(scored) == sorted(ids[1:].tolist())


def test_perplexity_of_uniform_model_is_vocab_size(registry, np64):
    model = Model(preset_specs("simple-rnnlm", wordvec_size=3, hidden_size=4), 9, np64, registry)
    for name, value in model.params.items():
        if name.startswith("affine"):
            value[...] = 0  # uniform output
    ids = np.random.default_rng(0).integers(0, 9, 40)
    ppl, tokens = perplexity(model, ids, batch_size=3, time_size=5)
    assert tokens == 39 and ppl == pytest.approx(9.0, rel=1e-9)


def test_perplexity_leaves_training_state_alone(registry, np64):
    model = Model(preset_specs("simple-rnnlm", wordvec_size=3, hidden_size=4), 9, np64, registry)
    model.forward(np.ones((2, 3), np.int32), np.ones((2, 3), np.int32))
    before = model.get_state()["rnn.h"].copy()
    perplexity(model, np.arange(30) % 9)
    np.testing.assert_array_equal(model.get_state()["rnn.h"], before)


def test_sampling_is_reproducible_and_respects_top_k(registry, np64):
    from gpurnn.data import Vocab
    vocab = Vocab(["a", "b", "c", "<eos>", "<unk>"])
    model = Model(preset_specs("simple-rnnlm", wordvec_size=3, hidden_size=4), 5, np64, registry)
    assert prompt_ids(vocab, prompt_tokens("a zzz\nb", "word")) == [0, 4, 3, 1]
    assert prompt_ids(vocab, []) == [3]  # an empty prompt starts as after a sentence end
    ids = [0, 4]
    [first] = sample(model, ids, 30, seed=7)
    assert len(first) == 30 and [first] == sample(model, ids, 30, seed=7)
    assert [first] != sample(model, ids, 30, seed=8)
    assert sample(model, ids, 30, top_k=1, seed=1) == sample(model, ids, 30, top_k=1, seed=2)  # greedy
    [text] = generate_texts(model, vocab, "word", "a b", length=5, seed=3)
    assert text.startswith("a b") and len(text.split()) >= 3
    with pytest.raises(GpurnnError, match="temperature"):
        sample(model, ids, 3, temperature=-1)


def test_greedy_takes_the_likeliest_token_at_every_step(registry, np64):
    """Temperature 0 equals top-k 1, and each token is the argmax of the model's own distribution."""
    model = Model(preset_specs("simple-rnnlm", wordvec_size=3, hidden_size=4), 5, np64, registry)
    [greedy] = sample(model, [0, 4], 12, temperature=0, seed=1)
    assert [greedy] == sample(model, [0, 4], 12, top_k=1, seed=9)
    model.reset_state()
    log_p = model.log_prob(np.array([[0, 4]], np.int32))[0, -1]
    for token in greedy:
        assert token == int(np.argmax(log_p))
        log_p = model.log_prob(np.array([[token]], np.int32))[0, -1]


def test_several_samples_side_by_side_and_stop_at_eos(registry, np64):
    model = Model(preset_specs("simple-rnnlm", wordvec_size=3, hidden_size=4), 5, np64, registry)
    rows = sample(model, [1], 40, seed=2, num_samples=6)
    assert len(rows) == 6 and all(len(r) == 40 for r in rows) and len({tuple(r) for r in rows}) > 1
    assert all(0 <= t < 5 for r in rows for t in r)
    stopped = sample(model, [1], 40, seed=2, num_samples=6, stop_id=3)
    for full, cut in zip(rows, stopped):  # the same draws, each cut after its first <eos> (id 3)
        assert cut == (full[: full.index(3) + 1] if 3 in full else full)
    assert any(3 in r for r in rows)


def test_one_sample_draws_as_numpy_choice_does(registry, np64):
    """One sample equals the plain loop: softmax of log-probabilities / temperature (those of the logits),
    then Generator.choice."""
    model = Model(preset_specs("simple-rnnlm", wordvec_size=3, hidden_size=4), 5, np64, registry)
    [drawn] = sample(model, [0, 4], 25, temperature=0.7, seed=5)
    rng, expected = np.random.default_rng(5), []
    model.reset_state()
    log_p = model.log_prob(np.array([[0, 4]], np.int32))[0, -1]
    for _ in range(25):
        z = log_p / 0.7
        p = np.exp(z - z.max())
        expected.append(int(rng.choice(5, p=p / p.sum())))
        log_p = model.log_prob(np.array([[expected[-1]]], np.int32))[0, -1]
    assert drawn == expected


def test_top_k_never_samples_outside_the_k_likeliest():
    from gpurnn.train.generate import next_tokens
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    drawn = {tuple(next_tokens(logits.copy(), 1.0, 2, np.random.default_rng(s))) for s in range(200)}
    assert {t[0] for t in drawn} == {2, 3} and {t[1] for t in drawn} == {0, 1}


def test_perplexity_sums_the_block_losses_in_float64(registry):
    """600 float32 block losses: summed in float32 they drift by about 1e-6, in float64 not at all."""
    from gpurnn.backend import get_backend
    from gpurnn.model import Model, preset_specs
    model = Model(preset_specs("simple-rnnlm", wordvec_size=4, hidden_size=5), 9, get_backend("numpy"), registry)
    ids = np.random.default_rng(0).integers(0, 9, 3001)
    ppl, tokens = perplexity(model, ids, batch_size=1, time_size=5)
    model.eval().reset_state()
    total = sum(float(model.forward(xs, ts)) * count for xs, ts, count in eval_batches(ids, 1, 5))
    assert tokens == 3000
    assert abs(np.log(ppl) - total / tokens) < 1e-12


@pytest.mark.parametrize("ranks", [2, 3, 7])
def test_ranks_scoring_their_shares_of_the_evaluation_lanes_add_up_to_the_whole(registry, ranks):
    """5 lanes over 2, 3 or 7 ranks (some with none): the ranks' sums give the one-process perplexity."""
    from gpurnn.backend import get_backend
    from gpurnn.model import Model, preset_specs
    from gpurnn.train.parallel import Group
    model = Model(preset_specs("better-rnnlm", wordvec_size=4, hidden_size=4), 9, get_backend("numpy", "float64"),
                  registry)
    ids = np.random.default_rng(1).integers(0, 9, 203)
    whole, tokens = perplexity(model, ids, batch_size=5, time_size=7)
    sums = []

    class Rank(Group):
        """One of `ranks` ranks; its all-reduce keeps what it is given (added up below) and hands back
        the whole split's sums."""

        def __init__(self, rank):
            super().__init__()
            self.rank, self.size = rank, ranks

        def sum(self, values):
            sums.append(values)
            return np.array([np.log(whole) * tokens, tokens])

    shares = [Rank(r).share(5) for r in range(ranks)]  # contiguous, covering the 5 lanes, as even as can be
    assert shares[0][0] == 0 and shares[-1][1] == 5 and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1
    for r in range(ranks):
        assert perplexity(model, ids, batch_size=5, time_size=7, group=Rank(r)) == (pytest.approx(whole), tokens)
    loss_sum, scored = np.sum(sums, axis=0)
    assert scored == tokens == 202
    assert np.exp(loss_sum / scored) == pytest.approx(whole, rel=1e-12)
