"""The hooks a gpurnn plugin may implement (pluggy project name: ``gpurnn``).

A plugin is a module with functions decorated by `hookimpl`. It becomes known to gpurnn through the
``gpurnn`` entry-point group of its distribution, through ``--plugin MODULE`` on the command line, or
through ``GPURNN_PLUGINS=module1,module2``. The built-in layers are plugins of exactly this kind.
"""

import pluggy

PROJECT = "gpurnn"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gpurnn_layer_types():
    """Return a dict mapping layer type names to layer classes.

    A layer class is built as ``cls(ctx, **options)`` where ``ctx`` is a `gpurnn.layers.LayerContext`
    and the options come from the layer spec. Its instances have ``params`` and ``grads`` (dicts with
    the same keys and shapes), ``forward(x)`` and ``backward(dout)``, and ``output_size``; stateful
    layers add ``reset_state()``, ``get_state()`` and ``set_state(state)``. The first line of the class
    docstring is the description ``gpurnn plugins`` shows.
    """
