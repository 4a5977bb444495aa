"""Tensors of the Open Inference Protocol (v2): datatypes, JSON and binary data.

A v2 tensor is ``{"name", "datatype", "shape", "data"}`` with ``data`` a flat (or
nested) JSON list in row-major order, or, with the binary tensor extension, bytes
after the JSON header (``parameters.binary_data_size`` per tensor, the header's
length in the ``Inference-Header-Content-Length`` HTTP header). ``BYTES`` elements
in binary form are each a 4-byte little-endian length followed by the bytes.

Nothing here knows about models: decoding gives NumPy arrays, encoding takes lists.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Any, Sequence

import numpy as np

from daskml_scale.serving.errors import RequestError

__all__ = ["DATATYPES", "Layout", "Tensor", "binary_layout", "datatype_of_dtype", "decode_inputs", "encode_output",
           "flat_columns", "read_layout", "split_body"]

#: v2 datatype -> NumPy dtype (little-endian); BYTES is an object array of str
DATATYPES: dict[str, Any] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
#: v2 datatype -> memoryview format, to read small binary tensors without NumPy (little-endian hosts)
_VIEW = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
         "INT32": "i", "INT64": "q", "FP32": "f", "FP64": "d"} if sys.byteorder == "little" else {}
_JSON_TYPES = {"BOOL": (bool,), "BYTES": (str,)}  # the other datatypes: numbers (bool excluded)
_LEN = struct.Struct("<I")
_ONE = {dt: struct.Struct("<" + v) for dt, v in _VIEW.items()}  # one element of each datatype


class Tensor:
    """One decoded input: its name, datatype, shape and values (flat: a list of Python
    values from JSON data, a NumPy array from binary data)."""

    __slots__ = ("name", "datatype", "shape", "values", "parameters")

    def __init__(self, name: str, datatype: str, shape: list[int], values: "list[Any] | np.ndarray",
                 parameters: dict[str, Any]) -> None:
        self.name, self.datatype, self.shape, self.values, self.parameters = name, datatype, shape, values, parameters

    def tolist(self) -> list[Any]:
        """The values as a list of Python values."""
        return self.values if isinstance(self.values, list) else self.values.tolist()

    def array(self) -> np.ndarray:
        """The values as a NumPy array of the tensor's shape (NaN for a missing float)."""
        v = self.values
        if isinstance(v, list):
            v = np.array([np.nan if x is None else x for x in v] if None in v else v, dtype=DATATYPES[self.datatype])
        return v.reshape(self.shape)


def datatype_of_dtype(dtype: str) -> str:
    """The v2 datatype that describes a pandas/NumPy dtype name (``BYTES`` for text)."""
    if dtype in ("bool", "boolean"):
        return "BOOL"
    for prefix, dt in (("float16", "FP16"), ("float32", "FP32"), ("float", "FP64"), ("Float", "FP64"),
                       ("double", "FP64"), ("uint", "UINT64"), ("UInt", "UINT64"), ("int", "INT64"), ("Int", "INT64")):
        if dtype.startswith(prefix):
            return dt
    return "BYTES"


