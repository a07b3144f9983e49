"""A CPU stand-in for CuPy, so that gpurnn's CuPy code paths run end to end without a GPU.

It is not a GPU emulator. A device array is a NumPy array inside a wrapper, and the CUDA kernels run
compiled for the host (tests/kernels_on_host.py, one thread per block). What it keeps from CuPy is
what gpurnn's code has to respect there, and which a run on NumPy cannot show:

- a device array is not a NumPy array: converting one implicitly (`np.asarray`, h5py, json) or
  mixing one with a NumPy array in an operation raises TypeError, as CuPy does; `empty` memory
  holds NaN (floats) or a large sentinel (integers), never the zeros NumPy often hands out;
- a kernel launch is checked against the kernel's C signature (array or scalar, which type, C order);
- work is ordered as CUDA orders it: a non-blocking stream is ordered with no other stream, so work
  on any other stream (the legacy default one included) while a non-blocking stream holds work the
  host has not waited for (`synchronize`, or a copy to the host on that stream) is an error: on a GPU
  the two would race. `with stream:` and `use()` make a stream current as CuPy 14 does;
- stream capture records the work instead of doing it. While a stream captures nothing runs, work on
  any other stream, a host read (`get`, `item`, `float`, `bool`, `asnumpy`) and an upload from the
  host are errors (a plain RuntimeError with CuPy's words where CuPy itself refuses), and
  `Graph.launch` replays the recorded work on the same buffers with the arguments as they were at
  capture: a Python number passed to a kernel stays what it was then;
- CuPy's own cuBLAS calls (`matmul`, `@`, `dot`, ...) refuse to run during a capture, with CuPy's
  NotImplementedError; cuBLAS called directly, as gpurnn.ops.linear does, is a small libcublas built
  for the host (`_host_cublas.py`, found through the stand-in's `cuda.pathfinder`) whose GEMMs read
  and write the arrays' memory column-major, as the real one does;
- `cupy.cuda.nccl` serves one rank (the most one device can host), so the NCCL all-reduce path of
  data-parallel training runs under `mpiexec -n 1`.

Every name here exists in CuPy 14 with a compatible signature (tests/test_cupy_api.py holds the two
side by side): what the stand-in accepts, CuPy accepts.

Put `tests/hostcupy` first on PYTHONPATH and `import cupy` finds this module.
"""

import contextlib
import ctypes
import importlib.util
import sys
import types
import weakref
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "0.0+host-stand-in"

_spec = importlib.util.spec_from_file_location(
    "kernels_on_host", Path(__file__).resolve().parents[2] / "kernels_on_host.py")
kernels_on_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels_on_host)


class _CUDARuntimeError(RuntimeError):
    """What CUDA would answer (CuPy's cupy.cuda.runtime.CUDARuntimeError): here, for work that a
    capturing stream does not allow."""


# -- streams, capture and graphs ----------------------------------------------------------------

class _Event:
    _recorded_on = None  # the stream

    def synchronize(self):
        _synchronize("Event.synchronize")
        if self._recorded_on is not None:
            _waited_for(self._recorded_on)  # the host waited for the work before the record


class _Stream:
    """Work goes to the current stream; a capturing stream records it into its graph."""

    def __init__(self, null=False, non_blocking=False):
        self.is_null, self.non_blocking = null, non_blocking
        self.tape = None  # the work recorded while this stream captures
        self.invalidated = False  # a capture that met something it does not allow

    @property
    def ptr(self):
        return 0 if self.is_null else id(self)

    def __enter__(self):
        _entered.append(self)
        _current[0] = self
        return self

    def __exit__(self, *exc):
        # As CuPy 14 does: back to the stream of the enclosing `with`, else the legacy default stream,
        # even where another stream was made current by `use()` before the block (cupy/cupy#8377).
        _entered.pop()
        _current[0] = _entered[-1] if _entered else _Stream.null

    def use(self):
        _current[0] = self
        return self

    def begin_capture(self, mode=None):
        if self.is_null:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if _capturing():
            raise _CUDARuntimeError("cudaErrorStreamCaptureUnsupported: a stream is already capturing")
        self.tape = []
        _captures.append(self)

    def end_capture(self):
        _captures.remove(self)
        tape, self.tape = self.tape, None
        if self.invalidated:
            self.invalidated = False
            raise _CUDARuntimeError("cudaErrorStreamCaptureInvalidated: the capture was invalidated")
        return _Graph(tape)

    def is_capturing(self):
        return self.tape is not None

    def record(self, event=None):
        event = event or _Event()
        event._recorded_on = self
        return event

    def wait_event(self, event):
        pass

    def synchronize(self):
        _synchronize("Stream.synchronize")
        _waited_for(self)


