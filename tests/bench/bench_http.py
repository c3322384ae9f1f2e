"""HTTP benchmark (``make bench-http``): real servers on loopback, a bounded raw-socket load.

Every server variant is started once, up front; then the cells (variant x endpoint x concurrency x
body) are measured in rounds, each round visiting every cell once in a rotated order, so slow drifts
of a shared machine hit all variants alike. Each figure is the median over rounds; each ratio is the
median of the per-round ratios of two cells measured minutes apart at most.

The concurrency-1 targets are measured more finely (``paired``): the servers compared take turns
request by request on one keep-alive connection each, and a ratio is the median of per-turn ratios.
This machine's speed drifts by tens of percent within minutes (``make bench-stages``' engine row, the
same code and call, has read 5.7 to 8.4 ms from run to run), and a few seconds' cell of resnet18
requests lands wherever the drift is; two requests a fraction of a second apart do not.

Variants: the built-in ``shapes`` model with the default (adaptive) batch policy, with batching off
(``max_batch_size=1``) and with the fixed 5 ms and 0 ms waits; a torchvision resnet18 (random weights,
224x224) served by camserve, with batching off, and by the per-request pytorch-grad-cam baseline
(``baseline_app.py``) and by KServe's Python model server (``kserve_peer.py``, from ``.venv-kserve`` when it
exists; ``--no-peer`` leaves it out); with ``--before REF``, the shapes server of an older commit (default and
batching off), to measure what a change did to the overhead of a request.

Targets are printed with their verdicts. ``--table`` adds the full concurrency table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
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


def _request_bytes(port: int, path: str, image: bytes, body: str = "multipart") -> bytes:
    """One POST, built once and replayed: the client must cost far less than the server."""
    if body == "json":
        payload = json.dumps({"image": base64.b64encode(image).decode()}).encode()
        ctype = "application/json"
    elif body == "v1":  # KServe V1: what the KServe peer reads, and camserve's /v1 routes
        payload = json.dumps({"instances": [{"image": {"b64": base64.b64encode(image).decode()}}]}).encode()
        ctype = "application/json"
    else:
        boundary = b"camservebench"
        payload = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                   b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n")
        ctype = f"multipart/form-data; boundary={boundary.decode()}"
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    return head + payload


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)  # not Inference-Header-Content-Length
    assert match, head
    await reader.readexactly(int(match.group(1)))
    return int(head.split(b" ", 2)[1])


async def load(port: int, request: bytes, concurrency: int, total: int) -> tuple[float, float, float]:
    """Send ``total`` requests over ``concurrency`` keep-alive connections; p50 ms, p95 ms, images/s.

    A raw-socket client replaying one prepared request: httpx spends about a millisecond of CPU per
    request, which on two cores would make the load generator, not the server, the bottleneck."""
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
                    raise RuntimeError(f"HTTP {status}")
        finally:
            writer.close()

    start = asyncio.Event()
    return await drive(worker, start, concurrency, latencies, total)


async def drive(worker: Callable[[], Awaitable[None]], start: asyncio.Event, concurrency: int,
                latencies: list[float], total: int) -> tuple[float, float, float]:
    """Start ``concurrency`` workers, let them warm up, release them together with ``start``; p50 ms,
    p95 ms and requests/s of the ``latencies`` they record."""
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.3)
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))], total / elapsed


async def paired(targets: list[tuple[int, bytes]], turns: int) -> list[list[float]]:
    """Concurrency 1, servers taking turns: in each of ``turns`` turns one request to every server, in
    an order rotated turn by turn. ``targets``: ``(port, request)`` per server; latencies in ms per
    server, turn by turn, so that ``a[i] / b[i]`` compares two requests made moments apart."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for port, _ in targets]
    try:
        for (reader, writer), (_, request) in zip(conns, targets, strict=True):
            for _ in range(3):  # warm each connection and server
                await _exchange(reader, writer, request)
        out: list[list[float]] = [[] for _ in targets]
        for turn in range(turns):
            for k in [(turn + j) % len(targets) for j in range(len(targets))]:
                (reader, writer), (port, request) = conns[k], targets[k]
                t0 = time.perf_counter()
                try:
                    status = await _exchange(reader, writer, request)
                except (asyncio.IncompleteReadError, ConnectionError):
                    # Idle past the server's keep-alive timeout while a slow peer answered (seconds on a
                    # loaded machine): reconnect and time the request again.
                    writer.close()
                    conns[k] = reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    t0 = time.perf_counter()
                    status = await _exchange(reader, writer, request)
                out[k].append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
        return out
    finally:
        for _, writer in conns:
            writer.close()
            await writer.wait_closed()


