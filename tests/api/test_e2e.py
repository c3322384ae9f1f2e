"""Against a real uvicorn process on a free loopback port: the README's curl examples, verbatim."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import png_bytes, scene

ROOT = Path(__file__).resolve().parents[2]


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
    else:
        bodies = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert bodies, out
        assert all("error" not in b for b in bodies), bodies


def test_real_server_round_trip(server):
    url, _ = server
    files = {"image": ("c.png", png_bytes(scene("circle")[0]), "image/png")}
    r = httpx.post(f"{url}/explain", files=files, params={"output": "overlay"})
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "circle"
    assert r.headers["x-request-id"]
