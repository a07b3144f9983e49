"""Matrix products: the one GEMM entry point every layer calls, and what is built on it.

NumPy arrays multiply with `numpy.matmul`. CuPy arrays multiply with one cuBLAS GEMM called from
here, not through CuPy: CuPy's cuBLAS wrappers (`cupy.matmul`, `@`, `dot`) raise NotImplementedError
("calling cuBLAS API during stream capture is currently unsupported", CuPy 13 and 14) while a stream
captures a CUDA graph, although CUDA itself captures cuBLAS GEMMs. The call goes through ctypes to
the libcublas that CuPy loaded (CuPy 14 finds its CUDA libraries with cuda-pathfinder, which answers
the same path here), with CuPy's own handle for the current device. ctypes rather than NVIDIA's
nvmath-python: four C functions need no package beyond CuPy, and nvmath is not installed where the
GPU runs.

Eager and captured products take this same path, so they compute alike bit for bit. Outside a
capture each product binds the handle to CuPy's current stream (`cublasSetStream`); inside one the
handle is left alone (setting a stream resets cuBLAS's workspace), so `bind_cublas_to_current_stream`
binds it before the capture begins, and a product during the capture checks that it was.

cuBLAS is column-major, and a row-major (r, c) array read column-major is its (c, r) transpose. So
C = A @ B runs as C^T = B^T @ A^T: the operands swap places, and each is passed as it lies when
C-contiguous (leading dimension: its row length) or with the transpose flag when F-contiguous (a
`.T` view, read in place; leading dimension: its column length); any other layout is copied to C
order first. alpha and beta are host pointers (CuPy keeps its handle in host pointer mode), and
float32 products are plain SGEMM without TF32, as `cupy.matmul` does by default. gpurnn.backend sets
CUBLAS_WORKSPACE_CONFIG before CuPy makes the handle, so cuBLAS's workspace is fixed and its results
reproducible.
"""

import ctypes
import functools

import numpy as np

OP_N, OP_T = 0, 1  # cublasOperation_t: as stored, transposed
STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH", 11: "MAPPING_ERROR",
          13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED", 16: "LICENSE_ERROR"}  # cublasStatus_t
_REALS = {"float32": ("cublasSgemm_v2", ctypes.c_float), "float64": ("cublasDgemm_v2", ctypes.c_double)}


# out += a @ b on NumPy goes through a buffer of at most this many numbers (a core's cache), a block
# of out's rows or columns at a time: no second out-sized array is made, written and read again.
ADD_BLOCK_ELEMENTS = 1 << 18


