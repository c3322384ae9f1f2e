"""Start-up and shutdown of a real server: clear failures, and SIGTERM drains in-flight work."""

from __future__ import annotations

import signal
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
        c.app.state.draining = True
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_ready"


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits_zero(tmp_path):
    cfg = tmp_path / "slow.toml"
    cfg.write_text('[models.slow]\nsource = "python:tests.api.models:slow"\n[models.slow.preprocess]\n'
                   "resize = [32, 32]\n")
    port = free_port()
    proc = start_server(port, {"SLOW_MODEL_S": "1.5", "SERVICE_DRAIN_TIMEOUT_S": "20"}, cfg)
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        image = b64(png_bytes(scene("circle")[0]))
        result["r"] = httpx.post(f"http://127.0.0.1:{port}/predict", json={"image": image}, timeout=30)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)  # the request is inside the model now
    proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert proc.wait(timeout=30) == 0
    assert result["r"].status_code == 200
