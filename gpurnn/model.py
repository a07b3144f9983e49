"""A language model assembled from layer specs, and the specs of the named presets.

A model is a list of layer specs whose last entry is a loss layer, e.g. the textbook's SimpleRnnlm:
embedding -> rnn -> affine -> softmax_loss (the presets run its last two as one fused layer,
affine_softmax_loss: the same numbers without the N x V logits). Parameters and gradients are exposed
by readable names (``rnn.Wh``); stateful layers carry their state between calls until `reset_state()`,
each its own (a stack of recurrent layers carries one state per layer). A layer with ``tie_to`` shares
the named layer's weight, which stays one parameter of that layer (see `Model.backward`).

All parameters live in one flat contiguous buffer (`flat_params`) and all gradients in another
(`flat_grads`); each layer's `params` and `grads` are views into them. So the clip norm is one
reduction, an optimizer step one pass over one array, and a data-parallel all-reduce one call. On
the CPU the trainer also lets the embedding keep its gradient row-sparse (`use_sparse_rows`), so the
SGD step reads only the rows of the table that the block used.
"""

import copy

import numpy as np

from .config import OUTPUT_LAYERS, PRESET_OPTIONS, PRESETS
from .contract import GENERIC_LAYOUT
from .data.stream import IGNORE
from .errors import SpecError
from .layers import LayerContext, layer_repr
from .memory import LOWER_MODEL, out_of_memory
from .registry import check_spec


def recurrent_lm(cell, wordvec_size, hidden_size, num_layers=1, dropout=None, tie_weights=False,
                 output_layer="full", cutoffs=None, div_value=None):
    """embedding -> `num_layers` recurrent layers of type `cell` -> the output layer.

    With a dropout rate (None: no dropout layers), a dropout layer goes before, between and after the
    recurrent layers (Zaremba et al.); with tie_weights the output affine shares the embedding's table,
    so wordvec_size must equal hidden_size. output_layer "full" is affine + softmax loss as one fused
    layer (`affine_softmax_loss`: the pair's numbers, no N x V logits); "adaptive" is the adaptive
    softmax with `cutoffs` (and `div_value`, default 4), which cannot be tied.
    """
    drop = [] if dropout is None else [{"type": "dropout", "p": dropout}]
    specs = [{"type": "embedding", "size": wordvec_size}, *drop]
    for _ in range(num_layers):
        specs += [{"type": cell, "hidden_size": hidden_size}, *drop]
    return specs + output_specs(output_layer, tie_weights, cutoffs, div_value)


def output_specs(output_layer, tie_weights, cutoffs, div_value):
    """The specs of a preset's output layer: the fused affine + softmax loss, or the adaptive softmax."""
    if output_layer not in OUTPUT_LAYERS:
        raise SpecError(f"unknown output layer {output_layer!r}; choose {' or '.join(OUTPUT_LAYERS)}")
    if output_layer == "full":
        if cutoffs is not None or div_value is not None:
            raise SpecError("cutoffs and div_value apply only to the adaptive output layer (--output-layer adaptive)")
        return [{"type": "affine_softmax_loss", **({"tie_to": "embedding"} if tie_weights else {})}]
    if tie_weights:
        raise SpecError("tied weights are not supported with the adaptive output layer (it has no (V, D) "
                        "table to share with the embedding): use --no-tie-weights")
    if cutoffs is None:
        raise SpecError("the adaptive output layer needs cutoffs, such as --cutoffs 2000,6000")
    options = {"div_value": div_value} if div_value is not None else {}
    return [{"type": "adaptive_softmax_loss", "cutoffs": list(cutoffs), **options}]


PAIR_OPTIONS = {"affine": {"type", "init"}, "tied_affine": {"type", "tie_to"}}


