"""gpurnn's own safetensors writer and reader: the safetensors package reads what gpurnn writes and
gpurnn reads what it writes; a damaged or forged file is refused with one line, whatever the damage."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpurnn.errors import ExportError
from gpurnn.export.safetensors_file import decode, encode, read_safetensors, write_safetensors

from .faultkit import litter

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed")
from safetensors import safe_open  # noqa: E402

ARRAYS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "d": np.linspace(-1, 1, 5),
          "h": np.array([1.5, -2.25], np.float16), "ids": np.array([[1, -2], [3, 4]], np.int64),
          "bytes": np.arange(3, dtype=np.uint8), "flags": np.array([True, False]),
          "empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, np.float32)}


def assert_same(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name])


def test_the_safetensors_package_reads_what_gpurnn_writes(tmp_path):
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, ARRAYS, {"note": "ü and JSON {\"a\": 1}"})
    assert_same(dict(sorted(safetensors_numpy.load_file(path).items())), dict(sorted(ARRAYS.items())))
    with safe_open(path, "np") as f:
        assert f.metadata() == {"note": "ü and JSON {\"a\": 1}"}
    assert (int.from_bytes(path.read_bytes()[:8], "little") + 8) % 8 == 0  # the data starts 8-byte aligned
    assert litter(tmp_path) == []


def test_gpurnn_reads_what_the_safetensors_package_writes(tmp_path):
    path = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file(ARRAYS, path, metadata={"format": "pt", "k": "v"})
    tensors, metadata = read_safetensors(path)
    assert_same(dict(sorted(tensors.items())), dict(sorted(ARRAYS.items())))
    assert metadata == {"format": "pt", "k": "v"}


def test_bf16_is_widened_to_float32():
    values = np.array([1.0, -0.5, 3.140625, 0.0], np.float32)
    top = (values.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    tensors, _ = decode(len(header).to_bytes(8, "little") + header + top.tobytes(), "x.safetensors")
    assert tensors["x"].dtype == np.float32
    np.testing.assert_array_equal(tensors["x"], values)


def forged(header, data=b"", size=None):
    """A file of `header` (a dict, or raw bytes) followed by `data`; `size` overrides the length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if size is None else size).to_bytes(8, "little") + text + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content, fragment", [
    (b"\x01\x00", "fewer than the 8 of the header's length"),
    (forged({"a": F32}, bytes(8), size=10 ** 9), "a header of 1,000,000,000 bytes"),
    (forged({"a": F32}, bytes(8), size=1), "a header of 1 bytes"),
    (forged(b"\xff\xfe{}"), "not UTF-8 JSON"),
    (forged(b"{\"a\": "), "not UTF-8 JSON"),
    (forged([1, 2]), "not a JSON object"),
    (forged(b"[" * 100_000), "nests too deeply"),
    (forged({"__metadata__": {"n": 1}}), "__metadata__ is not an object of strings"),
    (forged({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "not described by exactly dtype, shape and data_offsets"),
    (forged({"a": {**F32, "dtype": "F8_E9"}}, bytes(8)), "has dtype 'F8_E9'"),
    (forged({"a": {**F32, "shape": [-2]}}, bytes(8)), "has shape [-2]"),
    (forged({"a": {**F32, "shape": "2"}}, bytes(8)), "has shape '2'"),
    (forged({"a": {**F32, "data_offsets": [8, 0]}}, bytes(8)), "has data_offsets [8, 0]"),
    (forged({"a": {**F32, "data_offsets": [0, True]}}, bytes(8)), "has data_offsets [0, True]"),
    (forged({"a": {**F32, "shape": [3]}}, bytes(8)), "needs 12 bytes, its offsets span 8"),
    (forged({"a": {**F32, "data_offsets": [0, 8]}}, bytes(4)), "its tensors hold 8 bytes, but 4 follow the header"),
    (forged({"a": F32}, bytes(12)), "its tensors hold 8 bytes, but 12 follow the header"),
    (forged({"a": F32, "b": F32}, bytes(16)), "the tensors overlap or leave a gap"),
    (forged({"a": {**F32, "data_offsets": [4, 12]}}, bytes(12)), "starts at byte 4, not 0"),
])
def test_a_damaged_or_forged_file_is_refused_in_one_line(content, fragment):
    with pytest.raises(ExportError) as refused:
        decode(content, "m.safetensors")
    message = str(refused.value)
    assert message.startswith("m.safetensors is not a valid safetensors file: ") and "\n" not in message
    assert fragment in message


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(ExportError, match="cannot read .*no.safetensors: No such file"):
        read_safetensors(tmp_path / "no.safetensors")


GOOD = encode({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float64)}, {"k": "v"})


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_truncated_or_flipped_files_are_read_right_or_refused(data):
    """Any cut or any flipped bit gives an ExportError or arrays that fill the data exactly (a bit
    flipped in the data or in a name), never another exception."""
    content = bytearray(GOOD)
    if data.draw(st.booleans()):
        content = content[:data.draw(st.integers(0, len(GOOD) - 1))]
    else:
        at = data.draw(st.integers(0, len(GOOD) - 1))
        content[at] ^= 1 << data.draw(st.integers(0, 7))
    try:
        tensors, _ = decode(bytes(content), "m.safetensors")
    except ExportError:
        return
    header = int.from_bytes(content[:8], "little")
    assert sum(value.nbytes for value in tensors.values()) == len(content) - 8 - header
