"""Scoring sentences (gpurnn.score and `gpurnn score`): batched, padded scores equal to one sentence at a
time, running text equal to `gpurnn eval`, n-best rescoring, minimal pairs, and bad input as one line."""

import io
import json
import math
from itertools import count, islice

import numpy as np
import pytest

from gpurnn import Model, get_backend, preset_specs
from gpurnn.cli import main
from gpurnn.data import Vocab, open_corpus, prepare_corpus
from gpurnn.score import Scorer, Totals, score_sentences
from gpurnn.score import sentences as score_module
from gpurnn.score.command import Report
from gpurnn.train.checkpoint import save_checkpoint

from .exportkit import unfused_specs

WORDS = "the cat dog sat ran on under a mat tree house".split()
CHARS = list("abcdefgh ") + ["\n"]
OUTPUTS = {"full": {}, "pair": {}, "adaptive": {"output_layer": "adaptive", "cutoffs": [4, 8]}}


def random_model(registry, vocab_size, output="full", dtype="float64", seed=3):
    """An LSTM language model whose every parameter holds N(0, 0.5) draws; its output the preset's fused
    layer (full), affine + softmax_loss (pair) or the adaptive softmax."""
    specs = preset_specs("rnnlm", wordvec_size=8, hidden_size=16, **OUTPUTS[output])
    if output == "pair":
        specs = unfused_specs(specs)
    model = Model(specs, vocab_size, get_backend("numpy", dtype=dtype), registry, seed=seed)
    rng = np.random.default_rng(seed)
    for value in model.params.values():
        value[...] = rng.normal(0, 0.5, value.shape)
    return model.eval()


def vocab_of(level):
    return Vocab(WORDS + ["<unk>", "<eos>"] if level == "word" else CHARS + ["<unk>"])


def random_sentences(level, lengths, seed=0):
    """Sentences of the given lengths in tokens, some tokens outside the vocabulary."""
    rng = np.random.default_rng(seed)
    pool = WORDS + ["zebra"] if level == "word" else list("abcdefgh z")
    return [(" " if level == "word" else "").join(rng.choice(pool, n)) for n in lengths]


def one_at_a_time(model, vocab, text, level):
    """log P of each token and the end token, from one unpadded pass of the full distribution (`log_prob`)."""
    end = "<eos>" if level == "word" else "\n"
    tokens = text.split() if level == "word" else list(text)
    ids = vocab.encode([end, *tokens, end])
    model.reset_state()
    log_p = model.log_prob(ids[None, :-1])[0].astype(np.float64)
    return log_p[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.parametrize("level", ["word", "char"])
@pytest.mark.parametrize("output", ["full", "pair", "adaptive"])
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 1e-5)])
def test_batched_scores_equal_one_sentence_at_a_time(registry, level, output, dtype, rtol):
    """Lengths 1..200 shuffled into one input: buckets of mixed lengths, padded, back in input order."""
    vocab = vocab_of(level)
    model = random_model(registry, len(vocab), output, dtype)
    lengths = np.random.default_rng(1).permutation(np.arange(1, 201))
    sentences = random_sentences(level, lengths)
    scores = score_sentences(model, vocab, sentences, level, batch_size=16)
    assert [s.text for s in scores] == sentences and [s.index for s in scores] == list(range(200))
    for text, length, score in zip(sentences, lengths, scores):
        expected = one_at_a_time(model, vocab, text, level)
        assert len(score.log_probs) == length + 1 == score.words + 1
        np.testing.assert_allclose(score.log_probs, expected, rtol=rtol, atol=0)
        np.testing.assert_allclose(score.log_prob, expected.sum(), rtol=rtol, atol=0)


def test_a_loss_layer_without_target_log_prob_is_read_through_log_prob(registry):
    vocab = vocab_of("word")
    model = random_model(registry, len(vocab), "adaptive")
    sentences = random_sentences("word", [0, 3, 17, 8])
    expected = score_sentences(model, vocab, sentences)
    model.layers[-1].target_log_prob = None  # as a plugin's loss layer that only has log_prob
    for a, b in zip(score_sentences(model, vocab, sentences), expected):
        np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=1e-12)


