"""HTTP throughput benchmark (``make bench-http``): real servers on loopback, a bounded async load.

Rows: the built-in ``shapes`` model with batching on and with ``SERVICE_MAX_BATCH_SIZE=1``; a
torchvision resnet18 (random weights, 224x224) served by camserve and by the per-request
pytorch-grad-cam baseline (``baseline_app.py``). Each cell sends a fixed number of requests at a
fixed concurrency and reports p50/p95 latency and images per second. Also: at concurrency 1, the
HTTP round trip minus the in-process time of the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.models.scenes import make_scene
from tests.api.server import ROOT, free_port, start_server

CONCURRENCY = (1, 8, 32)


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _request_bytes(port: int, path: str, image: bytes) -> bytes:
    """One multipart POST, built once and replayed: the client must cost far less than the server."""
    boundary = b"camservebench"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n")
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary.decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)  # not Inference-Header-Content-Length
    assert match, head
    await reader.readexactly(int(match.group(1)))
    return int(head.split(b" ", 2)[1])


async def load(port: int, path: str, image: bytes, concurrency: int, total: int,
               request: bytes | None = None) -> tuple[float, float, float]:
    """Send ``total`` requests over ``concurrency`` keep-alive connections; p50 ms, p95 ms, images/s.

    A raw-socket client replaying one prepared request: httpx spends about a millisecond of CPU per
    request, which on two cores would make the load generator, not the server, the bottleneck."""
    request = request or _request_bytes(port, path, image)
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await _exchange(reader, writer, request)  # warm the connection
            await start.wait()
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                status = await _exchange(reader, writer, request)
                latencies.append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    raise RuntimeError(f"{path}: HTTP {status}")
        finally:
            writer.close()

    start = asyncio.Event()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))], total / elapsed


def run_rows(name: str, port: int, image: bytes, requests: int) -> dict[tuple[str, int], tuple[float, float, float]]:
    out = {}
    for path in ("/predict", "/explain"):
        for c in CONCURRENCY:
            out[(path, c)] = p50, p95, ips = asyncio.run(load(port, path, image, c, max(requests, 2 * c)))
            print(f"| {name} | {path} | {c} | {p50:.1f} | {p95:.1f} | {ips:.1f} |", flush=True)
    return out


def in_process_ms(config: Path | None, image: bytes, device: str) -> float:
    """Median time of the same single-image explain done in-process: decode, batcher, engine, PNG."""
    from service.app import batch_settings, limits
    from service.config import load_settings
    from service.dataplane import DataPlane, ExplainOptions
    from service.repository import ModelRepository

    settings = load_settings(config)

    async def go() -> float:
        repository = ModelRepository(batch_settings(settings))
        repository.start()
        await repository.load(settings.models[0])
        dataplane = DataPlane(repository, limits(settings))
        times = []
        for _ in range(60):
            t0 = time.perf_counter()
            await dataplane.infer(None, [image], explain=ExplainOptions())
            times.append((time.perf_counter() - t0) * 1000)
        await repository.close()
        return statistics.median(times[10:])

    return asyncio.run(go())


def _v2_request(port: int, image: bytes, as_binary: bool, outputs: list[str] | None) -> bytes:
    """One Open Inference Protocol infer request: the image as a BYTES tensor, base64 in JSON or raw."""
    import base64
    import json
    import struct

    tensor: dict[str, object] = {"name": "image", "datatype": "BYTES", "shape": [1]}
    raw = b""
    if as_binary:
        raw = struct.pack("<I", len(image)) + image
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = [base64.b64encode(image).decode()]
    header: dict[str, object] = {"inputs": [tensor]}
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": as_binary}} for n in outputs]
    elif as_binary:
        header["parameters"] = {"binary_data_output": True}
    text = json.dumps(header).encode()
    extra = f"Inference-Header-Content-Length: {len(text)}\r\n" if as_binary else ""
    head = (f"POST /v2/models/shapes/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"{'application/octet-stream' if as_binary else 'application/json'}\r\n{extra}"
            f"Content-Length: {len(text) + len(raw)}\r\n\r\n").encode()
    return head + text + raw


def protocol_rows(config: Path, image: bytes, requests: int, concurrency: int = 8, rounds: int = 5) -> None:
    """The Open Inference Protocol beside the native multipart routes: same server, model and image.

    The variants take turns, ``rounds`` times, and the median of each is shown, so drift on a shared
    machine touches them all alike."""
    port = free_port()
    proc = start_server(port, {"SERVICE_LOG_LEVEL": "warning"}, config)
    variants = {
        "native /predict (multipart)": _request_bytes(port, "/predict", image),
        "V2 scores, JSON base64": _v2_request(port, image, False, ["scores"]),
        "V2 scores, binary": _v2_request(port, image, True, ["scores"]),
        "native /explain (multipart, png)": _request_bytes(port, "/explain", image),
        "V2 all outputs, JSON base64": _v2_request(port, image, False, None),
        "V2 all outputs, binary": _v2_request(port, image, True, None),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, request in variants.items():
                runs[name].append(asyncio.run(load(port, "", b"", concurrency, max(requests, 2 * concurrency),
                                                   request)))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\n| shapes, concurrency {concurrency}, median of {rounds} interleaved runs | p50 ms | p95 ms | images/s |")
    print("|---|---|---|---|")
    best = {}
    for name, cells in runs.items():
        best[name] = statistics.median(c[2] for c in cells)
        p50, p95 = statistics.median(c[0] for c in cells), statistics.median(c[1] for c in cells)
        print(f"| {name} | {p50:.1f} | {p95:.1f} | {best[name]:.1f} |", flush=True)
    scores = best["V2 scores, binary"] / best["native /predict (multipart)"]
    explained = best["V2 all outputs, binary"] / best["native /explain (multipart, png)"]
    print(f"- V2 binary / native multipart throughput: scores vs /predict {scores:.2f}x, all outputs vs /explain "
          f"{explained:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=160, help="requests per shapes cell")
    parser.add_argument("--resnet-requests", type=int, default=48, help="requests per resnet18 cell")
    parser.add_argument("--protocols-only", action="store_true", help="only the V2 vs native rows")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shapes_png = _png(make_scene(rng).image)
    if args.protocols_only:
        cfg = Path(tempfile.mkdtemp()) / "shapes.toml"
        cfg.write_text(f'[models.shapes]\nsource = "builtin:shapes"\ndevice = "{args.device}"\n')
        protocol_rows(cfg, shapes_png, args.requests)
        return
    photo = _png(np.asarray(Image.fromarray(make_scene(rng).image).resize((256, 256), Image.BILINEAR)), "JPEG")
    tmp = Path(tempfile.mkdtemp())
    r18 = tmp / "r18.toml"
    r18.write_text(f'[models.r18]\nsource = "torchvision:resnet18"\nweights = "none"\ndevice = "{args.device}"\n')
    shapes_cfg = tmp / "shapes.toml"
    shapes_cfg.write_text(f'[models.shapes]\nsource = "builtin:shapes"\ndevice = "{args.device}"\n')

    print(f"# HTTP benchmark on {platform.machine()}, {os.cpu_count()} cores, device {args.device}; "
          "load generator on the same machine")
    print("| server | endpoint | concurrency | p50 ms | p95 ms | images/s |")
    print("|---|---|---|---|---|---|")
    results = {}
    runs: list[tuple[str, Path | None, dict[str, str], bytes, int]] = [
        ("shapes batched", shapes_cfg, {}, shapes_png, args.requests),
        ("shapes max_batch_size=1", shapes_cfg, {"SERVICE_MAX_BATCH_SIZE": "1"}, shapes_png, args.requests),
        ("shapes max_wait_ms=0", shapes_cfg, {"SERVICE_MAX_WAIT_MS": "0"}, shapes_png, args.requests),
        ("resnet18 camserve", r18, {}, photo, args.resnet_requests),
    ]
    for name, cfg, env, image, n in runs:
        port = free_port()
        proc = start_server(port, {**env, "SERVICE_LOG_LEVEL": "warning"}, cfg)
        try:
            results[name] = run_rows(name, port, image, n)
        finally:
            proc.terminate()
            proc.wait(30)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.bench.baseline_app:app", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env={**os.environ, "BASELINE_DEVICE": args.device})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        results["baseline"] = run_rows("resnet18 pytorch-grad-cam baseline", port, photo, args.resnet_requests)
    finally:
        proc.terminate()
        proc.wait(30)

    def ips(name: str, path: str, c: int) -> float:
        return results[name][(path, c)][2]

    print()
    for path in ("/predict", "/explain"):
        print(f"- shapes {path} at concurrency 32: batched / unbatched throughput = "
              f"{ips('shapes batched', path, 32) / ips('shapes max_batch_size=1', path, 32):.2f}x")
    for c in (1, 32):
        waited, eager = results["shapes batched"][("/explain", c)], results["shapes max_wait_ms=0"][("/explain", c)]
        print(f"- shapes /explain at concurrency {c}: max_wait_ms 5 -> 0 changes p50 {waited[0]:.1f} -> "
              f"{eager[0]:.1f} ms and throughput {waited[2]:.0f} -> {eager[2]:.0f} images/s")
    for path in ("/predict", "/explain"):
        print(f"- resnet18 {path} at concurrency 8: camserve / baseline throughput = "
              f"{ips('resnet18 camserve', path, 8) / ips('baseline', path, 8):.2f}x")
    protocol_rows(shapes_cfg, shapes_png, args.requests)
    inproc = in_process_ms(shapes_cfg, shapes_png, args.device)
    http = results["shapes batched"][("/explain", 1)][0]
    print(f"- shapes /explain at concurrency 1: HTTP p50 {http:.1f} ms, in-process p50 {inproc:.1f} ms "
          f"(decode, batcher, engine, PNG): the HTTP round trip adds {http - inproc:.1f} ms")


if __name__ == "__main__":
    main()
