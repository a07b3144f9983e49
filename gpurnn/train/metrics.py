"""Run records: one JSONL file per run, a header record first, then one record per logged step.

The header holds the run id, the time, the full configuration, the gpurnn version and the backend
and device. A resumed run appends to its file: a second header (with `resumed_at`) and records that
carry the same run id, so the run reads as one; first it drops a last line a kill cut short and the
steps the stopped process logged after its checkpoint, so each step is in the file once. `run_records`
picks one run out of a file and `plot_run` draws it. The plot needs matplotlib (the ``[plot]`` extra);
`require_matplotlib` says so before training starts rather than after hours of it.
"""

import json
import os
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

from .. import jsontext
from ..atomic import atomic_path, os_error_cause, same_file
from ..errors import GpurnnError


def new_run_id(model_name):
    """A run id that sorts by start time and stays unique for runs started in the same second."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{model_name}-{secrets.token_hex(2)}"


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class MetricsLog:
    """Writes one run's records to `path` as JSON lines, and keeps them in `records`.

    A new run refuses a file that holds another run's steps or sits beside its checkpoint (each run
    has its own); a resumed run appends to it. A run that stopped before its first checkpoint leaves
    nothing to resume: its records are kept aside (`stopped_path`) and the same command starts afresh.
    With `write` False (every rank but the first of a data-parallel job) it keeps the records only.
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
        begin = resume and checkpoint is not None and not Path(checkpoint).exists()  # stopped before a save
        mode, aside = "a", None
        if self.path.exists() and resume and not begin:
            self._keep_saved_steps(header.get("resumed_at", 0))
        elif self.path.exists():
            mode, aside = self._make_way(checkpoint)
        if begin or aside:
            print(f"note: no checkpoint at {checkpoint} yet: the run starts from the beginning"
                  + (f"; the stopped run's records are in {aside}" if aside else ""), file=sys.stderr)
        self._write({"kind": "header", "time": utc_now(), **header}, mode=mode)

    def _make_way(self, checkpoint):
        """How a new run begins in the existing file: ("w", None) to write it afresh, ("w", where the
        stopped run's records went), or GpurnnError where another run's are there to keep."""
        records = _readable_records(self.path)
        steps = records is None or any(r.get("kind") != "header" for r in records)
        # A file of headers alone, with no checkpoint beside it, is a run that stopped before its first
        # step (out of memory, say): nothing to keep, so the next attempt at the same path starts afresh.
        if not (checkpoint and Path(checkpoint).exists()) and not steps:
            return "w", None
        headers = [r for r in records or () if r.get("kind") == "header"]
        if (checkpoint and not Path(checkpoint).exists() and headers
                and all(same_file(r.get("checkpoint", ""), checkpoint) for r in headers)):
            aside = stopped_path(self.path)
            try:
                os.replace(self.path, aside)
            except OSError as exc:
                raise GpurnnError(f"cannot move metrics {self.path} aside: {os_error_cause(exc)}") from None
            return "w", aside
        raise GpurnnError(f"metrics file {self.path} already holds a run: pass --resume to continue "
                          "that run, or choose another --metrics file")

    def _keep_saved_steps(self, resumed_at):
        """Before a resumed run appends: drop a last line a kill cut short, and this run's steps after
        `resumed_at` (the stopped process logged them; this one logs them again), so each step is
        written once. The file is rewritten atomically, and only when something goes."""
        try:
            lines = self.path.read_text().splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as exc:
            raise GpurnnError(f"cannot read metrics {self.path}: {os_error_cause(exc)}") from None
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.endswith("\n"):
                break  # only the last line can lack its end: a write cut short
            try:
                record = json.loads(line) if line.strip() else {}
            except ValueError:
                raise GpurnnError(f"metrics file {self.path} line {number} is not JSON") from None
            if not (record.get("kind") == "step" and record.get("run_id") == self.run_id
                    and record.get("iteration", 0) > resumed_at):
                kept.append(line)
        if kept == lines:
            return
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(kept))
        except OSError as exc:
            raise GpurnnError(f"cannot write metrics to {self.path}: {os_error_cause(exc)}") from None

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


def stopped_path(path):
    """Where the records of a run that stopped before its first checkpoint are kept (the latest such run's):
    runs/x/checkpoint.metrics.jsonl -> checkpoint.metrics.stopped.jsonl."""
    path = Path(path)
    return path.with_name(f"{path.stem}.stopped{path.suffix}")


def _readable_records(path):
    """The records of the metrics file at `path`, or None where it is not one we can read."""
    try:
        records = read_records(path)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return records if all(isinstance(r, dict) for r in records) else None


def read_records(path):
    """The records of a metrics file; a last line without its end (a write cut short) is left out."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip() and line.endswith("\n")]


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
