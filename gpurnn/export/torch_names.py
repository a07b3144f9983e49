"""A gpurnn model under the names of PyTorch's word_language_model ``RNNModel``, and back.

PyTorch's example (github.com/pytorch/examples, word_language_model/model.py) is
``RNNModel(rnn_type, ntoken, ninp, nhid, nlayers, dropout, tie_weights)``: ``encoder`` an
``nn.Embedding(ntoken, ninp)``, ``rnn`` one ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` of ``nlayers`` layers,
``decoder`` an ``nn.Linear(nhid, ntoken)`` whose weight is the encoder's when tied, and dropout
after the embedding, between the recurrent layers and before the decoder: gpurnn's
`gpurnn.model.recurrent_lm`. Its state dict, which `torch_tensors` gives:

    encoder.weight (ntoken, ninp)
    rnn.weight_ih_l{k} (G*nhid, in), rnn.weight_hh_l{k} (G*nhid, nhid), rnn.bias_ih_l{k}, rnn.bias_hh_l{k}
    decoder.weight (ntoken, nhid), decoder.bias (ntoken,)

PyTorch keeps weights as (out, in) and applies them as ``x @ W.T``; gpurnn's are (in, out), so each is
transposed. Which recurrent layer type is which ``rnn_type``, and how its biases map, comes from the
type's `gpurnn.export.RecurrentExport` (its plugin's `gpurnn_layer_exports`).
"""

import numpy as np

from ..errors import ExportError
from ..model import Model, recurrent_lm
from .layer import RecurrentExport, host_params

RNN_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
ARGS = {"rnn_type": str, "ntoken": int, "ninp": int, "nhid": int, "nlayers": int, "dropout": (int, float),
        "tie_weights": bool}  # RNNModel's constructor arguments, as the metadata holds them


def recurrent_exports(registry):
    """{rnn_type: (gpurnn layer type, RecurrentExport)} of every exported recurrent layer type."""
    return {entry.export.rnn_type: (name, entry.export) for name, entry in registry.layer_exports.items()
            if isinstance(entry.export, RecurrentExport)}


AFFINES = ("affine", "tied_affine")  # RNNModel's decoder, untied or tied to the encoder


def parts(model):
    """(name, layer, type) of the embedding, of each recurrent layer and of the affine of a model laid
    out as RNNModel is (dropout layers left out), or an ExportError saying it is not. A loss layer that
    applies its own affine (`owns_affine`: W and b, or b and a tie, as affine's) is both the affine
    and the loss."""
    core = [(name, layer, spec["type"]) for name, layer, spec in zip(model.names, model.layers, model.specs)
            if spec["type"] != "dropout"]
    kinds = [kind for _, _, kind in core]
    fused = getattr(model.layers[-1], "owns_affine", False)
    decoder = len(core) - (1 if fused else 2)
    pair = kinds[decoder] in AFFINES and kinds[-1] == "softmax_loss"
    if decoder < 2 or kinds[0] != "embedding" or not (fused or pair):
        raise ExportError(f"the model ({' -> '.join(kinds)}) is not PyTorch's RNNModel, which is an embedding, "
                          f"recurrent layers of one type and size, an affine and softmax_loss, with dropout between")
    return core[0], core[1:decoder], core[decoder]


def rnn_model_args(model, registry):
    """RNNModel's constructor arguments for `model`, or an ExportError saying why it has none."""
    (embedding, table, _), recurrent, (_, affine, _) = parts(model)
    by_type = {name: export for name, export in recurrent_exports(registry).values()}
    for name, _, kind in recurrent:
        if kind not in by_type:
            raise ExportError(f"layer {name!r} (type {kind!r}) has no counterpart in PyTorch's RNNModel, "
                              f"which holds {', '.join(sorted(by_type))}")
    if len({(kind, layer.output_size) for _, layer, kind in recurrent}) > 1:
        raise ExportError(f"PyTorch's RNNModel holds recurrent layers of one type and size; the model has "
                          f"{', '.join(f'{kind} {layer.output_size}' for _, layer, kind in recurrent)}")
    rates = {layer.p for layer, spec in zip(model.layers, model.specs) if spec["type"] == "dropout"}
    if len(rates) > 1:
        raise ExportError(f"PyTorch's RNNModel has one dropout rate; the model has {sorted(rates)}")
    if affine.output_size != model.vocab_size or affine.tie_to not in (None, embedding):
        raise ExportError("PyTorch's RNNModel decodes onto the vocabulary, tied to the embedding if at all")
    _, first, kind = recurrent[0]
    return {"rnn_type": by_type[kind].rnn_type, "ntoken": model.vocab_size, "ninp": table.output_size,
            "nhid": first.output_size, "nlayers": len(recurrent), "dropout": rates.pop() if rates else 0.0,
            "tie_weights": affine.tie_to is not None}


def torch_tensors(model, registry):
    """(RNNModel's state dict as {name: float32 array} in its order, RNNModel's constructor arguments)."""
    args = rnn_model_args(model, registry)
    export = recurrent_exports(registry)[args["rnn_type"]][1]
    (embedding, _, _), recurrent, (affine, _, _) = parts(model)
    table = host_params(model, embedding)["W"]
    tensors = {"encoder.weight": table}
    for k, (name, _, _) in enumerate(recurrent):
        for key, value in export.to_torch(host_params(model, name)).items():
            tensors[f"rnn.{key}_l{k}"] = value
    decoder = host_params(model, affine)
    tensors["decoder.weight"] = table if args["tie_weights"] else decoder["W"].T.copy()
    tensors["decoder.bias"] = decoder["b"]
    return tensors, args


