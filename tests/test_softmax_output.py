"""The fused output layer `affine_softmax_loss`: the contract, the same numbers as affine +
softmax_loss (values, gradients, training steps with dropout, tying, both dtypes, ignored targets,
log_prob and the per-position log-probabilities that scoring reads),
no N x V array while it trains, checkpoints, and the exports."""

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gpurnn.backend import get_backend
from gpurnn.data.stream import IGNORE
from gpurnn.errors import SpecError
from gpurnn.export.torch_names import torch_tensors
from gpurnn.layers import LayerContext
from gpurnn.model import Model
from gpurnn.ops.output import chunks, default_chunk_rows
from gpurnn.testing import check_layer, check_model_gradients
from gpurnn.train.optim import Adam

from .exportkit import EMBEDDING, gpurnn_model, random_checkpoint, tiny_corpus, unfused_twin
from .faultkit import cli

V = 11
FUSED = "affine_softmax_loss"


def specs(fused, tie=False, dropout=0.3, chunk=5):
    """embedding -> dropout -> LSTM -> dropout -> the output: fused (chunks of `chunk` rows) or the pair."""
    tied = {"tie_to": "embedding"} if tie else {}
    body = [{"type": "embedding", "size": 4, "init": "normal:1"}, {"type": "dropout", "p": dropout},
            {"type": "lstm", "hidden_size": 4}, {"type": "dropout", "p": dropout}]
    if fused:
        return body + [{"type": FUSED, "chunk_rows": chunk, **tied}]
    return body + [{"type": "tied_affine" if tie else "affine", **tied}, {"type": "softmax_loss"}]


def pair(registry, backend, tie, **options):
    """(unfused, fused) models of the same seed: their flat buffers hold the same parameters in one order."""
    unfused, fused = (Model(specs(f, tie, **options), V, backend, registry, seed=3) for f in (False, True))
    np.testing.assert_array_equal(unfused.flat_params, fused.flat_params)
    return unfused, fused


def block(rng, B=3, T=7, ignored=True):
    xs, ts = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    if ignored:
        ts[0, 2], ts[1, :3] = IGNORE, IGNORE
    return xs, ts


@pytest.mark.parametrize("options", [{}, {"chunk_rows": 4}, {"chunk_rows": 1}])
def test_the_layer_passes_the_conformance_kit(registry, options):
    report = check_layer(FUSED, options, registry=registry)
    assert max(report["grad_errors"].values()) < 1e-7 and set(report["grad_errors"]) == {"W", "b", "<input>"}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_training_steps_with_dropout_equal_affine_and_softmax_loss(registry, tie, dtype, tol):
    """Losses, every gradient (dout not 1: a data-parallel share), parameters after Adam steps, and
    log_prob; chunks of 5 rows over 21 (the last one short), targets ignored in some."""
    backend = get_backend("numpy", dtype=dtype)
    models = pair(registry, backend, tie)
    optimizers = [Adam(lr=0.01) for _ in models]
    for optimizer, model in zip(optimizers, models):
        optimizer.prepare(model.flat_params)
    rng = np.random.default_rng(0)
    for step in range(4):
        xs, ts = block(rng)
        results = []
        for optimizer, model in zip(optimizers, models):
            model.set_step(step)
            loss = float(model.forward(xs, ts))
            model.backward(0.5)
            results.append((loss, model.flat_grads.copy()))
            optimizer.update(model.flat_params, model.flat_grads, 0.5)
        (loss_a, grads_a), (loss_b, grads_b) = results
        assert loss_b == pytest.approx(loss_a, rel=tol)
        np.testing.assert_allclose(grads_b, grads_a, rtol=0, atol=tol * np.abs(grads_a).max())
        np.testing.assert_allclose(models[1].flat_params, models[0].flat_params, rtol=tol, atol=tol)
    for model in models:
        model.eval()
    xs, ts = block(rng)
    np.testing.assert_allclose(models[1].log_prob(xs), models[0].log_prob(xs), rtol=0, atol=tol * 10)
    scored = [model.target_log_prob(xs, ts) for model in models]  # for scoring: no B x T x V array
    np.testing.assert_allclose(scored[1], scored[0], rtol=0, atol=tol * 10)
    assert scored[1][0, 2] == 0 and np.all(scored[1][1, :3] == 0) and np.all(scored[1][2] < 0)


