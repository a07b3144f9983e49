"""The plugin manager and the layer registry: where layer types come from and how specs become layers.

Plugins are found in three places, all through the same pluggy hooks: the ``gpurnn`` entry-point group
(the built-in layers are registered there too), module names or ``.py`` paths given with ``--plugin``,
and ``$GPURNN_PLUGINS`` (comma-separated). Any failure names the plugin; nothing is skipped silently.
"""

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pluggy

from . import hookspecs
from .contract import LAYER_METHODS, STATEFUL_METHODS
from .errors import PluginError, SpecError
from .layers import Layer, LayerContext

ENTRY_POINT_GROUP = "gpurnn"


@dataclass(frozen=True)
class LayerType:
    """A registered layer type: its name, class, the plugin that provides it, and the installed
    distribution (with its version) that plugin came from; None for plugins loaded by name or path."""

    name: str
    cls: type
    plugin: str
    distribution: str | None = None
    version: str | None = None

    @property
    def description(self):
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""

    def provenance(self):
        """Where this type came from, as checkpoints record it: {"plugin", "distribution", "version"}."""
        return {"plugin": self.plugin, "distribution": self.distribution, "version": self.version}


@dataclass(frozen=True)
class ExportEntry:
    """A layer type's export (see `hookspecs.gpurnn_layer_exports`) and the plugin that provides it."""

    export: object
    plugin: str


def plugin_modules_from_env():
    """Module names or paths listed in $GPURNN_PLUGINS."""
    return [name.strip() for name in os.environ.get("GPURNN_PLUGINS", "").split(",") if name.strip()]