def test_lowered_rows_and_pieces_score_the_same(registry):
    """A small bound on scores held at once lowers a bucket's rows and cuts long rows into pieces that
    carry the state: the same numbers, and a note saying so."""
    vocab = vocab_of("word")
    model = random_model(registry, len(vocab))
    sentences = random_sentences("word", [3, 150, 40, 7, 90])
    notes = []
    small = score_sentences(model, vocab, sentences, batch_size=8, max_logits=40 * len(vocab), on_note=notes.append)
    whole = score_sentences(model, vocab, sentences, batch_size=8)
    for a, b in zip(small, whole):
        np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=1e-12)
    assert notes and "batch size lowered to 1" in notes[-1]


def test_out_of_memory_halves_the_bucket_rows(registry):
    vocab = vocab_of("word")
    model = random_model(registry, len(vocab))
    sentences = random_sentences("word", [5] * 10)
    expected = score_sentences(model, vocab, sentences, batch_size=8)
    real = model.target_log_prob

    def limited(xs, ts):
        if xs.shape[0] > 2:
            raise MemoryError("allocating 1,000 bytes")
        return real(xs, ts)

    model.target_log_prob = limited
    notes = []
    scores = score_sentences(model, vocab, sentences, batch_size=8, on_note=notes.append)
    assert [s.log_prob for s in scores] == pytest.approx([s.log_prob for s in expected], rel=1e-12)
    assert notes == ["out of memory: batch size lowered to 4 for sentences of up to 8 tokens",
                     "out of memory: batch size lowered to 2 for sentences of up to 8 tokens"]


def test_the_input_streams(registry, monkeypatch):
    """An endless input: the first scores come after one window has been read, not the whole input."""
    monkeypatch.setattr(score_module, "WINDOW", 5)
    vocab = vocab_of("word")
    model = random_model(registry, len(vocab))
    read = []

    def endless():
        for k in count():
            read.append(k)
            yield "the cat sat"

    first = list(islice(Scorer(model, vocab).score(endless()), 3))
    assert len(first) == 3 and len(read) <= 6


def test_no_eos_empty_sentences_and_oov(registry):
    vocab = vocab_of("word")
    model = random_model(registry, len(vocab))
    with_eos, empty, unknown = score_sentences(model, vocab, ["the cat sat", "", "zebra <unk> cat zebra"])
    without, empty_without = score_sentences(model, vocab, ["the cat sat", ""], eos=False)
    assert with_eos.tokens == ["the", "cat", "sat", "<eos>"] and without.tokens == ["the", "cat", "sat"]
    assert without.log_prob == pytest.approx(with_eos.log_prob - with_eos.end_log_prob, rel=1e-12)
    assert without.end_log_prob == with_eos.end_log_prob < 0
    # an empty line is a bare <eos>: P(<eos> | a sentence start); without it nothing is scored
    assert empty.tokens == ["<eos>"] and empty.log_prob == pytest.approx(one_at_a_time(model, vocab, "", "word")[0])
    assert empty_without.tokens == [] and empty_without.log_prob == 0 and math.isnan(empty_without.perplexity)
    assert unknown.oov == 2 and with_eos.oov == 0  # a literal <unk> is in the vocabulary
    totals = Totals()
    for score in (with_eos, empty):
        totals.add(score)
    assert (totals.sentences, totals.words) == (2, 3)
    assert totals.ppl == pytest.approx(math.exp(-(with_eos.log_prob + empty.log_prob) / 5))
    assert totals.ppl1 == pytest.approx(math.exp(-(with_eos.log_prob - with_eos.end_log_prob) / 3))


def test_minus_infinity_is_null_and_flagged_in_json(registry):
    vocab = vocab_of("word")
    model = random_model(registry, len(vocab))
    model.params["affine_softmax_loss.b"][vocab.index["<eos>"]] = -np.inf  # <eos> can never follow
    (score,) = score_sentences(model, vocab, ["the cat"])
    out = io.StringIO()
    Report(out, as_json=True, log_base="10", per_token=True).sentence(score)
    record = json.loads(out.getvalue())
    assert record["logprob"] is None and record["neg_inf"] is True and record["perplexity"] is None
    assert record["per_token"][-1] == {"token": "<eos>", "logprob": None, "bits": None}
    assert record["per_token"][0]["logprob"] == pytest.approx(score.log_probs[0] / math.log(10))


# --- the command -----------------------------------------------------------------------------------------


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_checkpoint(path, model, vocab, level):
    """A stripped checkpoint of `model` (float32 on disk) with vocabulary `vocab`, as import-torch writes one."""
    meta = {"specs": model.specs, "layer_types": model.layer_sources, "vocab_size": len(vocab), "level": level,
            "config": {}, "trainer": {"iteration": 0, "lr": 1.0, "best_valid": None}, "optimizer_scalars": {},
            "stream": {}, "stripped": True}
    params = {name: np.asarray(value, np.float32) for name, value in model.params.items()}
    save_checkpoint(path, params=params, optimizer_arrays={}, state={}, vocab=list(vocab), meta=meta,
                    layouts=model.param_layouts())
    return path


