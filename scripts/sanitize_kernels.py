"""Every CUDA kernel of gpurnn on CuPy against the NumPy bodies, small and quick: for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py --exact-allocations
    compute-sanitizer --tool racecheck python scripts/sanitize_kernels.py --parts ops

Three parts, all in float64 (CuPy must give NumPy's numbers to 1e-9):
  ops    each op alone on the cases training rarely meets: softmax rows wider and narrower than a
         block, ignored targets, targets outside the vocabulary (a NaN loss, never a read outside
         the row), no rows at all; the embedding backward with repeated ids (np.add.at's bits) and
         one, two and three radix passes; squared norms over one and many blocks; SGD and Adam
         with clipping; dropout masks;
  train  a few training steps of each recurrent family (rnn with SGD, lstm and gru with Adam, all
         clipped, with dropout and the output tied to the embedding), eagerly (no CUDA graph);
  eval   the perplexity of a split with a padded last lane (ignored targets).
It prints one line per check and last `sanitize_kernels: ...`; it exits 1 on any mismatch, or when
all parts ran and a kernel of `gpurnn.ops.KERNELS` was never launched. `--exact-allocations` turns
CuPy's memory pool off, so that every array is its own allocation and memcheck sees a read past its
end (inside a pool block it would not). Under compute-sanitizer every launch is checked, so the
shapes stay tiny; `--vocab`, `--batch`, `--time`, `--hidden` and `--steps` make it larger.
"""

import argparse
import sys

import numpy as np

from gpurnn import ops
from gpurnn.backend import array_module, get_backend
from gpurnn.data.stream import IGNORE
from gpurnn.model import Model
from gpurnn.ops import kernels
from gpurnn.registry import Registry
from gpurnn.train.evaluate import perplexity
from gpurnn.train.optim import SGD, Adam

PARTS = ("ops", "train", "eval")
FAMILIES = ("rnn", "lstm", "gru")
TOLERANCE = 1e-9


class Checks:
    """Comparisons of device results with NumPy's, counted; the kernels launched, recorded."""

    def __init__(self, gpu):
        self.gpu, self.count, self.failed, self.launched = gpu, 0, [], set()

    def host(self, value):
        """A device array copied to the host; host values as they are."""
        on_host = isinstance(value, (np.ndarray, np.generic, float, int, list))
        return value if on_host else self.gpu.to_host(value)

    def close(self, name, got, want, exact=False):
        got, want = np.asarray(self.host(got), np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            ok, error = False, f"shape {got.shape}, not {want.shape}"
        elif exact:
            ok = np.array_equal(got, want, equal_nan=True)
            error = "bit for bit" if ok else f"{np.count_nonzero(got != want)} values differ"
        else:
            with np.errstate(invalid="ignore"):
                diff = np.where(np.isnan(want) & np.isnan(got), 0.0, np.abs(got - want))
            scale = 1 + np.abs(np.nan_to_num(want))
            worst = float(np.max(diff / scale)) if diff.size else 0.0
            ok, error = bool(worst <= TOLERANCE), f"largest error {worst:.1e}"
        self.count += 1
        if not ok:
            self.failed.append(name)
        print(f"{'ok' if ok else 'MISMATCH'}  {name}: {error}", flush=True)

    def watch_launches(self):
        """Record the name of every kernel the ops modules launch."""
        original = kernels.launch

        def launch(name, *args, **kwargs):
            self.launched.add(name)
            return original(name, *args, **kwargs)

        for module in [m for n, m in sorted(sys.modules.items()) if n.startswith("gpurnn.ops.")]:
            if getattr(module, "launch", None) is original:
                module.launch = launch


def on_both(checks, fn, *arrays):
    """fn(*arrays) on copies of the host arrays and on device copies: the two lists of arrays after
    the call (fn writes its results into them) and the two return values."""
    host = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]
    device = [checks.gpu.asarray(a, dtype=a.dtype) if isinstance(a, np.ndarray) else a for a in arrays]
    return host, device, fn(*host), fn(*device)


