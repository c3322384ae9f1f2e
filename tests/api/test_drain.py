"""A drain timeout shorter than the work in flight: those requests get the JSON 503, and the log stays clean."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.api.conftest import b64, png_bytes, scene
from tests.api.server import free_port, start_server


@pytest.mark.slow
def test_requests_cut_by_the_drain_timeout_get_a_json_503(tmp_path):
    cfg = tmp_path / "slow.toml"
    cfg.write_text('[models.slow]\nsource = "python:tests.api.models:slow"\n'
                   "[models.slow.preprocess]\nresize = [32, 32]\n")
    log = tmp_path / "server.log"
    port = free_port()
    env = {"SLOW_MODEL_S": "4", "SERVICE_DRAIN_TIMEOUT_S": "0.5"}
    proc = start_server(port, env, cfg, ready_timeout_s=300, log=log)
    results: list[httpx.Response] = []
    image = b64(png_bytes(scene("circle")[0]))

    def call() -> None:
        results.append(httpx.post(f"http://127.0.0.1:{port}/predict", json={"image": image}, timeout=60))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both are in the model (one running, one queued behind it)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    answered = time.monotonic() - started
    assert proc.wait(timeout=60) == 0
    assert [r.status_code for r in results] == [503, 503], [r.text for r in results]
    for r in results:
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "not_ready"
        assert "drain timeout" in r.json()["error"]["message"]
    assert answered < 3.5  # within the drain timeout, not after the 4 s batch
    text = log.read_text()
    for needle in ("Traceback", "never retrieved", "Exception in ASGI", "Cancel "):
        assert needle not in text, text[-3000:]
