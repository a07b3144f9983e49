"""Training records: appended to a JSONL file as they come, and drawn as perplexity curves.

The plot needs matplotlib (the ``[plot]`` extra); `require_matplotlib` says so before training
starts rather than after hours of it.
"""

import json
from pathlib import Path

from .. import jsontext
from ..atomic import atomic_path, os_error_cause
from ..errors import GpurnnError


class MetricsLog:
    """Collects records; with a path, appends each as one JSON line (a resumed run keeps appending)."""

    def __init__(self, path=None):
        self.path = Path(path) if path else None
        self.records = []
        if self.path and not self.path.parent.exists():
            raise GpurnnError(f"cannot write metrics to {self.path}: folder {self.path.parent} does not exist")

    def __call__(self, record):
        self.records.append(record)
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(jsontext.dumps(record) + "\n")
            except OSError as exc:
                raise GpurnnError(f"cannot write metrics to {self.path}: {os_error_cause(exc)}") from None

    def history(self):
        """Every record in the file (earlier runs included) followed by this run's, for plotting."""
        if not self.path or not self.path.exists():
            return list(self.records)
        try:
            with open(self.path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as exc:
            raise GpurnnError(f"cannot read metrics from {self.path}: {os_error_cause(exc)}") from None


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GpurnnError("--plot needs matplotlib: pip install 'gpurnn[plot]'") from None


def plot_perplexity(records, path):
    """Train (and validation, where evaluated) perplexity against iteration, as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iteration"] for r in records], [r["train_perplexity"] for r in records], label="train")
    valid = [r for r in records if "valid_perplexity" in r]
    if valid:
        ax.plot([r["iteration"] for r in valid], [r["valid_perplexity"] for r in valid], "o-", label="valid")
    ax.set_xlabel("iteration")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as exc:
        raise GpurnnError(f"cannot write the plot {path}: {os_error_cause(exc)}") from None
    finally:
        plt.close(fig)
