"""The adaptive softmax output layer: exact probabilities, its gradients, ignored targets, its options,
the vocabulary order it needs, checkpoints and the CLI, and PyTorch's nn.AdaptiveLogSoftmaxWithLoss."""

import json
from importlib import resources

import h5py
import numpy as np
import pytest

from gpurnn.backend import get_backend
from gpurnn.data import open_corpus, prepare_corpus
from gpurnn.data.stream import IGNORE, eval_batches
from gpurnn.errors import DataError, SpecError
from gpurnn.layers import LayerContext
from gpurnn.model import Model, preset_specs
from gpurnn.testing import check_layer, check_model_gradients
from gpurnn.train.evaluate import lanes_for, perplexity

from .exportkit import unfused_specs, unfused_twin
from .test_train import in_tmp_path, run  # noqa: F401  (a fixture)

V, CUTOFFS = 40, [6, 16, 30]  # a head of 6 words and 3 clusters of 10, 14 and 10


def adaptive_model(registry, backend, dropout=None, seed=0, **output):
    specs = preset_specs("rnnlm", wordvec_size=5, hidden_size=8, dropout=dropout, output_layer="adaptive",
                         cutoffs=output.pop("cutoffs", CUTOFFS), div_value=output.pop("div_value", 2.0))
    if output:
        specs[-1].update(output)
    return Model(specs, V, backend, registry, seed=seed)


def every_cluster(rng, shape):
    """Target ids (shape) with words from the head and from every cluster."""
    ids = rng.integers(0, V, shape)
    ids.flat[:4] = [0, CUTOFFS[0], CUTOFFS[1] + 1, V - 1]
    return ids


def test_the_distribution_sums_to_one_at_every_position(registry, np64, rng):
    model = adaptive_model(registry, np64, head_bias=True)
    log_p = model.log_prob(rng.integers(0, V, (3, 7)))
    assert log_p.shape == (3, 7, V)
    np.testing.assert_allclose(np.exp(log_p).sum(axis=-1), 1.0, rtol=0, atol=1e-10)


def test_evaluation_perplexity_is_the_full_distributions(registry, np64, rng):
    """Evaluation scores each target from the head and its cluster alone; the same number comes from
    the whole normalised distribution of `log_prob`, block by block with the state carried."""
    model = adaptive_model(registry, np64)
    ids = every_cluster(rng, 203)
    ppl, tokens = perplexity(model, ids, batch_size=3, time_size=6)
    model.reset_state()
    nll = []
    for xs, ts, _ in eval_batches(ids, 3, 6):
        log_p = model.log_prob(xs)
        scored = ts != IGNORE
        nll.append(-log_p[scored, ts[scored]])
    nll = np.concatenate(nll)
    assert tokens == len(nll) == len(ids) - 1
    assert ppl == pytest.approx(np.exp(nll.mean()), rel=1e-9)


def test_the_layer_passes_the_kit_with_every_cluster_scored(registry):
    for options in ({"cutoffs": [3, 8, 12], "div_value": 2.0}, {"cutoffs": [5], "head_bias": True}):
        report = check_layer("adaptive_softmax_loss", options, registry=registry, vocab_size=20, input_size=8,
                             batch=4, time=5)
        assert max(report["grad_errors"].values()) < 1e-6
        assert set(report["grad_errors"]) >= {"head", "proj0", "out0", "<input>"}


def test_a_whole_model_with_dropout_passes_the_gradient_check(registry, np64, rng):
    model = adaptive_model(registry, np64, dropout=0.3)
    blocks = [(rng.integers(0, V, (2, 4)), every_cluster(rng, (2, 4))) for _ in range(2)]
    errors = check_model_gradients(model, blocks)
    assert {"adaptive_softmax_loss.head", "adaptive_softmax_loss.out2", "lstm.Wh", "embedding.W"} <= set(errors)
    assert max(errors.values()) < 1e-5


