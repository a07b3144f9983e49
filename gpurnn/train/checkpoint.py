"""Checkpoints as HDF5 files: everything needed to resume training exactly, and nothing executable.

The layout is documented in docs/checkpoint-format.md: /params, /optimizer and /state hold one
dataset per array, /vocab the vocabulary, and a JSON `meta` attribute the model specs, options,
counters and stream state. Each parameter dataset says what its axes mean in attributes, so the file
can be read without gpurnn. The file is built in memory and its bytes written under a temporary name
in the same folder and renamed (`gpurnn.hdf5_files`), so a checkpoint on disk is never half-written and
a full disk is one line, never a crash inside HDF5. Format 1 files (no layout attributes) load too.
`strip_checkpoint` copies one without its optimizer state, for evaluation, generation and shipping.

Integrity: every dataset carries HDF5's Fletcher-32 checksum, the file's own structure is checksummed
(HDF5's 1.10+ format), and a SHA-256 of the `meta` JSON and the vocabulary is stored and checked at
load, so a damaged file is refused rather than silently used. `verify_checkpoint` also refuses
missing metadata and non-finite parameters.
"""

import hashlib
import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import h5py
import numpy as np

from ..atomic import check_not_inputs, check_output_path, os_error_cause
from ..errors import CheckpointError, GpurnnError
from ..hdf5_files import write_hdf5_atomically
from ..lock import PathLock
from ..memory import LOWER_MODEL, out_of_memory

FORMAT = "gpurnn-checkpoint"
FORMAT_VERSION = 2
DIGEST_ATTR = "sha256"  # of the meta JSON and the vocabulary, see `content_digest`
# meta keys every checkpoint written by the trainer has, with their types
REQUIRED_META = {"specs": list, "vocab_size": int, "config": dict, "trainer": dict,
                 "optimizer_scalars": dict, "stream": dict}
REQUIRED_TRAINER = {"iteration": int, "lr": (int, float), "best_valid": (int, float, type(None))}
STRIPPED = "stripped"  # meta key: true in a checkpoint written without its optimizer state


def check_writable(path):
    """Refuse early a checkpoint path that cannot be written, or that holds a file other than a checkpoint."""
    path = Path(path)
    try:
        check_output_path(path, "checkpoint")
    except GpurnnError as exc:
        raise CheckpointError(str(exc)) from None
    if path.exists() and not is_checkpoint(path):
        raise CheckpointError(f"{path} exists and is not a gpurnn checkpoint: not replacing it "
                              f"(remove it or choose another --checkpoint)")


def is_checkpoint(path):
    """Whether `path` is an HDF5 file that says it is a gpurnn checkpoint."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def content_digest(meta_json, vocab):
    """SHA-256 of the meta JSON and the vocabulary (one token per line), as hex."""
    digest = hashlib.sha256(meta_json.encode("utf-8"))
    for token in vocab:
        digest.update(b"\n" + token.encode("utf-8"))
    return digest.hexdigest()


def create_checked_dataset(group, name, value):
    """A dataset holding `value`, with a Fletcher-32 checksum per chunk (a scalar or empty array has none)."""
    value = np.asarray(value)
    group.create_dataset(name, data=value, fletcher32=value.ndim > 0 and value.size > 0)


def gpurnn_version():
    try:
        return version("gpurnn")
    except PackageNotFoundError:
        return "unknown"


def save_checkpoint(path, *, params, optimizer_arrays, state, vocab, meta, layouts=None):
    """Write a checkpoint atomically. Arrays are host NumPy arrays; `meta` must be JSON-serialisable;
    `layouts` maps parameter names to the attributes saying what their axes mean (`Model.param_layouts`).

    A write that fails (a full disk, a read-only folder) raises CheckpointError naming the file and the
    cause, and leaves any previous checkpoint as it was.
    """
    path = Path(path)
    check_writable(path)
    vocab = list(vocab)
    meta_json = json.dumps(meta, allow_nan=False)

    def build(f):
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["gpurnn_version"] = gpurnn_version()
        f.attrs["dtype"] = ",".join(sorted({np.asarray(v).dtype.name for v in params.values()}))
        f.attrs["meta"] = meta_json
        f.attrs[DIGEST_ATTR] = content_digest(meta_json, vocab)
        for group, arrays in (("params", params), ("optimizer", optimizer_arrays), ("state", state)):
            g = f.create_group(group)
            for name, value in arrays.items():
                create_checked_dataset(g, name, value)
        write_layouts(f["params"], layouts or {})
        f.create_dataset("vocab", data=np.array(vocab, dtype=h5py.string_dtype("utf-8")))

    arrays = [np.asarray(v) for group in (params, optimizer_arrays, state) for v in group.values()]
    size = sum(a.nbytes for a in arrays) + len(meta_json) + sum(len(token.encode()) + 16 for token in vocab)
    try:
        with out_of_memory(f"building checkpoint {path} in memory", LOWER_MODEL):
            write_hdf5_atomically(path, build, size)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {os_error_cause(exc)}") from None


def write_layouts(group, layouts):
    """Each parameter dataset's layout as string attributes (role, axes, gates, layer_type)."""
    for name, attrs in layouts.items():
        for key, value in attrs.items():
            group[name].attrs[key] = value


