"""cuda-pathfinder as the stand-in for CuPy sees it: libcublas is the host build in
cupy/_host_cublas.py, the one library gpurnn asks it for (gpurnn.ops.linear, as CuPy 14 does)."""

from dataclasses import dataclass


class DynamicLibNotFoundError(RuntimeError):
    pass


@dataclass
class LoadedDL:
    abs_path: str | None
    was_already_loaded_from_elsewhere: bool
    _handle_uint: int
    found_via: str


def load_nvidia_dynamic_lib(libname):
    if libname != "cublas":
        raise DynamicLibNotFoundError(f"the host stand-in for CuPy has no lib{libname}")
    from cupy import _host_cublas

    return LoadedDL(str(_host_cublas.PATH), True, _host_cublas.library._handle, "host stand-in for CuPy")


def find_nvidia_header_directory(libname):
    """None: the stand-in builds its kernels for the host, without CUDA's headers."""
    return None