def layer_with(registry, backend, **options):
    ctx = LayerContext(backend, np.random.default_rng(0), 8, V)
    return registry.build_layer({"type": "adaptive_softmax_loss", "cutoffs": CUTOFFS, "div_value": 2.0, **options},
                                ctx)


def test_ignored_targets_score_nothing_and_get_no_gradient(registry, np64, rng):
    layer = layer_with(registry, np64)
    h = rng.standard_normal((3, 5, 8))
    t = every_cluster(rng, (3, 5))
    t[0, 1] = t[2, 4] = t[1, 0] = IGNORE
    loss = float(layer.forward(h, t))
    dh = layer.backward(2.0)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    scored = t != IGNORE
    assert loss == pytest.approx(float(layer.forward(h[scored][None], t[scored][None])), rel=1e-12)
    np.testing.assert_array_equal(dh[~scored], 0)
    layer.backward(2.0)
    for k, g in layer.grads.items():  # the scored rows alone give the same gradients
        np.testing.assert_allclose(grads[k], g, rtol=1e-10, atol=1e-14)
    log_p = layer.log_prob(h)
    assert loss == pytest.approx(-log_p[scored, t[scored]].mean(), rel=1e-12)
    nothing = np.full((3, 5), IGNORE)
    assert float(layer.forward(h, nothing)) == 0.0
    np.testing.assert_array_equal(layer.backward(), 0)
    assert all(not g.any() for g in layer.grads.values())


@pytest.mark.parametrize("cutoffs", [[], [0, 10], [10, 10], [20, 10], [10, 40], [10.0], "10,20", [True], None])
def test_cutoffs_must_be_increasing_positive_integers_below_the_vocabulary(registry, np64, cutoffs):
    with pytest.raises(SpecError, match="cutoffs must be increasing positive integers below the vocabulary "
                                        f"size {V}"):
        layer_with(registry, np64, cutoffs=cutoffs)


@pytest.mark.parametrize("options, message", [
    ({"div_value": 0}, "div_value must be a number > 0"),
    ({"div_value": "4"}, "div_value must be a number > 0"),
    ({"div_value": 3.0}, r"div_value 3 leaves cluster 1 a projection of size 0 \(8 // 3\*\*2\)"),
    ({"head_bias": 1}, "head_bias must be true or false"),
])
def test_other_options_are_checked(registry, np64, options, message):
    with pytest.raises(SpecError, match=message):
        layer_with(registry, np64, **options)


def test_a_missing_cutoffs_option_is_a_spec_error(registry, np64):
    ctx = LayerContext(np64, np.random.default_rng(0), 8, V)
    with pytest.raises(SpecError, match="missing a required argument: 'cutoffs'"):
        registry.build_layer({"type": "adaptive_softmax_loss"}, ctx)


@pytest.mark.parametrize("options, message", [
    ({"tie_weights": True}, "tied weights are not supported with the adaptive output layer"),
    ({"cutoffs": None}, "the adaptive output layer needs cutoffs"),
])
def test_the_preset_refuses_what_the_adaptive_output_cannot_do(options, message):
    with pytest.raises(SpecError, match=message):
        preset_specs("rnnlm", **{"output_layer": "adaptive", "cutoffs": [10], **options})
    with pytest.raises(SpecError, match="apply only to the adaptive output layer"):
        preset_specs("rnnlm", cutoffs=[10])


def test_evaluation_blocks_are_sized_by_what_the_layer_holds(registry, np64, monkeypatch):
    model = adaptive_model(registry, np64)
    per_row = model.logits_per_row
    assert per_row == CUTOFFS[0] + 3 + 14  # the head and the largest cluster (rows gathered on NumPy)
    monkeypatch.setattr("gpurnn.train.evaluate.MAX_BLOCK_LOGITS", 5 * 4 * per_row)
    assert lanes_for(model, 10_000, 20, 4) == 5


