"""Load the CuPy stand-in at start-up: gpurnn's probe skips its driver check for a CuPy already loaded."""
import cupy  # noqa: F401
