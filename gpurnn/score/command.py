"""`gpurnn score`: sentences, n-best lists or minimal pairs from files (or stdin) to scores.

The input is read line by line and scored as it streams (`gpurnn.score.Scorer`); the output goes to
stdout, or with --output through the atomic writer, so a bad line or a failure leaves no half file.
"""

import math
import sys
from collections import deque
from contextlib import contextmanager, nullcontext
from itertools import islice

import click

from .. import jsontext
from ..cli import SectionCommand, backend_from, cli, registry_from, runtime_options
from ..errors import DataError, GpurnnError
from .sentences import CONTEXTS, Totals

LOG_BASES = {"e": 1.0, "2": math.log(2), "10": math.log(10)}
ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", " ": "\\s"})


def input_lines(paths, level):
    """Yield (where, line number, text) for every line of the files (stdin for none or "-"), decoded as
    UTF-8 line by line; a line that is not is a DataError naming it. Word level drops a "\\r" line end."""
    for path in paths or ("-",):
        where = "stdin" if path == "-" else str(path)
        try:
            opened = nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb")
        except OSError as exc:
            raise DataError(f"cannot read {where}: {exc.strerror}") from None
        with opened as f:
            for number, raw in enumerate(f, 1):
                try:
                    text = raw.rstrip(b"\n").decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}, line {number}: not UTF-8 text ({exc.reason})") from None
                yield where, number, text.rstrip("\r") if level == "word" else text


def nbest_records(lines):
    """(ID, score, [sentence]) per n-best line ID<TAB>SENTENCE or ID<TAB>SCORE<TAB>SENTENCE."""
    for where, number, text in lines:
        fields = text.split("\t", 2)
        if len(fields) == 1:
            raise DataError(f"{where}, line {number}: an n-best line is ID<TAB>SENTENCE or ID<TAB>SCORE<TAB>SENTENCE; "
                            f"this one has no tab")
        score = 0.0
        if len(fields) == 3:
            try:
                score = float(fields[1])
            except ValueError:
                score = math.nan
            if math.isnan(score):
                raise DataError(f"{where}, line {number}: the score {fields[1]!r} is not a number")
        yield (fields[0], score), [fields[-1]]


def pair_records(lines):
    """(group or None, [good, bad]) per pairs line GOOD<TAB>BAD or GOOD<TAB>BAD<TAB>GROUP."""
    for where, number, text in lines:
        fields = text.split("\t")
        if len(fields) not in (2, 3):
            raise DataError(f"{where}, line {number}: a pairs line is GOOD<TAB>BAD or GOOD<TAB>BAD<TAB>GROUP; "
                            f"this one has {len(fields)} column{'s' if len(fields) > 1 else ''}")
        yield (fields[2] if len(fields) == 3 else None), fields[:2]


def scored_records(scorer, records):
    """(record, [SentenceScore per sentence of it]) for each (record, sentences), streaming in order."""
    pending = deque()

    def texts():
        for record, sentences in records:
            pending.append((record, len(sentences)))
            yield from sentences

    scores = scorer.score(texts())
    for first in scores:
        record, count = pending.popleft()
        yield record, [first, *islice(scores, count - 1)]


class Report:
    """Writes scores in text or JSON lines, log-probabilities in the chosen base, to `out`."""

    def __init__(self, out, as_json, log_base, per_token):
        self.out, self.as_json, self.per_token = out, as_json, per_token
        self.base, self.scale = log_base, LOG_BASES[log_base]

    def log(self, value):
        return value / self.scale

    def write(self, record, fields):
        """One output line: `record` as JSON, or the text `fields` joined by tabs."""
        self.out.write((jsontext.dumps(record, ensure_ascii=False) if self.as_json else "\t".join(fields)) + "\n")

    def sentence(self, score):
        """A scored sentence: log-prob, tokens, OOVs, perplexity, (per-token,) the sentence."""
        lp = self.log(score.log_prob)
        record = {"sentence": score.text, "logprob": lp, "neg_inf": lp == -math.inf, "tokens": len(score.log_probs),
                  "oov": score.oov, "perplexity": score.perplexity}
        fields = [f"{lp:.4f}", str(len(score.log_probs)), str(score.oov), f"{score.perplexity:.4f}"]
        if self.per_token:
            record["per_token"] = [{"token": token, "logprob": self.log(value), "bits": -value / math.log(2)}
                                   for token, value in zip(score.tokens, score.log_probs.tolist())]
            fields.append(" ".join(f"{t['token'].translate(ESCAPES)}:{t['logprob']:.4f}:{t['bits']:.3f}"
                                   for t in record["per_token"]))
        self.write(record, fields + [score.text])

    def summary(self, totals, extra=None, lines=()):
        """The summary: a final JSON record, or lines on stderr."""
        record = {"sentences": totals.sentences, "words": totals.words, "oov": totals.oov,
                  "logprob": self.log(totals.log_prob), "log_base": self.base, "ppl": totals.ppl, "ppl1": totals.ppl1,
                  **(extra or {})}
        if self.as_json:
            self.write({"summary": record}, [])
            return
        click.echo(f"{totals.sentences:,} sentences, {totals.words:,} words, {totals.oov:,} OOVs: logprob "
                   f"{record['logprob']:.4f} (log base {self.base}), ppl {totals.ppl:.4f}, ppl1 {totals.ppl1:.4f}",
                   err=True)
        for line in lines:
            click.echo(line, err=True)


