"""The benchmark's paired measurement (``tests/bench/bench_http.paired``): the concurrency-1 targets
rest on it, so it must really alternate servers request by request and compare neighbours."""

from __future__ import annotations

import asyncio

import pytest

from tests.bench.bench_http import Turns, paired


async def _server(name: str, log: list[str], delay_s: float, status: bytes = b"200 OK") -> tuple[asyncio.Server, int]:
    """A keep-alive HTTP server that answers every request after ``delay_s`` and logs who answered."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
                log.append(name)
                await asyncio.sleep(delay_s)
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed its connection
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _stop(*servers: asyncio.Server) -> None:
    await asyncio.sleep(0.05)  # let the handlers see their clients go and close their ends
    for s in servers:
        s.close()
        await s.wait_closed()


def _request(port: int) -> bytes:
    return f"POST /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1\r\n\r\nz".encode()


def test_servers_take_turns_in_a_rotating_order_and_ratios_compare_neighbours() -> None:
    async def scenario() -> tuple[list[str], list[list[float]]]:
        log: list[str] = []
        (a, pa), (b, pb), (c, pc) = [await _server(n, log, d) for n, d in (("a", 0.002), ("b", 0.02), ("c", 0.0))]
        try:
            out = await paired([(pa, _request(pa)), (pb, _request(pb)), (pc, _request(pc))], turns=4)
        finally:
            await _stop(a, b, c)
        return log, out

    log, latencies = asyncio.run(scenario())
    assert log[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # warm-up, three each
    assert log[9:] == list("abc" "bca" "cab" "abc")  # each turn one request each, order rotated
    assert [len(x) for x in latencies] == [4, 4, 4]
    assert all(x >= 20 for x in latencies[1]) and all(x < 20 for x in latencies[0])
    turns = Turns(("a", "b", "c"), "/x", "img", 4, latencies=latencies)
    assert turns.ratio(1, 0) > 2 and turns.ratio(0, 0) == 1.0
    middle = sorted(latencies[1])[1:3]
    assert turns.p50(1) == pytest.approx(sum(middle) / 2)


def test_a_failed_request_stops_the_measurement() -> None:
    async def scenario() -> None:
        server, port = await _server("a", [], 0.0, b"503 Service Unavailable")
        try:
            await paired([(port, _request(port))], turns=2)
        finally:
            await _stop(server)

    with pytest.raises(RuntimeError, match="HTTP 503"):
        asyncio.run(scenario())
