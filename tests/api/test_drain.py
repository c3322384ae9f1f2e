"""Shutdown of a real server: the readiness grace (503 on readiness while new connections are still
served), then the drain; a drain timeout shorter than the work in flight gives those requests the
JSON 503, and the log stays clean."""

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


def _until(check, timeout_s: float = 20.0, every_s: float = 0.02):
    """Poll ``check`` until it returns something other than None; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value is not None:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not reached in {timeout_s} s")


@pytest.mark.slow
def test_sigterm_turns_readiness_off_while_new_connections_are_still_served(tmp_path):
    cfg = tmp_path / "fast.toml"
    cfg.write_text('[models.slow]\nsource = "python:tests.api.models:slow"\n'
                   "[models.slow.preprocess]\nresize = [32, 32]\n")
    port = free_port()
    grace = 4.0  # room for a busy machine (the suite runs on two workers): the probes and a predict fit in it
    proc = start_server(port, {"SLOW_MODEL_S": "0", "SERVICE_SHUTDOWN_GRACE_S": str(grace)}, cfg,
                        ready_timeout_s=300, log=tmp_path / "server.log")
    try:
        base = f"http://127.0.0.1:{port}"
        image = b64(png_bytes(scene("circle")[0]))
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _until(lambda: True if httpx.get(f"{base}/readyz", timeout=5).status_code == 503 else None)
        withdrawn = time.monotonic()
        # Within the grace: readiness says 503 in both dialects, and a request on a new connection is served.
        with httpx.Client(base_url=base, timeout=10) as client:  # one connection for the probes
            r = client.get("/v2/health/ready")
            assert r.status_code == 503 and r.json()["error"] == "the server is shutting down"
        answered = httpx.post(f"{base}/predict", json={"image": image}, timeout=10)
        served_at = time.monotonic()
        assert answered.status_code == 200, answered.text
        assert served_at - signalled < grace, "the grace had already ended; the test machine is too slow"

        def refused() -> bool | None:
            # A probe that reaches the socket in the instant it closes is accepted and then dropped
            # unanswered (RemoteProtocolError, or ReadError on a reset): the listener is gone all the same.
            try:
                httpx.get(f"{base}/healthz", timeout=1)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                return True
            return None

        _until(refused)
        closed = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert withdrawn - signalled < 1.0, "readiness did not turn off at once"
    finally:
        if proc.poll() is None:  # a failed assertion must not leave the server running
            proc.kill()
            proc.wait(30)
    assert closed - signalled >= grace * 0.9, f"the listener closed {closed - signalled:.2f} s after SIGTERM"
