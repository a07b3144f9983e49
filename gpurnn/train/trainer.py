"""The training loop: truncated BPTT over an ordered stream, with logging, evaluation and checkpoints.

One iteration (`Trainer.step`): next (xs, ts) block from the stream -> forward (the hidden state
carries over from the previous block) -> backward -> optimizer step with the gradient norm clipped.
On CuPy the step is captured once as a CUDA graph and replayed (`--no-cuda-graph` turns that off).
The loss stays on the device; it is read back only when a window of iterations is logged, which is
also where a non-finite loss is caught. Everything that decides the next parameters (params,
optimizer, stream position, hidden state, iteration (which fixes the dropout masks), learning rate,
best validation perplexity) is saved in checkpoints, so a resumed run ends bit-identical to an
uninterrupted one.

Stopping: SIGINT (Ctrl-C), SIGTERM (kill, batch schedulers, docker stop) and SIGHUP end the current
iteration, save a checkpoint and raise Interrupted (exit status 128 + the signal's number); a second
signal stops at once without saving (after a save in progress completes), and one that comes after
the checkpoint is saved is ignored. A checkpoint is only ever written from finite parameters, so "the
last good checkpoint" is always good.
"""

import math
import os
import signal
import sys
import time
from dataclasses import asdict, replace

import numpy as np

from ..errors import CheckpointError
from ..memory import LOWER_STEP, OutOfMemory, out_of_memory
from ..ops import training_threads
from .checkpoint import restore_params, save_checkpoint
from .evaluate import perplexity, perplexity_of_loss
from .graph import CapturedStep
from .parallel import Group, RaisedAlike


