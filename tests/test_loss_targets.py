"""No command gives the softmax loss a target outside the vocabulary.

Targets come from a corpus split, refused when the corpus is opened if it holds an id outside its
vocabulary (`gpurnn.data.corpus.check_ids`, tested in tests/test_faults_values.py); from the embedded
demo, encoded by its own vocabulary; from evaluation's padding, IGNORE, the loss's ignore index; and a
checkpoint is evaluated only on a corpus with its own vocabulary (`check_vocab`). The scores per
position must be one per token: the loss layer refuses another width (a model config whose affine
has another output_size). The kernels guard anyway, for code that calls the ops directly: a target
outside [0, V) gives a NaN loss, never a read outside the row (tests/test_kernels_on_host.py).
"""

from pathlib import Path

import pytest

import gpurnn.ops.output as fused_output
import gpurnn_plugins.softmax_loss as softmax_loss

from .faultkit import assert_one_line_error
from .test_train import in_tmp_path, run  # noqa: F401  (a fixture)

NUMPY = ["--backend", "numpy"]


@pytest.fixture
def targets_seen(monkeypatch):
    """Every call of the loss checks its targets (softmax_loss's, and the fused output layer's, the
    presets', once per chunk of rows); the list holds (targets, ignored) per call."""
    seen = []
    original = softmax_loss.softmax_cross_entropy

    def checked(x2, t, ignore, buffer):
        inside = (t >= 0) & (t < x2.shape[1])
        assert ((t == ignore) | inside).all(), f"targets outside [0, {x2.shape[1]}): {t[~inside & (t != ignore)]}"
        seen.append((t.size, int((t == ignore).sum())))
        return original(x2, t, ignore, buffer)

    monkeypatch.setattr(softmax_loss, "softmax_cross_entropy", checked)
    monkeypatch.setattr(fused_output, "softmax_cross_entropy", checked)
    return seen


def test_training_evaluation_and_the_demo_give_the_loss_only_vocabulary_targets(capsys, small_corpus,
                                                                                targets_seen):
    code, _, err = run(capsys, *NUMPY, "train", str(small_corpus), "--quiet", "--max-iters", "6", "--eval-every",
                       "3", "--batch-size", "4", "--time-size", "5", "--checkpoint", "ck.h5")
    assert code == 0, err
    code, _, err = run(capsys, *NUMPY, "eval", "ck.h5", str(small_corpus), "--split", "test", "--batch-size", "3")
    assert code == 0, err
    code, _, err = run(capsys, *NUMPY, "train", "--quiet", "--max-iters", "2", "--checkpoint", "demo.h5")
    assert code == 0, err
    assert len(targets_seen) > 10 and any(ignored for _, ignored in targets_seen)  # evaluation pads


def test_a_model_whose_scores_are_not_one_per_token_is_refused(capsys):
    Path("m.toml").write_text('[[layers]]\ntype = "embedding"\nsize = 8\n[[layers]]\ntype = "rnn"\nhidden_size = 8\n'
                              '[[layers]]\ntype = "affine"\noutput_size = 5\n[[layers]]\ntype = "softmax_loss"\n')
    code, _, err = run(capsys, *NUMPY, "train", "--quiet", "--model-config", "m.toml", "--max-iters", "2")
    assert_one_line_error(code, err, "softmax_loss: its input has 5 scores per position, not one for each of the 418")
