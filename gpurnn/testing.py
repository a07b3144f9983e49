"""The conformance kit: checks that any layer type, built-in or a user's, keeps the layer contract
written in `gpurnn.contract`.

    from gpurnn.testing import check_layer
    check_layer("my_layer", {"size": 8}, plugins=["my_plugin"])

`check_layer` builds the layer in float64 and checks, in this order: output shape and dtype; for
stateful layers the truncated-BPTT semantics (`reset_state` starts afresh like a newly built layer,
two blocks equal one long block, a repeated block sees the carried state); that forward and backward
leave their arguments unmodified; that backward writes the gradients rather than adding to them;
that non-contiguous inputs give the numbers contiguous ones give; every parameter's and the input's
gradient against central differences (the gradient of a block treating the carried state as a
constant); that the layer built in float32 gives the float64 outputs and gradients within `F32_TOL`;
and where CuPy is usable that CuPy gives NumPy's numbers.
The layer is checked the way a model holds it: its parameters moved into flat buffers
(`Layer.adopt_buffers`), so a layer that kept references to its old arrays fails the gradient check.
Layers that sample while training (dropout) draw from (seed, step, layer) alone, so every evaluation
sees the same mask: the checks are those of the masked function.
Failures raise `ConformanceError` (an AssertionError) saying what broke.
"""

import numpy as np

from .backend import get_backend, probe_cupy
from .contract import STATEFUL_METHODS
from .layers import LayerContext
from .registry import Registry

EPS = 1e-6
F32_TOL = 1e-4  # float32 against float64: max |a32 - a64| / max |a64|, per output and per gradient


class ConformanceError(AssertionError):
    """A layer broke the layer contract; the message says how."""


def relative_error(analytic, numeric):
    """max |a - n| / max(max |a|, max |n|, 1e-8): one number per array, robust to tiny entries."""
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0), 1e-8)
    return float(np.abs(a - n).max(initial=0.0) / scale)


def numerical_gradient(f, array, eps=EPS):
    """Central differences of the scalar f() with respect to every entry of `array` (changed in place)."""
    grad = np.zeros(array.shape)
    flat = array.reshape(-1)  # a view: perturbing it perturbs `array`
    for i in range(flat.size):
        old = flat[i].item()
        flat[i] = old + eps
        plus = float(f())
        flat[i] = old - eps
        minus = float(f())
        flat[i] = old
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def _check(condition, message):
    if not condition:
        raise ConformanceError(message)


class _Probe:
    """One layer with fixed random inputs, reduced to a scalar so gradients can be compared.

    Everything random is drawn from `seed`, so a probe on another backend sees the same numbers.
    """

    def __init__(self, layer, ctx, batch, time, seed):
        self.layer, self.backend, self.seed = layer, ctx.backend, seed
        self.shape, self.ctx = (batch, time), ctx
        targets = np.random.default_rng(seed + 1).integers(0, ctx.vocab_size, self.shape)
        self.t = self.backend.asarray(targets)
        self.weights = None
        self.out = None

    def block(self, k):
        """Input block number k (token ids or float features), on the layer's backend."""
        rng = np.random.default_rng(self.seed + 10 + k)
        if self.layer.takes_ids:
            return self.backend.asarray(rng.integers(0, self.ctx.vocab_size, self.shape))
        x = rng.standard_normal(self.shape + (self.ctx.input_size,))
        return self.backend.asarray(x, dtype=self.backend.dtype)

    def scalar(self, x):
        """The layer's loss, or sum(out * R) with a fixed random R for an ordinary layer."""
        if self.layer.is_loss:
            self.out = self.layer.forward(x, self.t)
            return self.out
        out = self.out = self.layer.forward(x)
        if self.weights is None:
            r = np.random.default_rng(self.seed + 2).standard_normal(out.shape)
            self.weights = self.backend.asarray(r, dtype=out.dtype)
        return (out * self.weights).sum()

    def backward(self):
        return self.layer.backward(1.0 if self.layer.is_loss else self.weights)

    def host(self, array):
        return None if array is None else np.array(self.backend.to_host(array))


