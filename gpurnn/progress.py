"""Progress on long work: a one-line bar on a terminal, plain periodic lines otherwise."""

import sys
import time


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainingProgress:
    """Shows training progress: on_step after each iteration, on_log with each logged record."""

    def __init__(self, total, quiet=False, out=None, first=0):
        self.total, self.quiet = total, quiet
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.start, self.first = time.perf_counter(), first
        self.last_draw = 0.0
        self.summary = ""

    def on_step(self, iteration, total):
        if self.quiet or not self.tty:
            return
        now = time.perf_counter()
        if now - self.last_draw < 0.2 and iteration < total:
            return
        self.last_draw = now
        done = iteration - self.first
        eta = (now - self.start) / max(done, 1) * (total - iteration)
        filled = int(30 * iteration / total)
        self.out.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {iteration}/{total} {self.summary} "
                       f"ETA {format_duration(eta)}  ")
        self.out.flush()

    def on_log(self, record):
        self.summary = (f"ppl {record['train_perplexity']:.2f} {record['tokens_per_second']:,.0f} tok/s")
        valid = record.get("valid_perplexity")
        if self.quiet or (self.tty and valid is None):
            return
        line = (f"iter {record['iteration']:>7} epoch {record['epoch']:>8.2f} lr {record['lr']:.4g} "
                f"train ppl {record['train_perplexity']:9.2f} {record['tokens_per_second']:>9,.0f} tok/s")
        if valid is not None:
            line += f" valid ppl {valid:.2f}"
        self.out.write(("\r" if self.tty else "") + line + "\n")
        self.out.flush()

    def close(self):
        if self.tty and not self.quiet:
            self.out.write("\n")