class Checkpoint:
    """A loaded checkpoint: `params`, `optimizer_arrays`, `state` (host arrays), `vocab`, `meta`, and
    `layouts` (each parameter's layout attributes, empty in format 1)."""

    def __init__(self, path, params, optimizer_arrays, state, vocab, meta, layouts):
        self.path, self.params, self.optimizer_arrays = path, params, optimizer_arrays
        self.state, self.vocab, self.meta, self.layouts = state, vocab, meta, layouts


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
            meta_json = f.attrs["meta"]
            groups = [{k: v[()] for k, v in f[g].items()} for g in ("params", "optimizer", "state")]
            layouts = {name: dict(d.attrs) for name, d in f["params"].items()}
            vocab = [s.decode("utf-8") if isinstance(s, bytes) else s for s in f["vocab"][()]]
            verify_digest(f, meta_json, vocab, path)
            meta = upgraded_meta(json.loads(meta_json))
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable gpurnn checkpoint ({os_error_cause(exc)})") from None
    return Checkpoint(path, *groups, vocab, meta, layouts)


def upgraded_meta(meta):
    """`meta` with its specs as this gpurnn names them. A checkpoint written before the `tied_affine`
    layer type holds a tied output layer as `{"type": "affine", "tie_to": ...}`: it is read as a
    `tied_affine` under the name it had, so its parameters keep their names and it loads as it did."""
    from ..model import layer_names

    specs = meta.get("specs") if isinstance(meta, dict) else None
    old = [isinstance(spec, dict) and spec.get("type") == "affine" and spec.get("tie_to") is not None
           for spec in specs or []]
    if not any(old):
        return meta
    try:
        names = layer_names(specs)
    except GpurnnError:  # malformed specs: verify_checkpoint and the model say what is wrong
        return meta
    specs = [{**spec, "type": "tied_affine", "name": name} if was_tied else spec
             for spec, name, was_tied in zip(specs, names, old)]
    return {**meta, "specs": specs}


def strip_checkpoint(path, output):
    """Write the checkpoint at `path` to `output` without its optimizer state (/optimizer empty,
    `optimizer_scalars` {}), marked `stripped`: the model alone, for eval, generate and shipping (Adam's
    moments are twice the weights' size). A stripped checkpoint cannot resume training.

    Refuses to write over `path` itself, or over a checkpoint a running trainer holds (its lock).
    """
    check_not_inputs([("stripped checkpoint", output)], [("checkpoint to strip", path)])
    check_writable(output)
    saved = verify_checkpoint(load_checkpoint(path))
    with PathLock(output):
        save_checkpoint(output, params=saved.params, optimizer_arrays={}, state=saved.state, vocab=saved.vocab,
                        meta={**saved.meta, "optimizer_scalars": {}, STRIPPED: True}, layouts=saved.layouts)


def verify_digest(f, meta_json, vocab, path):
    """Refuse a checkpoint whose meta or vocabulary does not match the digest written with them."""
    if DIGEST_ATTR in f.attrs and f.attrs[DIGEST_ATTR] != content_digest(meta_json, vocab):
        raise CheckpointError(f"{path} is damaged: its metadata or vocabulary does not match its checksum")


def verify_checkpoint(checkpoint):
    """Refuse a checkpoint that lacks metadata the trainer writes, or whose parameters are not finite."""
    path, meta = checkpoint.path, checkpoint.meta
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its meta is not a JSON object")
    for table, required, where in ((meta, REQUIRED_META, "meta"),
                                   (meta.get("trainer"), REQUIRED_TRAINER, "meta.trainer")):
        for key, kind in required.items():
            value = table.get(key)
            if value is None and type(None) not in (kind if isinstance(kind, tuple) else (kind,)):
                raise CheckpointError(f"{path}: {where} has no {key!r}; not a complete gpurnn checkpoint")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CheckpointError(f"{path}: {where}.{key} is {value!r}, not a {_kind_name(kind)}")
    if meta["vocab_size"] != len(checkpoint.vocab):
        raise CheckpointError(f"{path}: meta.vocab_size {meta['vocab_size']} does not match its vocabulary "
                              f"({len(checkpoint.vocab)} tokens)")
    lr = meta["trainer"]["lr"]
    if not math.isfinite(lr) or lr <= 0:
        raise CheckpointError(f"{path}: its learning rate {lr!r} is not a finite positive number")
    for group in ("params", "optimizer_arrays", "state"):
        for name, value in getattr(checkpoint, group).items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise CheckpointError(f"{path}: {group} {name!r} holds NaN or infinite values; "
                                      f"the checkpoint cannot be used")
    return checkpoint


def _kind_name(kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {list: "list", dict: "table", int: "integer", float: "number", type(None): "null"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def restore_params(params, checkpoint, backend):
    """Copy a checkpoint's parameters into `params` ({name: array}) in place, checking names and shapes."""
    for name, value in params.items():
        saved = checkpoint.params.get(name)
        if saved is None or saved.shape != value.shape:
            raise CheckpointError(f"{checkpoint.path}: parameter {name!r} is missing or has the wrong shape")
        value[...] = backend.asarray(saved, dtype=value.dtype)