def build_checked_layer(registry, layer_type, options, backend, vocab_size, input_size, seed):
    """The layer built as a model builds it, its parameters moved into fresh flat buffers."""
    ctx = LayerContext(backend, np.random.default_rng(seed), input_size, vocab_size, seed=seed)
    layer = registry.build_layer({"type": layer_type, **(options or {})}, ctx)
    size = sum(p.size for p in layer.params.values())
    layer.adopt_buffers(backend.xp.empty(size, backend.dtype), backend.xp.zeros(size, backend.dtype))
    if layer.is_loss:  # its input: logits over the vocabulary, or features where it says so (input_size)
        ctx.input_size = getattr(layer, "input_size", None) or vocab_size
    return layer, ctx


def gradient_errors(probe, x, state=None):
    """Relative errors of every analytic gradient (params and, for float inputs, the input).

    With `state`, each evaluation restarts from that carried state, so the check sees the block's
    gradient with the state held constant: truncated BPTT.
    """
    layer = probe.layer

    def f():
        if state is not None:
            layer.set_state(state)
        return probe.scalar(x)

    f()
    dx = probe.backward()
    analytic = {k: probe.host(v) for k, v in layer.grads.items()}
    targets = list(layer.params.items())
    if not layer.takes_ids:
        _check(dx is not None and dx.shape == x.shape,
               f"backward must return d(input) with the input's shape {x.shape}, got "
               f"{None if dx is None else dx.shape}")
        analytic["<input>"] = probe.host(dx)
        targets.append(("<input>", x))
    return {name: relative_error(analytic[name], numerical_gradient(f, value)) for name, value in targets}


def run_blocks(probe, count=2):
    """From a fresh state, the outputs of `count` consecutive blocks, then backward: all on the host."""
    if probe.layer.stateful:
        probe.layer.reset_state()
    outs = []
    for k in range(count):
        probe.scalar(probe.block(k))
        outs.append(probe.host(probe.out))
    dx = probe.host(probe.backward())
    return outs, dx, {k: probe.host(v) for k, v in probe.layer.grads.items()}


def check_layer(layer_type, options=None, *, plugins=(), registry=None, vocab_size=7, input_size=5,
                batch=2, time=3, seed=0, tol=1e-5):
    """Check `layer_type` (built with `options`) against the layer contract; return a report dict.

    Raises ConformanceError on the first violation. The report holds the relative errors of the
    gradient check and of float32 against float64, per parameter, which optional checks ran
    (stateful, cupy parity), and the CuPy parity's largest relative error where it ran.
    """
    registry = registry or Registry(plugins=plugins)
    backend = get_backend("numpy", dtype="float64")
    probe = _Probe(*build_checked_layer(registry, layer_type, options, backend, vocab_size, input_size, seed),
                   batch, time, seed)
    layer = probe.layer
    report = {"layer_type": layer_type, "stateful": bool(layer.stateful), "cupy_parity": False}
    check_shapes(probe)
    x1, x2 = probe.block(0), probe.block(1)
    if layer.stateful:  # first: the checks below rely on reset_state()
        fresh, _ = build_checked_layer(registry, layer_type, options, backend, vocab_size, input_size, seed)
        check_stateful(probe, x1, x2, fresh)
    check_inputs_unmodified(probe)
    check_grads_written(probe)
    check_noncontiguous(probe)
    if layer.stateful:
        layer.reset_state()
        probe.scalar(x1)  # the carried state now comes from block 1
        state = {k: v.copy() for k, v in layer.get_state().items()}
        report["grad_errors"] = gradient_errors(probe, x2, state)
    else:
        report["grad_errors"] = gradient_errors(probe, x1)
    name, worst = max(report["grad_errors"].items(), key=lambda kv: kv[1], default=("", 0.0))
    _check(worst < tol, f"gradient of {name!r} differs from central differences: "
                        f"relative error {worst:.2e} >= {tol:.0e}")
    report["float32_errors"] = check_float32(registry, layer_type, options, vocab_size, input_size, seed, probe)
    cupy, _ = probe_cupy()
    if cupy is not None:
        report["cupy_parity_error"] = check_cupy_parity(registry, layer_type, options, vocab_size, input_size,
                                                        seed, probe)
        report["cupy_parity"] = True
    return report


def check_shapes(probe):
    """Output shape (B, T, output_size) and the backend's dtype; a loss layer returns a scalar."""
    layer, x = probe.layer, probe.block(0)
    if layer.stateful:
        layer.reset_state()
    if layer.is_loss:
        out = layer.forward(x, probe.t)
        _check(np.ndim(out) == 0, f"a loss layer's forward must return a scalar, got shape {np.shape(out)}")
        return
    out = layer.forward(x)
    expected = probe.shape + (layer.output_size,)
    _check(out.shape == expected, f"forward gave shape {out.shape}, expected {expected}")
    _check(out.dtype == probe.backend.dtype, f"forward gave dtype {out.dtype}, expected {probe.backend.dtype}")


