"""The hooks a gpurnn plugin may implement (pluggy project name: ``gpurnn``).

A plugin is a module with functions decorated by `hookimpl` (which it imports, with all else it needs
from gpurnn, from `gpurnn.plugin`). It becomes known to gpurnn through the
``gpurnn`` entry-point group of its distribution, through ``--plugin MODULE`` on the command line, or
through ``GPURNN_PLUGINS=module1,module2``. The built-in layers are plugins of exactly this kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .contract import LayerContract

PROJECT = "gpurnn"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gpurnn_layer_types() -> Mapping[str, type[LayerContract]]:
    """Return the layer types this plugin provides, as ``{type name: layer class}``.

    Called once per plugin when a `gpurnn.registry.Registry` is made (every gpurnn command makes
    one). Each class must keep the layer contract, `gpurnn.contract.LayerContract` (and
    `gpurnn.contract.StatefulLayerContract` when it sets ``stateful = True``); `gpurnn.layers.Layer`
    and `gpurnn.layers.RecurrentLayer` are base classes that do.

    :return:
        A mapping of type names (non-empty, no dots; what a layer spec's ``type`` names) to classes.
        A class is built as ``cls(ctx, **options)``, ``ctx`` being a `gpurnn.layers.LayerContext`
        and ``options`` the spec's other keys. The first line of its docstring is the description
        ``gpurnn plugins`` shows.

    A name claimed by two plugins, a hook that raises or returns something else, or a class without
    the contract's methods is a `gpurnn.errors.PluginError` naming the plugin.

    Use in plugins
    ==============

    Any plugin module or installed distribution may implement it::

        from gpurnn.plugin import hookimpl

        @hookimpl
        def gpurnn_layer_types():
            return {"scaled_tanh": ScaledTanh}
    """


@hookspec
def gpurnn_layer_exports() -> Mapping[str, object]:
    """Return how this plugin's layer types are written out for other frameworks, as
    ``{type name: export}``.

    Called when a model is exported (``gpurnn export``), not before. An export is an object with a
    method ``onnx(graph, name, layer, x)``: it adds the layer's inference nodes to ``graph`` (a
    `gpurnn.export.onnx_graph.OnnxGraph`: ``graph.param(name, key)`` is the initializer of one of the
    layer's parameters, ``graph.node(op_type, inputs, **attributes)`` adds a node and returns its
    output's name) and returns the name of the value holding the layer's output, x being the name of
    its input (batch, time, features; token ids for a layer that reads them). `gpurnn.export.LayerExport`
    makes one from such a function; `gpurnn.export.RecurrentExport` is the export of a recurrent layer
    that ONNX's RNN, LSTM or GRU operator computes, and also maps it into PyTorch's RNNModel.

    A layer type no plugin exports is refused by ``gpurnn export`` with one line naming it; a type
    exported by two plugins, or an export without an ``onnx`` method, is a `gpurnn.errors.PluginError`.

    Use in plugins
    ==============

    ::

        from gpurnn.plugin import LayerExport, hookimpl

        def scaled_tanh_onnx(graph, name, layer, x):
            return graph.node("Tanh", [graph.node("Mul", [x, graph.param(name, "scale")])])

        @hookimpl
        def gpurnn_layer_exports():
            return {"scaled_tanh": LayerExport(scaled_tanh_onnx)}
    """
