"""The `gpurnn` command line: thin click commands that parse, call the library, and report.

Every problem a user can fix ends the program with one line on stderr and exit code 2 (no traceback;
`--debug` or GPURNN_DEBUG=1 shows one).
"""

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from .backend import get_backend
from .errors import GpurnnError
from .registry import Registry
from .train.parallel import on_every_rank


def debug_requested():
    return "--debug" in sys.argv[1:] or os.environ.get("GPURNN_DEBUG") == "1"


def package_version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def emit_json(obj):
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), default=None,
              help="Array backend [default: $GPURNN_BACKEND or auto: CuPy when a CUDA device is usable].")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
              help="Load a layer plugin: a module name or a .py path (repeatable; also $GPURNN_PLUGINS).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="gpurnn")
@click.pass_context
def cli(ctx, backend, plugins, debug):
    """gpurnn: readable recurrent language models on NumPy (CPU) and CuPy (GPU)."""
    ctx.obj = {"backend": backend, "plugins": plugins}


def registry_from(ctx):
    return Registry(plugins=ctx.obj["plugins"])


def backend_from(ctx):
    return get_backend(ctx.obj["backend"])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def info(ctx, as_json):
    """Versions, the chosen backend and why, and the device."""
    backend = backend_from(ctx)
    report = {"gpurnn": package_version("gpurnn"), "python": sys.version.split()[0],
              **{pkg: package_version(pkg) for pkg in ("click", "pluggy", "h5py")},
              **backend.describe()}
    if as_json:
        emit_json(report)
        return
    for key, value in report.items():
        click.echo(f"{key:>20}: {value}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plugins(ctx, as_json):
    """Every layer type, the plugin that provides it, and what it does (--json: and its distribution)."""
    rows = [{"type": t.name, "plugin": t.plugin, "description": t.description,
             "distribution": t.distribution, "version": t.version}
            for t in registry_from(ctx).layer_types.values()]
    if as_json:
        emit_json(rows)
        return
    width = max((len(r["type"]) for r in rows), default=4)
    pwidth = max((len(r["plugin"]) for r in rows), default=6)
    for r in rows:
        click.echo(f"{r['type']:<{width}}  {r['plugin']:<{pwidth}}  {r['description']}")


@cli.command()
@click.argument("train", type=click.Path())
@click.option("--valid", type=click.Path(), help="Validation text file.")
@click.option("--test", type=click.Path(), help="Test text file.")
@click.option("--output", "-o", type=click.Path(), required=True, help="The corpus file to write (.h5).")
@click.option("--level", type=click.Choice(["word", "char"]), default="word", show_default=True,
              help="word: whitespace-separated, <eos> at line ends; char: every character.")
@click.option("--vocab-size", type=int, help="Keep at most this many tokens (the most frequent).")
@click.option("--min-count", type=int, default=1, show_default=True,
              help="Leave out words seen fewer times in TRAIN.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def prepare(train, valid, test, output, level, vocab_size, min_count, as_json):
    """Tokenize text files into an HDF5 corpus file (vocabulary from TRAIN; unknown words -> <unk>)."""
    from .data import open_corpus, prepare_corpus

    prepare_corpus(train, output, valid=valid, test=test, level=level, vocab_size=vocab_size,
                   min_count=min_count)
    with open_corpus(output) as corpus:
        report_corpus(corpus.describe(), as_json)


@cli.command("corpus-info")
@click.argument("corpus", type=click.Path())
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the most frequent tokens to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def corpus_info(corpus, top, as_json):
    """Level, vocabulary size, tokens per split, the most frequent tokens and the sources' SHA-256."""
    from .data import open_corpus

    with open_corpus(corpus) as opened:
        report_corpus(opened.describe(top=top), as_json)


def report_corpus(report, as_json):
    if as_json:
        emit_json(report)
        return
    click.echo(f"{report['path']}: {report['level']}-level corpus (format {report['format_version']})")
    click.echo(f"  vocabulary: {report['vocab_size']} tokens; special: {' '.join(report['special_tokens'])}")
    for name, count in report["tokens"].items():
        source = report["sources"].get(name, {})
        click.echo(f"  {name:>5}: {count:>12,} tokens  from {source.get('file')} "
                   f"(sha256 {source.get('sha256')})")
    frequent = ", ".join(f"{token!r} {count:,}" for token, count in report["most_frequent"])
    click.echo(f"  most frequent: {frequent}")
MODEL_OPTIONS = ("model", "model_config", "wordvec_size", "hidden_size")
TRAIN_FLAGS = ("batch_size", "time_size", "optimizer", "lr", "clip", "lr_decay", "epochs", "max_iters",
               "seed", "eval_every", "save_every", "log_every", "cuda_graph")


def explicit_options(ctx, names):
    """The option names the user gave on the command line (not defaults)."""
    return {n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE}


@cli.command()
@click.argument("corpus", required=False, type=click.Path(dir_okay=False))
@click.option("--model", default="simple-rnnlm", show_default=True, help="Model preset.")
@click.option("--model-config", type=click.Path(dir_okay=False), help="TOML file with [[layers]] specs (overrides --model).")
@click.option("--wordvec-size", type=click.IntRange(1), help="Embedding size D of the preset.")
@click.option("--hidden-size", type=click.IntRange(1), help="Hidden size H of the preset.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), help="Optimizer [default: sgd].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate [default: 0.1].")
@click.option("--clip", type=click.FloatRange(min=0, min_open=True), help="Clip the global gradient norm to this.")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), help="Multiply lr by this when validation perplexity stops improving.")
@click.option("--batch-size", type=click.IntRange(1), help="Lanes B [default: 20; demo 10].")
@click.option("--time-size", type=click.IntRange(1), help="Truncated-BPTT block length T [default: 35; demo 5].")
@click.option("--epochs", type=click.IntRange(1), help="Epochs [default: 1; demo 100].")
@click.option("--max-iters", type=click.IntRange(1), help="Stop after this many iterations (overrides --epochs).")
@click.option("--seed", type=int, help="Random seed [default: 0].")
@click.option("--eval-every", type=click.IntRange(1), help="Validation perplexity every N iterations (and at the end).")
@click.option("--log-every", type=click.IntRange(1), help="Log every N iterations [default: an epoch, at most 100].")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file (HDF5), written at the end and every --save-every.")
@click.option("--save-every", type=click.IntRange(1), help="Save the checkpoint every N iterations.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint exactly where it stopped.")
@click.option("--metrics", type=click.Path(dir_okay=False), help="Append one JSON record per logged step to this file.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write train/valid perplexity curves to this PNG (needs gpurnn[plot]).")
@click.option("--quiet", is_flag=True, help="Print only the final summary.")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="CuPy: capture the training step once as a CUDA graph and replay it [default: on].")
@click.pass_context
@on_every_rank
def train(ctx, corpus, model, model_config, wordvec_size, hidden_size, checkpoint, resume, metrics, plot, quiet,
          **train_options):
    """Train a language model on CORPUS.h5 (default: the embedded 1,000-word demo).

    Under `mpiexec -n R` the R processes train one model together, each on B / R lanes of the batch.
    """
    from .progress import TrainingProgress
    from .train.job import model_specs, prepare_job
    from .train.metrics import MetricsLog, plot_perplexity, require_matplotlib
    from .train.trainer import Interrupted

    if plot:
        require_matplotlib()
    explicit = explicit_options(ctx, TRAIN_FLAGS)
    if explicit_options(ctx, MODEL_OPTIONS):
        explicit.add("specs")
    specs = model_specs(model, model_config, wordvec_size, hidden_size)
    log = MetricsLog(metrics)
    trainer, _ = prepare_job(corpus, specs=specs, options=train_options, explicit=explicit,
                             backend=backend_from(ctx), registry=registry_from(ctx),
                             checkpoint=checkpoint, resume=resume)
    progress = TrainingProgress(trainer.total_iters, quiet=quiet, first=trainer.iteration)
    trainer.on_step = progress.on_step
    trainer.on_notice = lambda message: click.echo(message, err=True)
    trainer.on_log = lambda record: (log(record), progress.on_log(record))
    if not quiet:
        cfg = trainer.config
        click.echo(f"training {' -> '.join(s['type'] for s in trainer.model.specs)} on "
                   f"{corpus or 'the embedded demo corpus'} ({trainer.model.backend.name}): "
                   f"B={cfg.batch_size} T={cfg.time_size} {cfg.optimizer} lr={trainer.optimizer.lr:g} "
                   f"iterations {trainer.iteration}..{trainer.total_iters}", err=True)
    try:
        trainer.run()
    except Interrupted as exc:
        progress.close()
        click.echo(f"{exc}; checkpoint saved to {checkpoint}" if checkpoint else str(exc), err=True)
        ctx.exit(130)
    finally:
        history = log.history() if plot else []
        if history:
            plot_perplexity(history, plot)
    progress.close()
    last = log.records[-1] if log.records else {}
    summary = {k: last[k] for k in ("iteration", "epoch", "train_perplexity", "valid_perplexity") if k in last}
    click.echo(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("corpus", type=click.Path(dir_okay=False))
@click.option("--split", default="test", show_default=True, help="Split to score.")
@click.option("--batch-size", default=10, show_default=True, type=click.IntRange(1),
              help="Lanes scored in parallel; 1 gives one exact left-to-right pass.")
@click.option("--time-size", default=35, show_default=True, type=click.IntRange(1), help="Block length.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def evaluate(ctx, checkpoint, corpus, split, batch_size, time_size, as_json):
    """Perplexity of CHECKPOINT over a whole split of CORPUS.h5, every token scored once."""
    from .data import open_corpus
    from .train.checkpoint import load_checkpoint
    from .train.evaluate import perplexity
    from .train.job import check_vocab, model_from_checkpoint

    saved = load_checkpoint(checkpoint)
    data = open_corpus(corpus)
    check_vocab(saved, data)
    model = model_from_checkpoint(saved, backend_from(ctx), registry_from(ctx))
    ppl, tokens = perplexity(model, data.split(split)[:], batch_size, time_size)
    if as_json:
        emit_json({"perplexity": ppl, "tokens": tokens, "split": split})
    else:
        click.echo(f"{split} perplexity {ppl:.2f} over {tokens:,} tokens")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--prompt", default="", help="Text to start from (default: a sentence start).")
@click.option("--length", default=50, show_default=True, type=click.IntRange(1), help="Tokens to sample.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-k", type=click.IntRange(1), help="Sample only among the K likeliest tokens.")
@click.option("--seed", default=0, show_default=True, type=int, help="The same seed gives the same text.")
@click.pass_context
def generate(ctx, checkpoint, prompt, length, temperature, top_k, seed):
    """Sample text from a trained CHECKPOINT."""
    from .data import Vocab
    from .train.checkpoint import load_checkpoint
    from .train.generate import generate_text
    from .train.job import model_from_checkpoint

    saved = load_checkpoint(checkpoint)
    model = model_from_checkpoint(saved, backend_from(ctx), registry_from(ctx))
    text = generate_text(model, Vocab(saved.vocab), saved.meta.get("level", "word"), prompt, length,
                         temperature, top_k, seed)
    click.echo(text)


def main(argv=None):
    """Entry point: run the CLI, turning user errors into one line and exit code 2."""
    try:
        code = cli.main(args=argv, prog_name="gpurnn", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except (GpurnnError, click.ClickException) as exc:
        if debug_requested():
            raise
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        click.echo(f"gpurnn: error: {message}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return code if isinstance(code, int) else 0