@pytest.fixture
def word_checkpoint(tmp_path, registry):
    vocab = vocab_of("word")
    model = random_model(registry, len(vocab), dtype="float32")
    return write_checkpoint(tmp_path / "ck.h5", model, vocab, "word"), model, vocab


def test_command_text_json_per_token_and_summary(capsys, tmp_path, word_checkpoint):
    ck, model, vocab = word_checkpoint
    text = tmp_path / "in.txt"
    text.write_text("the cat sat\nzebra on a mat\n\n")
    expected = score_sentences(model, vocab, ["the cat sat", "zebra on a mat", ""])
    code, out, err = run(capsys, "score", ck, text, "--per-token")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    fields = lines[1].split("\t")
    assert fields[1:3] == ["5", "1"] and fields[-1] == "zebra on a mat"
    assert float(fields[0]) == pytest.approx(expected[1].log_prob, abs=1e-4)
    assert float(fields[3]) == pytest.approx(expected[1].perplexity, rel=1e-4)
    tokens = [item.rsplit(":", 2) for item in fields[4].split(" ")]
    assert [t[0] for t in tokens] == ["zebra", "on", "a", "mat", "<eos>"]
    assert [float(t[2]) for t in tokens] == pytest.approx(-expected[1].log_probs / math.log(2), abs=1e-3)
    assert "3 sentences, 7 words, 1 OOVs" in err
    code, out, err = run(capsys, "score", ck, text, "--json", "--log-base", "2", "--no-eos")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["tokens"] for r in records[:3]] == [3, 4, 0]
    assert records[0]["logprob"] == pytest.approx((expected[0].log_prob - expected[0].end_log_prob) / math.log(2),
                                                  rel=1e-5)
    summary = records[-1]["summary"]
    assert (summary["sentences"], summary["words"], summary["oov"], summary["log_base"]) == (3, 7, 1, "2")
    totals = Totals()
    for score in expected:
        totals.add(score)
    assert summary["ppl"] == pytest.approx(totals.ppl, rel=1e-5)
    assert summary["ppl1"] == pytest.approx(totals.ppl1, rel=1e-5)


def test_a_progress_bar_on_a_terminal_only(capsys, monkeypatch, tmp_path, word_checkpoint):
    ck, _, _ = word_checkpoint
    (tmp_path / "in.txt").write_text("the cat\n" * 30)
    code, out, err = run(capsys, "score", ck, tmp_path / "in.txt")
    assert code == 0 and "sentences/s" not in err
    monkeypatch.setattr("gpurnn.train.progress.is_terminal", lambda stream: True)
    code, out, err = run(capsys, "score", ck, tmp_path / "in.txt")
    assert code == 0 and len(out.splitlines()) == 30 and "sentences/s" in err
    code, out, err = run(capsys, "score", ck, tmp_path / "in.txt", "--quiet")
    assert code == 0 and "sentences/s" not in err


def test_stdin_and_dash(capsys, monkeypatch, word_checkpoint):
    ck, _, _ = word_checkpoint
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"the cat\r\na dog\n")))
    code, out, err = run(capsys, "score", ck, "-", "--json")
    assert code == 0, err
    assert [json.loads(line).get("sentence") for line in out.splitlines()] == ["the cat", "a dog", None]


