"""Checkpoints as HDF5 files: everything needed to resume training exactly, and nothing executable.

The layout is documented in docs/checkpoint-format.md: /params, /optimizer and /state hold one
dataset per array, /vocab the vocabulary, and a JSON `meta` attribute the model specs, options,
counters and stream state. Each parameter dataset says what its axes mean in attributes, so the file
can be read without gpurnn. The file is written under a temporary name in the same folder and
renamed, so a checkpoint on disk is never half-written. Format 1 files (no layout attributes) load too.
"""

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import h5py
import numpy as np

from ..atomic import atomic_path
from ..errors import CheckpointError

FORMAT = "gpurnn-checkpoint"
FORMAT_VERSION = 2


def check_writable(path):
    """Refuse early a checkpoint path whose folder does not exist (rather than after hours of training)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a folder")


def gpurnn_version():
    try:
        return version("gpurnn")
    except PackageNotFoundError:
        return "unknown"


def save_checkpoint(path, *, params, optimizer_arrays, state, vocab, meta, layouts=None):
    """Write a checkpoint atomically. Arrays are host NumPy arrays; `meta` must be JSON-serialisable;
    `layouts` maps parameter names to the attributes saying what their axes mean (`Model.param_layouts`)."""
    path = Path(path)
    check_writable(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["gpurnn_version"] = gpurnn_version()
        f.attrs["dtype"] = ",".join(sorted({np.asarray(v).dtype.name for v in params.values()}))
        f.attrs["meta"] = json.dumps(meta)
        for group, arrays in (("params", params), ("optimizer", optimizer_arrays), ("state", state)):
            g = f.create_group(group)
            for name, value in arrays.items():
                g.create_dataset(name, data=np.asarray(value))
        write_layouts(f["params"], layouts or {})
        f.create_dataset("vocab", data=np.array(list(vocab), dtype=h5py.string_dtype("utf-8")))


def write_layouts(group, layouts):
    """Each parameter dataset's layout as string attributes (role, axes, gates, layer_type)."""
    for name, attrs in layouts.items():
        for key, value in attrs.items():
            group[name].attrs[key] = value


class Checkpoint:
    """A loaded checkpoint: `params`, `optimizer_arrays`, `state` (host arrays), `vocab`, `meta`."""

    def __init__(self, path, params, optimizer_arrays, state, vocab, meta):
        self.path, self.params, self.optimizer_arrays = path, params, optimizer_arrays
        self.state, self.vocab, self.meta = state, vocab, meta


def load_checkpoint(path):
    """Read a checkpoint written by `save_checkpoint`; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a gpurnn checkpoint")
            version = int(f.attrs.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise CheckpointError(f"{path} has checkpoint format {version}; this gpurnn reads up to "
                                      f"{FORMAT_VERSION}: upgrade gpurnn")
            meta = json.loads(f.attrs["meta"])
            groups = [{k: v[()] for k, v in f[g].items()} for g in ("params", "optimizer", "state")]
            vocab = [s.decode("utf-8") if isinstance(s, bytes) else s for s in f["vocab"][()]]
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable gpurnn checkpoint ({exc})") from exc
    return Checkpoint(path, *groups, vocab, meta)


def restore_params(params, checkpoint, backend):
    """Copy a checkpoint's parameters into `params` ({name: array}) in place, checking names and shapes."""
    for name, value in params.items():
        saved = checkpoint.params.get(name)
        if saved is None or saved.shape != value.shape:
            raise CheckpointError(f"{checkpoint.path}: parameter {name!r} is missing or has the wrong shape")
        value[...] = backend.asarray(saved, dtype=value.dtype)
