"""Many concurrent requests through one model's batcher give exactly the one-at-a-time answers."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.config import Settings
from tests.api.conftest import b64, png_bytes, scene

METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"]
LABELS = ["circle", "square", "triangle", "cross", "ring"]


def _requests() -> list[dict]:
    out = []
    for i in range(64):
        body = {"image": b64(png_bytes(scene(LABELS[i % 5], seed=i)[0])), "method": METHODS[i % 6],
                "targets": [i % 5, (i + 2) % 5][: 1 + i % 2], "output": "array", "size": "feature"}
        if i % 7 == 0:
            body["layer"] = "features.1"
        out.append(body)
    return out


async def _run(app, bodies: list[dict], concurrent: bool) -> list[dict]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if concurrent:
                responses = await asyncio.gather(*(client.post("/explain", json=b) for b in bodies))
            else:
                responses = [await client.post("/explain", json=b) for b in bodies]
            metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:1]
    return [r.json() for r in responses], metrics


def _batches(metrics: str) -> tuple[float, float]:
    values = {line.split()[0].split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("camserve_batch_size_")}
    return values["camserve_batch_size_count"], values["camserve_batch_size_sum"]


@pytest.mark.slow
def test_64_concurrent_explains_equal_one_at_a_time():
    bodies = _requests()
    app = create_app(Settings(max_batch_size=32, max_wait_ms=20))
    together, metrics = asyncio.run(_run(app, bodies, concurrent=True))
    count, images = _batches(metrics)
    assert images == 64 and count < 40, "requests were not merged into batches"  # the warm-up is not counted
    alone, _ = asyncio.run(_run(create_app(Settings(max_batch_size=1)), bodies, concurrent=False))
    for a, b in zip(together, alone, strict=True):
        ea, eb = a["results"][0]["explanations"], b["results"][0]["explanations"]
        key = [(e["index"], e["method"], e["layer"]) for e in ea]
        assert key == [(e["index"], e["method"], e["layer"]) for e in eb]
        for x, y in zip(ea, eb, strict=True):
            np.testing.assert_allclose(x["heatmap"]["data"], y["heatmap"]["data"], atol=2e-4)
        pa, pb = a["results"][0]["predictions"], b["results"][0]["predictions"]
        assert [p["index"] for p in pa] == [p["index"] for p in pb]
        assert [p["score"] for p in pa] == pytest.approx([p["score"] for p in pb], abs=1e-5)
