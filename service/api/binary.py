"""The Open Inference Protocol's binary tensor data extension, framed as Triton frames it.

A request or response body is a JSON header followed by the raw bytes of some tensors. The
``Inference-Header-Content-Length`` header gives the JSON's length; each tensor sent as raw bytes
says how many in ``parameters.binary_data_size``, and the tensors follow one another in the order
they are listed. Numbers are little-endian and row-major; a BYTES element is a 4-byte little-endian
length and then that many bytes. Every size is checked against what is actually there, so a body
that disagrees with its header is a 400, never a read past the end or a wait for more bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInput, PayloadTooLarge

HEADER = "inference-header-content-length"

# Datatypes this server reads or writes as numbers, with their little-endian numpy types.
NUMPY_TYPES: dict[str, np.dtype[np.generic]] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "FP64": np.dtype("<f8"),
    "UINT8": np.dtype("u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip or deflate), refusing more than ``limit`` bytes of output."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    kind = encoding.strip().lower()
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(kind)
    if wbits is None:
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; gzip, deflate or identity")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)  # a small bomb cannot grow past the limit
    except zlib.error as exc:
        raise InvalidInput(f"body is not valid {kind} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes once decompressed")
    if not inflater.eof:
        raise InvalidInput(f"body is truncated {kind} data")
    return out


def split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary section that follows it."""
    if header_length is None:
        return body, b""
    value = header_length.strip()
    if not value.isdigit() or len(value) > 12:
        raise InvalidInput(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
    n = int(value)
    if n > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes")
    return body[:n], body[n:]


class Chunks:
    """The binary section handed out in order, one tensor's ``binary_data_size`` at a time."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: object, name: str) -> bytes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {name!r}: `binary_data_size` must be a non-negative integer, got {size!r}")
        end = self.offset + size
        if end > len(self.data):
            raise InvalidInput(f"input {name!r}: `binary_data_size` is {size} but only {len(self.data) - self.offset} "
                               "bytes of binary data are left in the body")
        chunk = bytes(self.data[self.offset:end])
        self.offset = end
        return chunk

    def finish(self) -> None:
        left = len(self.data) - self.offset
        if left:
            raise InvalidInput(f"{left} bytes of binary data after the last input's `binary_data_size`")


def unpack_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """``count`` BYTES elements, each a 4-byte little-endian length and its bytes, filling ``raw`` exactly."""
    out: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(out) == count:
            raise InvalidInput(f"input {name!r}: binary data holds more than the {count} elements of its shape")
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: element {len(out)} has a truncated length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"input {name!r}: element {len(out)} says {size} bytes but only "
                               f"{len(raw) - offset} are left")
        out.append(raw[offset:offset + size])
        offset += size
    if len(out) != count:
        raise InvalidInput(f"input {name!r}: binary data holds {len(out)} elements, its shape says {count}")
    return out


def pack_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def unpack_numbers(raw: bytes, datatype: str, shape: Sequence[int], name: str) -> np.ndarray:
    dtype = NUMPY_TYPES[datatype]
    count = math.prod(shape)  # Python integers: np.prod wraps around on a hostile shape
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {len(raw)} bytes of binary data, but shape {list(shape)} of "
                           f"{datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def pack_numbers(array: np.ndarray, datatype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype]).tobytes()