def matmul(a, b, out=None, accumulate=False):
    """a @ b (into `out` when given) for a 2-D `b` and a 2-D or 1-D (one row) `a`; either may be a
    transposed view. With accumulate, out += a @ b (a gradient summed over chunks).

    Every layer's product goes through here, so there is one place that decides how a GEMM runs on
    each backend.
    """
    if accumulate and out is None:
        raise ValueError("matmul: accumulate adds to out, which is missing")
    if not isinstance(a, np.ndarray):
        return cublas_matmul(a, b, out, accumulate)
    if not accumulate:
        return np.matmul(a, b, out=out)
    if out.ndim == 1 or out.shape[0] < out.shape[1]:  # blocks of columns
        width = max(1, ADD_BLOCK_ELEMENTS // max(1, a.shape[0] if a.ndim == 2 else 1))
        for lo in range(0, out.shape[-1], width):
            out[..., lo:lo + width] += np.matmul(a, b[:, lo:lo + width])
        return out
    height = max(1, ADD_BLOCK_ELEMENTS // out.shape[1])  # blocks of rows
    for lo in range(0, out.shape[0], height):
        out[lo:lo + height] += np.matmul(a[lo:lo + height], b)
    return out


def column_sums(a, out):
    """out[j] = sum_i a[i, j] (a bias gradient), as ones @ a: BLAS reads the rows once at full speed."""
    ones = np.ones if isinstance(a, np.ndarray) else _cupy().ones
    return matmul(ones(a.shape[0], a.dtype), a, out=out)


def cublas_matmul(a, b, out=None, accumulate=False):
    """`matmul` for CuPy arrays of one float type: one cuBLAS GEMM on CuPy's current stream (adding
    to `out`, beta = 1, with accumulate)."""
    cupy = _cupy()
    a2 = a.reshape(1, -1) if a.ndim == 1 else a
    if a2.ndim != 2 or b.ndim != 2 or a2.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not multiply (2-D, or a row times 2-D)")
    if a.dtype != b.dtype or a.dtype.name not in _REALS:
        raise TypeError(f"matmul on CuPy multiplies float32 or float64 arrays of one type, not {a.dtype} "
                        f"and {b.dtype}")
    (m, k), n = a2.shape, b.shape[1]
    shape = (n,) if a.ndim == 1 else (m, n)
    if out is None:
        out = cupy.empty(shape, a.dtype)
    elif out.shape != shape or out.dtype != a.dtype:
        raise ValueError(f"matmul: out is {out.dtype} {out.shape}, the product {a.dtype} {shape}")
    c = out if out.flags.c_contiguous else (cupy.ascontiguousarray if accumulate else cupy.empty_like)(out)
    (op_a, ld_a, a2), (op_b, ld_b, b) = _operand(cupy, a2), _operand(cupy, b)
    name, real = _REALS[a.dtype.name]
    one, beta = real(1), real(1 if accumulate else 0)
    _check(getattr(_cublas(), name)(_handle(), op_b, op_a, n, m, k, ctypes.byref(one), b.data.ptr, ld_b,
                                    a2.data.ptr, ld_a, ctypes.byref(beta), c.data.ptr, max(1, n)), name)
    if c is not out:
        out[...] = c
    return out


def bind_cublas_to_current_stream():
    """Bind CuPy's cuBLAS handle to CuPy's current stream: call it before a capture begins there."""
    _handle()


def _operand(cupy, x):
    """(transpose flag, leading dimension, array) that give cuBLAS the transpose of row-major `x`."""
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        x = cupy.ascontiguousarray(x)
    if x.flags.c_contiguous:  # read column-major, it is x^T already
        return OP_N, max(1, x.shape[1]), x
    return OP_T, max(1, x.shape[0]), x  # read column-major it is x: cuBLAS transposes it


def _handle():
    """CuPy's cuBLAS handle for the current device, bound to CuPy's current stream."""
    cupy = _cupy()
    handle, stream = cupy.cuda.device.get_cublas_handle(), cupy.cuda.get_current_stream()
    if not stream.is_capturing():
        _check(_cublas().cublasSetStream_v2(handle, stream.ptr), "cublasSetStream_v2")
        return handle
    bound = ctypes.c_void_p()
    _check(_cublas().cublasGetStream_v2(handle, ctypes.byref(bound)), "cublasGetStream_v2")
    if (bound.value or 0) != stream.ptr:
        raise RuntimeError("cuBLAS is bound to another stream than the capturing one: call "
                           "gpurnn.ops.bind_cublas_to_current_stream() on that stream before the capture begins")
    return handle


def _check(status, name):
    if status != 0:
        raise RuntimeError(f"{name} failed: CUBLAS_STATUS_{STATUS.get(status, status)}")


def _gemm_signature(real):
    scalar = ctypes.POINTER(real)  # alpha, beta: host pointers
    return [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, scalar,
            ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, scalar, ctypes.c_void_p, ctypes.c_int]


# The C signatures (cublas_api.h) of what is called here, each returning a cublasStatus_t (an int); they
# are among the functions CuPy's own cuBLAS module links against.
_SIGNATURES = {
    "cublasSetStream_v2": [ctypes.c_void_p, ctypes.c_void_p],
    "cublasGetStream_v2": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)],
    "cublasSgemm_v2": _gemm_signature(ctypes.c_float),
    "cublasDgemm_v2": _gemm_signature(ctypes.c_double),
}


@functools.cache
def _cublas():
    """libcublas as CuPy loaded it, its functions declared with their C signatures."""
    from cuda import pathfinder  # CuPy's own way to its CUDA libraries (a dependency of CuPy 14)

    path = pathfinder.load_nvidia_dynamic_lib("cublas").abs_path
    if path is None:
        raise RuntimeError("cuda-pathfinder loaded libcublas but does not say from where")
    lib = ctypes.CDLL(path)
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return lib


def _cupy():
    import cupy

    return cupy
