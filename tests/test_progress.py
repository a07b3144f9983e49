"""The progress display: a bar that fits the terminal and follows resizes on a tty, plain lines elsewhere.

The terminal is a real pseudo-terminal whose size the test sets, so tqdm measures it as it would a
user's.
"""

import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

from gpurnn.train import progress as progress_module
from gpurnn.train.progress import EvalProgress, TrainingProgress, fit_fields

RECORD = {"iteration": 10, "epoch": 0.5, "lr": 0.1, "train_perplexity": 123.4, "tokens_per_second": 5000.0}
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Pty:
    """A pseudo-terminal: `out` writes to it as to a terminal; `screen_lines()` reads back what it showed."""

    def __init__(self, columns):
        self.master, slave = os.openpty()
        self.resize(columns)
        self.out = os.fdopen(slave, "w", buffering=1)

    def resize(self, columns):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))

    def screen_lines(self):
        """Each redraw or line written since the last call (split at carriage returns and newlines)."""
        self.out.flush()
        data = b""
        while select.select([self.master], [], [], 0.2)[0]:
            chunk = os.read(self.master, 65536)
            if not chunk:
                break
            data += chunk
        text = ESCAPE.sub("", data.decode())
        return [part for part in re.split(r"[\r\n]+", text) if part.strip()]

    def close(self):
        self.out.close()
        os.close(self.master)


@pytest.fixture
def pty():
    terminal = Pty(120)
    yield terminal
    terminal.close()


@pytest.fixture(autouse=True)
def redraw_always(monkeypatch):
    monkeypatch.setattr(progress_module, "REDRAW_SECONDS", 0.0)


def test_bar_shows_running_perplexity_and_speed_from_the_first_iteration(pty):
    bar = TrainingProgress(1000, out=pty.out, tokens_per_iter=700)
    bar.on_step(1, 1000, np.float32(np.log(400.0)))
    [first] = pty.screen_lines()[-1:]
    assert "1/1000" in first and "ppl 400.00" in first and "tok/s" in first
    bar.on_step(2, 1000, np.float32(np.log(200.0)))
    running = float(re.search(r"ppl ([0-9.]+)", pty.screen_lines()[-1]).group(1))
    assert 200 < running < 400  # a running value, not the last sample alone
    bar.close()


def test_bar_fits_the_terminal_and_follows_a_resize(pty):
    bar = TrainingProgress(100000, out=pty.out, tokens_per_iter=700)
    for i in range(1, 4):
        bar.on_step(i, 100000, np.float32(5.0))
    wide = pty.screen_lines()
    assert wide and max(map(len, wide)) <= 120 and max(map(len, wide)) > 60
    pty.resize(60)
    for i in range(4, 8):
        bar.on_step(i, 100000, np.float32(5.0))
    narrow = pty.screen_lines()
    assert narrow and all(len(line) <= 60 for line in narrow)
    assert "7/100000" in narrow[-1] and "ppl" in narrow[-1]
    bar.on_log({**RECORD, "valid_perplexity": 99.0})
    logged = pty.screen_lines()
    assert all(len(line) <= 60 for line in logged)
    assert any("valid ppl 99.00" in line for line in logged)  # broken between fields, never inside one
    bar.close()


def test_validation_shows_its_own_bar_on_a_terminal(pty):
    bar = TrainingProgress(100, out=pty.out)
    for done in range(1, 4):
        bar.on_eval(done, 3)
    assert any("valid" in line and "3/3" in line for line in pty.screen_lines())
    bar.close()


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    lines = TrainingProgress(20, out=out, tokens_per_iter=10)
    lines.on_step(10, 20, np.float32(1.0))
    lines.on_eval(1, 2)
    lines.on_log(RECORD)
    lines.on_log({**RECORD, "valid_perplexity": 99.0})
    lines.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.count("\n") == 2
    assert "train ppl    123.40" in text and "valid ppl 99.00" in text


def test_quiet_and_eval_progress_off_a_terminal_print_nothing(pty):
    quiet = TrainingProgress(20, quiet=True, out=pty.out)
    quiet.on_step(1, 20, np.float32(1.0))
    quiet.on_log({**RECORD, "valid_perplexity": 9.0})
    quiet.close()
    assert pty.screen_lines() == []
    out = io.StringIO()
    EvalProgress(out)(1, 2)
    assert out.getvalue() == ""


def test_fields_wrap_between_fields():
    assert fit_fields(["iter 10", "epoch 0.50", "valid ppl 99.00"], 18) == "iter 10 epoch 0.50\nvalid ppl 99.00"
    assert fit_fields(["a much longer field than the width"], 5) == "a much longer field than the width"


def test_a_terminal_of_width_0_counts_as_unknown(monkeypatch):
    """Open MPI hands each rank a pseudo-terminal that says 0 columns."""
    terminal = Pty(0)
    try:
        monkeypatch.setenv("COLUMNS", "97")
        assert progress_module.terminal_width(terminal.out) == 97
    finally:
        terminal.close()


@pytest.mark.parametrize("columns", [0, 20])
def test_the_training_summary_is_one_line_on_any_terminal(tmp_path, columns):
    terminal = Pty(columns)
    try:
        done = subprocess.run([sys.executable, "-m", "gpurnn", "--backend", "numpy", "train", "--max-iters", "2",
                               "--quiet", "--checkpoint", str(tmp_path / "ck.h5")],
                              stdout=terminal.out, stderr=subprocess.PIPE, text=True, timeout=120)
        lines = terminal.screen_lines()
    finally:
        terminal.close()
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"iteration 2 epoch \S+ train_perplexity \S+", lines[0]), lines


def test_notices_print_even_when_quiet_and_above_the_bar(pty):
    out = io.StringIO()
    TrainingProgress(20, quiet=True, out=out).notice("CUDA graph capture failed: reason")
    assert out.getvalue() == "CUDA graph capture failed: reason\n"
    bar = TrainingProgress(20, out=pty.out)
    bar.on_step(1, 20, np.float32(1.0))
    bar.notice("a notice")
    bar.on_step(2, 20, np.float32(1.0))
    lines = pty.screen_lines()
    assert "a notice" in lines and "2/20" in lines[-1]
    bar.close()
