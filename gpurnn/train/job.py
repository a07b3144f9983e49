"""A training job from user options: corpus, model, optimizer, stream, and resume from a checkpoint.

The CLI calls `prepare_job` then `Trainer.run`; this module decides defaults and refuses options
that contradict a checkpoint. With no corpus it trains on the embedded demo (the first 1,000 words
of Penn Treebank) with the textbook's chapter-5 settings. Under `mpiexec` every rank calls it with
the same options (checked) and gets a trainer over its own lanes of the batch (see parallel.py).
"""

import sys
import tomllib
from pathlib import Path

from ..atomic import check_not_inputs, check_output_path, remove_stale_temps
from ..config import POSITIVE, PROBABILITY, RESUMABLE, TrainConfig, is_int, is_number
from ..data import BPTTStream, demo_corpus, open_corpus
from ..errors import CheckpointError, SpecError
from ..lock import PathLock
from ..model import Model, fused_output, preset_specs
from .checkpoint import STRIPPED, check_writable, load_checkpoint, restore_params, verify_checkpoint
from .optim import make_optimizer
from .parallel import world
from .trainer import Trainer

# Layer options whose values are checked when a model config is read (plugins check their own others).
POSITIVE_INT_OPTIONS = ("size", "hidden_size", "output_size")
PROBABILITY_OPTIONS = ("p",)


def load_model_config(path):
    """Layer specs from a TOML file holding ``[[layers]]`` tables (``type`` plus options)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            layers = tomllib.load(f).get("layers")
    except FileNotFoundError:
        raise SpecError(f"model config {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"model config {path} is not valid TOML: {exc}") from None
    if not isinstance(layers, list) or not layers:
        raise SpecError(f"model config {path} needs a list of [[layers]] tables")
    for number, spec in enumerate(layers, 1):
        check_layer_values(spec, f"model config {path}: layer {number}")
    return layers


def check_layer_values(spec, where):
    """Refuse a layer spec whose sizes are not positive integers or whose probabilities are out of range."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise SpecError(f"{where} needs a type = \"...\" (a layer type name)")
    where = f"{where} ({spec['type']})"
    for key in POSITIVE_INT_OPTIONS:
        value = spec.get(key)
        if key in spec and not (is_int(value) and POSITIVE.holds(value)):
            raise SpecError(f"{where}: {key} must be a positive integer, not {value!r}")
    for key in PROBABILITY_OPTIONS:
        value = spec.get(key)
        if key in spec and not (is_number(value) and PROBABILITY.holds(value)):
            raise SpecError(f"{where}: {key} must be a probability in [0, 1), not {value!r}")


def check_outputs(corpus=None, checkpoint=None, metrics=None, plot=None, model_config=None):
    """Before any work: every output can be written, and none is an input or another output."""
    check_not_inputs([("checkpoint", checkpoint), ("metrics file", metrics), ("plot", plot)],
                     [("corpus", corpus), ("model config", model_config)])
    if checkpoint:
        check_writable(checkpoint)
    if metrics:
        check_output_path(metrics, "metrics file")
    if plot:
        check_output_path(plot, "plot")


def model_specs(options):
    """The layer specs `options` (a config.ModelOptions) choose: its model config file, or its preset with
    the preset options given."""
    if options.model_config:
        return load_model_config(options.model_config)
    return preset_specs(options.model, **options.preset_options())


def corpus_source(path):
    """The corpus at `path`, or the embedded demo corpus when `path` is None."""
    return demo_corpus() if path is None else open_corpus(path)


def prepare_job(corpus_path, *, specs, options, explicit, backend, registry, checkpoint=None,
                resume=False, run_meta=None, best_path=None, on_note=None, observer=None):
    """A ready Trainer (restored when resuming) and the corpus it reads.

    `options` maps TrainConfig fields to values, None meaning "default" (the demo's without a
    corpus); `explicit` names those the user actually gave (only they can contradict a checkpoint),
    and a resumed run takes the others from the checkpoint, where they are checked again. `run_meta`
    (such as the run id and model name) goes into the trainer's `extra_meta`, saved in checkpoints; a
    resumed run keeps the checkpoint's values, so it keeps its identity. The checkpoint path is locked
    against other trainers until the Trainer's run ends. `on_note(text)` hears of schedule options a
    resume changes (default: printed to stderr); `observer` (a trainer.Observer) hears the training.
    """
    group = world()
    group.check_same({**options, "corpus": corpus_path, "specs": specs, "explicit": sorted(explicit),
                      "backend": backend.name, "dtype": backend.dtype.name, "checkpoint": checkpoint,
                      "resume": resume})
    lock = None
    try:
        with group.agreed_errors():  # a problem on any rank is reported once and ends every rank
            if checkpoint and group.rank == 0:  # the one writer checks and locks the checkpoint path
                check_outputs(corpus_path, checkpoint)
                lock = PathLock(checkpoint).acquire()
                remove_stale_temps(checkpoint)
            corpus = corpus_source(corpus_path)
            saved = None
            if resume:
                if not checkpoint:
                    raise CheckpointError("--resume needs --checkpoint PATH")
                saved = verify_checkpoint(load_checkpoint(checkpoint))
                require_layer_types(saved, registry)
                check_resume(saved, corpus, specs, options, explicit)
                specs = saved.meta["specs"]
                options = {**saved.meta["config"], **{k: v for k, v in options.items() if k in explicit}}
            config = TrainConfig.from_options(options, demo=corpus_path is None)
            lanes = group.lanes(config.batch_size)
            stream = BPTTStream(corpus.split("train"), config.batch_size, config.time_size, lanes=lanes)
            model = Model(specs, len(corpus.vocab), backend, registry, seed=config.seed, first_lane=lanes[0])
            for spec, layer in zip(model.specs, model.layers):
                if getattr(layer, "needs_frequency_order", False):  # such as the adaptive softmax's cutoffs
                    corpus.require_frequency_order(f"layer {spec['type']!r}")
            valid = corpus.split("valid")[:] if "valid" in corpus.splits else None
            run_meta = {k: saved.meta.get(k, v) if saved else v for k, v in (run_meta or {}).items()}
            trainer = Trainer(model, make_optimizer(config.optimizer, starting_lr(saved, config, explicit)), stream,
                              config, valid_ids=valid if valid is not None and len(valid) > 1 else None,
                              checkpoint_path=checkpoint, vocab=list(corpus.vocab),
                              extra_meta={"level": corpus.level, "corpus": str(corpus_path or "demo"), **run_meta},
                              observer=observer, best_path=best_path, group=group, lock=lock, resume_from=saved)
            for line in schedule_changes(saved, config, explicit) if saved and group.rank == 0 else ():
                (on_note or _print_note)(line)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return trainer, corpus


