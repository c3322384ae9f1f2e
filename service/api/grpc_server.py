"""The gRPC server: ``inference.GRPCInferenceService`` and the standard ``grpc.health.v1.Health``, on
their own port, in the event loop that serves HTTP, so that both share one data plane and batcher.

Started by the app's lifespan when ``grpc_port`` is set, after the models have loaded; stopped by it
before the repository closes, with the drain timeout as grace for the calls in flight. Messages larger
than ``max_body_bytes`` are refused (``RESOURCE_EXHAUSTED``), as are such bodies over HTTP.

Health answers ``SERVING`` for ``""`` and ``inference.GRPCInferenceService`` while the server is ready
(every model ready, not draining), and for a model's name while that model is ready; Kubernetes'
``grpc`` probes ask for ``""`` unless told a service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc
from service.api.oip_grpc import SERVICE, Servicer
from service.config import Settings
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.repository import ModelRepository

log = logging.getLogger("camserve")
_Status = health_pb2.HealthCheckResponse.ServingStatus
SERVING, NOT_SERVING = int(_Status.SERVING), int(_Status.NOT_SERVING)


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpcio-health-checking ships no types
    """``grpc.health.v1.Health``, computed from the repository on every call."""

    def __init__(self, repository: ModelRepository, watch_interval_s: float = 1.0) -> None:
        self.repository = repository
        self.watch_interval_s = watch_interval_s

    def status(self, service: str) -> int | None:
        if service in ("", SERVICE):
            return SERVING if self.repository.not_ready_reason() is None else NOT_SERVING
        try:
            served = self.repository.find(service)
        except Exception:  # not a model's name either
            return None
        shutting_down = self.repository.draining or self.repository.withdrawn
        return SERVING if served.ready and not shutting_down else NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}; "
                                f"known: '', {SERVICE} and the models' names")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = -1
        while True:
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=_Status.SERVICE_UNKNOWN if status is None else status)
                last = status
            await asyncio.sleep(self.watch_interval_s)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc(settings: Settings, dataplane: DataPlane, metrics: Metrics) -> tuple[grpc.aio.Server, int]:
    """Start serving on ``settings.grpc_port`` (0: a free port); the server and the port it bound."""
    assert settings.grpc_port is not None
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),  # outputs are bounded by max_render_pixels
        ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent share
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated
        Servicer(settings, dataplane, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(Health(dataplane.repository), server)
    address = _address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("camserve serving the Open Inference Protocol over gRPC on %s", _address(settings.host, port))
    return server, port


async def stop_grpc(server: grpc.aio.Server, grace_s: float) -> None:
    """Refuse new calls and give those in flight ``grace_s`` seconds to finish."""
    await server.stop(grace_s)
