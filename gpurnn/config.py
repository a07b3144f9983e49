"""One configuration of a training run: each option's type, default, valid range and help, stated once.

`ModelOptions` (which model: a preset and its sizes), `TrainConfig` (optimisation, schedule and run
options; saved in checkpoints) and `OutputOptions` (where the run's files go) are dataclasses whose
fields carry a `Setting`: help text, help section and range. The `train` command's options are made
from them (`command_options`), so a help text, a default or a range is written here and nowhere else.
A `TrainConfig` checks its values when it is made, so values from the command line, a --config file,
the environment, a Python caller or a checkpoint being resumed all meet the same rules, with the same
one-line errors.

Presets are tables of values: `PRESETS` (the model presets) and `DEMO` (the training values of the
embedded demo corpus). This module imports nothing of gpurnn's but its errors, so every part of
gpurnn may use its checks (`is_int`, `is_number`).
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

from .errors import GpurnnError

MODEL, OPTIM, SCHEDULE, OUTPUT, RUN = SECTIONS = ("Model", "Optimisation", "Schedule", "Output", "Run")  # help headings


def is_int(value: object) -> bool:
    """An integer (NumPy's too), but not a bool, which Python counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (int or float, NumPy's too), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """Valid numbers from `low` to `high` (None: unbounded); an open end excludes its bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def above_low(self, value: float) -> bool:
        return self.low is None or (value > self.low if self.low_open else value >= self.low)

    def below_high(self, value: float) -> bool:
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def holds(self, value: float) -> bool:
        return self.above_low(value) and self.below_high(value)


POSITIVE = Range(1)  # for counts and sizes: 1, 2, ...
ABOVE_ZERO = Range(0, low_open=True)
PROBABILITY = Range(0, 1, high_open=True)  # for dropout rates


@dataclass(frozen=True)
class Setting:
    """What a configuration field means to a user.

    `section`: the help heading of its command-line option (None: no option); `unset`: what None
    means, as help shows it; `path`: "file" or "dir" for a path option; `resumable`: a resumed run may
    change it (how long, how often, and the schedule from there on), where any other value given must
    match the checkpoint's.
    """

    help: str
    section: str | None
    range: Range | None = None
    choices: tuple[str, ...] | None = None
    unset: str | None = None
    path: str | None = None
    resumable: bool = False


def setting(default: Any, help: str, section: str | None, **how: Any) -> Any:
    """A dataclass field with its `Setting`."""
    return field(default=default, metadata={"setting": Setting(help, section, **how)})


# The model presets, after the textbook: SimpleRnnlm (chapter 5), Rnnlm (chapter 6) and BetterRnnlm
# (Zaremba et al.'s medium model with tied weights). None: no dropout, no cutoffs, the layer's div_value.
PRESETS: dict[str, dict[str, Any]] = {
    "simple-rnnlm": {"cell": "rnn", "wordvec_size": 100, "hidden_size": 100, "num_layers": 1, "dropout": None,
                     "tie_weights": False, "output_layer": "full", "cutoffs": None, "div_value": None},
    "rnnlm": {"cell": "lstm", "wordvec_size": 100, "hidden_size": 100, "num_layers": 1, "dropout": None,
              "tie_weights": False, "output_layer": "full", "cutoffs": None, "div_value": None},
    "better-rnnlm": {"cell": "lstm", "wordvec_size": 650, "hidden_size": 650, "num_layers": 2, "dropout": 0.5,
                     "tie_weights": True, "output_layer": "full", "cutoffs": None, "div_value": None},
}
OUTPUT_LAYERS = ("full", "adaptive")
OPTIMIZERS = ("sgd", "adam")
# The textbook's chapter-5 run on the embedded 1,000-word demo: SimpleRnnlm D = H = 100, SGD lr 0.1.
DEMO: dict[str, Any] = {"batch_size": 10, "time_size": 5, "epochs": 100}


@dataclass(frozen=True)
class ModelOptions:
    """The model: a preset, changed by its options (None: the preset's value), or a model config file."""

    model: str = setting("simple-rnnlm", "Model preset.", MODEL, choices=tuple(PRESETS))
    model_config: str | None = setting(
        None, "TOML file of [[layers]] specs, instead of a preset (then the preset options do not apply).", MODEL,
        path="file")
    wordvec_size: int | None = setting(None, "Embedding size D.", MODEL, range=POSITIVE)
    hidden_size: int | None = setting(None, "Hidden size H of each recurrent layer.", MODEL, range=POSITIVE)
    num_layers: int | None = setting(None, "Recurrent layers stacked.", MODEL, range=POSITIVE)
    dropout: float | None = setting(None, "Dropout before, between and after the recurrent layers.", MODEL,
                                    range=PROBABILITY)
    tie_weights: bool | None = setting(None, "The output layer shares the embedding's table (needs D = H).", MODEL)
    output_layer: str | None = setting(
        None, "full: affine and softmax over the vocabulary as one fused layer (no N x V logits); adaptive: the "
              "adaptive softmax (needs --cutoffs).",
        MODEL, choices=OUTPUT_LAYERS)
    cutoffs: list[int] | None = setting(
        None, "Adaptive output: where the vocabulary (most frequent first) is cut into the head and the clusters, "
              "e.g. 2000,6000.", MODEL)
    div_value: float | None = setting(
        None, "Adaptive output: cluster k's projection is the hidden size / div-value**(k+1).", MODEL,
        range=ABOVE_ZERO, unset="4")

    def preset_options(self) -> dict[str, Any]:
        """The preset options given (not None), for `gpurnn.model.preset_specs`."""
        return {name: getattr(self, name) for name in PRESET_OPTIONS if getattr(self, name) is not None}


PRESET_OPTIONS = tuple(f.name for f in fields(ModelOptions) if f.name in PRESETS["simple-rnnlm"])


@dataclass(frozen=True)
class TrainConfig:
    """Training options (saved in checkpoints), checked when made; epochs or max_iters bounds the run."""

    optimizer: str = setting("sgd", "Optimizer.", OPTIM, choices=OPTIMIZERS)
    lr: float = setting(0.1, "Learning rate.", OPTIM, range=ABOVE_ZERO, resumable=True)
    clip: float | None = setting(None, "Clip the global gradient norm to this.", OPTIM, range=ABOVE_ZERO,
                                 unset="no clipping", resumable=True)
    batch_size: int = setting(20, "Lanes B.", OPTIM, range=POSITIVE)
    time_size: int = setting(35, "Truncated-BPTT block length T.", OPTIM, range=POSITIVE)
    seed: int = setting(0, "Random seed (initial weights, dropout).", OPTIM)
    epochs: int = setting(1, "Epochs to train.", SCHEDULE, range=POSITIVE, resumable=True)
    max_iters: int | None = setting(None, "Stop after this many iterations (overrides --epochs).", SCHEDULE,
                                    range=POSITIVE, resumable=True)
    lr_decay: float | None = setting(None, "Multiply lr by this when validation perplexity stops improving.",
                                     SCHEDULE, range=Range(0, 1, low_open=True), unset="no decay", resumable=True)
    eval_every: int | None = setting(None, "Validation perplexity every N iterations.", SCHEDULE, range=POSITIVE,
                                     unset="at the end", resumable=True)
    log_every: int | None = setting(None, "Log a record every N iterations.", SCHEDULE, range=POSITIVE,
                                    unset="an epoch, at most 100", resumable=True)
    save_every: int | None = setting(None, "Save the checkpoint every N iterations.", SCHEDULE, range=POSITIVE,
                                     unset="at the end", resumable=True)
    eval_batch_size: int = setting(10, "Lanes of a validation pass.", None, range=POSITIVE)
    cuda_graph: bool = setting(True, "CuPy: capture the training step once as a CUDA graph and replay it.", RUN,
                               resumable=True)

    def __post_init__(self) -> None:
        kinds = field_kinds(type(self))
        for f in fields(self):
            check_value(f, kinds[f.name], getattr(self, f.name))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], demo: bool = False) -> TrainConfig:
        """The config of `options` (field name -> value; None: the default, the demo's for the demo corpus)."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise GpurnnError(f"unknown training option(s) {', '.join(unknown)}")
        chosen = {name: value for name, value in options.items() if value is not None}
        return cls(**{**(DEMO if demo else {}), **chosen})


@dataclass(frozen=True)
class OutputOptions:
    """Where a run's files go and how much it says."""

    run_dir: str | None = setting(None, "Folder for the run's checkpoint.h5 (created).", OUTPUT,
                                  unset="runs/<run id>", path="dir")
    checkpoint: str | None = setting(None, "Checkpoint file (HDF5), written at the end and every --save-every.",
                                     OUTPUT, unset="RUN_DIR/checkpoint.h5", path="file")
    keep_best: bool = setting(
        False, "Also keep the best-validation checkpoint beside it (CHECKPOINT's name + .best.h5).", OUTPUT)
    resume: bool = setting(False, "Continue the run in --checkpoint (or --run-dir) exactly where it stopped.",
                           OUTPUT)
    metrics: str | None = setting(None, "The run's records as JSON lines: a header, then one per log step.",
                                  OUTPUT, unset="CHECKPOINT's name + .metrics.jsonl", path="file")
    plot: str | None = setting(None, "Draw this run's perplexity curves to this PNG (needs gpurnn[plot]).", OUTPUT,
                               path="file")
    quiet: bool = setting(False, "Print only the final summary.", OUTPUT)


