"""Start a real camserve process on a free loopback port and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, env: dict[str, str] | None = None, config: Path | None = None,
                 ready_timeout_s: float = 90, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``camserve serve`` and wait for ``/readyz``. Its output goes to ``log`` or a temporary file
    (a pipe nobody reads would block a chatty server), shown if it fails to start. No shutdown grace
    unless ``env`` sets ``SERVICE_SHUTDOWN_GRACE_S``: tests stop their servers with SIGTERM."""
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    if config is not None:
        cmd += ["--config", str(config)]
    fd, log_path = tempfile.mkstemp(prefix="camserve-", suffix=".log")
    if log is not None:
        os.close(fd)
        fd, log_path = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(log)
    env = {**os.environ, "SERVICE_SHUTDOWN_GRACE_S": "0", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)  # the child keeps its own copy
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log_path).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)  # reaped here, not in Popen.__del__ (an unraisable warning fails the run)
    raise RuntimeError(f"server did not become ready in {ready_timeout_s:.0f} s: "
                       f"{Path(log_path).read_text()[-2000:]}")
