"""End-to-end check of a built camserve image: ``make docker-test`` runs it after building the CPU image.

Not a pytest module (it needs a Docker daemon and takes minutes): ``python tests/docker_check.py --image IMG``.
It starts the image as a container, waits for ``/readyz``, sends ``/predict`` and ``/explain`` as JSON
(base64) and multipart, checks the server runs as a non-root user and that Docker reports the container
healthy, sends SIGTERM while a request is in flight and checks that request is answered and the process
exits 0 within the drain time; then starts the image again with ``docker/models/models.toml`` mounted and
checks the second model it names loads and answers. Figures (image size, time to ready, latencies) are
printed as it goes; any failed check stops it with a non-zero exit.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.models.scenes import SHAPE_CLASSES, make_scene  # noqa: E402

MODELS_DIR = ROOT / "docker" / "models"
DRAIN_TIMEOUT_S = 30.0  # the image's SERVICE_DRAIN_TIMEOUT_S


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def docker(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scene_png(label: str, seed: int = 0) -> bytes:
    """A shapes scene whose drawn shape is `label`, as PNG bytes."""
    rng = np.random.default_rng(seed)
    while True:
        s = make_scene(rng)
        if SHAPE_CLASSES[s.label] == label:
            buf = io.BytesIO()
            Image.fromarray(s.image).save(buf, format="PNG")
            return buf.getvalue()


class Container:
    """One detached run of the image, on a free loopback port; removed on exit."""

    def __init__(self, image: str, name: str, args: list[str], volumes: list[str] | None = None,
                 options: list[str] | None = None) -> None:
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        # Remove a leftover from an interrupted run of this script before reusing its name.
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        cmd = ["run", "-d", "--name", name, "-p", f"127.0.0.1:{self.port}:8000"]
        for v in volumes or []:
            cmd += ["-v", v]
        cmd += options or []
        self.started = time.monotonic()
        self.id = docker(*cmd, image, *args)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            print(f"--- last log lines of {self.name} ---\n{self.logs()[-3000:]}", file=sys.stderr)
        subprocess.run(["docker", "rm", "-f", self.id], capture_output=True)

    def logs(self) -> str:
        done = subprocess.run(["docker", "logs", self.id], capture_output=True, text=True)
        return done.stdout + done.stderr

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(docker("inspect", "--format", "{{json .State}}", self.id))
        return state

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from `docker run` until /readyz answers 200."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            check(self.state()["Running"], f"{self.name} exited before it was ready:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise CheckFailed(f"{self.name} not ready after {timeout:.0f} s:\n{self.logs()[-3000:]}")


def timed(fn: Callable[[], httpx.Response], n: int) -> tuple[float, httpx.Response]:
    """Median latency (ms) of `n` calls after one warm-up call, and the last response."""
    resp = fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        resp = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), resp


def ok_json(resp: httpx.Response, what: str) -> dict[str, Any]:
    check(resp.status_code == 200, f"{what}: status {resp.status_code}: {resp.text[:500]}")
    body: dict[str, Any] = resp.json()
    return body


def check_requests(c: Container, n: int) -> None:
    circle, ring = scene_png("circle", 0), scene_png("ring", 1)
    with httpx.Client(base_url=c.url, timeout=60) as http:
        calls: dict[str, Callable[[], httpx.Response]] = {
            "predict json": lambda: http.post("/predict", json={"image": base64.b64encode(circle).decode()}),
            "predict multipart": lambda: http.post("/predict", files={"image": ("circle.png", circle, "image/png")}),
            "explain json": lambda: http.post("/explain", json={"image": base64.b64encode(ring).decode()}),
            "explain multipart": lambda: http.post("/explain", files={"image": ("ring.png", ring, "image/png")}),
        }
        for what, call in calls.items():
            ms, resp = timed(call, n)
            result = ok_json(resp, what)["results"][0]
            top = result["predictions"][0]["label"]
            expected = "circle" if what.startswith("predict") else "ring"
            check(top == expected, f"{what}: top label {top!r}, expected {expected!r}")
            if what.startswith("explain"):
                heatmap = result["explanations"][0]["heatmap"]
                png = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
                check(png.size == (heatmap["width"], heatmap["height"]) and png.getextrema()[1] == 255,
                      f"{what}: heatmap is not a peak-normalised PNG of the stated size")
            print(f"  {what:<18} 200, top-1 {top!r}, median {ms:6.1f} ms over {n}")


def check_non_root(c: Container) -> None:
    uid_line = next(line for line in docker("exec", c.id, "cat", "/proc/1/status").splitlines()
                    if line.startswith("Uid:"))
    uids = uid_line.split()[1:]
    check(all(u != "0" for u in uids), f"the server process runs as root: {uid_line}")
    user = docker("inspect", "--format", "{{.Config.User}}", c.id)
    print(f"  non-root: PID 1 uids {' '.join(uids)}, image USER {user}")


def check_healthy(c: Container, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = c.state().get("Health", {}).get("Status", "")
        if status == "healthy":
            print(f"  docker health: healthy {time.monotonic() - c.started:.1f} s after start")
            return
        check(status in ("starting", ""), f"docker reports the container {status}")
        time.sleep(1)
    raise CheckFailed(f"not healthy after {timeout:.0f} s (status {status!r})")


def check_sigterm(c: Container) -> None:
    """SIGTERM with a slow request in flight: it is answered, and the process exits 0 within the drain time."""
    images = [base64.b64encode(scene_png(label, seed)).decode() for seed in range(8) for label in ("circle", "ring")]
    body = {"images": images, "method": "gradcam++", "output": "overlay"}
    answer: dict[str, Any] = {}

    def slow_request() -> None:
        t0 = time.perf_counter()
        try:
            answer["status"] = httpx.post(f"{c.url}/explain", json=body, timeout=60).status_code
        except httpx.HTTPError as exc:
            answer["status"] = repr(exc)
        answer["ms"] = (time.perf_counter() - t0) * 1000

    ms_alone, _ = timed(lambda: httpx.post(f"{c.url}/explain", json=body, timeout=60), 1)
    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(min(0.25, ms_alone / 4000))  # well inside the request, which takes ms_alone
    t0 = time.monotonic()
    docker("kill", "--signal", "TERM", c.id)
    while c.state()["Running"]:
        check(time.monotonic() - t0 < DRAIN_TIMEOUT_S + 5, "still running past the drain time after SIGTERM")
        time.sleep(0.05)
    stopped_s = time.monotonic() - t0
    thread.join(60)
    state = c.state()
    check(state["ExitCode"] == 0, f"exit code {state['ExitCode']} after SIGTERM:\n{c.logs()[-2000:]}")
    check(answer.get("status") == 200, f"the request in flight at SIGTERM got {answer.get('status')}")
    check(stopped_s < DRAIN_TIMEOUT_S, f"took {stopped_s:.1f} s to stop, over the {DRAIN_TIMEOUT_S:.0f} s drain time")
    print(f"  SIGTERM: in-flight explain of {len(images)} images answered 200 ({answer['ms']:.0f} ms; "
          f"{ms_alone:.0f} ms alone), exit code 0 {stopped_s:.2f} s after the signal "
          f"(drain time {DRAIN_TIMEOUT_S:.0f} s)")


def check_second_model(image: str, n: int) -> None:
    config = tomllib.loads((MODELS_DIR / "models.toml").read_text())
    names = list(config["models"])
    check(len(names) >= 2, f"docker/models/models.toml must name at least two models, names {names}")
    second = next(name for name in names if name != config.get("default_model", names[0]))
    with Container(image, f"camserve-check-models-{os.getpid()}", ["--config", "/models/models.toml"],
                   volumes=[f"{MODELS_DIR}:/models:ro"]) as c:
        ready_s = c.wait_ready()
        listed = {m["name"] for m in ok_json(httpx.get(f"{c.url}/models", timeout=10), "/models")["models"]}
        check(set(names) <= listed, f"/models lists {sorted(listed)}, config names {names}")
        upload = {"image": ("circle.png", scene_png("circle", 2))}
        with httpx.Client(base_url=c.url, timeout=60) as http:
            p_ms, resp = timed(lambda: http.post("/predict", files=upload, data={"model": second}), n)
            check(ok_json(resp, f"predict {second}")["model"] == second, "the answer names another model")
            e_ms, resp = timed(lambda: http.post("/explain", files=upload, data={"model": second}), n)
            ok_json(resp, f"explain {second}")
        print(f"  models.toml mounted: {sorted(listed)} ready {ready_s:.1f} s after start; {second!r}: "
              f"predict median {p_ms:.1f} ms, explain median {e_ms:.1f} ms over {n}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="camserve:cpu")
    parser.add_argument("-n", type=int, default=20, help="timed requests per kind")
    args = parser.parse_args()

    size = int(docker("image", "inspect", "--format", "{{.Size}}", args.image))
    versions = docker("run", "--rm", "--entrypoint", "python", args.image, "-c",
                      "import torch, torchvision; print(torch.__version__, torchvision.__version__, "
                      "torch.version.cuda or 'cpu-only')")
    print(f"image {args.image}: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB); torch, torchvision, CUDA: {versions}")
    try:
        # Locked down as docker/k8s/camserve.yaml runs it: read-only root, a writable /tmp, no capabilities.
        locked = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        with Container(args.image, f"camserve-check-{os.getpid()}", [], options=locked) as c:
            ready_s = c.wait_ready()
            print(f"  ready (/readyz 200) {ready_s:.1f} s after docker run (read-only root, no capabilities)")
            check_requests(c, args.n)
            check_non_root(c)
            check_healthy(c)
            check_sigterm(c)
        check_second_model(args.image, args.n)
    except CheckFailed as exc:
        print(f"docker-test FAILED: {exc}", file=sys.stderr)
        return 1
    print("docker-test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
