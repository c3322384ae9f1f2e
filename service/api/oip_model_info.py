"""Triton's model configuration and statistics extensions of the Open Inference Protocol:
``GET /v2/models/{m}/config`` and ``GET /v2/models[/{m}]/stats``, which tritonclient's
``get_model_config`` and ``get_inference_statistics`` call.

The configuration says what camserve knows of a model in Triton's terms (its batch limit, inputs and
outputs without the batch dimension, the dynamic batcher's delay); the statistics come from the
counters the metrics keep for every batch and every inference request.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import MetricsDep, RepositoryDep, SettingsDep
from service.api.oip import VERSION, check_version, metadata
from service.metrics import Duration, ModelStats
from service.repository import ModelState

router = APIRouter(tags=["open inference protocol (v2)"], include_in_schema=False)

_TRITON_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "UINT8": "TYPE_UINT8"}


def _tensors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Triton's dims leave out the batch dimension when max_batch_size > 0.
    return [{"name": t["name"], "data_type": _TRITON_TYPES[t["datatype"]], "dims": t["shape"][1:] or [1]}
            for t in items]


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(name: str, repository: RepositoryDep, settings: SettingsDep,
                       version: str | None = None) -> dict[str, Any]:
    check_version(name, version)
    served = repository.get(name)
    meta = metadata(served)
    assert served.model is not None
    return {
        "name": served.name, "platform": meta["platform"], "backend": "camserve",
        "version_policy": {"specific": {"versions": [int(VERSION)]}},
        "max_batch_size": settings.max_batch_size,
        "input": _tensors(meta["inputs"]), "output": _tensors(meta["outputs"]),
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
                             "max_queue_size": settings.max_queue},
        "parameters": {
            "device": {"string_value": str(served.model.device)},
            "precision": {"string_value": served.model.spec.precision},
            "batch_policy": {"string_value": settings.batch_policy},
        },
    }


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _model_stats(name: str, stats: ModelStats) -> dict[str, Any]:
    return {
        "name": name, "version": VERSION, "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success), "fail": _duration(stats.fail), "queue": _duration(stats.queue),
            # camserve's batch compute is one stage: decoding and rendering run outside it, per request.
            "compute_input": _duration(Duration()), "compute_infer": _duration(stats.compute),
            "compute_output": _duration(Duration()),
            "cache_hit": _duration(Duration()), "cache_miss": _duration(Duration()),
        },
        "batch_stats": [{"batch_size": size, "compute_input": _duration(Duration()),
                         "compute_infer": _duration(d), "compute_output": _duration(Duration())}
                        for size, d in sorted(stats.batches.items())],
    }


@router.get("/v2/models/stats")
async def all_stats(repository: RepositoryDep, metrics: MetricsDep) -> dict[str, Any]:
    return {"model_stats": [_model_stats(m.name, metrics.model_stats(m.name)) for m in repository
                            if m.state is not ModelState.UNLOADED]}


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def model_stats(name: str, repository: RepositoryDep, metrics: MetricsDep,
                      version: str | None = None) -> dict[str, Any]:
    check_version(name, version)
    served = repository.find(name)  # a model that is loading or failed has statistics too (zeros)
    if served.state is ModelState.UNLOADED:
        repository.get(name)  # 404, as for every route of an unloaded model
    return {"model_stats": [_model_stats(served.name, metrics.model_stats(served.name))]}
