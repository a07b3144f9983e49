"""HDF5 files written so that HDF5 never meets a full disk through its own file driver.

When one of HDF5's writes fails half-way (no space left on the device), h5py's clean-up of the file
can crash the process (a segmentation fault after pages of tracebacks) and leave its temporary file
behind. So HDF5 is never the one to find out that the disk is full:

- `write_hdf5_atomically` (checkpoints): the whole file is built in memory (HDF5's core driver with
  no backing store) and its bytes are written by the atomic writer, where a full disk is an ordinary
  OSError, the temporary file is removed and the previous file stays. The core driver must not fail
  either (a write it cannot make crashes h5py just as a full disk does), so the memory for the image
  and its copy is claimed first, where running out is an ordinary MemoryError.
- `reserved_hdf5` (corpora, which may be larger than memory): the file's layout (every attribute and
  dataset, no data yet) is built in memory and written the same way, then the disk space the data will
  take is reserved (`reserve`) before HDF5 opens the file to fill it in. A full disk fails the
  reservation, an ordinary OSError again; HDF5's writes then land in space already the file's. This
  keeps the chunked, checksummed layout, which plain writes into a contiguous dataset would lose.
"""

import os
from contextlib import contextmanager

import h5py

from .atomic import atomic_path, write_bytes_atomically
from .memory import claim

LIBVER = ("v110", "latest")  # HDF5's 1.10+ format: object headers and indexes carry checksums
IMAGE_SLACK = 1 << 20  # bytes of HDF5's own structures claimed beyond a quarter more than the data


def hdf5_image(build, name, size=0):
    """The bytes of a new HDF5 file that `build(file)` fills in, made in memory (nothing touches the
    disk). `size`: about how many bytes its data take, claimed (twice: the image and its copy) first."""
    claim(2 * (size + size // 4 + IMAGE_SLACK))
    with h5py.File(name, "w", driver="core", backing_store=False, libver=LIBVER) as file:
        build(file)
        file.flush()
        return file.id.get_file_image()


def write_hdf5_atomically(path, build, size=0):
    """Write the HDF5 file that `build(file)` fills in (its data about `size` bytes) to `path`,
    atomically; a full disk is an OSError, too little memory a MemoryError."""
    write_bytes_atomically(path, hdf5_image(build, f"{path} (in memory)", size))


@contextmanager
def reserved_hdf5(path, layout, data_bytes):
    """Yield, open for writing, the temporary HDF5 file of `path` laid out by `layout(file)`, with
    `data_bytes` more bytes of disk reserved for the data to be written into it; on success it becomes
    `path` (atomically), on any error it is removed. A full disk raises OSError before HDF5 writes.
    """
    image = hdf5_image(layout, f"{path} (layout)")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(image)
            f.flush()
            reserve(f, len(image) + data_bytes)
        # HDF5 accepts a file longer than its data, writes new data from its end of data on (into the
        # reserved space), and cuts the file to that end when it closes it.
        with h5py.File(tmp, "r+", libver=LIBVER) as file:
            yield file


def reserve(f, size):
    """Allocate disk blocks for the first `size` bytes of the open file `f`, so that writes within them
    cannot run out of space: posix_fallocate where the OS has it (no data written), else zeros written."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(f.fileno(), 0, size)
        return
    f.seek(0, os.SEEK_END)
    block = bytes(1 << 20)
    for left in range(size - f.tell(), 0, -len(block)):
        f.write(block[:left])
    f.flush()