@pytest.mark.parametrize("fused", [False, True])
def test_log_prob_of_a_full_softmax_model_is_the_normalised_logits(registry, np64, rng, fused):
    """softmax_loss's log_prob (of the affine's logits), and the preset's fused layer's."""
    specs = preset_specs("rnnlm", wordvec_size=4, hidden_size=5)
    model = Model(specs if fused else unfused_specs(specs), V, np64, registry)
    xs = rng.integers(0, V, (2, 3))
    logits = unfused_twin(model, registry).predict(xs)
    model.reset_state()
    expected = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(model.log_prob(xs), expected, rtol=1e-12)


def demo_corpus_file(folder):
    """The embedded demo text prepared as a corpus file: the vocabulary `gpurnn train` uses without one."""
    text = folder / "demo.txt"
    text.write_text(resources.files("gpurnn.data").joinpath("ptb_first_1000_words.txt").read_text())
    return prepare_corpus(text, folder / "demo.h5")


def test_cli_trains_the_demo_with_the_adaptive_output_then_evals_and_generates(capsys, tmp_path):
    args = ["--backend", "numpy", "train", "--quiet", "--model", "rnnlm", "--output-layer", "adaptive",
            "--cutoffs", "50,150", "--wordvec-size", "16", "--hidden-size", "16", "--max-iters", "40",
            "--lr", "1", "--checkpoint", "ad.h5"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    from gpurnn.train.checkpoint import load_checkpoint
    saved = load_checkpoint(tmp_path / "ad.h5")
    assert saved.meta["specs"][-1] == {"type": "adaptive_softmax_loss", "cutoffs": [50, 150]}
    assert saved.meta["layer_types"]["adaptive_softmax_loss"]["plugin"] == "gpurnn_plugins.adaptive_softmax"
    corpus = demo_corpus_file(tmp_path)
    code, out, err = run(capsys, "--backend", "numpy", "eval", "ad.h5", str(corpus), "--split", "train", "--json")
    assert code == 0, err
    ppl = json.loads(out)["perplexity"]
    assert 1 < ppl < 418  # better than uniform after 40 iterations
    code, out, err = run(capsys, "--backend", "numpy", "generate", "ad.h5", "--length", "12", "--seed", "2")
    assert code == 0 and len(out.split()) >= 6, err


def test_cli_refuses_tied_weights_with_the_adaptive_output_in_one_line(capsys):
    code, _, err = run(capsys, "--backend", "numpy", "train", "--model", "better-rnnlm", "--output-layer", "adaptive",
                       "--cutoffs", "50,150", "--max-iters", "1")
    assert code == 2 and err.count("\n") == 1 and "use --no-tie-weights" in err
    code, _, err = run(capsys, "--backend", "numpy", "train", "--output-layer", "adaptive", "--cutoffs", "50,x")
    assert code == 2 and "'50,x' is not a list of integers" in err


def test_a_checkpoint_round_trip_scores_the_same_perplexity(registry, tmp_path):
    from gpurnn.train.checkpoint import load_checkpoint
    from gpurnn.train.job import model_from_checkpoint, prepare_job

    corpus = demo_corpus_file(tmp_path)
    specs = preset_specs("rnnlm", wordvec_size=8, hidden_size=8, output_layer="adaptive", cutoffs=[50, 150],
                         div_value=2.0)
    specs[-1]["head_bias"] = True
    trainer, data = prepare_job(str(corpus), specs=specs, options={"max_iters": 15, "batch_size": 4, "time_size": 5},
                                explicit=set(), backend=get_backend("numpy"), registry=registry,
                                checkpoint=str(tmp_path / "ck.h5"))
    trainer.run()
    ids = data.split("train")[:600]
    before = perplexity(trainer.model, ids, 4, 5)
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "ck.h5"), get_backend("numpy"), registry)
    assert perplexity(loaded, ids, 4, 5) == before
    assert loaded.params.keys() == trainer.model.params.keys()
    with h5py.File(tmp_path / "ck.h5") as f:
        assert f["params/adaptive_softmax_loss.out1"].attrs["axes"] == "projection, cluster words"