def starting_lr(saved, config, explicit):
    """The learning rate to go on with: --lr, unless resuming, where the checkpoint's current (possibly
    decayed) rate is kept unless --lr gives a new one."""
    if saved is None or ("lr" in explicit and config.lr != saved.meta["config"]["lr"]):
        return config.lr
    return saved.meta["trainer"]["lr"]


def _print_note(text):
    print(text, file=sys.stderr)


def schedule_changes(saved, config, explicit):
    """One line per schedule value (lr, lr decay, clip) an explicit option replaces on resume.

    The run's own --lr repeated (the same command run again) keeps the checkpoint's current, possibly
    decayed, rate, and says so; any other value replaces it ("lr 0.25 from the checkpoint -> 0.001").
    """
    before = saved.meta["config"]
    current = saved.meta["trainer"]["lr"]
    if "lr" in explicit and config.lr == before["lr"] and current != config.lr:
        yield f"resume: lr {current:g} from the checkpoint is kept (decayed from --lr {config.lr:g})"
    elif "lr" in explicit and config.lr != before["lr"]:
        yield f"resume: lr {current:g} from the checkpoint -> {config.lr:g} (--lr)"
    for key in ("lr_decay", "clip"):
        old, new = before.get(key), getattr(config, key)
        if key in explicit and old != new:
            flag = key.replace("_", "-")
            yield f"resume: {flag} {'none' if old is None else f'{old:g}'} from the checkpoint -> {new:g} (--{flag})"


def check_vocab(saved, corpus):
    """Refuse a corpus whose vocabulary is not the checkpoint's (the ids would mean other tokens)."""
    if list(corpus.vocab) != list(saved.vocab):
        raise CheckpointError(f"the checkpoint's vocabulary ({len(saved.vocab)} tokens) does not match "
                              f"the corpus's ({len(corpus.vocab)} tokens)")


def check_resume(saved, corpus, specs, options, explicit):
    """Refuse a resume from a stripped checkpoint, or whose corpus or explicit options contradict it.
    A checkpoint's affine + softmax_loss agrees with model options that give the fused output layer
    (the presets'): the same numbers; the resumed run keeps the checkpoint's layers."""
    if saved.meta.get(STRIPPED):
        raise CheckpointError(f"{saved.path} is a stripped checkpoint: it has no optimizer state and cannot "
                              f"resume training (eval and generate accept it)")
    check_vocab(saved, corpus)
    if "specs" in explicit and fused_output(specs) != fused_output(saved.meta["specs"]):
        raise CheckpointError("the model options contradict the checkpoint's model; "
                              "leave them out when resuming")
    for name in sorted(explicit - RESUMABLE - {"specs"}):
        if name in saved.meta["config"] and options.get(name) != saved.meta["config"][name]:
            raise CheckpointError(f"--{name.replace('_', '-')} {options.get(name)} contradicts the checkpoint "
                                  f"({saved.meta['config'][name]}); leave it out when resuming")


def require_layer_types(saved, registry):
    """Refuse a checkpoint whose layer types no loaded plugin provides, naming what to install."""
    meta = saved.meta
    recorded = meta.get("layer_types") or {}
    registry.require({spec["type"]: recorded.get(spec["type"]) for spec in meta["specs"]})


def model_from_checkpoint(saved, backend, registry):
    """The model a checkpoint describes, with its parameters, in evaluation mode."""
    meta = verify_checkpoint(saved).meta
    require_layer_types(saved, registry)
    model = Model(meta["specs"], meta["vocab_size"], backend, registry)
    restore_params(model.params, saved, backend)
    return model.eval()
