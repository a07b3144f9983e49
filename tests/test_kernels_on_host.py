"""Every CUDA kernel, run on the CPU (tests/kernels_on_host.py), computes what its NumPy twin does.

Each op is called twice on the same inputs: once through its NumPy body, once through its CuPy body
with the kernel compiled for the host. Then a whole model trains a few steps both ways. Every test
runs three times: with one thread per block (the grid-stride loops), and with each block on as many
threads as on the GPU (so that the block reductions and their `__syncthreads()` really run), blocks
and threads in a shuffled order and in reverse, so that a kernel whose result depends on the order
in which blocks or threads run differs from its NumPy twin. Static checks of the CUDA sources cover
what the host cannot reach: indices past 2^31, and shared arrays sized for the launch.
"""

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest

from gpurnn import ops
from gpurnn.backend import get_backend
from gpurnn.model import Model, preset_specs
from gpurnn.train.optim import Adam, SGD

from gpurnn.ops import kernels
from gpurnn.ops.embedding import sorted_positions

from .kernels_on_host import compiler, host_kernels, run_grid

pytestmark = pytest.mark.skipif(compiler() is None, reason="no g++ to build the kernels for the host")
RNG = np.random.default_rng(11)
GRID = {"full_blocks": False, "order": "shuffled"}


@pytest.fixture(autouse=True, params=[(False, "shuffled"), (True, "shuffled"), (True, "reverse")],
                ids=["thread-per-block", "full-blocks", "full-blocks-reversed"])
def grid(request):
    GRID["full_blocks"], GRID["order"] = request.param
    yield
    GRID.update(full_blocks=False, order="shuffled")


def on_host():
    """The ops' CuPy branches on the host, walking grids as the current test parameter says."""
    return host_kernels(GRID["full_blocks"], GRID["order"])


def both(fn, *arrays):
    """fn on copies of `arrays` through the NumPy bodies and through the kernels: the two sets of
    arrays afterwards (fn writes its results into them) and the two return values."""
    host = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
    kern = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
    out_host = fn(*host)
    with on_host():
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


def loss_and_grad(x, t, buffer, dout=1.5):
    loss, cache = ops.softmax_cross_entropy(x, t, -1, buffer)
    return float(loss), ops.softmax_cross_entropy_backward(cache, dout).copy()


@pytest.mark.parametrize("V", [300, 37])  # more and fewer columns than a block's threads
def test_softmax_cross_entropy_forward_and_backward(dtype, V):
    N = 9
    x = rand(dtype, N, V) * 5
    t = RNG.integers(0, V, N).astype(np.int32)
    t[[2, 7]] = -1
    _, _, (loss_h, grad_h), (loss_k, grad_k) = both(loss_and_grad, x, t, np.empty_like(x))
    assert loss_k == pytest.approx(loss_h, rel=tol(dtype))
    np.testing.assert_allclose(grad_k, grad_h, rtol=tol(dtype), atol=tol(dtype))


def test_a_target_outside_the_vocabulary_marks_its_row_not_a_number(dtype):
    """Never a read outside the row: the row's loss and gradient are NaN, on both backends alike."""
    x, t = rand(dtype, 5, 300), np.array([3, 300, -1, -7, 0], np.int32)
    _, _, (loss_h, grad_h), (loss_k, grad_k) = both(loss_and_grad, x, t, np.empty_like(x))
    assert np.isnan(loss_h) and np.isnan(loss_k)
    for grad in (grad_h, grad_k):
        assert np.isnan(grad[[1, 3]]).all() and np.isfinite(grad[[0, 2, 4]]).all()
    np.testing.assert_allclose(grad_k[[0, 2, 4]], grad_h[[0, 2, 4]], rtol=tol(dtype), atol=tol(dtype))


def test_a_softmax_over_no_rows_launches_and_scores_zero(dtype):
    x = np.empty((0, 300), dtype)
    _, _, (loss_h, grad_h), (loss_k, grad_k) = both(loss_and_grad, x, np.empty(0, np.int32), np.empty_like(x))
    assert loss_h == loss_k == 0 and grad_k.shape == grad_h.shape == (0, 300)


def test_softmax_rows_covers_more_rows_than_blocks(dtype):
    """The row-stride loop: a grid of 3 blocks over 10 rows (65,535 blocks over more rows on a GPU)."""
    N, V = 10, 40
    x, t = rand(dtype, N, V), RNG.integers(0, V, N).astype(np.int32)
    lse, nll = np.full(N, np.nan, dtype), np.full(N, np.nan, dtype)
    run_grid("softmax_rows", dtype, 3, (x, t, np.int32(-1), lse, nll, np.int64(N), np.int32(V)),
             threads=kernels.THREADS if GRID["full_blocks"] else 1, order=GRID["order"])
    m = x.max(axis=1)
    expected = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    np.testing.assert_allclose(lse, expected, rtol=tol(dtype))
    np.testing.assert_allclose(nll, expected - x[np.arange(N), t], rtol=10 * tol(dtype), atol=tol(dtype))


