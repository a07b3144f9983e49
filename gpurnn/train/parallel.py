"""Data-parallel training: R processes started by `mpiexec`, one model, the single-process result.

The global batch of B lanes is split into R contiguous groups of B / R lanes; each rank streams only
its lanes (`BPTTStream(lanes=...)`), carries their hidden state, and backpropagates its lanes' share
of the global mean loss. One all-reduce per iteration sums the gradients into exactly the global
gradient (MPI `Allreduce` on the CPU, NCCL between GPUs), so clipping sees the global norm and every
rank applies the same update. Validation is shared out the same way: each rank scores its share of
the evaluation lanes and the sums are added. Rank 0 alone logs and writes checkpoints; a checkpoint
holds every lane's state, gathered, so a run resumes on any number of ranks.

An MPI launch is recognised from the launcher's environment (`PMI_SIZE`, `OMPI_COMM_WORLD_SIZE`,
`MPI_LOCALNRANKS`); only then is mpi4py imported, so importing gpurnn never imports it. A failure on
one rank aborts the whole job (`MPI_Abort`), so no rank waits forever for a dead peer.
"""

import functools
import hashlib
import json
import os
import signal
import sys
import traceback
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout

import numpy as np

from ..backend import array_module
from ..errors import GpurnnError

SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")


class RaisedAlike(GpurnnError):
    """An error every rank raises at the same point, from values the ranks share (their options, the
    summed losses, the identical parameters): rank 0 alone reports it and every rank exits 2."""


class ParallelError(RaisedAlike):
    """The ranks cannot train together."""


def launcher_value(names):
    """The first of the environment variables `names` set to an integer, or None."""
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


class Group:
    """The ranks of one run: `rank`, `size`, and the collectives training needs.

    `comm` is an mpi4py communicator, or None for one process without MPI, where every collective
    returns its input untouched (so a single-process run is the plain loop).
    """

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self._reduce = None  # the all-reduce of the flat gradient buffer, chosen at first use

    @property
    def loss_share(self):
        """This rank's share of the global mean loss: its B / R lanes' mean loss counts 1 / R."""
        return 1.0 / self.size

    def lanes(self, batch_size):
        """This rank's lanes (lo, hi) of a global batch of `batch_size`; R must divide it."""
        if batch_size % self.size:
            raise ParallelError(f"--batch-size {batch_size} cannot be split over {self.size} ranks: "
                                f"choose a multiple of {self.size}")
        share = batch_size // self.size
        return (self.rank * share, (self.rank + 1) * share)

    def share(self, count):
        """This rank's contiguous share (lo, hi) of `count` items (evaluation lanes), as even as they
        divide; a rank gets none where there are fewer items than ranks."""
        return count * self.rank // self.size, count * (self.rank + 1) // self.size

    def check_same(self, options):
        """Refuse a run whose ranks were given different options (compared by a hash of them)."""
        if self.comm is None:
            return
        text = json.dumps(options, sort_keys=True, default=str)
        digests = self.comm.allgather(hashlib.sha256(text.encode()).hexdigest())
        if len(set(digests)) == 1:
            return
        every = self.comm.allgather(options)
        odd = next(r for r, d in enumerate(digests) if d != digests[0])
        differ = sorted(k for k in set(every[0]) | set(every[odd]) if every[0].get(k) != every[odd].get(k))
        raise ParallelError(f"rank {odd} was started with other options than rank 0 ({', '.join(differ)}): "
                            f"give every rank the same command")

    @contextmanager
    def agreed_errors(self):
        """A GpurnnError raised in the block on any rank is raised on every rank, as a ParallelError.

        For setup (no collective inside the block): every rank learns of a problem on any other, so
        all of them stop together with one message instead of some waiting for the rest.
        """
        if self.comm is None:
            yield
            return
        error = None
        try:
            yield
        except GpurnnError as exc:
            error = str(exc)
        errors = self.comm.allgather(error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed:
            rank, message = failed[0]
            alike = all(m == message for m in errors)
            raise ParallelError(message if alike else f"rank {rank}: {message}")

    def reduce_gradients(self, flat):
        """Sum the flat gradient buffer (`model.flat_grads`) over all ranks, in place: one all-reduce."""
        if self.comm is None:
            return
        if self._reduce is None:  # NCCL between GPUs, MPI on the CPU
            self._reduce = nccl_allreduce(self.comm, flat) if array_module(flat) is not np else self._mpi_allreduce
        self._reduce(flat)

    def _mpi_allreduce(self, buffer):
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

    def sum(self, values):
        """The elementwise sum over ranks of a small host float64 array (e.g. the logged losses)."""
        if self.comm is None:
            return values
        from mpi4py import MPI
        total = np.ascontiguousarray(values, dtype=np.float64)
        self.comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        return total

    def from_root(self, compute):
        """compute() run on rank 0 alone, its result given to every rank (e.g. a validation score)."""
        if self.comm is None:
            return compute()
        return self.comm.bcast(compute() if self.rank == 0 else None, root=0)

    def gather_lanes(self, arrays):
        """{name: host array of this rank's lanes} -> on rank 0 every lane's, in order; None elsewhere."""
        if self.comm is None:
            return arrays
        gathered = {}
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            whole = np.empty((self.size,) + a.shape, a.dtype) if self.rank == 0 else None
            self.comm.Gather(a, whole, root=0)
            if self.rank == 0:
                gathered[name] = whole.reshape((-1,) + a.shape[1:])
        return gathered if self.rank == 0 else None

    def end_job(self, exc):
        """Report `exc` (this rank's failure) and end every rank now: nobody waits for a dead peer."""
        from mpi4py import MPI

        if isinstance(exc, KeyboardInterrupt):
            message, code = "interrupted; resume from the last saved checkpoint", 130
        elif isinstance(exc, MPI.Exception):  # a collective failed: a peer died or was killed
            message = (f"another rank stopped (it failed or was killed): {str(exc).splitlines()[0]}; "
                       f"resume from the last saved checkpoint")
            code = 1
        elif isinstance(exc, (GpurnnError, OSError)):  # the user's to fix: one line, no traceback
            message, code = str(exc), 2
        else:
            message, code = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", 1
        sys.__stderr__.write(f"gpurnn: error: rank {self.rank} of {self.size}: {message}\n")
        sys.__stderr__.flush()
        self.comm.Abort(code)


def nccl_allreduce(comm, buffer):
    """An in-place NCCL sum over `buffer` (a CuPy array) across the ranks of `comm`, one GPU each.

    Rank 0 makes the NCCL unique id and MPI broadcasts it. NCCL needs a distinct device per rank: a
    single GPU cannot host two ranks, which is refused here rather than left to hang or crash. Where
    CuPy finds no libnccl, `cupy.cuda.nccl` imports with a warning and `available` false: said here
    in one line instead.
    """
    import warnings

    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl
    if not nccl.available:
        raise ParallelError("NCCL is unavailable to CuPy (no libnccl found): install the nvidia-nccl wheel for "
                            "CuPy's CUDA (such as nvidia-nccl-cu13) to train on several GPUs")

    device = cupy.cuda.Device()
    places = comm.allgather((os.uname().nodename, device.pci_bus_id))
    if len(set(places)) < len(places):
        raise ParallelError(f"{len(places)} ranks share {len(set(places))} GPU(s): NCCL needs one device "
                            f"per rank (start at most as many ranks per node as it has GPUs)")
    uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    communicator = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
    kind = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[buffer.dtype]

    def allreduce(flat):
        communicator.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kind, nccl.NCCL_SUM,
                               cupy.cuda.get_current_stream().ptr)

    return allreduce