_Stream.null = _Stream(null=True)
_current = [_Stream.null]  # the current stream
_entered = []  # the streams whose `with` blocks are open, innermost last
_captures = []  # the streams between begin_capture and end_capture
_unwaited = []  # the non-blocking streams holding work the host has not waited for


class _Graph:
    """The work recorded by a capture, replayed in order on the buffers it was recorded with."""

    def __init__(self, tape):
        self.tape = tape

    def launch(self, stream=None):
        _check_not_capturing("Graph.launch")
        _queue(stream or _current[0])
        for work in self.tape:
            work()


def _capturing():
    """The stream that is capturing, or None."""
    return next((s for s in _captures if s.tape is not None), None)


def _invalidate(stream, error):
    """End `stream`'s recording, as CUDA invalidates a capture, and raise `error`."""
    stream.tape, stream.invalidated = None, True
    raise _CUDARuntimeError(error)


def _check_not_capturing(what):
    stream = _capturing()
    if stream is not None:
        _invalidate(stream, f"cudaErrorStreamCaptureUnsupported: {what} while a stream is capturing")


def _synchronize(what):
    _check_not_capturing(f"{what} (a host synchronisation)")


def _queue(stream):
    """Work goes to `stream` now: refused where a non-blocking stream holds work the host has not
    waited for and `stream` is another one (CUDA orders neither after the other: they would race)."""
    for other in _unwaited:
        if other is not stream:
            raise RuntimeError(f"unordered streams: work on {_describe(stream)} while {_describe(other)} "
                               f"holds work not waited for (a non-blocking stream is ordered with no other)")
    if stream.non_blocking and stream not in _unwaited:
        _unwaited.append(stream)


def _describe(stream):
    return "the legacy default stream" if stream.is_null else f"stream {stream.ptr:#x}"


def _waited_for(stream):
    """The host waited for all work on `stream`."""
    if stream in _unwaited:
        _unwaited.remove(stream)


def _transfer(direction, stream=None):
    """A copy between host and device ("D2H" or "H2D") on `stream` (default: the current one): CuPy
    refuses it while the current stream captures (and CUDA would break a capture on another stream
    with it). A copy to the host waits for the stream's work before it."""
    if _current[0].tape is not None:
        raise RuntimeError(f"the current stream is capturing, so {direction} transfers are disallowed")
    _check_not_capturing(f"a {direction} copy")
    stream = stream or _current[0]
    _queue(stream)
    if direction == "D2H":
        _waited_for(stream)


def _refuse_cublas():
    """CuPy's cuBLAS wrappers refuse to run while the current stream captures (cublas.pyx, setStream)."""
    if _current[0].tape is not None:
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")


def _run(work):
    """Do `work` on the current stream now, or record it when that stream captures."""
    stream = _capturing()
    if stream is None:
        _queue(_current[0])
        work()
    elif _current[0] is not stream:
        _invalidate(stream, "cudaErrorStreamCaptureInvalidated: work on another stream during capture")
    else:
        stream.tape.append(work)


