"""Progress on long work: a tqdm bar that fits the terminal (and follows resizes), or plain lines.

On a terminal, training shows one bar with the running perplexity and tokens/s from the first
iterations, a second bar while the validation split is scored, and a line per validation result,
wrapped between fields to the terminal's width. Elsewhere (a file, a pipe, CI) it prints one plain
line per logged record and no bars.
"""

import math
import os
import shutil
import sys
import time

from tqdm import tqdm

# Counts and timings on the left, the bar in the middle (it shrinks first), the rest trimmed by tqdm.
BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix} [{elapsed}<{remaining}]"
REDRAW_SECONDS = 0.2
SMOOTHING = 0.3  # weight of the newest loss sample in the running loss


def terminal_width(out):
    """The width of the terminal `out` writes to (COLUMNS or 80 when it cannot be told: a pseudo-terminal
    an MPI launcher gives a rank says 0)."""
    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns or shutil.get_terminal_size().columns


def is_terminal(out):
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


class FittingBar(tqdm):
    """A tqdm bar that clears the rest of its line instead of padding it with spaces.

    tqdm pads a redraw to the previous one's length; after the terminal narrows, that padding wraps
    onto a new line. Erasing to the end of the line (ANSI EL) fits any width.
    """

    @staticmethod
    def status_printer(file):
        def print_status(s):
            file.write("\r" + s + "\x1b[K")
            file.flush()

        return print_status


def new_bar(out, total, desc, initial=0, leave=True):
    """A tqdm bar on `out` that re-reads the terminal width at every redraw."""
    return FittingBar(total=total, initial=initial, desc=desc, file=out, dynamic_ncols=True, leave=leave,
                mininterval=REDRAW_SECONDS, bar_format=BAR_FORMAT)


def log_fields(record):
    """One logged record as fields: iteration, epoch, lr, train perplexity, speed, validation."""
    fields = [f"iter {record['iteration']:>7}", f"epoch {record['epoch']:>8.2f}", f"lr {record['lr']:.4g}",
              f"train ppl {record['train_perplexity']:9.2f}", f"{record['tokens_per_second']:>9,.0f} tok/s"]
    if record.get("valid_perplexity") is not None:
        fields.append(f"valid ppl {record['valid_perplexity']:.2f}")
    return fields


def fit_fields(fields, width):
    """The fields joined by spaces, broken into lines of at most `width` between fields only."""
    lines = []
    for field in fields:
        if lines and len(lines[-1]) + 1 + len(field) <= width:
            lines[-1] += " " + field
        else:
            lines.append(field.lstrip())
    return "\n".join(lines)


class EvalProgress:
    """A bar over evaluation batches, shown on a terminal only: call it with (done, total)."""

    def __init__(self, out=None, desc="eval", quiet=False):
        self.out = out or sys.stderr
        self.show = is_terminal(self.out) and not quiet
        self.desc, self.bar = desc, None

    def __call__(self, done, total):
        if not self.show:
            return
        if self.bar is None:
            self.bar = new_bar(self.out, total, f"{self.desc} ", leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainingProgress:
    """Training progress: on_step after each iteration, on_eval while validating, on_log per record.

    The loss handed to on_step stays on the device; it is read (one host sync) only when the bar is
    redrawn, at most every REDRAW_SECONDS.
    """

    def __init__(self, total, quiet=False, out=None, first=0, tokens_per_iter=0):
        self.quiet = quiet
        self.out = out or sys.stderr
        self.tty = is_terminal(self.out)
        self.first, self.tokens_per_iter = first, tokens_per_iter
        self.start = time.perf_counter()
        self.last_draw = -math.inf
        self.running_loss = None
        self.bar = new_bar(self.out, total, "", initial=first) if self.tty and not quiet else None
        self.on_eval = EvalProgress(self.out, "valid", quiet=quiet or not self.tty)

    def on_step(self, iteration, total, loss=None):
        if self.bar is None:
            return
        now = time.perf_counter()
        if now - self.last_draw >= REDRAW_SECONDS or iteration >= total:
            self.last_draw = now
            self.bar.set_postfix_str(self.speed_text(iteration, now, loss), refresh=False)
        self.bar.update(iteration - self.bar.n)

    def speed_text(self, iteration, now, loss):
        """Running perplexity (from sampled losses) and tokens/s since the start, for the bar."""
        parts = []
        if loss is not None:
            value = float(loss)
            old = self.running_loss
            self.running_loss = value if old is None or not math.isfinite(old) else (
                SMOOTHING * value + (1 - SMOOTHING) * old)
            parts.append(f"ppl {math.exp(min(self.running_loss, 700)):.2f}")
        if self.tokens_per_iter:
            rate = (iteration - self.first) * self.tokens_per_iter / max(now - self.start, 1e-9)
            parts.append(f"{tqdm.format_sizeof(rate)} tok/s")
        return " ".join(parts)

    def on_log(self, record):
        if self.tty and record.get("valid_perplexity") is None:
            return
        self.message(log_fields(record))

    def message(self, fields):
        """Print a line made of `fields` (above the bar, broken between fields to fit a terminal)."""
        if not self.quiet:
            self.write(fields)

    def notice(self, text):
        """Print a one-off notice (such as a CUDA graph that could not be captured), even when quiet."""
        self.write(text.split(" "))

    def write(self, fields):
        if self.bar is None:
            self.out.write(" ".join(fields) + "\n")
            self.out.flush()
            return
        self.bar.write(fit_fields(fields, terminal_width(self.out) - 1), file=self.out)

    def close(self):
        self.on_eval.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