def checked_args(args, registry, where):
    """RNNModel's constructor arguments as read from a file, checked (dropout, which only training
    uses, defaults to 0); an ExportError names what gpurnn cannot build."""
    if not isinstance(args, dict):
        raise ExportError(f"{where}: the RNNModel arguments are not a JSON object")
    args = {"dropout": 0.0, **args}
    for key, kind in ARGS.items():
        if key not in args:
            raise ExportError(f"{where}: the RNNModel arguments have no {key}")
        value = args[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            wanted = {str: "a string", int: "an integer", bool: "true or false"}.get(kind, "a number")
            raise ExportError(f"{where}: RNNModel argument {key} is {value!r}, not {wanted}")
    known = recurrent_exports(registry)
    if args["rnn_type"] not in known:
        raise ExportError(f"{where}: unknown rnn_type {args['rnn_type']!r}; gpurnn has {', '.join(sorted(known))}")
    for key in ("ntoken", "ninp", "nhid", "nlayers"):
        if args[key] < 1:
            raise ExportError(f"{where}: RNNModel argument {key} must be positive, not {args[key]}")
    if not 0 <= args["dropout"] < 1:
        raise ExportError(f"{where}: RNNModel argument dropout must be in [0, 1), not {args['dropout']}")
    if args["tie_weights"] and args["ninp"] != args["nhid"]:
        raise ExportError(f"{where}: tie_weights needs ninp == nhid, not {args['ninp']} and {args['nhid']}")
    return {key: args[key] for key in ARGS}


def expected_shapes(args, gates):
    """{tensor name: shape} of RNNModel's state dict for `args`, with `gates` blocks per recurrent layer."""
    V, D, H = args["ntoken"], args["ninp"], args["nhid"]
    shapes = {"encoder.weight": (V, D)}
    for k in range(args["nlayers"]):
        shapes.update({f"rnn.weight_ih_l{k}": (gates * H, D if k == 0 else H), f"rnn.weight_hh_l{k}": (gates * H, H),
                       f"rnn.bias_ih_l{k}": (gates * H,), f"rnn.bias_hh_l{k}": (gates * H,)})
    shapes.update({"decoder.weight": (V, H), "decoder.bias": (V,)})
    return shapes


def model_from_torch(tensors, args, registry, backend, where):
    """A gpurnn Model (evaluation mode) holding RNNModel's weights `tensors`, built with `args` (as
    `checked_args` returns them).

    Refuses a missing, unexpected, misshapen, non-float or non-finite tensor. When tied, one of
    encoder.weight and decoder.weight may be left out (safetensors' save_model keeps one name of a
    shared tensor), but if both are there they must be equal.
    """
    layer_type, export = recurrent_exports(registry)[args["rnn_type"]]
    specs = recurrent_lm(layer_type, args["ninp"], args["nhid"], args["nlayers"], args["dropout"] or None,
                         args["tie_weights"])
    model = Model(specs, args["ntoken"], backend, registry)
    described = (f"RNNModel({args['rnn_type']}, ntoken={args['ntoken']}, ninp={args['ninp']}, nhid={args['nhid']}, "
                 f"nlayers={args['nlayers']})")
    shapes = expected_shapes(args, len(export.gates.split(",")) if export.gates else 1)
    if args["tie_weights"]:
        shared = tensors.get("encoder.weight", tensors.get("decoder.weight"))
        tensors = {"encoder.weight": shared, "decoder.weight": shared, **tensors}
    for name, shape in shapes.items():
        value = tensors.get(name)
        if value is None:
            raise ExportError(f"{where} has no tensor {name!r}, which {described} has")
        if value.shape != shape:
            raise ExportError(f"{where}: tensor {name!r} has shape {value.shape}; {described} needs {shape}")
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise ExportError(f"{where}: tensor {name!r} is not finite floating point ({value.dtype})")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ExportError(f"{where}: tensor {extra[0]!r} has no place in {described}")
    if args["tie_weights"] and not np.array_equal(tensors["decoder.weight"], tensors["encoder.weight"]):
        raise ExportError(f"{where}: tie_weights is true but decoder.weight differs from encoder.weight")
    load_params(model, {name: value.astype(np.float32) for name, value in tensors.items()}, export)
    return model.eval()


def load_params(model, tensors, export):
    """Copy RNNModel's float32 tensors (checked) into the model's parameters."""
    (embedding, _, _), recurrent, (affine, _, _) = parts(model)
    values = {f"{embedding}.W": tensors["encoder.weight"], f"{affine}.b": tensors["decoder.bias"]}
    if f"{affine}.W" in model.params:
        values[f"{affine}.W"] = tensors["decoder.weight"].T
    for k, (name, _, _) in enumerate(recurrent):
        weights = {key: tensors[f"rnn.{key}_l{k}"] for key in RNN_KEYS}
        values.update({f"{name}.{key}": value for key, value in export.from_torch(weights).items()})
    for name, value in values.items():
        target = model.params[name]
        target[...] = model.backend.asarray(value, dtype=target.dtype)