@pytest.mark.parametrize("vocab", [6, 300, 70_000])  # one, two and three radix passes
def test_embedding_backward_adds_repeated_rows_in_index_order(dtype, vocab):
    """The kernels give np.add.at's bits (rows added one after another in index order); NumPy's body
    (pairwise within a run of equal ids) gives the same up to rounding."""
    n = 2000  # 63 sort workers
    index = np.concatenate([RNG.integers(0, 5, n // 2), RNG.integers(0, vocab, n // 2)]).astype(np.int32)
    RNG.shuffle(index)
    target, rows = rand(dtype, vocab, 3), rand(dtype, n, 3)
    host, kern, _, _ = both(ops.scatter_add_rows, target, index, rows)
    in_order = target.copy()
    np.add.at(in_order, index, rows)
    np.testing.assert_array_equal(kern[0], in_order)
    np.testing.assert_allclose(host[0], in_order, rtol=10 * tol(dtype), atol=10 * tol(dtype))


def test_the_radix_sort_orders_positions_by_id_then_position():
    ids = RNG.integers(0, 267_000, 5000).astype(np.int32)
    ids[::3] = 17
    with on_host():
        order = sorted_positions(ids, 267_000, np.float32)
    np.testing.assert_array_equal(order, np.argsort(ids, kind="stable"))


def test_an_id_outside_the_table_is_skipped_by_the_kernel(dtype):
    index, rows, target = np.array([1, 6, 1, -2, 3], np.int32), rand(dtype, 5, 2), np.zeros((6, 2), dtype)
    with on_host():
        ops.scatter_add_rows(target, index, rows)
    expected = np.zeros((6, 2), dtype)
    expected[1], expected[3] = rows[0] + rows[2], rows[4]
    np.testing.assert_array_equal(target, expected)


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


def test_dropout_masks_are_identical(dtype):
    step = np.array([41], np.uint32)
    host, kern, _, _ = both(lambda x, out: ops.dropout(x, out, 0.3, 99, step, 4), rand(dtype, 5, 6, 7),
                            np.zeros((5, 6, 7), dtype))
    np.testing.assert_array_equal(kern[1] == 0, host[1] == 0)  # the same mask, element for element
    assert_same(host, kern, tol(dtype))


@pytest.mark.parametrize("n", [1, 1000, 70_001])
def test_squared_norm(dtype, n):
    g = rand(dtype, n)
    with on_host():
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
        with on_host() if kernels else contextlib.nullcontext():
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


# -- what the host walk catches: kernels with the mistakes a GPU would hide or answer with garbage --

FAULTY = {
    "prefix_across_blocks": r"""
// Wrong on a GPU: block b reads what block b - 1 writes in the same launch.
extern "C" __global__ void prefix_across_blocks(const T* x, T* out) {
    if (threadIdx.x == 0) out[blockIdx.x] = x[blockIdx.x] + (blockIdx.x ? out[blockIdx.x - 1] : T(0));
}""",
    "block_sum": r"""
// Thread 0 sums the block's shared values: right only when the barrier orders the writes first.
extern "C" __global__ void block_sum(const T* x, T* out, int barrier) {
    __shared__ T part[256];
    part[threadIdx.x] = x[threadIdx.x];
    if (barrier) __syncthreads();
    if (threadIdx.x == 0) { T s = 0; for (unsigned int k = 0; k < blockDim.x; ++k) s += part[k]; out[0] = s; }
}""",
    "divergent_barrier": r"""
extern "C" __global__ void divergent_barrier(T* out) {
    if (threadIdx.x < 4) __syncthreads();
    out[threadIdx.x] = T(1);
}""",
}


def run_faulty(name, blocks, args, threads, order):
    run_grid(name, np.float64, blocks, args, threads=threads, order=order, sources=FAULTY)


def test_a_block_reading_another_blocks_output_depends_on_the_block_order():
    x = np.arange(1.0, 9.0)
    outs = {}
    for order in ("forward", "reverse", "shuffled"):
        outs[order] = np.zeros(8)
        run_faulty("prefix_across_blocks", 8, (x, outs[order]), 1, order)
    np.testing.assert_array_equal(outs["forward"], np.cumsum(x))  # what a walk in order would pass
    assert not np.array_equal(outs["reverse"], outs["forward"])
    assert not np.array_equal(outs["shuffled"], outs["forward"])


def test_shared_memory_read_before_its_barrier_depends_on_the_thread_order():
    x, out = RNG.standard_normal(256), np.zeros(1)
    for order in ("forward", "reverse"):
        run_faulty("block_sum", 1, (x, out, np.int32(1)), 256, order)
        assert out[0] == pytest.approx(x.sum())
    x2 = x + 1
    sums = {}
    for order in ("forward", "reverse"):  # without the barrier: thread 0 first, or last
        run_faulty("block_sum", 1, (x2, out, np.int32(0)), 256, order)
        sums[order] = out[0]
    assert sums["reverse"] == pytest.approx(x2.sum()) and sums["forward"] != pytest.approx(x2.sum())


def test_a_barrier_that_only_some_threads_reach_is_an_error():
    with pytest.raises(RuntimeError, match="divergent branch"):
        run_faulty("divergent_barrier", 2, (np.zeros(8),), 8, "forward")


# -- static checks of the CUDA sources: what the host cannot run at full size --

def cuda_sources():
    return {name: re.sub(r"//.*", "", source) for name, source in ops.KERNELS.items()}


def test_every_index_that_can_pass_2_31_is_64_bit():
    """B*T*V logits pass 2^31 (B = 256, T = 35, V = 267k), flat buffers of 100M+ parameters approach
    it: counts are `long long`, grid-stride indices too, and a product of two `int` sizes or of the
    block index is widened before it is formed."""
    from .kernels_on_host import signature
    preamble = re.sub(r"//.*", "", kernels.CUDA_PREAMBLE)  # GRID_STRIDE, the one grid-stride loop header
    assert set(re.findall(r"for \(([\w ]+?) \w+ = blockIdx\.x", preamble)) == {"long long"}
    for name, source in cuda_sources().items():
        assert "gridDim.x * blockDim.x" not in source, f"{name}: a grid-stride loop is written GRID_STRIDE(i, n)"
        params = signature(source, name)
        ints = {pname for ctype, pname in params if ctype == "int"}
        counts = [ctype for ctype, pname in params if pname in ("n", "count", "workers") and "*" not in ctype]
        assert set(counts) <= {"long long"}, name
        assert set(re.findall(r"for \(([\w ]+?) \w+ = blockIdx\.x", source)) <= {"long long"}, name
        assert not re.search(r"(?<!\(long long\))blockIdx\.x \* (?!\(long long\))", source), name
        wide = {pname for ctype, pname in params if ctype == "long long"}
        for declared in re.findall(r"long long ([^;]*);", source):
            wide |= set(re.findall(r"(?:^|,)\s*(\w+)\s*=", declared))
        for value in re.findall(r"\bint \w+ = ([^;,]*)", source):  # an int from a 64-bit quotient
            assert not any(re.search(rf"\b{w}\s*[/%]", value) for w in wide), f"{name}: int = {value}"
        for cast, a, b in re.findall(r"(\(long long\))?\b(\w+) \* (\w+)\b", source):
            assert cast or not (a in ints and b in ints), f"{name}: {a} * {b} in 32 bits"


def launch_calls():
    """The text of every `launch(...)` call in the ops modules."""
    calls = []
    for path in sorted(Path(ops.__file__).parent.glob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"\blaunch\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.name, text[match.start():end + 1]))
    return [(where, call) for where, call in calls if not call.startswith("launch(name")]


def test_shared_arrays_hold_a_whole_block_and_every_grid_has_a_block():
    """The block reductions assume blockDim.x == THREADS, a power of two: no launch asks for another
    block size. A grid of no blocks is a CUDA launch error: every grid is sized by `grid_blocks`
    (at least one block) or is a single block."""
    assert kernels.THREADS & (kernels.THREADS - 1) == 0 and kernels.THREADS <= 1024
    for name, source in cuda_sources().items():
        for size in re.findall(r"__shared__ [\w ]+ \w+\[(\w+)\]", source):
            assert int(size) == kernels.THREADS, name
    calls = launch_calls()
    assert len(calls) >= len(ops.KERNELS)
    for where, call in calls:
        call = re.sub(r"grid_blocks\([^)]*\)", "grid_blocks(...)", call)
        assert "threads=" not in call, (where, call)
        blocks = re.search(r"blocks=(\w+)", call)
        assert blocks is None or blocks.group(1) in ("1", "grid_blocks", "blocks"), (where, call)
        if blocks is not None and blocks.group(1) == "blocks":  # a count made by grid_blocks beforehand
            assert re.search(r"\bblocks = grid_blocks\(", (Path(ops.__file__).parent / where).read_text())
    assert kernels.grid_blocks(0) == 1 and kernels.grid_blocks(0, threads=1) == 1
