"""CuPy against NumPy for whole training steps, the CUDA-graph step, and exact resume on the GPU.

The NumPy half of what a captured graph relies on is checked everywhere: the carried state, the
learning rate and the dropout step keep their memory from step to step. The rest needs a usable CUDA
device and is skipped with the reason where there is none: the direct cuBLAS GEMM against CuPy's
matmul in every layout the layers use, GEMMs and kernels captured together, the steps.
"""

import numpy as np
import pytest

from gpurnn import ops
from gpurnn.backend import get_backend, using_stream
from gpurnn.config import TrainConfig
from gpurnn.model import Model, preset_specs
from gpurnn.train.optim import Adam
from gpurnn.train.trainer import Observer, Trainer

from .conftest import requires_gpu

V, B, T = 13, 3, 4


def specs(output="full"):
    """A tied two-LSTM model with dropout: every kind of op a step runs; with the "adaptive" output, an
    LSTM with dropout ending in the adaptive softmax (a head of 4 words and two clusters); with "fused",
    the tied model ending in the fused affine_softmax_loss, in chunks of at most 5 of the 12 rows (three of 4)."""
    if output == "adaptive":
        return preset_specs("rnnlm", wordvec_size=6, hidden_size=8, dropout=0.3, output_layer="adaptive",
                            cutoffs=[4, 8], div_value=2.0)
    tied = preset_specs("better-rnnlm", wordvec_size=6, hidden_size=6, dropout=0.3)
    if output == "fused":
        return tied[:-2] + [{"type": "affine_softmax_loss", "tie_to": "embedding", "chunk_rows": 5}]
    return tied


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32))
            for _ in range(count)]


def trainer(backend, registry, graph=True, output="full", **options):
    model = Model(specs(output), V, backend, registry, seed=3)
    return Trainer(model, Adam(lr=0.01), None, TrainConfig(batch_size=B, time_size=T, clip=0.5, cuda_graph=graph),
                   **options)


class Notices(Observer, list):
    """An observer that keeps the notices it hears."""

    def on_notice(self, message):
        self.append(message)


def run(tr, data):
    """Steps over `data`; returns the losses (host floats) and the final parameters (host)."""
    losses = []
    for xs, ts in data:
        losses.append(float(tr.model.backend.to_host(tr.step(xs, ts))))
        tr.iteration += 1
    return losses, tr.model.backend.to_host(tr.model.flat_params)


def addresses(tr):
    """Where the arrays a captured step reads or carries live in memory."""
    arrays = [tr.optimizer.lr_now, tr.model.step_counter, tr.model.flat_params, tr.optimizer.m]
    arrays += [a for _, layer in tr.model.stateful_layers() for a in layer.state.values()]
    return [a.__array_interface__["data"][0] for a in arrays]


def test_what_a_captured_step_reads_keeps_its_memory_between_steps(registry):
    tr = trainer(get_backend("numpy"), registry)
    run(tr, batches(2))
    before = addresses(tr)
    run(tr, batches(2, seed=1))
    assert addresses(tr) == before


def layouts(cupy, rng, dtype):
    """(a, b) pairs in the layouts the layers multiply: (T*B, D) @ (D, 4H), one step's h @ Wh, x.T @ d,
    d @ W.T, both transposed, a row (ones @ a), and a column slice (copied before the GEMM)."""
    def host(*shape):
        return rng.standard_normal(shape).astype(dtype)

    def device(*shape):
        return cupy.asarray(host(*shape))

    return [(device(12, 5), device(5, 8)), (device(3, 6), device(6, 24)), (device(12, 5).T, device(12, 7)),
            (device(12, 7), device(5, 7).T), (device(4, 3).T, device(5, 4).T), (cupy.ones(12, dtype), device(12, 7)),
            (device(6, 9)[:, 2:7], device(5, 4))]


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_direct_cublas_gemm_equals_cupy_matmul_in_every_layout(dtype):
    backend = get_backend("cupy", dtype)
    cupy, rng = backend.xp, np.random.default_rng(2)
    for a, b in layouts(cupy, rng, dtype):
        expected = cupy.matmul(a, b).get()
        np.testing.assert_allclose(ops.matmul(a, b).get(), expected, rtol=1e-5 if dtype == "float32" else 1e-12)
        out = cupy.empty(expected.shape, dtype)
        assert ops.matmul(a, b, out=out) is out
        np.testing.assert_allclose(out.get(), expected, rtol=1e-5 if dtype == "float32" else 1e-12)
    with pytest.raises(ValueError, match="do not multiply"):
        ops.matmul(a, a)


@requires_gpu
def test_the_accumulating_cublas_gemm_adds_to_out_in_every_layout():
    backend = get_backend("cupy", "float64")
    cupy, rng = backend.xp, np.random.default_rng(3)
    for a, b in layouts(cupy, rng, "float64"):
        start = rng.standard_normal(cupy.matmul(a, b).shape)
        for out in (cupy.asarray(start), cupy.asarray(start.T).T):  # C-ordered, and a transposed view
            assert ops.matmul(a, b, out=out, accumulate=True) is out
            np.testing.assert_allclose(out.get(), start + cupy.matmul(a, b).get(), rtol=1e-12)