def score_plain(scorer, lines, report):
    totals = Totals()
    for _, (score,) in scored_records(scorer, ((None, [text]) for _, _, text in lines)):
        totals.add(score)
        report.sentence(score)
    return totals, None, ()


def score_nbest(scorer, lines, report, lm_weight, word_penalty, every):
    """Rescore n-best lists: SCORE + lm_weight x logprob + word_penalty x words per hypothesis; the best
    per ID (or every one, ranked), IDs in the order first seen."""
    totals, lists = Totals(), {}
    for (key, score), (scored,) in scored_records(scorer, nbest_records(lines)):
        totals.add(scored)
        lp = report.log(scored.log_prob)
        total = score + lm_weight * lp + word_penalty * scored.words
        hypothesis = (-math.inf if math.isnan(total) else total, -scored.index, total, score, lp, scored)
        kept = lists.setdefault(key, [])
        if every:
            kept.append(hypothesis)
        elif not kept or hypothesis[:2] > kept[0][:2]:
            kept[:] = [hypothesis]
    for key, kept in lists.items():
        for rank, (_, _, total, score, lp, scored) in enumerate(sorted(kept, key=lambda h: h[:2], reverse=True), 1):
            record = {"id": key, "rank": rank, "total": total, "score": score, "logprob": lp, "words": scored.words,
                      "sentence": scored.text}
            fields = ([key, str(rank), f"{total:.4f}", f"{score:g}", f"{lp:.4f}", str(scored.words), scored.text]
                      if every else [key, f"{total:.4f}", scored.text])
            report.write(record, fields)
    return totals, {"ids": len(lists)}, [f"{len(lists):,} n-best lists"]


def score_pairs(scorer, lines, report):
    """Minimal pairs: each pair's log-prob difference (first minus second) and whether it is positive;
    accuracy overall and per group."""
    totals, counts = Totals(), {}
    for group, (good, bad) in scored_records(scorer, pair_records(lines)):
        totals.add(good)
        totals.add(bad)
        good_lp, bad_lp = report.log(good.log_prob), report.log(bad.log_prob)
        diff = good_lp - bad_lp
        right = diff > 0
        for name in (None, group) if group is not None else (None,):
            seen = counts.setdefault(name, [0, 0])
            seen[0] += 1
            seen[1] += right
        report.write({"good": good.text, "bad": bad.text, "group": group, "diff": diff, "good_logprob": good_lp,
                      "bad_logprob": bad_lp, "correct": bool(right)},
                     [f"{diff:.4f}", f"{good_lp:.4f}", f"{bad_lp:.4f}", str(int(right)), group or "", good.text,
                      bad.text])
    accuracy = {name: {"pairs": n, "correct": k, "accuracy": k / n} for name, (n, k) in counts.items()}
    overall = accuracy.pop(None, {"pairs": 0, "correct": 0, "accuracy": math.nan})
    lines = [f"pairs {overall['pairs']:,}: accuracy {overall['accuracy']:.4f} ({overall['correct']:,} of "
             f"{overall['pairs']:,})"]
    lines += [f"group {name}: accuracy {a['accuracy']:.4f} ({a['correct']:,} of {a['pairs']:,})"
              for name, a in accuracy.items()]
    return totals, {**overall, "groups": accuracy}, lines


@contextmanager
def output_file(output):
    """A text stream for the scores: stdout, or a temporary file made OUTPUT once everything is written."""
    if output is None:
        yield sys.stdout
        return
    from ..atomic import atomic_path, os_error_cause

    try:
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
            yield out
    except OSError as exc:
        raise GpurnnError(f"cannot write {output}: {os_error_cause(exc)}") from None


@cli.command(cls=SectionCommand)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("texts", nargs=-1, type=click.Path(allow_dash=True), metavar="[TEXT]...")
@click.option("--output", "-o", type=click.Path(dir_okay=False), show_default="stdout",
              help="Write the scores to this file (atomically: all of them, or no file).")
