"""What ``gpurnn export`` and ``gpurnn import-torch`` do, from paths to written files.

`export_checkpoint` writes a checkpoint's model as an ONNX graph (`onnx_graph`) or as PyTorch's
RNNModel weights in a safetensors file (`torch_names`, `safetensors_file`); `import_torch` makes a
gpurnn checkpoint from such a file, for ``gpurnn eval`` and ``gpurnn generate``. Both check their
outputs before any work (none may be an input; each must be writable) and write atomically. The
models are built on NumPy whatever the backend: exporting is a copy of the weights.
"""

import json
from dataclasses import asdict
from pathlib import Path

import h5py

from ..atomic import check_not_inputs, check_output_path, os_error_cause, write_bytes_atomically
from ..backend import get_backend
from ..config import TrainConfig
from ..data import Vocab, open_corpus
from ..errors import DataError, ExportError
from ..lock import PathLock
from ..train.checkpoint import STRIPPED, check_writable, load_checkpoint, save_checkpoint
from ..train.job import model_from_checkpoint
from .safetensors_file import read_safetensors, write_safetensors
from .torch_names import checked_args, model_from_torch, torch_tensors

FORMATS = {".onnx": "onnx", ".safetensors": "torch"}  # the format an OUTPUT suffix implies
WRITTEN = {"onnx": "ONNX file", "torch": "safetensors file"}
RNN_MODEL, VOCAB, LEVEL = "rnn_model", "vocab", "level"  # the safetensors metadata keys gpurnn writes


def export_format(output, fmt=None):
    """`fmt`, or the format OUTPUT's suffix implies (.onnx: onnx; .safetensors: torch)."""
    if fmt is None:
        fmt = FORMATS.get(Path(output).suffix.lower())
        if fmt is None:
            raise ExportError(f"cannot tell the format from {output}'s suffix: name it .onnx or .safetensors, "
                              f"or give --format onnx or --format torch")
    return fmt


def export_checkpoint(checkpoint, output, registry, fmt=None):
    """Write CHECKPOINT's model to OUTPUT as `fmt` ("onnx" or "torch"); returns what was written, in words."""
    check_not_inputs([("export", output)], [("checkpoint", checkpoint)])
    fmt = export_format(output, fmt)
    check_output_path(output, WRITTEN[fmt])
    saved = load_checkpoint(checkpoint)
    model = model_from_checkpoint(saved, get_backend("numpy"), registry)
    level = saved.meta.get("level", "word")
    if fmt == "onnx":
        from .onnx_graph import OPSET, onnx_model

        proto = onnx_model(model, registry, saved.vocab, level)
        write_output(output, lambda: write_bytes_atomically(output, proto.SerializeToString()))
        names = lambda values: ", ".join(value.name for value in values)  # noqa: E731
        return (f"ONNX opset {OPSET}; inputs {names(proto.graph.input)}; outputs {names(proto.graph.output)}")
    tensors, args = torch_tensors(model, registry)
    metadata = {"format": "pt", RNN_MODEL: json.dumps(args), VOCAB: json.dumps(saved.vocab, ensure_ascii=False),
                LEVEL: level}
    write_output(output, lambda: write_safetensors(output, tensors, metadata))
    return f"PyTorch RNNModel({rnn_model_text(args)}): {len(tensors)} tensors"


def rnn_model_text(args):
    return ", ".join(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in args.items())


def write_output(output, write):
    """Run `write()`; an OS error becomes one line naming the file."""
    try:
        write()
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {os_error_cause(exc)}") from None


def import_torch(state, output, registry, vocab=None):
    """Write a gpurnn checkpoint at OUTPUT holding the RNNModel weights of the safetensors file STATE.

    The vocabulary is `vocab` (a gpurnn corpus file, or a text file of one token per line in id
    order) or else the file's ``vocab`` metadata. The checkpoint is a stripped one (no optimizer state:
    eval and generate take it, training cannot resume from it) recording ``imported_from``. Returns
    what was written, in words.
    """
    check_not_inputs([("checkpoint", output)], [("safetensors file", state), ("vocabulary", vocab)])
    check_writable(output)
    tensors, metadata = read_safetensors(state)
    if RNN_MODEL not in metadata:
        raise ExportError(f"{state} has no {RNN_MODEL!r} metadata (RNNModel's constructor arguments as JSON); "
                          f"see 'PyTorch' in gpurnn's docs/export.md for how to write it")
    args = checked_args(json_metadata(metadata, RNN_MODEL, state), registry, state)
    tokens, level = vocabulary(vocab, metadata, state)
    if args["ntoken"] != len(tokens):
        raise ExportError(f"the vocabulary has {len(tokens):,} tokens, but {state} says ntoken={args['ntoken']:,}")
    model = model_from_torch(tensors, args, registry, get_backend("numpy"), state)
    config = asdict(TrainConfig())
    meta = {"specs": model.specs, "layer_types": model.layer_sources, "vocab_size": model.vocab_size,
            "level": level, "model_name": f"RNNModel({args['rnn_type']})", "imported_from": str(state),
            "config": config, "trainer": {"iteration": 0, "lr": config["lr"], "best_valid": None},
            "optimizer_scalars": {}, "stream": {}, STRIPPED: True}
    params = {name: model.backend.to_host(value) for name, value in model.params.items()}
    with PathLock(output):
        save_checkpoint(output, params=params, optimizer_arrays={}, state={}, vocab=tokens, meta=meta,
                        layouts=model.param_layouts())
    return f"{args['rnn_type']} model of {model.parameter_count():,} parameters, vocabulary of {len(tokens):,} tokens"


def json_metadata(metadata, key, path):
    """The JSON value of metadata entry `key`, or one line saying it is not JSON."""
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: metadata {key!r} is not JSON ({exc})") from None


def vocabulary(vocab, metadata, state):
    """(tokens, level) from --vocab (a corpus .h5 or a text file of one token per line) or the file's metadata."""
    level = metadata.get(LEVEL, "word")
    if vocab is None:
        if VOCAB not in metadata:
            raise ExportError(f"{state} has no {VOCAB!r} metadata: give --vocab CORPUS.h5 or a text file of "
                              f"one token per line")
        tokens, source = json_metadata(metadata, VOCAB, state), f"{state}'s {VOCAB} metadata"
    elif h5py.is_hdf5(vocab):
        with open_corpus(vocab) as corpus:
            tokens, level, source = list(corpus.vocab), corpus.level, str(vocab)
    else:
        tokens, source = read_token_lines(vocab), str(vocab)
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise ExportError(f"{source} is not a list of tokens")
    try:
        Vocab(tokens)
    except DataError as exc:
        raise ExportError(f"{source}: {exc}") from None
    return tokens, level


def read_token_lines(path):
    """The tokens of a UTF-8 text file holding one per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot read the vocabulary {path}: {os_error_cause(exc)}") from None
    except UnicodeDecodeError:
        raise ExportError(f"the vocabulary {path} is not UTF-8 text") from None
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
