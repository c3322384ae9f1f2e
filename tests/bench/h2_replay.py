"""A raw HTTP/2 gRPC client for the benchmark: the gRPC counterpart of ``bench_http.load``'s raw-socket
HTTP/1.1 client, so that REST and gRPC are driven alike and the load generator, which shares the cores
with the server, costs about the same per call on both sides.

``concurrency`` connections, one call in flight on each, replaying one prepared call: the HEADERS frame
is encoded once (HPACK literals, no dynamic table, so its bytes never change) and only the stream id
changes from call to call. The client does what HTTP/2 asks of a peer (settings and their ack, ping
acks, both flow-control directions) and nothing more; it reads no HPACK, so a call succeeds when a
response message of the expected size arrives before the trailers end the stream (an error status is
sent as trailers alone, without a message).

grpcio's own client (``bench_grpc.grpc_load``) spends about three times the raw HTTP/1.1 client's CPU
per call; on a two-core machine shared with the server that difference is the server's loss, not its cost.
"""

from __future__ import annotations

import asyncio
import struct
import time

from tests.bench.bench_http import drive

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x4, 0x5
BIG_WINDOW = 2**31 - 1
DEFAULT_FRAME, DEFAULT_WINDOW = 16384, 65535
_HEAD = struct.Struct(">IBI")  # a frame's head: length (24 bits) and type in one word, flags, stream


class CallFailed(RuntimeError):
    """The server ended a call without the expected response message, or broke the connection."""


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman (RFC 7541, 6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def headers_block(authority: str, method: str) -> bytes:
    """The request's header block: a gRPC unary call of ``method`` (``/package.Service/Method``)."""
    return (b"\x83\x86"  # :method POST and :scheme http, from the static table
            + _literal(b":path", method.encode()) + _literal(b":authority", authority.encode())
            + _literal(b"content-type", b"application/grpc") + _literal(b"te", b"trailers"))


class Connection:
    """One HTTP/2 connection that replays one unary call, one call at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, block: bytes, message: bytes
                 ) -> None:
        self.reader, self.writer = reader, writer
        self.block = block
        self.body = struct.pack(">BI", 0, len(message)) + message  # the gRPC length-prefixed message
        self.buf = bytearray()
        self.pos = 0  # where the next unread frame starts in buf
        self.stream = -1  # client streams are odd: the first call's is 1
        self.send_window = DEFAULT_WINDOW  # the connection's; each new stream gets stream_window
        self.stream_window = DEFAULT_WINDOW
        self.max_frame = DEFAULT_FRAME
        self.expected: int | None = None  # the response message's size, learnt from the first call

    @classmethod
    async def open(cls, host: str, port: int, method: str, message: bytes) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer, headers_block(f"{host}:{port}", method), message)
        settings = struct.pack(">HIHI", 0x2, 0, INITIAL_WINDOW_SIZE, BIG_WINDOW)  # no push; never block replies
        writer.write(PREFACE + _frame(SETTINGS, 0, 0, settings)
                     + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", BIG_WINDOW - DEFAULT_WINDOW)))
        await writer.drain()
        return conn

    async def _read_frame(self) -> tuple[int, int, int, int, bytes]:
        """The next frame: type, flags, stream, payload length, and the payload itself unless it is DATA
        (only its length counts). Frames are parsed in place; the buffer is compacted once drained."""
        while len(self.buf) - self.pos < 9:
            await self._fill()
        word, flags, stream = _HEAD.unpack_from(self.buf, self.pos)
        length, kind = word >> 8, word & 0xFF
        end = self.pos + 9 + length
        while len(self.buf) < end:
            await self._fill()
        payload = b"" if kind == DATA else bytes(self.buf[self.pos + 9:end])
        self.pos = end
        if end == len(self.buf):
            self.buf.clear()
            self.pos = 0
        return kind, flags, stream & 0x7FFFFFFF, length, payload

    async def _fill(self) -> None:
        chunk = await self.reader.read(262144)
        if not chunk:
            raise CallFailed("the server closed the connection")
        self.buf += chunk

    def _control(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        """Settings, pings, window updates and errors, whenever they come."""
        if kind == SETTINGS and not flags & ACK:
            for k in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[k:k + 6])
                if key == INITIAL_WINDOW_SIZE:
                    self.stream_window = value
                elif key == MAX_FRAME_SIZE:
                    self.max_frame = value
            self.writer.write(_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.writer.write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE and stream == 0:
            self.send_window += struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        elif kind == GOAWAY or (kind == RST_STREAM and stream == self.stream):
            raise CallFailed(f"the server sent {'GOAWAY' if kind == GOAWAY else 'RST_STREAM'} {payload.hex()}")

    async def call(self) -> None:
        """One call: send the request, read until the trailers; raise ``CallFailed`` unless it answered."""
        if len(self.body) > self.stream_window:
            raise CallFailed(f"a {len(self.body)}-byte request exceeds the server's stream window")
        while self.send_window < len(self.body):  # wait for the server to open the connection's window
            kind, flags, stream, _, payload = await self._read_frame()
            self._control(kind, flags, stream, payload)
        self.stream += 2
        self.send_window -= len(self.body)
        out = [_frame(HEADERS, END_HEADERS, self.stream, self.block)]
        for k in range(0, len(self.body), self.max_frame):
            chunk = self.body[k:k + self.max_frame]
            out.append(_frame(DATA, END_STREAM if k + len(chunk) >= len(self.body) else 0, self.stream, chunk))
        self.writer.write(b"".join(out))
        received = 0
        while True:
            kind, flags, stream, length, payload = await self._read_frame()
            if stream != self.stream:
                self._control(kind, flags, stream, payload)
                continue
            if kind == DATA:
                received += length
            elif kind == RST_STREAM:
                self._control(kind, flags, stream, payload)
            if flags & END_STREAM and kind in (DATA, HEADERS):
                break
        if received == 0:
            raise CallFailed(f"call {self.stream} ended without a response message: the server answered an error")
        if self.expected is None:
            self.expected = received
        elif received != self.expected:
            raise CallFailed(f"call {self.stream}: a {received}-byte response message, expected {self.expected}")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def h2_load(host: str, port: int, method: str, message: bytes, concurrency: int, total: int
                  ) -> tuple[float, float, float]:
    """As ``bench_http.load``: ``total`` calls of ``method`` with the serialised request ``message`` over
    ``concurrency`` connections; p50 ms, p95 ms, calls/s."""
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        conn = await Connection.open(host, port, method, message)
        try:
            await conn.call()  # warm the connection, and learn the response's size
            await start.wait()
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                await conn.call()
                latencies.append((time.perf_counter() - t0) * 1000)
        finally:
            await conn.close()

    start = asyncio.Event()
    return await drive(worker, start, concurrency, latencies, total)
