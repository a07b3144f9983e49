"""gpurnn: a small, readable framework for recurrent language models on NumPy (CPU) and CuPy (GPU).

The flow: a corpus (HDF5) -> BPTTStream minibatches -> a Model built from layer specs through the
plugin registry -> forward/backward -> optimizer. Importing gpurnn never imports CuPy.
"""

from .backend import Backend, get_backend
from .errors import GpurnnError
from .model import Model, preset_specs
from .registry import Registry

__all__ = ["Backend", "GpurnnError", "Model", "Registry", "get_backend", "preset_specs"]
