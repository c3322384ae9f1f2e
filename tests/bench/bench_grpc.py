"""gRPC rows of ``make bench-http``: the Open Inference Protocol over gRPC beside REST V2 (binary
extension) and the native multipart route, on one server per model, at concurrency 8 and 32.

The gRPC load replays one prepared, already serialised ``ModelInferRequest`` over one channel (HTTP/2
multiplexes the calls, as Triton's and KServe's clients do), with identity serialisers, so that the
client costs about what the raw-socket HTTP client costs. Variants take turns round by round; each
ratio is the median of per-round ratios (see ``bench_http``).
"""

from __future__ import annotations

import asyncio
import statistics
import struct
import time
from pathlib import Path

import grpc

from tests.api.server import free_port, start_server
from tests.bench.bench_http import _request_bytes, _v2_request, drive, load

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
    """As ``bench_http.load``: ``total`` calls, ``concurrency`` at a time; p50 ms, p95 ms, images/s."""
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


def grpc_rows(models: list[tuple[str, str, Path, bytes, int]], rounds: int, concurrencies: tuple[int, ...] = (8, 32)
              ) -> None:
    """``models``: (label, model name, config, image, requests per cell). Prints one table per model."""
    for label, model, config, image, requests in models:
        port, grpc_port = free_port(), free_port()
        proc = start_server(port, {"SERVICE_LOG_LEVEL": "warning", "SERVICE_GRPC_PORT": str(grpc_port),
                                   "SERVICE_SHUTDOWN_GRACE_S": "0"}, config,
                            ready_timeout_s=600)
        address = f"127.0.0.1:{grpc_port}"
        variants = {"native /predict (multipart)": _request_bytes(port, f"/predict?model={model}", image),
                    "V2 scores, binary": _v2_request(port, image, True, ["scores"], model),
                    "gRPC scores": grpc_request(model, image)}
        cells = [(name, c) for c in concurrencies for name in variants]
        runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {cell: [] for cell in cells}
        try:
            for r in range(rounds):
                for name, c in cells[r % len(cells):] + cells[:r % len(cells)]:
                    total = max(requests, 4 * c)
                    coro = (grpc_load(address, variants[name], c, total) if name.startswith("gRPC")
                            else load(port, variants[name], c, total))
                    runs[name, c].append(asyncio.run(coro))
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"\n| {label}, median of {rounds} interleaved runs | concurrency | p50 ms | p95 ms | images/s | "
              "/ V2 binary (per-round median) |")
        print("|---|---|---|---|---|---|")
        for name, c in cells:
            got = runs[name, c]
            ref = runs["V2 scores, binary", c]
            ratio = statistics.median(x[2] / y[2] for x, y in zip(got, ref, strict=True))
            verdict = " (missed: target >= 1.0x)" if name.startswith("gRPC") and ratio < 1.0 else ""
            print(f"| {name} | {c} | {statistics.median(g[0] for g in got):.1f} | "
                  f"{statistics.median(g[1] for g in got):.1f} | {statistics.median(g[2] for g in got):.1f} | "
                  f"{ratio:.2f}x{verdict} |", flush=True)
