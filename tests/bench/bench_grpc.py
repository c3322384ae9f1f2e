"""gRPC rows of ``make bench-http``: the Open Inference Protocol over gRPC beside REST V2 (binary
extension) and the native multipart route, on one server per model, at concurrency 8 and 32.

REST is driven by ``bench_http.load``, a raw-socket client replaying one prepared request over
``concurrency`` keep-alive connections; gRPC alike by ``h2_replay.h2_load``, a raw HTTP/2 client
replaying one prepared ``ModelInferRequest`` over ``concurrency`` connections, one call in flight on
each. Both cost about 0.1 ms of CPU per call, so on a machine whose cores the load generator shares
with the server the comparison is the servers'. The "gRPC scores, grpcio client" row drives the same
server with grpcio's own asyncio client (one channel, identity serialisers): about 0.25-0.3 ms per
call, which a two-core machine takes from the server; it is shown, not compared.

Variants take turns round by round; each ratio is the median of per-round ratios (see ``bench_http``).
Beside throughput, each row gives the CPU milliseconds per call that the server process (all its
threads) and the load generator spent: less at the mercy of other jobs on a shared machine than
images/s, though contention inflates it too.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import statistics
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc

from tests.api.server import free_port, start_server
from tests.bench.bench_http import _request_bytes, _v2_request, drive, load
from tests.bench.h2_replay import h2_load

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_request(model: str, image: bytes) -> bytes:
    """``ModelInferRequest`` bytes: the image as a BYTES tensor in ``raw_input_contents``, scores asked for."""
    from tritonclient.grpc import service_pb2  # only this process's client uses the inference messages

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.outputs.add(name="scores")
    request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return bytes(request.SerializeToString())


async def grpc_load(address: str, request: bytes, concurrency: int, total: int) -> tuple[float, float, float]:
    """As ``bench_http.load`` with grpcio's asyncio client: ``total`` calls, ``concurrency`` at a time on
    one channel; p50 ms, p95 ms, images/s."""
    latencies: list[float] = []
    remaining = total
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

        async def worker() -> None:
            nonlocal remaining
            await call(request)  # warm
            await start.wait()
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                await call(request)
                latencies.append((time.perf_counter() - t0) * 1000)

        start = asyncio.Event()
        return await drive(worker, start, concurrency, latencies, total)


Load = Callable[[int, int], Coroutine[Any, Any, tuple[float, float, float]]]


def _variants(port: int, grpc_port: int, model: str, image: bytes) -> dict[str, Load]:
    """Each variant's load: (concurrency, calls) -> p50 ms, p95 ms, images/s."""
    native = _request_bytes(port, f"/predict?model={model}", image)
    v2 = _v2_request(port, image, True, ["scores"], model)
    message = grpc_request(model, image)
    return {"native /predict (multipart)": lambda c, n: load(port, native, c, n),
            "V2 scores, binary": lambda c, n: load(port, v2, c, n),
            "gRPC scores": lambda c, n: h2_load("127.0.0.1", grpc_port, METHOD, message, c, n),
            "gRPC scores, grpcio client": lambda c, n: grpc_load(f"127.0.0.1:{grpc_port}", message, c, n)}


def _cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all its threads (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(coro: Coroutine[Any, Any, tuple[float, float, float]], calls: int, server: int
           ) -> tuple[float, float, float, float, float]:
    """Run one load; its figures, then the CPU ms per call of the load generator and of the server."""
    before, server_before = resource.getrusage(resource.RUSAGE_SELF), _cpu_s(server)
    got = asyncio.run(coro)
    after, server_after = resource.getrusage(resource.RUSAGE_SELF), _cpu_s(server)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return (*got, cpu * 1000 / calls, (server_after - server_before) * 1000 / calls)


def grpc_rows(models: list[tuple[str, str, Path, bytes, int]], rounds: int, concurrencies: tuple[int, ...] = (8, 32)
              ) -> None:
    """``models``: (label, model name, config, image, requests per cell). Prints one table per model."""
    for label, model, config, image, requests in models:
        port, grpc_port = free_port(), free_port()
        proc = start_server(port, {"SERVICE_LOG_LEVEL": "warning", "SERVICE_GRPC_PORT": str(grpc_port),
                                   "SERVICE_SHUTDOWN_GRACE_S": "0"}, config,
                            ready_timeout_s=600)
        variants = _variants(port, grpc_port, model, image)
        cells = [(name, c) for c in concurrencies for name in variants]
        runs: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {cell: [] for cell in cells}
        try:
            for r in range(rounds):
                for name, c in cells[r % len(cells):] + cells[:r % len(cells)]:
                    calls = max(requests, 4 * c)
                    runs[name, c].append(_timed(variants[name](c, calls), calls, proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"\n| {label}, median of {rounds} interleaved runs | concurrency | p50 ms | p95 ms | images/s | "
              "/ V2 binary (per-round median) | server CPU ms/call | client CPU ms/call |")
        print("|---|---|---|---|---|---|---|---|")
        for name, c in cells:
            got = runs[name, c]
            ref = runs["V2 scores, binary", c]
            ratio = statistics.median(x[2] / y[2] for x, y in zip(got, ref, strict=True))
            verdict = " (missed: target >= 1.0x)" if name == "gRPC scores" and round(ratio, 2) < 1.0 else ""
            print(f"| {name} | {c} | {statistics.median(g[0] for g in got):.1f} | "
                  f"{statistics.median(g[1] for g in got):.1f} | {statistics.median(g[2] for g in got):.1f} | "
                  f"{ratio:.2f}x{verdict} | {statistics.median(g[4] for g in got):.2f} | "
                  f"{statistics.median(g[3] for g in got):.2f} |", flush=True)
