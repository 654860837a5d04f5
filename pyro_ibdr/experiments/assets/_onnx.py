"""A minimal reader for the parts of an ONNX file that weight conversion needs.

An ONNX model is one protobuf message. Only four message types matter here, and only a few fields of each:

    ModelProto.graph (7) -> GraphProto.node (1), GraphProto.initializer (5)
    NodeProto: input (1), output (2), name (3), op_type (4)
    TensorProto: dims (1), data_type (2), float_data (4), int32_data (5), int64_data (7), name (8),
                 raw_data (9), double_data (10)

Reading the protobuf wire format directly (varints and length-delimited fields) keeps the ``onnx`` package
out of the dependencies; tensor payloads are zero-copy views of the file's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_DTYPES: dict[int, type[np.generic]] = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class OnnxNode:
    """One operator of the graph: its name, type and the names of its input and output values."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class OnnxGraph:
    """The initialisers (named constant tensors) and the nodes of an ONNX graph."""

    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[OnnxNode] = field(default_factory=list)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field number, wire type, value)``; length-delimited values are zero-copy slices."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _FIXED64:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == _FIXED32:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        elif wire == _BYTES:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number}): not an ONNX file?")
        yield number, wire, value


def _ints(wire: int, value: int | memoryview) -> list[int]:
    """A repeated integer field arrives either packed (one byte string) or one varint at a time."""
    if wire != _BYTES:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item)
    return out


def _signed64(values: list[int]) -> list[int]:
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    name, dims, dtype_code, raw, typed = "", [], 1, None, []
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _signed64(_ints(wire, value))
        elif number == 2:
            dtype_code = value
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = value
        elif number == 4:  # float_data, packed little-endian float32
            typed.append(np.frombuffer(value, np.float32) if wire == _BYTES else
                         np.array([value], np.uint32).view(np.float32))
        elif number == 10:  # double_data
            typed.append(np.frombuffer(value, np.float64) if wire == _BYTES else
                         np.array([value], np.uint64).view(np.float64))
        elif number in (5, 7):  # int32_data / int64_data (varints)
            typed.append(np.array(_signed64(_ints(wire, value)), np.int64))
        elif number == 14 and value == 1:
            raise ValueError(f"tensor {name!r} keeps its data in an external file; not supported")
    if dtype_code not in _DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported ONNX data type {dtype_code}")
    dtype = _DTYPES[dtype_code]
    if raw is not None:
        array = np.frombuffer(raw, dtype)
    elif typed:
        array = np.concatenate(typed).astype(dtype)
    else:
        array = np.zeros(0, dtype)
    return name, array.reshape(dims)


def _node(buf: memoryview) -> OnnxNode:
    parts: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: []}
    for number, wire, value in _fields(buf):
        if number in parts and wire == _BYTES:
            parts[number].append(bytes(value).decode())
    return OnnxNode(name="".join(parts[3]), op_type="".join(parts[4]),
                    inputs=tuple(parts[1]), outputs=tuple(parts[2]))


def parse_graph(data: bytes | memoryview) -> OnnxGraph:
    """Decode the graph of a serialised ``ModelProto``. Arrays are read-only views into ``data``."""
    fields = _fields(memoryview(data))
    graph_bytes = [value for number, wire, value in fields if number == 7 and wire == _BYTES]
    if not graph_bytes:
        raise ValueError("no graph found: the data is not a serialised ONNX ModelProto")
    graph = OnnxGraph()
    for number, wire, value in _fields(graph_bytes[-1]):
        if number == 1 and wire == _BYTES:
            graph.nodes.append(_node(value))
        elif number == 5 and wire == _BYTES:
            name, array = _tensor(value)
            graph.initializers[name] = array
    return graph


def read_graph(path: Path) -> OnnxGraph:
    """Read the initialisers and nodes of the ONNX file at ``path`` (external tensor data unsupported)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    return parse_graph(path.read_bytes())