@requires_gpu
def test_gemms_and_kernels_captured_together_replay_what_they_compute_eagerly():
    backend = get_backend("cupy", "float32")
    cupy, rng = backend.xp, np.random.default_rng(3)
    pairs = layouts(cupy, rng, "float32")

    def step():  # sigmoid(tanh(2 a @ b)): GEMMs, a RawKernel and elementwise kernels
        results = []
        for a, b in pairs:
            r = ops.matmul(a, b)
            results.append(ops.sigmoid(ops.rnn_cell(r, ops.matmul(a, b)), r))
        return results

    backend.synchronize()  # the inputs' uploads done before another stream reads them
    with using_stream(cupy, cupy.cuda.Stream(non_blocking=True)) as other:
        ops.matmul(*pairs[0])  # leaves cuBLAS bound to another stream
        other.synchronize()
    stream = backend.stream
    with using_stream(cupy, stream):
        ops.bind_cublas_to_current_stream()
        stream.begin_capture()
        captured = step()
        graph = stream.end_capture()
        for _ in range(2):
            eager = [r.get() for r in step()]
            graph.launch(stream)
            for got, want in zip(captured, eager):
                np.testing.assert_array_equal(got.get(), want)  # one stream, one path: bit for bit
            for a, _ in pairs:
                a *= 2  # the replay reads the inputs' memory as it is then
    assert cupy.cuda.get_current_stream() == stream


@requires_gpu
def test_eager_and_captured_work_share_the_backends_one_stream(registry):
    from gpurnn.train.evaluate import block_forward

    backend = get_backend("cupy")
    cupy = backend.xp
    assert backend.stream is not None and backend.stream != cupy.cuda.Stream.null
    assert cupy.cuda.get_current_stream() == backend.stream  # eager work runs there
    tr = trainer(backend, registry)
    run(tr, batches(4))
    assert tr.graph.graph is not None and tr.graph.stream == backend.stream
    assert block_forward(tr.model).stream == backend.stream and cupy.cuda.get_current_stream() == backend.stream


@requires_gpu
@pytest.mark.parametrize("output", ["full", "adaptive", "fused"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_cupy_training_steps_equal_numpy(registry, dtype, tol, output):
    data = batches(6)
    np_losses, np_params = run(trainer(get_backend("numpy", dtype), registry, output=output), data)
    cp_losses, cp_params = run(trainer(get_backend("cupy", dtype), registry, graph=False, output=output), data)
    np.testing.assert_allclose(cp_losses, np_losses, rtol=tol)
    np.testing.assert_allclose(cp_params, np_params, rtol=tol, atol=tol * np.abs(np_params).max())


@requires_gpu
@pytest.mark.parametrize("output", ["full", "adaptive", "fused"])
def test_the_cuda_graph_step_equals_the_eager_step_bit_for_bit(registry, output):
    data = batches(8)
    eager = run(trainer(get_backend("cupy", "float64"), registry, graph=False, output=output), data)
    tr = trainer(get_backend("cupy", "float64"), registry, graph=True, output=output)
    graphed = run(tr, data)
    assert tr.graph.graph is not None and not tr.graph.failed  # it was captured and replayed
    assert eager[0] == graphed[0]
    np.testing.assert_array_equal(eager[1], graphed[1])


@requires_gpu
def test_a_resumed_gpu_run_with_dropout_is_bit_identical(registry):
    data = batches(10)
    backend = get_backend("cupy")
    full = run(trainer(backend, registry), data)
    first = trainer(backend, registry)
    run(first, data[:4])
    second = trainer(backend, registry)
    second.model.flat_params[...] = first.model.flat_params
    second.model.set_state(first.model.get_state())
    second.optimizer.load_state_dict(first.optimizer.state_dict(first.model), second.model)
    second.iteration = first.iteration
    resumed = run(second, data[4:])
    assert full[0][4:] == resumed[0]
    np.testing.assert_array_equal(full[1], resumed[1])


@requires_gpu
@pytest.mark.parametrize("output", ["full", "adaptive", "fused"])
def test_evaluation_through_the_cuda_graph_equals_the_eager_one_bit_for_bit(registry, output):
    from gpurnn.train.evaluate import perplexity

    model = Model(specs(output), V, get_backend("cupy", "float64"), registry, seed=3)
    ids = np.random.default_rng(5).integers(0, V, 200).astype(np.int32)
    assert perplexity(model, ids, 3, T, cuda_graph=True) == perplexity(model, ids, 3, T, cuda_graph=False)


@requires_gpu
def test_a_step_that_cannot_be_captured_trains_eagerly_and_says_why_once(registry):
    data = batches(6)
    eager = run(trainer(get_backend("cupy", "float64"), registry, graph=False), data)
    notices = Notices()
    tr = trainer(get_backend("cupy", "float64"), registry, observer=notices)
    step = tr.graph.compute
    tr.graph.compute = lambda xs, ts: step(xs, ts) + 0 * float(tr.model.flat_params[0])  # a host read
    assert run(tr, data)[0] == eager[0]
    assert tr.graph.failed and len(notices) == 1
    assert "capture failed" in notices[0] and "capturing" in notices[0]  # the cause, not its aftermath


@requires_gpu
def test_a_validation_that_cannot_be_captured_evaluates_eagerly_and_says_why_once(registry):
    from gpurnn.train.evaluate import perplexity

    backend = get_backend("cupy", "float64")
    ids = np.random.default_rng(6).integers(0, V, 200).astype(np.int32)  # 10 lanes of 5 blocks
    notices = Notices()
    tr = trainer(backend, registry, observer=notices, valid_ids=ids)
    model, forward = tr.model, tr.model.forward
    model.forward = lambda xs, ts: forward(xs, ts) + 0 * float(model.flat_params[0])  # a host read
    eager = perplexity(Model(specs(), V, backend, registry, seed=3), ids, tr.config.eval_batch_size, T,
                       cuda_graph=False)[0]
    assert tr.validate() == tr.validate() == eager
    failures = [text for text in notices if "capture failed" in text]
    assert len(failures) == 1 and "capturing" in failures[0] and "evaluation goes on without it" in failures[0]
