"""The stand-in for CuPy (tests/hostcupy) and gpurnn's own CuPy calls, held against the real CuPy.

CuPy 14 imports without a GPU, so its Python surface can be read here. What is checked:

- every public name the stand-in defines (modules, classes, their methods and properties, functions,
  constants, walked from `cupy` down through `cupy.cuda`, `runtime`, `device`, `nccl`) exists in
  real CuPy at the same path, and where both sides have a signature, every call the stand-in accepts
  real CuPy accepts too: the same positional parameters in the same places, no keyword or default
  CuPy lacks. Real CuPy's compiled functions often have no `inspect` signature; their docstrings'
  first line (Cython's embedded signature, such as ``_ndarray_base.set(self, arr, stream=None)``) is
  read instead. Not walked: attributes that instances set in ``__init__``, and the NumPy functions the
  stand-in hands on by name (those gpurnn calls are checked by name, below);
- every ``cupy.…``/``xp.…`` chain in gpurnn, its plugins, scripts and GPU tests resolves in real CuPy;
- the stand-in's `cuda.pathfinder` against the real cuda-pathfinder, and the cuBLAS functions that
  gpurnn.ops.linear declares (and the stand-in's libcublas offers) are among those CuPy's own cuBLAS
  module links against, so libcublas has them;
- gpurnn says in one line when CuPy's NCCL is unavailable (CuPy only warns).
"""

import importlib.util
import inspect
import re
import sys
import types
import warnings
from pathlib import Path

import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[nvrtc]')")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STAND_IN = "hostcupy_cupy"  # the stand-in's name here, beside the real cupy
PARAMETER = inspect.Parameter


def load(name, path, package=False):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, path, submodule_search_locations=[str(path.parent)] if package else None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def stand_in():
    return load(STAND_IN, TESTS / "hostcupy/cupy/__init__.py", package=True)


def surface(obj, path=""):
    """(dotted path, value) for every public name the stand-in defines under `obj`."""
    for name, value in sorted(vars(obj).items()):
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(value, types.ModuleType) and not value.__name__.startswith(STAND_IN):
            continue  # an import of the stand-in's own: numpy, ctypes, ...
        if (inspect.isclass(value) or inspect.isfunction(value)) and not value.__module__.startswith(STAND_IN):
            continue
        where = f"{path}{name}"
        yield where, value
        if isinstance(value, (types.ModuleType, types.SimpleNamespace)):
            yield from surface(value, f"{where}.")
        elif inspect.isclass(value):
            yield from surface(value, f"{where}.")
            if value.__name__ == "ndarray":  # the NumPy methods it hands on by name
                yield from ((f"{where}.{method}", None) for method in sorted(stand_in()._METHODS))


def real(path):
    """The object at `path` under the real cupy: a submodule imported as `from cupy.cuda import nccl`
    would, a Stream's instance attributes read from Stream.null."""
    obj, parts = cupy, path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part) and obj is cupy.cuda.Stream:
            obj = cupy.cuda.Stream.null
        if not hasattr(obj, part) and isinstance(obj, types.ModuleType):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cupy.cuda.nccl warns where it finds no libnccl
                try:
                    importlib.import_module(".".join(["cupy", *parts[:i + 1]]))
                except ImportError:
                    pass
        obj = getattr(obj, part)
    return obj


def signature(obj):
    """inspect's signature of `obj`, else the one in its docstring's first line, else None."""
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        pass
    first = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    match = re.match(r"[\w.]+\((.*)\)\s*(->.*)?$", first[0] if first else "")
    return None if match is None else docstring_signature(match.group(1))


