"""gpurnn: a small, readable framework for recurrent language models on NumPy (CPU) and CuPy (GPU).

The flow: a corpus (HDF5) -> BPTTStream minibatches -> a Model built from layer specs through the
plugin registry -> forward/backward -> optimizer. Importing gpurnn never imports CuPy.
"""

import os

# OpenBLAS's idle threads spin for a long while after each GEMM and take the cores from the row-parallel
# softmax that follows. OpenBLAS reads this when numpy loads it, so it acts when gpurnn is imported first
# (as by the gpurnn command); a value already set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .backend import Backend, get_backend  # noqa: E402
from .errors import GpurnnError  # noqa: E402
from .model import Model, preset_specs  # noqa: E402
from .registry import Registry  # noqa: E402

__all__ = ["Backend", "GpurnnError", "Model", "Registry", "get_backend", "preset_specs"]
