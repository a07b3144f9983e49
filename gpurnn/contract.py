"""The layer contract, written once: what gpurnn asks of every layer, built-in or a plugin's.

The hook spec (`gpurnn.hookspecs`) says a plugin returns classes keeping this contract, the registry
(`gpurnn.registry`) refuses classes and built layers that break its structural part, and the
conformance kit (`gpurnn.testing`) checks its numerical part. `gpurnn.layers.Layer` is a base class
that keeps it (and `RecurrentLayer` the stateful part); a plugin may use them or not.

Arrays are NumPy or CuPy arrays of the backend's float dtype, time layers take and return (B, T, ...):

    layer = cls(ctx, **options)      # ctx: gpurnn.layers.LayerContext; options: the spec's other keys
    layer.adopt_buffers(p, g)        # the model moves params and grads into its flat buffers
    y = layer.forward(x)             # x (B, T, D) floats, or (B, T) int token ids if takes_ids
    dx = layer.backward(dy)          # writes every grads[k]; returns d loss / d x (None if takes_ids)
    loss = layer.forward(x, t)       # loss layers (is_loss): a 0-d array; backward(dout=1.0)
    log_p = layer.log_prob(x)        # loss layers: normalised log-probabilities (B, T, V), for sampling

A loss layer reads logits (B, T, V) unless it sets `input_size` (then it reads features of that
size, as the adaptive softmax does); one that holds other than V scores per position at once says
how many in `logits_per_row` (evaluation sizes its blocks by it); one whose cutoffs assume a
vocabulary sorted most frequent first sets `needs_frequency_order` (training checks the corpus);
one that applies its own affine to features (W and b, or b and a `tie_to`, as `affine` keeps them)
sets `owns_affine`, so the exports take it for affine + softmax_loss.

The parts a plain call cannot show, which the kit checks for every layer:
- `forward` and `backward` leave their arguments unmodified (a model passes one layer's output on
  to the next and keeps it for backward), and accept non-contiguous arrays;
- `backward` follows the `forward` just before it and returns gradients matching central
  differences; float32 gives float64's numbers within the kit's stated tolerance;
- a stateful layer's forward starts from the state the previous forward left (truncated BPTT:
  its backward treats that state as a constant), and `reset_state()` makes it start from zeros.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

Array = Any  # a numpy.ndarray or cupy.ndarray


@dataclass(frozen=True)
class ParamLayout:
    """What a parameter's array means, for readers of checkpoints (stored as HDF5 attributes).

    role: how the layer uses it, as a formula (``"x @ Wx"``); axes: what each axis holds
    (``"input, 4*hidden"``); gates: the order of the gate blocks along the last axis, when it has them.
    """

    role: str
    axes: str
    gates: str = ""

    def attrs(self):
        return {k: v for k, v in asdict(self).items() if v}


@runtime_checkable
class LayerContract(Protocol):
    """A layer: parameters with same-shaped gradients, forward and backward.

    params / grads: ``{name: array}`` with the same keys and shapes; `backward` writes the gradients
    in place (the optimizer reads them there). output_size: the feature size of forward's output
    (not needed by loss layers). training: set by the model (`Model.train()` / `Model.eval()`).
    The class attributes are optional; a layer without them gets the defaults shown.
    """

    params: dict[str, Array]
    grads: dict[str, Array]
    output_size: int
    training: bool
    is_loss: ClassVar[bool] = False  # forward(x, t) -> scalar loss; the model's last layer
    takes_ids: ClassVar[bool] = False  # forward reads int token ids (B, T); the model's first layer
    stateful: ClassVar[bool] = False  # keeps the StatefulLayerContract below
    tie_to: str | None = None  # the name of a layer whose weight this one shares: then tie(source)
    # and add_tied_grads() are called by the model (see gpurnn.layers.Layer)
    param_layout: ClassVar[dict[str, ParamLayout]] = {}  # per parameter, for checkpoint readers
    sparse_rows: dict[str, Array] | None = None  # a dict while the model allows row-sparse gradients:
    # {name: rows written by the last backward}, the gradient zero elsewhere (see gpurnn.layers.Layer)

    def forward(self, x: Array) -> Array:
        """The output for input x; keeps what backward needs."""

    def backward(self, dout: Array) -> Array | None:
        """Write every parameter's gradient into grads; return the input's gradient."""

    def adopt_buffers(self, param_block: Array, grad_block: Array) -> None:
        """Move the parameters (values copied) and gradients into these 1-D blocks of the model's flat
        buffers, in `params` order; `params` and `grads` then hold views into them. Read parameters
        from `params` when used, never from references kept at construction."""


@runtime_checkable
class StatefulLayerContract(LayerContract, Protocol):
    """A layer that carries state from one forward to the next (``stateful = True``)."""

    def reset_state(self) -> None:
        """Forget the carried state: the next forward starts from zeros."""

    def get_state(self) -> dict[str, Array]:
        """The carried state, ``{key: array}`` (saved in checkpoints; keys such as ``h``, ``c``)."""

    def set_state(self, state: dict[str, Array]) -> None:
        """Carry `state` (from `get_state`) into the next forward."""


def contract_methods(protocol):
    """The method names a protocol above declares (for structural checks)."""
    return tuple(name for name, value in vars(protocol).items()
                 if callable(value) and not name.startswith("_"))


LAYER_METHODS = contract_methods(LayerContract)  # ("forward", "backward", "adopt_buffers")
STATEFUL_METHODS = contract_methods(StatefulLayerContract)  # ("reset_state", "get_state", "set_state")
GENERIC_LAYOUT = ParamLayout(role="parameter of a plugin layer that declares no layout", axes="")