def fused_output(specs):
    """`specs` with a closing affine (or tied_affine) + softmax_loss written as the one fused layer that
    computes the same numbers from the same parameters, `affine_softmax_loss`: for telling whether two
    lists describe one model, such as a preset's and that of a checkpoint written while the presets
    ended in the pair. Any other list (a named layer, an output size) comes back as it is."""
    specs = list(specs)
    if len(specs) < 2 or not all(isinstance(spec, dict) for spec in specs[-2:]):
        return specs
    affine, loss = specs[-2:]
    kind = affine.get("type")
    if (kind not in PAIR_OPTIONS or set(affine) - PAIR_OPTIONS[kind] or loss.get("type") != "softmax_loss"
            or set(loss) - {"type", "ignore_index"}):
        return specs
    tie = {"tie_to": affine.get("tie_to", "embedding")} if kind == "tied_affine" else {}
    options = {key: value for key, value in {**affine, **loss}.items() if key != "type"}
    return specs[:-2] + [{"type": "affine_softmax_loss", **options, **tie}]


def preset_specs(name, **options):
    """The layer specs of preset `name` (a row of `gpurnn.config.PRESETS`), with its options changed
    (wordvec_size, hidden_size, num_layers, dropout, tie_weights, and the output layer's: output_layer,
    cutoffs, div_value)."""
    if name not in PRESETS:
        raise SpecError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    for key in options:
        if key not in PRESET_OPTIONS:
            raise SpecError(f"model preset {name!r}: got an unexpected keyword argument {key!r}")
    return recurrent_lm(**{**PRESETS[name], **options})


def layer_names(specs):
    """A readable unique name per layer: its spec's `name`, or its type, numbered when repeated."""
    for spec in specs:
        check_spec(spec)
    types = [spec["type"] for spec in specs]
    names, seen = [], {}
    for spec, layer_type in zip(specs, types):
        if "name" in spec:
            name = spec["name"]
        elif types.count(layer_type) > 1:
            seen[layer_type] = seen.get(layer_type, 0) + 1
            name = f"{layer_type}{seen[layer_type]}"
        else:
            name = layer_type
        if name in names or "." in name:
            raise SpecError(f"layer name {name!r} is repeated or contains a dot")
        names.append(name)
    return names


