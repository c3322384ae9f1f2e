"""Against a real uvicorn process on a free loopback port: the README's curl examples, verbatim."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import png_bytes, scene

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, env: dict[str, str] | None = None, config: Path | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    if config is not None:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in 90 s")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = start_server(port)
    yield f"http://127.0.0.1:{port}", port
    proc.terminate()
    proc.wait(timeout=30)


def readme_examples() -> list[str]:
    """The ```bash blocks of README's API section that call curl."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if b.lstrip().startswith("curl")]


def test_readme_has_curl_examples():
    assert len(readme_examples()) >= 6


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_curl_example(server, tmp_path, index):
    _, port = server
    (tmp_path / "circle.png").write_bytes(png_bytes(scene("circle")[0]))
    (tmp_path / "ring.png").write_bytes(png_bytes(scene("ring", seed=2)[0]))
    script = readme_examples()[index].replace("localhost:8000", f"localhost:{port}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    if "-o " in script:
        produced = [p for p in tmp_path.iterdir() if p.name not in ("circle.png", "ring.png")]
        assert produced and all(p.read_bytes().startswith(b"\x89PNG") for p in produced)
    elif out.strip().startswith("{"):
        body = json.loads(out)
        assert "error" not in body, body


def test_real_server_round_trip(server):
    url, _ = server
    files = {"image": ("c.png", png_bytes(scene("circle")[0]), "image/png")}
    r = httpx.post(f"{url}/explain", files=files, params={"output": "overlay"})
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "circle"
    assert r.headers["x-request-id"]
