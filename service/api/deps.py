"""Request dependencies as ``Annotated`` aliases, so handlers read as declarations.

They are ``async`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a
thread hop per dependency per request for what is an attribute lookup."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.errors import NotReady
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.runtime import ModelRuntime


class Runtimes:
    """The served models' runtimes, looked up through the registry (unknown names -> 404)."""

    def __init__(self, registry: ModelRegistry, runtimes: dict[str, ModelRuntime]) -> None:
        self.registry = registry
        self._runtimes = runtimes

    def get(self, name: str | None) -> ModelRuntime:
        return self._runtimes[self.registry.get(name).name]

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(self._runtimes.values())


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise NotReady("models are still loading")
    return registry


async def get_runtimes(request: Request) -> Runtimes:
    if getattr(request.app.state, "draining", False):
        raise NotReady("the server is shutting down")
    return Runtimes(await get_registry(request), request.app.state.runtimes)


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
RuntimesDep = Annotated[Runtimes, Depends(get_runtimes)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