CONFIGS = (ModelOptions, TrainConfig, OutputOptions)
RESUMABLE = frozenset(f.name for f in fields(TrainConfig) if f.metadata["setting"].resumable)


@dataclass(frozen=True)
class Option:
    """A configuration field as a command-line option: `kind` is int, float, str, bool or list (of ints);
    `default` is the value the command line leaves (None where the run decides), `shown` the default
    as help shows it (None: `default` itself); `negatable`: a --x/--no-x pair."""

    name: str
    kind: type
    setting: Setting
    default: Any
    shown: str | None
    negatable: bool


def command_options() -> list[Option]:
    """Every field of the configuration that is a command-line option, in help order."""
    options = []
    for config in CONFIGS:
        kinds = field_kinds(config)
        for f in fields(config):
            how = f.metadata["setting"]
            if how.section is None:
                continue
            shown = shown_default(f)
            kind = kinds[f.name][0]
            options.append(Option(f.name, kind, how, None if shown is not None else f.default, shown,
                                  kind is bool and f.default is not False))
    return options


def shown_default(f: Field) -> str | None:
    """The default of `f` in words, where it is not one plain value: the preset's, the demo's, or what
    None means."""
    how = f.metadata["setting"]
    if f.name in PRESET_OPTIONS:
        base = PRESETS[ModelOptions.model]
        others = [f"{name} {value_text(preset[f.name], how)}" for name, preset in PRESETS.items()
                  if preset[f.name] != base[f.name]]
        return "the preset's: " + ", ".join([value_text(base[f.name], how), *others])
    if f.name in DEMO:
        return f"{f.default}; demo {DEMO[f.name]}"
    if f.default is None:
        return how.unset
    if isinstance(f.default, bool) and f.default:
        return "on"
    return None


