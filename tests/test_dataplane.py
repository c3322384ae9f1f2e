"""The data plane bounds a whole request: its time (decode to render), its image count against the
queue, and what it serialises."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest

from service.dataplane import DataPlane, ExplainOptions, Limits
from service.errors import PayloadTooLarge, RequestTimeout
from service.imaging import encode_png
from service.pipeline import Pipeline
from service.repository import BatchSettings, ModelRepository
from tests.api.hardening_helpers import tiny_client
from tests.api.models import tiny_model

PNG = encode_png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
# Large enough that decoding and rendering it go to the CPU pool, not the event loop.
LARGE_PNG = encode_png(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))


async def _dataplane(timeout_s: float | None, max_queue: int = 256) -> DataPlane:
    repository = ModelRepository(BatchSettings(max_queue=max_queue))
    repository.start()
    await repository.load(tiny_model())
    return DataPlane(repository, Limits(timeout_s=timeout_s))


@pytest.mark.parametrize("stage", ["prepare", "finish"])
def test_the_timeout_covers_decode_and_render_not_only_the_queue(monkeypatch, stage):
    original = getattr(Pipeline, stage)

    def slow(self, *args, **kwargs):
        time.sleep(0.4)
        return original(self, *args, **kwargs)

    async def go() -> None:
        dataplane = await _dataplane(0.1)
        monkeypatch.setattr(Pipeline, stage, slow)
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"0\.1 s"):
            await dataplane.infer(None, [LARGE_PNG], explain=ExplainOptions())
        assert time.monotonic() - started < 0.35  # answered at the deadline, not when the work ended
        monkeypatch.setattr(Pipeline, stage, original)
        await asyncio.sleep(0.4)  # let the abandoned thread finish before the pool closes
        await dataplane.repository.close()

    asyncio.run(go())


def test_no_timeout_means_no_limit(monkeypatch):
    original = Pipeline.prepare

    def slow(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    async def go() -> None:
        dataplane = await _dataplane(None)
        monkeypatch.setattr(Pipeline, "prepare", slow)
        result = await dataplane.infer(None, [PNG])
        assert result.results[0].predictions
        await dataplane.repository.close()

    asyncio.run(go())


def test_more_images_than_the_queue_holds_is_413_not_a_retry():
    async def go() -> None:
        dataplane = await _dataplane(30, max_queue=4)
        with pytest.raises(PayloadTooLarge, match="more than the model's queue holds"):
            await dataplane.infer(None, [PNG] * 5)
        assert len((await dataplane.infer(None, [PNG] * 4)).results) == 4
        await dataplane.repository.close()

    asyncio.run(go())


def test_over_the_queue_over_http_has_no_retry_after():
    with tiny_client(max_queue=2, max_images_per_request=8) as c:
        from tests.api.conftest import b64

        r = c.post("/predict", json={"images": [b64(PNG)] * 3})
        assert r.status_code == 413 and "retry-after" not in r.headers
        assert r.json()["error"]["code"] == "payload_too_large"


def test_array_heatmaps_serialise_short_decimals():
    from tests.api.conftest import b64

    with tiny_client() as c:
        r = c.post("/explain", json={"image": b64(PNG), "output": "array", "size": "input"})
    assert r.status_code == 200
    text = r.text
    assert not re.search(r"\d\.\d{5,}", text.split('"heatmap"')[1]), "float32 noise in the array"
    rows = r.json()["results"][0]["explanations"][0]["heatmap"]["data"]
    assert len(rows) == 32 and max(max(row) for row in rows) == 1.0