@pytest.mark.parametrize("level", ["word", "char"])
def test_carried_context_equals_eval_with_one_lane(capsys, tmp_path, registry, level):
    """--context carry summed over the lines is `gpurnn eval --batch-size 1` of the same text prepared as
    a split that opens with its end token (the running text's start)."""
    lines = random_sentences(level, [4, 9, 1, 12, 6, 0, 3], seed=5)
    (tmp_path / "train.txt").write_text("\n".join(random_sentences(level, [8] * 20, seed=6)) + "\n")
    (tmp_path / "test.txt").write_text("\n" + "\n".join(lines) + "\n")
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    corpus = prepare_corpus(tmp_path / "train.txt", tmp_path / "c.h5", test=tmp_path / "test.txt", level=level)
    with open_corpus(corpus) as data:
        vocab = data.vocab
    model = random_model(registry, len(vocab), dtype="float32")
    ck = write_checkpoint(tmp_path / "ck.h5", model, vocab, level)
    code, out, err = run(capsys, "eval", ck, corpus, "--batch-size", 1, "--json")
    assert code == 0, err
    evaluated = json.loads(out)
    code, out, err = run(capsys, "score", ck, tmp_path / "lines.txt", "--context", "carry", "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    summary = records[-1]["summary"]
    assert summary["words"] + summary["sentences"] == evaluated["tokens"]
    assert summary["logprob"] == pytest.approx(-math.log(evaluated["perplexity"]) * evaluated["tokens"], rel=1e-5)
    assert sum(r["logprob"] for r in records[:-1]) == pytest.approx(summary["logprob"], rel=1e-9)
    independent = score_sentences(model, vocab, lines, level)
    assert records[0]["logprob"] == pytest.approx(independent[0].log_prob, rel=1e-5)  # the first line: no context yet
    assert records[1]["logprob"] != pytest.approx(independent[1].log_prob, rel=1e-5)  # later ones: the lines before


def test_nbest_best_and_all_with_known_answers(capsys, tmp_path, word_checkpoint):
    ck, model, vocab = word_checkpoint
    nbest = tmp_path / "nbest.txt"
    # interleaved IDs; by the given scores and a penalty of -1 per word (no LM) the answers are known
    nbest.write_text("s2\t-1.0\ta cat\n"
                     "s1\t-3.0\tthe cat sat\n"
                     "s2\t-0.5\tthe dog sat on a mat\n"
                     "s1\t-1.0\tthe dog\n"
                     "s3\t0\ta\n")
    code, out, err = run(capsys, "score", ck, nbest, "--nbest", "--lm-weight", 0, "--word-penalty", -1)
    assert code == 0, err
    assert [line.split("\t") for line in out.splitlines()] == [
        ["s2", "-3.0000", "a cat"], ["s1", "-3.0000", "the dog"], ["s3", "-1.0000", "a"]]
    assert "3 n-best lists" in err
    code, out, err = run(capsys, "score", ck, nbest, "--nbest", "--all", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    lp = {s.text: s.log_prob for s in score_sentences(model, vocab, ["a cat", "the cat sat", "the dog sat on a mat",
                                                                     "the dog", "a"])}
    for record in records[:-1]:
        assert record["total"] == pytest.approx(record["score"] + lp[record["sentence"]], rel=1e-5)
    ranked = {}
    for record in records[:-1]:
        ranked.setdefault(record["id"], []).append(record)
    assert list(ranked) == ["s2", "s1", "s3"]
    for hypotheses in ranked.values():
        assert [h["rank"] for h in hypotheses] == list(range(1, len(hypotheses) + 1))
        assert [h["total"] for h in hypotheses] == sorted((h["total"] for h in hypotheses), reverse=True)
    assert records[-1]["summary"]["ids"] == 3 and records[-1]["summary"]["sentences"] == 5
    nbest.write_text("a\tthe cat\na\tthe cat sat\n")  # two columns: no score of its own
    code, out, err = run(capsys, "score", ck, nbest, "--nbest", "--word-penalty", 100)
    assert out.split("\t")[-1] == "the cat sat\n"


def test_pairs_accuracy_counts_positive_differences(capsys, tmp_path, word_checkpoint):
    ck, model, vocab = word_checkpoint
    pairs = [("the cat sat", "sat cat the", "order"), ("a dog", "a dog dog dog", "length"),
             ("the mat", "the tree", "order"), ("on a mat", "on a house", None)]
    (tmp_path / "pairs.txt").write_text("".join("\t".join(p for p in pair if p) + "\n" for pair in pairs))
    code, out, err = run(capsys, "score", ck, tmp_path / "pairs.txt", "--pairs", "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    diffs = [score_sentences(model, vocab, [good])[0].log_prob - score_sentences(model, vocab, [bad])[0].log_prob
             for good, bad, _ in pairs]
    assert [r["diff"] for r in records[:-1]] == pytest.approx(diffs, rel=1e-5)
    summary = records[-1]["summary"]
    assert summary["pairs"] == 4 and summary["correct"] == sum(d > 0 for d in diffs)
    assert summary["accuracy"] == sum(d > 0 for d in diffs) / 4
    order = [d for d, (_, _, group) in zip(diffs, pairs) if group == "order"]
    assert summary["groups"]["order"] == {"pairs": 2, "correct": sum(d > 0 for d in order),
                                          "accuracy": sum(d > 0 for d in order) / 2}
    code, out, err = run(capsys, "score", ck, tmp_path / "pairs.txt", "--pairs")
    assert f"pairs 4: accuracy {sum(d > 0 for d in diffs) / 4:.4f}" in err and "group length:" in err


@pytest.mark.parametrize("content, options, message", [
    (b"the cat\n\xff\xfe dog\n", [], "in.txt, line 2: not UTF-8 text"),
    (b"s1\tthe cat\ns1 the dog\n", ["--nbest"], "in.txt, line 2: an n-best line is ID<TAB>SENTENCE"),
    (b"s1\t-1\tthe cat\ns1\tbest\tthe dog\n", ["--nbest"], "in.txt, line 2: the score 'best' is not a number"),
    (b"the cat\tthe dog\nthe cat\n", ["--pairs"], "in.txt, line 2: a pairs line is GOOD<TAB>BAD"),
    (b"a\tb\tc\td\n", ["--pairs"], "this one has 4 columns"),
    (b"", [], "no sentences in"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(capsys, tmp_path, word_checkpoint, content, options, message):
    ck, _, _ = word_checkpoint
    (tmp_path / "in.txt").write_bytes(content)
    out_file = tmp_path / "scores.txt"
    code, out, err = run(capsys, "score", ck, tmp_path / "in.txt", "--output", out_file, *options)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_file.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_file_and_not_a_checkpoint(capsys, tmp_path, word_checkpoint):
    ck, _, _ = word_checkpoint
    (tmp_path / "in.txt").write_text("the cat\n")
    code, out, err = run(capsys, "score", ck, tmp_path / "in.txt", "-o", tmp_path / "scores.txt")
    assert code == 0 and out == "" and (tmp_path / "scores.txt").read_text().endswith("\tthe cat\n")
    code, out, err = run(capsys, "score", tmp_path / "in.txt", tmp_path / "in.txt")
    assert code == 2 and "not a readable gpurnn checkpoint" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "score", ck, tmp_path / "in.txt", "--pairs", "--nbest")
    assert code == 2 and "give --nbest or --pairs, not both" in err


@pytest.mark.parametrize("output", ["full", "pair", "adaptive"])
def test_the_cupy_backend_scores_as_numpy_does(tmp_path, registry, output):
    """Through the stand-in for CuPy (tests/hostcupy): fixed bucket shapes, the kernels' per-row scores."""
    from .kernels_on_host import compiler
    from .test_host_cupy import with_stand_in

    if compiler() is None:
        pytest.skip("no g++ to build the kernels for the host")
    vocab = vocab_of("word")
    ck = write_checkpoint(tmp_path / "ck.h5", random_model(registry, len(vocab), output, "float32"), vocab, "word")
    lengths = np.random.default_rng(2).integers(0, 40, 150)
    (tmp_path / "in.txt").write_text("\n".join(random_sentences("word", lengths)) + "\n")
    for context in ("sentence", "carry"):
        scores = {}
        for backend in ("numpy", "cupy"):
            done = with_stand_in(["-m", "gpurnn", "--backend", backend, "score", str(ck), "in.txt", "--json",
                                  "--batch-size", "16", "--context", context], tmp_path)
            scores[backend] = [json.loads(line)["logprob"] for line in done.stdout.splitlines()[:-1]]
        assert len(scores["cupy"]) == len(lengths)
        np.testing.assert_allclose(scores["cupy"], scores["numpy"], rtol=1e-5)


def test_char_level_command_escapes_whitespace_tokens(capsys, tmp_path, registry):
    vocab = vocab_of("char")
    model = random_model(registry, len(vocab), dtype="float32")
    ck = write_checkpoint(tmp_path / "ck.h5", model, vocab, "char")
    (tmp_path / "in.txt").write_text("ab c\nz\n")
    code, out, err = run(capsys, "score", ck, tmp_path / "in.txt", "--per-token")
    assert code == 0, err
    first, second = (line.split("\t") for line in out.splitlines())
    assert [item.rsplit(":", 2)[0] for item in first[4].split(" ")] == ["a", "b", "\\s", "c", "\\n"]
    assert first[1:3] == ["5", "0"] and second[1:3] == ["2", "1"] and first[-1] == "ab c"
    (expected,) = score_sentences(model, vocab, ["ab c"], "char")
    assert float(first[0]) == pytest.approx(expected.log_prob, abs=1e-4)