@click.option("--json", "as_json", is_flag=True, help="Write JSON lines (-inf as null, flagged), the summary last.")
@click.option("--per-token", is_flag=True, help="Add every token's log-probability and surprisal (bits).")
@click.option("--log-base", type=click.Choice(list(LOG_BASES)), default="e",
              help="Base of the printed log-probabilities (SRILM and KenLM print log10).")
@click.option("--no-eos", is_flag=True, help="Leave each sentence's closing <eos> out of its score.")
@click.option("--context", type=click.Choice(CONTEXTS), default="sentence",
              help="sentence: each line from a fresh sentence start; carry: the lines as one running text.")
@click.option("--nbest", is_flag=True,
              help="Rescore n-best lists: lines ID<TAB>SENTENCE or ID<TAB>SCORE<TAB>SENTENCE; the best per ID.")
@click.option("--lm-weight", default=1.0, type=float, help="--nbest: weight of the log-probability.")
@click.option("--word-penalty", default=0.0, type=float, help="--nbest: added per word.")
@click.option("--all", "every", is_flag=True, help="--nbest: every hypothesis, ranked, with its scores.")
@click.option("--pairs", is_flag=True, help="Minimal pairs: lines GOOD<TAB>BAD[<TAB>GROUP]; differences and accuracy.")
@click.option("--batch-size", default=64, type=click.IntRange(1), help="Sentences per forward pass.")
@click.option("--quiet", is_flag=True, help="No progress bar (there is one on a terminal only).")
@runtime_options
@click.pass_context
def score(ctx, checkpoint, texts, output, as_json, per_token, log_base, no_eos, context, nbest, lm_weight,
          word_penalty, every, pairs, batch_size, quiet):
    """Log-probability of each line of TEXT (files; stdin for none or -) under CHECKPOINT's model.

    Each line is one sentence, tokenized as `prepare` tokenized the model's corpus and scored from a
    sentence start over its tokens and the closing <eos>. Output, one line per sentence in input order:
    log-prob, scored tokens, OOVs (scored as <unk>), perplexity, the sentence; a summary (sentences,
    words, OOVs, log-prob, ppl with and ppl1 without <eos>) goes to stderr. Scoring runs on one process
    (not under mpiexec).
    """
    from ..atomic import check_not_inputs, check_output_path
    from ..data import Vocab
    from ..train.checkpoint import load_checkpoint
    from ..train.job import model_from_checkpoint
    from ..train.parallel import world
    from ..train.progress import is_terminal
    from .sentences import Scorer

    if nbest and pairs:
        raise click.UsageError("give --nbest or --pairs, not both", ctx)
    if every and not nbest:
        raise click.UsageError("--all applies to --nbest only", ctx)
    if (nbest or pairs) and (per_token or context == "carry"):
        raise click.UsageError("--per-token and --context carry apply to plain sentences, not to --nbest or --pairs",
                               ctx)
    if world().size > 1:
        raise GpurnnError("gpurnn score runs on one process: start it without mpiexec")
    if output is not None:
        check_not_inputs([("scores", output)], [("checkpoint", checkpoint)] + [("text", t) for t in texts if t != "-"])
        check_output_path(output, "the scores")
    saved = load_checkpoint(checkpoint)
    level = saved.meta.get("level", "word")
    model = model_from_checkpoint(saved, backend_from(ctx), registry_from(ctx))
    bar = None
    if is_terminal(sys.stderr) and not quiet:
        from tqdm import tqdm

        bar = tqdm(unit=" sentences", file=sys.stderr, dynamic_ncols=True, mininterval=0.2, leave=False)
    scorer = Scorer(model, Vocab(saved.vocab), level, batch_size, eos=not no_eos, context=context,
                    on_note=lambda text: click.echo(f"note: {text}", err=True),
                    progress=None if bar is None else bar.update)
    lines = input_lines(texts, level)
    try:
        with output_file(output) as out:
            report = Report(out, as_json, log_base, per_token)
            if nbest:
                totals, extra, summary = score_nbest(scorer, lines, report, lm_weight, word_penalty, every)
            elif pairs:
                totals, extra, summary = score_pairs(scorer, lines, report)
            else:
                totals, extra, summary = score_plain(scorer, lines, report)
            if not totals.sentences:
                raise DataError(f"no sentences in {', '.join(texts) if texts else 'stdin'}")
            if bar is not None:
                bar.close()
            report.summary(totals, extra, summary)
    finally:
        if bar is not None:
            bar.close()
