"""Start-up and shutdown of a real server: clear failures, and SIGTERM drains in-flight work."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.api.conftest import b64, png_bytes, scene
from tests.api.hardening_helpers import tiny_client
from tests.api.server import ROOT, free_port, start_server


def test_a_model_that_fails_to_load_stops_start_up(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[models.broken]\nsource = "torchvision:resnet18"\nweights = "/nonexistent/r18.pth"\n')
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--config", str(cfg), "--port",
                           str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "model 'broken'" in done.stderr
    assert "weights file not found" in done.stderr


def test_a_bad_config_is_named(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nmax_queue = 'lots'\n")
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "max_queue" in done.stderr


def test_draining_turns_readiness_off():
    with tiny_client() as c:
        assert c.get("/readyz").status_code == 200
        c.app.state.repository.begin_drain()
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_ready"


def slow_server(tmp_path, seconds: float, server_table: str = "", **env: str):
    """A real server whose one model takes ``seconds`` per batch: (process, port)."""
    cfg = tmp_path / "slow.toml"
    cfg.write_text(f'{server_table}[models.slow]\nsource = "python:tests.api.models:slow"\n'
                   "[models.slow.preprocess]\nresize = [32, 32]\n")
    port = free_port()
    return start_server(port, {"SLOW_MODEL_S": str(seconds), **env}, cfg), port


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits_zero(tmp_path):
    proc, port = slow_server(tmp_path, 3.0, SERVICE_DRAIN_TIMEOUT_S="20")
    result: dict[str, httpx.Response] = {}

    image = b64(png_bytes(scene("circle")[0]))

    def call() -> None:
        result["r"] = httpx.post(f"http://127.0.0.1:{port}/predict", json={"image": image}, timeout=30)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.2)  # the request is inside the model now (margins for a busy machine)
    proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert proc.wait(timeout=30) == 0
    assert result["r"].status_code == 200


@pytest.mark.slow
def test_a_client_that_disconnects_is_dropped_from_the_queue(tmp_path):
    proc, port = slow_server(tmp_path, 1.2, "[server]\nmax_batch_size = 1\n")
    body = json.dumps({"image": b64(png_bytes(scene("circle")[0]))}).encode()
    request = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(
            httpx.post(f"http://127.0.0.1:{port}/predict", content=body, timeout=30,
                       headers={"content-type": "application/json"}).status_code))
        first.start()
        time.sleep(0.5)  # the first request holds the model (margins for a busy machine)
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(request)
            time.sleep(0.1)  # queued behind the first, then the client leaves
        first.join(30)
        time.sleep(0.8)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
    assert results == [200]
    images = next(line for line in metrics.splitlines() if line.startswith('camserve_images_total{model="slow"}'))
    assert images.endswith(" 1.0"), images  # only the first request: the one that left never ran
    assert 'status="499"' in metrics