def _base(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _compute(fn, inputs=()):
    """The array `fn()` makes: done now, and during capture also recorded to redo into the same
    buffer at each replay. A result that is a view of an input is just that view."""
    if _capturing() is None:
        _queue(_current[0])
    with np.errstate(all="ignore"):
        result = fn()
    if isinstance(result, np.generic):
        result = np.asarray(result)
    if not isinstance(result, np.ndarray):
        return result
    if _capturing() is not None:
        bases = [_base(x._a) for x in _flat(inputs) if isinstance(x, ndarray)]
        if not any(_base(result) is b for b in bases):
            _fill_unset(result)  # not computed yet: only the replay will
            _run(lambda: np.copyto(result, fn()))
    return ndarray(result)


def _fill_unset(a):
    """What memory nothing has written to yet holds here: NaN, or a large integer."""
    a.fill(np.nan if a.dtype.kind in "fc" else np.iinfo(a.dtype).max // 2 if a.dtype.kind in "iu" else 0)


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def _unwrap(x):
    """The NumPy array behind a device array; a NumPy array here is an error, as in CuPy."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a NumPy array in a CuPy operation")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


# -- arrays ---------------------------------------------------------------------------------------

_CUBLAS = {np.matmul, np.dot, np.vdot, np.inner, np.tensordot}  # what CuPy runs through its cuBLAS wrappers
_METHODS = {"reshape", "ravel", "transpose", "swapaxes", "view", "squeeze", "flatten", "copy", "sum",
            "max", "min", "mean", "argmax", "argmin", "dot", "cumsum", "var", "std", "any", "all",
            "take", "repeat", "clip", "prod"}
_ATTRIBUTES = {"shape", "dtype", "ndim", "size", "nbytes", "itemsize", "strides", "flags"}


class ndarray(NDArrayOperatorsMixin):
    """A device array: NumPy's arithmetic and methods, CuPy's refusals."""

    __slots__ = ("_a",)

    def __init__(self, array):
        object.__setattr__(self, "_a", array)

    def __getattr__(self, name):
        if name in _ATTRIBUTES:
            return getattr(self._a, name)
        if name in _METHODS:
            if name == "dot":
                _refuse_cublas()
            method = getattr(self._a, name)
            return lambda *args, **kw: _compute(lambda: method(*_unwrap(args), **_unwrap(kw)), (self,) + args)
        raise AttributeError(f"a CuPy array has no attribute {name!r} here")

    @property
    def T(self):
        return ndarray(self._a.T)

    @property
    def data(self):
        ptr = self._a.ctypes.data
        _POINTERS[ptr] = _base(self._a)  # so that a cuBLAS call can find the array a pointer points into
        return types.SimpleNamespace(ptr=ptr)

    @property
    def base(self):
        return None if self._a.base is None else ndarray(self._a.base)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kw):
        if ufunc in _CUBLAS:
            _refuse_cublas()
        args = _unwrap(inputs)
        call = getattr(ufunc, method)
        if out is None:
            return _compute(lambda: call(*args, **kw), inputs)
        outs = tuple(_unwrap(o) for o in out)
        _run(lambda: call(*args, out=outs, **kw))
        return out[0] if len(out) == 1 else out

    def __array_function__(self, func, types_, args, kwargs):
        return _function(func)(*args, **kwargs)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key):
        key = _index(key)
        return _compute(lambda: self._a[key], (self, key))

    def __setitem__(self, key, value):
        key, value = _index(key), _unwrap(value) if not isinstance(value, np.ndarray) else _upload(value)
        _run(lambda: self._a.__setitem__(key, value))

    def astype(self, dtype, *, copy=True):
        return _compute(lambda: self._a.astype(dtype, copy=copy), (self,))

    def fill(self, value):
        _run(lambda: self._a.fill(value))

    def get(self, stream=None, *, out=None):
        _transfer("D2H", stream)
        return self._a.copy()

    def set(self, arr, stream=None):
        """CuPy's checks, in CuPy's order and words."""
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        _transfer("H2D", stream)
        self._a[...] = arr

    def item(self):
        _transfer("D2H")
        return self._a.item()

    def tolist(self):
        return self.get().tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        return bool(self.item())

    def __format__(self, spec):
        return format(self.get(), spec)

    def __repr__(self):
        return f"cupy-stand-in:{self._a!r}"


def _index(key):
    """An index with device arrays unwrapped; NumPy arrays in an index are accepted, as CuPy does."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


def _upload(array):
    """A host-to-device copy: not allowed inside a capture (it would synchronise with the host)."""
    _transfer("H2D")
    return array


def _function(fn):
    """NumPy's function `fn` on device arrays: in place when given out=, else a new array."""
    def call(*args, **kw):
        if fn in _CUBLAS:
            _refuse_cublas()
        a, k = _unwrap(args), _unwrap(kw)
        if kw.get("out") is not None:
            _run(lambda: fn(*a, **k))
            return kw["out"]
        return _compute(lambda: fn(*a, **k), args)
    call.__name__ = getattr(fn, "__name__", "function")
    return call


# -- creating and moving arrays --------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a.astype(dtype, copy=False) if dtype is not None else a
    _upload(a)
    return ndarray(np.array(a, dtype=dtype, order=order or "K"))


def array(obj, dtype=None, copy=True, order="K"):
    if isinstance(obj, ndarray):
        return obj.astype(dtype or obj.dtype, copy=copy)
    return asarray(obj, dtype, order)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}: ascontiguousarray takes a CuPy array")
    return _compute(lambda: np.ascontiguousarray(a._a, dtype=dtype), (a,))


def asnumpy(a, stream=None, *, out=None):
    return a.get(stream) if isinstance(a, ndarray) else np.asarray(a)


def empty(shape, dtype=float, order="C"):
    a = np.empty(shape, dtype, order)
    _fill_unset(a)
    return ndarray(a)


def empty_like(prototype, dtype=None, order="K", *, shape=None):
    return empty(prototype.shape if shape is None else shape, prototype.dtype if dtype is None else dtype)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def __getattr__(name):
    """Everything else from NumPy: types and constants as they are, functions on device arrays."""
    value = getattr(np, name)
    if isinstance(value, np.ufunc):
        return _ufunc(value)
    if isinstance(value, type) or not callable(value):
        return value
    return _function(value)


def _ufunc(ufunc):
    """NumPy's ufunc, refusing NumPy arrays among its arguments as CuPy's do."""
    def call(*args, **kw):
        _unwrap(args), _unwrap(kw.get("out"))
        return ufunc(*args, **kw)
    call.__name__ = ufunc.__name__
    return call


# -- kernels ---------------------------------------------------------------------------------------

class RawKernel:
    """A CUDA kernel from gpurnn.ops, run on the host; its arguments are checked at each launch."""

    def __init__(self, code, name, options=(), backend="nvrtc"):
        self.name = name
        self.dtype = np.float64 if "typedef double T;" in code else np.float32

    def __call__(self, grid, block, args, *, shared_mem=0):
        if not 1 <= block[0] <= 1024 or not 1 <= grid[0] < 2 ** 31:
            raise _CUDARuntimeError(f"{self.name}: invalid launch of {grid} blocks of {block} threads")
        if any(isinstance(a, np.ndarray) for a in args):
            raise TypeError(f"{self.name}: a NumPy array passed to a CUDA kernel")
        host_args = [_unwrap(a) for a in args]
        kernels_on_host.c_arguments(self.name, self.dtype, host_args)  # refuse a bad launch at once
        threads = kernels_on_host.block_threads(block[0])  # one, or all with HOST_KERNELS_BLOCKS=full
        _run(lambda: kernels_on_host.run_grid(self.name, self.dtype, grid[0], host_args, threads))


# -- cupy.cuda ---------------------------------------------------------------------------------------

class _MemoryPool:
    def malloc(self, size):
        raise NotImplementedError("the host stand-in allocates through NumPy")

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_default_pool = _MemoryPool()


def get_default_memory_pool():
    return _default_pool


class _Device:
    pci_bus_id = "0000:00:00.0"

    def __init__(self, device=None):
        self.id = device or 0

    def synchronize(self):
        _synchronize("Device.synchronize")
        _unwaited.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _device_properties(device):
    return {"name": b"host stand-in for CuPy (tests/hostcupy)", "totalGlobalMem": 1 << 30}


cuda = types.ModuleType(f"{__name__}.cuda")
cuda.Stream, cuda.Event, cuda.Graph, cuda.Device, cuda.MemoryPool = _Stream, _Event, _Graph, _Device, _MemoryPool
cuda.get_current_stream = lambda: _current[0]
cuda.using_allocator = lambda allocator=None: contextlib.nullcontext()
cuda.set_allocator = lambda allocator=None: None  # the host allocates through NumPy, pool or not
cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=_device_properties,
                                     runtimeGetVersion=lambda: 13000, CUDARuntimeError=_CUDARuntimeError)
