"""Row-sparse embedding gradients: the SGD update over only the rows a block used equals the dense one.

On the CPU the trainer lets the embedding clear and record only the rows each block writes, and the
SGD update (norm and step) reads only those rows of its table. Training must follow the dense run to
rounding, the gradient buffer must stay whole, and anything else writing the gradient (a tied
weight, an all-reduce over ranks) must keep it dense.
"""

import os

import numpy as np
import pytest

from gpurnn.backend import get_backend
from gpurnn.config import TrainConfig
from gpurnn.layers import LayerContext
from gpurnn.model import Model, preset_specs
from gpurnn.ops import sgd_update
from gpurnn.train.optim import SGD, Adam
from gpurnn.train.parallel import Group
from gpurnn.train.trainer import Trainer

V, B, T = 40, 3, 5


def test_sparse_update_equals_the_dense_one_where_the_gradient_is_zero_outside_its_rows():
    rng = np.random.default_rng(0)
    rows = np.array([1, 4, 7])
    table = np.zeros((9, 6))
    table[rows] = rng.standard_normal((3, 6))
    g = np.concatenate([rng.standard_normal(5), table.ravel(), rng.standard_normal(8)])
    p0 = rng.standard_normal(g.size)
    lr = np.array([0.5])
    for max_norm in (0, 1.0, 1e3):  # none, binding, not binding
        dense, sparse = p0.copy(), p0.copy()
        sgd_update(dense, g, max_norm, lr)
        sgd_update(sparse, g, max_norm, lr, sparse=[(5, 5 + table.size, 6, rows)])
        np.testing.assert_allclose(sparse, dense, rtol=1e-15, atol=1e-15)
        untouched = np.setdiff1d(np.arange(9), rows)
        np.testing.assert_array_equal(sparse[5:5 + table.size].reshape(9, 6)[untouched],
                                      p0[5:5 + table.size].reshape(9, 6)[untouched])
    assert not np.array_equal(dense, p0)


def batches(count, seed=1):
    """Blocks with repeated ids, each using a different subset of the vocabulary."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32))
            for _ in range(count)]


def trainer(backend, registry, optimizer, specs=None, group=None):
    specs = specs or preset_specs("rnnlm", wordvec_size=6, hidden_size=7)
    model = Model(specs, V, backend, registry, seed=5)
    return Trainer(model, optimizer, None, TrainConfig(batch_size=B, time_size=T, clip=0.3), group=group)


@pytest.mark.parametrize("make_optimizer", [lambda: SGD(lr=1.0), lambda: Adam(lr=0.01)], ids=["sgd", "adam"])
def test_training_with_row_sparse_gradients_follows_the_dense_run(np64, registry, make_optimizer):
    sparse, dense = trainer(np64, registry, make_optimizer()), trainer(np64, registry, make_optimizer())
    dense.model.use_sparse_rows(False)
    for xs, ts in batches(12):
        sparse.step(xs, ts)
        dense.step(xs, ts)
        (start, stop, row_size, rows), = sparse.model.sparse_segments()
        assert (start, stop, row_size) == (0, V * 6, 6)
        np.testing.assert_array_equal(rows, np.unique(xs))
        # the gradient buffer is whole: rows the last block used hold their sums, every other row is 0
        np.testing.assert_allclose(sparse.model.flat_grads, dense.model.flat_grads, rtol=1e-12, atol=1e-15)
    assert dense.model.sparse_segments() == []
    np.testing.assert_allclose(sparse.model.flat_params, dense.model.flat_params, rtol=1e-12, atol=1e-14)


def test_a_tied_table_and_gradients_summed_over_ranks_stay_dense(np64, registry):
    tied = trainer(np64, registry, SGD(lr=1.0), preset_specs("better-rnnlm", wordvec_size=6, hidden_size=6))
    for xs, ts in batches(2):
        tied.step(xs, ts)
    assert tied.model.sparse_segments() == []  # the tied output layer adds a dense gradient to the table

    class TwoRanks:  # the communicator of rank 0 of two: the trainer's choice reads only its size
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 2

    ranked = trainer(np64, registry, SGD(lr=1.0), group=Group(TwoRanks()))
    assert all(getattr(layer, "sparse_rows", None) is None for layer in ranked.model.layers)


def test_switching_to_row_sparse_gradients_clears_what_a_dense_step_left(np64, registry):
    switched, dense = trainer(np64, registry, SGD(lr=1.0)), trainer(np64, registry, SGD(lr=1.0))
    dense.model.use_sparse_rows(False)
    switched.model.use_sparse_rows(False)
    first, second = batches(2, seed=3)
    for t in (switched, dense):
        t.step(*first)
    switched.model.use_sparse_rows(True)
    for t in (switched, dense):
        t.step(*second)
    # the dense step wrote rows the second block does not use: they must not linger in the gradient
    assert np.setdiff1d(np.unique(first[0]), np.unique(second[0])).size
    np.testing.assert_allclose(switched.model.flat_grads, dense.model.flat_grads, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(switched.model.flat_params, dense.model.flat_params, rtol=1e-12, atol=1e-14)


def resident_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_the_first_row_sparse_backward_maps_only_the_rows_it_writes(registry):
    vocab, size = 200_000, 128  # a 98 MiB gradient table
    layer = registry.build_layer({"type": "embedding", "size": size},
                                 LayerContext(get_backend("numpy"), np.random.default_rng(0), None, vocab))
    layer.sparse_rows = {}
    ids = np.arange(100, dtype=np.int32).reshape(4, 25)  # 50 KiB of rows (spread out, huge pages would map more)
    layer.forward(ids)
    before = resident_mib()
    layer.backward(np.ones((4, 25, size), np.float32))
    assert resident_mib() - before < 20
    np.testing.assert_array_equal(layer.sparse_rows["W"], ids.ravel())
    assert layer.grads["W"][ids.ravel()].min() == 1 and layer.grads["W"].sum() == 100 * size