@dataclass
class Turns:
    """Servers compared at concurrency 1 with ``paired``; latencies per server, accumulated over rounds."""

    servers: tuple[str, ...]
    path: str
    image: str
    turns: int
    body: str = "multipart"
    latencies: list[list[float]] = field(default_factory=list)
    # (path, body) per server where they differ from ``path`` and ``body`` (a peer with its own protocol)
    routes: dict[str, tuple[str, str]] = field(default_factory=dict)

    def run(self, servers: dict[str, Server], images: dict[str, bytes]) -> None:
        targets = []
        for name in self.servers:
            path, body = self.routes.get(name, (self.path, self.body))
            port = servers[name].port
            targets.append((port, _request_bytes(port, path, images[self.image], body)))
        got = asyncio.run(paired(targets, self.turns))
        self.latencies = [old + new for old, new in zip(self.latencies or [[] for _ in got], got, strict=True)]

    def p50(self, k: int) -> float:
        return statistics.median(self.latencies[k])

    def p95(self, k: int) -> float:
        ordered = sorted(self.latencies[k])
        return ordered[int(0.95 * (len(ordered) - 1))]

    def ratio(self, k: int, ref: int) -> float:
        """Median of per-turn latency ratios, server ``k`` over server ``ref``."""
        return statistics.median(a / b for a, b in zip(self.latencies[k], self.latencies[ref], strict=True))


# -- servers -------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    ready_path: str = "/readyz"


