"""Safe output files: durable atomic writes, early writability checks, and one-line causes of OS errors.

An atomic write goes to a temporary file beside the target, named after it and the writer's process id
(`.NAME.PID.tmp`), is flushed to disk (fsync), renamed over the target, and the folder is fsynced so the
rename itself survives a power cut. A crash leaves either the old file or the new one, never half of
one; the temporary file a killed process leaves behind is removed by the next write to the same target
once its process is gone.
"""

import errno
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import GpurnnError

# Test hook: seconds to pause between writing a temporary file and renaming it, so that tests can kill a
# process inside a write. Unset in normal use.
PAUSE_ENV = "GPURNN_TEST_PAUSE_IN_WRITE"


def temp_path(path, pid=None):
    """The temporary name a process writes `path` under."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(path):
    """Delete the temporary files of `path` left by processes that no longer exist."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            (path.parent / name).unlink(missing_ok=True)


def fsync_path(path, directory=False):
    """Flush a file's (or a folder's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; when the block succeeds make it `path` durably, else delete it."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path, data):
    """Write `data` as the whole content of `path`, atomically and durably."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def os_error_cause(exc):
    """The reason an OS-level error happened, in a few words ("No space left on device").

    h5py wraps OS errors in long messages ("Unable to synchronously create file (unable to open file:
    name = ..., errno = 28, error message = 'No space left on device', ...)"): their errno is dug out.
    """
    code = getattr(exc, "errno", None)
    if code in errno.errorcode:
        return os.strerror(code)
    text = str(exc)
    found = re.search(r"errno = (\d+)", text)
    if found and int(found.group(1)) in errno.errorcode:
        return os.strerror(int(found.group(1)))
    found = re.search(r"error message = '([^']+)'", text)
    if found:
        return found.group(1)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


def check_output_path(path, what):
    """Refuse early (GpurnnError) an output path that cannot be written: a missing or read-only folder,
    a folder in the file's place, or a read-only file. Creates and removes a temporary file to be sure.
    """
    path = Path(path)
    if path.is_dir():
        raise GpurnnError(f"cannot write {what} {path}: it is a folder")
    if not path.parent.is_dir():
        raise GpurnnError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise GpurnnError(f"cannot write {what} {path}: {os.strerror(errno.EACCES)}")
    probe = temp_path(path)
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise GpurnnError(f"cannot write {what} {path}: {os_error_cause(exc)}") from None


def same_file(a, b):
    """Whether two paths name the same file (an existing one, or the same path spelt the same way)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return a.resolve() == b.resolve()


def check_not_inputs(outputs, inputs):
    """Refuse (GpurnnError) an output that is one of the inputs or another output: nothing is written over."""
    outputs = [(what, p) for what, p in outputs if p]
    inputs = [(what, p) for what, p in inputs if p]
    for k, (what, path) in enumerate(outputs):
        for other_what, other in inputs + outputs[k + 1:]:
            if same_file(path, other):
                raise GpurnnError(f"{path} is both the {what} to write and the {other_what}: "
                                  f"choose another name")