def check_ops(checks, rng):
    def softmax(x, t, buffer):
        loss, cache = ops.softmax_cross_entropy(x, t, IGNORE, buffer)
        return loss, ops.softmax_cross_entropy_backward(cache, 1.5)

    for rows, V, outside in ((9, 300, False), (9, 37, False), (5, 300, True), (0, 300, False)):
        x = rng.standard_normal((rows, V)) * 4
        t = rng.integers(0, V, rows).astype(np.int32)
        t[::4] = IGNORE
        if outside:
            t[1], t[3] = V, -7  # no column: their rows' loss and gradient are NaN
        _, _, (loss_h, grad_h), (loss_d, grad_d) = on_both(checks, softmax, x, t, np.empty_like(x))
        case = f"softmax {rows} x {V}{', targets outside' if outside else ''}"
        checks.close(f"{case}: loss", loss_d, loss_h)
        checks.close(f"{case}: gradient", grad_d, grad_h)

    N, D, V = 23, 6, 30  # the adaptive softmax: head words [0, 6), clusters [6, 13) and [13, 30)
    t = rng.integers(0, V, N).astype(np.int32)
    t[:5] = [0, 5, 12, 29, IGNORE]
    weights = [rng.standard_normal(shape) for shape in ((D, 8), (8,), (D, 3), (3, 7), (D, 1), (1, 17))]

    def adaptive(h, t, head, bias, P1, O1, P2, O2, *grads):
        weights = (head, bias, [(P1, O1), (P2, O2)])
        loss, cache = ops.adaptive_softmax_loss(h, t, weights, ops.AdaptiveClusters([6, 13], V, array_module(h)),
                                                IGNORE, ops.Workspace())
        g_head, g_bias, gP1, gO1, gP2, gO2 = grads
        return loss, ops.adaptive_softmax_loss_backward(cache, 1.5, weights,
                                                        (g_head, g_bias, [(gP1, gO1), (gP2, gO2)]))

    host, device, (loss_h, dh_h), (loss_d, dh_d) = on_both(
        checks, adaptive, rng.standard_normal((N, D)), t, *weights, *[np.zeros_like(w) for w in weights])
    checks.close("adaptive softmax: loss", loss_d, loss_h)
    checks.close("adaptive softmax: input gradient", dh_d, dh_h)
    checks.close("adaptive softmax: weight gradients", np.concatenate([checks.host(g).ravel() for g in device[8:]]),
                 np.concatenate([g.ravel() for g in host[8:]]))

    for vocab in (6, 300, 70_000):  # one, two and three radix passes
        index = np.concatenate([rng.integers(0, 5, 500), rng.integers(0, vocab, 500)]).astype(np.int32)
        target, rows = rng.standard_normal((vocab, 4)), rng.standard_normal((1000, 4))
        in_order = target.copy()
        np.add.at(in_order, index, rows)
        _, device, _, _ = on_both(checks, ops.scatter_add_rows, target, index, rows)
        checks.close(f"embedding backward, vocabulary {vocab}, repeated ids", device[0], in_order, exact=True)

    for n in (1, 1000, 300_001):
        g = rng.standard_normal(n)
        checks.close(f"squared norm of {n}", ops.squared_norm(checks.gpu.asarray(g)), [np.vdot(g, g)])

    lr = np.array([0.01])
    for clip in (0.0, 0.5):
        p, g, m, v = (rng.standard_normal(5000) for _ in range(4))
        host, device, _, _ = on_both(checks, lambda p, g, lr: ops.sgd_update(p, g, clip, lr), p, g, lr)
        checks.close(f"sgd update, clip {clip}", device[0], host[0])
        host, device, _, _ = on_both(checks, lambda p, g, m, v, lr: ops.adam_update(p, g, m, v, clip, lr, 0.9, 0.999,
                                                                                  1e-8), p, g, m, np.abs(v), lr)
        for k, what in enumerate(("p", "m", "v")):
            checks.close(f"adam update, clip {clip}: {what}", device[(0, 2, 3)[k]], host[(0, 2, 3)[k]])

    x, step = rng.standard_normal((5, 6, 7)), np.array([41], np.uint32)
    host, device, _, _ = on_both(checks, lambda x, out, step: ops.dropout(x, out, 0.3, 99, step, 4, first_lane=2),
                                 x, np.zeros_like(x), step)
    checks.close("dropout mask", checks.host(device[1]) == 0, host[1] == 0, exact=True)
    checks.close("dropout", device[1], host[1])


