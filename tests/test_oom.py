"""Out of memory, simulated on CPU: a batch that does not fit is split, an image that does not fit alone
is a JSON 503 and the server goes on, and a warm-up that runs out of memory at load is split or fails the
load cleanly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service import repository as repository_module
from service.registry import ModelLoadError, ModelSpec, serve_module
from service.repository import BatchSettings, ModelRepository, ModelState
from tests.api.conftest import b64
from tests.api.hardening_helpers import tiny_client
from tests.api.models import TINY_PRE, tiny_model
from tests.test_pipeline import IMAGES, OomAbove


def _oom_model(limit: int, name: str = "oom"):
    return serve_module(OomAbove(limit), ModelSpec(name=name, source="python:x:y"), ["a", "b", "c", "d"], TINY_PRE)


def test_an_image_that_does_not_fit_alone_is_a_json_503_and_the_server_goes_on():
    model = _oom_model(limit=1)
    with tiny_client(models=[model, tiny_model("other")], max_batch_size=4) as c:
        model.module.limit = 0  # after the warm-up: nothing fits any more
        r = c.post("/explain", json={"image": b64(IMAGES[0]), "model": "oom"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "out_of_memory"
        assert "one image does not fit" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert c.post("/v1/models/oom:predict", json={"instances": [{"image": {"b64": b64(IMAGES[0])}}]}).json() == {
            "error": "one image does not fit in cpu memory for model 'oom'"}
        assert c.post("/predict", json={"image": b64(IMAGES[1]), "model": "other"}).status_code == 200
        model.module.limit = 4  # memory freed elsewhere: the same model serves again
        assert c.post("/explain", json={"image": b64(IMAGES[0]), "model": "oom"}).status_code == 200
        assert c.get("/readyz").status_code == 200


def _repository(monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> ModelRepository:
    # The warm-up at the largest batch size runs on CUDA only; these tests ask for it on CPU.
    monkeypatch.setattr(ModelRepository, "_warm_up_sizes", lambda self, model: sizes)
    repository = ModelRepository(BatchSettings(max_batch_size=8))
    repository.start()
    return repository


def test_a_warm_up_batch_that_does_not_fit_is_split_and_the_model_loads(monkeypatch):
    """Batches of 8 do not fit: the memory format is measured for a lone image only, the warm-up's batch
    of 8 is split, and the forward time at load comes from the sizes that fit."""
    async def go() -> tuple[list[int], set[str]]:
        repository = _repository(monkeypatch, [1, 8])
        model = _oom_model(limit=2)
        model.module.sizes.clear()
        entry = await repository.load(model)
        assert entry.state is ModelState.READY and entry.pipeline is not None
        measured = {key.rsplit(" ", 1)[1] for key in entry.pipeline.formats.timings_ms}
        assert entry.model is not None and entry.model.forward_s == entry.pipeline.formats.forward_s > 0
        await repository.close()
        return model.module.sizes, measured

    sizes, measured = asyncio.run(go())
    assert measured == {"1"} and 8 in sizes[:-8]  # tried, out of memory, then a lone image only
    # The warm-up splits its batch of 8; then one image at a time checks that the output depends on the input.
    assert sizes[-10:] == [1, 8, 4, 2, 2, 4, 2, 2, 1, 1]


def test_a_warm_up_that_does_not_fit_one_image_fails_the_load_and_releases_the_model(monkeypatch):
    """A model built from its spec that cannot explain one image: the load fails, naming why, the model's
    hooks are removed (and on CUDA its weights leave the device), and the other model serves on."""
    evicted = []

    def evict(model):
        evicted.append(model)
        real_evict(model)

    real_evict = repository_module._evict
    monkeypatch.setattr(repository_module, "_evict", evict)

    async def go() -> None:
        repository = _repository(monkeypatch, [1, 8])
        await repository.load(tiny_model("ok"))
        spec = ModelSpec("oom", "python:tests.api.models:out_of_memory_when_explaining",
                         preprocess={"resize": [32, 32]})
        with pytest.raises(ModelLoadError, match=r"'oom' failed its warm-up: one image does not fit in cpu memory"):
            await repository.load(spec)
        entry = repository.find("oom")
        assert entry.state is ModelState.FAILED and "does not fit" in (entry.error or "")
        assert len(evicted) == 1 and evicted[0].engine.hooked_layers == ()
        pipeline = repository.get("ok").pipeline
        assert pipeline is not None
        (result,) = await pipeline.run([IMAGES[0]], top_k=1, query=None, spec=None, max_pixels=10**6)
        assert np.isclose(sum(result.scores), 1.0)
        await repository.close()

    asyncio.run(go())
