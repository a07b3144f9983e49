"""libcublas for the stand-in: the few functions gpurnn.ops.linear calls, built for the host with g++.

gpurnn finds it as it finds the real one (the stand-in's `cuda.pathfinder` names its path), loads it
with ctypes and calls it with cuBLAS's C signatures and CuPy's handle (`cupy.cuda.device`). Each
GEMM comes back here with its arguments exactly as cuBLAS would read them (transpose flags, m, n, k,
the leading dimensions, device pointers, alpha and beta read through their host pointers), and
computes column-major on the memory of the arrays the pointers point into. So a wrong flag or leading
dimension gives a wrong product or a refusal here, not only on a GPU:

- a leading dimension smaller than the rows stored is CUBLAS_STATUS_INVALID_VALUE, as in cuBLAS;
- a matrix that reaches past the end of its array, or a pointer that is no array's, is
  CUBLAS_STATUS_EXECUTION_FAILED (on a GPU: an illegal address, or silently other memory);
- the GEMM runs on the handle's stream, which must be CuPy's current stream (else it would be
  unordered with the work around it) and, during a capture, the capturing one: it is then recorded
  and replayed by the graph, like the stand-in's kernels.

A refused call also says why on stderr ("host cuBLAS: ..."); cuBLAS itself has only its status.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import _POINTERS, _current, _run

SOURCE = r"""
extern "C" {
typedef int (*Gemm)(void* stream, int transa, int transb, int m, int n, int k, double alpha, const void* a,
                    int lda, const void* b, int ldb, double beta, void* c, int ldc, int itemsize);
struct Handle { unsigned magic; void* stream; };
static const unsigned MAGIC = 0xc0b1a5u;
static Gemm gemm = nullptr;
void host_cublas_connect(Gemm callback) { gemm = callback; }
int cublasCreate_v2(Handle** handle) { *handle = new Handle{MAGIC, nullptr}; return 0; }
static bool bad(Handle* h) { return !h || h->magic != MAGIC; }  // CUBLAS_STATUS_NOT_INITIALIZED
int cublasSetStream_v2(Handle* h, void* stream) { return bad(h) ? 1 : (h->stream = stream, 0); }
int cublasGetStream_v2(Handle* h, void** stream) { return bad(h) ? 1 : (*stream = h->stream, 0); }
int cublasSgemm_v2(Handle* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda,
                   const float* b, int ldb, const float* beta, float* c, int ldc) {
    return bad(h) ? 1 : gemm(h->stream, ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc, 4);
}
int cublasDgemm_v2(Handle* h, int ta, int tb, int m, int n, int k, const double* alpha, const double* a,
                   int lda, const double* b, int ldb, const double* beta, double* c, int ldc) {
    return bad(h) ? 1 : gemm(h->stream, ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc, 8);
}
}
"""
INVALID_VALUE, EXECUTION_FAILED = 7, 13  # cublasStatus_t
OP_N, OP_T = 0, 1
GEMM = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.c_double, ctypes.c_void_p,
                        ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_void_p,
                        ctypes.c_int, ctypes.c_int)


class Refused(Exception):
    """A call cuBLAS would answer with `status`."""

    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


def build():
    """The library's path: built once per source into the temporary folder, shared by processes."""
    built = Path(tempfile.gettempdir()) / f"gpurnn-host-cublas-{hashlib.sha256(SOURCE.encode()).hexdigest()[:16]}.so"
    if not built.exists():
        with tempfile.TemporaryDirectory(prefix="gpurnn-cublas-", dir=built.parent) as folder:
            cpp, so = Path(folder) / "cublas.cpp", Path(folder) / "cublas.so"
            cpp.write_text(SOURCE)
            subprocess.run([shutil.which("g++") or "g++", "-shared", "-fPIC", "-O1", "-o", str(so), str(cpp)],
                           check=True, capture_output=True, text=True)
            os.replace(so, built)
    return built


def matrix(ptr, rows, cols, ld, dtype, what):
    """The column-major rows x cols matrix at device pointer `ptr` with leading dimension `ld`: a
    NumPy view of the memory of the array it lies in."""
    if ld < max(1, rows):
        raise Refused(INVALID_VALUE, f"{what}: leading dimension {ld} for {rows} rows")
    ptr = ptr or 0
    base = _POINTERS.get(ptr)
    if base is None:  # a pointer into an array
        base = next((a for a in _POINTERS.values() if 0 <= ptr - a.ctypes.data < a.nbytes), None)
    if base is None:
        raise Refused(EXECUTION_FAILED, f"{what}: {ptr:#x} is not in a device array")
    if base.dtype != dtype:
        raise Refused(EXECUTION_FAILED, f"{what}: a {base.dtype} array read as {np.dtype(dtype)}")
    offset = ptr - base.ctypes.data
    end = offset + ((cols - 1) * ld + rows) * base.itemsize if rows and cols else offset
    if end > base.nbytes:
        raise Refused(EXECUTION_FAILED, f"{what}: {rows} x {cols} with leading dimension {ld} reaches "
                                        f"{end - base.nbytes} bytes past the end of its array")
    return np.ndarray((rows, cols), dtype, buffer=base, offset=offset, strides=(base.itemsize, ld * base.itemsize))


def operand(op, ptr, rows, cols, ld, dtype, what):
    """op(X) of shape (rows, cols) for X stored at `ptr` as cuBLAS reads it."""
    if op not in (OP_N, OP_T):
        raise Refused(INVALID_VALUE, f"{what}: transpose flag {op}")
    return matrix(ptr, rows, cols, ld, dtype, what) if op == OP_N else matrix(ptr, cols, rows, ld, dtype, what).T


def gemm(stream, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, itemsize):
    """C = alpha op(A) op(B) + beta C, column-major, on the handle's stream."""
    try:
        if min(m, n, k) < 0:
            raise Refused(INVALID_VALUE, f"m, n, k = {m}, {n}, {k}")
        dtype = {4: np.float32, 8: np.float64}[itemsize]
        op_a = operand(transa, a, m, k, lda, dtype, "A")
        op_b = operand(transb, b, k, n, ldb, dtype, "B")
        out = matrix(c, m, n, ldc, dtype, "C")
        if (stream or 0) != _current[-1].ptr:
            raise Refused(EXECUTION_FAILED, f"the handle's stream {stream or 0:#x} is not CuPy's current stream "
                                            f"{_current[-1].ptr:#x}: its GEMM is unordered with the work around it")

        def work():
            product = op_a @ op_b
            if alpha != 1:
                product *= alpha
            if beta != 0:
                product += beta * out
            out[...] = product

        _run(work)  # recorded by a capturing stream, an error while another stream captures
        return 0
    except Refused as exc:
        sys.stderr.write(f"host cuBLAS: {exc}\n")
        return exc.status
    except Exception as exc:  # an exception must not escape into C
        sys.stderr.write(f"host cuBLAS: {type(exc).__name__}: {exc}\n")
        return EXECUTION_FAILED


PATH = build()
library = ctypes.CDLL(str(PATH))
_connected = GEMM(gemm)  # kept alive as long as the library may call it
library.host_cublas_connect(_connected)
_handle = ctypes.c_void_p()
assert library.cublasCreate_v2(ctypes.byref(_handle)) == 0


def handle():
    """CuPy's cuBLAS handle of the (one) device."""
    return _handle.value
