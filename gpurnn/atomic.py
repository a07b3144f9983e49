"""Atomic file writes: write to a temporary name in the target's directory, then rename over it.

A crash or an error mid-write leaves either the old file or nothing, never a half-written one. Used for
corpus files here and meant for checkpoints too.
"""

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success rename it to `path`, on any error delete it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
