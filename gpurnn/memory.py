"""Out of memory as a user error: one line naming what was being allocated, its size, and what to lower.

NumPy raises MemoryError when the host has no room (its `_ArrayMemoryError` carries the shape and
dtype); CuPy raises `cupy.cuda.memory.OutOfMemoryError`, a MemoryError too, whose message gives the
bytes; CUDA libraries that allocate for themselves raise errors naming their allocation status. They
are recognised by type, module name and text, so nothing here imports CuPy.
"""

import math
import re
from contextlib import contextmanager

import numpy as np

from .errors import GpurnnError

LOWER_MODEL = "--hidden-size, --wordvec-size or the vocabulary (prepare --vocab-size)"
LOWER_STEP = "--batch-size, --time-size or --hidden-size"
LOWER_EVAL = "--batch-size or --time-size"
# what CUDA libraries' errors say when an allocation of their own failed
CUDA_ALLOCATION_FAILURES = ("cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY", "ALLOC_FAILED")


class OutOfMemory(GpurnnError):
    """The host or the device had no room for an allocation; the message says what to make smaller."""


def size_text(size):
    """A size in binary units and in bytes ("3.6 MiB (3,771,234 bytes)"); below 1 KiB bytes alone."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = min(max(size.bit_length() - 1, 0) // 10, len(units) - 1)
    return f"{size:,} bytes" if power == 0 else f"{size / 1024 ** power:.1f} {units[power]} ({size:,} bytes)"


def claim(size):
    """Check that `size` bytes can be allocated now, or raise MemoryError saying how many: for work
    that must not run out of memory half-way (HDF5's core driver, see gpurnn.hdf5_files)."""
    try:
        np.empty(size, np.uint8)
    except MemoryError:
        raise MemoryError(f"allocating {size:,} bytes") from None


def from_cupy(exc):
    return type(exc).__module__.split(".")[0] in ("cupy", "cupy_backends", "cupyx")


def is_out_of_memory(exc):
    """Whether `exc` says an allocation failed: a MemoryError (NumPy's, CuPy's) or a CUDA library's."""
    if isinstance(exc, MemoryError):
        return True
    return from_cupy(exc) and any(status in str(exc) for status in CUDA_ALLOCATION_FAILURES)


def allocation_text(exc):
    """The failed allocation's size (and for NumPy its shape and dtype) in words, or None where unsaid."""
    shape, dtype = getattr(exc, "shape", None), getattr(exc, "dtype", None)
    if shape is not None and dtype is not None:
        dtype = np.dtype(dtype)
        size = size_text(math.prod(shape) * dtype.itemsize)
        return f"{size} for a {' x '.join(map(str, shape))} {dtype.name} array"
    found = re.search(r"allocating ([\d,]+) bytes", str(exc))  # CuPy's message, and claim's
    return size_text(int(found.group(1).replace(",", ""))) if found else None


def out_of_memory_error(exc, what, lower):
    """The OutOfMemory error saying that `exc` happened while `what` (may be ""), and that lowering
    `lower` makes it smaller."""
    text = " ".join(filter(None, ["out of", "device" if from_cupy(exc) else "host", "memory", what]))
    size = allocation_text(exc)
    return OutOfMemory(f"{text}{f': {size}' if size else ''}; lower {lower}")


@contextmanager
def out_of_memory(what, lower):
    """Turn an allocation that fails inside the block into OutOfMemory (`what` was being done, `lower`
    the options that make it smaller); every other error passes unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_error(exc, what, lower) from exc  # --debug shows where it happened