def split_body(body: bytes, header_length: bytes | str | None) -> tuple[bytes, bytes]:
    """(the JSON header, the binary data after it) by ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise RequestError(400, f"Malformed Inference-Header-Content-Length header: {header_length!r}") from None
    if not 0 < n <= len(body):
        raise RequestError(
            400, f"Inference-Header-Content-Length is {n}, but the body has {len(body)} bytes: expected the length "
            "of the JSON header at the start of the body"
        )
    return body[:n], body[n:]


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise RequestError(400, f"Input {name!r}: expected 'data' to be a JSON list. Received: {type(data).__name__}",
                           field=name)
    if not data or not isinstance(data[0], list):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _check_shape(shape: Any, name: str) -> list[int]:
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(400, f"Input {name!r}: expected 'shape' to be a list of sizes (e.g. [3] or [3, 1]). "
                           f"Received: {shape!r}", field=name)
    return shape


def _from_json(data: Any, datatype: str, name: str, count: int) -> list[Any]:
    flat = _flatten(data, name)
    if len(flat) != count:
        raise RequestError(400, f"Input {name!r}: its shape holds {count} elements; 'data' has {len(flat)}", field=name)
    allowed = _JSON_TYPES.get(datatype)
    types = set(map(type, flat))
    if allowed is not None:
        ok = types <= {*allowed, type(None)}
    else:
        ok = types <= {int, float, type(None)}
    if not ok:
        bad = next(v for v in flat if type(v) not in (allowed or (int, float, type(None))))
        what = {"BOOL": "true or false", "BYTES": "strings"}.get(datatype, "numbers")
        raise RequestError(422, f"Input {name!r} ({datatype}): expected {what}. Received: {bad!r}", field=name)
    if type(None) in types and datatype not in ("FP16", "FP32", "FP64"):
        raise RequestError(422, f"Input {name!r} ({datatype}): null is only allowed in FP16, FP32 and FP64 "
                           "inputs (as a missing value)", field=name)
    if float in types and datatype not in ("FP16", "FP32", "FP64"):
        v = next(v for v in flat if type(v) is float)
        raise RequestError(422, f"Input {name!r} ({datatype}): expected integers. Received: {v!r}", field=name)
    return flat


def _from_binary(raw: bytes, datatype: str, name: str, count: int) -> "np.ndarray | list[Any]":
    if datatype != "BYTES":
        dt = DATATYPES[datatype]
        if len(raw) != count * dt.itemsize:
            raise RequestError(400, f"Input {name!r}: {count} {datatype} elements take {count * dt.itemsize} bytes; "
                               f"binary_data_size is {len(raw)}", field=name)
        view = _VIEW.get(datatype)
        if view is not None and count <= 64:  # a column of a few rows: a list at once, cheaper than NumPy
            return memoryview(raw).cast(view).tolist()
        return np.frombuffer(raw, dtype=dt)
    out: list[Any] = []
    try:
        _bytes_elements(raw, out)
    except struct.error:
        raise RequestError(400, f"Input {name!r}: malformed BYTES binary data (each element: a 4-byte "
                           "little-endian length, then that many bytes)", field=name) from None
    except UnicodeDecodeError:
        raise RequestError(422, f"Input {name!r}: element {len(out)} is not UTF-8 text", field=name) from None
    if len(out) != count:
        raise RequestError(400, f"Input {name!r}: its shape holds {count} elements; the binary data has {len(out)}",
                           field=name)
    return out


def flat_columns(inputs: Any) -> dict[str, list[Any]] | None:
    """The common case of JSON data in one pass: every input a column of shape
    ``[rows]`` or ``[rows, 1]``, its values flat JSON ``data`` -> name -> values;
    ``None`` when any input needs :func:`decode_inputs` (nested data, other shapes or
    datatypes, binary data: see :func:`binary_layout`, anything malformed: that path
    says what is wrong).

    The values' types are left to the column checks, which know each column's type.
    """
    if type(inputs) is not list or not inputs:
        return None
    out: dict[str, list[Any]] = {}
    for t in inputs:
        if type(t) is not dict or t.get("parameters"):
            return None
        data = t.get("data")
        datatype = t.get("datatype")
        if type(data) is not list or type(datatype) is not str or datatype not in DATATYPES:
            return None
        name, shape, n = t.get("name"), t.get("shape"), len(data)
        if type(name) is not str or name in out or not n or type(data[0]) is list or (shape != [n, 1] and shape != [n]):
            return None
        out[name] = data
    return out


#: where a request's binary inputs lie: per input (name, shape, size, one-element reader
#: or None, memoryview format or None: BYTES), and the binary part's whole size
Layout = tuple[tuple[tuple[str, list[int], int, "struct.Struct | None", "str | None"], ...], int]


def binary_layout(inputs: Any) -> Layout | None:
    """Where each input's values lie in the binary data, from the JSON header alone:
    every input a column of shape ``[rows]`` or ``[rows, 1]`` whose only parameter is
    its ``binary_data_size`` (what ``tritonclient`` sends); ``None`` otherwise.

    A header says nothing about the values, so the layout of one header serves every
    request that has the same header bytes (:class:`~daskml_scale.serving.protocols.v2.InferEndpoint`
    keeps them): a client sending single rows sends the same header each time.
    """
    if type(inputs) is not list or not inputs:
        return None
    out = []
    names: set[str] = set()
    total = 0
    for t in inputs:
        if type(t) is not dict or "data" in t:
            return None
        params, name, shape, datatype = t.get("parameters"), t.get("name"), t.get("shape"), t.get("datatype")
        if type(params) is not dict or len(params) != 1 or type(name) is not str or name in names:
            return None
        size = params.get("binary_data_size")
        if type(size) is not int or size <= 0 or type(shape) is not list or type(datatype) is not str:
            return None
        if datatype == "BYTES":  # the count is in the data: checked as it is read
            one, view = None, None
            if not (len(shape) == 1 or shape[1:] == [1]):
                return None
        else:
            view = _VIEW.get(datatype)
            if view is None or size % DATATYPES[datatype].itemsize:
                return None
            n = size // DATATYPES[datatype].itemsize
            if shape != [n, 1] and shape != [n]:
                return None
            one = _ONE[datatype] if n == 1 else None  # one number (a single-row request): no view to make
        names.add(name)
        out.append((name, shape, size, one, view))
        total += size
    return tuple(out), total


def read_layout(layout: Layout, binary: bytes) -> dict[str, list[Any]] | None:
    """The columns (name -> values) of ``binary`` laid out as ``layout`` says; ``None``
    when the data does not fit it (:func:`decode_inputs` says how)."""
    columns, total = layout
    if len(binary) != total:
        return None
    out: dict[str, list[Any]] = {}
    pos = 0
    for name, shape, size, one, view in columns:
        if one is not None:
            data = list(one.unpack_from(binary, pos))
        elif view is not None:
            data = memoryview(binary)[pos : pos + size].cast(view).tolist()
        else:  # BYTES
            if size >= 4 and _LEN.unpack_from(binary, pos)[0] == size - 4:  # one string
                try:
                    data = [binary[pos + 4 : pos + size].decode("utf-8")]
                except UnicodeDecodeError:
                    return None
            else:
                data = []
                try:
                    _bytes_elements(binary[pos : pos + size], data)
                except (struct.error, UnicodeDecodeError):
                    return None
            n = len(data)
            if not n or (shape != [n, 1] and shape != [n]):
                return None
        pos += size
        out[name] = data
    return out


def _bytes_elements(raw: bytes, out: list[Any]) -> None:
    """Append BYTES binary data's elements to ``out`` as text (each element: a 4-byte
    little-endian length, then the bytes); ``struct.error`` when malformed,
    ``UnicodeDecodeError`` for an element that is not UTF-8 (``out`` holds those before it)."""
    pos, end = 0, len(raw)
    while pos < end:
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise struct.error("truncated")
        out.append(raw[pos : pos + n].decode("utf-8"))
        pos += n


def decode_inputs(inputs: Any, binary: bytes) -> list[Tensor]:
    """The request's ``inputs``, decoded and checked (names, datatypes, shapes, sizes).

    Raises
    ------
    RequestError
        400 for a malformed tensor (naming it), 422 for values of the wrong type.
    """
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "Expected 'inputs' to be a non-empty list of tensors "
                           "({\"name\", \"datatype\", \"shape\", \"data\"}). Received: "
                           f"{type(inputs).__name__ if not isinstance(inputs, list) else 'an empty list'}")
    out: list[Tensor] = []
    pos = 0
    seen: set[str] = set()
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(400, f"Input {i}: expected an object with a string 'name'. Received: {str(t)[:80]}")
        name = t["name"]
        if name in seen:
            raise RequestError(400, f"Input {name!r} is given twice", field=name)
        seen.add(name)
        datatype = t.get("datatype")
        if type(datatype) is not str or datatype not in DATATYPES:  # (a JSON list or object is unhashable)
            raise RequestError(400, f"Input {name!r}: expected 'datatype' among {sorted(DATATYPES)}. "
                               f"Received: {datatype!r}", field=name)
        shape = _check_shape(t.get("shape"), name)
        count = math.prod(shape)
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, f"Input {name!r}: expected 'parameters' to be an object", field=name)
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or pos + size > len(binary):
                raise RequestError(400, f"Input {name!r}: binary_data_size {size!r} runs past the {len(binary)} bytes "
                                   "of binary data after the JSON header (Inference-Header-Content-Length)", field=name)
            values = _from_binary(binary[pos : pos + size], datatype, name, count)
            pos += size
        elif "data" in t:
            values = _from_json(t["data"], datatype, name, count)
        else:
            raise RequestError(400, f"Input {name!r} has neither 'data' nor parameters.binary_data_size", field=name)
        out.append(Tensor(name, datatype, shape, values, params))
    if pos != len(binary):
        raise RequestError(400, f"{len(binary) - pos} bytes of binary data after the JSON header belong to no input")
    return out


def encode_output(name: str, datatype: str, values: Sequence[Any], shape: list[int], binary: bool) -> tuple[dict[str, Any], bytes]:
    """One output tensor: its JSON object and, when ``binary``, its bytes (else ``b""``).

    Missing values (``None``) become NaN in float outputs and ``""`` in ``BYTES``.
    """
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if datatype == "BYTES":
        strs = ["" if v is None else str(v) for v in values]
        if not binary:
            out["data"] = strs
            return out, b""
        raw = b"".join(_LEN.pack(len(b)) + b for b in (s.encode("utf-8") for s in strs))
    else:
        if not binary:
            # JSON has no NaN: null (v != v is NaN)
            out["data"] = [None if v is None or v != v else v for v in values]
            return out, b""
        raw = np.asarray(values, dtype=DATATYPES[datatype]).tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    return out, raw
