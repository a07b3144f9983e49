"""The NumPy/CuPy seam: every NumPy body against the plain math, every CUDA source compiled without a GPU."""

import numpy as np
import pytest

from gpurnn import ops
from gpurnn.ops import threads

RNG = np.random.default_rng(7)


def sig(x):
    return 1 / (1 + np.exp(-x))


def test_lstm_cell_is_the_lstm_formula():
    B, H = 3, 4
    a, r, c_prev = RNG.standard_normal((B, 4 * H)), RNG.standard_normal((B, 4 * H)), RNG.standard_normal((B, H))
    z = a + r
    i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
    c, h = np.empty((B, H)), np.empty((B, H))
    ops.lstm_cell(a, r, c_prev, c, h)
    np.testing.assert_allclose(c, f * c_prev + i * g, rtol=1e-12)
    np.testing.assert_allclose(h, o * np.tanh(f * c_prev + i * g), rtol=1e-12)
    np.testing.assert_allclose(a, np.hstack([i, f, g, o]), rtol=1e-12)  # gates kept for backward


def test_gru_cell_is_pytorchs_gru_formula():
    B, H = 2, 3
    a, ah = RNG.standard_normal((B, 3 * H)), RNG.standard_normal((B, 3 * H))
    bhn, h_prev = RNG.standard_normal(H), RNG.standard_normal((B, H))
    r = sig(a[:, :H] + ah[:, :H])
    z = sig(a[:, H:2 * H] + ah[:, H:2 * H])
    n = np.tanh(a[:, 2 * H:] + r * (ah[:, 2 * H:] + bhn))
    h = np.empty((B, H))
    ops.gru_cell(a, ah, bhn, h_prev, h)
    np.testing.assert_allclose(h, (1 - z) * n + z * h_prev, rtol=1e-12)


def test_rnn_cell_and_its_backward():
    a, r, dh, rec = (RNG.standard_normal((2, 5)) for _ in range(4))
    h = np.tanh(a + r)
    ops.rnn_cell(a, r)
    np.testing.assert_allclose(a, h, rtol=1e-12)
    dt = np.empty((2, 5))
    ops.rnn_cell_backward(dh, rec, h, dt)
    np.testing.assert_allclose(dt, (dh + rec) * (1 - h * h), rtol=1e-12)
    ops.rnn_cell_backward(dh, None, h, dt)
    np.testing.assert_allclose(dt, dh * (1 - h * h), rtol=1e-12)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def test_softmax_cross_entropy_and_its_gradient_skip_ignored_targets():
    N, V = 7, 6
    x = RNG.standard_normal((N, V)) * 30  # large logits: the stable form must not overflow
    t = RNG.integers(0, V, N)
    t[[1, 4]] = -1
    kept = x.copy()
    loss, cache = ops.softmax_cross_entropy(x, t, -1, np.empty((N, V)))
    valid = t != -1
    expected = -log_softmax(x)[valid, t[valid]].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(x, kept)  # the input is not modified
    dx = ops.softmax_cross_entropy_backward(cache, 2.0)
    onehot = np.zeros((N, V))
    onehot[np.flatnonzero(valid), t[valid]] = 1
    ref = (np.exp(log_softmax(x)) - onehot) * valid[:, None] * 2.0 / valid.sum()
    np.testing.assert_allclose(dx, ref, rtol=1e-10, atol=1e-15)


def test_softmax_cross_entropy_without_a_backward_buffer_gives_the_same_loss():
    x = RNG.standard_normal((70, 50)).astype(np.float32)
    t = RNG.integers(0, 50, 70)
    with_buffer, _ = ops.softmax_cross_entropy(x, t, -1, np.empty_like(x))
    without, _ = ops.softmax_cross_entropy(x, t, -1, None)
    assert float(without) == float(with_buffer)