sys.modules[cuda.__name__] = cuda


class _NcclCommunicator:
    """NCCL for one rank, the most one device can host: an all-reduce leaves the buffer as it is."""

    def __init__(self, ndev, commId, rank):
        if ndev != 1 or rank != 0:
            raise NotImplementedError("the host stand-in for NCCL has one rank")

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        if datatype not in (_nccl.NCCL_FLOAT32, _nccl.NCCL_FLOAT64) or op != _nccl.NCCL_SUM or count < 1:
            raise ValueError(f"allReduce({count}, datatype {datatype}, op {op}) is not what gpurnn asks")
        if sendbuf != recvbuf:  # a sum over one rank is a copy
            _run(lambda: ctypes.memmove(recvbuf, sendbuf, count * (4 if datatype == _nccl.NCCL_FLOAT32 else 8)))


_nccl = types.ModuleType(f"{cuda.__name__}.nccl")
_nccl.available = True
_nccl.NCCL_SUM, _nccl.NCCL_FLOAT32, _nccl.NCCL_FLOAT64 = 0, 7, 8
_nccl.get_unique_id = lambda: tuple(range(128))
_nccl.NcclCommunicator = _NcclCommunicator
cuda.nccl = _nccl
sys.modules[_nccl.__name__] = _nccl


# -- cuBLAS, as gpurnn.ops.linear calls it (CuPy's handle; the library from cuda.pathfinder) ----------

_POINTERS = weakref.WeakValueDictionary()  # device pointer taken (ndarray.data.ptr) -> the array it is in


def _cublas_handle():
    from . import _host_cublas

    return _host_cublas.handle()


cuda.device = types.ModuleType(f"{cuda.__name__}.device")
cuda.device.get_cublas_handle = _cublas_handle
sys.modules[cuda.device.__name__] = cuda.device
