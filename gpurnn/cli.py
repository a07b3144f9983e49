"""The `gpurnn` command line: thin click commands that parse, call the library, and report.

Every problem a user can fix ends the program with one line on stderr and exit code 2 (no traceback;
`--debug` or GPURNN_DEBUG=1 shows one); a usage error adds click's "Try 'gpurnn CMD -h' for help.".
Every option can also come from an environment variable GPURNN_<COMMAND>_<OPTION> (GPURNN_BACKEND
for the group's; plugins from GPURNN_PLUGINS), and `train --config FILE.toml` from a file.
"""

import functools
import os
import sys
import tomllib
from contextlib import contextmanager
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
from click.core import ParameterSource

from . import jsontext
from .backend import BACKEND_NAMES, get_backend, probe_cupy
from .config import PRESET_OPTIONS, RUN, SECTIONS, ModelOptions, OutputOptions, TrainConfig, command_options
from .errors import GpurnnError
from .memory import out_of_memory_error, size_text
from .registry import Registry
from .train.parallel import on_every_rank, world

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def debug_requested(argv=None):
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("GPURNN_DEBUG") == "1"


def package_version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def emit_json(obj):
    click.echo(jsontext.dumps(obj, indent=2, sort_keys=False))


class SectionOption(click.Option):
    """An option listed under a heading (`section`) in its command's help."""

    def __init__(self, *args, section="Options", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class SectionCommand(click.Command):
    """A command whose help lists its options grouped under their sections' headings, in order.

    Options without a section come first, under "Options", then the configuration's sections
    (`gpurnn.config`) in their order; --help goes with the run options.
    """

    def format_options(self, ctx, formatter):
        sections = {title: [] for title in ("Options", *SECTIONS)}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record:
                section = RUN if param is self.get_help_option(ctx) else getattr(param, "section", "Options")
                sections.setdefault(section, []).append(record)
        sections = {title: rows for title, rows in sections.items() if rows}
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def option(section, *decls, **kwargs):
    """click.option under a help heading."""
    return click.option(*decls, cls=SectionOption, section=section, **kwargs)


def runtime_options(command):
    """--backend, --plugin and --debug on a subcommand; a backend given there wins over the group's."""

    @option(RUN, "--backend", type=click.Choice(BACKEND_NAMES), default=None,
            show_default="the group's, $GPURNN_BACKEND or auto",
            help="Array backend: auto takes CuPy when a CUDA device is usable.")
    @option(RUN, "--plugin", "plugins", multiple=True, metavar="MODULE", show_default=False, allow_from_autoenv=False,
            help="Load a layer plugin: a module name or a .py path (repeatable; also $GPURNN_PLUGINS).")
    @option(RUN, "--debug", is_flag=True, expose_value=False, help="Show tracebacks on errors.")
    @functools.wraps(command)
    def with_runtime(*args, backend=None, plugins=(), **kwargs):
        obj = click.get_current_context().obj
        obj["backend"] = backend or obj["backend"]
        obj["plugins"] = (*obj["plugins"], *plugins)
        return command(*args, **kwargs)

    return with_runtime


@click.group(context_settings=CONTEXT)
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None, show_default="auto",
              help="Array backend: auto takes CuPy when a CUDA device is usable.")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE", show_default=False, allow_from_autoenv=False,
              help="Load a layer plugin: a module name or a .py path (repeatable; also $GPURNN_PLUGINS).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="gpurnn")
@click.pass_context
def cli(ctx, backend, plugins, debug):
    """gpurnn: readable recurrent language models on NumPy (CPU) and CuPy (GPU).

    Every option can also be set by an environment variable named GPURNN_<COMMAND>_<OPTION>, such as
    GPURNN_TRAIN_EPOCHS=3 (GPURNN_BACKEND for the group's --backend; GPURNN_PLUGINS, comma-separated,
    for plugins).
    """
    ctx.obj = {"backend": backend, "plugins": plugins}


