"""An exclusive OS lock on an output path, so two processes never write one checkpoint by turns.

The lock is an `flock` on a zero-byte file beside the target (`.NAME.lock`): the kernel releases it
when the holder exits, however it exits, so a killed trainer never blocks the next one. The holder
removes the file when it releases the lock; one left by a killed process is taken over and removed
by the next holder.
"""

import fcntl
import os
from pathlib import Path

from .errors import GpurnnError


class PathLock:
    """`acquire()` or GpurnnError if another process holds `path`'s lock; `release()` (idempotent)."""

    def __init__(self, path, what="checkpoint"):
        path = Path(path)
        self.path, self.what = path, what
        self.lock_path = path.with_name(f".{path.name}.lock")
        self._fd = None

    def acquire(self):
        while self._fd is None:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise GpurnnError(f"another process is writing the {self.what} {self.path} "
                                  f"(it holds {self.lock_path}); wait for it or choose another path") from None
            except OSError:
                os.close(fd)
                raise
            if self._is_current(fd):
                self._fd = fd
            else:  # the previous holder removed the file between our open and our lock: try again
                os.close(fd)
        return self

    def _is_current(self, fd):
        try:
            return os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self):
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # still locked: a waiting process sees a removed file and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __del__(self):  # a lock dropped by an error path (the holder never ran) is not kept
        self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
