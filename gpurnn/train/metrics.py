"""Run records: one JSONL file per run, a header record first, then one record per logged step.

The header holds the run id, the time, the full configuration, the gpurnn version and the backend
and device. A resumed run appends to its file: a second header (with `resumed_at`) and records that
carry the same run id, so the run reads as one. `run_records` picks one run out of a file and
`plot_run` draws it. The plot needs matplotlib (the ``[plot]`` extra); `require_matplotlib` says so
before training starts rather than after hours of it.
"""

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path

from .. import jsontext
from ..atomic import atomic_path, os_error_cause
from ..errors import GpurnnError


def new_run_id(model_name):
    """A run id that sorts by start time and stays unique for runs started in the same second."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{model_name}-{secrets.token_hex(2)}"


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class MetricsLog:
    """Writes one run's records to `path` as JSON lines, and keeps them in `records`.

    A new run refuses a file that holds another run's steps or sits beside its checkpoint (each run
    has its own); a resumed run appends to it. With
    `write` False (every rank but the first of a data-parallel job) it keeps the records only.
    """

    def __init__(self, path, header, resume=False, write=True, checkpoint=None):
        self.path = Path(path)
        self.run_id = header["run_id"]
        self.records = []
        self.write = write
        if not write:
            return
        if not self.path.parent.is_dir():
            raise GpurnnError(f"cannot write metrics to {self.path}: folder {self.path.parent} does not exist")
        fresh = (not resume and self.path.exists() and not _has_steps(self.path)
                 and not (checkpoint and Path(checkpoint).exists()))
        if self.path.exists() and not resume and not fresh:
            raise GpurnnError(f"metrics file {self.path} already holds a run: pass --resume to continue "
                              "that run, or choose another --metrics file")
        # A file of headers alone, with no checkpoint beside it, is a run that stopped before its first
        # step (out of memory, say): nothing to keep, so the next attempt at the same path starts afresh.
        self._write({"kind": "header", "time": utc_now(), **header}, mode="w" if fresh else "a")

    def _write(self, record, mode="a"):
        if not self.write:
            return
        try:
            with open(self.path, mode) as f:
                f.write(jsontext.dumps(record) + "\n")
        except OSError as exc:
            raise GpurnnError(f"cannot write metrics to {self.path}: {os_error_cause(exc)}") from None

    def __call__(self, record):
        self.records.append(record)
        self._write({"kind": "step", "run_id": self.run_id, **record})


def _has_steps(path):
    """Whether the metrics file at `path` holds a step record (or is not one we can read)."""
    try:
        return any(record.get("kind") != "header" for record in read_records(path))
    except (OSError, ValueError, AttributeError):
        return True


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_records(records, run_id):
    """(first header, step records) of run `run_id`, in iteration order.

    Where the run was resumed at iteration k, the records written after k by the stopped process
    (never saved in a checkpoint) are replaced by the resumed process's.
    """
    headers, steps = [], []
    for record in records:
        if record.get("run_id") != run_id:
            continue
        if record.get("kind") == "header":
            headers.append(record)
            resumed_at = record.get("resumed_at")
            if resumed_at is not None:
                steps = [r for r in steps if r["iteration"] <= resumed_at]
        else:
            steps.append(record)
    if not headers:
        raise GpurnnError(f"no run {run_id!r} in the metrics records")
    return headers[0], steps


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GpurnnError("--plot needs matplotlib: pip install 'gpurnn[plot]'") from None


def run_figure(header, steps):
    """A matplotlib figure of one run: train and validation perplexity against iteration.

    The epoch is on a second axis along the top, learning-rate changes are dotted vertical lines, and
    the title names the model and the corpus.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["iteration"] for r in steps], [r["train_perplexity"] for r in steps], label="train")
    valid = [r for r in steps if "valid_perplexity" in r]
    if valid:
        ax.plot([r["iteration"] for r in valid], [r["valid_perplexity"] for r in valid], "o-", label="valid")
    for before, after in zip(steps, steps[1:]):  # a decay follows the validation of `before`'s iteration
        if after["lr"] != before["lr"]:
            ax.axvline(before["iteration"], color="gray", linestyle=":", linewidth=1)
            ax.annotate(f"lr {after['lr']:.3g}", (before["iteration"], 1), xycoords=("data", "axes fraction"),
                        xytext=(2, -12), textcoords="offset points", fontsize=8, color="gray")
    per_epoch = next((r["iteration"] / r["epoch"] for r in steps if r["epoch"]), None)
    if per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda i: i / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    ax.set_xlabel("iteration")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"{header['model_name']} on {header['corpus']} (run {header['run_id']})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_run(header, steps, path):
    """Draw one run (see `run_figure`) into a PNG at `path`, atomically."""
    import matplotlib.pyplot as plt

    fig = run_figure(header, steps)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as exc:
        raise GpurnnError(f"cannot write the plot {path}: {os_error_cause(exc)}") from None
    finally:
        plt.close(fig)