class Model:
    """Layers built from specs; forward(xs, ts) -> loss, backward(), log_prob(xs) -> log-probabilities.

    first_lane: in a data-parallel job, which lane of the whole batch this process's first row is,
    so its dropout masks are those lanes' part of the whole batch's masks.
    """

    def __init__(self, specs, vocab_size, backend, registry, seed=0, first_lane=0):
        if not specs:
            raise SpecError("a model needs at least one layer and a loss layer")
        self.specs = copy.deepcopy(list(specs))
        self.vocab_size = int(vocab_size)
        self.backend = backend
        self.names = layer_names(self.specs)
        self.layer_sources = {spec["type"]: registry.get(spec["type"]).provenance() for spec in self.specs}
        self.seed = int(seed)
        rng = backend.host_rng(seed)
        self.step_counter = backend.xp.zeros(1, np.uint32)  # the training iteration, for dropout masks
        self.layers = []
        size = None
        for index, (name, spec) in enumerate(zip(self.names, self.specs)):
            ctx = LayerContext(backend, rng, size, self.vocab_size, seed=self.seed, step=self.step_counter,
                               index=index, first_lane=first_lane)
            with out_of_memory(f"building the model's layer {name!r}", LOWER_MODEL):
                layer = registry.build_layer(spec, ctx)
            self.layers.append(layer)
            size = getattr(layer, "output_size", size)
        if not self.layers[-1].is_loss:
            raise SpecError(f"the last layer must be a loss layer (such as softmax_loss), "
                            f"not {self.specs[-1]['type']!r}")
        for spec, layer in zip(self.specs[:-1], self.layers[:-1]):
            if layer.is_loss:
                raise SpecError(f"loss layer {spec['type']!r} may only come last")
        if not self.layers[0].takes_ids:
            raise SpecError(f"the first layer must read token ids (such as embedding), "
                            f"not {self.specs[0]['type']!r}")
        self.tied = self._tie_layers()
        with out_of_memory("for the model's parameters and gradients", LOWER_MODEL):
            self.flat_params, self.flat_grads = self._flatten()

    def _flatten(self):
        """Move every layer's parameters and gradients into two flat buffers, layer by layer."""
        xp, dtype = self.backend.xp, self.backend.dtype
        sizes = [sum(p.size for p in layer.params.values()) for layer in self.layers]
        flat_params, flat_grads = xp.empty(sum(sizes), dtype), xp.zeros(sum(sizes), dtype)
        offset = 0
        for layer, size in zip(self.layers, sizes):
            layer.adopt_buffers(flat_params[offset:offset + size], flat_grads[offset:offset + size])
            offset += size
        return flat_params, flat_grads

    def use_sparse_rows(self, on=True):
        """Let layers that can (the embedding) keep row-sparse gradients (see `gpurnn.layers.Layer`),
        or make every gradient dense again. Only while nothing but the layer itself writes its
        gradients: a weight another layer is tied to is left dense (the tied use adds a dense
        gradient), and so is every layer when gradients are summed over ranks (their rows differ)."""
        shared = {layer.tie_to for layer in self.tied}
        for name, layer in zip(self.names, self.layers):
            if hasattr(layer, "sparse_rows") and name not in shared:
                layer.sparse_rows = {} if on else None

    def sparse_segments(self):
        """(start, stop, row_size, rows) in the flat buffers for each gradient that the last backward
        left zero outside `rows`; empty while row-sparse gradients are off."""
        segments, offset = [], 0
        for layer in self.layers:
            rows = getattr(layer, "sparse_rows", None) or {}
            for name, p in layer.params.items():
                if name in rows:
                    segments.append((offset, offset + p.size, p.size // p.shape[0], rows[name]))
                offset += p.size
        return segments

    def views(self, flat):
        """{"layer.param": view} of a flat array laid out like `flat_params` (e.g. Adam's moments)."""
        views, offset = {}, 0
        for name, p in self.params.items():
            views[name] = flat[offset:offset + p.size].reshape(p.shape)
            offset += p.size
        return views

    def set_step(self, iteration):
        """Tell the layers which training iteration runs next (dropout masks depend on it)."""
        self.step_counter[...] = iteration

    def _tie_layers(self):
        """Wire each layer with a `tie_to` to the layer it names; return the tied layers."""
        by_name = dict(zip(self.names, self.layers))
        tied = []
        for name, layer in zip(self.names, self.layers):
            target = getattr(layer, "tie_to", None)
            if target is None:
                continue
            if target not in by_name or target == name:
                raise SpecError(f"layer {name!r}: tie_to={target!r} names no other layer "
                                f"(layers: {', '.join(self.names)})")
            layer.tie(by_name[target])
            tied.append(layer)
        return tied

    @property
    def params(self):
        """{"layer.param": array} over all layers, in layer order (arrays are shared, not copies)."""
        return {f"{n}.{k}": v for n, layer in zip(self.names, self.layers) for k, v in layer.params.items()}

    @property
    def grads(self):
        """{"layer.param": gradient}, the same keys as `params`."""
        return {f"{n}.{k}": v for n, layer in zip(self.names, self.layers) for k, v in layer.grads.items()}

    def param_layouts(self):
        """{"layer.param": HDF5 attributes} saying what each parameter's axes mean, from the layer
        classes' `param_layout` (a generic one where a plugin declares none)."""
        layouts = {}
        for name, layer in zip(self.names, self.layers):
            declared = getattr(layer, "param_layout", {})
            for key in layer.params:
                attrs = declared.get(key, GENERIC_LAYOUT).attrs()
                layouts[f"{name}.{key}"] = {"layer_type": getattr(layer, "layer_type", None) or "", **attrs}
        return layouts

    @property
    def logits_per_row(self):
        """The most scores the loss layer holds at once per position: V, unless it says otherwise."""
        return getattr(self.layers[-1], "logits_per_row", self.vocab_size)

    def parameter_count(self):
        """Scalars in all parameters (a tied weight counts once: it is one parameter)."""
        return sum(int(v.size) for v in self.params.values())

    def __repr__(self):
        lines = [f"Model({len(self.layers)} layers, {self.parameter_count():,} parameters, vocabulary "
                 f"{self.vocab_size:,}, {self.backend.dtype.name} on {self.backend.name})"]
        width = max(len(n) for n in self.names)
        for name, layer in zip(self.names, self.layers):
            count = sum(int(v.size) for v in layer.params.values())
            lines.append(f"  {name:<{width}}  {layer_repr(layer)}" + (f"  {count:,}" if count else ""))
        return "\n".join(lines)

    def predict(self, xs):
        """What the loss layer reads for token ids xs (B, T): logits (B, T, V) for `softmax_loss`, the
        last features (B, T, D) for `affine_softmax_loss` (the presets') and `adaptive_softmax_loss`;
        carries the recurrent state like forward."""
        x = xs
        for layer in self.layers[:-1]:
            x = layer.forward(x)
        return x

    def log_prob(self, xs):
        """Normalised log-probabilities (B, T, V) of the next token at every position, from the loss
        layer's `log_prob` (for sampling); carries the recurrent state like forward."""
        loss = self.layers[-1]
        if not callable(getattr(loss, "log_prob", None)):
            raise SpecError(f"loss layer {self.specs[-1]['type']!r} has no log_prob(x): it gives no "
                            f"distribution to sample from")
        return loss.log_prob(self.predict(xs))

    @property
    def ignore_index(self):
        """The target the loss layer skips (padding): its `ignore_index`, IGNORE where it names none."""
        return getattr(self.layers[-1], "ignore_index", IGNORE)

    def target_log_prob(self, xs, ts):
        """log P(ts[b, t] | xs[b, :t + 1]) per position (B, T), 0 where ts holds the loss layer's ignore
        index; carries the recurrent state like forward. From the loss layer's `target_log_prob` where
        it has one (no B x T x V array), else picked out of its `log_prob`."""
        loss = self.layers[-1]
        if callable(getattr(loss, "target_log_prob", None)):
            return loss.target_log_prob(self.predict(xs), ts)
        xp = self.backend.xp
        ignored = ts == self.ignore_index
        picked = xp.take_along_axis(self.log_prob(xs), xp.where(ignored, 0, ts)[..., None], axis=-1)[..., 0]
        return xp.where(ignored, 0, picked)

    def forward(self, xs, ts):
        """Mean loss over the block (a 0-d device array)."""
        return self.layers[-1].forward(self.predict(xs), ts)

    def backward(self, dout=1.0):
        """Gradients of the last forward's loss into `grads`; a tied weight's is the sum of its uses."""
        d = dout
        for layer in reversed(self.layers):
            d = layer.backward(d)
        for layer in self.tied:
            layer.add_tied_grads()
        return d

    def stateful_layers(self):
        return [(n, layer) for n, layer in zip(self.names, self.layers) if layer.stateful]

    def reset_state(self):
        for _, layer in self.stateful_layers():
            layer.reset_state()

    def get_state(self):
        """{"layer.key": array} of every carried state (for checkpoints)."""
        return {f"{n}.{k}": v for n, layer in self.stateful_layers() for k, v in layer.get_state().items()}

    def set_state(self, state):
        for n, layer in self.stateful_layers():
            prefix = n + "."
            layer.set_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def train(self, mode=True):
        """Switch layers such as dropout between training (True) and evaluation (False)."""
        for layer in self.layers:
            layer.training = mode
        return self

    def eval(self):
        return self.train(False)
