"""Matrix products: the one GEMM entry point every layer calls, and what is built on it."""

from ..backend import array_module


def matmul(a, b, out=None):
    """a @ b (into `out` when given) for 2-D arrays, either of which may be a transposed view.

    Every layer's product goes through here, so there is one place that decides how a GEMM runs on
    each backend.
    """
    return array_module(a).matmul(a, b, out=out)


def column_sums(a, out):
    """out[j] = sum_i a[i, j] (a bias gradient), as ones @ a: BLAS reads the rows once at full speed."""
    xp = array_module(a)
    return matmul(xp.ones(a.shape[0], a.dtype), a, out=out)