@pytest.mark.parametrize("tie", [False, True])
def test_a_backward_after_an_evaluation_forward_gives_the_training_gradients(registry, np64, tie):
    unfused, fused = pair(registry, np64, tie, dropout=0.0)
    xs, ts = block(np.random.default_rng(1))
    for model in (unfused, fused.eval()):
        model.forward(xs, ts)
        model.backward()
    np.testing.assert_allclose(fused.flat_grads, unfused.flat_grads, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_a_whole_model_passes_the_gradient_check(registry, np64, tie):
    model = Model(specs(True, tie, chunk=2), V, np64, registry, seed=0)
    rng = np.random.default_rng(2)
    errors = check_model_gradients(model, [block(rng, 2, 3, ignored=False), block(rng, 2, 3)])
    assert ("affine_softmax_loss.W" in errors) != tie and "embedding.W" in errors
    assert max(errors.values()) < 1e-5


def test_no_array_of_n_by_v_elements_while_it_trains(registry, np64):
    """N = 4096 rows over V = 64 words in chunks of 32: the layer holds nothing near N x V, and the
    peak of what NumPy allocates in a forward and backward stays far below one N x V array."""
    D, N = 4, 4096
    layer = registry.build_layer({"type": FUSED, "chunk_rows": 32},
                                 LayerContext(np64, np.random.default_rng(0), D, 64))
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((N // 16, 16, D)), rng.integers(0, 64, (N // 16, 16))
    tracemalloc.start()
    try:
        layer.forward(x, t)
        layer.backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(a.size for a in layer.work.arrays.values()) == N * D  # dx; the chunk's logits 32 x 64
    assert peak < N * 64 * 8 / 4, f"peak {peak} bytes against {N * 64 * 8} for the logits"


def test_the_chunk_rule_takes_the_fewest_rows_or_half_the_cache_under_a_byte_cap_and_can_be_set(
        registry, np64, monkeypatch):
    import gpurnn.ops.output as output

    monkeypatch.setattr(output, "cache_bytes", lambda xp: 32 << 20)
    assert default_chunk_rows(1000, np.float32, np) == 4192  # 16 MiB / 4,000 bytes = 4,194 rows, in blocks of 32
    assert default_chunk_rows(10000, np.float32, np) == output.MIN_CHUNK_ROWS == 1024  # the cache's 419 are too few
    assert default_chunk_rows(267735, np.float32, np) == 480  # 512 MiB of logits: 501 rows, in blocks of 32
    assert default_chunk_rows(10 ** 7, np.float64, np) == 32  # 6 rows fit in 512 MiB; a block of 32 is the least
    assert chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    layer = registry.build_layer({"type": FUSED, "chunk_rows": 7}, LayerContext(np64, np.random.default_rng(0), 3, V))
    assert layer.chunk_size(100) == 7 and layer.chunk_size(5) == 5
    built = registry.build_layer({"type": FUSED}, LayerContext(get_backend("numpy", dtype="float32"),
                                                               np.random.default_rng(0), 3, 10000))
    assert built.chunk_size(10 ** 6) == 1024 and built.chunk_size(1400) == 700 and built.chunk_size(700) == 700
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(SpecError, match="chunk_rows must be a positive integer"):
            registry.build_layer({"type": FUSED, "chunk_rows": bad}, LayerContext(np64, np.random.default_rng(0), 3, V))


def test_tying_needs_a_table_of_the_right_shape(registry, np64):
    with pytest.raises(SpecError, match="tying needs"):
        Model([{"type": "embedding", "size": 4}, {"type": "lstm", "hidden_size": 5},
               {"type": FUSED, "tie_to": "embedding"}], V, np64, registry)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus, {tie: a checkpoint of the fused model, trained from a TOML model config, its
    parameters then random})."""
    folder = tmp_path_factory.mktemp("fused")
    corpus = tiny_corpus(folder)
    rnn = {"type": "lstm", "hidden_size": 8}
    return corpus, {tie: random_checkpoint(folder, f"fused{int(tie)}", corpus,
                                           [EMBEDDING, rnn, {"type": FUSED, **({"tie_to": "embedding"} if tie else {})}])
                    for tie in (False, True)}


@pytest.mark.parametrize("tie", [False, True])
def test_a_checkpoint_loads_scores_as_the_unfused_model_and_samples(trained, registry, tie):
    corpus, cks = trained
    model = gpurnn_model(cks[tie])
    assert model.specs[-1]["type"] == FUSED and ("affine_softmax_loss.W" in model.params) != tie
    twin = unfused_twin(model, registry)
    xs, ts = block(np.random.default_rng(4), 2, 5)
    assert float(model.forward(xs, ts)) == pytest.approx(float(twin.forward(xs, ts)), rel=1e-5)
    code, out, err = cli("eval", cks[tie], corpus, "--json")
    assert code == 0 and np.isfinite(json.loads(out)["perplexity"]), err
    code, out, err = cli("generate", cks[tie], "--length", 8, "--seed", 2)  # sampling reads log_prob
    assert code == 0 and out.split(), err


@pytest.mark.parametrize("tie", [False, True])
def test_exports_give_the_unfused_models_logits_and_pytorch_names(trained, registry, tmp_path, tie):
    from .test_export_onnx import exported, largest_logit_difference

    corpus, cks = trained
    model = gpurnn_model(cks[tie])
    twin = unfused_twin(model, registry)
    ids = np.random.default_rng(5).integers(0, 17, (2, 9))
    assert largest_logit_difference(twin, exported(cks[tie], tmp_path), [ids[:, :4], ids[:, 4:]]) < 1e-5
    ours, args = torch_tensors(model, registry)
    theirs, twin_args = torch_tensors(twin, registry)
    assert args == twin_args and args["tie_weights"] == tie and list(ours) == list(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_the_output_benchmark_runs_in_quick_mode():
    script = Path(__file__).parents[1] / "scripts" / "bench_output.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "tiny" in done.stdout, done.stderr


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 1e-5)])
def test_sentences_score_as_one_at_a_time_through_the_full_distribution(registry, dtype, rtol):
    """Batched scoring reads target_log_prob (chunks of 7 rows); one sentence at a time reads log_prob."""
    from gpurnn.score import score_sentences

    from .test_score import one_at_a_time, random_sentences, vocab_of

    vocab = vocab_of("word")
    body = [{"type": "embedding", "size": 8}, {"type": "lstm", "hidden_size": 8}]
    model = Model(body + [{"type": FUSED, "tie_to": "embedding", "chunk_rows": 7}], len(vocab),
                  get_backend("numpy", dtype=dtype), registry, seed=3)
    rng = np.random.default_rng(3)
    for value in model.params.values():
        value[...] = rng.normal(0, 0.5, value.shape)
    sentences = random_sentences("word", rng.permutation(np.arange(1, 41)))
    for text, score in zip(sentences, score_sentences(model.eval(), vocab, sentences, "word", batch_size=8)):
        np.testing.assert_allclose(score.log_probs, one_at_a_time(model, vocab, text, "word"), rtol=rtol, atol=0)