class TrainingDiverged(RaisedAlike):
    """The loss became NaN or infinite (on every rank alike: they share the summed loss and the parameters)."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self):
        return 128 + self.signum

    def __str__(self):
        return f"{self.args[0]} ({signal.Signals(self.signum).name})"


class Observer:
    """What a Trainer reports as it runs, for progress displays and run records; override what you need
    (each method here does nothing).

    on_start(trainer) when `run()` begins; on_step(iteration, total, loss) after every iteration, the
    loss still on the device; on_eval(done, total) after each validation batch; on_log(record) for each
    logged record (iteration, epoch, lr, train_perplexity, tokens_per_second, and valid_perplexity when
    evaluated); on_notice(message) for one-off notices (each message once: a CUDA graph that cannot be
    captured, at training or at each validation).
    """

    def on_start(self, trainer):
        pass

    def on_step(self, iteration, total, loss):
        pass

    def on_eval(self, done, total):
        pass

    def on_log(self, record):
        pass

    def on_notice(self, message):
        pass


class Trainer:
    """Runs a model over a stream; `run()` trains until epochs/max_iters, saving where asked.

    Complete when made: `config` (a TrainConfig; log_every None becomes an epoch, at most 100),
    `observer` (an Observer) hears of progress, `extra_meta` is saved in checkpoints, `lock` (a held
    PathLock on the checkpoint) is released when run() ends, and `resume_from` (a loaded Checkpoint
    made by `save` for this model and stream) is where training continues; the optimizer keeps the
    rate it is given. With `best_path`, the checkpoint of the best validation perplexity so far is
    also written there.

    Data parallel: `group` (parallel.Group) is this rank's place among R ranks, each training on the
    stream's `lanes`; the gradients are summed over the ranks after backward, and rank 0 alone logs,
    evaluates and writes checkpoints. Without a group the trainer is one process.
    """

    def __init__(self, model, optimizer, stream, config, *, valid_ids=None, checkpoint_path=None,
                 vocab=(), extra_meta=None, observer=None, best_path=None, group=None, lock=None,
                 resume_from=None):
        if config.log_every is None and stream is not None:
            config = replace(config, log_every=min(stream.steps_per_epoch, 100))
        self.model, self.optimizer, self.stream, self.config = model, optimizer, stream, config
        self.group = group or Group()
        self.valid_ids = valid_ids
        self.checkpoint_path = checkpoint_path
        self.vocab, self.extra_meta = list(vocab), dict(extra_meta or {})
        self.observer = Observer() if observer is None else observer
        self.best_path = best_path
        backend = model.backend
        # Row-sparse embedding gradients save the CPU two passes over a large table per step; the
        # GPU makes those passes at memory speed, and a captured step needs fixed shapes.
        model.use_sparse_rows(self.group.size == 1 and not backend.is_gpu)
        self.graph = (CapturedStep(self._compute, backend, self._notice_once)
                      if backend.is_gpu and config.cuda_graph else None)
        self._noticed = set()
        self.iteration = 0
        self.best_valid = math.inf
        self.saved_iteration = None
        self._window = []
        self._window_start = None
        self._stop_signal = self._abort_signal = None  # the signal that asked to stop; to stop at once
        self._saving = False
        self.lock = lock
        if resume_from is not None:
            self._restore(resume_from)

    @property
    def total_iters(self):
        if self.config.max_iters is not None:
            return self.config.max_iters
        return self.config.epochs * self.stream.steps_per_epoch

    def run(self):
        """Train to `total_iters` and save; on a stop signal save a checkpoint and raise Interrupted."""
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        interrupted = False
        try:
            try:
                self.observer.on_start(self)
                with np.errstate(over="ignore", invalid="ignore"), self.threads():  # non-finite: caught later
                    self._loop_in_memory()
            except Interrupted as exc:
                # The checkpoint is saved and the process is ending: another stop signal is ignored, so
                # it cannot break the caller's wind-down or the interpreter's exit (which would end with
                # a traceback or killed by the signal). A caller that goes on restores the handlers.
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_IGN)
                interrupted, exc.signum = True, self._stop_signal
                raise
            self.save()  # a signal during this last save changes nothing: the run is complete
        finally:
            if not interrupted:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            self.release_lock()

    def threads(self):
        """The context to run steps in: on the CPU, BLAS on one thread when the step is small."""
        rows = self.config.batch_size // self.group.size * self.config.time_size
        return training_threads(self.model.backend.xp, self.model.flat_params.size * rows)

    def _notice_once(self, message):
        if message not in self._noticed:
            self._noticed.add(message)
            self.observer.on_notice(message)

    def release_lock(self):
        if self.lock is not None:
            self.lock.release()

    def _request_stop(self, signum, frame):
        if self.group.size > 1:
            # Many ranks cannot agree on where to stop: end the job here and now. Raising
            # KeyboardInterrupt instead could land in a weakref callback or __del__, where Python
            # prints it as ignored and the rank runs on.
            self.release_lock()
            return self.group.end_job(KeyboardInterrupt())  # MPI_Abort: does not come back
        if self._stop_signal is None:  # stop after this iteration, with a checkpoint
            self._stop_signal = signum
        elif self._saving:  # a second signal: stop as soon as the save in progress is complete
            self._abort_signal = signum
        else:
            self._abort(signum)

    def _abort(self, signum):
        """Stop at once without saving: the checkpoint on disk stays the last one written, complete."""
        kept = (f"; the checkpoint on disk is from iteration {self.saved_iteration}"
                if self.saved_iteration is not None else "")
        sys.stdout.flush()
        sys.stderr.write(f"\n{signal.Signals(signum).name} again: stopped at once{kept}\n")
        sys.stderr.flush()
        self.release_lock()
        os._exit(128 + signum)

    def _loop_in_memory(self):
        """`_loop`, where running out of memory is one line (OutOfMemory) saying so, and what is kept."""
        cfg = self.config
        try:
            with out_of_memory(f"in a training step (B={cfg.batch_size}, T={cfg.time_size})", LOWER_STEP):
                self._loop()
        except OutOfMemory as exc:
            raise OutOfMemory(f"{exc}{self._kept()}") from exc

    def _loop(self):
        cfg = self.config
        self.model.train()
        self._window_start = time.perf_counter()
        total = self.total_iters
        while self.iteration < total:
            xs, ts = next(self.stream)
            loss = self.step(xs, ts)
            self.iteration += 1
            self._window.append(loss)
            i = self.iteration
            evaluate = bool(cfg.eval_every and i % cfg.eval_every == 0) or (i == total and self.valid_ids is not None)
            save = bool(cfg.save_every and i % cfg.save_every == 0)
            stop = self._stop_signal is not None
            if i % cfg.log_every == 0 or evaluate or save or i == total or stop:
                self._log(evaluate)
            if save or stop:
                self.save()
            self.observer.on_step(i, total, loss)
            if stop:
                raise Interrupted(f"interrupted at iteration {i}")

    def step(self, xs, ts):
        """One iteration on host batches xs, ts: forward, backward, clipped update; the loss as a 0-d
        device array (nothing waits for the GPU)."""
        self.model.set_step(self.iteration)
        self.optimizer.prepare(self.model.flat_params)
        if self.graph is not None:
            return self.graph(xs, ts)
        backend = self.model.backend
        return self._compute(backend.asarray(xs), backend.asarray(ts))

    def _compute(self, xs, ts):
        """The device work of a step, the part a CUDA graph captures."""
        model = self.model
        loss = model.forward(xs, ts)
        model.backward(self.group.loss_share)  # this rank's share of the global mean loss
        self.group.reduce_gradients(model.flat_grads)
        self.optimizer.update(model.flat_params, model.flat_grads, self.config.clip, model.sparse_segments())
        return loss

    def _log(self, evaluate):
        """Read the window's losses back (the only host sync), check them, report, maybe evaluate."""
        backend = self.model.backend
        losses = backend.to_host(backend.xp.stack(self._window)).astype(float)
        losses = self.group.sum(losses * self.group.loss_share)  # the global batch's mean losses
        first = self.iteration - len(losses) + 1
        bad = [first + k for k, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"the loss became non-finite at iteration {bad[0]}{self._kept()}")
        elapsed = time.perf_counter() - self._window_start
        tokens = len(losses) * self.config.batch_size * self.config.time_size
        record = {"iteration": self.iteration, "epoch": round(self.iteration / self.stream.steps_per_epoch, 4),
                  "lr": self.optimizer.lr, "train_perplexity": perplexity_of_loss(float(losses.mean())),
                  "tokens_per_second": tokens / max(elapsed, 1e-9)}
        if evaluate and self.valid_ids is not None:
            valid = self.validate()
            record["valid_perplexity"] = valid
            scheduled = not self.config.eval_every or self.iteration % self.config.eval_every == 0
            # Only scheduled evaluations feed the decay rule and the best checkpoint: the extra one at
            # the end of a run must not change the course of a run resumed from there.
            if scheduled and self._plateau(valid) and self.best_path:
                self.save(self.best_path)
        if self.group.rank == 0:
            self.observer.on_log(record)
        self._window = []
        self._window_start = time.perf_counter()

    def validate(self):
        """The perplexity on `valid_ids`, the same on every rank (rank 0's sum); the training step's
        graph is captured again after it."""
        cfg = self.config
        valid = perplexity(self.model, self.valid_ids, cfg.eval_batch_size, cfg.time_size,
                           progress=self.observer.on_eval, on_note=self._notice_once, cuda_graph=cfg.cuda_graph,
                           group=self.group)[0]
        valid = self.group.from_root(lambda: valid)  # rank 0's sum: every rank decides alike
        if self.graph is not None:
            self.graph.reset()
        return valid

    def _plateau(self, valid):
        """Keep the best validation perplexity; decay the learning rate when it stops improving.

        True when `valid` is a new best."""
        if valid < self.best_valid:
            self.best_valid = valid
            return True
        if self.config.lr_decay:
            self.optimizer.lr *= self.config.lr_decay
        return False

    # -- checkpoints -------------------------------------------------------------------------------

    def _kept(self):
        return (f"; the last good checkpoint (iteration {self.saved_iteration}) is kept"
                if self.saved_iteration is not None else "")

    def save(self, path=None):
        """Write everything needed to resume to `path` or the checkpoint path (if any), atomically.

        Refuses (TrainingDiverged) to write non-finite parameters, leaving the last good checkpoint.
        With many ranks, every lane's state is gathered to rank 0, which alone writes the file.
        """
        path = path or self.checkpoint_path
        if not path:
            return
        self._saving = True
        try:
            self._save(path)
        finally:
            self._saving = False
        if self._abort_signal is not None:
            self._abort(self._abort_signal)

    def _save(self, path):
        backend = self.model.backend
        params = {k: backend.to_host(v) for k, v in self.model.params.items()}
        bad = [k for k, v in params.items() if not np.isfinite(v).all()]
        if bad:
            raise TrainingDiverged(f"parameter {bad[0]} became non-finite by iteration {self.iteration}: "
                                   f"not saved{self._kept()}")
        state = self.group.gather_lanes({k: backend.to_host(v) for k, v in self.model.get_state().items()})
        if self.group.rank != 0:
            self.saved_iteration = self.iteration
            return
        opt_state = self.optimizer.state_dict(self.model)
        arrays = {k: backend.to_host(v) for k, v in opt_state.items() if not isinstance(v, (int, float))}
        scalars = {k: v for k, v in opt_state.items() if isinstance(v, (int, float))}
        meta = {
            **self.extra_meta,
            "specs": self.model.specs,
            "layer_types": self.model.layer_sources,
            "vocab_size": self.model.vocab_size,
            "config": asdict(self.config),
            "trainer": {"iteration": self.iteration, "best_valid": _json_float(self.best_valid),
                        "lr": self.optimizer.lr},
            "optimizer_scalars": scalars,
            "stream": self.stream.state_dict(),
            "backend": backend.name,
        }
        try:
            save_checkpoint(path, params=params, optimizer_arrays=arrays, state=state,
                            vocab=self.vocab, meta=meta, layouts=self.model.param_layouts())
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}{self._kept()}") from None
        if path == self.checkpoint_path:
            self.saved_iteration = self.iteration

    def _restore(self, checkpoint):
        """Continue from a loaded Checkpoint made by `save` for this same model and stream."""
        backend, model, meta = self.model.backend, self.model, checkpoint.meta
        restore_params(model.params, checkpoint, backend)
        self.optimizer.load_state_dict({**meta["optimizer_scalars"], **checkpoint.optimizer_arrays}, model)
        lo, hi = self.stream.lanes  # the saved state holds every lane of the global batch
        model.set_state({k: backend.asarray(v[lo:hi]) for k, v in checkpoint.state.items()})
        self.stream.load_state_dict(meta["stream"])
        self.iteration = meta["trainer"]["iteration"]
        self.best_valid = _from_json_float(meta["trainer"]["best_valid"])
        self.saved_iteration = self.iteration


def _json_float(x):
    return None if math.isinf(x) else x


def _from_json_float(x):
    return math.inf if x is None else x