def value_text(value: Any, how: Setting) -> str:
    """A preset's value as help shows it: on/off, or what None means."""
    if value is None:
        return how.unset or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def kind_of(hint: Any) -> tuple[type, bool]:
    """(int, float, str, bool or list; whether None is allowed) of a field's type hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = next(arg for arg in args if arg is not type(None))
        return typing.get_origin(base) or base, type(None) in args
    return typing.get_origin(hint) or hint, False


@functools.cache
def field_kinds(config: type) -> dict[str, tuple[type, bool]]:
    """{field name: (kind, whether None is allowed)} of a configuration dataclass."""
    return {name: kind_of(hint) for name, hint in typing.get_type_hints(config).items()}


def check_value(f: Field, kinds: tuple[type, bool], value: Any) -> None:
    """Refuse a value of field `f` that its type, choices or range excludes, in one line naming the option."""
    how = f.metadata["setting"]
    kind, optional = kinds
    if value is None and optional:
        return
    flag = "--" + f.name.replace("_", "-")
    if kind is bool and not isinstance(value, bool):
        raise GpurnnError(f"{flag} must be true or false, not {value!r}")
    if kind is str and how.choices and value not in how.choices:
        raise GpurnnError(f"{flag} must be one of {', '.join(how.choices)}, not {value!r}")
    if kind is int and not (is_int(value) and (how.range or Range()).holds(value)):
        wanted = "a positive integer" if how.range == POSITIVE else "an integer"
        raise GpurnnError(f"{flag} must be {wanted}, not {value!r}")
    if kind is float:
        bound = how.range or Range()
        if not (is_number(value) and math.isfinite(value) and bound.above_low(value)):
            low = "" if bound.low is None else f" {'>' if bound.low_open else '>='} {bound.low:g}"
            raise GpurnnError(f"{flag} must be a finite number{low}, not {value!r}")
        if not bound.below_high(value):
            raise GpurnnError(f"{flag} must be {'below' if bound.high_open else 'at most'} {bound.high:g}, "
                              f"not {value!r}")
