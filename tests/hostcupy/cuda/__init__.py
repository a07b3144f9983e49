"""The stand-in's `cuda` package: only `cuda.pathfinder`, which finds the stand-in's libcublas."""