def docstring_signature(text):
    """A Signature from Cython's "type name=default, *, ..." parameter list."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{" and 1 or char in ")]}" and -1 or 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts = [p.strip() for p in parts + [current] if p.strip()]
    kind, params = PARAMETER.POSITIONAL_OR_KEYWORD, []
    if "/" in parts:  # everything before it is positional-only
        cut = parts.index("/")
        parts = [("/", p) for p in parts[:cut]] + [("", p) for p in parts[cut + 1:]]
    else:
        parts = [("", p) for p in parts]
    for mark, part in parts:
        if part == "*":
            kind = PARAMETER.KEYWORD_ONLY
            continue
        stars = len(part) - len(part.lstrip("*"))
        declaration, _, default = part.lstrip("*").partition("=")
        name = declaration.split(":")[0].split()[-1]
        if stars:
            params.append(PARAMETER(name, PARAMETER.VAR_POSITIONAL if stars == 1 else PARAMETER.VAR_KEYWORD))
            kind = PARAMETER.KEYWORD_ONLY if stars == 1 else kind
            continue
        param_kind = PARAMETER.POSITIONAL_ONLY if mark else kind
        params.append(PARAMETER(name, param_kind, default=default.strip() if default else PARAMETER.empty))
    return inspect.Signature(params)


POSITIONAL = (PARAMETER.POSITIONAL_ONLY, PARAMETER.POSITIONAL_OR_KEYWORD)
BY_KEYWORD = (PARAMETER.POSITIONAL_OR_KEYWORD, PARAMETER.KEYWORD_ONLY)


def narrower(ours, theirs):
    """Why a call that `ours` (the stand-in's signature) accepts would not suit `theirs` (CuPy's):
    [] when every call ours accepts means the same to CuPy. Default values are not compared."""
    problems, ours, theirs = [], list(ours.parameters.values()), list(theirs.parameters.values())
    our_positional = [p for p in ours if p.kind in POSITIONAL]
    their_positional = [p for p in theirs if p.kind in POSITIONAL]
    their_keywords = {p.name: p for p in theirs if p.kind in BY_KEYWORD}
    their_kinds = {p.kind for p in theirs}
    for i, p in enumerate(our_positional):
        if i >= len(their_positional):
            if PARAMETER.VAR_POSITIONAL not in their_kinds:
                problems.append(f"{p.name!r} is positional {i} here; CuPy takes {len(their_positional)} positionally")
            continue
        other = their_positional[i]
        if p.name != other.name and PARAMETER.POSITIONAL_ONLY not in (p.kind, other.kind):
            problems.append(f"position {i} is {p.name!r} here, {other.name!r} in CuPy")
        if p.default is not PARAMETER.empty and other.default is PARAMETER.empty:
            problems.append(f"{p.name!r} may be left out here, not in CuPy")
    for p in ours:
        other = their_keywords.get(p.name)
        if p.kind in BY_KEYWORD and other is None and PARAMETER.VAR_KEYWORD not in their_kinds:
            problems.append(f"keyword {p.name!r} is unknown to CuPy")
        elif p.kind == PARAMETER.KEYWORD_ONLY and other is not None and p.default is not PARAMETER.empty \
                and other.default is PARAMETER.empty:
            problems.append(f"{p.name!r} may be left out here, not in CuPy")
        elif p.kind in (PARAMETER.VAR_POSITIONAL, PARAMETER.VAR_KEYWORD) and p.kind not in their_kinds:
            problems.append(f"{p} is accepted here, not by CuPy")
    our_required = {p.name for p in ours if p.kind == PARAMETER.KEYWORD_ONLY and p.default is PARAMETER.empty}
    for i, p in enumerate(their_positional + [p for p in theirs if p.kind == PARAMETER.KEYWORD_ONLY]):
        covered = i < len(our_positional) if p.kind in POSITIONAL else False
        if p.default is PARAMETER.empty and not covered and p.name not in our_required:
            problems.append(f"CuPy requires {p.name!r}, which may be left out here")
    return problems


def test_the_signature_check_tells_a_compatible_call_from_one_cupy_refuses():
    def real_one(self, arr, stream=None, *, blocking=True): ...
    cases = {"(self, arr, stream=None)": [], "(self, arr, *, blocking=False)": [], "(self, a, /)": [],
             "(self, array, stream=None)": ["position 1 is 'array' here, 'arr' in CuPy",
                                            "keyword 'array' is unknown to CuPy"],
             "(self, arr, stream=None, out=None)": ["'out' is positional 3 here; CuPy takes 3 positionally",
                                                    "keyword 'out' is unknown to CuPy"],
             "(self, arr, *, out=None)": ["keyword 'out' is unknown to CuPy"],
             "(self, arr=None)": ["'arr' may be left out here, not in CuPy"],
             "(self, *, arr)": [],
             "(self)": ["CuPy requires 'arr', which may be left out here"],
             "(self, arr, **kw)": ["**kw is accepted here, not by CuPy"]}
    for text, expected in cases.items():
        ours = docstring_signature(text[1:-1])
        assert narrower(ours, inspect.signature(real_one)) == expected, text
    parsed = docstring_signature("str code, str name, tuple options=(), *, bool enable_cooperative_groups=False")
    assert str(parsed) == "(code, name, options='()', *, enable_cooperative_groups='False')"


def compare(entries):
    """(problems, paths whose signatures were compared) for stand-in (path, value) entries."""
    problems, checked = [], []
    for path, value in entries:
        try:
            theirs = real(path)
        except AttributeError:
            problems.append(f"cupy.{path}: not in CuPy {cupy.__version__}")
            continue
        if callable(value) and not isinstance(value, (types.ModuleType, property)):
            ours, real_signature = signature(value), signature(theirs)
            if ours is not None and real_signature is not None:
                problems += [f"cupy.{path}{ours}: {why}" for why in narrower(ours, real_signature)]
                checked.append(path)
    return problems, checked


def test_every_name_the_stand_in_offers_is_in_cupy_with_a_signature_cupy_accepts():
    # without libnccl CuPy's nccl module holds only `available`: its members are the next test's
    problems, checked = compare((path, value) for path, value in surface(stand_in())
                                if not path.startswith("cuda.nccl."))
    assert not problems, "\n".join(problems)
    for path in ("ndarray.set", "ndarray.get", "RawKernel.__call__", "cuda.Stream", "cuda.Stream.begin_capture",
                 "cuda.Graph.launch", "cuda.runtime.getDeviceProperties", "cuda.device.get_cublas_handle",
                 "asnumpy", "empty_like"):
        assert path in checked, f"{path}: no signature compared"


def test_the_stand_ins_nccl_is_cupys():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("CuPy finds no libnccl here, so cupy.cuda.nccl holds nothing to compare "
                    "(gpurnn's answer to that: the test below)")
    problems, _ = compare((path, value) for path, value in surface(stand_in()) if path.startswith("cuda.nccl."))
    assert not problems, "\n".join(problems)


def test_without_nccl_data_parallel_gpu_training_says_so_in_one_line(monkeypatch):
    from gpurnn.train.parallel import ParallelError, nccl_allreduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CuPy's own warning where it finds no libnccl
        from cupy.cuda import nccl
    monkeypatch.setattr(nccl, "available", False)
    with pytest.raises(ParallelError, match="^NCCL is unavailable to CuPy") as raised:
        nccl_allreduce(None, None)
    assert "\n" not in str(raised.value)


def cupy_chains():
    """Every cupy.… / xp.… attribute chain in gpurnn, the plugins, the scripts and the GPU tests."""
    files = [*ROOT.glob("gpurnn/**/*.py"), *ROOT.glob("plugins/*.py"), *ROOT.glob("scripts/*.py"),
             TESTS / "test_gpu.py", TESTS / "test_kit.py"]
    chains = set()
    for file in files:
        for chain in re.findall(r"\b(?:cupy|xp)((?:\.[A-Za-z_]\w*)+)", file.read_text()):
            chains.add(chain[1:])
    return chains


def test_every_cupy_name_gpurnn_calls_is_in_cupy():
    chains = cupy_chains()
    assert {"cuda.Stream", "cuda.device.get_cublas_handle", "RawKernel", "ascontiguousarray"} <= chains
    missing = []
    for chain in sorted(chains):
        try:
            real(chain)
        except AttributeError:
            missing.append(f"cupy.{chain}")
    assert not missing, f"not in CuPy {cupy.__version__}: {missing}"


def test_the_stand_ins_pathfinder_and_cublas_are_the_real_ones_subset():
    from cuda import pathfinder

    from gpurnn.ops import linear

    ours = load("hostcupy_pathfinder", TESTS / "hostcupy/cuda/pathfinder.py")
    for name in ("load_nvidia_dynamic_lib", "LoadedDL"):
        assert narrower(inspect.signature(getattr(ours, name)), inspect.signature(getattr(pathfinder, name))) == []
    assert {name for name in vars(ours) if not name.startswith("_")} - {"dataclass"} <= set(dir(pathfinder))
    assert issubclass(pathfinder.DynamicLibNotFoundError, RuntimeError)

    cupys_cublas = Path(importlib.util.find_spec("cupy_backends.cuda.libs.cublas").origin).read_bytes()
    source = (TESTS / "hostcupy/cupy/_host_cublas.py").read_text()  # as text: importing it builds it
    offered = set(re.findall(r"^int (cublas\w+)\(", source, flags=re.M))
    assert set(linear._SIGNATURES) <= offered
    for name in offered:
        assert b"\0" + name.encode() + b"\0" in cupys_cublas, f"{name}: not a function CuPy's cuBLAS module links"
