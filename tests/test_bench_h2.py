"""The benchmark's raw HTTP/2 gRPC client (``tests/bench/h2_replay``): the gRPC throughput target rests
on it, so it must really complete calls against a real gRPC server, and fail loudly when they fail."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.bench.h2_replay import CallFailed, Connection, h2_load

METHOD = "/bench.Echo/Call"


async def _server(log: list[int]) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server whose one method answers a request's length as 8 bytes; ``b"fail"`` aborts."""

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        log.append(len(request))
        if request == b"fail":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")
        return len(request).to_bytes(8, "big")

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_calls_complete_across_frames_and_flow_control_windows():
    async def run() -> tuple[float, float, float]:
        log: list[int] = []
        server, port = await _server(log)
        try:
            # 40 kB: three DATA frames each; 200 of them pass the connection's 64 kB window many times over.
            got = await asyncio.wait_for(h2_load("127.0.0.1", port, METHOD, b"x" * 40_000, 4, 200), 60)
        finally:
            await server.stop(None)
        assert log == [40_000] * (200 + 4)  # every call, and one warm-up per connection, reached the server
        return got

    p50, p95, rate = asyncio.run(run())
    assert 0 < p50 <= p95 and rate > 0


def test_an_error_status_fails_the_call():
    async def run() -> None:
        server, port = await _server([])
        conn = await Connection.open("127.0.0.1", port, METHOD, b"fail")
        try:
            with pytest.raises(CallFailed, match="without a response message"):
                await asyncio.wait_for(conn.call(), 30)
        finally:
            await conn.close()
            await server.stop(None)

    asyncio.run(run())