def check_inputs_unmodified(probe):
    """forward leaves x (and a loss layer's targets) as they were; backward leaves dout and x."""
    layer, host = probe.layer, probe.host
    if layer.stateful:
        layer.reset_state()
    x = probe.block(0)
    x_before, t_before = host(x).copy(), host(probe.t).copy()
    probe.scalar(x)
    _check(np.array_equal(host(x), x_before), "forward modified its input x in place (copy it before changing it)")
    _check(np.array_equal(host(probe.t), t_before), "forward modified its targets t in place")
    dout_before = None if layer.is_loss else host(probe.weights).copy()
    probe.backward()
    if dout_before is not None:
        _check(np.array_equal(host(probe.weights), dout_before),
               "backward modified its input dout in place (copy it before changing it)")
    _check(np.array_equal(host(x), x_before), "backward modified forward's input x in place")


def noncontiguous(xp, a):
    """`a`'s values in an array that is not C-contiguous: every other column of one twice as wide."""
    wide = xp.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


def forward_backward_twice(probe, second):
    """(output, input gradient, grads) on the host for block 0 run twice from a fresh state, the
    second time with every array passed through `second`."""
    layer, host, xp = probe.layer, probe.host, probe.backend.xp
    x, t = probe.block(0), probe.t
    results = []
    for make in (lambda a: a, second):
        if layer.stateful:
            layer.reset_state()
        if layer.is_loss:
            out = layer.forward(make(x), make(t))
            dx = layer.backward(1.0)
        else:
            out = layer.forward(make(x))
            dx = layer.backward(make(probe.weights if probe.weights is not None else xp.ones(out.shape, out.dtype)))
        results.append((host(out), host(dx), {k: host(v) for k, v in layer.grads.items()}))
    return results


def check_grads_written(probe):
    """A second forward and backward on the same block give the same gradients: backward writes
    grads rather than adding to them (nothing zeroes them between iterations)."""
    (_, _, grads_a), (_, _, grads_b) = forward_backward_twice(probe, lambda a: a)
    for k in grads_a:
        _check(np.array_equal(grads_a[k], grads_b[k]),
               f"a second backward on the same block gives another gradient of {k!r}: backward must write "
               f"grads[{k!r}], not add to it (nothing zeroes gradients between iterations)")


def check_noncontiguous(probe, rtol=1e-10):
    """Non-contiguous x, targets and dout give the outputs and gradients contiguous ones give."""
    xp = probe.backend.xp
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = forward_backward_twice(probe, lambda a: noncontiguous(xp, a))

    def close(a, b):
        return (a is None and b is None) or (a is not None and b is not None and np.allclose(a, b, rtol=rtol, atol=0))

    _check(close(out_a, out_b), "forward gives other outputs for a non-contiguous input than for a contiguous one")
    _check(close(dx_a, dx_b), "backward gives another input gradient for non-contiguous arrays than for contiguous ones")
    for k in grads_a:
        _check(close(grads_a[k], grads_b[k]),
               f"backward gives another gradient of {k!r} for non-contiguous arrays than for contiguous ones")


def check_stateful(probe, x1, x2, fresh):
    """reset_state() starts afresh (like `fresh`, the same layer newly built); two consecutive blocks
    equal one long block; a repeated block without reset_state() sees the carried state."""
    layer, host = probe.layer, probe.host
    missing = [m for m in STATEFUL_METHODS if not callable(getattr(layer, m, None))]
    _check(not missing, f"a stateful layer needs {', '.join(m + '()' for m in missing)}")
    first = host(fresh.forward(x1))
    layer.forward(x1)  # leave a state behind
    layer.reset_state()
    _check(np.allclose(host(layer.forward(x1)), first),
           "after reset_state() the first block gives other outputs than a newly built layer: "
           "the state was never reset (reset_state() must make the next forward start from zeros)")
    second = host(layer.forward(x2))
    layer.reset_state()
    both = host(layer.forward(probe.backend.xp.concatenate([x1, x2], axis=1)))
    _check(np.allclose(both[:, x1.shape[1]:], second),
           "forward over two blocks differs from one forward over both: the state is not carried "
           "from one forward to the next")
    layer.reset_state()
    layer.forward(x1)
    _check(not np.allclose(host(layer.forward(x1)), first),
           "repeating a block without reset_state() gives the same outputs: the state is not carried")