def registry_from(ctx):
    return Registry(plugins=ctx.obj["plugins"])


def backend_from(ctx):
    return get_backend(ctx.obj["backend"])


def backends_report():
    """Every backend, usable or not, with the reason."""
    _, why_not = probe_cupy()
    return {"numpy": "usable", "cupy": "usable" if why_not is None else f"unusable: {why_not}"}


@cli.command(cls=SectionCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@runtime_options
@click.pass_context
def info(ctx, as_json):
    """Versions, every backend (usable or not, and why), the chosen one and its device."""
    report = {"gpurnn": package_version("gpurnn"), "python": sys.version.split()[0],
              **{pkg: package_version(pkg) for pkg in ("click", "pluggy", "h5py", "tqdm")},
              "backends": backends_report()}
    try:
        report.update(backend_from(ctx).describe())
    except Exception as exc:  # info reports what it cannot use; it never fails
        report.update(backend=None, why=str(exc))
    if as_json:
        emit_json(report)
        return
    for key, value in report.items():
        for name, text in value.items() if isinstance(value, dict) else [(key, value)]:
            click.echo(f"{name if key != 'backends' else 'backend ' + name:>20}: {text}")


@cli.command(cls=SectionCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@runtime_options
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


@cli.command(cls=SectionCommand)
@click.argument("train", type=click.Path())
@click.option("--valid", type=click.Path(), help="Validation text file.")
@click.option("--test", type=click.Path(), help="Test text file.")
@click.option("--output", "-o", type=click.Path(), required=True, help="The corpus file to write (.h5).")
@click.option("--level", type=click.Choice(["word", "char"]), default="word",
              help="word: whitespace-separated, <eos> at line ends; char: every character.")
@click.option("--vocab-size", type=int, help="Keep at most this many tokens (the most frequent).")
@click.option("--min-count", type=int, default=1,
              help="Leave out words seen fewer times in TRAIN.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@runtime_options
def prepare(train, valid, test, output, level, vocab_size, min_count, as_json):
    """Tokenize text files into an HDF5 corpus file (vocabulary from TRAIN; unknown words -> <unk>)."""
    from .data import open_corpus, prepare_corpus

    prepare_corpus(train, output, valid=valid, test=test, level=level, vocab_size=vocab_size,
                   min_count=min_count)
    with open_corpus(output) as corpus:
        report_corpus(corpus.describe(), as_json)


@cli.command("corpus-info", cls=SectionCommand)
@click.argument("corpus", type=click.Path())
@click.option("--top", type=click.IntRange(min=0), default=10,
              help="How many of the most frequent tokens to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@runtime_options
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


def given_options(ctx, names):
    """The options among `names` that the user set: command line, environment or --config file."""
    return {n for n in names if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)}


def load_config(ctx, param, path):
    """--config FILE.toml: train options as `name = value` (top level or under [train]), used as defaults."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", ctx, param) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", ctx, param) from None
    table = table.get("train", table)
    known = {name.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params if p.name != "config"
             for name in (p.name, *p.opts)}
    unknown = sorted(key for key in table if key.replace("-", "_") not in known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown option(s) {', '.join(unknown)}", ctx, param)
    values = {known[key.replace("-", "_")]: value for key, value in table.items()}
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


class IntList(click.ParamType):
    """Comma-separated integers ("2000,6000"), or a list of them from a --config file."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            return [int(str(item).strip()) for item in items]
        except ValueError:
            self.fail(f"{value!r} is not a list of integers such as 2000,6000", param, ctx)


def click_type(opt):
    """The click type of a configuration option: its choices, path kind or range, checked as it is read."""
    how = opt.setting
    if how.choices:
        return click.Choice(list(how.choices))
    if how.path:
        return click.Path(dir_okay=False) if how.path == "file" else click.Path(file_okay=False)
    if opt.kind is bool:
        return None  # a flag
    if opt.kind is list:
        return IntList()
    if how.range is None:
        return opt.kind
    ranged = click.IntRange if opt.kind is int else click.FloatRange
    return ranged(how.range.low, how.range.high, min_open=how.range.low_open, max_open=how.range.high_open)


def config_options(command):
    """The options of the run's configuration (`gpurnn.config`), each under its section's heading."""
    for opt in reversed(command_options()):
        flag = "--" + opt.name.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if opt.negatable else flag
        how = {"show_default": opt.shown} if opt.shown is not None else {}
        if opt.kind is bool and not opt.negatable:
            how["is_flag"] = True
        command = option(opt.setting.section, decl, opt.name, type=click_type(opt), default=opt.default,
                         help=opt.setting.help, **how)(command)
    return command


@cli.command(cls=SectionCommand)
@click.argument("corpus", required=False, type=click.Path(dir_okay=False))
@option(RUN, "--config", type=click.Path(dir_okay=False), is_eager=True, callback=load_config,
        help="TOML file of train options (name = value); options given otherwise win over it.")
@config_options
@runtime_options
@click.pass_context
@on_every_rank
def train(ctx, corpus, config, **values):
    """Train a language model on CORPUS.h5 (default: the embedded 1,000-word demo).

    Under `mpiexec -n R` the R processes train one model together, each on B / R lanes of the batch.

    The run's checkpoint, records and best checkpoint go to a run folder (runs/<run id>/ unless
    --run-dir or --checkpoint says otherwise); their paths are printed at the end.
    """
    from .train.job import check_outputs, model_specs, prepare_job
    from .train.metrics import new_run_id, require_matplotlib

    model = ModelOptions(**{f.name: values[f.name] for f in fields(ModelOptions)})
    out = OutputOptions(**{f.name: values[f.name] for f in fields(OutputOptions)})
    options = {f.name: values[f.name] for f in fields(TrainConfig) if f.name in values}
    model_given = given_options(ctx, ("model", *PRESET_OPTIONS))
    if model.model_config and model_given:
        names = option_names(model_given)
        raise click.UsageError(f"{', '.join(names)} {'apply' if len(names) > 1 else 'applies'} only to a "
                               f"preset; leave {'them' if len(names) > 1 else 'it'} out with --model-config", ctx)
    if out.run_dir and out.checkpoint:
        raise click.UsageError("give --run-dir or --checkpoint, not both", ctx)
    if out.resume and not (out.run_dir or out.checkpoint):
        raise click.UsageError("--resume needs the run to continue: --run-dir DIR or --checkpoint FILE", ctx)
    if out.plot:
        require_matplotlib()
    model_name = Path(model.model_config).stem if model.model_config else model.model
    group = world()  # under mpiexec: rank 0 names the run and alone writes its records
    run_id = group.from_root(lambda: new_run_id(model_name))
    explicit = given_options(ctx, options)
    if model_given or model.model_config:
        explicit.add("specs")
    job = {"specs": model_specs(model), "options": options, "explicit": explicit, "backend": backend_from(ctx),
           "registry": registry_from(ctx), "run_meta": {"run_id": run_id, "model_name": model_name}}
    with run_folder(out.run_dir, out.checkpoint, run_id, owner=group.rank == 0) as checkpoint:
        job["resume"] = out.resume and group.from_root(checkpoint.exists)  # else it begins: MetricsLog says so
        metrics = out.metrics or sibling(checkpoint, ".metrics.jsonl")
        if group.rank == 0:  # the one writer of the run's files
            check_outputs(corpus, checkpoint, metrics, out.plot, model.model_config)
        report = TrainReport(corpus, checkpoint, metrics, out, write=group.rank == 0)
        trainer, _ = prepare_job(corpus, checkpoint=checkpoint, **job, observer=report,
                                 best_path=sibling(checkpoint, ".best.h5") if out.keep_best else None)
        if out.keep_best and trainer.valid_ids is None:
            trainer.release_lock()  # the checkpoint is free again, and the lock file gone
            raise click.UsageError("--keep-best needs a corpus with a validation split", ctx)
        summary = train_with_progress(ctx, trainer, report)
    if out.plot:
        plot_current_run(report.log, out.plot)
    click.echo(summary)
    click.echo(f"checkpoint: {checkpoint}")
    if out.keep_best and trainer.best_path.exists():
        click.echo(f"best checkpoint: {trainer.best_path}")
    click.echo(f"metrics: {report.log.path}")


@contextmanager
def run_folder(run_dir, checkpoint, run_id, owner=True):
    """The checkpoint path: CHECKPOINT, or RUN_DIR (default runs/RUN_ID, created)/checkpoint.h5.

    A run folder made here is removed again if the job fails to start and left it empty. Only the
    `owner` (rank 0 of a data-parallel job) makes or removes it.
    """
    if checkpoint:
        yield Path(checkpoint)
        return
    run_dir = Path(run_dir or Path("runs") / run_id)
    if not owner:
        yield run_dir / "checkpoint.h5"
        return
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir / "checkpoint.h5"
    except BaseException:
        if made and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise


def option_names(names):
    return [f"--{name.replace('_', '-')}" for name in sorted(names)]


def sibling(path, suffix):
    """`path` with its .h5 suffix replaced by `suffix` (runs/x/checkpoint.h5 -> checkpoint.best.h5)."""
    return path.with_name(path.stem + suffix)


def run_header(trainer, corpus, checkpoint):
    """The first record of a run: who, when, with what configuration, on what."""
    from dataclasses import asdict

    backend = trainer.model.backend
    header = {"run_id": trainer.extra_meta["run_id"], "gpurnn": package_version("gpurnn"),
              "backend": backend.name, "device": backend.describe().get("device"),
              "model_name": trainer.extra_meta["model_name"], "corpus": str(corpus or "demo"),
              "checkpoint": str(checkpoint),
              "config": asdict(trainer.config), "specs": trainer.model.specs}
    if trainer.iteration:
        header["resumed_at"] = trainer.iteration
    return header


class TrainReport:
    """The train command's trainer Observer: when the run starts, its metrics file (the header
    first; only `write`s on rank 0) and a progress display; then every record to both."""

    def __init__(self, corpus, checkpoint, metrics, out, write=True):
        self.corpus, self.checkpoint, self.metrics, self.out, self.write = corpus, checkpoint, metrics, out, write
        self.log = self.progress = None

    def on_start(self, trainer):
        from .train.metrics import MetricsLog
        from .train.progress import TrainingProgress

        self.log = MetricsLog(self.metrics, run_header(trainer, self.corpus, self.checkpoint), resume=self.out.resume,
                              write=self.write, checkpoint=self.checkpoint)
        cfg = trainer.config
        self.progress = TrainingProgress(trainer.total_iters, quiet=self.out.quiet, first=trainer.iteration,
                                         tokens_per_iter=cfg.batch_size * cfg.time_size)
        self.progress.message([f"training {' -> '.join(s['type'] for s in trainer.model.specs)}",
                               f"on {self.corpus or 'the embedded demo corpus'} ({trainer.model.backend.name}):",
                               f"B={cfg.batch_size} T={cfg.time_size} {cfg.optimizer} lr={trainer.optimizer.lr:g}",
                               f"iterations {trainer.iteration}..{trainer.total_iters}"])

    def on_step(self, iteration, total, loss):
        self.progress.on_step(iteration, total, loss)

    def on_eval(self, done, total):
        self.progress.on_eval(done, total)

    def on_log(self, record):
        self.log(record)
        self.progress.on_log(record)

    def on_notice(self, message):
        self.progress.notice(message)

    def close(self):
        if self.progress is not None:
            self.progress.close()


def train_with_progress(ctx, trainer, report):
    """Run the trainer, reporting to `report` (a TrainReport); the final summary: one line, whatever the
    terminal (a script reads it; an MPI launcher may hand each rank a pseudo-terminal of width 0)."""
    from .train.trainer import Interrupted

    try:
        trainer.run()
    except Interrupted as exc:
        report.close()
        click.echo(f"{exc}; checkpoint saved to {trainer.checkpoint_path}", err=True)
        ctx.exit(exc.exit_code)
    finally:
        report.close()
    last = report.log.records[-1] if report.log.records else {}
    summary = {k: last[k] for k in ("iteration", "epoch", "train_perplexity", "valid_perplexity") if k in last}
    parts = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()]
    return " ".join(parts)


def plot_current_run(log, path):
    from .train.metrics import plot_run, read_records, run_records

    plot_run(*run_records(read_records(log.path), log.run_id), path)


@cli.command("eval", cls=SectionCommand)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("corpus", type=click.Path(dir_okay=False))
@click.option("--split", default="test", help="Split to score.")
@click.option("--batch-size", default=10, type=click.IntRange(1),
              help="Lanes scored in parallel; 1 gives one exact left-to-right pass.")
@click.option("--time-size", default=35, type=click.IntRange(1), help="Block length.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default="on",
              help="CuPy: capture one block's forward pass as a CUDA graph and replay it for every block.")
@runtime_options
@click.pass_context
@on_every_rank
def evaluate(ctx, checkpoint, corpus, split, batch_size, time_size, as_json, cuda_graph):
    """Perplexity of CHECKPOINT over a whole split of CORPUS.h5, every token scored once.

    Under `mpiexec -n R` each process scores its share of the lanes and rank 0 prints the whole.
    """
    from .data import open_corpus
    from .train.checkpoint import load_checkpoint
    from .train.evaluate import perplexity
    from .train.job import check_vocab, model_from_checkpoint
    from .train.progress import EvalProgress

    saved = load_checkpoint(checkpoint)
    data = open_corpus(corpus)
    check_vocab(saved, data)
    model = model_from_checkpoint(saved, backend_from(ctx), registry_from(ctx))
    progress = EvalProgress(desc=split)
    try:
        ppl, tokens = perplexity(model, data.split(split)[:], batch_size, time_size, progress=progress,
                                 on_note=lambda text: click.echo(f"note: {text}", err=True), cuda_graph=cuda_graph,
                                 group=world())
    finally:
        progress.close()
    if as_json:
        emit_json({"perplexity": ppl, "tokens": tokens, "split": split})
    else:
        click.echo(f"{split} perplexity {ppl:.2f} over {tokens:,} tokens")


@cli.command(cls=SectionCommand)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--prompt", default="", show_default="a sentence start", help="Text to start from.")
@click.option("--length", "--max-tokens", "length", default=50, type=click.IntRange(1),
              help="Tokens to generate per sample (fewer with --stop-at-eos).")
@click.option("--num-samples", default=1, type=click.IntRange(1), help="Samples to draw, side by side.")
@click.option("--temperature", default=1.0, type=click.FloatRange(min=0),
              help="Divide the logits by this: below 1 is more conservative; 0 is greedy decoding.")
@click.option("--greedy", is_flag=True, help="Always take the likeliest token (the same as --temperature 0).")
@click.option("--top-k", type=click.IntRange(1), show_default="all tokens",
              help="Sample only among the K likeliest tokens.")
@click.option("--stop-at-eos", is_flag=True, help="End a sample at its first <eos> (a line end at word level).")
@click.option("--seed", default=0, type=int, help="The same seed gives the same text.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), show_default="stdout",
              help="Write the samples to this file (atomically).")
@runtime_options
@click.pass_context
def generate(ctx, checkpoint, prompt, length, num_samples, temperature, greedy, top_k, stop_at_eos, seed, output):
    """Sample text from a trained CHECKPOINT; several samples are separated by a blank line."""
    from .atomic import write_bytes_atomically
    from .data import Vocab
    from .train.checkpoint import load_checkpoint
    from .train.generate import generate_texts
    from .train.job import model_from_checkpoint

    saved = load_checkpoint(checkpoint)
    model = model_from_checkpoint(saved, backend_from(ctx), registry_from(ctx))
    texts = generate_texts(model, Vocab(saved.vocab), saved.meta.get("level", "word"), prompt, length,
                           0.0 if greedy else temperature, top_k, seed, num_samples, stop_at_eos)
    text = "\n\n".join(t.rstrip("\n") for t in texts) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        write_bytes_atomically(output, text.encode("utf-8"))
    except OSError as exc:
        raise GpurnnError(f"cannot write {output}: {exc.strerror}") from None
    click.echo(f"{len(texts)} sample(s) written to {output}", err=True)


@cli.command(cls=SectionCommand)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@runtime_options
def strip(checkpoint, output):
    """Copy CHECKPOINT to OUTPUT without its optimizer state, for eval, generate and shipping.

    Adam's moments make a checkpoint three times the size of its weights. OUTPUT scores and samples
    exactly as CHECKPOINT does, but cannot resume training.
    """
    from .train.checkpoint import strip_checkpoint

    strip_checkpoint(checkpoint, output)
    before, after = (Path(path).stat().st_size for path in (checkpoint, output))
    click.echo(f"wrote {output} without optimizer state: {size_text(before)} -> {size_text(after)}")


@cli.command(cls=SectionCommand)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torch"]), default=None,
              show_default="from OUTPUT's suffix: .onnx or .safetensors",
              help="onnx: an ONNX graph for inference (needs gpurnn[onnx]); torch: the weights under the names "
                   "of PyTorch's word_language_model RNNModel, as safetensors.")
@runtime_options
@click.pass_context
def export(ctx, checkpoint, output, fmt):
    """Write CHECKPOINT's model for other tools: an ONNX graph or PyTorch-named safetensors weights.

    The ONNX graph takes `ids` (int64, batch x time) and each recurrent layer's state (`lstm1.h`, ...;
    zeros to start) and gives `logits` and the new states (`lstm1.h.next`, ...): feed those back to
    stream a long text block by block.
    """
    from .export.commands import export_checkpoint

    summary = export_checkpoint(checkpoint, output, registry_from(ctx), fmt)
    click.echo(f"wrote {output}, {size_text(Path(output).stat().st_size)}: {summary}")


@cli.command("import-torch", cls=SectionCommand)
@click.argument("state", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--vocab", type=click.Path(dir_okay=False), show_default="the file's vocab metadata",
              help="The vocabulary in id order: a gpurnn corpus (.h5) or a text file of one token per line.")
@runtime_options
@click.pass_context
def import_torch(ctx, state, output, vocab):
    """Make a gpurnn checkpoint OUTPUT from PyTorch RNNModel weights in the safetensors file STATE.

    STATE's metadata must hold RNNModel's constructor arguments as JSON (`rnn_model`), as `gpurnn export
    --format torch` writes. OUTPUT has no optimizer state: eval and generate take it.
    """
    from .export.commands import import_torch as import_state

    summary = import_state(state, output, registry_from(ctx), vocab)
    click.echo(f"wrote {output}: {summary}")


def main(argv=None):
    """Entry point: run the CLI, turning user errors into one line and exit code 2."""
    try:
        code = cli.main(args=argv, prog_name="gpurnn", standalone_mode=False, auto_envvar_prefix="GPURNN")
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except (GpurnnError, click.ClickException, MemoryError) as exc:
        if debug_requested(argv):
            raise
        if isinstance(exc, MemoryError):  # an allocation no guard of gpurnn.memory named
            exc = out_of_memory_error(exc, "", "the sizes the command was given")
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        click.echo(f"gpurnn: error: {message}", err=True)
        ctx = getattr(exc, "ctx", None)
        if isinstance(exc, click.UsageError) and ctx is not None:
            click.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return code if isinstance(code, int) else 0


from .score import command as _score_command  # noqa: E402,F401  (defines `gpurnn score` in its own module)
