"""The safetensors format, written and read without a dependency (and without pickle).

A file is: 8 bytes, the header's length N (unsigned, little-endian); N bytes of UTF-8 JSON, an object
mapping each tensor's name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}``, plus
an optional ``"__metadata__"`` object of strings; then the tensors' raw little-endian bytes, the
offsets counting from the end of the header. The bytes of the tensors follow one another without gaps
or overlaps and fill the rest of the file. (https://github.com/huggingface/safetensors)

Reading a user's file checks all of that before using any of it: the header's length against the
file, the JSON, each dtype, shape and pair of offsets, the byte count against the shape, and that the
tensors tile the data exactly; anything else is refused with one line naming the file.
"""

import json
import math

import numpy as np

from ..atomic import write_bytes_atomically
from ..config import is_int
from ..errors import ExportError

# safetensors dtype name -> NumPy dtype (little-endian); BF16 is read as its 16 bits, then widened.
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
NAMES = {np.dtype(code): name for name, code in DTYPES.items() if name != "BF16"}
MAX_HEADER = 100_000_000  # the safetensors library's own bound on the header's length
METADATA = "__metadata__"


def encode(tensors, metadata=None):
    """The bytes of a safetensors file holding `tensors` ({name: NumPy array}, in that order) and
    `metadata` ({str: str})."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header[METADATA] = {str(k): str(v) for k, v in metadata.items()}
    for name, array in tensors.items():
        array = np.asarray(array)
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": NAMES[array.dtype.newbyteorder("<")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the library pads the header so the data starts 8-byte aligned
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])


def write_safetensors(path, tensors, metadata=None):
    """Write `tensors` and `metadata` to `path` atomically (see `encode`)."""
    write_bytes_atomically(path, encode(tensors, metadata))


def read_safetensors(path):
    """({name: NumPy array}, {metadata key: str}) of the safetensors file at `path`, in the header's
    order; BF16 tensors are widened to float32. ExportError, one line, for a file that is not one."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror}") from None
    return decode(content, path)


def decode(content, path):
    """What `read_safetensors` returns, from the file's bytes (`path` names it in errors)."""
    def refuse(why):
        raise ExportError(f"{path} is not a valid safetensors file: {why}")

    if len(content) < 8:
        refuse(f"{len(content)} bytes, fewer than the 8 of the header's length")
    size = int.from_bytes(content[:8], "little")
    if not 2 <= size <= min(MAX_HEADER, len(content) - 8):
        refuse(f"a header of {size:,} bytes in a file of {len(content):,} (at most {MAX_HEADER:,})")
    try:
        header = json.loads(content[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        refuse(f"its header is not UTF-8 JSON ({exc})")
    except RecursionError:
        refuse("its header nests too deeply")
    if not isinstance(header, dict):
        refuse("its header is not a JSON object")
    metadata = header.pop(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        refuse(f"{METADATA} is not an object of strings")
    data = memoryview(content)[8 + size:]
    entries = {name: check_entry(name, entry, refuse) for name, entry in header.items()}
    end = 0
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != end:
            refuse(f"tensor {name!r} starts at byte {begin}, not {end}: the tensors overlap or leave a gap")
        end = stop
    if end != len(data):
        refuse(f"its tensors hold {end:,} bytes, but {len(data):,} follow the header")
    tensors = {name: to_array(data[begin:stop], dtype, shape) for name, (dtype, shape, begin, stop) in entries.items()}
    return tensors, metadata


def check_entry(name, entry, refuse):
    """(dtype name, shape, begin, end) of one header entry, or refuse it."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        refuse(f"tensor {name!r} is not described by exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        refuse(f"tensor {name!r} has dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(is_count(n) for n in shape):
        refuse(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(n) for n in offsets) \
            or offsets[0] > offsets[1]:
        refuse(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != expected:
        refuse(f"tensor {name!r} of shape {tuple(shape)} and dtype {dtype} needs {expected:,} bytes, "
               f"its offsets span {offsets[1] - offsets[0]:,}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def is_count(value):
    return is_int(value) and value >= 0


def to_array(raw, dtype, shape):
    """A native-order copy of one tensor's bytes."""
    array = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":  # the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="))