def pick_gpu():
    """Give each rank on a node its own GPU (CUDA_VISIBLE_DEVICES) before CuPy is first imported."""
    local = launcher_value(LOCAL_RANK_VARIABLES)
    if local is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(d) for d in range(local + 1)]
    if local < len(devices):
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[local]


_WORLD = None


def world():
    """The Group of this process: MPI's world when started by an MPI launcher, else one rank."""
    global _WORLD
    if _WORLD is None:
        size = launcher_value(SIZE_VARIABLES)
        if size is None:
            _WORLD = Group()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise ParallelError(f"started by an MPI launcher ({size} ranks) but mpi4py is not "
                                    f"installed: pip install 'gpurnn[mpi]'") from None
            if size > 1:
                pick_gpu()
            _WORLD = Group(MPI.COMM_WORLD)
    return _WORLD


def on_every_rank(command):
    """Decorate a CLI command to run on every rank: rank 0 alone prints, and a failure ends the job.

    A RaisedAlike error (such as ParallelError) is reported once by rank 0 and every rank exits 2;
    any other error, or Ctrl-C, is reported by the rank it happened on and aborts all ranks.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            group, interrupted = starting_world()
        except ParallelError as exc:
            return agreed_exit(exc, launcher_value(RANK_VARIABLES) or 0)
        if interrupted and group.size == 1:
            raise KeyboardInterrupt
        if interrupted:  # Ctrl-C while MPI started: end every rank (a rank that just left would hang its peers)
            return group.end_job(KeyboardInterrupt())
        if group.size == 1:
            return command(*args, **kwargs)
        with ExitStack() as quiet:
            if group.rank != 0:
                devnull = quiet.enter_context(open(os.devnull, "w"))
                quiet.enter_context(redirect_stdout(devnull))
                quiet.enter_context(redirect_stderr(devnull))
            try:
                return command(*args, **kwargs)
            except RaisedAlike as exc:
                return agreed_exit(exc, group.rank)
            except (Exception, KeyboardInterrupt) as exc:
                group.end_job(exc)

    return run


def starting_world():
    """(world(), whether a Ctrl-C came meanwhile). Under a launcher, a Ctrl-C while MPI starts is held
    until the group exists, for no rank can leave then without leaving the others waiting for it."""
    if launcher_value(SIZE_VARIABLES) is None:
        return world(), False
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        return world(), bool(held)
    finally:
        signal.signal(signal.SIGINT, previous)


def agreed_exit(exc, rank):
    """Exit 2 on every rank after rank 0 reports `exc`, an error every rank raised alike."""
    if rank == 0:
        sys.__stderr__.write(f"gpurnn: error: {exc}\n")
        sys.__stderr__.flush()
    raise SystemExit(2)
