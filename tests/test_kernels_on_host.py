"""Every CUDA kernel, run on the CPU (tests/kernels_on_host.py), computes what its NumPy twin does.

Each op is called twice on the same inputs: once through its NumPy body, once through its CuPy body
with the kernel compiled for the host. Then a whole model trains a few steps both ways. Every test
runs twice: with one thread per block (the grid-stride loops), and with each block on as many
threads as on the GPU, so that the block reductions and their `__syncthreads()` really run.
"""

import contextlib

import numpy as np
import pytest

from gpurnn import ops
from gpurnn.backend import get_backend
from gpurnn.model import Model, preset_specs
from gpurnn.train.optim import Adam, SGD

from .kernels_on_host import compiler, host_kernels, run_grid

pytestmark = pytest.mark.skipif(compiler() is None, reason="no g++ to build the kernels for the host")
RNG = np.random.default_rng(11)
GRID = {"full_blocks": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["thread-per-block", "full-blocks"])
def grid(request):
    GRID["full_blocks"] = request.param
    yield
    GRID["full_blocks"] = False


def both(fn, *arrays):
    """fn on copies of `arrays` through the NumPy bodies and through the kernels: the two sets of
    arrays afterwards (fn writes its results into them) and the two return values."""
    host = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
    kern = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
    out_host = fn(*host)
    with host_kernels(GRID["full_blocks"]):
        out_kern = fn(*kern)
    return host, kern, out_host, out_kern


def assert_same(host, kern, rtol):
    for k, (a, b) in enumerate(zip(host, kern)):
        if isinstance(a, np.ndarray):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol, err_msg=f"argument {k}")


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


def tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-12


def rand(dtype, *shape):
    return RNG.standard_normal(shape).astype(dtype)


def test_cells(dtype):
    B, H = 3, 5
    for fn, arrays in (
        (ops.rnn_cell, (rand(dtype, B, H), rand(dtype, B, H))),
        (ops.lstm_cell, (rand(dtype, B, 4 * H), rand(dtype, B, 4 * H), rand(dtype, B, H),
                         np.zeros((B, H), dtype), np.zeros((B, H), dtype))),
        (ops.gru_cell, (rand(dtype, B, 3 * H), rand(dtype, B, 3 * H), rand(dtype, H), rand(dtype, B, H),
                        np.zeros((B, H), dtype))),
    ):
        host, kern, _, _ = both(fn, *arrays)
        assert_same(host, kern, tol(dtype))


@pytest.mark.parametrize("last", [True, False])
def test_cell_backwards(dtype, last):
    B, H, T = 2, 4, 3
    rec = None if last else rand(dtype, B, H)
    host, kern, _, _ = both(lambda *a: ops.rnn_cell_backward(a[0], None if last else a[1], a[2], a[3]),
                            rand(dtype, B, H), rand(dtype, B, H), np.tanh(rand(dtype, B, H)), np.zeros((B, H), dtype))
    assert_same(host, kern, tol(dtype))
    gates = 1 / (1 + np.exp(-rand(dtype, T, B, 4 * H)))
    cs, c0 = rand(dtype, T, B, H), rand(dtype, B, H)
    host, kern, _, _ = both(ops.lstm_backward_factors, gates, cs, c0, np.zeros_like(gates), np.zeros_like(cs))
    assert_same(host, kern, tol(dtype))
    das, dc_from_dh = host[3], host[4]
    host, kern, _, _ = both(
        lambda dh, r, g, f, dc, d: ops.lstm_cell_backward(dh, None if last else r, None if last else g, f, dc, d),
        rand(dtype, B, H), rand(dtype, B, H), gates[1], dc_from_dh[0], rand(dtype, B, H), das[0])
    assert_same(host, kern, tol(dtype))
    g3 = 1 / (1 + np.exp(-rand(dtype, B, 3 * H)))
    host, kern, _, _ = both(
        lambda dhs, r, gn, g, ah, hp, dh, di, dd: ops.gru_cell_backward(dhs, None if last else r, None if last else gn,
                                                                       g, ah, hp, dh, di, dd),
        rand(dtype, B, H), rec if rec is not None else rand(dtype, B, H), g3.copy(), g3, rand(dtype, B, 3 * H),
        rand(dtype, B, H), rand(dtype, B, H), np.zeros((B, 3 * H), dtype), np.zeros((B, 3 * H), dtype))
    assert_same(host, kern, tol(dtype))


def test_softmax_cross_entropy_forward_and_backward(dtype):
    N, V = 9, 300
    x = rand(dtype, N, V) * 5
    t = RNG.integers(0, V, N).astype(np.int32)
    t[[2, 7]] = -1

    def loss_and_grad(x, t, buffer):
        loss, cache = ops.softmax_cross_entropy(x, t, -1, buffer)
        return float(loss), ops.softmax_cross_entropy_backward(cache, 1.5).copy()

    _, _, (loss_h, grad_h), (loss_k, grad_k) = both(loss_and_grad, x, t, np.empty_like(x))
    assert loss_k == pytest.approx(loss_h, rel=tol(dtype))
    np.testing.assert_allclose(grad_k, grad_h, rtol=tol(dtype), atol=tol(dtype))


