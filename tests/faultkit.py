"""Helpers for the fault tests: run the CLI in or out of process, and check what a fault may leave behind.

Every fault must end with exit 0 and a correct result, or exit 2 and one line on stderr; never a
traceback, a half-written file, a destroyed input or a temporary file left over.
"""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpurnn.cli import main
from gpurnn.train.checkpoint import load_checkpoint, verify_checkpoint

from .conftest import write_small_corpus

TINY = ["--hidden-size", "8", "--wordvec-size", "8"]
# A schedule whose learning rate decays during the run (lr 1.0 overfits the small corpus quickly).
DECAYING = ["--batch-size", "4", "--time-size", "5", "--lr", "1.0", "--lr-decay", "0.5", "--eval-every", "7",
            "--clip", "5"]
SMALL_RUN = [*TINY, *DECAYING, "--quiet"]


def cli(*args):
    """(exit code, stdout, stderr) of `gpurnn --backend numpy ARGS` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--backend", "numpy", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def train_small(folder):
    """A small corpus in `folder` and a checkpoint trained on it for 40 iterations (its lr decayed)."""
    corpus, ck = write_small_corpus(folder), folder / "ck.h5"
    code, _, err = cli("train", corpus, *SMALL_RUN, "--max-iters", 40, "--checkpoint", ck)
    assert code == 0, err
    return corpus, ck


def start(*args, env=None):
    """`python -m gpurnn --backend numpy ARGS` as a child process, stderr captured."""
    return subprocess.Popen([sys.executable, "-m", "gpurnn", "--backend", "numpy", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for_lines(path, lines=1, proc=None, timeout=60):
    """Wait until the file `path` has at least `lines` lines (a child's metrics log, say)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended first: {proc.communicate()}")
        time.sleep(0.005)
    raise AssertionError(f"{path} never got {lines} line(s)")


def send(proc, signum, timeout=60):
    """Send a signal, wait for the process, return (exit code, stderr)."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def assert_one_line_error(code, err, *fragments):
    """Exit 2 with exactly one line on stderr, holding every fragment."""
    assert code == 2, err
    assert err.startswith("gpurnn: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def assert_no_traceback(err):
    assert "Traceback" not in err and "Exception ignored" not in err, err


def litter(folder):
    """Temporary and lock files in a folder (and nothing else)."""
    return sorted(name for name in os.listdir(folder) if name.endswith((".tmp", ".lock")))


def assert_same_run(a, b):
    """Two checkpoints hold the same training state, bit for bit."""
    a, b = load_checkpoint(a), load_checkpoint(b)
    for group in ("params", "optimizer_arrays", "state"):
        assert getattr(a, group).keys() == getattr(b, group).keys()
        for k in getattr(a, group):
            np.testing.assert_array_equal(getattr(a, group)[k], getattr(b, group)[k], err_msg=f"{group} {k}")
    for key in ("trainer", "stream", "optimizer_scalars"):
        assert a.meta.get(key) == b.meta.get(key), key


def assert_good_checkpoint(path):
    """A complete, checksummed, finite checkpoint; returns its iteration."""
    return verify_checkpoint(load_checkpoint(path)).meta["trainer"]["iteration"]


def unused_pid():
    """A process id no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def mount_tmpfs(folder, options):
    """Mount a tmpfs on `folder` (root only); skip the test with the reason where that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return folder


def unmount(folder):
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def resize_tmpfs(folder, size):
    """Give a tmpfs mounted by `mount_tmpfs` another size in bytes (more room, say)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def fill(folder):
    """Write a file that takes every free byte of the folder's file system."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def free_bytes(folder):
    """Bytes a process may still write in the file system holding `folder`."""
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def pages(size, page=4096):
    """`size` bytes rounded up to whole pages (a tmpfs gives files whole pages)."""
    return -(-size // page) * page


STOP_SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143), "SIGHUP": (signal.SIGHUP, 129)}
