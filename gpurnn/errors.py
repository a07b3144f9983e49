"""The exception types gpurnn raises for problems a user can fix.

Everything a user can cause (a bad option, a missing file, a broken plugin) raises a subclass of
`GpurnnError`; the CLI turns these into one line on stderr and exit code 2.
"""


class GpurnnError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class BackendError(GpurnnError):
    """The requested array backend cannot be used here."""


class PluginError(GpurnnError):
    """A plugin failed to load, clashed with another, or broke the layer contract."""


class SpecError(GpurnnError):
    """A layer or model specification is malformed (unknown type, bad option)."""


class DataError(GpurnnError):
    """A corpus file or text input is missing, malformed or too small."""


class CheckpointError(GpurnnError):
    """A checkpoint is missing, corrupt or does not match what it is used with."""


class ExportError(GpurnnError):
    """A model cannot be written in, or read from, another framework's format (ONNX, PyTorch's names)."""
