"""Against a real uvicorn process on a free loopback port: the documents' curl examples, verbatim."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest

from tests.api.conftest import png_bytes, scene
from tests.doc_examples import curl_examples

EXAMPLES = curl_examples()


def test_documents_have_curl_examples():
    """The README's tour and the API and Protocols pages keep their executed examples."""
    where = {e.where.split(":")[0] for e in EXAMPLES}
    assert {"README.md", "docs/api.md", "docs/protocols.md"} <= where, where
    assert len(EXAMPLES) >= 15


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_documented_curl_example(server, tmp_path, example):
    _, port = server
    (tmp_path / "circle.png").write_bytes(png_bytes(scene("circle")[0]))
    (tmp_path / "ring.png").write_bytes(png_bytes(scene("ring", seed=2)[0]))
    script = example.code.replace("localhost:8000", f"localhost:{port}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    expected = re.findall(r"^# (\d{3})$", example.code, flags=re.M)
    if "-o /dev/null" in script:  # a status example: `-w '%{http_code}'`, with the status it shows as `# NNN`
        assert expected and out.split() == expected, (out, expected)
    elif "-o " in script:
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