def check_float32(registry, layer_type, options, vocab_size, input_size, seed, probe64, tol=F32_TOL):
    """The layer built in float32 (same seed, same inputs) gives float64's outputs and gradients within
    `tol` (relative to each array's largest entry); returns {"output", "<input>", params: error}.
    In training mode: a dropout mask depends on (seed, step, layer) alone, not on the dtype.
    """
    f32 = get_backend("numpy", dtype="float32")
    probe32 = _Probe(*build_checked_layer(registry, layer_type, options, f32, vocab_size, input_size, seed),
                     *probe64.shape, seed)
    (outs_a, dx_a, grads_a), (outs_b, dx_b, grads_b) = run_blocks(probe64), run_blocks(probe32)
    _check(all(o.dtype == np.float32 for o in outs_b if o.ndim),
           f"forward in float32 gave dtype {outs_b[-1].dtype}, expected float32")
    errors = {"output": max(relative_error(b, a) for a, b in zip(outs_a, outs_b))}
    if dx_a is not None and dx_b is not None:
        errors["<input>"] = relative_error(dx_b, dx_a)
    errors.update({k: relative_error(grads_b[k], grads_a[k]) for k in grads_a})
    name, worst = max(errors.items(), key=lambda kv: kv[1])
    what = "forward's output" if name == "output" else f"the gradient of {name!r}"
    _check(worst < tol, f"in float32 {what} differs from float64: relative error {worst:.2e} >= {tol:.0e}")
    return errors


def check_cupy_parity(registry, layer_type, options, vocab_size, input_size, seed, np_probe, tol=1e-10):
    """The same layer on CuPy (float64, same seed, same inputs) gives NumPy's outputs and gradients
    (in training mode: a dropout mask is the same on both); returns the largest relative error."""
    gpu = get_backend("cupy", dtype="float64")
    gpu_probe = _Probe(*build_checked_layer(registry, layer_type, options, gpu, vocab_size, input_size, seed),
                       *np_probe.shape, seed)
    (outs_a, dx_a, grads_a), (outs_b, dx_b, grads_b) = run_blocks(np_probe), run_blocks(gpu_probe)
    pairs = {f"output {k}": (a, b) for k, (a, b) in enumerate(zip(outs_a, outs_b))}
    pairs.update({f"gradient {k!r}": (grads_a[k], grads_b[k]) for k in grads_a})
    _check((dx_a is None) == (dx_b is None), "CuPy and NumPy disagree on whether there is an input gradient")
    if dx_a is not None:
        pairs["input gradient"] = (dx_a, dx_b)
    errors = {what: relative_error(a, b) for what, (a, b) in pairs.items()}
    what, worst = max(errors.items(), key=lambda kv: kv[1])
    _check(worst < tol, f"CuPy {what} differs from NumPy: relative error {worst:.2e} >= {tol:.0e}")
    return worst


def check_model_gradients(model, blocks, tol=1e-5):
    """Gradient check of a whole float64 model on the last of consecutive (xs, ts) blocks.

    The earlier blocks only set the carried state, which each evaluation restores, so the check sees
    truncated BPTT's gradient (a training-mode dropout mask depends only on the model's step counter,
    the same in every evaluation). Returns {param name: relative error}; raises ConformanceError
    past `tol`.
    """
    backend = model.backend
    model.reset_state()
    for xs, ts in blocks[:-1]:
        model.forward(xs, ts)
    state = {k: v.copy() for k, v in model.get_state().items()}
    xs, ts = blocks[-1]

    def f():
        model.set_state(state)
        return model.forward(xs, ts)

    f()
    model.backward()
    analytic = {k: np.array(backend.to_host(v)) for k, v in model.grads.items()}
    errors = {k: relative_error(analytic[k], numerical_gradient(f, v)) for k, v in model.params.items()}
    name, worst = max(errors.items(), key=lambda kv: kv[1])
    _check(worst < tol, f"model gradient of {name!r} differs from central differences: "
                        f"relative error {worst:.2e} >= {tol:.0e}")
    return errors