def import_plugin_module(name):
    """Import a plugin given as a module name (``my_layers``) or a file path (``./my_layers.py``)."""
    try:
        if name.endswith(".py") or os.sep in name:
            path = Path(name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            spec = importlib.util.spec_from_file_location(f"gpurnn_user_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(name)
    except Exception as exc:
        raise PluginError(f"plugin {name!r} failed to import: {type(exc).__name__}: {exc}") from exc


class Registry:
    """All layer types from all plugins, and `build_layer` to make a layer from a spec."""

    def __init__(self, plugins=(), entry_points=True, env=True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.distributions = {}  # plugin name -> (distribution, version), for installed plugins
        if entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    module = ep.load()
                except Exception as exc:
                    raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: "
                                      f"{type(exc).__name__}: {exc}") from exc
                self._register(module, ep.value)
                if ep.dist is not None:
                    self.distributions[ep.value] = (ep.dist.name, ep.dist.version)
        names = list(plugins) + (plugin_modules_from_env() if env else [])
        for name in names:
            self._register(import_plugin_module(name), name)
        self.layer_types = self._collect_layer_types()

    def _register(self, module, name):
        if self.pm.is_registered(module):
            return  # the same module named twice (say, installed and also given with --plugin)
        try:
            self.pm.register(module, name=name)
        except Exception as exc:
            raise PluginError(f"plugin {name!r} could not be registered: {exc}") from exc

    def _hook_results(self, hook, what):
        """(plugin name, {type name: value}) from every plugin implementing `hook`, checked to be a dict
        of `what` ("layer class")."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin = impl.plugin_name
            try:
                provided = impl.function()
            except Exception as exc:
                raise PluginError(f"plugin {plugin!r} raised in {hook}: {type(exc).__name__}: {exc}") from exc
            if not isinstance(provided, dict):
                raise PluginError(f"plugin {plugin!r}: {hook} must return a dict of "
                                  f"name -> {what}, got {type(provided).__name__}")
            yield plugin, provided

    def _collect_layer_types(self):
        found = {}
        for plugin, provided in self._hook_results("gpurnn_layer_types", "layer class"):
            for name, cls in provided.items():
                check_layer_class(name, cls, plugin)
                if name in found:
                    raise PluginError(f"layer type {name!r} is provided by two plugins: "
                                      f"{found[name].plugin!r} and {plugin!r}")
                found[name] = LayerType(name, cls, plugin, *self.distributions.get(plugin, (None, None)))
        return dict(sorted(found.items()))

    @cached_property
    def layer_exports(self):
        """{type name: ExportEntry} from every plugin's `gpurnn_layer_exports` hook, collected on first
        use (only exporting needs them, so a broken export never stops other commands)."""
        found = {}
        for plugin, provided in self._hook_results("gpurnn_layer_exports", "export"):
            for name, export in provided.items():
                if not callable(getattr(export, "onnx", None)):
                    raise PluginError(f"plugin {plugin!r}: the export of layer type {name!r} has no onnx() method")
                if name in found:
                    raise PluginError(f"layer type {name!r} is exported by two plugins: "
                                      f"{found[name].plugin!r} and {plugin!r}")
                found[name] = ExportEntry(export, plugin)
        return found

    def get(self, name):
        """The LayerType called `name`, or a SpecError listing the known ones."""
        if name not in self.layer_types:
            known = ", ".join(self.layer_types) or "none"
            raise SpecError(f"unknown layer type {name!r}; known types: {known}")
        return self.layer_types[name]

    def require(self, provenance):
        """Refuse, before building anything, layer types that no loaded plugin provides, saying where
        each came from: `provenance` maps type names to `LayerType.provenance()` records (or None)."""
        for name, source in provenance.items():
            if name not in self.layer_types:
                raise SpecError(missing_layer_message(name, source or {}))

    def build_layer(self, spec, ctx: LayerContext):
        """A layer from a spec such as ``{"type": "rnn", "hidden_size": 100}``."""
        check_spec(spec)
        options = {k: v for k, v in spec.items() if k not in ("type", "name")}
        layer_type = self.get(spec["type"])
        try:
            inspect.signature(layer_type.cls).bind(ctx, **options)
        except TypeError as exc:
            raise SpecError(f"layer {layer_type.name!r}: {exc}") from None
        layer = layer_type.cls(ctx, **options)
        check_layer_instance(layer, layer_type)
        if isinstance(layer, Layer):
            layer.layer_type = layer_type.name
        return layer


def missing_layer_message(name, source):
    """Why layer type `name` is unknown here and how to get it, from its recorded provenance."""
    if source.get("distribution"):
        dist, version = source["distribution"], source.get("version")
        made = f" (version {version} made this file)" if version else ""
        return (f"unknown layer type {name!r}: it comes from the distribution {dist!r}{made}, "
                f"which is not installed here; pip install {dist}")
    if source.get("plugin"):
        plugin = source["plugin"]
        return (f"unknown layer type {name!r}: it came from the plugin {plugin!r}, which is not loaded; "
                f"pass --plugin {plugin} (or add it to GPURNN_PLUGINS)")
    return f"unknown layer type {name!r}, and the file does not say which plugin provided it"


def check_spec(spec):
    """Refuse a spec that is not a mapping with a 'type' key."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise SpecError(f"a layer spec must be a mapping with a 'type' key, got {spec!r}")


def check_layer_class(name, cls, plugin):
    """Refuse a layer class that lacks the methods of the layer contract (`gpurnn.contract`), naming
    the plugin."""
    if not isinstance(name, str) or not name or "." in name:
        raise PluginError(f"plugin {plugin!r}: layer type name {name!r} must be a non-empty string without dots")
    if not inspect.isclass(cls):
        raise PluginError(f"plugin {plugin!r}: layer type {name!r} is not a class")
    methods = LAYER_METHODS + (STATEFUL_METHODS if getattr(cls, "stateful", False) else ())
    for method in methods:
        impl = getattr(cls, method, None)
        if not callable(impl) or impl in (Layer.forward, Layer.backward):  # the base's placeholders
            kind = "stateful layer type" if method in STATEFUL_METHODS else "layer type"
            raise PluginError(f"plugin {plugin!r}: {kind} {name!r} has no {method}() method")


def check_layer_instance(layer, layer_type):
    """Refuse a built layer whose params and grads do not match (`gpurnn.contract.LayerContract`),
    naming the plugin."""
    where = f"plugin {layer_type.plugin!r}: layer type {layer_type.name!r}"
    params, grads = getattr(layer, "params", None), getattr(layer, "grads", None)
    if not isinstance(params, dict) or not isinstance(grads, dict):
        raise PluginError(f"{where} must have dict attributes 'params' and 'grads'")
    if params.keys() != grads.keys():
        raise PluginError(f"{where}: params and grads have different keys "
                          f"({sorted(params)} vs {sorted(grads)})")
    for key in params:
        if params[key].shape != grads[key].shape:
            raise PluginError(f"{where}: grads[{key!r}] has shape {grads[key].shape}, "
                              f"params[{key!r}] has {params[key].shape}")
    if not isinstance(getattr(layer, "output_size", None), int) and not getattr(layer, "is_loss", False):
        raise PluginError(f"{where} must set an integer 'output_size'")
