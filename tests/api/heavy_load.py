"""Heavy overlay renders beside a stream of small predictions, against a real server process.

Used by ``tests/api/test_heavy_renders.py`` (the bound) and ``python -m tests.api.heavy_load`` (the
numbers quoted in docs/operations.md). The server's resident memory is sampled from
``/proc/<pid>/status`` every 10 ms while the load runs.
"""

from __future__ import annotations

import argparse
import io
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.models.scenes import make_scene


def photo_jpeg(width: int = 4000, height: int = 3000, seed: int = 0) -> bytes:
    """A photo-like JPEG: a shapes scene scaled up, with fine noise so it does not compress to nothing."""
    scene = make_scene(np.random.default_rng(seed)).image
    big = np.asarray(Image.fromarray(scene).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    noise = np.random.default_rng(seed + 1).integers(-10, 11, size=big.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def small_png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_scene(np.random.default_rng(seed)).image).save(buf, format="PNG")
    return buf.getvalue()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler:
    """Peak RSS of a process, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


@dataclass
class HeavyResult:
    heavy_s: list[float]
    heavy_status: list[int]
    idle_p95_s: float
    loaded_p95_s: float
    small_n: int
    idle_rss: int
    peak_rss: int
    small_failed: list[int]


HEAVY_PATH = "/explain?output=overlay&size=original&targets=0,1,2,3,4"


def time_one_heavy(base: str, pid: int, image: bytes) -> tuple[float, int, int]:
    """(seconds, status, peak RSS) of one heavy request on an otherwise idle server."""
    with RssSampler(pid) as rss:
        t0 = time.perf_counter()
        r = httpx.post(base + HEAVY_PATH, files={"image": ("big.jpg", image, "image/jpeg")}, timeout=300)
        took = time.perf_counter() - t0
    return took, r.status_code, rss.peak


def run_load(base: str, pid: int, image: bytes, heavy: int = 2, idle_n: int = 40) -> HeavyResult:
    """Idle p95 of small predicts (before and after, the larger), and ``heavy`` overlay requests at once
    with small predicts streaming (one at a time) until the last heavy one answers."""
    small = small_png()
    with httpx.Client(base_url=base, timeout=300) as client:
        for _ in range(5):  # connection and first-request costs out of the idle figure
            client.post("/predict", files={"image": ("s.png", small)})
        def idle_p95() -> float:
            idle = []
            for _ in range(idle_n):
                t0 = time.perf_counter()
                assert client.post("/predict", files={"image": ("s.png", small)}).status_code == 200
                idle.append(time.perf_counter() - t0)
            return _p95(idle)

        idle_before = idle_p95()
        idle_rss = rss_bytes(pid)
        heavy_s: list[float] = []
        heavy_status: list[int] = []

        def one() -> None:
            t0 = time.perf_counter()
            r = httpx.post(base + HEAVY_PATH, files={"image": ("big.jpg", image, "image/jpeg")}, timeout=300)
            heavy_s.append(time.perf_counter() - t0)
            heavy_status.append(r.status_code)

        loaded: list[float] = []
        small_failed: list[int] = []
        with RssSampler(pid) as rss:
            threads = [threading.Thread(target=one) for _ in range(heavy)]
            for t in threads:
                t.start()
            time.sleep(0.2)  # the heavy ones are being read and decoded
            while any(t.is_alive() for t in threads):
                t0 = time.perf_counter()
                r = client.post("/predict", files={"image": ("s.png", small)})
                loaded.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    small_failed.append(r.status_code)
                time.sleep(0.02)
            for t in threads:
                t.join()
        # Idle again afterwards: on a shared machine the neighbours' load drifts, and the slower of the
        # two idle spells is the fair baseline for the loaded one.
        idle = max(idle_before, idle_p95())
    return HeavyResult(heavy_s, heavy_status, idle, _p95(loaded), len(loaded), idle_rss, rss.peak,
                       small_failed)


def main() -> None:
    from tests.api.server import free_port, start_server

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--attach", nargs=2, metavar=("PORT", "PID"), type=int,
                        help="measure a server already running on PORT as process PID")
    args = parser.parse_args()
    image = photo_jpeg(args.width, args.height)
    if args.attach:
        port, pid, proc = args.attach[0], args.attach[1], None
    else:
        port = free_port()
        proc = start_server(port)
        pid = proc.pid
    base = f"http://127.0.0.1:{port}"
    try:
        start_rss = rss_bytes(pid)
        took, status, peak = time_one_heavy(base, pid, image)
        print(f"one request, {args.width}x{args.height} JPEG ({len(image)} bytes), 5 targets overlay at "
              f"size=original: {status} in {took:.2f} s; RSS {start_rss / 2**20:.0f} -> peak {peak / 2**20:.0f} MiB")
        res = run_load(base, pid, image)
        print(f"two at once with small predicts streaming: heavy {[f'{s:.2f}' for s in res.heavy_s]} s "
              f"{res.heavy_status}; small p95 idle {res.idle_p95_s * 1000:.1f} ms, loaded "
              f"{res.loaded_p95_s * 1000:.1f} ms ({res.small_n} requests, {res.loaded_p95_s / res.idle_p95_s:.1f}x, "
              f"failed: {res.small_failed}); "
              f"RSS {res.idle_rss / 2**20:.0f} -> peak {res.peak_rss / 2**20:.0f} MiB")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
