"""The model repository: explicit states, per-model readiness, load and unload while others serve."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.dataplane import DataPlane, ExplainOptions, Limits
from service.errors import ModelNotFound, NotReady
from service.imaging import encode_png
from service.modelspec import ModelSpec
from service.registry import ModelLoadError
from service.repository import BatchSettings, ModelRepository, ModelState
from tests.api.models import TINY_PRE, tiny_model

PNG = encode_png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
TINY = ModelSpec("t", "python:tests.api.models:tiny", preprocess={"resize": [32, 32]})


def _repo() -> ModelRepository:
    repository = ModelRepository(BatchSettings(max_batch_size=4))
    repository.start()
    return repository


def test_states_from_declared_to_unloaded():
    async def go() -> list[str]:
        repository = _repo()
        seen = [repository.declare("t", TINY).state.value]
        with pytest.raises(NotReady, match="'t' is loading"):
            repository.get("t")
        assert not repository.ready
        await repository.load(TINY)
        seen.append(repository.find("t").state.value)
        assert repository.ready
        dataplane = DataPlane(repository, Limits())
        before = await dataplane.infer("t", [PNG], top_k=2)
        await repository.unload("t")
        seen.append(repository.find("t").state.value)
        with pytest.raises(ModelNotFound, match="unloaded"):
            repository.get("t")
        await repository.load(TINY)  # reload after unload
        after = await dataplane.infer("t", [PNG], top_k=2)
        assert before.results[0].scores == after.results[0].scores
        seen.append(repository.find("t").state.value)
        await repository.close()
        return seen

    assert asyncio.run(go()) == ["loading", "ready", "unloaded", "ready"]


def test_a_failed_load_is_a_state_with_its_reason_and_others_keep_serving():
    async def go() -> None:
        repository = _repo()
        await repository.load(tiny_model("ok"))
        bad = ModelSpec("bad", "torchvision:resnet18", weights="/nonexistent.pth")
        with pytest.raises(ModelLoadError, match="weights file not found"):
            await repository.load(bad)
        assert repository.ready  # loaded on request, not configured: its failure is its own
        repository.declare("bad", bad)  # as the configuration names it
        with pytest.raises(ModelLoadError, match="weights file not found"):
            await repository.load(bad)
        entry = repository.find("bad")
        assert entry.state is ModelState.FAILED and "weights file not found" in (entry.error or "")
        with pytest.raises(NotReady, match="failed"):
            repository.get("bad")
        assert not repository.ready  # a configured model is not serving
        result = await DataPlane(repository, Limits()).infer("ok", [PNG])
        assert result.model == "ok"
        await repository.close()

    asyncio.run(go())


@pytest.mark.slow
def test_unload_lets_queued_requests_finish_and_refuses_new_ones():
    async def go() -> None:
        repository = _repo()
        await repository.load(tiny_model("slow", delay_s=0.2))
        dataplane = DataPlane(repository, Limits())
        queued = [asyncio.ensure_future(dataplane.infer("slow", [PNG], explain=ExplainOptions())) for _ in range(6)]
        await asyncio.sleep(0.05)  # all queued or running
        unloading = asyncio.ensure_future(repository.unload("slow"))
        await asyncio.sleep(0.01)
        assert repository.find("slow").state is ModelState.DRAINING
        with pytest.raises(NotReady, match="draining"):
            dataplane.plan("slow", 1)
        results = await asyncio.gather(*queued)
        await unloading
        assert all(r.results[0].explanations for r in results)
        assert repository.find("slow").model is None
        await repository.close()

    asyncio.run(go())


def test_the_configured_target_layer_leaves_no_hook_on_the_traced_default():
    from service.registry import serve_module
    from tests.api.models import Tiny

    module = Tiny()
    model = serve_module(module, ModelSpec("t", "python:x:y", target_layer="features.0"), None, TINY_PRE)
    assert model.engine.layers.default == "features.0"
    hooked = [name for name, m in module.named_modules() if m._forward_hooks]
    assert hooked == ["features.0"]
    model.close()
    assert not [name for name, m in module.named_modules() if m._forward_hooks]


def test_the_warm_up_runs_without_the_batcher_and_is_not_counted():
    batches: list[int] = []

    async def go() -> None:
        repository = ModelRepository(BatchSettings(), on_batch=lambda name: lambda stats: batches.append(stats.size))
        repository.start()
        await repository.load(tiny_model("t"))
        assert batches == []
        await DataPlane(repository, Limits()).infer("t", [PNG, PNG])
        await repository.close()

    asyncio.run(go())
    assert sum(batches) == 2