def specs(family, size):
    """`family` with dropout before and after it, the output tied to the embedding."""
    return [{"type": "embedding", "size": size}, {"type": "dropout", "p": 0.3},
            {"type": family, "hidden_size": size}, {"type": "dropout", "p": 0.3},
            {"type": "tied_affine", "tie_to": "embedding"}, {"type": "softmax_loss"}]


def batches(rng, args):
    """(xs, ts) int32 (B, T) with many repeated ids (half of them from the five most frequent)."""
    def ids():
        frequent = rng.integers(0, min(5, args.vocab), (args.batch, args.time))
        return np.where(rng.random(frequent.shape) < 0.5, frequent,
                        rng.integers(0, args.vocab, frequent.shape)).astype(np.int32)
    return [(ids(), ids()) for _ in range(args.steps)]


def check_training(checks, rng, args, registry, models):
    optimizers = {"rnn": (SGD, 0.5), "lstm": (Adam, 0.01), "gru": (Adam, 0.01)}
    for family in args.families:
        data = batches(rng, args)
        results = []
        for backend in (get_backend("numpy", "float64"), checks.gpu):
            model = Model(specs(family, args.hidden), args.vocab, backend, registry, seed=3)
            kind, lr = optimizers[family]
            optimizer, losses = kind(lr=lr), []
            for i, (xs, ts) in enumerate(data):
                model.set_step(i)
                losses.append(float(model.forward(backend.asarray(xs), backend.asarray(ts))))
                model.backward()
                optimizer.step(model.flat_params, model.flat_grads, max_norm=0.5)
            results.append((losses, checks.host(model.flat_params)))
            models.setdefault(family, []).append(model)
        name = f"{family}, {args.steps} steps of {optimizers[family][0].__name__} with clipping"
        checks.close(f"{name}: losses", results[1][0], results[0][0])
        checks.close(f"{name}: parameters", results[1][1], results[0][1])


def check_evaluation(checks, rng, args, registry, models):
    ids = rng.integers(0, args.vocab, 3 * args.time * 2 + 2).astype(np.int32)  # a padded last lane
    for family in args.families:
        pair = models.get(family) or [Model(specs(family, args.hidden), args.vocab, backend, registry, seed=3)
                                      for backend in (get_backend("numpy", "float64"), checks.gpu)]
        scores = [perplexity(model, ids, 3, args.time, cuda_graph=False)[0] for model in pair]
        checks.close(f"{family}: perplexity of {len(ids)} ids in 3 lanes", scores[1], scores[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: ops, train, eval")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: rnn, lstm, gru")
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--time", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--exact-allocations", action="store_true",
                        help="no memory pool: each array its own allocation, as memcheck needs")
    args = parser.parse_args(argv)
    parts, args.families = args.parts.split(","), args.families.split(",")
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(args.families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown part or family: {', '.join(unknown)}")
    gpu = get_backend("cupy", "float64")
    if args.exact_allocations:
        import cupy
        cupy.cuda.set_allocator(None)
    checks, rng, registry, models = Checks(gpu), np.random.default_rng(5), Registry(), {}
    checks.watch_launches()
    if "ops" in parts:
        check_ops(checks, rng)
    if "train" in parts:
        check_training(checks, rng, args, registry, models)
    if "eval" in parts:
        check_evaluation(checks, rng, args, registry, models)
    gpu.synchronize()
    missing = sorted(set(ops.KERNELS) - checks.launched) if set(parts) == set(PARTS) else []
    verdict = "passed" if not checks.failed and not missing else "FAILED"
    print(f"sanitize_kernels: {verdict}: {checks.count - len(checks.failed)} of {checks.count} checks agree with "
          f"NumPy; {len(checks.launched)} kernels launched"
          + (f"; never launched: {', '.join(missing)}" if missing else "")
          + (f"; mismatches: {'; '.join(checks.failed)}" if checks.failed else ""), flush=True)
    return 0 if verdict == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