def mix32(x):
    """The kernel's hash written with Python integers, as the CUDA source states it."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def test_dropout_masks_follow_the_kernels_hash_exactly():
    seed, step, layer, p, n = 12345, 77, 3, 0.4, 50
    key = mix32(mix32(mix32(seed + 0x9E3779B9) ^ ((step + 0x85EBCA6B) & 0xFFFFFFFF)) ^ (layer + 0xC2B2AE35))
    keep = [(mix32(key ^ mix32(i + 0x27D4EB2F)) >> 8) >= int(p * (1 << 24)) for i in range(n)]
    x = np.ones(n)
    out = ops.dropout(x, np.empty(n), p, seed, np.array([step], np.uint32), layer)
    np.testing.assert_array_equal(out, np.where(keep, 1 / (1 - p), 0.0))


def test_dropout_keeps_one_minus_p_without_correlation_between_steps():
    x = np.ones((200, 1000), np.float32)
    masks = [ops.dropout(x, np.empty_like(x), 0.5, 0, np.array([s], np.uint32), 1) != 0 for s in (0, 1)]
    for m in masks:
        assert m.mean() == pytest.approx(0.5, abs=0.005)
    assert (masks[0] & masks[1]).mean() == pytest.approx(0.25, abs=0.005)  # independent across steps


def test_a_process_holding_some_lanes_draws_those_lanes_of_the_whole_mask():
    x = np.ones((6, 4, 5))
    step = np.array([3], np.uint32)
    whole = ops.dropout(x, np.empty_like(x), 0.5, 9, step, 2)
    part = ops.dropout(x[2:5], np.empty((3, 4, 5)), 0.5, 9, step, 2, first_lane=2)
    np.testing.assert_array_equal(part, whole[2:5])


def test_small_work_stays_on_the_calling_thread_and_large_work_splits(monkeypatch):
    import threading

    seen = set()

    def record(lo, hi):
        seen.add(threading.current_thread().name)

    monkeypatch.setattr(threads, "cpu_threads", lambda: 2)
    ops.for_row_blocks(np.empty((50, 418)), record)  # the demo's softmax
    assert seen == {threading.current_thread().name}
    seen.clear()
    covered = np.zeros(threads.MIN_PARALLEL_ELEMENTS * 2)

    def cover(lo, hi):
        record(lo, hi)
        covered[lo:hi] += 1

    ops.for_row_blocks(covered, cover, block=4096)
    assert any(name.startswith("gpurnn-rows") for name in seen)
    np.testing.assert_array_equal(covered, 1)  # every element exactly once


@pytest.mark.parametrize("startable", [0, 1])
def test_rows_are_covered_once_when_the_process_may_start_fewer_threads_than_cores(monkeypatch, startable):
    """Under a limit on its address space a process may start few threads, or none: the pool takes
    the workers that started and the calling thread does the rest."""
    import threading

    started = []
    start = threading.Thread.start

    def limited_start(thread):
        if len(started) >= startable:
            raise RuntimeError("can't start new thread")
        started.append(thread)
        start(thread)

    monkeypatch.setattr(threads, "cpu_threads", lambda: 4)
    monkeypatch.setattr(threads, "_POOL", None)
    monkeypatch.setattr(threading.Thread, "start", limited_start)
    covered = np.zeros(threads.MIN_PARALLEL_ELEMENTS * 2)

    def cover(lo, hi):
        covered[lo:hi] += 1

    ops.for_row_blocks(covered, cover, block=4096)
    np.testing.assert_array_equal(covered, 1)  # every element exactly once
    assert threads._POOL.workers == startable == len(started)
    a, b = RNG.standard_normal((20, 1024)), RNG.standard_normal((1024, 4096))
    out = np.empty((20, 4096))
    with ops.recurrent_loop(a, b):
        ops.step_matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)


def test_a_split_step_matmul_equals_one_matmul(monkeypatch):
    monkeypatch.setattr(threads, "cpu_threads", lambda: 3)
    a = RNG.standard_normal((20, 650)).astype(np.float32)
    b = RNG.standard_normal((650, 2600)).astype(np.float32)
    out = np.empty((20, 2600), np.float32)
    with ops.recurrent_loop(a, b):
        ops.step_matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-4)


def nvrtc_program():
    """CuPy's NVRTC program class, which compiles for a named architecture with no GPU present."""
    try:
        from cupy.cuda import compiler

        program = compiler._NVRTCProgram
        program("extern \"C\" __global__ void k() {}", "probe.cu").compile(("-arch=sm_90",))
    except Exception as exc:  # not installed, or no NVRTC library
        pytest.skip(f"NVRTC unusable here ({type(exc).__name__}: {exc}); pip install cupy-cuda13x nvidia-cuda-nvrtc")
    return program


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(ops.KERNELS))
def test_every_cuda_kernel_compiles(name, dtype):
    program = nvrtc_program()
    ptx, _ = program(ops.kernel_source(name, dtype), f"{name}.cu").compile(("-arch=sm_90", "-std=c++17"))
    assert f".entry {name}" in (ptx.decode() if isinstance(ptx, bytes) else ptx)


def test_a_broken_kernel_is_reported_by_the_compile_check():
    program = nvrtc_program()
    from cupy.cuda.compiler import CompileException

    with pytest.raises(CompileException, match="undefined"):
        program("typedef float T;\nextern \"C\" __global__ void k(T* x) { x[0] = undefined_name; }",
                "bad.cu").compile(("-arch=sm_90",))


def test_every_family_module_registers_its_kernels():
    """The compile check above covers every kernel: each `KERNELS["name"]` written in an ops module is
    in the one registry the check walks, and nothing is registered twice under one name."""
    import re
    from pathlib import Path

    written = []
    for source in sorted(Path(ops.__file__).parent.glob("*.py")):
        written += re.findall(r'^KERNELS\["(\w+)"\]', source.read_text(), flags=re.M)
    assert len(written) == len(set(written))
    assert sorted(written) == sorted(ops.KERNELS)


@pytest.mark.parametrize("shape", [(6, 40), (40, 6)])  # blocks of columns, blocks of rows
def test_an_accumulating_matmul_adds_to_out_block_by_block(monkeypatch, shape):
    monkeypatch.setattr(ops.linear, "ADD_BLOCK_ELEMENTS", 16)  # several blocks, the last a short one
    m, n = shape
    a, b = RNG.standard_normal((9, m)).T, RNG.standard_normal((n, 9)).T  # transposed views, as dW's operands
    start = RNG.standard_normal((m, n))
    for out in (start.copy(), start.T.copy().T):
        assert ops.matmul(a, b, out=out, accumulate=True) is out
        np.testing.assert_allclose(out, start + a @ b, rtol=1e-12)
    row, into = RNG.standard_normal(9), RNG.standard_normal(n)
    np.testing.assert_allclose(ops.matmul(row, b, out=into.copy(), accumulate=True), into + row @ b, rtol=1e-12)
    with pytest.raises(ValueError, match="accumulate adds to out"):
        ops.matmul(a, b, accumulate=True)