def test_adaptive_softmax_gathered_on_numpy_and_masked_by_the_kernels(dtype):
    """NumPy gathers each cluster's rows; the kernels bucket the targets and score every row in place:
    the same loss, gradients and input gradient, with ignored targets among them."""
    N, D, V = 23, 6, 30
    t = RNG.integers(0, V, N).astype(np.int32)
    t[[0, 1, 2, 3, 4]] = [0, 5, 12, 29, -1]  # the head, each cluster, an ignored target
    weights = (rand(dtype, D, 8), rand(dtype, 8), [(rand(dtype, D, 3), rand(dtype, 3, 7)),
                                                  (rand(dtype, D, 1), rand(dtype, 1, 17))])
    grads = [np.zeros_like(weights[0]), np.zeros_like(weights[1]), [(np.zeros_like(P), np.zeros_like(O))
                                                                   for P, O in weights[2]]]
    clusters = ops.AdaptiveClusters([6, 13], V, np)

    def loss_and_grads(h):
        loss, cache = ops.adaptive_softmax_loss(h, t, weights, clusters, -1, ops.Workspace())
        dh = ops.adaptive_softmax_loss_backward(cache, 1.5, weights, grads)
        return float(loss), dh, [grads[0].copy(), grads[1].copy(), [a.copy() for pair in grads[2] for a in pair]]

    _, _, (loss_h, dh_h, g_h), (loss_k, dh_k, g_k) = both(loss_and_grads, rand(dtype, N, D))
    assert loss_k == pytest.approx(loss_h, rel=tol(dtype))
    np.testing.assert_allclose(dh_k, dh_h, rtol=tol(dtype), atol=tol(dtype))
    for a, b in zip([g_h[0], g_h[1], *g_h[2]], [g_k[0], g_k[1], *g_k[2]]):
        np.testing.assert_allclose(b, a, rtol=tol(dtype), atol=tol(dtype))


def test_embedding_backward_sums_repeated_rows(dtype):
    index = RNG.integers(0, 6, 40).astype(np.int32)
    host, kern, _, _ = both(ops.scatter_add_rows, rand(dtype, 6, 7), index, rand(dtype, 40, 7))
    assert_same(host, kern, tol(dtype))


def test_dropout_masks_are_identical(dtype):
    step = np.array([41], np.uint32)
    host, kern, _, _ = both(lambda x, out: ops.dropout(x, out, 0.3, 99, step, 4), rand(dtype, 5, 6, 7),
                            np.zeros((5, 6, 7), dtype))
    np.testing.assert_array_equal(kern[1] == 0, host[1] == 0)  # the same mask, element for element
    assert_same(host, kern, tol(dtype))


@pytest.mark.parametrize("n", [1, 1000, 70_001])
def test_squared_norm(dtype, n):
    g = rand(dtype, n)
    with host_kernels(GRID["full_blocks"]):
        total = ops.squared_norm(g)
    assert total.shape == (1,)
    assert total[0] == pytest.approx(np.vdot(g.astype(np.float64), g), rel=10 * tol(dtype))


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optimizer_updates(dtype, clip):
    n = 1000
    lr = np.array([0.01], dtype)
    host, kern, _, _ = both(lambda p, g: ops.sgd_update(p, g, clip, lr), rand(dtype, n), rand(dtype, n))
    assert_same(host, kern, tol(dtype))
    host, kern, _, _ = both(lambda p, g, m, v: ops.adam_update(p, g, m, v, clip, lr, 0.9, 0.999, 1e-8),
                            rand(dtype, n), rand(dtype, n), rand(dtype, n), np.abs(rand(dtype, n)))
    assert_same(host, kern, tol(dtype))


@pytest.mark.parametrize("preset,extra", [("simple-rnnlm", {}), ("better-rnnlm", {"dropout": 0.4}),
                                          ("rnnlm", {"output_layer": "adaptive", "cutoffs": [3, 7], "div_value": 2.0})])
def test_whole_training_steps_agree(registry, preset, extra):
    """A model trained three steps through the NumPy bodies and through the kernels (float64)."""
    backend = get_backend("numpy", "float64")
    data = [(RNG.integers(0, 12, (2, 4)), RNG.integers(0, 12, (2, 4))) for _ in range(3)]
    results = []
    for kernels in (False, True):
        model = Model(preset_specs(preset, wordvec_size=6, hidden_size=6, **extra), 12, backend, registry, seed=5)
        opt = Adam(lr=0.01) if extra else SGD(lr=0.5)
        losses = []
        with host_kernels(GRID["full_blocks"]) if kernels else contextlib.nullcontext():
            for i, (xs, ts) in enumerate(data):
                model.set_step(i)
                losses.append(float(model.forward(xs, ts)))
                model.backward()
                opt.step(model.flat_params, model.flat_grads, max_norm=1.0)
        results.append((losses, model.flat_params.copy()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("args,refusal", [
    ((np.zeros(4), np.zeros(4), np.int64(4)), "float64 array"),  # float32 kernel, float64 arrays
    ((np.zeros(4, np.float32), np.zeros(4, np.float32), 4), "not a numpy int64 scalar"),
    ((np.zeros(4, np.float32), np.zeros(4, np.float32), np.int32(4)), "not a numpy int64 scalar"),
    ((np.zeros((4, 2), np.float32).T, np.zeros(8, np.float32), np.int64(8)), "not C-contiguous"),
    ((np.zeros(4, np.float32), np.int64(4)), "2 arguments for 3 parameters"),
])
def test_a_launch_that_does_not_match_the_kernel_signature_is_refused(args, refusal):
    with pytest.raises(AssertionError, match=refusal):
        run_grid("rnn_cell", np.float32, 1, args)