def _ready(port: int, path: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def launch_camserve(name: str, config: Path, env: dict[str, str], cwd: Path = ROOT) -> Server:
    """Start without waiting (servers start side by side: on a busy machine each takes a minute).
    From ``cwd``, ``python -m service`` imports the copy of the code there."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), "--config", str(config)],
                            cwd=cwd, env={**os.environ, "SERVICE_SHUTDOWN_GRACE_S": "0", **env,
                                          "SERVICE_LOG_LEVEL": "warning"},
                            stdout=subprocess.DEVNULL)
    return Server(name, port, proc)


def launch_baseline(device: str) -> Server:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.bench.baseline_app:app", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env={**os.environ, "BASELINE_DEVICE": device})
    return Server("resnet18 baseline", port, proc, "/docs")


PEER_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
PEER = "resnet18 kserve"
PEER_PREDICT, PEER_EXPLAIN = "/v1/models/resnet18:predict", "/v1/models/resnet18:explain"


def launch_kserve_peer(device: str, python: Path = PEER_PYTHON) -> Server:
    """KServe's Python model server (``kserve_peer.py``) in ``.venv-kserve``, where KServe's pins live."""
    port = free_port()
    proc = subprocess.Popen([str(python), "-m", "tests.bench.kserve_peer", "--http_port", str(port)], cwd=ROOT,
                            env={**os.environ, "PEER_DEVICE": device}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return Server(PEER, port, proc, "/v1/models/resnet18")


def wait_ready(servers: list[Server], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    for s in servers:
        while not _ready(s.port, s.ready_path):
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{s.name} was not ready within {timeout_s:g} s")
            time.sleep(0.5)


def export_commit(ref: str) -> Path:
    """The tree of ``ref`` in a temporary directory (read-only use: no checkout is touched)."""
    out = Path(tempfile.mkdtemp(prefix="camserve-before-"))
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


# -- cells and rounds ------------------------------------------------------------------------------------
@dataclass
class Cell:
    server: str
    path: str
    concurrency: int
    image: str  # key into the images table
    requests: int
    body: str = "multipart"
    results: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int, str, str]:
        return self.server, self.path, self.concurrency, self.image, self.body

    def p50(self) -> float:
        return statistics.median(r[0] for r in self.results)

    def p95(self) -> float:
        return statistics.median(r[1] for r in self.results)

    def ips(self) -> float:
        return statistics.median(r[2] for r in self.results)


def measure(cells: list[Cell], servers: dict[str, Server], images: dict[str, bytes], rounds: int,
            after_round: Callable[[int], None] | None = None, turns: Sequence[Turns] = ()) -> None:
    """Each round: every cell once, in an order rotated round by round, then every set of ``turns``."""
    for r in range(rounds):
        shift = r % max(1, len(cells))
        for cell in cells[shift:] + cells[:shift]:
            port = servers[cell.server].port
            request = _request_bytes(port, cell.path, images[cell.image], cell.body)
            try:
                cell.results.append(asyncio.run(load(port, request, cell.concurrency,
                                                     max(cell.requests, 2 * cell.concurrency))))
            except RuntimeError as exc:
                raise RuntimeError(f"{cell.key}: {exc}") from None
        for t in turns:
            try:
                t.run(servers, images)
            except RuntimeError as exc:
                raise RuntimeError(f"{t.servers} {t.path}: {exc}") from None
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        if after_round is not None:
            after_round(r + 1)


def per_round_ratio(a: Cell, b: Cell, pick: Callable[[tuple[float, float, float]], float]) -> float:
    return statistics.median(pick(x) / pick(y) for x, y in zip(a.results, b.results, strict=True))


class EngineClock:
    """The model thread's own work for one image (stack, normalise, forward, CAM), timed in this
    process a few dozen calls at a time between rounds, so that it sees the machine's drift as the
    servers do; ``ms`` is the median of every call so far."""

    def __init__(self, config: Path, image: bytes, device: str) -> None:
        from service.cam import CamQuery
        from service.config import load_settings
        from service.pipeline import Job, Pipeline
        from service.registry import load_model

        self.pipeline = Pipeline(load_model(load_settings(config).models[0]))
        self.job = Job(self.pipeline.prepare(image, 10**8).pixels, CamQuery())
        self.times: list[float] = []
        for _ in range(20):
            self.pipeline.compute([self.job])

    def sample(self, repeats: int = 60) -> None:
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.pipeline.compute([self.job])
            self.times.append((time.perf_counter() - t0) * 1000)

    def ms(self) -> float:
        return statistics.median(self.times)


def _v2_request(port: int, image: bytes, as_binary: bool, outputs: list[str] | None, model: str = "shapes") -> bytes:
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
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"{'application/octet-stream' if as_binary else 'application/json'}\r\n{extra}"
            f"Content-Length: {len(text) + len(raw)}\r\n\r\n").encode()
    return head + text + raw


def protocol_rows(config: Path, image: bytes, requests: int, concurrency: int = 8, rounds: int = 5) -> None:
    """The Open Inference Protocol beside the native multipart routes: same server, model and image.

    The variants take turns, ``rounds`` times, in an order rotated round by round; figures are medians
    over rounds and the V2 / native ratios medians of per-round ratios, so drift on a shared machine
    touches them all alike."""
    port = free_port()
    proc = start_server(port, {"SERVICE_LOG_LEVEL": "warning"}, config)
    variants = {
        "native /predict (multipart)": _request_bytes(port, "/predict", image),
        "V2 scores, JSON base64": _v2_request(port, image, False, ["scores"]),
        "V2 scores, binary": _v2_request(port, image, True, ["scores"]),
        "native /explain (multipart, png)": _request_bytes(port, "/explain", image),
        # What the native route answers (scores, a PNG heatmap, its class), asked for by name:
        "V2 explain outputs, binary": _v2_request(port, image, True, ["scores", "heatmap_png", "target_class"]),
        "V2 all outputs, JSON base64": _v2_request(port, image, False, None),
        "V2 all outputs, binary": _v2_request(port, image, True, None),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    try:
        names = list(variants)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(asyncio.run(load(port, variants[name], concurrency, max(requests, 2 * concurrency))))
        # Per request, at concurrency 1: the variants take turns (see ``paired``) on this one server.
        alone = asyncio.run(paired([(port, variants[name]) for name in names], requests))
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

    def ratio(a: str, b: str) -> float:
        return statistics.median(x[2] / y[2] for x, y in zip(runs[a], runs[b], strict=True))

    scores = ratio("V2 scores, binary", "native /predict (multipart)")
    explained = ratio("V2 explain outputs, binary", "native /explain (multipart, png)")
    everything = ratio("V2 all outputs, binary", "native /explain (multipart, png)")
    print(f"- V2 binary / native multipart throughput (median of per-round ratios; target >= 0.95x): scores vs "
          f"/predict {scores:.2f}x, the same outputs as /explain vs /explain {explained:.2f}x; all outputs (the "
          f"FP32 heatmap too) vs /explain {everything:.2f}x")
    print(f"\n| shapes, concurrency 1, {requests} turns | p50 ms | p50 / native (per-turn median) |")
    print("|---|---|---|")
    predictions = {"native /predict (multipart)", "V2 scores, JSON base64", "V2 scores, binary"}
    for k, name in enumerate(names):
        ref = names.index("native /predict (multipart)" if name in predictions else "native /explain (multipart, png)")
        ratio_1 = statistics.median(a / b for a, b in zip(alone[k], alone[ref], strict=True))
        print(f"| {name} | {statistics.median(alone[k]):.2f} | {ratio_1:.3f} |")


def main() -> None:
    from tests.bench.bench_grpc import grpc_rows

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all cells; figures are medians")
    parser.add_argument("--requests", type=int, default=160, help="requests per shapes cell")
    parser.add_argument("--resnet-requests", type=int, default=48, help="requests per resnet18 cell")
    parser.add_argument("--before", metavar="REF", help="also serve shapes from this older commit")
    parser.add_argument("--table", action="store_true", help="also the full table at concurrency 1, 8, 32")
    parser.add_argument("--protocols-only", action="store_true", help="only the V2 vs native rows")
    parser.add_argument("--no-peer", action="store_true", help="leave out the KServe peer (.venv-kserve)")
    parser.add_argument("--peer-only", action="store_true", help="only resnet18 against the KServe peer")
    parser.add_argument("--peer-python", default=str(PEER_PYTHON), help="the Python that runs the KServe peer")
    parser.add_argument("--grpc-only", action="store_true", help="only the gRPC vs REST V2 vs native rows")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = {"shapes": _png(make_scene(rng).image)}  # a 64x64 PNG
    photo = np.asarray(Image.fromarray(make_scene(rng).image).resize((256, 256), Image.BILINEAR))
    images["photo"] = _png(photo, "JPEG")
    images["photo png"] = _png(photo)  # the KServe peer comparison: the same PNG to both
    tmp = Path(tempfile.mkdtemp())
    r18 = tmp / "r18.toml"
    r18.write_text(f'[models.r18]\nsource = "torchvision:resnet18"\nweights = "none"\ndevice = "{args.device}"\n')
    shapes_cfg = tmp / "shapes.toml"
    shapes_cfg.write_text(f'[models.shapes]\nsource = "builtin:shapes"\ndevice = "{args.device}"\n')
    if args.protocols_only:
        protocol_rows(shapes_cfg, images["shapes"], args.requests, rounds=args.rounds)
        return
    if args.peer_only:
        peer_only(args, r18, images)
        return
    grpc_models = [("shapes", "shapes", shapes_cfg, images["shapes"], args.requests),
                   ("resnet18", "r18", r18, images["photo"], args.resnet_requests)]
    if args.grpc_only:
        grpc_rows(grpc_models, args.rounds)
        return

    engine = EngineClock(shapes_cfg, images["shapes"], args.device)
    off = {"SERVICE_MAX_BATCH_SIZE": "1"}
    specs: list[tuple[str, Path, dict[str, str], Path]] = [
        ("shapes default", shapes_cfg, {}, ROOT),
        ("shapes max_batch_size=1", shapes_cfg, off, ROOT),
        ("shapes fixed 5 ms", shapes_cfg, {"SERVICE_BATCH_POLICY": "fixed", "SERVICE_MAX_WAIT_MS": "5"}, ROOT),
        ("shapes fixed 0 ms", shapes_cfg, {"SERVICE_BATCH_POLICY": "fixed", "SERVICE_MAX_WAIT_MS": "0"}, ROOT),
        ("resnet18 default", r18, {}, ROOT),
        ("resnet18 max_batch_size=1", r18, off, ROOT),
    ]
    if args.before:
        old = export_commit(args.before)
        specs += [(f"shapes before ({args.before})", shapes_cfg, {}, old),
                  (f"shapes before ({args.before}) max_batch_size=1", shapes_cfg, off, old)]
    servers: dict[str, Server] = {}
    try:
        for name, cfg, env, cwd in specs:
            servers[name] = launch_camserve(name, cfg, env, cwd)
        servers["resnet18 baseline"] = launch_baseline(args.device)
        if Path(args.peer_python).exists() and not args.no_peer:
            servers[PEER] = launch_kserve_peer(args.device, Path(args.peer_python))
        elif not args.no_peer:
            print(f"no {args.peer_python}: the KServe peer is left out (`make .venv-kserve/.installed` creates it)",
                  file=sys.stderr)
        wait_ready(list(servers.values()))
        run_all(args, servers, images, engine)
    finally:
        for s in servers.values():
            s.proc.terminate()
        for s in servers.values():
            try:
                s.proc.wait(60)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
    protocol_rows(shapes_cfg, images["shapes"], args.requests, rounds=args.rounds)  # its own server, alone
    grpc_rows(grpc_models, args.rounds)  # one server per model, alone


def run_all(args: argparse.Namespace, servers: dict[str, Server], images: dict[str, bytes],
            engine: EngineClock) -> None:
    n, nr = args.requests, args.resnet_requests
    cells: dict[tuple[str, str, int, str, str], Cell] = {}

    def cell(server: str, path: str, c: int, image: str = "shapes", body: str = "multipart") -> Cell:
        requests = nr if image.startswith("photo") else n
        new = Cell(server, path, c, image, requests if c == 1 else max(requests, 4 * c), body)
        return cells.setdefault(new.key, new)

    # Concurrency 1: default, batching off and (resnet18) the baseline take turns (see ``paired``).
    compared = (("shapes", "shapes", n, ()), ("resnet18", "photo", nr, ("resnet18 baseline",)))
    t1 = [Turns((f"{model} default", f"{model} max_batch_size=1", *extra), path, img, turns)
          for model, img, turns, extra in compared for path in ("/predict", "/explain")]
    t3 = {name: cell(name, "/explain", 32) for name in
          ("shapes default", "shapes fixed 5 ms", "shapes fixed 0 ms", "shapes max_batch_size=1")}
    t4 = [Turns(("shapes default", "shapes max_batch_size=1", *[s for s in servers if "before" in s]),
                "/explain", "shapes", n, body) for body in ("multipart", "json")]
    if args.table:
        for name in servers:
            img = "photo" if name.startswith("resnet18") else "shapes"
            for path in ("/predict", "/explain"):
                for c in CONCURRENCY:
                    cell(name, path, c, img)
    peer = peer_rows(servers, nr)
    for _, ours, theirs in peer:
        cells[ours.key], cells[theirs.key] = ours, theirs
    todo = list(cells.values())
    print(f"{len(todo)} cells x {args.rounds} rounds", file=sys.stderr, flush=True)

    def after_round(done: int) -> None:
        engine.sample()
        report(args, cells, t1, t3, t4, engine.ms(), done)
        report_peer(peer)

    measure(todo, servers, images, args.rounds, after_round, [*t1, *t4, *(t for t, _, _ in peer)])


def report(args: argparse.Namespace, cells: dict[tuple[str, str, int, str, str], Cell],
           t1: list[Turns], t3: dict[str, Cell],
           t4: list[Turns], engine: float, done: int) -> None:
    """The tables from the rounds done so far (printed after every round: a slow machine may not
    let the last one finish)."""
    ips: Callable[[tuple[float, float, float]], float] = lambda r: r[2]  # noqa: E731
    print(f"# HTTP benchmark on {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
          f"device {args.device}; load generator on the same machine; {done} of {args.rounds} interleaved rounds, "
          "medians", flush=True)
    print(f"\n## Concurrency 1: default vs batching off (p50 ms; {t1[0].turns} turns a round for shapes, "
          f"{t1[-1].turns} for resnet18; ratio: median of per-turn ratios; target <= 1.05)\n")
    print("| model | endpoint | default | max_batch_size=1 | ratio |")
    print("|---|---|---|---|---|")
    for t in t1:
        r = t.ratio(0, 1)
        print(f"| {t.servers[0].split()[0]} | {t.path} | {t.p50(0):.1f} | {t.p50(1):.1f} | "
              f"{r:.3f}{'' if r <= 1.05 else ' (missed)'} |")
    print("\n## Concurrency 1: resnet18 camserve vs the newcomer baseline (p50 ms; per-turn ratios as above; "
          "/predict target <= 1.05x)\n")
    print("| endpoint | camserve | baseline | ratio |")
    print("|---|---|---|---|")
    for t in t1[2:]:
        r = t.ratio(0, 2)
        miss = " (missed)" if t.path == "/predict" and r > 1.05 else ""
        print(f"| {t.path} | {t.p50(0):.1f} | {t.p50(2):.1f} | {r:.3f}{miss} |")
    print("\n## Concurrency 32: shapes /explain throughput (images/s; target >= 1.0x best fixed, >= 2x unbatched)\n")
    print("| server | p50 ms | p95 ms | images/s | default / this |")
    print("|---|---|---|---|---|")
    for name, c in t3.items():
        print(f"| {name} | {c.p50():.1f} | {c.p95():.1f} | {c.ips():.1f} | "
              f"{per_round_ratio(t3['shapes default'], c, ips):.2f}x |")
    print(f"\n## Concurrency 1: shapes /explain, 64x64 PNG, overhead beyond the engine ({engine:.2f} ms in-process; "
          "servers taking turns)\n")
    print("| server | body | p50 ms | overhead ms | p50 / default (per-turn median) |")
    print("|---|---|---|---|---|")
    for t in t4:
        for k, name in enumerate(t.servers):
            print(f"| {name} | {t.body} | {t.p50(k):.2f} | {t.p50(k) - engine:.2f} | {t.ratio(k, 0):.3f} |")
        if len(t.servers) > 2:
            ours, before = t.p50(0) - engine, t.p50(2) - engine
            print(f"- {t.body}: overhead at default settings {before:.2f} -> {ours:.2f} ms "
                  f"({ours / before:.2f}x; target <= 0.5x)")
    if args.table:
        print("\n## All cells\n")
        print("| server | endpoint | concurrency | p50 ms | p95 ms | images/s |")
        print("|---|---|---|---|---|---|")
        for c in sorted((c for c in cells.values() if c.body == "multipart"), key=lambda c: c.key):
            print(f"| {c.server} | {c.path} | {c.concurrency} | {c.p50():.1f} | {c.p95():.1f} | {c.ips():.1f} |")
    sys.stdout.flush()


def peer_only(args: argparse.Namespace, config: Path, images: dict[str, bytes]) -> None:
    """resnet18 served by camserve (default settings) against the KServe peer, nothing else running."""
    servers = {"resnet18 default": launch_camserve("resnet18 default", config, {}),
               PEER: launch_kserve_peer(args.device, Path(args.peer_python))}
    try:
        wait_ready(list(servers.values()))
        peer = peer_rows(servers, args.resnet_requests)
        measure([c for _, a, b in peer for c in (a, b)], servers, images, args.rounds,
                lambda done: report_peer(peer), [t for t, _, _ in peer])
    finally:
        for s in servers.values():
            s.proc.terminate()
            s.proc.wait(60)


def peer_rows(servers: dict[str, Server], requests: int) -> list[tuple[Turns, Cell, Cell]]:
    """The same PNG as JSON base64 to both, camserve's /predict and /explain against KServe's V1 :predict and
    :explain: in turns at concurrency 1, in rounds at concurrency 8."""
    if PEER not in servers:
        return []
    rows = []
    for path, peer_path in (("/predict", PEER_PREDICT), ("/explain", PEER_EXPLAIN)):
        turns = Turns(("resnet18 default", PEER), path, "photo png", requests, "json", routes={PEER: (peer_path, "v1")})
        rows.append((turns, Cell("resnet18 default", path, 8, "photo png", max(requests, 32), "json"),
                     Cell(PEER, peer_path, 8, "photo png", max(requests, 32), "v1")))
    return rows


PEER_TARGETS = {("/predict", 1): 1.0, ("/explain", 1): 1.5, ("/explain", 8): 2.0}


def report_peer(peer: list[tuple[Turns, Cell, Cell]]) -> None:
    """camserve against KServe's Python model server: speed = KServe's time / camserve's time (concurrency 1,
    median of per-turn ratios) or camserve's throughput / KServe's (concurrency 8, median of per-round ratios)."""
    if not peer:
        return
    print("\n## resnet18: camserve vs a KServe Python model server (the same PNG as JSON base64; concurrency 1 in "
          "turns, 8 in rounds)\n")
    print("| endpoint | concurrency | camserve p50 ms | KServe p50 ms | camserve speed / KServe | target |")
    print("|---|---|---|---|---|---|")
    for turns, ours, theirs in peer:
        rows = [(1, turns.p50(0), turns.p50(1), turns.ratio(1, 0))]
        if ours.results and theirs.results:
            rows.append((8, ours.p50(), theirs.p50(), per_round_ratio(ours, theirs, lambda r: r[2])))
        for c, a, b, speed in rows:
            need = PEER_TARGETS.get((turns.path, c))
            verdict = "-" if need is None else f">= {need:.1f}x{'' if speed >= need else ' (missed)'}"
            print(f"| {turns.path} | {c} | {a:.1f} | {b:.1f} | {speed:.2f}x | {verdict} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