def test_a_vocabulary_out_of_frequency_order_is_refused_for_the_adaptive_output(capsys, small_corpus):
    adaptive = ["--backend", "numpy", "train", str(small_corpus), "--quiet", "--model", "rnnlm", "--output-layer",
                "adaptive", "--cutoffs", "20,60", "--max-iters", "2", "--batch-size", "2", "--time-size", "3"]
    assert run(capsys, *adaptive, "--checkpoint", "ok.h5")[0] == 0
    with h5py.File(small_corpus, "r+") as f:  # id 30 made more frequent than the words before it
        counts = f["vocab_counts"][:]
        counts[30] = counts[5] + 1
        f["vocab_counts"][...] = counts
    code, _, err = run(capsys, *adaptive, "--checkpoint", "refused.h5")
    assert code == 2 and err.count("\n") == 1
    assert "layer 'adaptive_softmax_loss' needs a vocabulary sorted most frequent first" in err
    full = ["--backend", "numpy", "train", str(small_corpus), "--quiet", "--max-iters", "2", "--batch-size", "2",
            "--checkpoint", "f.h5"]
    assert run(capsys, *full)[0] == 0  # the full softmax does not care


def test_special_tokens_may_sit_out_of_order(tmp_path):
    """A capped vocabulary sends the dropped words to <unk>, whose count then exceeds its neighbours':
    `prepare` places special tokens by rule, and the check leaves them aside."""
    text = tmp_path / "t.txt"
    text.write_text("a a a a b b b c c d e f g <unk>\n" * 3)
    corpus = open_corpus(prepare_corpus(text, tmp_path / "c.h5", vocab_size=5))
    unk = corpus.vocab.index["<unk>"]
    assert corpus.counts[unk] > corpus.counts[unk - 1]
    corpus.require_frequency_order("this test")
    corpus.counts[[0, 1]] = corpus.counts[[1, 0]]
    with pytest.raises(DataError, match="this test needs a vocabulary sorted most frequent first"):
        corpus.require_frequency_order("this test")


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_the_same_numbers_as_pytorchs_adaptive_log_softmax(registry, rng, dtype, tol):
    torch = pytest.importorskip("torch", reason="torch is not installed: nothing to compare with")
    backend = get_backend("numpy", dtype=dtype)
    layer = layer_with(registry, backend, div_value=2.0, head_bias=True)
    peer = torch.nn.AdaptiveLogSoftmaxWithLoss(8, V, CUTOFFS, div_value=2.0, head_bias=True).to(getattr(torch, dtype))
    with torch.no_grad():  # PyTorch's Linear keeps (out, in): ours transposed
        peer.head.weight.copy_(torch.from_numpy(layer.params["head"].T.copy()))
        peer.head.bias.copy_(torch.from_numpy(layer.params["head_bias"].copy()))
        for k, (proj, out) in enumerate(peer.tail):
            proj.weight.copy_(torch.from_numpy(layer.params[f"proj{k}"].T.copy()))
            out.weight.copy_(torch.from_numpy(layer.params[f"out{k}"].T.copy()))
    h = rng.standard_normal((4, 6, 8)).astype(dtype)
    t = every_cluster(rng, (4, 6))
    h_t = torch.from_numpy(h.reshape(-1, 8)).requires_grad_()
    result = peer(h_t, torch.from_numpy(t.reshape(-1)))
    result.loss.backward()
    np.testing.assert_allclose(layer.log_prob(h).reshape(-1, V), peer.log_prob(h_t).detach().numpy(),
                               rtol=tol, atol=tol)
    assert float(layer.forward(h, t)) == pytest.approx(result.loss.item(), rel=tol)
    dh = layer.backward()
    np.testing.assert_allclose(dh.reshape(-1, 8), h_t.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.grads["head"], peer.head.weight.grad.numpy().T, rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.grads["out2"], peer.tail[2][1].weight.grad.numpy().T, rtol=tol, atol=tol)
